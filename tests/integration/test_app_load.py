"""A busy bidder makes its host serve less: real processes, real CPU, real bytes.

Every daemon of the cluster watches a pidfile (``--watch-pidfile``), the way a
production daemon watches its bidder's.  One target's "bidder" spins (a
parent and two children burning CPU, bounded in time); every other daemon's is
a sleeping ``sleep``.  All the daemons share this machine, so they all report
the same host CPU: only ``app_cpu`` tells the busy one apart.

Two targets (the busy one and an idle one) already hold the file at its
destination, as hosts that got the last version do: they build every chunk
from that copy at once (``fdship_delta_chunks{how="local"}``) and so can
serve from the start, on equal terms.  Three more fetch at a capped rate, so
the job lasts a few seconds and they take most of their chunks from peers.
The busy host must serve clearly fewer bytes than the idle peers, and every
copy must be byte-identical.  Without the steering the busy host serves about
as much as its idle twin (checked by turning the app term of
``placement.busyness`` off: the assertion below then fails).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from fdship.core import placement

MiB = 1024 * 1024
BUSY_HOST = "d1"
TARGETS = ["d1", "d2", "d3", "d4", "d5"]
EARLY = {"d1", "d2"}  # hold the file before the job: both can serve at once
# Burns up to four cores for at most ``secs`` seconds: a parent and three
# children, so the daemon's "children included" is what makes it look busy
# (and several of them still get most of a core on a machine others load).
BIDDER = """
import subprocess, sys, time
secs = float(sys.argv[1])
spin = "import time\\nend = time.monotonic() + %r\\nwhile time.monotonic() < end:\\n    pass\\n"
kids = [subprocess.Popen([sys.executable, "-c", spin % secs]) for _ in range(3)]
end = time.monotonic() + secs
while time.monotonic() < end:
    pass
for k in kids:
    k.wait()
"""


@pytest.fixture
def apps(tmp_path: Any) -> Iterator[Callable[[str, list[str]], str]]:
    """``start(name, argv)`` starts a process and writes its pidfile; returns the
    pidfile's path.  Every process and its children are killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, argv: list[str]) -> str:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        started.append(p)
        path = str(tmp_path / f"{name}.pid")
        with open(path, "w") as f:
            f.write(f"{p.pid}\n")
        return path

    try:
        yield start
    finally:
        for p in started:
            try:
                kids = psutil.Process(p.pid).children(recursive=True)
            except psutil.Error:
                kids = []
            for k in kids:
                try:
                    k.kill()
                except psutil.Error:
                    pass
            p.send_signal(signal.SIGKILL)
            p.wait(10)


def test_host_whose_bidder_burns_cpu_serves_far_less(cluster_factory, apps, tmp_path):
    args: dict[int, list[str]] = {}
    for i in range(6):
        name = f"d{i}"
        pid = (apps(name, [sys.executable, "-c", BIDDER, "90"]) if name == BUSY_HOST
               else apps(name, ["sleep", "120"]))
        args[i] = ["--watch-pidfile", pid]
        if name in TARGETS and name not in EARLY:
            args[i] += ["--download-rate", "3M"]
    c = cluster_factory(6, center_args=["--chunk-size", "256K"], daemon_args=args)

    # The center must see the bidder before the job starts: every daemon reads
    # about the same host CPU here, only app_cpu differs.
    app_seen: list[float] = []
    deadline = time.monotonic() + 30
    while True:
        hosts = c.hosts()
        app_seen.append(hosts[BUSY_HOST]["load"]["app_cpu"])
        if app_seen[-1] >= placement.APP_BUSY:
            break
        assert time.monotonic() < deadline, (
            f"the center never saw {BUSY_HOST}'s bidder at {placement.APP_BUSY:.0f}% of a core "
            f"in 30 s (app_cpu seen: {app_seen[-10:]}): is the machine that loaded?")
        time.sleep(0.2)
    print("\nbefore the job: " + ", ".join(
        f"{n} cpu {h['load']['cpu']:.0f}% app {h['load']['app_cpu']:.0f}% "
        f"busyness {h['busyness']:.2f}" for n, h in sorted(hosts.items())))
    for n, h in hosts.items():
        if n != BUSY_HOST:
            assert h["load"]["app_cpu"] < 10.0 and h["busyness"] < 0.5, (n, h)

    path = str(tmp_path / "model.bin")
    want = c.write_random(path, 16 * MiB, seed=7)
    for i, name in enumerate(["d0", *TARGETS]):
        if name in EARLY:
            dest = c.dest_path(i, path)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(path, dest)
    t0 = time.monotonic()
    jid = c.submit_async([path], TARGETS)
    seen: list[float] = []  # the busy host's busyness while the job ran

    def finished() -> Any:
        seen.append(c.hosts()[BUSY_HOST]["busyness"])
        res = c.job_now(jid)
        return res if res["state"] != "running" else None
    res = c.wait_until("job end", finished, timeout=120, every=0.25)
    took = time.monotonic() - t0
    assert res["state"] == "done", res
    for i, name in enumerate(["d0", *TARGETS]):
        if name in TARGETS:
            assert c.sha256(c.dest_path(i, path)) == want, f"{name}'s copy differs"

    metrics = [c.daemon_metrics(i) for i in range(6)]
    served = {f"d{i}": m.get("fdship_bytes_served_total", 0.0) for i, m in enumerate(metrics)}
    local = {f"d{i}": m.get('fdship_delta_chunks_total{how="local"}', 0.0)
             for i, m in enumerate(metrics)}
    peers = [served[n] for n in TARGETS if n != BUSY_HOST]
    mean = sum(peers) / len(peers)
    print(f"job of 16 MiB to {len(TARGETS)} targets in {took:.1f} s; MiB served: "
          + ", ".join(f"{n} {b / MiB:.1f}" for n, b in served.items())
          + f"; idle peers' mean {mean / MiB:.1f}; {BUSY_HOST}'s busyness during the job: "
          f"min {min(seen):.2f}, mean {sum(seen) / len(seen):.2f} over {len(seen)} looks; "
          f"chunks built from the old copy: {local}")
    # The early holders really held every chunk early (64 chunks of 256K).
    assert all(local[n] >= 64 for n in EARLY), local
    assert mean >= 4 * MiB, served  # the peers did serve: the test means something
    assert served[BUSY_HOST] < 0.5 * mean, served
