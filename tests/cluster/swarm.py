"""An fdship cluster on network-namespace hosts: one daemon per host, shaped links.

Where it sits: test and benchmark support (nothing in ``fdship/`` imports it).
The cluster tests in this directory and ``tests/benchmarks/swarm_netns.py`` use it
on top of :mod:`tests.netns`, which makes the hosts.  Host ``i`` runs
``python -m fdship daemon`` inside its namespace, listening on and
advertising its own address, with its own data dir and ``--root``; the
center runs in the initial namespace on the bridge's address, so its control
traffic never competes with any host's shaped link except the daemon's own.

Everything started here is stopped and every directory removed on
``close()`` (also on leaving the ``with`` block, and at interpreter exit
through the namespace harness), whatever happened before.

What it measures comes from outside the processes: a host's egress is the
byte count of its link (the bridge side of its veth receives exactly what the
host sends), and a sampler can read every link's counters many times a second
to show when a target's downlink sat idle.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from fdship.demo import generate, same_bytes  # noqa: F401  (re-exported; shared with the demo)
from tests.netns import Cluster, Host

DAEMON_PORT = 7071
BLOCK = 1024 * 1024


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def link_bytes(dev: str, direction: str) -> int:
    """A counter of a link in the initial namespace (``rx`` or ``tx``)."""
    with open(f"/sys/class/net/{dev}/statistics/{direction}_bytes", encoding="ascii") as f:
        return int(f.read())


@dataclass
class LinkSampler:
    """Reads the downlink (or uplink) counter of some hosts every ``interval`` seconds.

    The bridge side of a host's veth *transmits* what the host receives, so
    its tx counter is the host's download (``direction="tx"``) and its rx
    counter the host's upload (``"rx"``).  ``idle_seconds(i, rate)`` is how
    long host ``i``'s link carried less than a tenth of ``rate`` between its
    first and last busy interval: time it sat unused while there was work.
    ``reached(i, n)`` is when it had carried ``n`` bytes.
    """

    hosts: Sequence[Host]
    interval: float = 0.05
    direction: str = "tx"
    samples: list[tuple[float, list[int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> LinkSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        devs = [h.veth for h in self.hosts]
        deadline = time.monotonic() + 3600  # bounded even if nobody stops us
        while not self._stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.monotonic(),
                                     [link_bytes(d, self.direction) for d in devs]))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def reached(self, i: int, n: int) -> float | None:
        """Monotonic time of the first sample by which host ``i``'s link had
        carried ``n`` bytes since sampling began (None: never)."""
        if not self.samples:
            return None
        first = self.samples[0][1][i]
        return next((t for t, c in self.samples if c[i] - first >= n), None)

    def idle_seconds(self, i: int, rate: float) -> float:
        s = self.samples
        busy = [k for k in range(1, len(s))
                if (s[k][1][i] - s[k - 1][1][i]) / max(1e-6, s[k][0] - s[k - 1][0]) >= rate / 10]
        if not busy:
            return 0.0
        idle = 0.0
        for k in range(busy[0], busy[-1] + 1):
            dt = s[k][0] - s[k - 1][0]
            if (s[k][1][i] - s[k - 1][1][i]) / max(1e-6, dt) < rate / 10:
                idle += dt
        return idle


class NetnsSwarm:
    """A center and one fdship daemon per namespace host; a context manager."""

    def __init__(self, n_hosts: int, rate_mbit: float | None, *, prefix: str = "fsw",
                 center_args: Sequence[str] = (), daemon_args: Sequence[str] = (),
                 host_args: Mapping[int, Sequence[str]] | None = None,
                 python: str = sys.executable) -> None:
        self.n_hosts = n_hosts
        self.rate_mbit = rate_mbit
        self.prefix = prefix
        self.center_args = list(center_args)
        self.daemon_args = list(daemon_args)
        # More daemon arguments for single hosts, by index (e.g. rate caps).
        self.host_args = {i: list(a) for i, a in (host_args or {}).items()}
        self.python = python
        self.base = ""
        self.cluster: Cluster | None = None
        self.center: subprocess.Popen[bytes] | None = None
        self.center_url = ""
        self.daemons: list[subprocess.Popen[bytes]] = []

    # ---- life cycle ----------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def hosts(self) -> list[Host]:
        assert self.cluster is not None
        return self.cluster.hosts

    def root(self, i: int) -> str:
        return os.path.join(self.base, f"root{i}")

    def start(self, wait: float = 60.0) -> None:
        self.base = tempfile.mkdtemp(prefix="fdship-swarm-")
        self.cluster = Cluster(self.n_hosts, rate_mbit=self.rate_mbit, prefix=self.prefix)
        self.cluster.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FDSHIP_")}
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        addr = self.cluster.bridge_addr
        port = _free_port(addr)
        self.center_url = f"http://{addr}:{port}"
        with open(os.path.join(self.base, "center.log"), "ab") as log:
            self.center = subprocess.Popen(
                [self.python, "-m", "fdship", "--log-level", "WARNING", "center",
                 "--listen", f"{addr}:{port}", "--data-dir", os.path.join(self.base, "center"),
                 *self.center_args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)
        for i, h in enumerate(self.hosts):
            os.makedirs(self.root(i), exist_ok=True)
            with open(os.path.join(self.base, f"d{i}.log"), "ab") as log:
                self.daemons.append(h.popen(
                    [self.python, "-m", "fdship", "--log-level", "WARNING", "daemon",
                     "--center", self.center_url, "--listen", f"{h.addr}:{DAEMON_PORT}",
                     "--advertise", f"{h.addr}:{DAEMON_PORT}", "--name", h.name,
                     "--data-dir", os.path.join(self.base, f"data{i}"), "--root", self.root(i),
                     *self.daemon_args, *self.host_args.get(i, [])],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env))
        self.wait_alive(wait)

    def close(self) -> None:
        """Stop every process, remove the namespaces and the directory; safe to repeat."""
        for p in self.daemons:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        if self.center is not None and self.center.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.center.pid, signal.SIGTERM)
            try:
                self.center.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.center.pid, signal.SIGKILL)
                self.center.wait(5)
        if self.cluster is not None:
            self.cluster.close()  # SIGTERM, then SIGKILL, to whatever still runs inside
        if self.base and os.environ.get("FDSHIP_TEST_KEEP") != "1":
            shutil.rmtree(self.base, ignore_errors=True)

    # ---- talking to it -------------------------------------------------------------

    def request(self, method: str, url: str, body: Any = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None

    def daemon_url(self, i: int) -> str:
        return f"http://{self.hosts[i].addr}:{DAEMON_PORT}"

    def log(self, name: str) -> str:
        try:
            with open(os.path.join(self.base, f"{name}.log"), errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def wait_alive(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        want = {h.name for h in self.hosts}
        last: Any = None
        while time.monotonic() < deadline:
            if self.center is not None and self.center.poll() is not None:
                raise RuntimeError("center exited:\n" + self.log("center"))
            for i, p in enumerate(self.daemons):
                if p.poll() is not None:
                    raise RuntimeError(f"daemon h{i} exited:\n" + self.log(f"d{i}"))
            try:
                hosts = {h["name"]: h for h in
                         self.request("GET", self.center_url + "/center/hosts")["hosts"]}
                if all(n in hosts and hosts[n]["alive"] for n in want):
                    return
                last = sorted(n for n in want if not hosts.get(n, {}).get("alive"))
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = e
            time.sleep(0.2)
        raise TimeoutError(f"daemons not alive after {timeout:.0f} s: {last}")

    def status(self, i: int) -> dict[str, Any]:
        return self.request("GET", self.daemon_url(i) + "/daemon/status")  # type: ignore

    def egress(self, i: int) -> int:
        """Bytes host ``i`` has sent on its link so far (payload plus headers)."""
        return link_bytes(self.hosts[i].veth, "rx")

    def ship(self, path: str, targets: Sequence[int], dest: str = "/data",
             timeout: float = 1800) -> tuple[dict[str, Any], float]:
        """Ship ``path`` from host 0 to ``targets``; return the job result and wall seconds."""
        t0 = time.monotonic()
        res = self.request("POST", self.daemon_url(0) + "/daemon/api",
                           {"files": [path], "machines": [self.hosts[i].name for i in targets],
                            "dest": dest}, timeout=timeout)
        return res, time.monotonic() - t0

    def landed(self, i: int, path: str, dest: str = "/data") -> str:
        return os.path.join(self.root(i), dest.lstrip("/"), os.path.basename(path))


# ---- the baseline: parallel-rsync over ssh ------------------------------------------


@dataclass
class SshFleet:
    """sshd on every host of a swarm, with throwaway keys."""

    key: str
    known_hosts: str
    sshd: list[subprocess.Popen[bytes]]

    def ssh_options(self) -> list[str]:
        return [f"IdentityFile={self.key}", f"UserKnownHostsFile={self.known_hosts}",
                "StrictHostKeyChecking=yes", "IdentitiesOnly=yes", "BatchMode=yes",
                "ConnectTimeout=20"]


def start_sshd(sw: NetnsSwarm, timeout: float = 30.0) -> SshFleet:
    """Run sshd in every host of ``sw``; a login lands in that host's ``--root``.

    The hosts share one file system, so each sshd runs every command from the
    host's own root directory (``ForceCommand``): a relative destination such
    as ``data/`` then lands where fdship's ``--dest /data`` does.  The
    processes run inside the namespaces, so the swarm's teardown stops them.
    """
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
    keys = os.path.join(sw.base, "keys")
    os.makedirs(keys, mode=0o700, exist_ok=True)
    host_key, client_key = os.path.join(keys, "host"), os.path.join(keys, "client")
    for k in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", k],
                       check=True, capture_output=True, timeout=30)
    authorized = os.path.join(keys, "authorized_keys")
    shutil.copy(client_key + ".pub", authorized)
    with open(host_key + ".pub", encoding="ascii") as f:
        kind, pub = f.read().split()[:2]
    known = os.path.join(keys, "known_hosts")
    with open(known, "w", encoding="ascii") as f:
        f.writelines(f"{h.addr} {kind} {pub}\n" for h in sw.hosts)
    procs = []
    for i, h in enumerate(sw.hosts):
        cfg = os.path.join(keys, f"sshd-{i}.conf")
        with open(cfg, "w", encoding="ascii") as f:
            f.write(f"ListenAddress {h.addr}:22\nHostKey {host_key}\nPidFile none\n"
                    f"AuthorizedKeysFile {authorized}\nPermitRootLogin prohibit-password\n"
                    "PubkeyAuthentication yes\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                    "MaxStartups 200:30:400\nMaxSessions 200\nLogLevel ERROR\n"
                    f"ForceCommand cd {sw.root(i)} && eval \"$SSH_ORIGINAL_COMMAND\"\n")
        procs.append(h.popen(["/usr/sbin/sshd", "-D", "-e", "-f", cfg],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + timeout
    for h in sw.hosts:
        while True:
            try:
                with socket.create_connection((h.addr, 22), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start on {h.addr}") from None
                time.sleep(0.1)
    return SshFleet(key=client_key, known_hosts=known, sshd=procs)


def parallel_rsync(sw: NetnsSwarm, ssh: SshFleet, path: str, targets: Sequence[int],
                   dest: str = "data/", timeout: float = 3600) -> float:
    """Push ``path`` from host 0 to every target at once, as the old loop did; seconds."""
    hosts_file = os.path.join(sw.base, "prsync-hosts")
    with open(hosts_file, "w", encoding="ascii") as f:
        f.writelines(f"root@{sw.hosts[i].addr}\n" for i in targets)
    for i in targets:
        os.makedirs(os.path.join(sw.root(i), dest), exist_ok=True)
    argv = ["parallel-rsync", "-h", hosts_file, "-p", str(len(targets)), "-t", "0",
            "-X", "--whole-file"]
    for o in ssh.ssh_options():
        argv += ["-O", o]
    t0 = time.monotonic()
    proc = sw.hosts[0].run([*argv, path, dest], check=False, timeout=timeout)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"parallel-rsync failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                           f"\n{proc.stderr[-2000:]}")
    return took
