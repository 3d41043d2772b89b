"""A busy bidder makes its host serve less: real processes, real CPU, real bytes.

Every daemon of the cluster watches a pidfile (``--watch-pidfile``), the way a
production daemon watches its bidder's.  One target's "bidder" spins (a
parent and three children burning CPU, bounded in time, killed at the end);
every other daemon's is a sleeping ``sleep``.  All the daemons share this
machine, so they all report the same host CPU: only ``app_cpu`` tells the busy
one apart.

Two targets, the busy one and an idle twin, already hold the file at its
destination, as hosts that got the last version do, and fetch without a cap.
Three more fetch at 2 MiB/s and take most of their chunks from peers; their
daemons are down when the job starts (the center keeps their part waiting)
and come back once both twins hold every chunk.  That makes the twins early
holders on equal terms, and keeps the busy one from being the only holder of
a chunk when someone needs it (a chunk whose first copy from the source landed
there alone must still be handed on, busy or not; which twin the source's
first copies reach is chance).  From the moment the three come back to the
end of the job, the busy host must serve clearly fewer bytes than its idle
peers (under half their mean), and every copy must be byte-identical.
Without the steering it serves about as much as its twin: turning the app
term of ``placement.busyness`` off makes the assertion fail.
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


@pytest.mark.slow  # about 20 s: cluster start, a death seen, a 10 s job
def test_host_whose_bidder_burns_cpu_serves_far_less(cluster_factory, apps, tmp_path):
    args: dict[int, list[str]] = {}
    for i in range(6):
        name = f"d{i}"
        pid = (apps(name, [sys.executable, "-c", BIDDER, "90"]) if name == BUSY_HOST
               else apps(name, ["sleep", "120"]))
        args[i] = ["--watch-pidfile", pid]
        if name in TARGETS and name not in EARLY:
            args[i] += ["--download-rate", "2M"]
    c = cluster_factory(6, center_args=["--chunk-size", "512K"], daemon_args=args)

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

    # The late targets go down before the job, and the center must see it.
    late = [i for i, n in enumerate(["d0", *TARGETS]) if n in TARGETS and n not in EARLY]
    for i in late:
        c.daemons[i].kill(signal.SIGTERM)
    c.wait_until("the late targets seen dead", lambda: not any(
        h["alive"] for n, h in c.hosts().items() if int(n[1:]) in late), timeout=30, every=0.2)

    path = str(tmp_path / "model.bin")
    want = c.write_random(path, 16 * MiB, seed=7)
    for i, name in enumerate(["d0", *TARGETS]):
        if name in EARLY:
            dest = c.dest_path(i, path)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(path, dest)

    def served_now() -> dict[str, float]:
        return {f"d{i}": c.daemon_metrics(i).get("fdship_bytes_served_total", 0.0)
                for i in range(6) if c.daemons[i].alive()}

    t0 = time.monotonic()
    jid = c.submit_async([path], TARGETS)
    seen: list[float] = []  # the busy host's busyness while the job ran
    at_return: dict[str, float] = {}  # bytes served when the late targets came back
    marks: dict[str, float] = {}

    def finished() -> Any:
        seen.append(c.hosts()[BUSY_HOST]["busyness"])
        res = c.job_now(jid)
        ms = res["machines"]
        if not at_return and all(ms[n]["chunks_done"] == ms[n]["chunks_total"] for n in EARLY):
            at_return.update(served_now())
            marks["back"] = time.monotonic() - t0
            for i in late:
                c.start_daemon(i)
        return res if res["state"] != "running" else None
    res = c.wait_until("job end", finished, timeout=120, every=0.2)
    took = time.monotonic() - t0
    assert res["state"] == "done", res
    for i, name in enumerate(["d0", *TARGETS]):
        if name in TARGETS:
            assert c.sha256(c.dest_path(i, path)) == want, f"{name}'s copy differs"

    metrics = [c.daemon_metrics(i) for i in range(6)]
    served = {f"d{i}": m.get("fdship_bytes_served_total", 0.0) for i, m in enumerate(metrics)}
    local = {f"d{i}": m.get('fdship_delta_chunks_total{how="local"}', 0.0)
             for i, m in enumerate(metrics)}
    # The late targets' daemons restarted: their counters start from 0.
    after = {n: served[n] - at_return.get(n, 0.0) for n in served}
    peers = [after[n] for n in TARGETS if n != BUSY_HOST]
    mean = sum(peers) / len(peers)

    def mib(d: dict[str, float]) -> str:
        return ", ".join(f"{n} {b / MiB:.1f}" for n, b in d.items())
    print(f"job of 16 MiB to {len(TARGETS)} targets in {took:.1f} s (late targets back at "
          f"{marks['back']:.1f} s); {BUSY_HOST}'s busyness: min {min(seen):.2f}, mean "
          f"{sum(seen) / len(seen):.2f} over {len(seen)} looks; chunks built from the old "
          f"copy: {local}\nMiB served before the late targets came back: {mib(at_return)}"
          f"\nMiB served after: {mib(after)}; idle peers' mean {mean / MiB:.1f}, "
          f"{BUSY_HOST} {after[BUSY_HOST] / MiB:.1f}")
    assert all(local[n] >= 1 for n in EARLY), local  # the old copies were used
    assert mean >= 4 * MiB, after  # the peers did serve: the comparison means something
    assert after[BUSY_HOST] < 0.5 * mean, after
