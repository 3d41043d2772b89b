"""A simulated cluster that drives the real scheduler core (no sockets, no clock).

Used by the core's scenario tests and by ``fdship simulate``.  Every host has
an uplink and a downlink of given bandwidth; the daemons are modelled as the
real ones behave: a pull reaches the target one ``latency`` after the center
sent it, the target runs at most ``max_downloads`` fetches at once (the rest
wait in its queue, like the daemon's semaphore), each fetch's bytes start to
flow one ``latency`` later (the GET to the peer), and its ack reaches the
center one ``latency`` after the last byte.

Bandwidth is shared the way TCP shares it, approximately: a transfer's rate is
its max-min fair share of its peer's uplink and of its target's downlink, so a
transfer held back at one end leaves the other end's spare capacity to the
transfers beside it.  Rates are recomputed only around the two hosts an event
touched (a few transfers, not all of them), and finishing times sit in a heap
with lazy invalidation, so each event costs O(log transfers) and a job to
thousands of hosts simulates in seconds to minutes.  Time advances from event
to event (discrete-event simulation), and every run with the same seed is
identical.

The simulator checks the scheduler's promises as it goes: no fetch is
assigned from a peer that lacks the chunk, per-host caps hold, and it counts
how many times the source sent each chunk.  It also measures what the
scheduler cannot see: how long targets sat idle between a finished chunk and
the next one, and the center's CPU time (``time.process_time`` around every
``Scheduler.handle`` call).
"""

from __future__ import annotations

import heapq
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import xxhash

from fdship.core.actions import Action, AssignFetch, Commit, JobEnded, Pack
from fdship.core.events import (
    ChunkStored,
    Event,
    FetchDraining,
    FetchFailed,
    FilePacked,
    HookFinished,
    HostReported,
    Tick,
)
from fdship.core.scheduler import Scheduler, Tunables
from fdship.protocol import FAIL_CONNECT, FileSpec, Heartbeat, JobRequest, Load, chunk_count


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


@dataclass(eq=False)
class Transfer:
    """One chunk's bytes moving from ``peer`` to ``target``."""

    job: str
    target: str
    peer: str
    file: int
    chunk: int
    remaining: float
    size: int = 0
    rate: float = 0.0
    stamp: float = 0.0  # when ``remaining`` was last brought up to date
    version: int = 0  # bumped on every rate change: stale heap entries are skipped
    id: int = 0
    drained: bool = False  # the target told the center it is about to finish
    started: float = 0.0  # when the first byte could move (the target times from here)
    relayed: bool = False  # the peer was still receiving the chunk when this began


@dataclass(eq=False)
class SimHost:
    name: str
    up: float  # bytes/s
    down: float
    labels: tuple[str, ...] = ()
    alive: bool = True
    slots: int = 4  # the daemon's max_downloads: fetches it runs at once
    uploads: int = 0  # transfers flowing out now
    downloads: int = 0  # transfers flowing in now
    max_up_seen: int = 0
    max_down_seen: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    held: set[tuple[str, int, int]] = field(default_factory=set)  # (job, file, chunk)
    load: Load = field(default_factory=Load)
    up_flows: list[Transfer] = field(default_factory=list)
    down_flows: list[Transfer] = field(default_factory=list)
    busy_slots: int = 0  # daemon fetch slots taken (flowing or about to)
    waiting: deque[tuple[str, str, int, int, int]] = field(default_factory=deque)
    # Instrumentation of the target side.
    freed: deque[float] = field(default_factory=deque)  # when the downlink fell idle
    gap_seconds: float = 0.0  # a chunk's last byte -> the next one's first, summed
    gaps: int = 0
    idle_since: float | None = None  # no byte flowing in since then (while work remained)
    idle_seconds: float = 0.0
    first_byte: float | None = None
    last_byte: float | None = None


def waterfill(capacity: float, demands: list[float]) -> list[float]:
    """Max-min fair split of ``capacity`` among flows that can each take at most their demand."""
    n = len(demands)
    if n == 1:
        d = demands[0]
        return [min(capacity, d)]
    out = [0.0] * n
    left, k = capacity, n
    for i in sorted(range(n), key=demands.__getitem__):
        share = left / k
        d = demands[i]
        a = min(share, d)
        out[i] = a
        left -= a
        k -= 1
    return out


