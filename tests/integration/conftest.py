"""Shared fixtures for the integration tests: real clusters, mounts and faults.

Everything here starts real processes (:class:`fdship.localcluster.LocalCluster`)
and touches real file systems, so every fixture undoes what it did in a
``finally``, whether the test passed or not: stopped processes are continued
and terminated (``kill -9`` if they do not stop), tmpfs mounts are lazily
unmounted, ``chattr +i`` is undone, and the big data files are removed while
the process logs stay in pytest's temp dir for a post-mortem.

Nothing here is autouse: a test opts in by naming the fixture.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fdship.localcluster import LocalCluster, Proc, free_port

MiB = 1024 * 1024

_METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def write_random(path: str, size: int, seed: int | None = None) -> str:
    """Write ``size`` pseudo-random bytes one MiB at a time; return the file's sha256."""
    import random

    rng = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = rng.randbytes(min(MiB, left)) if seed is not None else os.urandom(min(MiB, left))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name" or "name{labels}": value} (samples only)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_RE.match(line.strip())
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


class Cluster(LocalCluster):
    """A LocalCluster with the probes the failure tests need.

    Tests reach the helpers through the instance (``c.sha256(path)``) rather
    than importing this conftest.
    """

    MiB = MiB
    sha256 = staticmethod(sha256)
    write_random = staticmethod(write_random)
    parse_metrics = staticmethod(parse_metrics)

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.extras: list[Proc] = []

    def stop(self) -> None:
        for p in self.extras:
            p.kill(signal.SIGTERM)
        super().stop()

    # -- process control -----------------------------------------------------------

    def kill_center(self) -> None:
        self.center.kill(signal.SIGKILL)

    def restart_center(self, wait: float = 30.0) -> float:
        self.start_center()
        return self.wait_center(wait)

    def extra_center(self, data_dir: str, args: list[str] | None = None) -> Proc:
        """Start (not wait for) another center on ``data_dir`` and a port of its own;
        it is stopped with the cluster."""
        n = len(self.extras)
        p = Proc(f"center{n + 1}", [], os.path.join(self.tmp, f"center{n + 1}.log"), free_port())
        p.args = [self.python, "-m", "fdship", "center", "--listen", f"127.0.0.1:{p.port}",
                  "--data-dir", data_dir, *(args or [])]
        self.extras.append(p)
        p.start(self.env)
        return p

    def kill_daemon(self, i: int) -> None:
        self.daemons[i].kill(signal.SIGKILL)

    def pause(self, i: int) -> None:
        """SIGSTOP daemon i (its sockets stay open; it answers nothing)."""
        p = self.daemons[i].popen
        assert p is not None
        p.send_signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        p = self.daemons[i].popen
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGCONT)

    # -- probes --------------------------------------------------------------------

    def daemon_metrics(self, i: int) -> dict[str, float]:
        with urllib.request.urlopen(self.daemons[i].url + "/metrics", timeout=10) as r:
            return parse_metrics(r.read().decode())

    def center_metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.center.url + "/metrics", timeout=10) as r:
            return parse_metrics(r.read().decode())

    def status(self, i: int) -> Any:
        return self.request("GET", self.daemons[i].url + "/daemon/status")

    def submit_async(self, files: list[str], machines: list[str], via: int = 0,
                     **extra: Any) -> str:
        """Submit without waiting; return the job id."""
        res = self.request("POST", self.daemons[via].url + "/daemon/api",
                           {"files": files, "machines": machines, "wait": False, **extra},
                           timeout=120)
        return str(res["job"])

    def job_now(self, job_id: str) -> Any:
        return self.request("GET", f"{self.center.url}/center/jobs/{job_id}")

    def wait_until(self, what: str, cond: Callable[[], Any], timeout: float = 60.0,
                   every: float = 0.05) -> Any:
        """Poll ``cond`` (center errors count as 'not yet') until truthy; return its value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                v = cond()
                if v:
                    return v
                last = v
            except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
                last = e
            time.sleep(every)
        raise TimeoutError(f"{what}: not after {timeout:.0f} s (last: {last!r})\n"
                           + self.center.log()[-2000:])

    def machine(self, job_id: str, name: str) -> Any:
        return self.job_now(job_id)["machines"][name]

    def dest_path(self, i: int, dest: str) -> str:
        return os.path.join(self.root(i), dest.lstrip("/"))

    def leftovers(self, i: int) -> list[str]:
        """Temp files (``.fdship-`` or ``.part``) anywhere under daemon i's root."""
        out = []
        for dirpath, _dirs, files in os.walk(self.root(i)):
            out += [os.path.join(dirpath, f) for f in files if ".fdship-" in f or
                    f.endswith(".part")]
        return out


