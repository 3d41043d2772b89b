"""Test hosts made of Linux network namespaces, for cluster tests and benchmarks.

Where it sits: test support only (nothing in ``fdship/`` imports it).  The
integration tests under ``tests/cluster`` and ``tests/ansible`` and the network
benchmarks use it to get real, separate hosts on one machine: each host is a
network namespace with its own loopback, its own address and its own TCP stack,
joined to the others by a Linux bridge, and its link can be shaped with ``tc``.
The file system, users and processes stay shared, so callers give every host
its own directories.

    from tests.netns import Cluster

    with Cluster(3, rate_mbit=100) as cluster:
        a, b, c = cluster.hosts
        server = b.popen(["python3", "-m", "http.server", "--bind", b.addr, "8000"])
        a.run(["curl", f"http://{b.addr}:8000/"])

Layout of one run (``RUN`` is 4 random hex digits, unique among live runs):

* bridge ``PREFIX-RUN-br`` in the initial namespace, owning ``10.231.X.1/24``;
  ``X`` is a free third octet chosen per run, so parallel runs never share a subnet;
* host ``i`` is the namespace ``PREFIX-RUN-hI``; its link is a veth pair whose
  bridge side is ``PREFIX-RUN-vI`` and whose inside end is renamed ``eth0``;
  its address is ``10.231.X.(I+2)``.  There is no default route inside a host,
  so nothing a test runs can send packets beyond the bridge.

Shaping uses a token bucket (``tbf``) on both ends of each veth, because this
kernel has no ``netem`` and a qdisc only shapes what a device sends: the
qdisc on ``eth0`` inside the namespace shapes the host's uplink, the one on the
bridge-side veth its downlink.  The bucket holds at least 128 KiB, more than
the largest GSO packet a veth hands over (64 KiB), or big packets would never
fit and the link would stall.  Expect TCP goodput of about 95% of the rate.

The kernel keeps one neighbour (ARP) table for all namespaces, by default
capped at 1024 entries (``net.ipv4.neigh.default.gc_thresh3``).  N hosts that
all talk to each other need about N squared; past the cap the kernel drops
packets to neighbours it cannot add ("neighbor table overflow" in the kernel
log), so SYNs vanish without a trace in any qdisc counter, and 40 hosts lost
most connection attempts of a job.  ``start()`` raises the thresholds for the
runs alive together (never lowers them); the last run to close puts back the
values it found.

Clean-up removes everything a run made (processes inside its namespaces, the
veths, the bridge, the namespaces) on ``close()``, on leaving the ``with``
block, at interpreter exit, and, for a run that was killed before it could
clean up, at the start of the next run with the same prefix: every run keeps a
record (owner pid and start time) in a state directory, and anything named
like a run whose owner is gone is swept away.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

__all__ = ["Cluster", "Host", "NetnsUnavailable", "netns_unavailable_reason", "require_netns"]

#: Subnets come from 10.231.0.0/16: one /24 per run.
NETWORK_BASE = "10.231"
#: Linux limits interface names to 15 bytes (IFNAMSIZ - 1).
_IFNAMSIZ = 15
_STATE_DIR = os.path.join(tempfile.gettempdir(), "netns-harness")


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``, no permission)."""


def _ip() -> str:
    path = shutil.which("ip") or ("/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "")
    if not path:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed; "
                               "install it with: apt-get install -y iproute2")
    return path


def _tc() -> str:
    path = shutil.which("tc") or ("/usr/sbin/tc" if os.path.exists("/usr/sbin/tc") else "")
    if not path:
        raise RuntimeError("link shaping needs the `tc` command; "
                           "install it with: apt-get install -y iproute2")
    return path


def _sh(argv: Sequence[str], check: bool = True,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(argv)}\n"
                           f"{proc.stderr.strip()}")
    return proc


