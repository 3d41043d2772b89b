"""The scheduler: all global state and every decision, as a pure state machine.

``Scheduler.handle(event, now)`` applies one event and returns the actions to
carry out.  The center's runner is its only caller in production; the REDO log
replays durable events through the same method; ``fdship simulate`` and the
scenario tests drive it with simulated hosts.

How a job flows: ``JobSubmitted`` creates one ``Machine`` per target.  Each
target with a free download slot is given the chunks it lacks, rarest first
(fewest holders plus copies in flight), each from a peer chosen by
:mod:`fdship.core.placement`.  The source is a peer of last resort once a chunk
has a copy elsewhere, so it sends each chunk about once.  ``ChunkStored`` (an
ACK) makes the target a holder that others can fetch from; when a target holds
every chunk of a file the core returns ``Pack``; ``FilePacked`` (a FIN) for
every file ends the machine (after its notify hook, if any); when every
machine has ended the job ends.

State is split in two (see :mod:`fdship.core.events`): durable state changes
only by handling durable events, so a replay of the log rebuilds it exactly
(``snapshot()`` is what a test compares); soft state (liveness, load,
assignments in flight, retry counters) starts empty after a restart and is
rebuilt from heartbeats within seconds.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

from fdship.core import placement
from fdship.core.actions import Action, AssignFetch, Commit, JobEnded, Pack
from fdship.core.events import (CallbackDelivered, ChunksLost, ChunkStored, CommandUndelivered,
                                Event, FetchFailed, FilePacked, HookFinished, HostRegistered,
                                HostReported, JobsExpired, JobSubmitted, MachineFailed,
                                PackFailed, Recovered, Tick)
from fdship.errors import TooLarge, Unprocessable
from fdship.protocol import (FAIL_HASH, FATAL_KINDS, Fetch, FileSpec, JobRequest,
                             StagedFile, chunk_span)


def iso(ts: float | None) -> str | None:
    """UTC ISO-8601 with a Z, as the CONTRACT writes times."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def clock_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%H:%M:%S")


def mib(n: int) -> str:
    return f"{n / 1048576:.0f} MiB" if n >= 1048576 else f"{n} bytes"


@dataclass
class Tunables:
    """Scheduling settings (from CenterConfig)."""

    chunk_size: int = 4 * 1024 * 1024
    heartbeat_timeout: float = 5.0
    grace_period: float = 60.0
    max_uploads: int = 4
    max_downloads: int = 4
    max_attempts: int = 8
    fetch_timeout: float = 120.0
    retention: float = 7 * 86400.0
    backoff_base: float = 0.2
    backoff_cap: float = 10.0
    max_files: int = 10_000
    max_machines: int = 10_000
    # A chunk may be sent by the source again while no other copy is alive or
    # in flight; beyond that the source sends a chunk at most this many times.
    source_copies: int = 1
    # Consecutive fruitless tries of waiting targets after an event before we
    # stop looking (the next tick does a full pass).
    hungry_tries: int = 16


@dataclass
class HostState:
    # durable (HostRegistered)
    name: str
    address: str = ""
    labels: tuple[str, ...] = ()
    boot_id: str = ""
    # soft
    alive: bool = False
    last_seen: float = 0.0
    cpu: float = 0.0
    loadavg: float = 0.0
    net_tx: float = 0.0
    net_rx: float = 0.0
    net_tx_peak: float = 0.0
    disk_busy: float = 0.0
    free: dict[str, int] = field(default_factory=dict)
    allow_dest: tuple[str, ...] = ()
    hooks: tuple[str, ...] = ()
    max_uploads: int = 4
    max_downloads: int = 4
    uploads: int = 0  # assigned by the center, in flight
    downloads: int = 0
    reported_uploads: int = 0
    reported_downloads: int = 0
    bytes_served: int = 0
    bytes_received: int = 0
    version: str = ""
    want_inventory: bool = True
    bad_serves: int = 0  # chunks from this host that failed their hash


@dataclass
class Machine:
    """One target's part of one job."""

    name: str
    have: set[int] = field(default_factory=set)  # global chunk indexes held (durable)
    file_have: list[int] = field(default_factory=list)  # count of held chunks per file
    packed: set[int] = field(default_factory=set)
    ended: str = ""  # "", "done" or "failed" (durable)
    error: str | None = None
    error_at: float | None = None
    finished: float | None = None
    hook: dict[str, Any] | None = None
    # soft
    inflight: dict[int, tuple[str, float]] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    total_attempts: int = 0
    retry_at: dict[int, float] = field(default_factory=dict)
    last_failed_peer: dict[int, str] = field(default_factory=dict)
    avoid: dict[str, int] = field(default_factory=dict)
    packing: set[int] = field(default_factory=set)
    pack_failures: dict[int, int] = field(default_factory=dict)
    hook_sent: bool = False
    last_error: str = ""
    history: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=32))
    bytes_done: int = 0


