"""fdship on a real network: hosts in network namespaces, links shaped with tbf.

Where it sits: the cluster tests (``tests/cluster``) run the real center and
one real daemon per namespace host (:mod:`tests.cluster.swarm` on top of
:mod:`tests.netns`) and ship a file over 80 Mbit/s links, the case the swarm
scheduler is built for.  Figures are printed, never asserted against wall
time (the machine is shared); what is asserted is what must hold anywhere:
every copy byte-identical, the source sending about one copy, the load
reports visible.  Namespaces, processes and directories are removed even
when a test fails; the tests skip, with the reason, only where namespaces
cannot be made.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.cluster.swarm import NetnsSwarm, generate, same_bytes
from tests.netns import require_netns

pytestmark = pytest.mark.netns

MiB = 1024 * 1024
RATE_MBIT = 80


def test_file_to_five_targets_over_shaped_links() -> None:
    require_netns()
    size = 16 * MiB
    with NetnsSwarm(6, RATE_MBIT, prefix="fct") as sw:
        src = os.path.join(sw.base, "payload.bin")
        generate(src, size, seed=11)
        before = sw.egress(0)
        result, wall = sw.ship(src, range(1, 6))
        egress = sw.egress(0) - before
        bound = size / (RATE_MBIT * 1e6 / 8)
        slowest = max(m["seconds"] for m in result["machines"].values())
        print(f"16 MiB to 5 targets at {RATE_MBIT} Mbit/s: wall {wall:.2f} s, job "
              f"{slowest:.2f} s, S/B {bound:.2f} s, ratio {wall / bound:.2f}; source egress "
              f"{egress / size:.3f} x the file")
        assert result["state"] == "done", result
        assert set(result["machines"]) == {f"h{i}" for i in range(1, 6)}
        for i in range(1, 6):
            assert same_bytes(src, sw.landed(i, src)), f"h{i} got different bytes"
        assert egress <= 1.3 * size  # link bytes: payload, headers and control traffic
        assert sw.status(0)["bytes_served"] <= 1.1 * size
        # Every target served part of the file to the others: a swarm, not a star.
        served = [sw.status(i)["bytes_served"] for i in range(1, 6)]
        assert sum(served) >= 3 * size, served
        # The load reports that steer scheduling are visible per daemon.
        hosts = {h["name"]: h for h in sw.request("GET", sw.center_url + "/center/hosts")["hosts"]}
        for i in range(6):
            load = hosts[f"h{i}"]["load"]
            assert {"cpu", "loadavg", "net_tx", "net_rx", "disk_busy", "uploads",
                    "downloads"} <= set(load), load
        # The source's bytes served reach the center with its next heartbeat
        # (every second), which may come after the job's end: wait for it.
        deadline = time.monotonic() + 10
        while hosts["h0"]["load"]["bytes_served"] < size and time.monotonic() < deadline:
            time.sleep(0.2)
            hosts = {h["name"]: h for h in
                     sw.request("GET", sw.center_url + "/center/hosts")["hosts"]}
        assert hosts["h0"]["load"]["bytes_served"] >= size


def test_teardown_leaves_no_namespace_or_process_even_after_a_failure() -> None:
    require_netns()
    from tests.netns import _netns_names

    pids: list[int] = []
    names: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), NetnsSwarm(2, RATE_MBIT, prefix="fcf") as sw:
        pids = [p.pid for p in sw.daemons] + [sw.center.pid]  # type: ignore[union-attr]
        names = [h.ns for h in sw.hosts]
        raise RuntimeError("boom")
    assert not set(names) & set(_netns_names())
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
