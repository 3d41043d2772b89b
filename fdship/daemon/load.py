"""The load figures a daemon reports: the host's, and the app's it exists to run.

Sits between psutil and the daemon's heartbeat loop
(:meth:`fdship.daemon.agent.Daemon.beat`), which calls
:meth:`LoadSampler.sample` about once a second and sends the figures to the
center as :class:`fdship.protocol.Load`.  The center's placement policy
(:mod:`fdship.core.placement`) reads them to give busy hosts fewer uploads.

Host-wide CPU alone misses what matters on a real fleet: a 32-core bidder
whose bidding process pegs a few cores looks idle overall.  So the daemon can
also watch that process (``watch_pidfile``, its pidfile): every sample reads
each pidfile, measures the CPU the process and its children used since the
last sample, and reports it as ``app_cpu`` in percent of one core, like
``top`` (200 = two cores busy).  A pidfile that is missing, unreadable,
garbage, or names a process that is gone (or a pid reused by another one, or
one this daemon may not see in /proc) counts as 0 and is logged once each
time its state changes: the app being down must never stop the heartbeats
that keep this daemon alive.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

log = logging.getLogger("fdship.daemon")

# A process is identified by its pid *and* its start time: pids are reused.
Key = tuple[int, float]

# A pidfile holds a decimal pid; more than this is not one.
PIDFILE_MAX = 64
# A process counts as the pidfile's own only if it started before the pidfile
# was last written, give or take this much: psutil's start times come from a
# boot time rounded down to the second.
REUSE_SLACK = 1.0


def read_pidfile(path: str) -> tuple[int | None, str]:
    """``(pid, "")`` for a pidfile naming a running process it may belong to, else
    ``(None, why)`` with a reason an operator can act on.

    Opened without blocking (a FIFO put there by mistake must not hang the
    heartbeat) and read only as far as a pid can go.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None, "missing (is the app running, and does it write its pidfile there?)"
        return None, f"unreadable: {e.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        raw = os.read(fd, PIDFILE_MAX + 1)
    except OSError as e:
        return None, f"unreadable: {e.strerror}"
    finally:
        os.close(fd)
    text = raw.decode("ascii", "replace").strip()
    if len(raw) > PIDFILE_MAX or not text.isdigit() or not 0 < int(text) <= 2**22:
        return None, f"holds no pid (starts {text[:20]!r})"
    pid = int(text)
    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        # No /proc entry: gone, or hidden from us (another user's process under
        # hidepid or systemd's ProtectProc=invisible).  Signal 0 tells them apart.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None, f"stale: pid {pid} is not running"
        except PermissionError:
            pass
        return None, (f"pid {pid} is running but hidden from this daemon (/proc mounted with "
                      "hidepid, or systemd's ProtectProc=invisible): let the daemon see it, "
                      "e.g. ProtectProc=default in a drop-in for its unit")
    except psutil.Error as e:
        return None, f"pid {pid} cannot be inspected: {e}"
    if started > st.st_mtime + REUSE_SLACK:
        # The app wrote the file after it started; a process that started later
        # got a recycled pid and is someone else.
        return None, f"stale: pid {pid} now belongs to a process started after the pidfile"
    return pid, ""


def _tree(pids: list[int]) -> dict[Key, tuple[Key | None, float]]:
    """Every process of the trees rooted at ``pids`` (each once): its parent's key
    (None outside the trees) and the CPU seconds it used, its own plus those of
    the children it reaped."""
    procs: dict[Key, tuple[int, float]] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            members = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue  # gone since its pidfile was read: counts as nothing
        for p in members:
            try:
                with p.oneshot():
                    key = (p.pid, p.create_time())
                    t = p.cpu_times()
                    ppid = p.ppid()
            except psutil.Error:
                continue  # exited between the listing and the read
            procs[key] = (ppid, t.user + t.system + t.children_user + t.children_system)
    by_pid = {k[0]: k for k in procs}
    return {k: (by_pid.get(ppid), cpu) for k, (ppid, cpu) in procs.items()}