# Event kinds in the simulator's heap.
_CENTER, _PULL, _BEGIN, _DONE, _TICK, _BEAT, _DRAIN, _RELAYED, _CAUGHT_UP = range(9)

# How long after a relay's last byte the last byte it passes on arrives.
RELAY_DELAY = 0.001


class SimCluster:
    """N simulated daemons + the real Scheduler."""

    def __init__(self, n_hosts: int, bandwidth: float, *, slow_fraction: float = 0.0,
                 slow_factor: float = 0.25, seed: int = 1, tunables: Tunables | None = None,
                 latency: float = 0.001, jitter: float = 0.0,
                 beat_interval: float = 0.0, drain_lead: float = 0.0,
                 streams: bool = True, slow_capped: bool = False) -> None:
        self.rng = random.Random(seed)
        self.clock = FakeClock()
        self.sched = Scheduler(tunables or Tunables(heartbeat_timeout=1e9), seed=seed)
        self.latency = latency
        self.jitter = jitter
        self.beat_interval = beat_interval
        # Like the daemon's fetch_lead: a fetch tells the center it is about
        # to finish this long before its last byte (0: never).
        self.drain_lead = drain_lead
        # Like the daemon: a host passes on a chunk while it still arrives
        # (cut-through), when the center names it as the peer for one.
        self.streams = streams
        # The slow hosts are slow by their daemons' rate caps, and report them
        # (upload_rate / download_rate = their bandwidth) in every heartbeat.
        self.slow_capped = slow_capped
        # (job, file, chunk) -> hosts told to fetch it that have not finished.
        self.arriving: dict[tuple[str, int, int], set[str]] = {}
        # (relay, (job, file, chunk)) -> transfers whose bytes all left the
        # relay's uplink but whose end waits for the relay's own last byte.
        self.relay_wait: dict[tuple[str, tuple[str, int, int]], list[Transfer]] = {}
        self.relayed = 0  # transfers that passed on a chunk still arriving
        self.hosts: dict[str, SimHost] = {}
        names = [f"h{i:05d}" for i in range(n_hosts)]
        slow = set(self.rng.sample(names[1:], int(slow_fraction * (n_hosts - 1)))) \
            if n_hosts > 1 else set()
        for n in names:
            bw = bandwidth * (slow_factor if n in slow else 1.0)
            self.hosts[n] = SimHost(name=n, up=bw, down=bw, slots=self.sched.t.max_downloads)
        self.slow = slow
        self._next_id = 0
        self.queue: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.source_sends: dict[tuple[str, int, int], int] = {}
        self.violations: list[str] = []
        self.ended: dict[str, str] = {}
        self.cpu_seconds = 0.0
        self.events_handled = 0
        self.flows_started = 0
        # Durable events as the center would log them: (record, time).
        self.durable_log: list[tuple[dict[str, Any], float]] = []
        self.fail_links: set[tuple[str, str]] = set()  # (peer, target) pairs that fail
        self.assigned: dict[str, int] = {}  # fetches assigned per peer and not yet acked
        self._ticking = False
        for n in names:
            self._deliver(self._beat(n))
        if beat_interval > 0:
            for i, n in enumerate(names):  # staggered, like real daemons
                self._push(self.clock.now + beat_interval * (i + 1) / len(names), _BEAT, n)

    # -- plumbing -----------------------------------------------------------------

    def _beat(self, name: str) -> HostReported:
        h = self.hosts[name]
        ld = h.load
        if self.beat_interval > 0:
            ld = Load(cpu=ld.cpu, loadavg=ld.loadavg, disk_busy=ld.disk_busy,
                      net_tx=sum(f.rate for f in h.up_flows),
                      net_rx=sum(f.rate for f in h.down_flows), uploads=h.uploads,
                      downloads=h.downloads, bytes_served=h.bytes_up,
                      bytes_received=h.bytes_down, app_cpu=ld.app_cpu,
                      app_cpu_busy=ld.app_cpu_busy)
        cap = int(h.up) if self.slow_capped and name in self.slow else 0
        return HostReported(beat=Heartbeat(name=name, address=f"{name}:7071", boot_id="b1",
                                           labels=h.labels, load=ld,
                                           max_uploads=self.sched.t.max_uploads,
                                           max_downloads=h.slots, streams=self.streams,
                                           upload_rate=cap, download_rate=cap))

    def set_load(self, name: str, **load: float) -> None:
        """Give a host a load (e.g. ``cpu=95``) and report it to the center at once."""
        h = self.hosts[name]
        h.load = Load(**{**h.load.to_json(), **load})  # type: ignore[arg-type]
        self._deliver(self._beat(name))

    def _delay(self) -> float:
        """One network hop between center and daemon, or daemon and daemon:
        ``latency``, give or take ``jitter`` of it (real hops are never equal)."""
        if not self.jitter:
            return self.latency
        return self.latency * (1.0 + self.jitter * (2.0 * self.rng.random() - 1.0))

    def _push(self, at: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self.queue, (at, self._seq, kind, payload))

    def _deliver(self, ev: Event) -> None:
        if ev.durable:
            self.durable_log.append((ev.to_record(), self.clock.now))
        t0 = time.process_time()
        actions = self.sched.handle(ev, self.clock.now)
        self.cpu_seconds += time.process_time() - t0
        self.events_handled += 1
        self._carry_out(actions)

    def _carry_out(self, actions: list[Action]) -> None:
        now = self.clock.now
        for a in actions:
            if isinstance(a, Commit):
                self._deliver(a.event)
            elif isinstance(a, AssignFetch):
                src = self.sched.jobs[a.job].source
                for f in a.fetches:
                    p = self.hosts[f.peer_name]
                    key = (a.job, f.file, f.chunk)
                    # A relay the center still believes in may have failed a
                    # moment ago (its report is on the way): the fetch then
                    # fails like a 404, which is no scheduling error.
                    if f.peer_name != src and key not in p.held and not (
                            self.streams and (f.peer_name in self.arriving.get(key, ())
                                              or self._believed_relay(a.job, f, f.peer_name))):
                        self.violations.append(
                            f"{a.target} told to fetch {a.job}/{f.file}/{f.chunk} from "
                            f"{f.peer_name}, which neither holds it nor is receiving it")
                    self.arriving.setdefault(key, set()).add(a.target)
                    if f.peer_name == src:
                        k = (a.job, f.file, f.chunk)
                        self.source_sends[k] = self.source_sends.get(k, 0) + 1
                    n = self.assigned[f.peer_name] = self.assigned.get(f.peer_name, 0) + 1
                    cap = self.sched.hosts[f.peer_name].max_uploads
                    if n > cap:
                        self.violations.append(f"cap exceeded: {f.peer_name} has {n} uploads "
                                               f"assigned, cap {cap}")
                self._push(now + self._delay(), _PULL,
                           [(a.job, a.target, f.peer_name, f.file, f.chunk, f.size)
                            for f in a.fetches])
            elif isinstance(a, Pack):
                if a.notify:
                    self._push(now + self._delay(), _CENTER,
                               HookFinished(job=a.job, host=a.target, ok=True))
                else:
                    self._push(now + self._delay(), _CENTER,
                               FilePacked(job=a.job, host=a.target, file=a.file.file))
            elif isinstance(a, JobEnded):
                self.ended[a.job] = a.state

    # -- the daemons' side ----------------------------------------------------------

    def _pull(self, fetches: list[tuple[str, str, str, int, int, int]]) -> None:
        for job, target, peer, file, chunk, size in fetches:
            t = self.hosts[target]
            if t.busy_slots < t.slots:
                t.busy_slots += 1
                self._push(self.clock.now + self._delay(), _BEGIN,
                           (job, target, peer, file, chunk, size))
            else:
                t.waiting.append((job, peer, file, chunk, size))

    def _free_slot(self, t: SimHost) -> None:
        """A fetch slot of daemon ``t`` came free: start the fetch waiting longest."""
        t.busy_slots -= 1
        if t.waiting:
            job, peer, file, chunk, size = t.waiting.popleft()
            t.busy_slots += 1
            self._push(self.clock.now + self._delay(), _BEGIN,
                       (job, t.name, peer, file, chunk, size))

    def _begin(self, job: str, target: str, peer: str, file: int, chunk: int, size: int) -> None:
        now = self.clock.now
        p, t = self.hosts[peer], self.hosts[target]
        self._next_id += 1
        self.flows_started += 1
        tr = Transfer(job, target, peer, file, chunk, remaining=float(max(size, 1)), size=size,
                      stamp=now, id=self._next_id, started=now,
                      relayed=(job, file, chunk) not in p.held)
        p.up_flows.append(tr)
        t.down_flows.append(tr)
        p.uploads += 1
        t.downloads += 1
        p.max_up_seen = max(p.max_up_seen, p.uploads)
        t.max_down_seen = max(t.max_down_seen, t.downloads)
        sh = self.sched.hosts.get(peer)
        if sh is not None and p.uploads > sh.max_uploads:
            self.violations.append(f"cap exceeded: {peer} serves {p.uploads} at once")
        running = sum(1 for f in t.down_flows if not f.drained)  # drained ones gave theirs back
        if running > t.slots:
            self.violations.append(f"cap exceeded: {target} fetches {running} at once")
        if t.first_byte is None:
            t.first_byte = now
        if t.idle_since is not None:
            t.idle_seconds += now - t.idle_since
            t.idle_since = None
        if t.freed:
            t.gap_seconds += now - t.freed.popleft()
            t.gaps += 1
        self._reflow(p, t)

    def _done(self, tr: Transfer) -> None:
        """Transfer ``tr`` moved its last byte: it ends, or waits for its relay.

        A transfer from a peer still receiving the chunk (cut-through) cannot
        end before that peer has the last byte: it leaves the links now (it
        has moved its share of bytes) and ends RELAY_DELAY after its relay's
        own transfer does, or fails when that one fails.  This is a little
        optimistic: the real transfer's last bytes trickle at the relay's pace
        instead of leaving the links early.
        """
        key = (tr.job, tr.file, tr.chunk)
        relay = tr.peer
        self._unlink(tr)
        if relay != self.sched.jobs[tr.job].source and key not in self.hosts[relay].held:
            if relay in self.arriving.get(key, ()):
                self.relay_wait.setdefault((relay, key), []).append(tr)
                return
            self._finish(tr, ok=False, error="simulated relay failure")  # its source broke
            return
        self._finish(tr, ok=True)

    def _believed_relay(self, job: str, f: Any, peer: str) -> bool:
        j = self.sched.jobs[job]
        return peer in j.streaming[j.base[f.file] + f.chunk]

    def _unlink(self, tr: Transfer) -> None:
        now = self.clock.now
        p, t = self.hosts[tr.peer], self.hosts[tr.target]
        p.up_flows.remove(tr)
        t.down_flows.remove(tr)
        p.uploads -= 1
        t.downloads -= 1
        tr.version = -1
        self._reflow(p, t)
        t.last_byte = now
        if not tr.drained:
            self._free_slot(t)
        if t.downloads == 0:
            t.idle_since = now
            t.freed.append(now)  # the downlink is idle until the next fetch begins
        else:
            t.gaps += 1  # another fetch already flows (it was started early): no gap

    def _finish(self, tr: Transfer, ok: bool, error: str = "simulated reset") -> None:
        """The fetch ``tr`` ended; report it, and end what was relayed through it."""
        now = self.clock.now
        p, t = self.hosts[tr.peer], self.hosts[tr.target]
        key = (tr.job, tr.file, tr.chunk)
        self.assigned[tr.peer] -= 1
        self.arriving.get(key, set()).discard(tr.target)
        if ok and (tr.peer, tr.target) in self.fail_links:
            ok = False
        if not ok:
            ev: Event = FetchFailed(job=tr.job, host=tr.target, file=tr.file, chunk=tr.chunk,
                                    peer=tr.peer, fail=FAIL_CONNECT, error=error)
        else:
            p.bytes_up += tr.size
            t.bytes_down += tr.size
            t.held.add(key)
            if tr.peer != self.sched.jobs[tr.job].source and tr.relayed:
                self.relayed += 1
            ev = ChunkStored(job=tr.job, host=tr.target, file=tr.file, chunk=tr.chunk,
                             peer=tr.peer, nbytes=tr.size, seconds=now - tr.started)
        self._push(now + self._delay(), _CENTER, ev)
        for below in self.relay_wait.pop((tr.target, key), ()):
            if ok:
                self._push(now + RELAY_DELAY, _RELAYED, below)
            else:
                self._finish(below, ok=False, error=f"simulated: relay {tr.target} lost the chunk")
        # Transfers still relaying the chunk from tr's target: no longer held
        # back (it holds the chunk now), or cut off (it never will).
        for d in [d for d in t.up_flows if d.relayed and (d.job, d.file, d.chunk) == key]:
            if ok:
                self._reflow(t, self.hosts[d.target])
            else:
                self._unlink(d)
                self._finish(d, ok=False, error=f"simulated: relay {tr.target} lost the chunk")

    # -- bandwidth sharing ----------------------------------------------------------

    def _upstream(self, x: Transfer) -> Transfer | None:
        """The relay's own incoming transfer of the chunk x relays."""
        key = (x.job, x.file, x.chunk)
        for u in self.hosts[x.peer].down_flows:
            if (u.job, u.file, u.chunk) == key:
                return u
        return None

    def _done_bytes(self, x: Transfer) -> float:
        return x.size - (x.remaining - x.rate * (self.clock.now - x.stamp))

    def _feed(self, x: Transfer) -> float | None:
        """How fast a relay can pass on the chunk it still receives (None: no limit).

        A relayed transfer cannot outrun the relay's own: behind it, it runs
        at whatever the links give it; once it has caught up (a _CAUGHT_UP
        event), at the rate the bytes reach the relay; and not at all while
        the relay's fetch has not started.
        """
        if not x.relayed or (x.job, x.file, x.chunk) in self.hosts[x.peer].held:
            return None
        u = self._upstream(x)
        if u is None:
            return 0.0
        if self._done_bytes(x) < self._done_bytes(u) - 1.0:
            return None
        return u.rate

    def _reflow_below(self, x: Transfer, depth: int) -> None:
        """Transfer x changed rate: re-settle the transfers relaying its chunk onward."""
        relay = self.hosts[x.target]
        key = (x.job, x.file, x.chunk)
        for d in [d for d in relay.up_flows if d.relayed and (d.job, d.file, d.chunk) == key]:
            if d in relay.up_flows:
                self._reflow(relay, self.hosts[d.target], depth + 1)

    def _reflow(self, p: SimHost, t: SimHost, depth: int = 0) -> None:
        """Recompute the rates of the transfers on p's uplink and on t's downlink.

        Local max-min fairness: a transfer on p's uplink can take at most what
        its target's downlink has left beside its other transfers (and the
        other way round); two rounds of water-filling at p and t settle the
        shares of the transfers they have in common.  Transfers elsewhere keep
        their rates until an event touches them.
        """
        ups, downs = p.up_flows, t.down_flows
        if not ups and not downs:
            return
        hosts = self.hosts
        cap_dn: dict[int, float] = {}  # what the target end lets each transfer take
        cap_up: dict[int, float] = {}
        for x in ups:
            if x.target == t.name:
                cap_dn[x.id] = t.down / len(downs)
            else:
                far = hosts[x.target]
                cap_dn[x.id] = max(0.0, far.down - sum(y.rate for y in far.down_flows
                                                        if y is not x))
            if x.relayed and (fed := self._feed(x)) is not None:
                cap_dn[x.id] = min(cap_dn[x.id], fed)
        for x in downs:
            if x.peer == p.name:
                cap_up[x.id] = p.up / len(ups)
            else:
                far = hosts[x.peer]
                cap_up[x.id] = max(0.0, far.up - sum(y.rate for y in far.up_flows if y is not x))
            if x.relayed and (fed := self._feed(x)) is not None:
                cap_up[x.id] = min(cap_up[x.id], fed)
        for _ in range(2):
            if ups:
                for x, a in zip(ups, waterfill(p.up, [cap_dn[x.id] for x in ups])):
                    cap_up[x.id] = a
            if downs:
                for x, a in zip(downs, waterfill(t.down, [cap_up[x.id] for x in downs])):
                    cap_dn[x.id] = a
        now = self.clock.now
        changed: list[Transfer] = []
        for x in ups + downs:
            r = min(cap_up[x.id], cap_dn[x.id])
            if abs(r - x.rate) <= 1e-9 * (r + 1.0) and x.version > 0:
                continue
            x.remaining -= x.rate * (now - x.stamp)
            x.stamp = now
            x.rate = r
            x.version += 1
            changed.append(x)
            if x.relayed and r > 0 and (u := self._upstream(x)) is not None and r > u.rate:
                gap = self._done_bytes(u) - self._done_bytes(x)
                if gap > 1.0:  # behind its relay, and gaining on it: it catches up then
                    self._push(now + gap / (r - u.rate), _CAUGHT_UP, (x, x.version))
            if r > 0:
                end = now + max(0.0, x.remaining) / r
                self._push(end, _DONE, (x, x.version))
                if self.drain_lead > 0 and not x.drained:
                    self._push(max(now, end - self.drain_lead), _DRAIN, (x, x.version))
        if self.streams and depth < 70:  # chains are at most stream_depth (<= 64) long
            for x in changed:
                if x.version > 0 and self.hosts[x.target].up_flows:
                    self._reflow_below(x, depth)

    # -- running ------------------------------------------------------------------

    def submit(self, files: list[FileSpec], machines: list[str], source: str = "h00000",
               job_id: str | None = None, chunk_size: int = 4 * 1024 * 1024) -> str:
        jid = job_id or f"job-{len(self.sched.jobs):04d}"
        req = JobRequest(source=source, files=tuple(files), machines=tuple(machines),
                         chunk_size=chunk_size)
        ev = self.sched.admit(req, jid, self.clock.now)
        for f_i, f in enumerate(files):
            for c in range(len(f.chunks)):
                self.hosts[source].held.add((jid, f_i, c))
        self._deliver(ev)
        return jid

    def run(self, until_jobs_end: bool = True, max_time: float = 1e6,
            tick: float = 0.5) -> float:
        """Advance until every submitted job ended (or max_time).  Returns sim time."""
        start = self.clock.now
        deadline = start + max_time
        if not self._ticking:
            self._ticking = True
            self._push(start + tick, _TICK, tick)
        steps = 0
        q = self.queue
        while q:
            steps += 1
            if steps > 200_000_000:
                raise RuntimeError("simulation did not converge")
            if until_jobs_end and self.sched.jobs and all(
                    j.state != "running" for j in self.sched.jobs.values()):
                break
            at = q[0][0]
            if at > deadline:
                break
            _, _, kind, payload = heapq.heappop(q)
            self.clock.now = max(self.clock.now, at)
            if kind == _DONE:
                tr, version = payload
                if tr.version == version:
                    self._done(tr)
            elif kind == _DRAIN:
                tr, version = payload
                if tr.version == version and not tr.drained:
                    tr.drained = True
                    # Like the real daemon, the target gives its fetch slot back at
                    # the notice: the next pull must not wait behind this fetch.
                    self._free_slot(self.hosts[tr.target])
                    self._push(self.clock.now + self._delay(), _CENTER,
                               FetchDraining(job=tr.job, host=tr.target, file=tr.file,
                                             chunk=tr.chunk, peer=tr.peer))
            elif kind == _CENTER:
                self._deliver(payload)
            elif kind == _RELAYED:
                self._finish(payload, ok=True)
            elif kind == _CAUGHT_UP:
                tr, version = payload
                if tr.version == version and tr in self.hosts[tr.peer].up_flows:
                    self._reflow(self.hosts[tr.peer], self.hosts[tr.target])
            elif kind == _PULL:
                self._pull(payload)
            elif kind == _BEGIN:
                self._begin(*payload)
            elif kind == _TICK:
                self._deliver(Tick())
                self._push(self.clock.now + payload, _TICK, payload)
            elif kind == _BEAT:
                self._deliver(self._beat(payload))
                self._push(self.clock.now + self.beat_interval, _BEAT, payload)
        if not until_jobs_end or not q:
            self.clock.now = max(self.clock.now, min(deadline, q[0][0] if q else deadline))
        return self.clock.now - start

    # -- results ------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        sends = list(self.source_sends.values())
        targets = [h for h in self.hosts.values() if h.first_byte is not None]
        gaps = sum(h.gaps for h in targets)
        return {"max_source_sends": max(sends, default=0),
                "mean_source_sends": sum(sends) / len(sends) if sends else 0.0,
                "violations": list(self.violations), "cpu_seconds": self.cpu_seconds,
                "events": self.events_handled, "transfers": self.flows_started,
                "mean_slot_gap": sum(h.gap_seconds for h in targets) / gaps if gaps else 0.0,
                "mean_idle_seconds": (sum(h.idle_seconds for h in targets) / len(targets)
                                      if targets else 0.0)}

    def finish_times(self, job: str) -> dict[str, float]:
        """Seconds from submission to 'done' for every machine of ``job`` that finished."""
        j = self.sched.jobs[job]
        return {n: m.finished - j.created for n, m in j.machines.items()
                if m.ended == "done" and m.finished is not None}
