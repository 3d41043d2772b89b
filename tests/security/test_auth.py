"""The shared token: every endpoint but /metrics, the token file's mode, bodies, limits.

Real processes on 127.0.0.1.  ``tests/integration/test_end_to_end.py`` already
checks three endpoints and /metrics; here every route of the center and of a
daemon is called with every method it serves, with no token, a wrong one, and
forms that only look right.  Also: what a process refuses at start, that
``FDSHIP_TOKEN`` beats the file, that the token never reaches a log, that a
client without the token cannot make a server buffer a big body, and that the
job size limits are config.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from fdship.localcluster import free_port

from .conftest import TOKEN, Raw, SecCluster, announce_body

# Every route, with the methods it serves.  Paths with ids use made-up ones:
# the token is checked before the id is looked up.
CENTER_ROUTES = [
    ("POST", "/center/job"), ("POST", "/center/ack"), ("POST", "/center/fin"),
    ("POST", "/center/draining"), ("POST", "/center/heartbeat"), ("GET", "/center/jobs"),
    ("GET", "/center/jobs/X1"), ("GET", "/center/hosts"), ("GET", "/center/events"),
    ("GET", "/center/schedules"), ("POST", "/center/schedules"),
    ("GET", "/center/schedules/S1"), ("DELETE", "/center/schedules/S1"),
    ("GET", "/center/schedules/S1/history"), ("GET", "/center/nonexistent"),
]
DAEMON_ROUTES = [
    ("POST", "/daemon/api"), ("POST", "/daemon/pull"), ("POST", "/daemon/pack"),
    ("GET", "/daemon/download?job=J&file=0&chunk=0"), ("GET", "/daemon/status"),
    ("GET", "/daemon/jobs/X1"), ("GET", "/daemon/nonexistent"),
]
BAD_AUTH: list[dict[str, str] | None] = [
    None,  # no header at all
    {"Authorization": "Bearer " + TOKEN[:-1] + "x"},  # same length, last byte differs
    {"Authorization": "Bearer " + TOKEN[:-1]},  # a prefix of the token
    {"Authorization": "Bearer " + TOKEN + "x"},  # the token plus a byte
    {"Authorization": "bearer " + TOKEN},  # the scheme is case-sensitive here
    {"Authorization": "Basic " + TOKEN},
    {"Authorization": TOKEN},
    {"Authorization": "Bearer  " + TOKEN},
    {"Authorization": "Bearer " + TOKEN.upper()},
    {"Authorization": "Bearer"},
    {"X-Token": TOKEN},
]


def fdship(*args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fdship", *args], check=False,
                          capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def env_without_token() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("FDSHIP_TOKEN", "FDSHIP_TLS_CA")}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: Any) -> Any:
    c = SecCluster(1, str(tmp_path_factory.mktemp("auth")))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def call(c: SecCluster, port: int, method: str, target: str,
         headers: dict[str, str] | None) -> tuple[int, Any]:
    raw = Raw(c, port)
    try:
        body = b"{}" if method == "POST" else None
        # A streamed answer (/center/events) would never end: read headers only.
        read = not target.startswith("/center/events")
        st, data = raw.send(method, target, body, headers=headers, token=None, read_body=read)
        return st, json.loads(data) if data else None
    finally:
        raw.close()


@pytest.mark.parametrize("which", ["center", "daemon"])
def test_every_endpoint_but_metrics_wants_the_token(secured: SecCluster, which: str) -> None:
    c = secured
    port = c.center.port if which == "center" else c.daemons[0].port
    routes = CENTER_ROUTES if which == "center" else DAEMON_ROUTES
    tried = 0
    for method, target in routes:
        for hdr in BAD_AUTH:
            st, body = call(c, port, method, target, hdr)
            assert st == 401, (method, target, hdr, st, body)
            assert "token" in body["error"] and "Bearer" in body["error"]
            tried += 1
        # The real token gets past the check (whatever the endpoint then says).
        st, _ = call(c, port, method, target, {"Authorization": "Bearer " + TOKEN})
        assert st != 401, (method, target)
    assert tried == len(routes) * len(BAD_AUTH)
    # Wrong methods are refused before anything else matters, but never let through.
    for method in ("PUT", "DELETE", "PATCH"):
        st, _ = call(c, port, method, routes[0][1], None)
        assert st in (401, 405), (method, st)
    st, data = Raw(c, port).send("GET", "/metrics", token=None)
    assert st == 200 and b"# HELP" in data


def test_drain_notices_want_the_token(secured: SecCluster) -> None:
    """POST /center/draining frees slots at once and is never logged, so a forged notice
    would be cheap to send: without the token even a well-formed one is refused, before
    it is parsed, and counted nowhere."""
    c = secured
    notice = json.dumps({"host": "d0", "drains": [{"job": "J1", "file": 0, "chunk": 0,
                                                   "peer": "d0"}]}).encode()

    def ignored_total() -> float:
        st, data = Raw(c, c.center.port).send("GET", "/metrics", token=None)
        assert st == 200
        for line in data.decode().splitlines():
            if line.startswith('fdship_drain_notices_total{outcome="ignored"}'):
                return float(line.split()[-1])
        raise AssertionError("fdship_drain_notices_total is not exported")

    before = ignored_total()
    for hdr in BAD_AUTH:
        raw = Raw(c, c.center.port)
        st, data = raw.send("POST", "/center/draining", notice, headers=hdr, token=None)
        raw.close()
        assert st == 401, (hdr, st, data)
        assert "token" in json.loads(data)["error"]
    assert ignored_total() == before, "a notice without the token reached the handler"
    # With the token the same notice is read, and ignored (no such running job).
    raw = Raw(c, c.center.port)
    st, data = raw.send("POST", "/center/draining", notice)
    raw.close()
    assert st == 200 and json.loads(data) == {"ok": True, "ignored": 1}, (st, data)
    assert ignored_total() == before + 1


def test_the_token_never_reaches_a_log(secured: SecCluster) -> None:
    c = secured
    wrong = "Bearer not-the-token-" + "z" * 20
    call(c, c.center.port, "POST", "/center/heartbeat", {"Authorization": wrong})
    call(c, c.daemons[0].port, "POST", "/daemon/pull", {"Authorization": wrong})
    time.sleep(0.3)
    for p in (c.center, c.daemons[0]):
        text = p.log()
        assert text, f"{p.name} wrote no log at all"
        assert TOKEN not in text, f"{p.name} logged the shared token"
        assert "not-the-token" not in text, f"{p.name} logged a presented token"


def test_a_client_without_the_token_cannot_make_the_server_buffer_a_big_body(
        secured: SecCluster) -> None:
    """Its body limit drops to 64K once its headers are in: refused before it is read."""
    c = secured
    for port in (c.center.port, c.daemons[0].port):
        path = "/center/heartbeat" if port == c.center.port else "/daemon/api"
        # The server answers and hangs up; it does not wait for the 8 MiB.
        answer = announce_body(port, path, 8 * 1024 * 1024, token=None)
        assert answer.startswith(b"HTTP/1.1 400"), answer
        # 64K is still read, and answered 401 with a sentence.
        answer = announce_body(port, path, 64 * 1024, token=None, send=64 * 1024)
        assert answer.startswith(b"HTTP/1.1 401") and b"token" in answer, answer[:300]
        # The same body size with the token is read and answered with a sentence.
        raw = Raw(c, port)
        st, data = raw.send("POST", path, b"[" * (1024 * 1024))
        raw.close()
        assert st == 400 and "not valid JSON" in json.loads(data)["error"]
    assert not c.all_alive()


def _start(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return fdship(*args, env=env, timeout=60)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602])
def test_both_processes_refuse_a_token_file_others_can_read(tmp_path: Any, mode: int) -> None:
    t = tmp_path / "token"
    t.write_text("abc-token\n")
    os.chmod(t, mode)
    env = env_without_token()
    for args in (["center", "--data-dir", str(tmp_path / "c"), "--listen",
                  f"127.0.0.1:{free_port()}"],
                 ["daemon", "--center", "http://127.0.0.1:9", "--data-dir", str(tmp_path / "d"),
                  "--listen", f"127.0.0.1:{free_port()}"]):
        r = _start(args + ["--token-file", str(t)], env)
        assert r.returncode != 0, (args[0], r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "readable by group or others" in lines[0] and "chmod 600" in lines[0]
        assert f"{mode:04o}" in lines[0]


@pytest.mark.parametrize("case", ["empty", "missing", "directory"])
def test_both_processes_refuse_an_unusable_token_file(tmp_path: Any, case: str) -> None:
    t = tmp_path / "token"
    if case == "empty":
        t.write_text("\n")
        os.chmod(t, 0o600)
    elif case == "directory":
        t.mkdir(mode=0o700)
    env = env_without_token()
    for args in (["center", "--data-dir", str(tmp_path / "c"), "--listen",
                  f"127.0.0.1:{free_port()}"],
                 ["daemon", "--center", "http://127.0.0.1:9", "--data-dir", str(tmp_path / "d"),
                  "--listen", f"127.0.0.1:{free_port()}"]):
        r = _start(args + ["--token-file", str(t)], env)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "token file" in lines[0], r.stderr


def test_fdship_token_beats_the_file(tmp_path: Any) -> None:
    """With $FDSHIP_TOKEN set the file is not even read (its loose mode does not matter)."""
    t = tmp_path / "token"
    t.write_text("token-from-the-file\n")
    os.chmod(t, 0o644)
    port = free_port()
    env = dict(env_without_token(), FDSHIP_TOKEN="token-from-the-environment")
    p = subprocess.Popen([sys.executable, "-m", "fdship", "center", "--data-dir",
                          str(tmp_path / "c"), "--listen", f"127.0.0.1:{port}",
                          "--token-file", str(t)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        c = SecCluster(0, str(tmp_path / "x"), token="token-from-the-environment")
        raw = Raw(c, port)
        assert raw.send("GET", "/center/hosts")[0] == 200
        assert raw.send("GET", "/center/hosts", token="token-from-the-file")[0] == 401
        raw.close()
        # The CLI follows the same rule.
        r = fdship("hosts", "--center", f"http://127.0.0.1:{port}", "--token-file", str(t),
                   env=env)
        assert r.returncode == 0, r.stderr
        r = fdship("hosts", "--center", f"http://127.0.0.1:{port}", "--token-file", str(t),
                   env=env_without_token())
        assert r.returncode != 0 and "readable by group or others" in r.stderr
    finally:
        p.terminate()
        p.wait(20)


def test_body_and_job_size_limits_are_config(cluster_factory: Any, tmp_path: Any) -> None:
    c = cluster_factory(2, center_args=["--max-body", "64K", "--max-files", "2",
                                        "--max-machines", "1"])
    raw = Raw(c, c.center.port)
    # Over max_body, even with the token: refused before it is read.
    answer = announce_body(c.center.port, "/center/job", 100 * 1024, TOKEN)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    # Under it: read, and answered with a sentence.
    st, data = raw.send("POST", "/center/job", b"[" * (60 * 1024))
    assert st == 400 and "JSON" in json.loads(data)["error"]
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for i in range(3):
        p = src / f"f{i}"
        p.write_bytes(b"x" * 10)
        files.append(str(p))
    api = Raw(c, c.daemons[0].port)
    st, body = api.json("POST", "/daemon/api", {"files": files, "machines": ["d1"]})
    assert st == 413 and "max_files" in body["error"], body
    st, body = api.json("POST", "/daemon/api", {"files": files[:1], "machines": ["d0", "d1"]})
    assert st == 413 and "max_machines" in body["error"], body
    st, body = api.json("POST", "/daemon/api", {"files": files[:2], "machines": ["d1"]})
    assert st == 200 and body["state"] == "done", body
    api.close()
    raw.close()