_probe_result: str | None | bool = False  # False: not probed yet


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can (probed once)."""
    global _probe_result
    if _probe_result is not False:
        return _probe_result  # type: ignore[return-value]
    reason: str | None = None
    if not sys.platform.startswith("linux"):
        reason = "network namespaces need Linux"
    elif os.geteuid() != 0:
        reason = "network namespaces need root (run the tests as root)"
    else:
        try:
            ip = _ip()
        except NetnsUnavailable as e:
            reason = str(e)
        else:
            name = f"nsprobe-{os.getpid()}"
            proc = _sh([ip, "netns", "add", name], check=False)
            if proc.returncode != 0:
                reason = f"cannot create a network namespace: {proc.stderr.strip()}"
            else:
                _sh([ip, "netns", "del", name], check=False)
    _probe_result = reason
    return reason


def require_netns() -> None:
    """Skip the calling test, with the reason, when namespaces cannot be made."""
    reason = netns_unavailable_reason()
    if reason:
        import pytest

        pytest.skip(reason)


def _proc_start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks: tells a live owner from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass
class Host:
    """One test host: a network namespace with one address on the cluster's bridge."""

    index: int
    ns: str
    addr: str
    veth: str  # bridge-side end, in the initial namespace
    cluster: Cluster = field(repr=False)
    ifname: str = "eth0"

    @property
    def name(self) -> str:
        return f"h{self.index}"

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` wrapped to run inside this host."""
        return [_ip(), "netns", "exec", self.ns, *cmd]

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float | None = 60,
            **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``cmd`` inside this host and wait for it (``subprocess.run`` keywords)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        proc = subprocess.run(self.argv(cmd), timeout=timeout, **kwargs, check=False)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, list(cmd), proc.stdout,
                                                proc.stderr)
        return proc

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside this host; the cluster stops it on teardown."""
        return self.cluster._popen(self, cmd, **kwargs)

    def shape(self, up_mbit: float | None = None, down_mbit: float | None = None) -> None:
        """Cap this host's uplink and/or downlink (None leaves that side as it is)."""
        if up_mbit is not None:
            self.cluster._tbf(self.ns, self.ifname, up_mbit)
        if down_mbit is not None:
            self.cluster._tbf(None, self.veth, down_mbit)

    def unshape(self) -> None:
        """Remove both caps."""
        self.cluster._no_tbf(self.ns, self.ifname)
        self.cluster._no_tbf(None, self.veth)


class Cluster:
    """N hosts in network namespaces joined by a bridge; a context manager.

    ``rate_mbit`` shapes every host's link in both directions.  ``prefix``
    starts every name the run creates (keep it short: interface names are
    limited to 15 bytes).  Raises :class:`NetnsUnavailable` when namespaces
    cannot be made; tests call :func:`require_netns` first to skip instead.
    """

    def __init__(self, n_hosts: int, rate_mbit: float | None = None, prefix: str = "fds") -> None:
        if not 1 <= n_hosts <= 250:
            raise ValueError("n_hosts must be between 1 and 250 (one /24 per run)")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", prefix):
            raise ValueError(f"prefix {prefix!r} must be 1-6 lowercase letters or digits, "
                             "starting with a letter (interface names are short)")
        if rate_mbit is not None and rate_mbit <= 0:
            raise ValueError("rate_mbit must be positive (or None for no shaping)")
        self.n_hosts = n_hosts
        self.rate_mbit = rate_mbit
        self.prefix = prefix
        self.run_id = ""
        self.subnet = ""
        self.bridge = ""
        self.bridge_addr = ""
        self.hosts: list[Host] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._started = False
        self._closed = False
        self._record_path = ""

    # ---- life cycle -------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def start(self) -> Cluster:
        """Create bridge, namespaces and links (clean up what is made if any step fails)."""
        if self._started:
            return self
        reason = netns_unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        self._started = True
        os.makedirs(_STATE_DIR, mode=0o700, exist_ok=True)
        # The lock makes "sweep leftovers, pick a free subnet, write our record" one step,
        # so two runs starting together neither pick the same subnet nor sweep each other.
        with self._state_lock():
            sweep_leftovers(self.prefix)
            self.run_id = self._free_run_id()
            third = self._free_octet()
            self.subnet = f"{NETWORK_BASE}.{third}.0/24"
            self.bridge_addr = f"{NETWORK_BASE}.{third}.1"
            self.bridge = f"{self.prefix}-{self.run_id}-br"
            if len(f"{self.prefix}-{self.run_id}-p{self.n_hosts - 1}") > _IFNAMSIZ:
                raise ValueError(f"prefix {self.prefix!r} is too long for {self.n_hosts} hosts: "
                                 "interface names are limited to 15 bytes")
            for i in range(self.n_hosts):
                self.hosts.append(Host(index=i, ns=f"{self.prefix}-{self.run_id}-h{i}",
                                       addr=f"{NETWORK_BASE}.{third}.{i + 2}",
                                       veth=f"{self.prefix}-{self.run_id}-v{i}", cluster=self))
            self._write_record()
            _size_neighbour_table()
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        ip = _ip()
        _sh([ip, "link", "add", "name", self.bridge, "type", "bridge"])
        _sh([ip, "addr", "add", f"{self.bridge_addr}/24", "dev", self.bridge])
        _sh([ip, "link", "set", self.bridge, "up"])
        for h in self.hosts:
            peer = f"{self.prefix}-{self.run_id}-p{h.index}"
            _sh([ip, "netns", "add", h.ns])
            _sh([ip, "link", "add", h.veth, "type", "veth", "peer", "name", peer])
            _sh([ip, "link", "set", peer, "netns", h.ns])
            _sh([ip, "-n", h.ns, "link", "set", peer, "name", h.ifname])
            _sh([ip, "-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.ifname])
            _sh([ip, "-n", h.ns, "link", "set", "lo", "up"])
            _sh([ip, "-n", h.ns, "link", "set", h.ifname, "up"])
            _sh([ip, "link", "set", h.veth, "master", self.bridge])
            _sh([ip, "link", "set", h.veth, "up"])
            if self.rate_mbit is not None:
                h.shape(self.rate_mbit, self.rate_mbit)

    def close(self) -> None:
        """Stop processes, remove veths, bridge and namespaces; safe to call twice."""
        if self._closed or not self._started:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        for p in self._procs:
            _stop_process(p)
        _remove_run([h.ns for h in self.hosts],
                    [h.veth for h in self.hosts] + ([self.bridge] if self.bridge else []))
        if self._record_path:
            with self._state_lock():
                with contextlib.suppress(OSError):
                    os.unlink(self._record_path)
                _size_neighbour_table()

    # ---- running things ---------------------------------------------------------------

    def _popen(self, host: Host, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        if self._closed:
            raise RuntimeError("this cluster is closed")
        # A session of its own lets close() signal the whole process group.
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(host.argv(cmd), **kwargs)
        self._procs.append(proc)
        return proc

    # ---- shaping ----------------------------------------------------------------------

    @staticmethod
    def _tbf(ns: str | None, dev: str, rate_mbit: float) -> None:
        rate_bytes = rate_mbit * 1e6 / 8
        # At least two full GSO packets, and about 4 ms of traffic at high rates.
        burst = max(128 * 1024, int(rate_bytes * 0.004))
        argv = [_tc()] + (["-n", ns] if ns else []) + [
            "qdisc", "replace", "dev", dev, "root", "tbf",
            "rate", f"{int(rate_mbit * 1000)}kbit", "burst", str(burst), "latency", "50ms"]
        _sh(argv)

    @staticmethod
    def _no_tbf(ns: str | None, dev: str) -> None:
        _sh([_tc()] + (["-n", ns] if ns else []) + ["qdisc", "del", "dev", dev, "root"],
            check=False)

    # ---- bookkeeping ------------------------------------------------------------------

    @contextlib.contextmanager
    def _state_lock(self) -> Iterator[None]:
        fd = os.open(os.path.join(_STATE_DIR, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _free_run_id(self) -> str:
        taken = _existing_run_ids(self.prefix)
        for _ in range(1000):
            rid = f"{random.SystemRandom().getrandbits(16):04x}"
            if rid not in taken:
                return rid
        raise RuntimeError(f"no free run id for prefix {self.prefix!r}: too many runs")

    def _free_octet(self) -> int:
        used: set[int] = set()
        for rec in _records():
            with contextlib.suppress(Exception):
                used.add(int(rec["subnet"].split(".")[2]))
        nets = []
        addrs = _sh([_ip(), "-o", "-4", "addr", "show"], check=False).stdout
        routes = _sh([_ip(), "-4", "route", "show", "table", "all"], check=False).stdout
        lines = addrs.splitlines() + routes.splitlines()
        for line in lines:
            for tok in line.split():
                with contextlib.suppress(ValueError):
                    nets.append(ipaddress.ip_network(tok, strict=False))
        for third in random.sample(range(256), 256):
            if third in used:
                continue
            candidate = ipaddress.ip_network(f"{NETWORK_BASE}.{third}.0/24")
            if any(candidate.overlaps(n) for n in nets if n.prefixlen > 0):
                continue
            return third
        raise RuntimeError(f"no free /24 left in {NETWORK_BASE}.0.0/16")

    def _write_record(self) -> None:
        self._record_path = os.path.join(_STATE_DIR, f"{self.prefix}-{self.run_id}.json")
        rec = {"prefix": self.prefix, "run": self.run_id, "pid": os.getpid(),
               "start": _proc_start_time(os.getpid()), "subnet": self.subnet,
               "hosts": self.n_hosts}
        tmp = self._record_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(rec, fh)
        os.replace(tmp, self._record_path)


_NEIGH = "/proc/sys/net/ipv4/neigh/default/gc_thresh"
_NEIGH_SAVED = os.path.join(_STATE_DIR, "neigh-thresholds.json")


def _size_neighbour_table() -> None:
    """Make the shared neighbour table fit the live runs (see the module docstring).

    With live runs: raise gc_thresh2/3 to what they need if below it, first
    saving the values found.  With none: put the saved values back.  Callers
    hold the state lock.
    """
    try:
        current = {}
        for k in ("2", "3"):
            with open(_NEIGH + k, encoding="ascii") as fh:
                current[k] = int(fh.read())
    except (OSError, ValueError):
        return  # not Linux, or not allowed to read: leave it alone
    live = [r for r in _records() if _owner_alive(r)]
    if not live:
        if os.path.exists(_NEIGH_SAVED):
            with contextlib.suppress(OSError, ValueError):
                with open(_NEIGH_SAVED, encoding="utf-8") as fh:
                    saved = json.load(fh)
                for k, v in saved.items():
                    with open(_NEIGH + k, "w", encoding="ascii") as fh:
                        fh.write(str(int(v)))
            with contextlib.suppress(OSError):
                os.unlink(_NEIGH_SAVED)
        return
    # Every namespace of a run may hold an entry for each other host and the
    # bridge; the initial namespace one per host; plus the machine's own.
    need = 1024 + sum(2 * (int(r.get("hosts", 250)) + 1) ** 2 for r in live)
    if current["3"] >= need:
        return
    if not os.path.exists(_NEIGH_SAVED):
        with open(_NEIGH_SAVED, "w", encoding="utf-8") as fh:
            json.dump(current, fh)
    with contextlib.suppress(OSError):
        for k, v in (("2", max(current["2"], need // 2)), ("3", need)):
            with open(_NEIGH + k, "w", encoding="ascii") as fh:
                fh.write(str(v))


def _stop_process(p: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
    if p.poll() is not None:
        return
    try:
        pgid = os.getpgid(p.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _records() -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(_STATE_DIR):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(_STATE_DIR, name), encoding="utf-8") as fh:
                    rec = json.load(fh)
                rec["_path"] = os.path.join(_STATE_DIR, name)
                out.append(rec)
            except (OSError, ValueError):
                continue
    return out


def _owner_alive(rec: dict[str, Any]) -> bool:
    pid = rec.get("pid")
    return isinstance(pid, int) and _proc_start_time(pid) == rec.get("start")


def _existing_run_ids(prefix: str) -> set[str]:
    pat = re.compile(rf"^{re.escape(prefix)}-([0-9a-f]{{4}})-")
    ids = {r["run"] for r in _records() if r.get("prefix") == prefix}
    for name in _netns_names() + _link_names():
        m = pat.match(name)
        if m:
            ids.add(m.group(1))
    return ids


def _netns_names() -> list[str]:
    out = _sh([_ip(), "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_names() -> list[str]:
    out = _sh([_ip(), "-o", "link", "show"], check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def _remove_run(namespaces: Sequence[str], links: Sequence[str]) -> None:
    """Kill every process inside the namespaces, then delete links and namespaces."""
    ip = _ip()
    present = set(_netns_names())
    for ns in namespaces:
        if ns not in present:
            continue
        # Bounded: a few rounds of SIGKILL to everything left inside (forked children too).
        for _ in range(50):
            pids = [int(p) for p in _sh([ip, "netns", "pids", ns], check=False).stdout.split()
                    if p.isdigit()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
    existing = set(_link_names())
    for link in links:
        if link in existing:
            _sh([ip, "link", "del", link], check=False)
    for ns in namespaces:
        if ns in present:
            _sh([ip, "netns", "del", ns], check=False)


def sweep_leftovers(prefix: str) -> list[str]:
    """Remove what dead runs with ``prefix`` left behind; returns the run ids swept.

    A run is dead when its record's owner process is gone (or its pid was reused),
    or when names of the run exist with no record at all.  Callers hold the state lock.
    """
    live = {r["run"] for r in _records() if r.get("prefix") == prefix and _owner_alive(r)}
    pat = re.compile(rf"^{re.escape(prefix)}-([0-9a-f]{{4}})-")
    namespaces: dict[str, list[str]] = {}
    links: dict[str, list[str]] = {}
    for name in _netns_names():
        m = pat.match(name)
        if m and m.group(1) not in live:
            namespaces.setdefault(m.group(1), []).append(name)
    for name in _link_names():
        m = pat.match(name)
        if m and m.group(1) not in live:
            links.setdefault(m.group(1), []).append(name)
    dead = set(namespaces) | set(links)
    for rid in sorted(dead):
        _remove_run(namespaces.get(rid, []), links.get(rid, []))
    for rec in _records():
        if rec.get("prefix") == prefix and rec.get("run") not in live:
            with contextlib.suppress(OSError):
                os.unlink(rec["_path"])
            dead.add(rec.get("run", ""))
    return sorted(d for d in dead if d)
