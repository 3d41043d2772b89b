"""The center's single writer: log, fsync, handle, then act.

Every request handler hands its event to ``Runner`` and awaits the answer.  One
coroutine (``_main``) takes whatever events are queued, and for each one
appends durable events to the REDO log and calls ``Scheduler.handle``; durable
decisions the core returns (``Commit``) are logged and handled at once, in the
same turn.  Then it fsyncs the log *once* for the whole turn (group commit),
and only then answers the requests and carries out the actions (pulls, packs,
callbacks).  So nothing a daemon or user was told can be lost in a crash.

On start the runner loads the newest checkpoint, replays the log through the
same core (actions discarded: their effects either happened or are recreated
by scheduling afresh), and feeds ``Recovered``.  Checkpoints are written by the
same coroutine between turns, every ``checkpoint_interval`` seconds or
``checkpoint_records`` records.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable

from fdship import protocol as P
from fdship.center.redolog import RedoLog
from fdship.center.schedules import run_schedule
from fdship.channel import call_or_http
from fdship.config import CenterConfig
from fdship.core import views
from fdship.core.actions import Action, AssignFetch, Commit, JobEnded, Pack
from fdship.core.events import (CallbackDelivered, CommandUndelivered, Event, HostReported,
                                Recovered, Tick, from_record)
from fdship.core.scheduler import Scheduler, Tunables
from fdship.core.schedules import RunSchedule
from fdship.daemon.client import DaemonClient
from fdship.errors import FdshipError, LogCorruptError, NotFound
from fdship.httpclient import call, close_keep_alive, peer_url

log = logging.getLogger("fdship.center")

TICK_SECONDS = 0.25
# How long a pull or pack over a daemon's channel may wait for its answer
# before it is sent over HTTP instead (the HTTP call's own timeout is 15 s).
COMMAND_TIMEOUT = 5.0
# Pulls go over a daemon's channel as notices (no answer, one frame less per
# chunk at both ends), so the center cannot know whether a channel that closed
# delivered the last ones: the fetches of those sent in this many seconds
# before it closed that are still in flight as assigned are sent again (over
# the daemon's next channel, or HTTP).  Two ping intervals: a channel whose
# frames stopped moving is closed within that (CHANNEL_PING, both ends).  A
# daemon takes a fetch it already runs from the same peer as a no-op.
PULL_RESEND_WINDOW = 20.0
EVENT_FLUSH_SECONDS = 0.1


def tunables_from(cfg: CenterConfig) -> Tunables:
    return Tunables(chunk_size=cfg.chunk_size, heartbeat_timeout=cfg.heartbeat_timeout,
                    grace_period=cfg.grace_period, max_uploads=cfg.max_uploads,
                    max_downloads=cfg.max_downloads, max_attempts=cfg.max_attempts,
                    fetch_timeout=cfg.fetch_timeout, retention=cfg.retention,
                    max_files=cfg.max_files, max_machines=cfg.max_machines,
                    upload_budget=cfg.upload_budget, download_budget=cfg.download_budget,
                    source_extra=cfg.source_extra, backoff_base=cfg.backoff_base,
                    backoff_cap=cfg.backoff_cap, stream_depth=cfg.stream_depth)


def describe_tunables(t: Tunables) -> str:
    """One log line with the scheduling settings a center runs with, read back from
    its scheduler (not from the config), so the log shows what is really in force."""
    return (f"scheduling: upload_budget={t.upload_budget:g} "
            f"download_budget={t.download_budget:g} source_extra={t.source_extra:g} "
            f"backoff_base={t.backoff_base:g}s backoff_cap={t.backoff_cap:g}s "
            f"max_attempts={t.max_attempts} max_uploads={t.max_uploads} "
            f"max_downloads={t.max_downloads} stream_depth={t.stream_depth}")


def encode_record(ev: Event, now: float) -> bytes:
    return json.dumps({"t": now, "e": ev.to_record()}, separators=(",", ":")).encode()


def decode_record(payload: bytes) -> tuple[Event, float]:
    obj = json.loads(payload)
    return from_record(obj["e"]), float(obj["t"])


class ReplayError(Exception):
    """A checkpoint or record whose checksums hold but whose content is not a center's."""

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(f"{what} ({type(cause).__name__}: {str(cause)[:200]})")
        self.what = what


