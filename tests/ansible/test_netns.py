"""Self-test of the network-namespace host harness (tests/netns.py).

Where it sits: next to the Ansible test, which is the harness's first user.
It proves hosts can reach each other, that shaping caps both directions of a
link (figures are printed; the bands are loose because the machine is shared),
and that teardown, including the sweep of a crashed run, leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.netns import Cluster, Host, _link_names, _netns_names, require_netns

pytestmark = pytest.mark.netns

_RECEIVER = textwrap.dedent("""
    import json, socket, sys, time
    srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    srv.settimeout(20)
    conn, _ = srv.accept()
    conn.settimeout(20)
    total, first = 0, None
    while True:
        data = conn.recv(1 << 20)
        if not data:
            break
        if first is None:
            first = time.monotonic()
        total += len(data)
    print(json.dumps({"bytes": total, "seconds": time.monotonic() - (first or time.monotonic())}))
""")

_SENDER = textwrap.dedent("""
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
    buf = b"x" * (256 * 1024)
    end = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < end:
        s.sendall(buf)
    s.close()
""")


def _goodput_mbit(src: Host, dst: Host, port: int, seconds: float = 2.0) -> float:
    """Megabits per second of TCP payload from src to dst, measured at the receiver."""
    rx = dst.popen([sys.executable, "-c", _RECEIVER, dst.addr, str(port)],
                   stdout=subprocess.PIPE, text=True)
    assert rx.stdout is not None
    assert rx.stdout.readline().strip() == "ready"
    src.run([sys.executable, "-c", _SENDER, dst.addr, str(port), str(seconds)], timeout=60)
    out, _ = rx.communicate(timeout=60)
    result = json.loads(out)
    assert result["bytes"] > 0
    return float(result["bytes"] * 8 / result["seconds"] / 1e6)


def test_hosts_reach_each_other_and_teardown_removes_everything() -> None:
    require_netns()
    with Cluster(2, prefix="fdt") as cluster:
        a, b = cluster.hosts
        assert a.addr != b.addr and a.ns != b.ns
        # Each host has its own stack: b's address is not local to a.
        assert b.addr not in a.run(["ip", "-4", "-o", "addr", "show"]).stdout
        echo = b.popen([sys.executable, "-c", textwrap.dedent("""
            import socket, sys
            srv = socket.create_server((sys.argv[1], 9000))
            print("ready", flush=True)
            srv.settimeout(20)
            c, _ = srv.accept()
            c.sendall(c.recv(100)[::-1])
        """), b.addr], stdout=subprocess.PIPE, text=True)
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        got = a.run([sys.executable, "-c", textwrap.dedent("""
            import socket, sys
            s = socket.create_connection((sys.argv[1], 9000), timeout=10)
            s.sendall(b"hello"); print(s.recv(100).decode())
        """), b.addr]).stdout.strip()
        assert got == "olleh"
        # The initial namespace reaches the hosts through the bridge's address.
        assert cluster.bridge_addr.rsplit(".", 1)[0] == a.addr.rsplit(".", 1)[0]
        # No default route: nothing inside a host can send beyond the bridge.
        assert "default" not in a.run(["ip", "route", "show"]).stdout
        sleeper = a.popen(["sleep", "300"])
        names = [h.ns for h in cluster.hosts]
        links = [h.veth for h in cluster.hosts] + [cluster.bridge]
    assert sleeper.poll() is not None, "teardown left a process running"
    assert not set(names) & set(_netns_names())
    assert not set(links) & set(_link_names())


def test_leftovers_of_a_killed_run_are_swept() -> None:
    require_netns()
    # A child process builds a cluster and is killed with SIGKILL: no clean-up runs.
    code = textwrap.dedent("""
        import os, sys, time
        sys.path.insert(0, sys.argv[1])
        from tests.netns import Cluster
        c = Cluster(2, prefix="fdk").start()
        c.hosts[0].popen(["sleep", "300"])
        print(" ".join([h.ns for h in c.hosts] + [c.bridge]), flush=True)
        time.sleep(300)
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = subprocess.Popen([sys.executable, "-c", code, root], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        names = child.stdout.readline().split()
        assert len(names) == 3
        assert set(names[:2]) <= set(_netns_names())
    finally:
        child.kill()
        child.wait(timeout=10)
    assert set(names[:2]) <= set(_netns_names()), "the killed run should have left namespaces"
    # The next run with the same prefix sweeps them away before building its own.
    with Cluster(1, prefix="fdk") as fresh:
        assert fresh.hosts[0].ns not in names
        assert not set(names[:2]) & set(_netns_names())
        assert names[2] not in _link_names()


def test_shaping_caps_uplink_and_downlink() -> None:
    require_netns()
    rate = 40.0
    with Cluster(3, rate_mbit=rate, prefix="fds") as cluster:
        a, b, c = cluster.hosts
        both = _goodput_mbit(a, b, 9101)
        c.shape(down_mbit=rate / 2)  # only c's downlink changes
        down = _goodput_mbit(a, c, 9102)
        a.shape(up_mbit=rate / 2)  # only a's uplink changes
        up = _goodput_mbit(a, b, 9103)
        print(f"\ntbf {rate:.0f} Mbit/s both ways: a->b {both:.1f} Mbit/s; "
              f"c downlink {rate / 2:.0f}: a->c {down:.1f} Mbit/s; "
              f"a uplink {rate / 2:.0f}: a->b {up:.1f} Mbit/s")
        for measured, cap in ((both, rate), (down, rate / 2), (up, rate / 2)):
            assert 0.5 * cap < measured < 1.5 * cap, (measured, cap)
        a.unshape()
        c.unshape()
        free = _goodput_mbit(a, c, 9104, seconds=1.0)
        print(f"unshaped a->c {free:.0f} Mbit/s")
        assert free > 1.5 * rate


_MESH = textwrap.dedent("""
    import json, socket, sys, threading
    me, peers, port = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
    srv = socket.create_server((me, port), backlog=128)
    def accept():
        while True:
            c, _ = srv.accept()
            c.close()
    threading.Thread(target=accept, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.readline()  # every host listens before anyone connects
    failed = []
    for p in peers:
        try:
            # Generous: on a loaded machine the kernel's own packet work can lag
            # by a second.  A full table is caught by its counter, not by time.
            socket.create_connection((p, port), timeout=15).close()
        except OSError as e:
            failed.append(f"{p}: {e}")
    print(json.dumps(failed), flush=True)
    sys.stdin.readline()  # keep listening until every host is done connecting
""")


def _arp_cache_stats() -> dict[str, int]:
    """The shared ARP table's counters, summed over CPUs (``entries`` is one
    table-wide figure, repeated on every CPU's row)."""
    with open("/proc/net/stat/arp_cache", encoding="ascii") as fh:
        head, *rows = fh.read().split("\n")
    names = head.split()
    out: dict[str, int] = {}
    for row in filter(None, rows):
        for k, v in zip(names, row.split()):
            out[k] = int(v, 16) if k == "entries" else out.get(k, 0) + int(v, 16)
    return out


def _neigh_threshold() -> int:
    with open("/proc/sys/net/ipv4/neigh/default/gc_thresh3", encoding="ascii") as fh:
        return int(fh.read())


def test_every_host_reaches_every_other_past_the_default_neighbour_table() -> None:
    """36 hosts that all connect to each other need about 1,300 neighbour
    entries in the kernel's one table for all namespaces, past its default cap
    of 1,024: the harness raises the cap while the run lives (and the last run
    puts it back), or SYNs to new neighbours vanish.

    The kernel counts each time the table was full (``table_fulls``): that
    count, not a timeout, says whether the cap was in the way, so the test
    holds on a machine too busy to answer a SYN within a second."""
    require_netns()
    before = _neigh_threshold()
    fulls_before = _arp_cache_stats()["table_fulls"]
    n = 36
    with Cluster(n, prefix="fdm") as cluster:
        assert _neigh_threshold() >= 2 * (n + 1) ** 2
        addrs = [h.addr for h in cluster.hosts]
        procs = []
        for h in cluster.hosts:
            others = ",".join(a for a in addrs if a != h.addr)
            p = h.popen([sys.executable, "-c", _MESH, h.addr, others, "9200"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            procs.append(p)
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        failed = {}
        for h, p in zip(cluster.hosts, procs):
            assert p.stdout is not None
            lost = json.loads(p.stdout.readline())
            if lost:
                failed[h.addr] = lost
        for p in procs:  # only now may the listeners go
            assert p.stdin is not None
            p.stdin.close()
            p.wait(timeout=30)
        assert not failed, f"{sum(map(len, failed.values()))} of {n * (n - 1)} connections lost"
        stats = _arp_cache_stats()
        # The mesh really went past the default cap, and the table never filled.
        assert stats["entries"] > 1024, stats
        assert stats["table_fulls"] == fulls_before, stats
    from tests.netns import _owner_alive, _records
    if not any(_owner_alive(r) for r in _records()):
        assert _neigh_threshold() == before  # the last run out put the cap back
