"""Slow and broken clients cannot tie up a daemon or the center.

Real processes, real sockets.  A daemon runs with short timeouts
(``--write-timeout``, ``--body-timeout``, ``--idle-timeout``, ``--fetch-timeout``)
so each way of hanging resolves in seconds:

* a peer that stops reading mid-chunk: the upload slot is freed after the
  write timeout and the connection closed;
* a client that sends headers and never the body, one that sends half a
  request line, one that connects and says nothing: closed after the body or
  idle timeout, on the daemon and on the center;
* many of them at once: the daemon keeps answering everyone else meanwhile,
  and ends up holding none of their connections;
* a peer that stops *sending* mid-chunk (SIGSTOP): the fetching target gives
  up after its fetch timeout, reports it, and the center has the chunk fetched
  from another peer, so the job still completes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.request
from typing import Any

import psutil
import pytest

from .conftest import Raw, wait_for, write_random

MiB = 1024 * 1024
TIMEOUTS = ["--write-timeout", "2", "--body-timeout", "2", "--idle-timeout", "2"]


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m:
            total += float(m.group(2))
    return total


def open_conns(pid: int, port: int) -> int:
    """Established connections the process holds on its listening port."""
    return sum(1 for c in psutil.Process(pid).net_connections(kind="tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def closed_by_server(s: socket.socket, within: float) -> float:
    """Seconds until the server closed ``s`` (reads until EOF); fails after ``within``."""
    t0 = time.monotonic()
    s.settimeout(within)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open over {within:.0f} s") \
            from None
    return time.monotonic() - t0


def test_a_peer_that_stops_reading_mid_chunk_frees_the_upload_slot(cluster_factory: Any,
                                                                    tmp_path: Any) -> None:
    # A 16 MiB chunk is far more than loopback socket buffers absorb; a capped
    # target keeps the job (and so the source's snapshot) alive meanwhile.
    c = cluster_factory(2, center_args=["--chunk-size", "16M"],
                        daemon_args={0: TIMEOUTS, 1: ["--download-rate", "4M"]})
    src = str(tmp_path / "big.bin")
    write_random(src, 32 * MiB)
    job = c.request("POST", c.daemons[0].url + "/daemon/api",
                    {"files": [src], "machines": ["d1"], "wait": False})["job"]
    d0 = c.daemons[0]
    base = metric(d0.url, "fdship_uploads_in_flight")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", d0.port))
    s.sendall(f"GET /daemon/download?job={job}&file=0&chunk=1 HTTP/1.1\r\nHost: x\r\n"
              f"Authorization: Bearer {c.token}\r\n\r\n".encode())
    assert s.recv(1024).startswith(b"HTTP/1.1 200")
    # ... and now we read nothing more.
    wait_for("our upload in flight", lambda: metric(d0.url, "fdship_uploads_in_flight") > base,
             timeout=10)
    t0 = time.monotonic()
    # Meanwhile the daemon serves everyone else at once.
    raw = Raw(c, d0.port, timeout=5)
    assert raw.send("GET", "/daemon/status")[0] == 200
    raw.close()
    wait_for("the stalled upload given up",
             lambda: metric(d0.url, "fdship_uploads_in_flight") <= base, timeout=20)
    assert time.monotonic() - t0 < 15
    # The daemon closed its end: what is still buffered drains, then EOF.
    closed_by_server(s, 20)
    s.close()
    assert c.wait_job(job, 120)["state"] == "done"


@pytest.mark.parametrize("who", ["daemon", "center"])
@pytest.mark.parametrize("how", ["headers_no_body", "half_request_line", "silent",
                                 "slow_body"])
def test_clients_that_hang_are_hung_up_on(cluster_factory: Any, who: str, how: str) -> None:
    c = cluster_factory(1, center_args=TIMEOUTS[2:], daemon_args={0: TIMEOUTS})
    port = c.daemons[0].port if who == "daemon" else c.center.port
    path = "/daemon/api" if who == "daemon" else "/center/heartbeat"
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    auth = f"Authorization: Bearer {c.token}\r\n"
    if how == "headers_no_body":
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1000\r\n\r\n"
                  .encode())
    elif how == "half_request_line":
        s.sendall(b"POST /daemon/ap")
    elif how == "slow_body":
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1000\r\n\r\n{{"
                  .encode())
    t = closed_by_server(s, 15)
    s.close()
    assert 1.0 < t < 10, t
    assert not c.all_alive()


def test_many_hanging_clients_at_once_do_not_starve_anyone(cluster_factory: Any,
                                                           tmp_path: Any) -> None:
    c = cluster_factory(2, daemon_args={0: TIMEOUTS})
    d0 = c.daemons[0]
    assert d0.popen is not None
    before = open_conns(d0.popen.pid, d0.port)
    socks = []
    for i in range(150):
        s = socket.create_connection(("127.0.0.1", d0.port), timeout=10)
        if i % 3 == 0:
            s.sendall(f"POST /daemon/api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      f"{c.token}\r\nContent-Length: 100000\r\n\r\n".encode())
        elif i % 3 == 1:
            s.sendall(b"GET /daemon/status HTTP/1.1\r\nHost:")
        socks.append(s)
    try:
        wait_for("the daemon holds the hanging connections",
                 lambda: open_conns(d0.popen.pid, d0.port) >= before + 100, timeout=10)
        # Everyone else is served at once, and a job runs to the end.
        raw = Raw(c, d0.port, timeout=5)
        for _ in range(20):
            t0 = time.monotonic()
            assert raw.send("GET", "/daemon/status")[0] == 200
            assert time.monotonic() - t0 < 2
        raw.close()
        src = str(tmp_path / "f.bin")
        write_random(src, 3 * MiB)
        res = c.request("POST", d0.url + "/daemon/api", {"files": [src], "machines": ["d1"]},
                        timeout=60)
        assert res["state"] == "done", res
        # Then the timeouts free every one of them.
        wait_for("every hanging connection closed",
                 lambda: open_conns(d0.popen.pid, d0.port) <= before, timeout=20)
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
def test_a_peer_that_stops_sending_mid_chunk_gets_its_chunk_reassigned(
        cluster_factory: Any, tmp_path: Any) -> None:
    """SIGSTOP a peer while targets fetch from it: their fetches time out (3 s, before
    the center even misses the frozen peer's heartbeats), the center hands those
    chunks to other peers, and every other target completes.  The frozen target's
    own part waits (grace period) and completes once it is continued."""
    c = cluster_factory(
        5, center_args=["--chunk-size", "256K", "--heartbeat-timeout", "5",
                        "--fetch-timeout", "120", "--grace-period", "600"],
        daemon_args={i: ["--fetch-timeout", "3", "--upload-rate", "2M"] for i in range(5)})
    src = str(tmp_path / "f.bin")
    write_random(src, 12 * MiB)
    job = c.request("POST", c.daemons[0].url + "/daemon/api",
                    {"files": [src], "machines": ["d1", "d2", "d3", "d4"], "wait": False})["job"]
    # Find a target serving others right now, and freeze it mid-upload.
    stopped = None
    deadline = time.monotonic() + 60
    while stopped is None and time.monotonic() < deadline:
        for i in (1, 2, 3, 4):
            if metric(c.daemons[i].url, "fdship_uploads_in_flight") >= 1:
                p = c.daemons[i].popen
                assert p is not None
                p.send_signal(signal.SIGSTOP)
                stopped = i
                break
        time.sleep(0.02)
    assert stopped is not None, "no target ever served a peer"
    others = [i for i in (1, 2, 3, 4) if i != stopped]
    try:
        def others_done() -> bool:
            ms = c.request("GET", f"{c.center.url}/center/jobs/{job}")["machines"]
            return all(ms[f"d{i}"]["state"] == "done" for i in others)
        try:
            wait_for("every other target done while the peer is frozen", others_done,
                     timeout=120)
        except TimeoutError:
            res = c.request("GET", f"{c.center.url}/center/jobs/{job}")
            raise AssertionError(f"d{stopped} frozen: {res['machines']}") from None
        timeouts = sum(metric(c.daemons[i].url, 'fdship_chunk_fetch_failures_total'
                              '{reason="timeout"}') for i in others)
        assert timeouts >= 1, "no fetch from the frozen peer timed out"
    finally:
        p = c.daemons[stopped].popen
        assert p is not None
        p.send_signal(signal.SIGCONT)
    assert c.wait_job(job, 120)["state"] == "done"
    with open(src, "rb") as f:
        want = f.read()
    for i in (1, 2, 3, 4):
        with open(os.path.join(c.root(i), src.lstrip("/")), "rb") as f:
            assert f.read() == want