def replay_into(sched: Scheduler, checkpoint: bytes | None, records: Any) -> int:
    """Rebuild durable state from a checkpoint and the records after it.

    The frames' checksums were verified on open; content that still does not
    decode or apply (a file rewritten with correct checksums around something
    else) raises ReplayError rather than a traceback, and the center does not start.
    """
    if checkpoint is not None:
        try:
            sched.restore(json.loads(checkpoint))
        except Exception as e:
            raise ReplayError("the newest checkpoint holds no state this center can read",
                              e) from None
    n = 0
    for payload in records:
        try:
            ev, t = decode_record(payload)
            sched.handle(ev, t)
        except Exception as e:
            raise ReplayError(f"record {n + 1} after the checkpoint cannot be replayed",
                              e) from None
        n += 1
    return n


@dataclass
class _Item:
    kind: str  # "event" | "admit" | "make"
    payload: Any
    fut: asyncio.Future[Any] | None  # None: a notice nobody waits for (``Runner.notify``)
    reply: Callable[[], Any] | None = None


class EventBus:
    """Recent changes for GET /center/events, with ids so clients can resume."""

    def __init__(self, keep: int = 20_000, first_id: int = 1) -> None:
        self.buf: deque[tuple[int, str, dict[str, Any]]] = deque(maxlen=keep)
        # Ids start from the wall clock in milliseconds, so they keep growing across
        # center restarts and a reconnecting client is never "ahead" of a new center.
        self.next_id = first_id
        self.cond = asyncio.Condition()

    async def publish(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        if not items:
            return
        for kind, data in items:
            self.buf.append((self.next_id, kind, data))
            self.next_id += 1
        async with self.cond:
            self.cond.notify_all()

    def since(self, last_id: int) -> list[tuple[int, str, dict[str, Any]]]:
        if not self.buf or last_id >= self.buf[-1][0]:
            return []
        first = self.buf[0][0]
        start = max(0, last_id + 1 - first)
        return list(self.buf)[start:]

    def oldest(self) -> int:
        return self.buf[0][0] if self.buf else self.next_id


def _pull_request(a: AssignFetch) -> P.PullRequest:
    """The wire message of a pull, whichever way it goes."""
    return P.PullRequest(job=a.job, files=a.files, fetches=a.fetches, chunk_size=a.chunk_size)


class Runner:
    def __init__(self, cfg: CenterConfig, token: str = "", metrics: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.token = token
        self.clock = clock
        self.metrics = metrics
        seed = cfg.seed or random.SystemRandom().randrange(1, 2**31)
        self.sched = Scheduler(tunables_from(cfg), seed=seed)
        self.redo = RedoLog(cfg.data_dir)
        self.inbox: asyncio.Queue[_Item] = asyncio.Queue()
        self.waiters: dict[str, list[asyncio.Future[Any]]] = {}
        self.bus = EventBus(first_id=int(clock() * 1000))
        self._tasks: list[asyncio.Task[Any]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        self._last_ckpt = 0.0
        self._records_since_ckpt = 0
        self._last_id = ""
        self._published: dict[tuple[str, str], dict[str, Any]] = {}
        self._host_published: dict[str, float] = {}
        self._stopping = False
        # The group commit's fdatasync runs here, off the event loop: while the
        # disk works, the loop keeps reading requests (they form the next
        # group); nothing is answered or acted on before its records are durable.
        self._fsync_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="fdship-fsync")
        self._syncing: asyncio.Future[None] | None = None
        self.replayed = 0
        self.stats = {"acks": 0, "nacks": 0, "pulls_sent": 0, "packs_sent": 0}
        self.command_counts = {"channel": 0, "http": 0}  # pulls and packs, by transport
        # Daemons' control channels by host name (fdship.channel.Endpoint): pulls
        # and packs go over them while they are up, over HTTP otherwise.
        self.channels: dict[str, Any] = {}
        # Per open channel: (monotonic time, pull) sent over it as notices in
        # the last PULL_RESEND_WINDOW seconds, oldest first.
        self._recent_pulls: dict[Any, deque[tuple[float, AssignFetch]]] = {}

    # ------------------------------------------------------------------ lifecycle

    def recover(self) -> list[str]:
        """Open the log and rebuild state (blocking; before serving)."""
        rec = self.redo.open()
        try:
            self.replayed = replay_into(self.sched, rec.checkpoint, rec.records)
        except ReplayError as e:
            self.redo.close()
            raise LogCorruptError(
                f"REDO log in {self.cfg.data_dir}: {e} (checkpoint at LSN "
                f"{rec.checkpoint_lsn}). Its checksums are right, so it was rewritten, not "
                "torn by a crash; the center will not guess. Restore the data dir from a "
                "backup, or move the damaged file out of it and start again.") from None
        self.sched.handle(Recovered(), self.clock())
        self._last_ckpt = self.clock()
        notes = list(rec.notes)
        notes.append(f"recovered {len(self.sched.jobs)} jobs and {len(self.sched.hosts)} hosts "
                     f"(checkpoint at LSN {rec.checkpoint_lsn}, {self.replayed} records replayed)")
        notes.append(describe_tunables(self.sched.t))
        if self.sched.jobs:
            self._last_id = max(self.sched.jobs)
        for job in self.sched.jobs.values():
            cs = job.callback_state
            if job.state != "running" and cs and cs.get("state") == "pending":
                self._spawn(self._deliver_callback(job.id))
        return notes

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._main()),
                       asyncio.ensure_future(self._ticker()),
                       asyncio.ensure_future(self._flusher())]

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks + list(self._bg):
            t.cancel()
        for t in self._tasks + list(self._bg):
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self._syncing is not None:  # cancelled mid-fsync: let the disk finish first
            try:
                await self._syncing
            except Exception:
                log.exception("REDO log fsync failed during shutdown")
            self._syncing = None
        self._fsync_pool.shutdown(wait=True)
        close_keep_alive()
        if self.redo.is_open:
            try:
                self._checkpoint()
            except Exception:  # a failing disk must not hang shutdown
                log.exception("final checkpoint failed")
            self.redo.close()

    # ------------------------------------------------------------------ API for handlers

    async def submit(self, ev: Event, reply: Callable[[], Any] | None = None) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.inbox.put(_Item("event", ev, fut, reply))
        return await fut

    def notify(self, ev: Event) -> None:
        """Queue a soft event and return at once: its sender waits for nothing.

        For hints like ``FetchDraining`` whose whole worth is arriving early.
        It is handled in the writer's next turn like any event; a turn made of
        soft events alone appends no record and so never fsyncs (see ``_main``).
        """
        if ev.durable:  # a durable event must be logged before anyone relies on it
            raise ValueError(f"{type(ev).__name__} is durable: submit it and wait")
        self.inbox.put_nowait(_Item("event", ev, None))

    async def admit(self, req: P.JobRequest) -> str:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.inbox.put(_Item("admit", req, fut))
        return str(await fut)

    async def decide(self, make: Callable[[float], Event],
                     reply: Callable[[], Any] | None = None) -> Any:
        """Run ``make(now)`` inside the single writer: a pure admission check that
        raises a 4xx or returns the durable event to log and handle (so two
        requests can never both pass a check that only one of them may)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.inbox.put(_Item("make", make, fut, reply))
        return await fut

    async def heartbeat(self, beat: P.Heartbeat) -> P.HeartbeatReply:
        def reply() -> P.HeartbeatReply:
            h = self.sched.hosts.get(beat.name)
            return P.HeartbeatReply(chunk_size=self.cfg.chunk_size,
                                    want_inventory=bool(h and h.want_inventory),
                                    live_jobs=tuple(self.sched.live_jobs_for(beat.name)))
        return await self.submit(HostReported(beat=beat), reply)  # type: ignore[no-any-return]

    async def wait_job(self, job_id: str, timeout: float) -> dict[str, Any]:
        job = self.sched.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (finished jobs are kept for the retention period)")
        if job.state == "running" and timeout > 0:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.waiters.setdefault(job_id, []).append(fut)
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                lst = self.waiters.get(job_id, [])
                if fut in lst:
                    lst.remove(fut)
        job = self.sched.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return views.job_result(job, self.clock())

    def new_job_id(self, now: float) -> str:
        t = time.gmtime(now)
        jid = time.strftime("%Y%m%dT%H%M%S", t) + f"{int(now * 1000) % 1000:03d}Z-" + \
            f"{random.getrandbits(16):04x}"
        if jid <= self._last_id:  # ids sort by creation time even within a millisecond
            jid = self._last_id[:-4] + f"{(int(self._last_id[-4:], 16) + 1) % 65536:04x}"
        self._last_id = jid
        return jid

    # ------------------------------------------------------------------ the writer

    async def _main(self) -> None:
        while True:
            items = [await self.inbox.get()]
            while not self.inbox.empty() and len(items) < 4096:
                items.append(self.inbox.get_nowait())
            now = self.clock()
            actions: list[Action] = []
            results: list[tuple[_Item, Any, BaseException | None]] = []
            appended = 0
            for it in items:
                try:
                    if it.kind == "admit":
                        ev = self.sched.admit(it.payload, self.new_job_id(now), now)
                        res: Any = ev.job
                    elif it.kind == "make":
                        ev, res = it.payload(now), None
                    else:
                        ev, res = it.payload, None
                    n, acts = self._process(ev, now)
                    appended += n
                    actions += acts
                    if it.reply is not None:
                        res = it.reply()
                    results.append((it, res, None))
                except FdshipError as e:
                    if it.fut is None:
                        log.debug("notice %r refused: %s", it.payload, e)
                    results.append((it, None, e))
                except Exception as e:  # a bug: answer 500, keep the center running
                    log.exception("scheduler failed on %r", it.payload)
                    results.append((it, None, e))
            # Only a turn that appended records fsyncs: one of soft events alone
            # (heartbeats of known hosts, ticks, drain notices) has nothing to make
            # durable, and answering it or acting on it waits for no disk.
            if appended:
                t0 = time.perf_counter()
                # Group commit: one fsync for the whole turn.
                self._syncing = asyncio.get_running_loop().run_in_executor(
                    self._fsync_pool, self.redo.sync)
                await self._syncing
                self._syncing = None
                if self.metrics is not None:
                    self.metrics.fsync.observe(time.perf_counter() - t0)
                self._records_since_ckpt += appended
            for it, res, err in results:
                if it.fut is None or it.fut.done():
                    continue
                if err is not None:
                    it.fut.set_exception(err)
                else:
                    it.fut.set_result(res)
            self._carry_out(actions)
            if (self._records_since_ckpt >= self.cfg.checkpoint_records
                    or (self._records_since_ckpt and
                        now - self._last_ckpt >= self.cfg.checkpoint_interval)):
                self._checkpoint()

    def _process(self, ev: Event, now: float) -> tuple[int, list[Action]]:
        """Log (if durable) and handle one event, then its committed decisions."""
        appended = 0
        out: list[Action] = []
        stack = [ev]
        while stack:
            e = stack.pop(0)
            if e.durable:
                self.redo.append(encode_record(e, now))
                appended += 1
            for a in self.sched.handle(e, now):
                if isinstance(a, Commit):
                    stack.append(a.event)
                else:
                    out.append(a)
        return appended, out

    def _checkpoint(self) -> None:
        state = json.dumps(self.sched.snapshot(), separators=(",", ":")).encode()
        self.redo.checkpoint(state, self.redo.lsn)
        self._last_ckpt = self.clock()
        self._records_since_ckpt = 0

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            await self.inbox.put(_Item("event", Tick(),
                                       asyncio.get_running_loop().create_future()))

    # ------------------------------------------------------------------ actions

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _carry_out(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, AssignFetch):
                self.stats["pulls_sent"] += len(a.fetches)
                # Written once this turn's answers are: the acks' answers come
                # from their handlers' tasks, which the futures just set wake
                # first.  A pull written right here went ahead of them, and 20
                # targets took 1.27 x S/B instead of 1.24 (docs/benchmarks.md).
                asyncio.get_running_loop().call_soon(self._pull_soon, a)
            elif isinstance(a, Pack):
                self.stats["packs_sent"] += 1
                self._spawn(self._send_pack(a))
            elif isinstance(a, JobEnded):
                self._job_ended(a)
            elif isinstance(a, RunSchedule):
                self._spawn(run_schedule(self, a))

    def host_view(self, name: str, now: float) -> dict[str, Any]:
        """A host as ``GET /center/hosts`` shows it, with whether its control channel is up."""
        v = views.host_view(self.sched, name, now)
        ch = self.channels.get(name)
        v["channel"] = ch is not None and ch.open
        return v

    def attach_channel(self, host: str, endpoint: Any) -> None:
        old = self.channels.get(host)
        self.channels[host] = endpoint
        endpoint.on_closed = functools.partial(self._channel_closed, endpoint)
        if old is not None and old is not endpoint:
            old.closed("replaced by a new channel from the same daemon")

    def _pull_soon(self, a: AssignFetch) -> None:
        """Send a pull as a notice over the target's channel, else as a request."""
        if not self._notify_pull(a):
            self._spawn(self._send_pull(a))

    def _notify_pull(self, a: AssignFetch) -> bool:
        """Send a pull over the target's channel as a notice; False if it has none open."""
        ep = self.channels.get(a.target)
        if ep is None or not ep.open:
            return False
        req = _pull_request(a)
        if not ep.notify("pull", req.to_json()):
            return False
        self.command_counts["channel"] += 1
        now = time.monotonic()
        recent = self._recent_pulls.setdefault(ep, deque())
        while recent and now - recent[0][0] > PULL_RESEND_WINDOW:
            recent.popleft()
        recent.append((now, a))
        return True

    def _channel_closed(self, endpoint: Any) -> None:
        """A channel closed: send again the pulls it may not have delivered."""
        recent = self._recent_pulls.pop(endpoint, None)
        if not recent or self._stopping:
            return
        now = time.monotonic()
        again = []
        for t, a in recent:
            fetches = views.still_assigned(self.sched, a.job, a.target, a.fetches) \
                if now - t <= PULL_RESEND_WINDOW else ()
            if fetches:
                again.append(replace(a, fetches=fetches))
        if again:
            log.info("host=%s channel closed: sending %d fetch(es) of its last pulls again",
                     again[0].target, sum(len(a.fetches) for a in again))
        for a in again:
            self._pull_soon(a)  # over the next channel if it is up already

    def detach_channel(self, host: str, endpoint: Any) -> None:
        if self.channels.get(host) is endpoint:
            del self.channels[host]

    async def _command(self, host: str, op: str, body: dict[str, Any],
                       http: Callable[[], Awaitable[Any]]) -> Any:
        """Send a pull or pack over the host's channel, or over HTTP when it has none."""
        return await call_or_http(self.channels.get(host), op, body, COMMAND_TIMEOUT, http,
                                  self.command_counts)

    async def _send_pull(self, a: AssignFetch) -> None:
        """Send a pull whose target had no channel open: over HTTP (or a channel
        opened since), answered."""
        req = _pull_request(a)
        try:
            # A pull sits between two chunks on the target's link: over a kept-alive
            # connection it costs one round trip, not a handshake more.
            await self._command(a.target, "pull", req.to_json(), lambda: DaemonClient(
                peer_url(a.address), self.token, keep_alive=True).pull(req))
        except FdshipError as e:
            log.warning("job=%s host=%s pull not delivered: %s", a.job, a.target, e)
            await self.inbox.put(_Item("event", CommandUndelivered(
                job=a.job, host=a.target, fetches=tuple((f.file, f.chunk) for f in a.fetches),
                error=f"pull not delivered: {e}"), asyncio.get_running_loop().create_future()))

    async def _send_pack(self, a: Pack) -> None:
        req = P.PackRequest(job=a.job, file=a.file, chunk_size=a.chunk_size, notify=a.notify,
                            last=a.last, files_total=a.files_total)
        try:
            await self._command(a.target, "pack", req.to_json(), lambda: DaemonClient(
                peer_url(a.address), self.token, keep_alive=True).pack(req))
        except FdshipError as e:
            log.warning("job=%s host=%s pack not delivered: %s", a.job, a.target, e)
            await self.inbox.put(_Item("event", CommandUndelivered(
                job=a.job, host=a.target, pack_file=-2 if a.notify else a.file.file,
                error=f"pack not delivered: {e}"), asyncio.get_running_loop().create_future()))

    def _job_ended(self, a: JobEnded) -> None:
        job = self.sched.jobs.get(a.job)
        log.info("job=%s ended state=%s", a.job, a.state)
        if self.metrics is not None and job is not None and job.finished is not None:
            self.metrics.jobs.labels(state=a.state).inc()
            self.metrics.job_seconds.observe(job.finished - job.created)
        for fut in self.waiters.pop(a.job, []):
            if not fut.done():
                fut.set_result(a.state)
        if job is not None and job.callback:
            self._spawn(self._deliver_callback(a.job))

    async def _deliver_callback(self, job_id: str) -> None:
        """POST the job result to its callback URL, retrying with backoff."""
        err = ""
        attempt = 0
        max_attempts = self.cfg.callback_attempts
        for attempt in range(1, max_attempts + 1):
            job = self.sched.jobs.get(job_id)
            if job is None:
                return
            result = views.job_result(job, self.clock())
            try:
                await call("POST", job.callback, result, timeout=30, cluster=False)
                ok = True
                break
            except FdshipError as e:
                err = str(e)
                log.warning("job=%s callback attempt %d to %s failed: %s", job_id, attempt,
                            job.callback, err)
                if attempt < max_attempts:  # no pointless wait after the last one
                    await asyncio.sleep(min(60.0, 0.5 * 2 ** (attempt - 1)) *
                                        (0.5 + random.random()))
        else:
            ok = False
        try:
            await self.submit(CallbackDelivered(job=job_id, ok=ok, attempts=attempt,
                                                error="" if ok else err))
        except FdshipError:
            log.exception("job=%s could not record callback outcome", job_id)

    # ------------------------------------------------------------------ event stream

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(EVENT_FLUSH_SECONDS)
            try:
                await self.bus.publish(self._changes())
            except Exception:
                log.exception("event stream flush failed")

    def _changes(self) -> list[tuple[str, dict[str, Any]]]:
        now = self.clock()
        out: list[tuple[str, dict[str, Any]]] = []
        s = self.sched
        jobs, s.dirty_jobs = s.dirty_jobs, set()
        hosts, s.dirty_hosts = s.dirty_hosts, set()
        for jid in sorted(jobs):
            job = s.jobs.get(jid)
            if job is None:
                continue
            out.append(("job", views.job_summary(job, now)))
            for name, m in job.machines.items():
                row = views.machine_view(job, m, now)
                row.pop("rate")
                row.pop("eta")
                key = (jid, name)
                if self._published.get(key) != row:
                    self._published[key] = row
                    full = views.machine_view(job, m, now)
                    full.update(job=jid, name=name)
                    out.append(("machine", full))
        for name in sorted(hosts):
            # Heartbeats mark a host dirty every second; publish each at most every 2 s.
            if name in s.hosts and now - self._host_published.get(name, 0) >= 2.0:
                self._host_published[name] = now
                out.append(("host", self.host_view(name, now)))
            elif name in s.hosts:
                s.dirty_hosts.add(name)
        if len(self._published) > 200_000:
            self._published.clear()
        return out
