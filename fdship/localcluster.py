"""A center and N daemons as real subprocesses on 127.0.0.1.

Used by ``fdship demo``, the integration tests and the benchmarks.  Every
process gets its own port, data dir and ``--root`` under one temporary
directory, so many "hosts" share one file system without touching each other.
``stop()`` always terminates every process it started and removes the
directory unless asked to keep it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections' local ports."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Ports handed out by this process, so two picks never return the same port
# (a pick is free when made, but nothing holds it until its process listens).
_given: set[int] = set()
# A generator of our own: a test that seeds the module-level one must not make
# every cluster it starts pick the same ports.
_rng = random.Random()


def free_port() -> int:
    """A port on 127.0.0.1 that is free now, for a process to listen on soon.

    Picked below the kernel's ephemeral range where it can be.  A port from
    that range, once released here, can be taken as the local port of any
    outgoing connection (the cluster's own first heartbeats and channels
    among them) before the process meant to listen on it starts, which then
    fails with "Address already in use".  Something else can still take it
    in that window; ``LocalCluster`` restarts a process that lost that race
    on a new port (see ``Proc.lost_port_race``).
    """
    low = _ephemeral_low()
    if low > 11024:
        for _ in range(200):
            port = _rng.randrange(10000, low)
            if port in _given:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue  # taken: try another
            _given.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    _given.add(port)
    return port


@dataclass
class Proc:
    name: str
    args: list[str]
    log_path: str
    port: int
    popen: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, env: dict[str, str] | None = None) -> None:
        logf = open(self.log_path, "ab")
        self.extra["log_mark"] = logf.tell()
        self.popen = subprocess.Popen(self.args, stdout=logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env)
        logf.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def lost_port_race(self) -> bool:
        """True if this run exited because its port was taken between the pick and
        the listen, and the process never came up on it: it may start again on a
        new port without anyone having learned the old one."""
        if self.alive() or self.extra.get("up") or self.extra.get("port_retries", 0) >= 5:
            return False
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.extra.get("log_mark", 0))
                tail = f.read().decode(errors="replace")
        except OSError:
            return False
        return "cannot listen on" in tail and "Address already in use" in tail

    def take_new_port(self) -> None:
        """After a lost port race: a port of its own for the next start."""
        self.extra["port_retries"] = self.extra.get("port_retries", 0) + 1
        self.port = free_port()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


class LocalCluster:
    def __init__(self, n_daemons: int, base_dir: str | None = None, *,
                 center_args: list[str] | None = None,
                 daemon_args: dict[int, list[str]] | None = None,
                 token: str = "", keep: bool = False, python: str = sys.executable) -> None:
        self.n = n_daemons
        self.tmp = base_dir or tempfile.mkdtemp(prefix="fdship-cluster-")
        self.keep = keep or base_dir is not None
        self.token = token
        self.python = python
        self.center_args = center_args or []
        self.daemon_args = daemon_args or {}
        self.center = Proc("center", [], os.path.join(self.tmp, "center.log"), free_port())
        self.daemons: list[Proc] = []
        self.env = dict(os.environ)
        if token:
            self.env["FDSHIP_TOKEN"] = token
        for i in range(n_daemons):
            self.daemons.append(Proc(f"d{i}", [], os.path.join(self.tmp, f"d{i}.log"),
                                     free_port()))

    # -- layout -----------------------------------------------------------------------

    def root(self, i: int) -> str:
        return os.path.join(self.tmp, f"root{i}")

    def data_dir(self, i: int) -> str:
        return os.path.join(self.tmp, f"data{i}")

    def center_cmd(self) -> list[str]:
        return [self.python, "-m", "fdship", "center", "--listen",
                f"127.0.0.1:{self.center.port}", "--data-dir",
                os.path.join(self.tmp, "center-data"), *self.center_args]

    def daemon_cmd(self, i: int) -> list[str]:
        d = self.daemons[i]
        os.makedirs(self.root(i), exist_ok=True)
        return [self.python, "-m", "fdship", "daemon", "--center", self.center.url,
                "--listen", f"127.0.0.1:{d.port}", "--name", d.name,
                "--data-dir", self.data_dir(i), "--root", self.root(i),
                *self.daemon_args.get(i, [])]

    # -- control ----------------------------------------------------------------------

    def start(self, wait: float = 30.0) -> LocalCluster:
        # The center first, and only then the daemons: a daemon whose first
        # heartbeat finds no center backs off, which costs a second.
        self.start_center()
        self.wait_center(wait)
        for i in range(self.n):
            self.start_daemon(i)
        self.wait_alive(wait)
        return self

    def wait_center(self, timeout: float = 30.0, proc: Proc | None = None) -> float:
        """Wait until the center (or ``proc``) answers requests; return the seconds
        it took.  A first start that lost its port to another process is
        started again on a new one."""
        p = proc or self.center
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if not p.alive():
                if p is self.center and p.lost_port_race():
                    p.take_new_port()
                    self.start_center()
                    continue
                raise RuntimeError(f"{p.name} exited:\n" + p.log()[-3000:])
            try:
                self.probe_center(p)
            except OSError:
                time.sleep(0.02)
                continue
            p.extra["up"] = True
            return time.monotonic() - t0
        raise TimeoutError(f"center not listening after {timeout:.0f} s")

    def probe_center(self, p: Proc) -> None:
        """Raise OSError unless center ``p`` answers.  An answered request, not just
        an accepted connection: the port is bound before the center installs its
        SIGTERM handler."""
        with urllib.request.urlopen(p.url + "/metrics", timeout=2):
            pass

    def start_center(self) -> None:
        self.center.args = self.center_cmd()
        self.center.start(self.env)

    def start_daemon(self, i: int) -> None:
        d = self.daemons[i]
        d.args = self.daemon_cmd(i)
        d.start(self.env)

    def request(self, method: str, url: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", "Bearer " + self.token)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None

    def hosts(self) -> dict[str, Any]:
        return {h["name"]: h for h in self.request("GET", self.center.url + "/center/hosts")["hosts"]}

    def wait_alive(self, timeout: float = 30.0, names: list[str] | None = None) -> None:
        want = set(names or [d.name for d in self.daemons])
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if not self.center.alive():
                raise RuntimeError("center exited:\n" + self.center.log()[-3000:])
            for i, d in enumerate(self.daemons):
                if d.name in want and d.popen is not None and not d.alive():
                    if d.lost_port_race():
                        # Nobody has learned its address yet: a new port is safe.
                        d.take_new_port()
                        self.start_daemon(i)
                        continue
                    raise RuntimeError(f"daemon {d.name} exited:\n" + d.log()[-3000:])
            try:
                hosts = self.hosts()
                if all(n in hosts and hosts[n]["alive"] for n in want):
                    for d in self.daemons:
                        if d.name in want:
                            d.extra["up"] = True
                    return
                last = {n: hosts.get(n, {}).get("alive") for n in want}
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"daemons not alive after {timeout:.0f} s: {last}")

    def submit(self, files: list[str], machines: list[str], via: int = 0,
               timeout: float = 600, **extra: Any) -> Any:
        """POST /daemon/api on daemon ``via`` and wait (up to ``timeout`` s) for the
        result; ``extra`` goes into the request body (e.g. ``callback``)."""
        body = {"files": files, "machines": machines, **extra}
        return self.request("POST", self.daemons[via].url + "/daemon/api", body,
                            timeout=timeout)

    def job(self, job_id: str, wait: float = 0) -> Any:
        q = f"?wait={wait}" if wait else ""
        return self.request("GET", f"{self.center.url}/center/jobs/{job_id}{q}",
                            timeout=wait + 30)

    def wait_job(self, job_id: str, timeout: float = 300) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                res = self.job(job_id, wait=min(10, max(1, deadline - time.monotonic())))
                if res["state"] != "running":
                    return res
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still running after {timeout:.0f} s")

    def stop(self) -> None:
        for p in self.daemons + [self.center]:
            if p.alive():
                assert p.popen is not None
                p.popen.send_signal(signal.SIGTERM)
        for p in self.daemons + [self.center]:
            if p.popen is not None:
                try:
                    p.popen.wait(10)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait(5)
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