def cpu_between(prev: dict[Key, tuple[Key | None, float]],
                now: dict[Key, tuple[Key | None, float]]) -> float:
    """CPU seconds the watched trees used between two :func:`_tree` readings.

    * a process seen both times adds what its figure grew by;
    * a process new since ``prev`` whose parent (or an ancestor) was there
      then was born in between: all its time counts.  Any other new process
      (a first reading, an app restarted or a pidfile pointing elsewhere) is
      only a baseline for the next reading;
    * a process gone since ``prev`` whose parent is still there was reaped by
      it, so its final figure now shows in the parent's reaped-children time:
      what was counted of it before is taken off again, leaving its last bit.
    """
    total = 0.0
    for k, (_parent, cpu) in now.items():
        if k in prev:
            total += max(0.0, cpu - prev[k][1])
        elif _born_between(k, prev, now):
            total += cpu
    for k, (parent, cpu) in prev.items():
        if k not in now and parent is not None and parent in now:
            total -= cpu
    return max(0.0, total)


def _born_between(k: Key, prev: dict[Key, tuple[Key | None, float]],
                  now: dict[Key, tuple[Key | None, float]]) -> bool:
    parent = now[k][0]
    for _ in range(len(now)):  # bounded: parents cannot loop, but be sure
        if parent is None or parent not in now:
            return False
        if parent in prev:
            return True
        parent = now[parent][0]
    return False


@dataclass
class AppWatch:
    """The CPU of the processes named by ``watch_pidfile``, in percent of one core."""

    paths: tuple[str, ...] = ()
    state: dict[str, str] = field(default_factory=dict)  # path -> last logged status
    last: dict[Key, tuple[Key | None, float]] | None = None
    last_t: float = 0.0

    def sample(self, now: float) -> float:
        if not self.paths:
            return 0.0
        pids = []
        for path in self.paths:
            pid, why = read_pidfile(path)
            self._note(path, f"watching pid {pid}" if pid is not None else why)
            if pid is not None:
                pids.append(pid)
        tree = _tree(pids)
        out = 0.0
        if self.last is not None and now > self.last_t:
            out = cpu_between(self.last, tree) / (now - self.last_t) * 100.0
        self.last, self.last_t = tree, now
        return round(out, 1)

    def _note(self, path: str, status: str) -> None:
        """Log a pidfile's status when it changes (not every second)."""
        if self.state.get(path) == status:
            return
        self.state[path] = status
        if status.startswith("watching"):
            log.info("watch_pidfile %s: %s", path, status)
        else:
            log.warning("watch_pidfile %s: %s; its app's CPU counts as 0 until this is "
                        "fixed", path, status)


@dataclass
class LoadSampler:
    """psutil-based load figures, as rates between two samples."""

    watch: tuple[str, ...] = ()  # pidfiles of the processes this host exists to run
    last_t: float = 0.0
    last_net: Any = None
    last_disk_busy: float = 0.0
    ncpu: int = field(default_factory=lambda: psutil.cpu_count() or 1)
    app: AppWatch = field(init=False)

    def __post_init__(self) -> None:
        psutil.cpu_percent(None)  # prime: the first call always returns 0
        self.app = AppWatch(tuple(self.watch))

    def sample(self) -> dict[str, float]:
        now = time.monotonic()
        net = psutil.net_io_counters()
        try:
            disks = psutil.disk_io_counters(perdisk=True) or {}
            busy = max((getattr(d, "busy_time", 0) for d in disks.values()), default=0) / 1000.0
        except Exception:  # some kernels / containers hide disk stats
            busy = 0.0
        out = {"cpu": psutil.cpu_percent(None), "loadavg": os.getloadavg()[0] / self.ncpu,
               "net_tx": 0.0, "net_rx": 0.0, "disk_busy": 0.0,
               "app_cpu": self.app.sample(now)}
        if self.last_net is not None and now > self.last_t:
            dt = now - self.last_t
            out["net_tx"] = max(0.0, (net.bytes_sent - self.last_net.bytes_sent) / dt)
            out["net_rx"] = max(0.0, (net.bytes_recv - self.last_net.bytes_recv) / dt)
            out["disk_busy"] = min(100.0, max(0.0, (busy - self.last_disk_busy) / dt * 100))
        self.last_t, self.last_net, self.last_disk_busy = now, net, busy
        return out
