"""A simulated cluster that drives the real scheduler core (no sockets, no clock).

Used by the core's scenario tests and by ``fdship simulate``.  Hosts have an
uplink and a downlink of given bandwidth; a transfer runs at the smaller of
its peer's fair share of uplink and its target's fair share of downlink.
Time advances from event to event (discrete-event simulation), so a
thousand-host job simulates in seconds and every run with the same seed is
identical.

The simulator also checks the scheduler's promises as it goes: no fetch is
assigned from a peer that lacks the chunk, per-host caps hold, and it counts
how many times the source sent each chunk.
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field
from typing import Any

import xxhash

from fdship.core.actions import Action, AssignFetch, Commit, JobEnded, Pack
from fdship.core.events import (ChunkStored, Event, FetchFailed, FilePacked, HookFinished,
                                HostReported, Tick)
from fdship.core.scheduler import Scheduler, Tunables
from fdship.protocol import (FAIL_CONNECT, FileSpec, Heartbeat, JobRequest, Load,
                             chunk_count)


class FakeClock:
    """A clock tests advance by hand."""

    def __init__(self, start: float = 1_790_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> float:
        self.now += dt
        return self.now


def fake_file(path: str, size: int, chunk_size: int, dest: str | None = None) -> FileSpec:
    """A FileSpec with made-up (but well-formed) hashes."""
    n = chunk_count(size, chunk_size)
    chunks = tuple(xxhash.xxh3_64(f"{path}:{i}".encode()).hexdigest() for i in range(n))
    return FileSpec(path=path, dest=dest or path, size=size,
                    xxh3=xxhash.xxh3_64(path.encode()).hexdigest(), chunks=chunks)


@dataclass
class SimHost:
    name: str
    up: float  # bytes/s
    down: float
    labels: tuple[str, ...] = ()
    alive: bool = True
    uploads: int = 0
    downloads: int = 0
    max_up_seen: int = 0
    max_down_seen: int = 0
    bytes_up: int = 0
    held: set[tuple[str, int, int]] = field(default_factory=set)  # (job, file, chunk)


@dataclass
class Transfer:
    job: str
    target: str
    peer: str
    file: int
    chunk: int
    remaining: float
    rate: float = 0.0
    id: int = 0


class SimCluster:
    """N simulated daemons + the real Scheduler."""

    def __init__(self, n_hosts: int, bandwidth: float, *, slow_fraction: float = 0.0,
                 slow_factor: float = 0.25, seed: int = 1, tunables: Tunables | None = None,
                 latency: float = 0.001) -> None:
        self.rng = random.Random(seed)
        self.clock = FakeClock()
        self.sched = Scheduler(tunables or Tunables(heartbeat_timeout=1e9), seed=seed)
        self.latency = latency
        self.hosts: dict[str, SimHost] = {}
        names = [f"h{i:05d}" for i in range(n_hosts)]
        slow = set(self.rng.sample(names[1:], int(slow_fraction * (n_hosts - 1)))) if n_hosts > 1 else set()
        for n in names:
            bw = bandwidth * (slow_factor if n in slow else 1.0)
            self.hosts[n] = SimHost(name=n, up=bw, down=bw)
        self.transfers: dict[int, Transfer] = {}
        self._next_id = 0
        self.queue: list[tuple[float, int, Event]] = []
        self._seq = 0
        self.source_sends: dict[tuple[str, int, int], int] = {}
        self.violations: list[str] = []
        self.ended: dict[str, str] = {}
        self.cpu_seconds = 0.0
        self.events_handled = 0
        # Durable events as the center would log them: (record, time).
        self.durable_log: list[tuple[dict[str, Any], float]] = []
        self.fail_links: set[tuple[str, str]] = set()  # (peer, target) pairs that fail
        for n in names:
            self._deliver(self._beat(n))

    # -- plumbing -----------------------------------------------------------------

    def _beat(self, name: str) -> HostReported:
        return HostReported(beat=Heartbeat(name=name, address=f"{name}:7071", boot_id="b1",
                                           labels=self.hosts[name].labels, load=Load()))

    def _push(self, at: float, ev: Event) -> None:
        self._seq += 1
        heapq.heappush(self.queue, (at, self._seq, ev))

    def _deliver(self, ev: Event) -> None:
        if ev.durable:
            self.durable_log.append((ev.to_record(), self.clock.now))
        t0 = time.process_time()
        actions = self.sched.handle(ev, self.clock.now)
        self.cpu_seconds += time.process_time() - t0
        self.events_handled += 1
        self._carry_out(actions)

    def _carry_out(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Commit):
                self._deliver(a.event)
            elif isinstance(a, AssignFetch):
                for f in a.fetches:
                    self._start(a.job, a.target, f.peer_name, f.file, f.chunk, f.size)
            elif isinstance(a, Pack):
                if a.notify:
                    self._push(self.clock.now + self.latency,
                               HookFinished(job=a.job, host=a.target, ok=True))
                else:
                    self._push(self.clock.now + self.latency,
                               FilePacked(job=a.job, host=a.target, file=a.file.file))
            elif isinstance(a, JobEnded):
                self.ended[a.job] = a.state

    def _start(self, job: str, target: str, peer: str, file: int, chunk: int, size: int) -> None:
        p, t = self.hosts[peer], self.hosts[target]
        src = self.sched.jobs[job].source
        if peer != src and (job, file, chunk) not in p.held:
            self.violations.append(f"{target} told to fetch {job}/{file}/{chunk} from {peer}, "
                                   "which does not hold it")
        if peer == src:
            k = (job, file, chunk)
            self.source_sends[k] = self.source_sends.get(k, 0) + 1
        p.uploads += 1
        t.downloads += 1
        p.max_up_seen = max(p.max_up_seen, p.uploads)
        t.max_down_seen = max(t.max_down_seen, t.downloads)
        h = self.sched.hosts[peer]
        if p.uploads > h.max_uploads or t.downloads > self.sched.hosts[target].max_downloads:
            self.violations.append(f"cap exceeded: {peer} uploads {p.uploads}, "
                                   f"{target} downloads {t.downloads}")
        self._next_id += 1
        self.transfers[self._next_id] = Transfer(job, target, peer, file, chunk,
                                                 remaining=float(max(size, 1)), id=self._next_id)

    def _rates(self) -> None:
        for tr in self.transfers.values():
            p, t = self.hosts[tr.peer], self.hosts[tr.target]
            tr.rate = min(p.up / max(1, p.uploads), t.down / max(1, t.downloads))

    # -- running ------------------------------------------------------------------

    def submit(self, files: list[FileSpec], machines: list[str], source: str = "h00000",
               job_id: str | None = None, chunk_size: int = 4 * 1024 * 1024) -> str:
        jid = job_id or f"job-{len(self.sched.jobs):04d}"
        req = JobRequest(source=source, files=tuple(files), machines=tuple(machines),
                         chunk_size=chunk_size)
        ev = self.sched.admit(req, jid, self.clock.now)
        self._deliver(ev)
        for f_i, f in enumerate(files):
            for c in range(len(f.chunks)):
                self.hosts[source].held.add((jid, f_i, c))
        return jid

    def run(self, until_jobs_end: bool = True, max_time: float = 1e6,
            tick: float = 0.5) -> float:
        """Advance until every submitted job ended (or max_time).  Returns sim time."""
        start = self.clock.now
        next_tick = start + tick
        steps = 0
        while self.clock.now - start < max_time:
            steps += 1
            if steps > 50_000_000:
                raise RuntimeError("simulation did not converge")
            if until_jobs_end and self.sched.jobs and all(
                    j.state != "running" for j in self.sched.jobs.values()):
                break
            self._rates()
            t_tr = min((self.clock.now + tr.remaining / tr.rate
                        for tr in self.transfers.values() if tr.rate > 0), default=float("inf"))
            t_q = self.queue[0][0] if self.queue else float("inf")
            t_next = min(t_tr, t_q, next_tick)
            dt = t_next - self.clock.now
            if dt > 0:
                for tr in self.transfers.values():
                    tr.remaining -= tr.rate * dt
                self.clock.advance(dt)
            # Completed transfers: the clock is a large float (epoch seconds), so
            # allow a few microseconds of slack or the loop could stall on rounding.
            for tid in [k for k, tr in self.transfers.items()
                        if tr.remaining <= 1e-6 + tr.rate * 1e-5]:
                self._finish(self.transfers.pop(tid))
            while self.queue and self.queue[0][0] <= self.clock.now + 1e-12:
                _, _, ev = heapq.heappop(self.queue)
                self._deliver(ev)
            if self.clock.now >= next_tick - 1e-12:
                next_tick = self.clock.now + tick
                self._deliver(Tick())
        return self.clock.now - start

    def _finish(self, tr: Transfer) -> None:
        p, t = self.hosts[tr.peer], self.hosts[tr.target]
        p.uploads -= 1
        t.downloads -= 1
        size = self.sched.jobs[tr.job].files[tr.file].size if tr.job in self.sched.jobs else 0
        if (tr.peer, tr.target) in self.fail_links:
            ev: Event = FetchFailed(job=tr.job, host=tr.target, file=tr.file, chunk=tr.chunk,
                                    peer=tr.peer, fail=FAIL_CONNECT, error="simulated reset")
        else:
            p.bytes_up += min(size, self.sched.jobs[tr.job].chunk_size) if size else 0
            t.held.add((tr.job, tr.file, tr.chunk))
            ev = ChunkStored(job=tr.job, host=tr.target, file=tr.file, chunk=tr.chunk,
                             peer=tr.peer)
        self._push(self.clock.now + self.latency, ev)

    def summary(self) -> dict[str, Any]:
        sends = list(self.source_sends.values())
        return {"max_source_sends": max(sends, default=0),
                "mean_source_sends": sum(sends) / len(sends) if sends else 0.0,
                "violations": list(self.violations), "cpu_seconds": self.cpu_seconds,
                "events": self.events_handled}