@pytest.fixture
def cluster_factory(tmp_path: Any) -> Iterator[Callable[..., Cluster]]:
    """``make(n, center_args=[...], daemon_args={i: [...]}, mounts={i: "8m"})`` -> a
    started :class:`Cluster`.

    ``mounts`` puts a tmpfs of that size at daemon i's ``--root`` before it starts.
    Teardown: continue and stop every process, unmount, drop the data (keep logs).
    """
    made: list[Cluster] = []
    mounted: list[str] = []

    def make(n: int, center_args: list[str] | None = None,
             daemon_args: dict[int, list[str]] | None = None,
             mounts: dict[int, str] | None = None, start: bool = True) -> Cluster:
        base = str(tmp_path / f"cluster{len(made)}")
        os.makedirs(base)
        c = Cluster(n, base, center_args=center_args, daemon_args=daemon_args)
        made.append(c)
        for i, size in (mounts or {}).items():
            d = c.root(i)
            os.makedirs(d, exist_ok=True)
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                                "fdship-test", d], capture_output=True, text=True, check=False)
            if r.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
            mounted.append(d)
        if start:
            c.start()
        return c

    try:
        yield make
    finally:
        for c in made:
            for i in range(c.n):
                c.resume(i)
            try:
                c.stop()
            except (OSError, subprocess.SubprocessError):
                for p in c.daemons + [c.center]:
                    if p.alive():
                        p.kill(signal.SIGKILL)
        for d in reversed(mounted):
            subprocess.run(["umount", "-l", d], capture_output=True, check=False)
        for c in made:
            for name in os.listdir(c.tmp):
                path = os.path.join(c.tmp, name)
                # Chunk stores and copies go; logs and the center's REDO log stay.
                if os.path.isdir(path) and path not in mounted and \
                        name.startswith(("root", "data", "src")):
                    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def unwritable_dir() -> Iterator[Callable[[str], str]]:
    """``make(path)``: make an existing directory refuse new files even to root;
    returns how.  ``chattr +i`` (EPERM) where the file system supports it, else a
    read-only tmpfs mounted over it (EROFS).  Undone after the test."""
    immutable: list[str] = []
    mounted: list[str] = []

    def make(path: str) -> str:
        r = subprocess.run(["chattr", "+i", path], capture_output=True, text=True, check=False)
        if r.returncode == 0:
            immutable.append(path)
            return "immutable"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "fdship-test", path],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            pytest.skip(f"cannot make {path} unwritable (needs root and chattr or mount): "
                        f"{r.stderr.strip()}")
        mounted.append(path)
        return "read-only mount"

    try:
        yield make
    finally:
        for p in immutable:
            subprocess.run(["chattr", "-i", p], capture_output=True, check=False)
        for p in reversed(mounted):
            subprocess.run(["umount", "-l", p], capture_output=True, check=False)


class CallbackServer:
    """A tiny HTTP server on 127.0.0.1 that records POSTed JSON bodies.

    The first ``fail_first`` requests are answered with 503, the rest with 200.
    """

    def __init__(self, fail_first: int = 0) -> None:
        import http.server
        import json
        import threading

        self.fail_first = fail_first
        self.calls: list[tuple[float, int, Any]] = []  # (time, status answered, body)
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw
                with outer.lock:
                    status = 503 if len(outer.calls) < outer.fail_first else 200
                    outer.calls.append((time.time(), status, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def callback_server() -> Iterator[Callable[[int], CallbackServer]]:
    """``make(fail_first)`` -> a running :class:`CallbackServer`; shut down after the test."""
    made: list[CallbackServer] = []

    def make(fail_first: int = 0) -> CallbackServer:
        s = CallbackServer(fail_first)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close()