@dataclass
class Job:
    id: str
    created: float
    source: str
    files: tuple[FileSpec, ...]
    targets: tuple[str, ...]
    chunk_size: int
    callback: str
    notify: str
    machines: dict[str, Machine]
    base: list[int]  # global index of each file's chunk 0
    where: list[tuple[int, int]]  # global chunk index -> (file, chunk)
    holders: list[set[str]]  # global chunk index -> targets holding it (not the source)
    state: str = "running"
    finished: float | None = None
    callback_state: dict[str, Any] = field(default_factory=dict)
    # soft
    inflight_count: list[int] = field(default_factory=list)
    source_sends: list[int] = field(default_factory=list)
    source_ok: bool = True

    @property
    def nchunks(self) -> int:
        return len(self.where)

    def file_chunks(self, f: int) -> int:
        return (self.base[f + 1] if f + 1 < len(self.base) else len(self.where)) - self.base[f]

    def chunk_size_of(self, g: int) -> int:
        f, c = self.where[g]
        return chunk_span(self.files[f].size, self.chunk_size, c)[1]


class Scheduler:
    """All of the center's state and decisions.  Not thread-safe: one runner owns it."""

    def __init__(self, tunables: Tunables | None = None, seed: int = 0) -> None:
        self.t = tunables or Tunables()
        self.rng = random.Random(seed)
        self.hosts: dict[str, HostState] = {}
        self.jobs: dict[str, Job] = {}
        # Machines that still need chunks and had a free download slot we could not fill.
        self.hungry: dict[tuple[str, str], None] = {}
        self.pending_beats: dict[str, Any] = {}
        self.dirty_jobs: set[str] = set()
        self.dirty_hosts: set[str] = set()
        self.weights = placement.DEFAULT_WEIGHTS

    # ------------------------------------------------------------------ dispatch

    def handle(self, event: Event, now: float) -> list[Action]:
        method = getattr(self, "_on_" + type(event).__name__)
        return method(event, now)

    # ------------------------------------------------------------------ admission

    def admit(self, req: JobRequest, job_id: str, now: float) -> JobSubmitted:
        """Validate a job request against current knowledge; raise a 4xx error or
        return the durable ``JobSubmitted`` event to log.  Pure: no state change."""
        if len(req.files) > self.t.max_files:
            raise TooLarge(f"job has {len(req.files)} files; this center allows at most "
                           f"{self.t.max_files} (setting max_files)")
        if req.source not in self.hosts:
            raise Unprocessable(f"source daemon {req.source!r} has not registered with the center")
        targets: list[str] = []
        unknown: list[str] = []
        for entry in req.machines:
            found = self.resolve(entry)
            if not found:
                unknown.append(entry)
            for n in found:
                if n not in targets:
                    targets.append(n)
        if unknown:
            known = ", ".join(sorted(self.hosts)) or "none yet"
            raise Unprocessable(
                f"unknown machine{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                f"no registered daemon has that name, address or label (known daemons: {known})")
        if not targets:
            raise Unprocessable("no target machines: name at least one machine")
        if len(targets) > self.t.max_machines:
            raise TooLarge(f"job names {len(targets)} machines; at most {self.t.max_machines} "
                           f"allowed (setting max_machines)")
        for n in targets:
            h = self.hosts[n]
            if h.allow_dest:
                for f in req.files:
                    if not any(_under(f.dest, d) for d in h.allow_dest):
                        raise Unprocessable(
                            f"destination {f.dest} is outside the allowed destinations of "
                            f"{n} ({', '.join(h.allow_dest)}); pick a --dest under one of them "
                            f"or add it to that daemon's allow_dest")
            if req.notify and h.hooks is not None and req.notify not in h.hooks:
                raise Unprocessable(
                    f"machine {n} has no notify hook named {req.notify!r} "
                    f"(its hooks: {', '.join(h.hooks) or 'none'}); configure it in the "
                    f"daemon's [hooks.{req.notify}] section")
        failed: list[tuple[str, str]] = []
        for n in targets:
            reason = self._space_problem(self.hosts[n], req.files) if n != req.source else None
            if reason:
                failed.append((n, reason))
        return JobSubmitted(job=job_id, source=req.source, files=req.files,
                            targets=tuple(targets), chunk_size=req.chunk_size,
                            callback=req.callback, notify=req.notify, failed=tuple(failed))

    def resolve(self, entry: str) -> list[str]:
        """Names of the daemons a job's machine entry designates."""
        entry = entry.strip()
        if entry.startswith("@"):
            label = entry[1:]
            return sorted(n for n, h in self.hosts.items() if label in h.labels)
        if entry in self.hosts:
            return [entry]
        return sorted(n for n, h in self.hosts.items()
                      if h.address.rpartition(":")[0].strip("[]") == entry or h.address == entry)

    def _space_problem(self, h: HostState, files: Iterable[FileSpec]) -> str | None:
        need: dict[str, int] = {}
        for f in files:
            best = max((d for d in h.free if _under(f.dest, d)), key=len, default=None)
            if best is not None:
                need[best] = need.get(best, 0) + f.size
        for d, n in need.items():
            if h.free[d] < n:
                return f"disk full: {mib(h.free[d])} free under {d}, {mib(n)} needed"
        return None

    # ------------------------------------------------------------------ durable events

    def _on_HostRegistered(self, ev: HostRegistered, now: float) -> list[Action]:
        h = self.hosts.get(ev.name)
        actions: list[Action] = []
        if h is None:
            h = self.hosts[ev.name] = HostState(name=ev.name, max_uploads=self.t.max_uploads,
                                                max_downloads=self.t.max_downloads)
        restarted = bool(h.boot_id) and h.boot_id != ev.boot_id
        h.address, h.labels, h.boot_id = ev.address, tuple(ev.labels), ev.boot_id
        self.dirty_hosts.add(h.name)
        if restarted:
            # The daemon restarted: whatever we had in flight with it is gone.
            actions += self._host_lost(h, now, penalise=False)
            h.want_inventory = True
        beat = self.pending_beats.pop(ev.name, None)
        if beat is not None:
            actions += self._apply_beat(h, beat, now)
        return actions

    def _on_JobSubmitted(self, ev: JobSubmitted, now: float) -> list[Action]:
        base: list[int] = []
        where: list[tuple[int, int]] = []
        for fi, f in enumerate(ev.files):
            base.append(len(where))
            where.extend((fi, c) for c in range(len(f.chunks)))
        machines = {n: Machine(name=n, file_have=[0] * len(ev.files)) for n in ev.targets}
        job = Job(id=ev.job, created=now, source=ev.source, files=tuple(ev.files),
                  targets=tuple(ev.targets), chunk_size=ev.chunk_size, callback=ev.callback,
                  notify=ev.notify, machines=machines, base=base, where=where,
                  holders=[set() for _ in where], inflight_count=[0] * len(where),
                  source_sends=[0] * len(where))
        if ev.callback:
            job.callback_state = {"url": ev.callback, "state": "pending", "attempts": 0,
                                  "error": None}
        self.jobs[ev.job] = job
        self.dirty_jobs.add(ev.job)
        actions: list[Action] = []
        for n, reason in ev.failed:
            actions += self._fail_machine(job, machines[n], reason, now)
        if ev.source in machines and not machines[ev.source].ended:
            # The source is also a target: it already holds every chunk in its store.
            m = machines[ev.source]
            for g in range(job.nchunks):
                self._add_chunk(job, m, g, now, count_bytes=False)
        for m in machines.values():
            if not m.ended:
                actions += self._try(job, m, now)
        actions += self._maybe_end(job, now)
        return actions

    def _on_ChunkStored(self, ev: ChunkStored, now: float) -> list[Action]:
        job = self.jobs.get(ev.job)
        if job is None or ev.host not in job.machines or ev.file >= len(job.files):
            return []
        if ev.chunk >= job.file_chunks(ev.file):
            return []
        m = job.machines[ev.host]
        g = job.base[ev.file] + ev.chunk
        self._release(job, m, g)
        if m.ended or g in m.have:
            return []
        m.retry_at.pop(g, None)
        self._add_chunk(job, m, g, now)
        self.dirty_jobs.add(job.id)
        actions = self._try(job, m, now)
        actions += self._feed_hungry(now)
        return actions

    def _on_ChunksLost(self, ev: ChunksLost, now: float) -> list[Action]:
        job = self.jobs.get(ev.job)
        if job is None or ev.host not in job.machines:
            return []
        m = job.machines[ev.host]
        for c in ev.chunks:
            if ev.file < len(job.files) and c < job.file_chunks(ev.file):
                g = job.base[ev.file] + c
                if g in m.have:
                    m.have.discard(g)
                    m.file_have[ev.file] -= 1
                    job.holders[g].discard(m.name)
                    m.bytes_done -= job.chunk_size_of(g)
        m.packed.discard(ev.file)
        m.packing.discard(ev.file)
        self.dirty_jobs.add(job.id)
        return self._try(job, m, now) if not m.ended else []

    def _on_FilePacked(self, ev: FilePacked, now: float) -> list[Action]:
        job = self.jobs.get(ev.job)
        if job is None or ev.host not in job.machines or ev.file >= len(job.files):
            return []
        m = job.machines[ev.host]
        m.packing.discard(ev.file)
        if m.ended or ev.file in m.packed:
            return []
        m.packed.add(ev.file)
        self.dirty_jobs.add(job.id)
        if len(m.packed) == len(job.files) and not job.notify:
            m.ended, m.finished = "done", now
            return self._maybe_end(job, now)
        return self._try(job, m, now)

    def _on_HookFinished(self, ev: HookFinished, now: float) -> list[Action]:
        job = self.jobs.get(ev.job)
        if job is None or ev.host not in job.machines:
            return []
        m = job.machines[ev.host]
        if m.ended:
            return []
        m.hook = dict(ev.detail)
        self.dirty_jobs.add(job.id)
        if ev.ok:
            m.ended, m.finished = "done", now
            return self._maybe_end(job, now)
        return self._fail_machine(job, m, ev.error or "notify hook failed", now)

    def _on_MachineFailed(self, ev: MachineFailed, now: float) -> list[Action]:
        job = self.jobs.get(ev.job)
        if job is None or ev.host not in job.machines:
            return []
        return self._fail_machine(job, job.machines[ev.host], ev.reason, now)

    def _on_CallbackDelivered(self, ev: CallbackDelivered, now: float) -> list[Action]:
        job = self.jobs.get(ev.job)
        if job is not None:
            job.callback_state.update(state="delivered" if ev.ok else "failed",
                                      attempts=ev.attempts, error=ev.error or None, at=now)
            self.dirty_jobs.add(job.id)
        return []

    def _on_JobsExpired(self, ev: JobsExpired, now: float) -> list[Action]:
        for j in ev.jobs:
            self.jobs.pop(j, None)
        return []

    # ------------------------------------------------------------------ soft events

    def _on_HostReported(self, ev: HostReported, now: float) -> list[Action]:
        b = ev.beat
        h = self.hosts.get(b.name)
        if (h is None or h.address != b.address or h.labels != tuple(b.labels)
                or h.boot_id != b.boot_id):
            # Registration is durable: log it first, then apply this beat.
            self.pending_beats[b.name] = b
            return [Commit(HostRegistered(name=b.name, address=b.address,
                                          labels=tuple(b.labels), boot_id=b.boot_id))]
        return self._apply_beat(h, b, now)

    def _apply_beat(self, h: HostState, b: Any, now: float) -> list[Action]:
        was_alive = h.alive
        h.alive, h.last_seen = True, now
        ld = b.load
        h.cpu, h.loadavg, h.net_tx, h.net_rx, h.disk_busy = (ld.cpu, ld.loadavg, ld.net_tx,
                                                             ld.net_rx, ld.disk_busy)
        h.net_tx_peak = max(h.net_tx_peak * 0.999, ld.net_tx)
        h.reported_uploads, h.reported_downloads = ld.uploads, ld.downloads
        h.bytes_served, h.bytes_received = ld.bytes_served, ld.bytes_received
        h.free, h.allow_dest, h.hooks = dict(b.free), tuple(b.allow_dest), tuple(b.hooks)
        h.max_uploads, h.max_downloads, h.version = b.max_uploads, b.max_downloads, b.version
        self.dirty_hosts.add(h.name)
        actions: list[Action] = []
        if b.inventory is not None:
            actions += self._reconcile(h, b.inventory, now)
            h.want_inventory = False
        if not was_alive:
            actions += self._schedule_all(now)
        return actions

    def _reconcile(self, h: HostState, inventory: Iterable[Any], now: float) -> list[Action]:
        """Compare what a (re)registering daemon holds with what we recorded."""
        held: dict[tuple[str, int], Any] = {(x.job, x.file): x for x in inventory}
        actions: list[Action] = []
        for job in self.jobs.values():
            if job.state != "running":
                continue
            if job.source == h.name:
                had = job.source_ok
                job.source_ok = all((job.id, f) in held for f in range(len(job.files)))
                if had != job.source_ok:
                    self.dirty_jobs.add(job.id)
            m = job.machines.get(h.name)
            if m is None or m.ended:
                continue
            for f in range(len(job.files)):
                rep = held.get((job.id, f))
                have = set(rep.chunks) if rep else set()
                recorded = {g - job.base[f] for g in m.have if job.where[g][0] == f}
                if job.source == h.name and job.source_ok:
                    continue  # the source-as-target reads its own store
                if rep is not None and rep.packed and f not in m.packed:
                    actions.append(Commit(FilePacked(job=job.id, host=h.name, file=f)))
                    continue
                if f in m.packed:
                    continue  # installed; nothing to fetch again
                # Record what is there before forgetting what is not, so that the
                # rescheduling after the loss does not assign a chunk already held.
                for c in sorted(have - recorded):
                    if c < job.file_chunks(f):
                        actions.append(Commit(ChunkStored(job=job.id, host=h.name, file=f,
                                                          chunk=c)))
                lost = sorted(recorded - have)
                if lost:
                    actions.append(Commit(ChunksLost(job=job.id, host=h.name, file=f,
                                                     chunks=tuple(lost),
                                                     reason="missing on disk after restart")))
        return actions

    def _on_FetchFailed(self, ev: FetchFailed, now: float) -> list[Action]:
        job = self.jobs.get(ev.job)
        if job is None or ev.host not in job.machines or ev.file >= len(job.files):
            return []
        if ev.chunk >= job.file_chunks(ev.file):
            return []
        m = job.machines[ev.host]
        g = job.base[ev.file] + ev.chunk
        self._release(job, m, g)
        if m.ended or g in m.have:
            return []
        path = job.files[ev.file].path
        if ev.fail in FATAL_KINDS:
            return [Commit(MachineFailed(job=job.id, host=m.name, reason=ev.error))]
        n = m.attempts[g] = m.attempts.get(g, 0) + 1
        m.total_attempts += 1
        m.last_error = f"chunk {ev.chunk} of {path} from {ev.peer}: {ev.error}"
        self.dirty_jobs.add(job.id)
        if ev.peer:
            m.avoid[ev.peer] = m.avoid.get(ev.peer, 0) + 1
            m.last_failed_peer[g] = ev.peer
            if ev.fail == FAIL_HASH and ev.peer in self.hosts:
                self.hosts[ev.peer].bad_serves += 1
        if n >= self.t.max_attempts:
            return [Commit(MachineFailed(
                job=job.id, host=m.name,
                reason=f"chunk {ev.chunk} of {path} failed {n} times; last error from "
                       f"{ev.peer or 'peer'}: {ev.error}"))]
        delay = min(self.t.backoff_cap, self.t.backoff_base * 2 ** (n - 1))
        m.retry_at[g] = now + delay * (0.5 + self.rng.random())  # jitter: no thundering herd
        return self._try(job, m, now) + self._feed_hungry(now)

    def _on_PackFailed(self, ev: PackFailed, now: float) -> list[Action]:
        job = self.jobs.get(ev.job)
        if job is None or ev.host not in job.machines:
            return []
        m = job.machines[ev.host]
        m.packing.discard(ev.file)
        if m.ended:
            return []
        if ev.fail != "integrity":
            return [Commit(MachineFailed(job=job.id, host=m.name, reason=ev.error))]
        n = m.pack_failures[ev.file] = m.pack_failures.get(ev.file, 0) + 1
        if n >= 3:
            return [Commit(MachineFailed(job=job.id, host=m.name,
                                         reason=f"{ev.error} ({n} times)"))]
        chunks = tuple(g - job.base[ev.file] for g in sorted(m.have)
                       if job.where[g][0] == ev.file)
        return [Commit(ChunksLost(job=job.id, host=m.name, file=ev.file, chunks=chunks,
                                  reason=ev.error))]

    def _on_CommandUndelivered(self, ev: CommandUndelivered, now: float) -> list[Action]:
        job = self.jobs.get(ev.job)
        if job is None or ev.host not in job.machines:
            return []
        m = job.machines[ev.host]
        for f, c in ev.fetches:
            if f < len(job.files) and c < job.file_chunks(f):
                self._release(job, m, job.base[f] + c)
        if ev.pack_file >= 0:
            m.packing.discard(ev.pack_file)
        if ev.pack_file == -2:
            m.hook_sent = False
        m.last_error = ev.error
        # No retry now: the tick retries once the host answers heartbeats again.
        return []

    def _on_Tick(self, ev: Tick, now: float) -> list[Action]:
        actions: list[Action] = []
        for h in self.hosts.values():
            if h.alive and now - h.last_seen > self.t.heartbeat_timeout:
                h.alive = False
                self.dirty_hosts.add(h.name)
                actions += self._host_lost(h, now, penalise=False)
        for job in list(self.jobs.values()):
            if job.state != "running":
                continue
            actions += self._check_job_deadlines(job, now)
        actions += self._schedule_all(now)
        expired = tuple(j.id for j in self.jobs.values()
                        if j.finished is not None and now - j.finished > self.t.retention)
        if expired:
            actions.append(Commit(JobsExpired(jobs=expired)))
        return actions

    def _check_job_deadlines(self, job: Job, now: float) -> list[Action]:
        actions: list[Action] = []
        for m in job.machines.values():
            if m.ended:
                continue
            for g, (peer, since) in list(m.inflight.items()):
                if now - since > self.t.fetch_timeout:
                    f, c = job.where[g]
                    actions += self._on_FetchFailed(FetchFailed(
                        job=job.id, host=m.name, file=f, chunk=c, peer=peer, fail="timeout",
                        error=f"no answer within {self.t.fetch_timeout:.0f} s"), now)
            h = self.hosts.get(m.name)
            if h is not None and not h.alive and h.last_seen and \
                    now - h.last_seen > self.t.heartbeat_timeout + self.t.grace_period:
                actions.append(Commit(MachineFailed(
                    job=job.id, host=m.name,
                    reason=f"unreachable since {clock_time(h.last_seen)} UTC "
                           f"(no heartbeat for {now - h.last_seen:.0f} s)")))
        # Chunks that exist only on a source that is gone.
        src = self.hosts.get(job.source)
        source_gone = src is None or not job.source_ok or (
            not src.alive and (not src.last_seen or
                               now - src.last_seen > self.t.heartbeat_timeout + self.t.grace_period))
        if source_gone:
            orphans = [g for g in range(job.nchunks)
                       if not any(self.hosts.get(n) is not None and self.hosts[n].alive
                                  for n in job.holders[g])
                       and job.inflight_count[g] == 0
                       and any(g not in m.have for m in job.machines.values() if not m.ended)]
            if orphans:
                gone_at = clock_time(src.last_seen) + " UTC" if src and src.last_seen else "start"
                why = ("lost its snapshot" if src is not None and src.alive
                       else f"unreachable since {gone_at}")
                reason = (f"source {job.source} {why} and {len(orphans)} chunk(s) exist on no "
                          f"other live machine")
                for m in job.machines.values():
                    if not m.ended and any(g not in m.have for g in orphans):
                        actions.append(Commit(MachineFailed(job=job.id, host=m.name,
                                                            reason=reason)))
        return actions

    def _on_Recovered(self, ev: Recovered, now: float) -> list[Action]:
        for h in self.hosts.values():
            # Give every known daemon one heartbeat timeout to show up again.
            h.alive, h.last_seen, h.want_inventory = False, now, True
            h.uploads = h.downloads = 0
        for job in self.jobs.values():
            job.inflight_count = [0] * job.nchunks
            for m in job.machines.values():
                m.inflight.clear()
                m.packing.clear()
                m.hook_sent = False
        return []

    # ------------------------------------------------------------------ mechanics

    def _add_chunk(self, job: Job, m: Machine, g: int, now: float, count_bytes: bool = True) -> None:
        m.have.add(g)
        f = job.where[g][0]
        m.file_have[f] += 1
        if m.name != job.source:  # the source serves only as the peer of last resort
            job.holders[g].add(m.name)
        m.bytes_done += job.chunk_size_of(g)
        if count_bytes:
            m.history.append((now, m.bytes_done))

    def _release(self, job: Job, m: Machine, g: int) -> None:
        """Free the slots of an in-flight fetch of chunk g to machine m."""
        entry = m.inflight.pop(g, None)
        if entry is None:
            return
        peer = entry[0]
        job.inflight_count[g] -= 1
        t = self.hosts.get(m.name)
        if t is not None and t.downloads > 0:
            t.downloads -= 1
        p = self.hosts.get(peer)
        if p is not None and p.uploads > 0:
            p.uploads -= 1
        if t is not None and (job.id, m.name) not in self.hungry and not m.ended:
            self.hungry[(job.id, m.name)] = None

    def _host_lost(self, h: HostState, now: float, penalise: bool) -> list[Action]:
        """Cancel every assignment to or from ``h``; rescheduling happens at once."""
        touched: list[tuple[Job, Machine]] = []
        for job in self.jobs.values():
            if job.state != "running":
                continue
            for m in job.machines.values():
                if m.name == h.name:
                    for g in list(m.inflight):
                        self._release(job, m, g)
                    m.packing.clear()
                    m.hook_sent = False
                    continue
                for g, (peer, _) in list(m.inflight.items()):
                    if peer == h.name:
                        self._release(job, m, g)
                        touched.append((job, m))
        actions: list[Action] = []
        for job, m in touched:
            if not m.ended:
                actions += self._try(job, m, now)
        return actions

    def _fail_machine(self, job: Job, m: Machine, reason: str, now: float) -> list[Action]:
        if m.ended:
            return []
        for g in list(m.inflight):
            self._release(job, m, g)
        m.ended, m.error, m.error_at, m.finished = "failed", reason, now, now
        self.hungry.pop((job.id, m.name), None)
        self.dirty_jobs.add(job.id)
        return self._maybe_end(job, now)

    def _maybe_end(self, job: Job, now: float) -> list[Action]:
        if job.state != "running" or any(not m.ended for m in job.machines.values()):
            return []
        job.state = "done" if all(m.ended == "done" for m in job.machines.values()) else "failed"
        job.finished = now
        for m in job.machines.values():
            self.hungry.pop((job.id, m.name), None)
        self.dirty_jobs.add(job.id)
        return [JobEnded(job=job.id, state=job.state)]

    def _schedule_all(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for job in list(self.jobs.values()):
            if job.state != "running":
                continue
            for m in job.machines.values():
                if not m.ended:
                    actions += self._try(job, m, now)
        return actions

    def _feed_hungry(self, now: float) -> list[Action]:
        """Offer freed capacity to machines that were waiting for a peer."""
        actions: list[Action] = []
        misses = 0
        for key in list(self.hungry):
            if misses >= self.t.hungry_tries:
                break
            job = self.jobs.get(key[0])
            if job is None or job.state != "running" or key[1] not in job.machines:
                self.hungry.pop(key, None)
                continue
            got = self._try(job, job.machines[key[1]], now)
            if got:
                actions += got
                misses = 0
            else:
                misses += 1
            if key in self.hungry:  # move to the back: fairness among waiters
                del self.hungry[key]
                self.hungry[key] = None
        return actions

    def _try(self, job: Job, m: Machine, now: float) -> list[Action]:
        """Give machine m whatever work it can take now: fetches, packs, its hook."""
        if m.ended or job.state != "running":
            self.hungry.pop((job.id, m.name), None)
            return []
        t = self.hosts.get(m.name)
        if t is None or not t.alive:
            return []
        actions: list[Action] = []
        # Packs for files whose chunks are all here.
        for f in range(len(job.files)):
            if (f not in m.packed and f not in m.packing
                    and m.file_have[f] == job.file_chunks(f)):
                m.packing.add(f)
                fs = job.files[f]
                remaining = len(job.files) - len(m.packed) - len(m.packing)
                actions.append(Pack(job=job.id, target=m.name, address=t.address,
                                    file=StagedFile(file=f, dest=fs.dest, size=fs.size,
                                                    xxh3=fs.xxh3),
                                    chunk_size=job.chunk_size, notify="", last=remaining == 0,
                                    files_total=len(job.files)))
        if job.notify and len(m.packed) == len(job.files) and not m.hook_sent:
            m.hook_sent = True
            actions.append(Pack(job=job.id, target=m.name, address=t.address,
                                file=StagedFile(file=0, dest="", size=0, xxh3="0" * 16),
                                chunk_size=job.chunk_size, notify=job.notify, last=True,
                                files_total=len(job.files)))
        free = t.max_downloads - t.downloads
        missing = job.nchunks - len(m.have) - len(m.inflight)
        if free <= 0 or missing <= 0:
            if missing <= 0:
                self.hungry.pop((job.id, m.name), None)
            return actions
        rng = self.rng
        need = [g for g in range(job.nchunks)
                if g not in m.have and g not in m.inflight and m.retry_at.get(g, 0.0) <= now]
        # Rarest first: fewest holders plus copies already on their way.
        need.sort(key=lambda g: (len(job.holders[g]) + job.inflight_count[g], rng.random()))
        fetches: list[Fetch] = []
        files: dict[int, StagedFile] = {}
        for g in need:
            if free <= 0:
                break
            peer = self._pick_peer(job, m, g)
            if peer is None:
                continue
            f, c = job.where[g]
            off, size = chunk_span(job.files[f].size, job.chunk_size, c)
            m.inflight[g] = (peer.name, now)
            job.inflight_count[g] += 1
            t.downloads += 1
            peer.uploads += 1
            free -= 1
            if peer.name == job.source:
                job.source_sends[g] += 1
            fetches.append(Fetch(file=f, chunk=c, offset=off, size=size,
                                 xxh3=job.files[f].chunks[c], peer=peer.address,
                                 peer_name=peer.name))
            if f not in files:
                fs = job.files[f]
                files[f] = StagedFile(file=f, dest=fs.dest, size=fs.size, xxh3=fs.xxh3)
        if fetches:
            self.dirty_jobs.add(job.id)
            actions.append(AssignFetch(job=job.id, target=m.name, address=t.address,
                                       files=tuple(files.values()), fetches=tuple(fetches)))
        if free > 0 and len(need) > len(fetches):
            self.hungry[(job.id, m.name)] = None
        else:
            self.hungry.pop((job.id, m.name), None)
        return actions

    def _pick_peer(self, job: Job, m: Machine, g: int) -> HostState | None:
        hosts = self.hosts
        holders = [hosts[n] for n in job.holders[g] if n in hosts]
        avoid = m.avoid
        exclude = m.last_failed_peer.get(g, "")
        cands = placement.filter_peers(holders, m.name, avoid, exclude)
        cands = [h for h in cands if h.bad_serves < 3]
        best = placement.rank(cands, source=job.source, avoid=avoid, rng=self.rng,
                              w=self.weights)
        if best is not None:
            return best  # type: ignore[return-value]
        # The source is the peer of last resort: once per chunk, again when no
        # other copy is alive or on its way (a holder died), or to retry a chunk
        # whose only other holder just failed this target.
        src = hosts.get(job.source)
        src_ok = not (src is None or not job.source_ok or not src.alive or src.name == m.name
                      or src.uploads >= src.max_uploads
                      or avoid.get(src.name, 0) >= placement.AVOID_AFTER_FAILURES)
        if src_ok:
            if job.source_sends[g] < self.t.source_copies or exclude:
                return src
            alive_copy = any(hosts[n].alive for n in job.holders[g] if n in hosts)
            if not alive_copy and job.inflight_count[g] == 0:
                return src
        if exclude:
            # Nobody else can serve it: give the failed peer another chance (after
            # the backoff) rather than stall.
            cands = placement.filter_peers(holders, m.name, avoid)
            return placement.rank(cands, source=job.source, avoid=avoid,  # type: ignore
                                  rng=self.rng, w=self.weights)
        return None

    # ------------------------------------------------------------------ queries

    def live_jobs_for(self, host: str) -> list[str]:
        return [j.id for j in self.jobs.values()
                if j.state == "running" and (j.source == host or host in j.machines)]

    def snapshot(self) -> dict[str, Any]:
        """The durable state, canonical (sorted) so two snapshots compare equal."""
        jobs = {}
        for j in sorted(self.jobs):
            job = self.jobs[j]
            ms = {}
            for n in sorted(job.machines):
                m = job.machines[n]
                per_file: Any = [sorted(g - job.base[f] for g in m.have if job.where[g][0] == f)
                                 for f in range(len(job.files))]
                if len(m.have) == job.nchunks:
                    per_file = "all"  # most machines of most retained jobs: keep it small
                ms[n] = {"have": per_file, "packed": sorted(m.packed), "ended": m.ended,
                         "error": m.error, "error_at": m.error_at, "finished": m.finished,
                         "hook": m.hook}
            jobs[j] = {"created": job.created, "source": job.source,
                       "files": [f.to_json() for f in job.files], "targets": list(job.targets),
                       "chunk_size": job.chunk_size, "callback": job.callback,
                       "notify": job.notify, "state": job.state, "finished": job.finished,
                       "callback_state": dict(job.callback_state), "machines": ms}
        hosts = {n: {"address": h.address, "labels": list(h.labels), "boot_id": h.boot_id}
                 for n, h in sorted(self.hosts.items())}
        return {"jobs": jobs, "hosts": hosts}

    def restore(self, snap: dict[str, Any]) -> None:
        """Load a checkpoint written by ``snapshot()`` (soft state starts empty)."""
        self.hosts.clear()
        self.jobs.clear()
        for n, h in snap["hosts"].items():
            self.hosts[n] = HostState(name=n, address=h["address"], labels=tuple(h["labels"]),
                                      boot_id=h["boot_id"], max_uploads=self.t.max_uploads,
                                      max_downloads=self.t.max_downloads)
        for jid, j in snap["jobs"].items():
            files = tuple(FileSpec.from_json(f) for f in j["files"])
            ev = JobSubmitted(job=jid, source=j["source"], files=files,
                              targets=tuple(j["targets"]), chunk_size=j["chunk_size"],
                              callback=j["callback"], notify=j["notify"])
            # Build the structure without scheduling (no host is alive yet).
            self._on_JobSubmitted(ev, j["created"])
            job = self.jobs[jid]
            job.state, job.finished = j["state"], j["finished"]
            job.callback_state = dict(j["callback_state"])
            for n, ms in j["machines"].items():
                m = job.machines[n]
                m.have.clear()
                m.file_have = [0] * len(files)
                m.bytes_done = 0
                for g in range(job.nchunks):
                    job.holders[g].discard(n)
                held = (range(job.nchunks) if ms["have"] == "all" else
                        [job.base[f] + c for f, chunks in enumerate(ms["have"]) for c in chunks])
                for g in held:
                    self._add_chunk(job, m, g, j["created"], count_bytes=False)
                m.packed = set(ms["packed"])
                m.ended, m.error, m.error_at = ms["ended"], ms["error"], ms["error_at"]
                m.finished, m.hook = ms["finished"], ms["hook"]
                m.history.clear()
        self.hungry.clear()


def _under(path: str, directory: str) -> bool:
    directory = directory.rstrip("/") or "/"
    return directory == "/" or path == directory or path.startswith(directory + "/")
