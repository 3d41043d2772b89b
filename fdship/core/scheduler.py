"""The scheduler: all global state and every decision, as a pure state machine.

``Scheduler.handle(event, now)`` applies one event and returns the actions to
carry out.  The center's runner is its only caller in production; the REDO log
replays durable events through the same method; ``fdship simulate`` and the
scenario tests drive it with simulated hosts.

How a job flows: ``JobSubmitted`` creates one ``Machine`` per target.  Work is
matched from both ends, and every match is a chunk the target lacks, rarest
first (fewest holders plus copies in flight):

* a host with a free upload slot *volunteers* (``_serve``): it offers its
  rarest chunk to the targets waiting longest for one.  The source offers
  each chunk once, each to a different target (the one with the most spare
  capacity to hand it on), so first copies spread out instead of piling up
  on whichever target asked first; near the end it may send a few more
  copies of the rarest chunks (``source_extra``);
* a target with a free download slot *asks* (``_try``): for its rarest
  missing chunks it takes the best free holder chosen by
  :mod:`fdship.core.placement` (the source is a peer of last resort).

An ``ACK`` (``ChunkStored``) frees one upload and one download slot: the
peer's slot is offered first, then the target's is filled, then the target,
now a holder, offers the chunk it just got.  So a fresh chunk is passed on
within one round trip, and copies multiply by doubling.  Targets that could
not be given work wait in ``Job.hungry``; ticks retry a bounded number of
them and any whose backoff expired, so no event costs O(hosts).  When a
target holds every chunk of a file the core returns ``Pack``; ``FilePacked``
(a FIN) for every file ends the machine (after its notify hook, if any); when
every machine has ended the job ends.

State is split in two (see :mod:`fdship.core.events`): durable state changes
only by handling durable events, so a replay of the log rebuilds it exactly
(``snapshot()`` is what a test compares); soft state (liveness, load,
assignments in flight, retry counters) starts empty after a restart and is
rebuilt from heartbeats within seconds.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

from fdship.core import placement
from fdship.core.actions import Action, AssignFetch, Commit, JobEnded, Pack
from fdship.core.schedules import Schedules
from fdship.core.events import (CallbackDelivered, ChunksLost, ChunkStored, CommandUndelivered,
                                Event, FetchDraining, FetchFailed, FilePacked, HookFinished, HostRegistered,
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
    # Waiting targets tried per job on every tick (they are also served as soon
    # as a holder frees a slot; this only sweeps up what no event woke).
    hungry_tries: int = 64
    # How much of each host's uplink and downlink the scheduler fills, counted in
    # transfers that would each run at the full rate of the link (within the
    # hosts' own caps on concurrent transfers, max_uploads / max_downloads).
    # One: a chunk sent at the full rate of a link reaches the next host, which
    # can pass it on, twice as soon as one sent beside another, and that is
    # what lets copies multiply by doubling.  A transfer that can only run at a
    # fraction of a link's rate (a fast target fed by a slow peer) counts as
    # that fraction, so the link takes more of them until it is full.
    upload_budget: float = 1.0
    download_budget: float = 1.0
    # Besides one copy of every chunk, the source may send this fraction of the
    # file's chunks a second time, to targets waiting on the rarest chunks once
    # every chunk is out (the end game).
    source_extra: float = 0.1
    # Waiting targets a volunteering peer looks at.
    serve_sample: int = 12
    # Cut-through: a daemon that is still receiving a chunk may pass it on (it
    # streams the bytes as they land), so a chunk need not arrive whole at a
    # host before the next one can start on it.  This is how many hosts a chunk
    # may pass through in one such chain (0: only hosts holding a chunk verified
    # serve it).  A chain runs at its slowest link (so none passes a link known
    # to be slow) and a failure anywhere in it fails every fetch below, so
    # chains are bounded.  Measured on 10-20 shaped hosts (docs/benchmarks.md):
    # 4 hops gave 1.27-1.43 x the lower bound, 16 gave 1.17-1.33, 64 gave
    # 1.20-1.25; 16 keeps a failure's reach to 15 fetches.
    stream_depth: int = 16


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
    app_cpu: float = 0.0  # the watched app's CPU (watch_pidfile), percent of one core
    app_cpu_busy: float = placement.APP_BUSY  # ...at which the host is fully busy
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
    # Uploads whose target said they are about to end (FetchDraining): no
    # longer counted in ``uploads`` (their link share is nearly spent), but
    # the peer still serves them until the ack, so they count against its
    # hard cap on concurrent uploads (max_uploads).
    draining_uploads: int = 0
    draining_downloads: int = 0  # the same at the receiving end
    # Link-share clocks (soft): the integral over time of 1 / (transfers on the
    # link) while it carries any, advanced on every change of the counts.  A
    # transfer's share of a link over its life is the clock's difference
    # across it, so a rate sample can be scaled to the whole link even when
    # the transfers beside it came and went mid-way.
    up_clock: float = 0.0
    down_clock: float = 0.0
    clock_at: float = 0.0
    reported_uploads: int = 0
    reported_downloads: int = 0
    bytes_served: int = 0
    bytes_received: int = 0
    version: str = ""
    streams: bool = False  # serves chunks still arriving (its heartbeat says so)
    want_inventory: bool = True
    # A pull or pack to it was not delivered since its last heartbeat (it
    # crashed, or its port is refused): it gets no new work until it answers
    # a heartbeat again, instead of a pull per scheduling decision, dozens a
    # second, until the heartbeat timeout declares it dead.
    undeliverable: bool = False
    bad_serves: int = 0  # chunks from this host that failed their hash
    # Estimated uplink and downlink (bytes/s) from the chunks this host served
    # and fetched: the best recent rate of a transfer that had the link to
    # itself (``_observe``), so a lower bound.
    up_rate: float = 0.0
    down_rate: float = 0.0
    # The daemon's own rate caps (its heartbeat; 0: none).  Until a transfer
    # measures a capped end, its estimate is the cap (``seeded``); after, the
    # cap still bounds it.  See ``_cap_links``.
    up_cap: float = 0.0
    down_cap: float = 0.0
    up_seeded: bool = False
    down_seeded: bool = False
    # Fractions of the uplink and downlink the assigned transfers are expected to use.
    up_load: float = 0.0
    down_load: float = 0.0


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
    # Per in-flight chunk: the peer, when it was assigned, and the peer's
    # up_clock and this target's down_clock then.
    inflight: dict[int, tuple[str, float, float, float]] = field(default_factory=dict)
    # Per in-flight chunk: the share of the peer's uplink and of our downlink it holds.
    loads: dict[int, tuple[float, float]] = field(default_factory=dict)
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
    # Targets with a free download slot that could not be given work (FIFO).
    # An OrderedDict, not a dict: entries move to the back all the time, and a
    # plain dict's iteration would wade through the holes they leave behind.
    hungry: OrderedDict[str, None] = field(default_factory=OrderedDict)
    # Chunks the source has not sent yet, in the order it will offer them.
    unsent: dict[int, None] = field(default_factory=dict)
    # Chunks whose every other copy died with its host: the source sends them again.
    resend: set[int] = field(default_factory=set)
    stall_check_at: float = 0.0  # when _guard_stalls last looked at this job
    source_extra_left: int = 0
    # Per chunk, its holders as a list, to sample from when there are thousands.
    holder_list: list[list[str]] = field(default_factory=list)
    # Per chunk, the targets receiving it now from a peer that may be relayed
    # through them (cut-through), with their place in the chain: 1 when
    # their peer holds the chunk, one more than their peer's otherwise.
    streaming: list[dict[str, int]] = field(default_factory=list)

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
        self.running: dict[str, Job] = {}
        # Alive hosts with an upload slot free (by the slot policy), in no order.
        self.free_up: dict[str, None] = {}
        # (time, job, machine): targets to try again when a chunk's backoff ends.
        self.wakeups: list[tuple[float, str, str]] = []
        # Mean CPU of the fleet (moving average over heartbeats): busyness is
        # measured against it.
        self.fleet_cpu = 0.0
        # The downlink of the fleet's fast hosts (bytes/s), as measured.
        self.ref_rate = 0.0
        self._cap_ref: dict[str, float] | None = None  # _fast_rate's answers from caps alone
        self._now = 0.0
        self.pending_beats: dict[str, Any] = {}
        self.dirty_jobs: set[str] = set()
        self.dirty_hosts: set[str] = set()
        self.weights = placement.DEFAULT_WEIGHTS
        # Recurring pushes: their own events, and a look at every other one.
        self.schedules = Schedules(self)

    # ------------------------------------------------------------------ dispatch

    def handle(self, event: Event, now: float) -> list[Action]:
        self._now = now  # for the link-share clocks (see ``_advance``)
        method = getattr(self, "_on_" + type(event).__name__, None)
        if method is None:  # a schedule's own event
            return self.schedules.handle(event, now)
        return self.schedules.after(event, method(event, now), now)

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
        if req.schedule:
            self.schedules.check_tag(req.schedule)
        return JobSubmitted(job=job_id, source=req.source, files=req.files,
                            targets=tuple(targets), chunk_size=req.chunk_size,
                            callback=req.callback, notify=req.notify, failed=tuple(failed),
                            schedule=req.schedule)

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
                  source_sends=[0] * len(where), unsent=dict.fromkeys(range(len(where))),
                  source_extra_left=int(self.t.source_extra * len(where)),
                  holder_list=[[] for _ in where], streaming=[{} for _ in where])
        if ev.callback:
            job.callback_state = {"url": ev.callback, "state": "pending", "attempts": 0,
                                  "error": None}
        self.jobs[ev.job] = job
        self.running[ev.job] = job
        self.dirty_jobs.add(ev.job)
        actions: list[Action] = []
        for n, reason in ev.failed:
            actions += self._fail_machine(job, machines[n], reason, now)
        if ev.source in machines and not machines[ev.source].ended:
            # The source is also a target: it already holds every chunk in its store.
            m = machines[ev.source]
            for g in range(job.nchunks):
                self._add_chunk(job, m, g, now, count_bytes=False)
        # Packs for what needs no fetch (empty files); everyone else waits for
        # the source to hand out first copies, one chunk to each of as many
        # targets as it has slots, rather than to whoever asked first.
        for m in machines.values():
            if m.ended:
                continue
            t = self.hosts.get(m.name)
            if t is not None and t.alive:
                actions += self._packs(job, m, t)
            if len(m.have) < job.nchunks:
                job.hungry[m.name] = None
        actions += self._serve(self.hosts.get(job.source), now)
        actions += self._feed_hungry(now, job)
        actions += self._maybe_end(job, now)
        return actions

    def _chunk_of(self, ev: ChunkStored | FetchFailed | FetchDraining
                  ) -> tuple[Job, Machine, int] | None:
        """The job, machine and global chunk index an event about one chunk names,
        or None when it names no running part of a job (a stale or bogus report)."""
        job = self.jobs.get(ev.job)
        if job is None or ev.host not in job.machines or not 0 <= ev.file < len(job.files):
            return None
        if not 0 <= ev.chunk < job.file_chunks(ev.file):
            return None
        return job, job.machines[ev.host], job.base[ev.file] + ev.chunk

    def _on_ChunkStored(self, ev: ChunkStored, now: float) -> list[Action]:
        found = self._chunk_of(ev)
        if found is None:
            return []
        job, m, g = found
        entry = m.inflight.get(g)
        peer = self.hosts.get(entry[0]) if entry is not None else None
        if entry is not None:
            # The target's own timing of the transfer, when it gave one that
            # fits inside the center's (a report claiming more cannot be right).
            dt = now - entry[1]
            if 0 < ev.seconds < dt:
                dt = ev.seconds
            # A relayed chunk (its peer was still receiving it) came no faster
            # than the chain above: only a fast one says something of these links.
            relayed = bool(job.streaming) and job.streaming[g].get(m.name, 1) > 1 or (
                peer is not None and self._relaying(job, g, peer.name))
            self._observe(job, m, g, peer, entry[1], dt, entry[2], entry[3], relayed)
        self._release(job, m, g, ok=True)
        actions: list[Action] = []
        if m.ended or g in m.have:
            actions += self._serve(peer, now)
            return actions + (self._try(job, m, now) if not m.ended else [])
        m.retry_at.pop(g, None)
        self._add_chunk(job, m, g, now)
        self.dirty_jobs.add(job.id)
        # The peer's freed slot goes to whoever waited longest; then the target
        # fills its own slot; then the target, now a holder, hands the chunk on.
        actions += self._serve(peer, now)
        actions += self._try(job, m, now)
        actions += self._serve(self.hosts.get(m.name), now)
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
                    self._drop_holder(job, g, m.name)
                    m.bytes_done -= job.chunk_size_of(g)
        m.packed.discard(ev.file)
        m.packing.discard(ev.file)
        self.dirty_jobs.add(job.id)
        return self._try(job, m, now, full=True) if not m.ended else []

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
            self.running.pop(j, None)
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
        was_alive = h.alive and not h.undeliverable  # either way it comes back now
        h.alive, h.last_seen, h.undeliverable = True, now, False
        ld = b.load
        h.cpu, h.loadavg, h.net_tx, h.net_rx, h.disk_busy = (ld.cpu, ld.loadavg, ld.net_tx,
                                                             ld.net_rx, ld.disk_busy)
        # The app the host exists to run (the bidder) counts as load of its own:
        # placement.busyness reads it beside the host-wide CPU.
        h.app_cpu = ld.app_cpu
        h.app_cpu_busy = ld.app_cpu_busy
        h.net_tx_peak = max(h.net_tx_peak * 0.999, ld.net_tx)
        h.reported_uploads, h.reported_downloads = ld.uploads, ld.downloads
        h.bytes_served, h.bytes_received = ld.bytes_served, ld.bytes_received
        h.free, h.allow_dest, h.hooks = dict(b.free), tuple(b.allow_dest), tuple(b.hooks)
        h.max_uploads, h.max_downloads, h.version = b.max_uploads, b.max_downloads, b.version
        h.streams = b.streams
        if not was_alive or (b.upload_rate, b.download_rate) != (h.up_cap, h.down_cap):
            self._cap_ref = None  # the live hosts' caps changed: _fast_rate asks again
        self._cap_links(h, b.upload_rate, b.download_rate)
        # A moving average over beats weighs hosts about equally whatever their number.
        self.fleet_cpu += (ld.cpu - self.fleet_cpu) * min(1.0, 2.0 / max(1, len(self.hosts)))
        self._upd_free(h)
        self.dirty_hosts.add(h.name)
        actions: list[Action] = []
        if b.inventory is not None:
            actions += self._reconcile(h, b.inventory, now)
            h.want_inventory = False
        if not was_alive:
            actions += self._host_up(h, now)
        elif h.name in self.free_up:
            actions += self._serve(h, now)  # its load may have dropped enough to volunteer
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
        found = self._chunk_of(ev)
        if found is None:
            return []
        job, m, g = found
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
        # A peer that did not hold the chunk was relaying it (cut-through):
        # when its own fetch broke, every fetch below it broke too, through no
        # fault of its own, so it is not avoided for it.  A relay's bad bytes
        # still count against it, as anyone's do.
        relayed = self._relaying(job, g, ev.peer)
        if ev.peer and not relayed:
            m.avoid[ev.peer] = m.avoid.get(ev.peer, 0) + 1
            m.last_failed_peer[g] = ev.peer
        if ev.peer and ev.fail == FAIL_HASH and ev.peer in self.hosts:
            self.hosts[ev.peer].bad_serves += 1
        if n >= self.t.max_attempts:
            return [Commit(MachineFailed(
                job=job.id, host=m.name,
                reason=f"chunk {ev.chunk} of {path} failed {n} times; last error from "
                       f"{ev.peer or 'peer'}: {ev.error}"))]
        delay = min(self.t.backoff_cap, self.t.backoff_base * 2 ** (n - 1))
        m.retry_at[g] = at = now + delay * (0.5 + self.rng.random())  # jitter: no thundering herd
        heapq.heappush(self.wakeups, (at, job.id, m.name))
        peer = self.hosts.get(ev.peer)
        return self._try(job, m, now, full=True) + self._serve(peer, now)

    def _on_FetchDraining(self, ev: FetchDraining, now: float) -> list[Action]:
        """Both ends of a fetch are about to fall idle: give them their next work now.

        The chunk stays in flight (it is not held until its ack), so nobody
        fetches it twice and a failure still retries it; only the two slots go
        back, to be filled while the last bytes arrive.  For a moment each end
        then runs two transfers, which share the link: the link never idles
        for the round trip (ack, decision, pull, request) between two chunks.
        """
        found = self._chunk_of(ev)
        if found is None:
            return []
        job, m, g = found
        entry = m.inflight.get(g)
        if entry is None or entry[0] != ev.peer or g not in m.loads:
            return []  # a stale notice: the fetch ended, or another one took its place
        self._free_slots(m, g, ev.peer, draining=True)
        actions = self._serve(self.hosts.get(ev.peer), now)
        if not m.ended:
            actions += self._try(job, m, now)
        return actions

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
                g = job.base[f] + c
                self._release(job, m, g)
                if job.inflight_count[g] == 0 and g not in job.unsent and not any(
                        n in self.hosts and self.hosts[n].alive for n in job.holders[g]):
                    job.resend.add(g)  # its one copy on the way never left the source
        if ev.pack_file >= 0:
            m.packing.discard(ev.pack_file)
        if ev.pack_file == -2:
            m.hook_sent = False
        m.last_error = ev.error
        # No retry now: the host's next heartbeat does (see _apply_beat).
        h = self.hosts.get(ev.host)
        if h is not None:
            h.undeliverable = True
            self.dirty_hosts.add(h.name)
        return []

    def _on_Tick(self, ev: Tick, now: float) -> list[Action]:
        actions: list[Action] = []
        for h in self.hosts.values():
            if h.alive and now - h.last_seen > self.t.heartbeat_timeout:
                h.alive = False
                self._cap_ref = None
                self.dirty_hosts.add(h.name)
                actions += self._host_lost(h, now, penalise=False)
        for job in list(self.running.values()):
            actions += self._check_job_deadlines(job, now)
            if now - job.stall_check_at >= 1.0:
                job.stall_check_at = now
                self._guard_stalls(job)
        # Targets whose backoff ended, then a bounded sweep of those still waiting.
        while self.wakeups and self.wakeups[0][0] <= now:
            _, jid, name = heapq.heappop(self.wakeups)
            woken = self.running.get(jid)
            if woken is not None and name in woken.machines:
                actions += self._try(woken, woken.machines[name], now, full=True)
        actions += self._feed_hungry(now)
        expired = tuple(j.id for j in self.jobs.values()
                        if j.finished is not None and now - j.finished > self.t.retention)
        if expired:
            actions.append(Commit(JobsExpired(jobs=expired)))
        return actions

    def _guard_stalls(self, job: Job) -> None:
        """The safety net under every path that can lose a chunk.

        A chunk that a live target still lacks, with no live holder, no copy in
        flight and not queued at the source, would never be offered again: the
        job would stall for good.  The paths that lose chunks (a host dying, a
        pull not delivered) put them on ``resend`` as it happens; this sweep,
        once a second, catches any path that did not.  Cheap: for almost every
        chunk the first holder looked at is alive.
        """
        hosts = self.hosts
        for g in range(job.nchunks):
            if (job.inflight_count[g] or g in job.unsent or g in job.resend
                    or any(n in hosts and hosts[n].alive for n in job.holders[g])):
                continue
            if any(not m.ended and g not in m.have and m.name in hosts and hosts[m.name].alive
                   for m in job.machines.values()):
                job.resend.add(g)

    def _check_job_deadlines(self, job: Job, now: float) -> list[Action]:
        actions: list[Action] = []
        for m in job.machines.values():
            if m.ended:
                continue
            for g, (peer, since, _, _) in list(m.inflight.items()):
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
            h.uploads = h.downloads = h.draining_uploads = h.draining_downloads = 0
            h.clock_at = now
            h.up_load = h.down_load = 0.0
        self.free_up.clear()
        self.wakeups.clear()
        for job in self.jobs.values():
            job.inflight_count = [0] * job.nchunks
            job.streaming = [{} for _ in range(job.nchunks)]
            job.hungry.clear()
            for m in job.machines.values():
                m.inflight.clear()
                m.loads.clear()
                m.packing.clear()
                m.hook_sent = False
                if not m.ended and job.state == "running":
                    job.hungry[m.name] = None
        return []

    # ------------------------------------------------------------------ mechanics

    def _add_chunk(self, job: Job, m: Machine, g: int, now: float, count_bytes: bool = True) -> None:
        m.have.add(g)
        f = job.where[g][0]
        m.file_have[f] += 1
        # The source serves only as the peer of last resort.
        if m.name != job.source and m.name not in job.holders[g]:
            job.holders[g].add(m.name)
            job.holder_list[g].append(m.name)
        m.bytes_done += job.chunk_size_of(g)
        if count_bytes:
            m.history.append((now, m.bytes_done))

    def _drop_holder(self, job: Job, g: int, name: str) -> None:
        if name in job.holders[g]:
            job.holders[g].discard(name)
            job.holder_list[g] = list(job.holders[g])

    def _advance(self, h: HostState) -> None:
        """Bring h's link-share clocks up to now; call before its counts change."""
        dt = self._now - h.clock_at
        if dt > 0:
            ups = h.uploads + h.draining_uploads
            downs = h.downloads + h.draining_downloads
            if ups:
                h.up_clock += dt / ups
            if downs:
                h.down_clock += dt / downs
        h.clock_at = max(h.clock_at, self._now)

    def _observe(self, job: Job, m: Machine, g: int, peer: HostState | None, since: float,
                 dt: float, up_clock0: float, down_clock0: float,
                 relayed: bool = False) -> None:
        """Learn link speeds from a finished fetch (soft state, for ranking only).

        ``since``: when it was assigned; ``dt``: how long its bytes took;
        ``up_clock0`` / ``down_clock0``: the peer's and the target's link-share
        clocks when it was assigned; ``relayed``: the peer was still receiving
        the chunk, so a hop further up may have held it back.
        """
        size = job.chunk_size_of(g)
        if dt <= 0 or size < 64 * 1024:  # small chunks measure round trips, not links
            return
        rate = size / dt
        t = self.hosts.get(m.name)
        # A sample measures an end only if the transfer had that link (nearly)
        # to itself over its life: its share, from the link-share clocks, is
        # ALONE or more.  Samples are never scaled up by the transfers that
        # shared a link: the center's view of who overlapped whom is off by
        # the round trips at each end, and scaling by it once read an 80
        # Mbit/s link as 125 Mbit/s; every other host then looked slow beside
        # it, and peers were given four uploads at once.  So an estimate is
        # the rate of one real transfer: a lower bound on its link, never more.
        life = self._now - since
        up_alone = down_alone = False
        if peer is not None and life > 0:
            self._advance(peer)
            up_alone = (peer.up_clock - up_clock0) / life >= ALONE
        if t is not None and life > 0:
            self._advance(t)
            down_alone = (t.down_clock - down_clock0) / life >= ALONE
        if not (up_alone or down_alone):
            return
        # One end may have held the transfer back: a sample measures an end
        # only when it is as fast as the fleet's fastest, or when the other
        # end is known to be clearly faster (so this end was the bottleneck).
        # Ambiguous samples (both ends slow, both unknown) teach nothing, so a
        # fast host is never taken for a slow one because its first peer was
        # slow.  An estimate follows the best recent sample, forgotten slowly (5%).
        self.ref_rate = max(0.999 * self.ref_rate, rate)
        both = up_alone and down_alone and not relayed
        down_known = t.down_rate if t is not None else 0.0
        up_known = peer.up_rate if peer is not None else 0.0
        if peer is not None and up_alone and (rate >= 0.8 * self.ref_rate or
                                              (both and down_known >= 1.5 * rate)):
            self._learn(peer, "up", rate)
        if t is not None and down_alone and (rate >= 0.8 * self.ref_rate or
                                             (both and up_known >= 1.5 * rate)):
            self._learn(t, "down", rate)
        elif (peer is not None and up_alone and down_alone and up_known <= 0
              and down_known <= 0 and rate < SLOWER * self.ref_rate):
            # Slow with each link to itself, and neither end known: one of
            # them is slow.  The peer's uplink is taken for it, provisionally
            # (its first fast transfer corrects it): otherwise the same slow
            # peer may serve the same target for ever, each sample as
            # ambiguous as the last, while the target's next peer tells its
            # own downlink apart.  (A shared link proves nothing: counting
            # those marked fast peers slow by the dozen at 500 hosts.)
            peer.up_rate = rate

    def _cap_links(self, h: HostState, up_cap: float, down_cap: float) -> None:
        """Take a host's reported rate caps into its link estimates.

        A cap is the operator's word that the link will carry no more: an
        unmeasured end starts at its cap (so a capped target is not made the
        first copy or a relay for fast ones before its first chunk shows how
        slow it is), and a measured one never counts above it.  The first
        real sample replaces a seeded estimate outright, since the link may
        be slower than its cap.  A cap lifted takes its seed with it.
        """
        for end, cap in (("up", up_cap), ("down", down_cap)):
            rate, seeded = getattr(h, f"{end}_rate"), getattr(h, f"{end}_seeded")
            if cap > 0 and (rate <= 0 or rate > cap or seeded):
                rate, seeded = cap, True
            elif cap <= 0 and seeded:
                rate, seeded = 0.0, False
            setattr(h, f"{end}_rate", rate)
            setattr(h, f"{end}_seeded", seeded)
            setattr(h, f"{end}_cap", cap)

    def _learn(self, h: HostState, end: str, rate: float) -> None:
        """Fold an accepted sample into ``h``'s ``end`` ('up'/'down') estimate."""
        cap = getattr(h, f"{end}_cap")
        if getattr(h, f"{end}_seeded"):
            new = rate  # a measurement beats the cap's guess
            setattr(h, f"{end}_seeded", False)
        else:
            new = max(rate, 0.95 * getattr(h, f"{end}_rate"))
        setattr(h, f"{end}_rate", min(new, cap) if cap > 0 else new)

    def _fast_rate(self, end: str) -> float:
        """The rate against which an ``end`` ('up'/'down') link counts as slow:
        the fleet's fastest measured transfer; before any, unbounded while some
        live host has no cap on that end (a capped one is then the slower
        kind), else the highest cap on it."""
        if self.ref_rate > 0:
            return self.ref_rate
        if self._cap_ref is None:  # live hosts or their caps changed since last asked
            self._cap_ref = {}
            for e in ("up", "down"):
                caps = [getattr(h, f"{e}_cap") for h in self.hosts.values() if h.alive]
                self._cap_ref[e] = 0.0 if not caps else math.inf if min(caps) <= 0 \
                    else max(caps)
        return self._cap_ref[end]

    def _is_slow(self, rate: float, end: str) -> bool:
        return 0 < rate < SLOWER * self._fast_rate(end)

    def _slow(self, t: HostState) -> bool:
        """A target whose downlink is well below the fleet's fast ones."""
        return self._is_slow(t.down_rate, "down")

    def _upd_free(self, h: HostState) -> None:
        """Keep ``free_up`` = alive hosts that can take one more upload now."""
        if (h.alive and h.uploads < placement.upload_slots(h, h.max_uploads, self.fleet_cpu)
                and h.uploads + h.draining_uploads < max(1, h.max_uploads)
                and h.up_load <= self.t.upload_budget - FULL_ENOUGH):
            self.free_up[h.name] = None
        else:
            self.free_up.pop(h.name, None)

    def _worth(self, job: Job, m: Machine, t: HostState, peer: HostState) -> bool:
        """Whether a transfer from ``peer`` would not hold ``m`` up.

        A peer much slower than the target's downlink is used only while the
        target has enough other chunks to fetch that the slow one arrives
        before the rest would anyway; near its end a target waits for a fast
        holder instead of taking its last chunks at a crawl.
        """
        down = self._down_guess(t)
        if peer.up_rate <= 0 or down <= 0 or peer.up_rate >= 0.5 * down:
            return True
        missing = job.nchunks - len(m.have) - len(m.inflight)
        return missing * peer.up_rate >= down

    def _down_guess(self, t: HostState) -> float:
        """Target ``t``'s downlink as far as known; one not measured yet counts
        as fast, like most hosts (a peer known to be slow is then no better a
        choice for it than for a fast one)."""
        return t.down_rate if t.down_rate > 0 else self.ref_rate

    def _down_free(self, t: HostState) -> bool:
        """Whether target ``t`` can take one more download now."""
        return (t.downloads < max(1, t.max_downloads)
                and t.down_load <= self.t.download_budget - FULL_ENOUGH)

    def _release(self, job: Job, m: Machine, g: int, ok: bool = False) -> None:
        """Forget the in-flight fetch of chunk g to machine m, freeing its slots.

        Unless the chunk arrived (``ok``), whoever was relayed the chunk
        through m will not get it either: they stop counting as relays, so
        nobody new joins a chain that is about to break (and m, sent to fetch
        the chunk again, cannot be pointed at a host whose bytes come from m).
        """
        entry = m.inflight.pop(g, None)
        if entry is None:
            return
        job.inflight_count[g] -= 1
        if job.streaming and job.streaming[g].pop(m.name, None) is not None and not ok:
            self._orphan_relays(job, g, m.name)
        self._free_slots(m, g, entry[0])

    def _orphan_relays(self, job: Job, g: int, name: str) -> None:
        """Drop from ``streaming[g]`` every target whose copy of g flows through ``name``."""
        streaming, machines = job.streaming[g], job.machines
        below = [name]
        while below and streaming:
            up = below.pop()
            for n in [n for n in streaming if (e := machines[n].inflight.get(g)) and e[0] == up]:
                del streaming[n]
                below.append(n)

    @staticmethod
    def _relaying(job: Job, g: int, peer: str) -> bool:
        """Whether ``peer`` serves chunk g as it arrives there (cut-through): it is
        neither the source nor a holder.  The one rule for "was this relayed?"."""
        return peer != job.source and peer not in job.holders[g]

    def _relays(self, job: Job, g: int, name: str) -> bool:
        """Whether ``name``, receiving chunk g now, may pass it on as it arrives."""
        d = job.streaming[g].get(name) if job.streaming else None
        if d is None or d >= self.t.stream_depth:
            return False
        h = self.hosts.get(name)
        return h is not None and h.streams and h.alive

    def _relayable(self, job: Job, mq: Machine) -> set[int]:
        """The chunks ``mq`` is receiving that it may pass on while they arrive."""
        if self.t.stream_depth <= 0 or not mq.inflight:
            return set()
        h = self.hosts.get(mq.name)
        if h is None or not h.streams:
            return set()
        return {g for g in mq.inflight if self._relays(job, g, mq.name)}

    def _free_slots(self, m: Machine, g: int, peer: str, draining: bool = False) -> None:
        """Give back the upload and download slot the fetch of chunk g holds.

        Once per fetch: a fetch that reported ``FetchDraining`` (``draining``)
        gave its slots back then, and only its ``inflight`` entry and its hold
        on the peer's hard cap (``draining_uploads``) are left for the ack.
        """
        loads = m.loads.pop(g, None)
        p = self.hosts.get(peer)
        t = self.hosts.get(m.name)
        for h in (p, t):
            if h is not None:
                self._advance(h)
        if loads is None:
            if not draining:  # the drained transfer ended
                if t is not None and t.draining_downloads > 0:
                    t.draining_downloads -= 1
                if p is not None and p.draining_uploads > 0:
                    p.draining_uploads -= 1
                    self._upd_free(p)
            return
        up, down = loads
        if t is not None and t.downloads > 0:
            t.downloads -= 1
            t.down_load = max(0.0, t.down_load - down) if t.downloads else 0.0
            if draining:
                t.draining_downloads += 1
        if p is not None and p.uploads > 0:
            p.uploads -= 1
            p.up_load = max(0.0, p.up_load - up) if p.uploads else 0.0
            if draining:
                p.draining_uploads += 1
            self._upd_free(p)
        if t is not None:
            # The freed download slot may serve any job this host is a target of.
            for j in self.running.values():
                mm = j.machines.get(m.name)
                if mm is not None and not mm.ended:
                    j.hungry[m.name] = None

    def _host_lost(self, h: HostState, now: float, penalise: bool) -> list[Action]:
        """Cancel every assignment to or from ``h``; rescheduling happens at once."""
        self._upd_free(h)
        touched: list[tuple[Job, Machine]] = []
        for job in list(self.running.values()):
            for m in job.machines.values():
                if m.name == h.name:
                    for g in list(m.inflight):
                        self._release(job, m, g)
                    m.packing.clear()
                    m.hook_sent = False
                    continue
                for g, (peer, *_) in list(m.inflight.items()):
                    if peer == h.name:
                        self._release(job, m, g)
                        touched.append((job, m))
        # Chunks that now exist on no live host but the source: it sends them
        # again (the targets that need them find them through ``resend``).
        for job in self.running.values():
            mh = job.machines.get(h.name)
            if mh is None:
                continue
            for g in range(job.nchunks):
                # Its own chunks, and those nobody holds: sent to it (or to a
                # target whose pull never arrived) and lost on the way.
                if g not in mh.have and (job.holders[g] or g in job.unsent):
                    continue
                if job.inflight_count[g] == 0 and not any(
                        n != h.name and n in self.hosts and self.hosts[n].alive
                        for n in job.holders[g]):
                    job.resend.add(g)
        actions: list[Action] = []
        for job, m in touched:
            if not m.ended:
                actions += self._try(job, m, now, full=True)
        return actions

    def _host_up(self, h: HostState, now: float) -> list[Action]:
        """A host (re)appeared: give it its own work, and let it serve what it holds."""
        actions: list[Action] = []
        for job in list(self.running.values()):
            m = job.machines.get(h.name)
            if m is not None and not m.ended:
                actions += self._try(job, m, now, full=True)
        return actions + self._serve(h, now)

    def _fail_machine(self, job: Job, m: Machine, reason: str, now: float) -> list[Action]:
        if m.ended:
            return []
        for g in list(m.inflight):
            self._release(job, m, g)
        m.ended, m.error, m.error_at, m.finished = "failed", reason, now, now
        job.hungry.pop(m.name, None)
        self.dirty_jobs.add(job.id)
        return self._maybe_end(job, now)

    def _maybe_end(self, job: Job, now: float) -> list[Action]:
        if job.state != "running" or any(not m.ended for m in job.machines.values()):
            return []
        job.state = "done" if all(m.ended == "done" for m in job.machines.values()) else "failed"
        job.finished = now
        job.hungry.clear()
        self.running.pop(job.id, None)
        self.dirty_jobs.add(job.id)
        return [JobEnded(job=job.id, state=job.state)]

    def _feed_hungry(self, now: float, only: Job | None = None) -> list[Action]:
        """Try a bounded number of waiting targets per job, longest waiting first."""
        actions: list[Action] = []
        for job in [only] if only is not None else list(self.running.values()):
            if not self.free_up:
                break  # nobody could serve them
            for name in list(itertools.islice(job.hungry, self.t.hungry_tries)):
                m = job.machines.get(name)
                if m is None:
                    job.hungry.pop(name, None)
                    continue
                actions += self._try(job, m, now)
                if name in job.hungry:  # move to the back: fairness among waiters
                    job.hungry.move_to_end(name)
        return actions

    def _packs(self, job: Job, m: Machine, t: HostState) -> list[Action]:
        """Packs for files whose chunks are all here, and the hook once all are packed."""
        actions: list[Action] = []
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
        return actions

    def _try(self, job: Job, m: Machine, now: float, full: bool = False) -> list[Action]:
        """Give machine m whatever work it can take now: fetches, packs, its hook.

        Unless ``full``, only chunks some free uploader holds are considered
        when the free uploaders are few (the common case in a busy swarm), so
        the cost does not grow with the chunks nobody could serve now.  The
        paths that concern particular chunks look at every chunk: a retry after
        a failed fetch (from the failed peer, if nobody else has it), a host
        that died or came back, chunks a target lost.
        """
        if m.ended or job.state != "running":
            job.hungry.pop(m.name, None)
            return []
        t = self.hosts.get(m.name)
        if t is None or not t.alive or t.undeliverable:
            return []
        actions = self._packs(job, m, t)
        missing = job.nchunks - len(m.have) - len(m.inflight)
        if not self._down_free(t) or missing <= 0:
            job.hungry.pop(m.name, None)
            return actions
        job.hungry[m.name] = None  # until proven otherwise
        if not self.free_up:
            return actions  # every uploader is busy: wait for one to volunteer
        holders, counts, retry = job.holders, job.inflight_count, m.retry_at
        have, inflight = m.have, m.inflight
        candidates: Iterable[int] = range(job.nchunks)
        if not full and len(self.free_up) <= 2 * placement.SAMPLE:
            usable: set[int] = set()
            for q in self.free_up:
                mq = job.machines.get(q)
                if q == job.source:
                    usable.update(job.unsent)
                    usable |= job.resend
                elif q != m.name and mq is not None:
                    usable |= mq.have
                    if mq.inflight:
                        usable |= self._relayable(job, mq)
            candidates = usable
        need = [g for g in candidates
                if g not in have and g not in inflight and retry.get(g, 0.0) <= now]
        # Rarest first: fewest holders plus copies already on their way.  Ties
        # are broken by where the list starts, picked at random, so that
        # targets asking at the same moment spread over different chunks.
        if len(need) > 1:
            k = self.rng.randrange(len(need))
            need = need[k:] + need[:k]
            # A slow target takes the commonest chunks instead: a rare chunk
            # sent to it would reach the next host late and hold the swarm
            # up, while it has plenty of time for the rest.
            need.sort(key=lambda g: len(holders[g]) + counts[g], reverse=self._slow(t))
        batch: dict[tuple[str, str], list[Fetch]] = {}
        for g in need:
            if not self._down_free(t) or not self.free_up:
                break
            peer = self._pick_peer(job, m, g)
            if peer is None:
                continue
            self._assign(job, m, t, peer, g, now, batch)
        actions += self._emit(batch)
        self._requeue(job, m, t)
        return actions

    def _serve(self, h: HostState | None, now: float) -> list[Action]:
        """Offer ``h``'s free upload slots to targets waiting for chunks it holds."""
        if (h is None or h.name not in self.free_up
                or not placement.volunteers(h, self.fleet_cpu)):
            return []
        batch: dict[tuple[str, str], list[Fetch]] = {}
        for job in list(self.running.values()):
            if h.name not in self.free_up:
                break
            if not job.hungry:
                continue
            if h.name == job.source:
                if job.source_ok:
                    self._serve_source(job, h, now, batch)
            else:
                mp = job.machines.get(h.name)
                if mp is not None and (mp.have or mp.inflight):
                    relay = self._relayable(job, mp)
                    if mp.have or relay:
                        self._serve_peer(job, h, mp.have | relay if relay else mp.have, now,
                                         batch)
        return self._emit(batch)

    def _waiting(self, job: Job, h: HostState, sample: int) -> list[tuple[Machine, HostState]]:
        """Up to ``sample`` waiting targets of ``job`` that could take a fetch from ``h``.

        The targets looked at move to the back of the queue, so the next
        volunteer looks at others: every waiting target is considered within
        a few events, at a bounded cost per event.
        """
        out: list[tuple[Machine, HostState]] = []
        seen: list[str] = []
        drop: list[str] = []
        for name in job.hungry:
            if len(out) >= sample or len(seen) + len(drop) >= 2 * sample:
                break
            m = job.machines.get(name)
            t = self.hosts.get(name)
            if (m is None or m.ended or t is None or not t.alive or t.undeliverable
                    or not self._down_free(t)
                    or len(m.have) + len(m.inflight) >= job.nchunks):
                drop.append(name)
                continue
            seen.append(name)
            if name != h.name and m.avoid.get(h.name, 0) < placement.AVOID_AFTER_FAILURES:
                out.append((m, t))
        for name in drop:
            del job.hungry[name]
        for name in seen:
            job.hungry.move_to_end(name)
        return out

    def _requeue(self, job: Job, m: Machine, t: HostState) -> None:
        """A target just given work goes to the back of the queue, or leaves it."""
        job.hungry.pop(m.name, None)
        if self._down_free(t) and len(m.have) + len(m.inflight) < job.nchunks:
            job.hungry[m.name] = None

    def _serve_source(self, job: Job, h: HostState, now: float,
                      batch: dict[tuple[str, str], list[Fetch]]) -> None:
        """First copies, each to a different target; then the end-game extras."""
        while h.name in self.free_up and job.unsent:
            g = next(iter(job.unsent))
            if job.holders[g] or job.source_sends[g] >= self.t.source_copies:
                del job.unsent[g]  # already out (e.g. held from before a restart)
                continue
            cands = [(m, t) for m, t in self._waiting(job, h, 4 * self.t.serve_sample)
                     if g not in m.have and g not in m.inflight
                     and m.retry_at.get(g, 0.0) <= now and m.last_failed_peer.get(g) != h.name]
            if not cands:
                return
            # The target best placed to pass the chunk on: one that is not
            # busy (a busy host serves only what nobody else holds, so a first
            # copy there makes it serve after all); a link known to be fast,
            # else one not measured yet, never a slow one while others wait (a
            # first copy stuck on a slow link holds up the whole swarm); then
            # fewest uploads under way; then at random.
            fastest = max(t.down_rate for _, t in cands)
            fleet = self.fleet_cpu
            m, t = min(cands, key=lambda mt: (
                not placement.volunteers(mt[1], fleet),
                2 if self._slow(mt[1]) else 0 if mt[1].down_rate >= 0.5 * fastest > 0
                else 1 if mt[1].down_rate <= 0 else 2,
                mt[1].uploads, self.rng.random()))
            self._assign(job, m, t, h, g, now, batch)
            self._requeue(job, m, t)
        while h.name in self.free_up and not job.unsent and job.source_extra_left > 0:
            best: tuple[int, Machine, HostState, int] | None = None
            once = {g for g, n in enumerate(job.source_sends) if n <= self.t.source_copies}
            for m, t in self._waiting(job, h, self.t.serve_sample):
                g2 = self._rarest(job, m, once, h.name, now)
                if g2 is not None:
                    r = len(job.holders[g2]) + job.inflight_count[g2]
                    if best is None or r < best[0]:
                        best = (r, m, t, g2)
            # Only chunks still rare enough that the source's copy shortens
            # the wait: once a chunk has a few copies, peers spread it faster.
            if best is None or best[0] >= 4:
                return
            _, m, t, g2 = best
            job.source_extra_left -= 1
            self._assign(job, m, t, h, g2, now, batch)
            self._requeue(job, m, t)

    def _serve_peer(self, job: Job, h: HostState, have: set[int], now: float,
                    batch: dict[tuple[str, str], list[Fetch]]) -> None:
        # The target furthest behind first: the job ends when its last target
        # does, and a target that fell behind early only catches up if it is
        # served first whenever it waits.
        waiting = self._waiting(job, h, self.t.serve_sample)
        waiting.sort(key=lambda mt: (self._slow(mt[1]), len(mt[0].have) + len(mt[0].inflight)))
        for m, t in waiting:
            if h.name not in self.free_up:
                return
            if not self._down_free(t) or not self._worth(job, m, t, h):
                continue
            g = self._rarest(job, m, have, h.name, now, common=self._slow(t))
            if g is None:
                continue
            self._assign(job, m, t, h, g, now, batch)
            self._requeue(job, m, t)

    def _rarest(self, job: Job, m: Machine, have: set[int] | None, peer: str,
                now: float, common: bool = False) -> int | None:
        """The rarest chunk among ``have`` (None: all) that m can fetch from ``peer``
        now (with ``common``, the commonest: see ``_try``)."""
        cands = (set(range(job.nchunks)) if have is None else have) - m.have
        holders, counts, inflight = job.holders, job.inflight_count, m.inflight
        retry, failed = m.retry_at, m.last_failed_peer
        best, best_r, ties = None, 1 << 60, 0
        for g in cands:
            if g in inflight or (retry and retry.get(g, 0.0) > now) or \
                    (failed and failed.get(g) == peer):
                continue
            r = len(holders[g]) + counts[g]
            if common:
                r = -r
            if r < best_r:
                best, best_r, ties = g, r, 1
            elif r == best_r:
                ties += 1
                if self.rng.random() * ties < 1.0:  # uniform among equals
                    best = g
        return best

    def _assign(self, job: Job, m: Machine, t: HostState, peer: HostState, g: int, now: float,
                batch: dict[tuple[str, str], list[Fetch]]) -> None:
        f, c = job.where[g]
        off, size = chunk_span(job.files[f].size, job.chunk_size, c)
        # The rate this transfer can run at, as a share of each end's link;
        # unknown speeds count as equal (a full share at both ends).
        # Estimates only bound a link from below, so only a clearly slower
        # counterpart (a quarter-speed link, not a noisy sample) makes a
        # transfer count as less than a full share.
        up = down = 1.0
        # Fed by a peer known to be slow, even a target not measured yet keeps
        # room for faster transfers beside it.
        t_down = self._down_guess(t)
        if peer.up_rate > 0 and t_down > 0:
            ratio = t_down / peer.up_rate
            if ratio < SLOWER:
                up = ratio
            elif ratio > 1.0 / SLOWER:
                down = 1.0 / ratio
        if peer.name == job.source and t.down_rate <= 0 and not (self.t.stream_depth > 0 and t.streams):
            # The source hedges while it cannot tell a fast target from a slow
            # one: its uplink, the swarm's only supply, takes a second transfer.
            up = 0.5
        m.loads[g] = (up, down)
        job.inflight_count[g] += 1
        self._advance(t)
        self._advance(peer)
        t.downloads += 1
        t.down_load += down
        peer.uploads += 1
        peer.up_load += up
        m.inflight[g] = (peer.name, now, peer.up_clock, t.down_clock)
        # A slow source is no reason against a chain for a chunk nobody else
        # holds yet: that chunk comes no faster any other way.
        first_copy = peer.name == job.source and not job.holders[g]
        if self.t.stream_depth > 0 and t.streams and (
                peer.name == job.source or peer.name in job.holders[g]
                or peer.name in job.streaming[g]) and not (
                self._slow(t) or (self._is_slow(peer.up_rate, "up") and not first_copy)):
            # m may relay the chunk on: the chain above it is whole and has no
            # link known to be slow (a chain runs at its slowest link, and a
            # fast target must not be tied to a slow one).
            above = job.streaming[g].get(peer.name, 0)  # 0: the peer holds it (or is the source)
            job.streaming[g][m.name] = above + 1
        # A relay's own pull goes out with this one and may reach it later.
        arriving = self._relaying(job, g, peer.name)
        self._upd_free(peer)
        if peer.name == job.source:
            job.source_sends[g] += 1
            job.unsent.pop(g, None)
            job.resend.discard(g)
        batch.setdefault((job.id, m.name), []).append(
            Fetch(file=f, chunk=c, offset=off, size=size, xxh3=job.files[f].chunks[c],
                  peer=peer.address, peer_name=peer.name, arriving=arriving))
        self.dirty_jobs.add(job.id)

    def _emit(self, batch: dict[tuple[str, str], list[Fetch]]) -> list[Action]:
        actions: list[Action] = []
        for (jid, name), fetches in batch.items():
            job = self.jobs[jid]
            files: dict[int, StagedFile] = {}
            for fe in fetches:
                if fe.file not in files:
                    fs = job.files[fe.file]
                    files[fe.file] = StagedFile(file=fe.file, dest=fs.dest, size=fs.size,
                                                xxh3=fs.xxh3)
            actions.append(AssignFetch(job=jid, target=name, address=self.hosts[name].address,
                                       files=tuple(files.values()), fetches=tuple(fetches),
                                       chunk_size=job.chunk_size))
        return actions

    def _pick_peer(self, job: Job, m: Machine, g: int) -> HostState | None:
        hosts = self.hosts
        hs = job.holders[g]
        free = self.free_up
        # Targets receiving the chunk now that may relay it (cut-through): few
        # (at most the copies in flight), so all of them are looked at.
        relays = [n for n in job.streaming[g] if n != m.name and n in free
                  and self._relays(job, g, n)] if self.t.stream_depth > 0 and job.streaming else []
        # Look only where a free slot can be, at a bounded cost: the free
        # uploaders that hold the chunk when either list is short, else random
        # holders probed for a free slot (with thousands of both, a dozen found
        # this way rank as well as all of them would).
        if len(free) <= SCAN and len(free) <= len(hs):
            names: list[str] = []
            for n in free:
                if n in hs:
                    names.append(n)
                    if len(names) >= placement.SAMPLE:
                        break
        elif len(hs) <= SCAN:
            names = [n for n in hs if n in free]
        else:
            lst, rnd = job.holder_list[g], self.rng.random
            found: dict[str, None] = {}
            for _ in range(4 * placement.SAMPLE):
                n = lst[int(rnd() * len(lst))]
                if n in free:
                    found[n] = None
                    if len(found) >= placement.SAMPLE // 2:
                        break
            names = list(found)
        if relays:
            names += relays
        holders = [hosts[n] for n in names if n in hosts]
        avoid = m.avoid
        exclude = m.last_failed_peer.get(g, "")
        cands = placement.filter_peers(holders, m.name, avoid, exclude, free=free)
        if relays and len(cands) > 1:
            # A holder serves at its own link's pace; a relay at its chain's,
            # which may hide a slow host not measured yet: relays only when no
            # holder is free (the rarest chunks, which is where they count).
            held = [h for h in cands if h.name not in job.streaming[g]]
            if held:
                cands = held
        t = hosts[m.name]
        cands = [h for h in cands if h.bad_serves < 3]
        worth = [h for h in cands if self._worth(job, m, t, h)]
        # Waiting for a fast holder makes sense only while one exists; when every
        # live holder is slow (or rates measured across a restart say so), a
        # slow copy beats a chunk that is never assigned.
        if worth or not cands or any(n != m.name and n in hosts and hosts[n].alive
                                     and self._worth(job, m, t, hosts[n]) for n in hs):
            cands = worth
        if cands and any(not placement.volunteers(h, self.fleet_cpu) for h in cands):
            # Keep work off busy hosts: one serves only when no idle host holds
            # the chunk at all (busy or not right now), so nothing stalls on it.
            idle = [h for h in cands if placement.volunteers(h, self.fleet_cpu)]
            if idle:
                cands = idle
            elif any(n != m.name and hosts[n].alive
                     and placement.volunteers(hosts[n], self.fleet_cpu)
                     for n in hs if n in hosts):
                return None
        best = placement.rank(cands, source=job.source, avoid=avoid, rng=self.rng,
                              w=self.weights, fleet_cpu=self.fleet_cpu)
        if best is not None:
            return best  # type: ignore[return-value]
        # The source is the peer of last resort: once per chunk, again when no
        # other copy is alive or on its way (a holder died), or to retry a chunk
        # whose only other holder just failed this target.
        src = hosts.get(job.source)
        src_ok = not (src is None or not job.source_ok or not src.alive or src.name == m.name
                      or src.name not in free
                      or avoid.get(src.name, 0) >= placement.AVOID_AFTER_FAILURES)
        if src_ok:
            if job.source_sends[g] < self.t.source_copies or exclude:
                return src
            # A copy counts only where this target may still fetch it: not on a
            # peer it gave up on, nor on one that served bad data repeatedly
            # (else a target avoiding the only other holder would wait forever).
            alive_copy = any(hosts[n].alive and avoid.get(n, 0) < placement.AVOID_AFTER_FAILURES
                             and hosts[n].bad_serves < 3 for n in hs if n in hosts)
            if not alive_copy and job.inflight_count[g] == 0:
                return src
        if exclude:
            # Nobody else can serve it: give the failed peer another chance (after
            # the backoff) rather than stall.
            cands = placement.filter_peers(holders, m.name, avoid, free=free)
            return placement.rank(cands, source=job.source, avoid=avoid,  # type: ignore
                                  rng=self.rng, w=self.weights, fleet_cpu=self.fleet_cpu)
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
        return {"jobs": jobs, "hosts": hosts, "schedules": self.schedules.snapshot()}

    def restore(self, snap: dict[str, Any]) -> None:
        """Load a checkpoint written by ``snapshot()`` (soft state starts empty)."""
        self.schedules.restore(snap.get("schedules", {}))
        self.hosts.clear()
        self.jobs.clear()
        self.running.clear()
        self.free_up.clear()
        self.wakeups.clear()
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
                job.unsent = dict.fromkeys(range(job.nchunks))
                held = (range(job.nchunks) if ms["have"] == "all" else
                        [job.base[f] + c for f, chunks in enumerate(ms["have"]) for c in chunks])
                for g in held:
                    self._add_chunk(job, m, g, j["created"], count_bytes=False)
                m.packed = set(ms["packed"])
                m.ended, m.error, m.error_at = ms["ended"], ms["error"], ms["error_at"]
                m.finished, m.hook = ms["finished"], ms["hook"]
                m.history.clear()
            job.holder_list = [list(hs) for hs in job.holders]
            job.streaming = [{} for _ in job.holders]
            job.hungry.clear()
            if job.state != "running":
                self.running.pop(jid, None)


# Free uploaders or holders walked through to find a peer before sampling instead.
SCAN = 256
# A counterpart slower than this fraction of a link makes a transfer count as
# that fraction of the link.
SLOWER = 0.4
# A transfer that had at least this share of a link over its life (the rest
# is the overlap with the chunks before and after it) measures that link.
ALONE = 0.75
# A link whose assigned transfers are expected to use more than its budget
# minus this is full (so a fast link takes up to four transfers that each run
# at a quarter of its rate, and one that runs at its full rate).
FULL_ENOUGH = 0.25


def _under(path: str, directory: str) -> bool:
    directory = directory.rstrip("/") or "/"
    return directory == "/" or path == directory or path.startswith(directory + "/")
