"""The daemon process: one per server, doing what the center says.

It plays every role of the seed's protocol on its machine:

* source: ``POST /daemon/api`` snapshots the files into the store (hashing
  every chunk in the same pass), submits the job to the center, and waits for
  the result (or returns at once when a callback is given);
* peer: ``GET /daemon/download`` serves held chunks with sendfile
  (:mod:`fdship.daemon.serve`), and chunks still arriving here as their bytes
  land (cut-through, :mod:`fdship.daemon.arrivals`);
* target: ``POST /daemon/pull`` starts fetches from the named peers
  (:mod:`fdship.daemon.fetch`), each verified and then acked to the center in
  batches.  A fetch whose last bytes are due within ``fetch_lead`` seconds
  tells the center at once (``POST /center/draining``, no batching timer) and
  gives back its download slot, so the next chunk is assigned and starts
  flowing while this one ends; ``POST /daemon/pack`` verifies, fsyncs and renames a file into
  place and reports ``/center/fin``, then runs the job's notify hook;
* reporter: a heartbeat every ~1 s with load (psutil), free space, caps and,
  when registering, the inventory of what it holds (over the control channel
  while it is up, except a registration; HTTP otherwise).

The daemon keeps no state the center depends on except the bytes in its
store; everything else is rebuilt from the center's answers, so it can be
restarted at any moment.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import stat
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import tornado.netutil
import tornado.web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fdship import __version__
from fdship import protocol as P
from fdship.center.client import CenterChannel, CenterClient
from fdship.channel import call_or_http
from fdship.config import DaemonConfig, parse_hostport, read_token
from fdship.daemon.arrivals import Arrival, Arrivals
from fdship.daemon.delta import DeltaFetcher, DeltaHandler
from fdship.daemon.fetch import FetchError, PeerPool
from fdship.daemon.hooks import HookRunner
from fdship.daemon.load import LoadSampler
from fdship.daemon.ratelimit import RateLimiter
from fdship.daemon.serve import DownloadHandler, ServeStats, Submissions
from fdship.daemon.store import Store, free_space, hash_range
from fdship.errors import (BadRequest, ConfigError, FdshipError, IntegrityError, LocalIOError,
                           NotFound, Unavailable, Unprocessable)
from fdship.httpclient import close_keep_alive, cluster_ssl_context, configure_tls
from fdship.web import (BaseHandler, MetricsHandler, NotFoundHandler, make_server,
                        server_ssl_context, stop_signal)

log = logging.getLogger("fdship.daemon")

ACK_FLUSH_SECONDS = 0.005
# Drain notices: sent at once, at most this many requests in flight; more wait
# (bounded) and leave together.  A notice older than DRAIN_MAX_AGE is dropped:
# its fetch has ended and its ack says more.
DRAINS_IN_FLIGHT = 2
DRAIN_QUEUE = 256
DRAIN_BATCH = 64
DRAIN_MAX_AGE = 2.0
# Longest a heartbeat waits for its answer on the control channel before it is
# sent again over HTTP (the interval's double, at least 1 s): well inside the
# center's heartbeat_timeout (5 s by default), so a stalled channel delays a
# beat but never makes this host look dead.
BEAT_CHANNEL_MAX_WAIT = 2.0


def _under(path: str, directory: str) -> bool:
    directory = directory.rstrip("/") or "/"
    return directory == "/" or path == directory or path.startswith(directory + "/")


class DaemonMetrics:
    """A Prometheus collector reading the daemon's plain counters at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.registry = CollectorRegistry()
        self.registry.register(self)  # type: ignore[arg-type]

    def collect(self) -> Any:
        d = self.d
        s, f = d.serve_stats, d.pool.stats
        yield CounterMetricFamily("fdship_bytes_served", "Chunk bytes served to peers",
                                  value=s.bytes_served)
        yield CounterMetricFamily("fdship_bytes_received", "Chunk bytes fetched from peers",
                                  value=f.bytes_received)
        yield CounterMetricFamily("fdship_chunks_fetched", "Chunks fetched and verified",
                                  value=f.chunks_ok)
        c = CounterMetricFamily("fdship_chunk_fetch_failures", "Chunk fetches that failed",
                                labels=["reason"])
        for k, v in sorted(f.failures.items()):
            c.add_metric([k], v)
        yield c
        yield CounterMetricFamily("fdship_hash_mismatches", "Chunks whose xxh3 did not match",
                                  value=f.failures.get(P.FAIL_HASH, 0))
        yield GaugeMetricFamily("fdship_uploads_in_flight", "Chunks being served",
                                value=s.uploads_in_flight)
        yield CounterMetricFamily("fdship_chunks_streamed", "Chunks served on while they were "
                                  "still arriving here (cut-through)", value=s.streamed)
        yield CounterMetricFamily("fdship_downloads_before_pull", "Requests for a chunk relayed "
                                  "through here that came before this daemon's own pull of it "
                                  "(they wait for it)", value=s.awaited_pulls)
        yield CounterMetricFamily("fdship_downloads_before_commit", "Requests that came while "
                                  "a submission of this daemon awaited the center's answer "
                                  "(they wait for it)", value=s.awaited_submissions)
        yield CounterMetricFamily("fdship_writeback_bytes", "Bytes of verified chunks handed "
                                  "to the kernel's writeback before the pack-time fsync",
                                  value=d.store.writeback_bytes)
        wk = CounterMetricFamily("fdship_data_wakeups", "Event-loop wake-ups on chunk "
                                 "connections: socket reads that delivered bytes (receive), "
                                 "sendfile waits for a full socket (send)",
                                 labels=["direction"])
        wk.add_metric(["receive"], f.reads)
        wk.add_metric(["send"], s.send_waits)
        yield wk
        yield GaugeMetricFamily("fdship_downloads_in_flight", "Chunks being fetched",
                                value=f.in_flight)
        w = CounterMetricFamily("fdship_rate_limit_waits", "Times a transfer waited for the "
                                "rate cap", labels=["direction"])
        w.add_metric(["upload"], d.up_limiter.waits)
        w.add_metric(["download"], d.down_limiter.waits)
        yield w
        yield GaugeMetricFamily("fdship_heartbeat_age_seconds", "Seconds since the center last "
                                "answered a heartbeat",
                                value=time.monotonic() - d.last_beat_ok if d.last_beat_ok else -1)
        yield CounterMetricFamily("fdship_files_installed", "Files packed into place",
                                  value=d.counters["packed"])
        dn = CounterMetricFamily("fdship_drain_notices", "Notices that a fetch is about to "
                                 "finish: sent to the center, failed to send, or dropped "
                                 "(queue full or too old)", labels=["outcome"])
        for k, v in d.drain_counts.items():
            dn.add_metric([k], v)
        yield dn
        ds = d.delta.stats
        r = CounterMetricFamily("fdship_delta_chunks", "Chunks built from the old copy at the "
                                "destination", labels=["how"])
        r.add_metric(["local"], ds.chunks_local)
        r.add_metric(["patched"], ds.chunks_patched)
        r.add_metric(["full"], ds.chunks_full)
        yield r
        yield CounterMetricFamily("fdship_delta_bytes_reused", "Chunk bytes taken from the old "
                                  "copy instead of the network", value=ds.bytes_reused)


class Daemon:
    def __init__(self, cfg: DaemonConfig, token: str = "") -> None:
        self.cfg = cfg
        self.token = token
        self.name = cfg.name
        self.boot_id = uuid.uuid4().hex
        # The store confines writes to the same directories the checks below
        # allow (reached through directory fds, links below them refused), and
        # refuses hard-linked sources while allow_source confines them.
        self.store = Store(cfg.data_dir, cfg.root, allow_dest=cfg.allow_dest,
                           allow_hardlinked_sources=cfg.allow_hardlinked_sources,
                           write_behind=cfg.write_behind)
        self.up_limiter = RateLimiter(cfg.upload_rate)
        self.down_limiter = RateLimiter(cfg.download_rate)
        # TLS is all or nothing across a cluster: serving HTTPS means peers do too.
        self.pool = PeerPool(token=token, limiter=self.down_limiter,
                             ssl=cluster_ssl_context() if cfg.tls_cert else None,
                             connect_timeout=cfg.connect_timeout,
                             stall_timeout=cfg.fetch_stall_timeout, drain_lead=cfg.fetch_lead,
                             receive_batch=cfg.receive_batch)
        self.serve_stats = ServeStats()
        self.submissions = Submissions()  # this daemon's submissions awaiting the center
        # Ship only what changed: chunks the old copy at the destination still holds.
        self.delta = DeltaFetcher(token=token, limiter=self.down_limiter,
                                  connect_timeout=cfg.connect_timeout)
        # Heartbeats, acks and drain notices go out many times a second: over
        # kept-alive connections, not a new handshake each.
        self.center = CenterClient(cfg.center, token, keep_alive=True)
        # Acks, drain notices and the center's pulls and packs come once per
        # chunk: over the control channel while it is up (one frame each, not
        # a request), over HTTP whenever it is not.
        self.channel = CenterChannel(cfg.center, token, self.name, {
            "pull": self._channel_pull, "pack": self._channel_pack,
        }) if cfg.control_channel else None
        self.report_counts = {"channel": 0, "http": 0}
        self.beat_counts = {"channel": 0, "http": 0}  # heartbeats, by the way they went
        # The channel whose center answered that it takes no heartbeats (an older
        # center): beats go over HTTP until a new channel opens.
        self._beats_refused: object = None
        self.hooks = HookRunner(cfg.hooks)
        # Hooks run once per job: a pack for the hook repeated by a restarted
        # center re-sends the recorded outcome instead of running it again.
        self.hook_runs: dict[str, asyncio.Task[Any]] = {}
        self.hook_results: dict[str, P.Fin] = {}
        self.chunk_size: int | None = None
        self.want_inventory = True
        self.last_beat_ok = 0.0
        self.active: dict[tuple[str, int, int], asyncio.Task[Any]] = {}
        self.active_peer: dict[tuple[str, int, int], str] = {}  # whom each fetch asks
        # Each active fetch's progress, for serving the chunk on while it arrives.
        self.arrivals = Arrivals()
        self.fetch_slots = asyncio.Semaphore(max(1, cfg.max_downloads))
        self.acks: deque[P.Ack] = deque()
        self.ack_event = asyncio.Event()
        self.drains: deque[tuple[float, P.Drain]] = deque()
        self.drains_in_flight = 0
        self.drain_counts = {"sent": 0, "failed": 0, "dropped": 0}
        # Held by an inventory heartbeat from building it until the center answers,
        # and by every ack batch and job submission in flight (see _heartbeats).
        self.report_lock = asyncio.Lock()
        self.packs: dict[tuple[str, int], asyncio.Task[Any]] = {}
        self.not_live: dict[str, int] = {}
        self.counters = {"packed": 0, "pack_failed": 0}
        self.sampler = LoadSampler(tuple(cfg.watch_pidfile))
        self._tasks: list[asyncio.Task[Any]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        root = self.root_real = os.path.realpath(cfg.root)
        self.allow_dest_real = [os.path.realpath(d) for d in cfg.allow_dest]
        self.allow_source_real = [os.path.realpath(d) for d in cfg.allow_source]
        # Allowed destinations as (the center's view: a path before --root mapping,
        # the real directory on this machine).
        self.allow_dest_pairs: list[tuple[str, str]] = []
        for d in self.allow_dest_real:
            if root == "/":
                self.allow_dest_pairs.append((d, d))
            elif _under(d, root):
                view = "/" if d == root else "/" + os.path.relpath(d, root)
                self.allow_dest_pairs.append((view, d))
            else:
                log.warning("allow_dest %s is outside root %s: no destination can match it", d,
                            root)
        self.allow_dest_view = [v for v, _ in self.allow_dest_pairs]
        self.metrics = DaemonMetrics(self)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._heartbeats()),
                       asyncio.ensure_future(self._ack_sender())]
        if self.channel is not None:
            self.channel.start()

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.stop()
        for t in self._tasks + list(self.active.values()) + list(self._bg):
            t.cancel()
        for t in self._tasks + list(self.active.values()) + list(self._bg):
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        await self.pool.close()
        close_keep_alive()
        self.store.close()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)
        return t

    # ------------------------------------------------------------------ heartbeats

    def _free(self) -> dict[str, int]:
        out = {}
        dirs = self.allow_dest_pairs or [("/", os.path.realpath(self.cfg.root))]
        for view, real in dirs:
            try:
                out[view] = free_space(real)
            except OSError:
                pass
        return out

    def beat(self) -> P.Heartbeat:
        ld = self.sampler.sample()
        load = P.Load(cpu=ld["cpu"], loadavg=ld["loadavg"], net_tx=ld["net_tx"],
                      net_rx=ld["net_rx"], disk_busy=ld["disk_busy"], app_cpu=ld["app_cpu"],
                      app_cpu_busy=self.cfg.watch_busy_cpu,
                      uploads=self.serve_stats.uploads_in_flight,
                      downloads=self.pool.stats.in_flight,
                      bytes_served=self.serve_stats.bytes_served,
                      bytes_received=self.pool.stats.bytes_received)
        return P.Heartbeat(name=self.name, address=self.cfg.advertise, boot_id=self.boot_id,
                           labels=tuple(self.cfg.label), load=load, free=self._free(),
                           allow_dest=tuple(self.allow_dest_view), hooks=self.hooks.names(),
                           max_uploads=self.cfg.max_uploads, max_downloads=self.cfg.max_downloads,
                           version=__version__, streams=True,
                           upload_rate=self.cfg.upload_rate or 0,
                           download_rate=self.cfg.download_rate or 0,
                           inventory=tuple(self.store.inventory()) if self.want_inventory else None)

    async def _heartbeats(self) -> None:
        failures = 0
        while True:
            try:
                if self.want_inventory:
                    # An inventory pictures the store at one moment.  An ack or a
                    # submission sent after that moment could reach the center
                    # before the picture does, which would then "lose" that chunk
                    # (refetched) or that job's snapshot (job failed).  So they take
                    # turns: the picture is taken once nothing is in flight.
                    async with self.report_lock:
                        reply = await self._send_beat(self.beat())
                else:
                    reply = await self._send_beat(self.beat())
                if failures:
                    log.info("center %s reachable again", self.cfg.center)
                failures = 0
                self.last_beat_ok = time.monotonic()
                self.chunk_size = reply.chunk_size
                self.want_inventory = reply.want_inventory
                self._drop_finished(set(reply.live_jobs))
                await asyncio.sleep(self.cfg.heartbeat_interval)
            except asyncio.CancelledError:
                raise
            except FdshipError as e:
                failures += 1
                self.want_inventory = True  # the center may have restarted: re-register fully
                if failures == 1 or failures % 30 == 0:
                    log.warning("heartbeat to %s failed (%d in a row): %s", self.cfg.center,
                                failures, e)
                await asyncio.sleep(min(5.0, self.cfg.heartbeat_interval * (1 + failures / 4)))
            except Exception:
                log.exception("heartbeat failed")
                await asyncio.sleep(self.cfg.heartbeat_interval)

    async def _send_beat(self, beat: P.Heartbeat) -> P.HeartbeatReply:
        """One heartbeat: over the control channel while it is up, else over HTTP.

        A beat is one small frame on the channel instead of a request at both
        ends: on a fleet of thousands, heartbeats are most of the center's
        requests.  A registration (a beat with the inventory, which can be
        large) always goes over HTTP, as does every beat when the channel is
        down, does not answer in time, or belongs to a center that does not
        take heartbeats on it.  The center applies a beat it gets twice as the
        newer report of the same state.
        """
        ch = self.channel
        ep = ch.endpoint if ch is not None else None
        if ch is not None and ch.open and beat.inventory is None and ep is not self._beats_refused:
            wait = min(BEAT_CHANNEL_MAX_WAIT, max(1.0, 2 * self.cfg.heartbeat_interval))
            try:
                res = await ch.call("heartbeat", beat.to_json(), wait)
                reply = P.HeartbeatReply.from_json(res)
                self.beat_counts["channel"] += 1
                return reply
            except Unavailable as e:
                log.info("heartbeat over the control channel failed (%s); sending it over "
                         "HTTP", e)
            except BadRequest as e:
                if e.status != 404:
                    raise  # the center refused the beat itself: HTTP would say the same
                self._beats_refused = ep
                log.info("the center takes no heartbeats on the control channel (%s); they "
                         "go over HTTP", e)
        self.beat_counts["http"] += 1
        return await self.center.heartbeat(beat)

    def _drop_finished(self, live: set[str]) -> None:
        """Forget staging and snapshots of jobs the center no longer runs.

        A job must be reported not-live twice in a row: a job submitted a moment
        ago may be missing from a reply computed just before it was accepted.
        """
        for job in self.store.jobs():
            if job in live or any(k[0] == job for k in self.active):
                self.not_live.pop(job, None)
                continue
            n = self.not_live[job] = self.not_live.get(job, 0) + 1
            if n >= 2:
                log.info("job=%s over: dropping its staging and snapshots", job)
                self.store.drop_job(job)
                self.not_live.pop(job, None)

    # ------------------------------------------------------------------ acks

    async def _report(self, op: str, body: dict[str, Any],
                      http: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
        """Send an ack batch or drain notices: over the channel if it is up, else HTTP.

        The center applies an ack it already has, or a stale notice, as a
        no-op, so one sent again over HTTP after a failed channel call is safe.
        """
        return await call_or_http(self.channel, op, body, timeout, http, self.report_counts)

    async def _channel_pull(self, body: Any) -> Any:
        return {"accepted": await self.pull(P.PullRequest.from_json(body))}

    async def _channel_pack(self, body: Any) -> Any:
        self.pack(P.PackRequest.from_json(body))
        return {"accepted": True}

    def queue_ack(self, ack: P.Ack) -> None:
        self.acks.append(ack)
        self.ack_event.set()

    async def _ack_sender(self) -> None:
        """Send acks in batches; hold them (in order) while the center is away."""
        failures = 0
        while True:
            await self.ack_event.wait()
            await asyncio.sleep(ACK_FLUSH_SECONDS)  # let a few acks gather
            batch = [self.acks[i] for i in range(min(len(self.acks), 1000))]
            try:
                async with self.report_lock:
                    ab = P.AckBatch(host=self.name, acks=tuple(batch))
                    await self._report("ack", ab.to_json(), lambda: self.center.ack(ab))
                for _ in batch:
                    self.acks.popleft()
                failures = 0
            except BadRequest as e:
                log.error("center refused %d acks: %s", len(batch), e)
                for _ in batch:
                    self.acks.popleft()
            except FdshipError as e:
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("acks to center failed (%d in a row), will retry: %s", failures, e)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** min(failures, 5)) * (0.5 + random.random()))
            if not self.acks:
                self.ack_event.clear()

    # ------------------------------------------------------------------ drain notices

    def _drain_notice(self, job: str, f: P.Fetch,
                      release: Callable[[], None]) -> Callable[[], None]:
        """The ``on_drain`` of one fetch: free its download slot and tell the center.

        Called from the fetch's read path, so it only queues; the center frees
        the fetch's two slots on the notice too, and the pull it then sends
        finds this daemon's slot free.
        """
        def fire() -> None:
            release()
            if len(self.drains) >= DRAIN_QUEUE:
                self.drains.popleft()
                self.drain_counts["dropped"] += 1
            self.drains.append((time.monotonic(), P.Drain(job=job, file=f.file, chunk=f.chunk,
                                                          peer=f.peer_name)))
            if self.drains_in_flight < DRAINS_IN_FLIGHT:
                self.drains_in_flight += 1
                self.spawn(self._send_drains())
        return fire

    async def _send_drains(self) -> None:
        """Send queued notices until none is left; fire and forget.

        Over the channel each batch is a one-way frame (the center sends no
        answer); over HTTP it is a request whose answer is awaited.  A notice
        that cannot be sent is only logged (at debug): it is a hint, and the
        fetch's ack follows whatever happens to it.
        """
        try:
            while self.drains:
                now = time.monotonic()
                batch: list[P.Drain] = []
                while self.drains and len(batch) < DRAIN_BATCH:
                    t, d = self.drains.popleft()
                    if now - t > DRAIN_MAX_AGE:
                        self.drain_counts["dropped"] += 1
                    else:
                        batch.append(d)
                if not batch:
                    continue
                db = P.DrainBatch(host=self.name, drains=tuple(batch))
                body = db.to_json()
                if self.channel is not None and self.channel.notify("draining", body):
                    # A notice: the center sends no answer, which spares it a
                    # frame per fetch; a lost one costs only the head start.
                    self.report_counts["channel"] += 1
                    self.drain_counts["sent"] += len(batch)
                    continue
                try:
                    await self._report("draining", body, lambda: self.center.draining(db),
                                       timeout=5.0)
                    self.drain_counts["sent"] += len(batch)
                except FdshipError as e:
                    self.drain_counts["failed"] += len(batch)
                    log.debug("drain notice for %d fetch(es) not delivered: %s", len(batch), e)
        finally:
            self.drains_in_flight -= 1

    async def send_fin(self, fin: P.Fin) -> None:
        """Report a pack or hook outcome, retrying until the center takes it."""
        for attempt in range(1, 10_000):
            try:
                await self.center.fin(fin)
                return
            except BadRequest as e:
                log.error("job=%s center refused fin: %s", fin.job, e)
                return
            except FdshipError as e:
                if attempt == 1 or attempt % 30 == 0:
                    log.warning("job=%s fin to center failed, will retry: %s", fin.job, e)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** min(attempt, 5)) * (0.5 + random.random()))

    # ------------------------------------------------------------------ target: pull

    def check_dest_allowed(self, final: str) -> None:
        # The directory is resolved, the name is not: the install renames onto the
        # name, which replaces a symbolic link planted there instead of following it.
        try:
            real = os.path.join(os.path.realpath(os.path.dirname(final)),
                                os.path.basename(final))
        except OSError as e:
            # realpath reads each link it meets; one swapped for a directory
            # between its lstat and its readlink fails with EINVAL.  Only a
            # directory changing under us does that: refuse this destination
            # (the center retries elsewhere or reports it) rather than answer 500.
            raise LocalIOError(f"destination {final} cannot be checked on {self.name}: a "
                               f"directory on its way changed while it was resolved "
                               f"({e.strerror}); try again, and check that nothing keeps "
                               "replacing directories there with links") from None
        if self.allow_dest_real and not any(_under(real, d) for d in self.allow_dest_real):
            raise LocalIOError(f"destination {final} is not allowed on {self.name}: it resolves "
                               f"to {real}, outside allow_dest ({', '.join(self.cfg.allow_dest)})")
        # Every destination is written under --root: a symbolic link inside it must
        # not lead the write elsewhere.
        if self.root_real != "/" and not _under(real, self.root_real):
            raise LocalIOError(f"destination {final} is not allowed on {self.name}: it resolves "
                               f"to {real}, outside the root {self.cfg.root}")

    def source_allowed(self, real: str) -> bool:
        """Whether a file opened for shipping (by its resolved path) lies under allow_source."""
        return not self.allow_source_real or any(_under(real, d) for d in self.allow_source_real)

    async def pull(self, req: P.PullRequest) -> int:
        loop = asyncio.get_running_loop()
        bad: dict[int, str] = {}
        stagings = {}
        chunk_size = self._job_chunk_size(req)
        for sf in req.files:
            have = self.store.staging(req.job, sf.file)
            if have is not None and have.describes(sf.dest, sf.size, sf.xxh3, chunk_size):
                # Every pull after a file's first: the destination was checked and
                # the temp file opened then (writes go to that fd, never by path
                # again), so neither the check's lookups nor a thread hop is needed.
                stagings[sf.file] = have
                continue
            try:
                self.check_dest_allowed(self.store.final_path(sf.dest))
                stagings[sf.file] = await loop.run_in_executor(
                    None, self.store.open_staging, req.job, sf.file, sf.dest, sf.size, sf.xxh3,
                    chunk_size)
            except FdshipError as e:
                log.warning("job=%s cannot stage file %d at %s: %s", req.job, sf.file, sf.dest, e)
                bad[sf.file] = str(e)
        started = 0
        for f in req.fetches:
            key = (req.job, f.file, f.chunk)
            if f.file in bad:
                self.queue_ack(P.Ack(job=req.job, file=f.file, chunk=f.chunk, peer=f.peer_name,
                                     ok=False, kind=P.FAIL_LOCAL, error=bad[f.file]))
                continue
            st = stagings.get(f.file) or self.store.staging(req.job, f.file)
            if st is None:
                self.queue_ack(P.Ack(job=req.job, file=f.file, chunk=f.chunk, peer=f.peer_name,
                                     ok=False, kind=P.FAIL_LOCAL,
                                     error=f"pull for file {f.file} came without its staging "
                                           "description"))
                continue
            if f.chunk in st.verified:  # already here (e.g. the ack was lost): ack again
                self.queue_ack(P.Ack(job=req.job, file=f.file, chunk=f.chunk, peer=f.peer_name,
                                     ok=True, nbytes=0))
                continue
            running = self.active.get(key)
            if running is not None:
                if self.active_peer.get(key) == f.peer_name:
                    continue  # already fetching it (the center re-sent after a restart)
                # The center moved the chunk to another peer: it gave up on the one
                # we are waiting for (dead, or hung with the connection open, which
                # would hold this chunk until the fetch timeout).  Cancelling closes
                # that connection, so no stale byte reaches the file.
                running.cancel()
            # Registered before the fetch waits for a slot: from now on a GET for
            # this chunk waits for its bytes rather than being refused.  Opening
            # it fails the replaced fetch's arrival, if any.
            arrival = self.arrivals.open(key, f.offset, f.size)
            task = self.active[key] = asyncio.ensure_future(self._fetch(req.job, f, st, arrival))
            # A task cancelled before its first step never runs its finally.
            task.add_done_callback(functools.partial(self._arrival_over, arrival))
            self.active_peer[key] = f.peer_name
            started += 1
        return started

    def _arrival_over(self, arrival: Arrival, _task: asyncio.Task[Any]) -> None:
        self.arrivals.close(arrival, "the fetch was cancelled before it started")

    def _job_chunk_size(self, req: P.PullRequest) -> int:
        """The job's chunk size: the pull's, or for a center that does not send
        it, what the fetches prove.

        One pull stages several files, so the size must be the job's, never
        one file's: a chunk 0 that is a whole small file says nothing (it once
        came first in a pull and its length was taken for the job's chunk size,
        and the other file's staging then no longer matched: the machine
        failed).  A chunk past 0 gives it exactly, as does a chunk 0 shorter
        than its file; else the center's default from the heartbeat reply.
        """
        if req.chunk_size > 0:
            return req.chunk_size
        sizes = {sf.file: sf.size for sf in req.files}
        for f in req.fetches:
            if f.chunk > 0:
                return f.offset // f.chunk
        for f in req.fetches:
            if f.chunk == 0 and 0 < f.size < sizes.get(f.file, 0):
                return f.size
        return self.chunk_size or P.DEFAULT_CHUNK_SIZE

    async def _fetch(self, job: str, f: P.Fetch, st: Any, arrival: Arrival) -> None:
        key = (job, f.file, f.chunk)
        t0 = time.monotonic()
        held = False

        def release() -> None:
            # Once: at the drain notice (the center reuses the slot then too) or
            # when the fetch ends, whichever comes first.
            nonlocal held
            if held:
                held = False
                self.fetch_slots.release()

        try:
            await self.fetch_slots.acquire()
            held = True
            try:
                local, wire = False, 0.0
                got = await self.delta.fetch(job, f, st.final_path, st.write_fd,
                                             self.cfg.fetch_timeout)
                if got is not None and got.ok:
                    n, local = got.nbytes, got.local
                else:
                    on_drain = self._drain_notice(job, f, release) if self.cfg.fetch_lead > 0 \
                        else None
                    t_wire = time.monotonic()
                    arrival.start()
                    n = await self.pool.fetch(f.peer, job, f.file, f.chunk, f.size, f.xxh3,
                                              st.write_fd, f.offset, self.cfg.fetch_timeout,
                                              on_drain=on_drain, on_progress=arrival.progress,
                                              relay=arrival, arriving=f.arriving)
                    wire = time.monotonic() - t_wire
                    n += got.nbytes if got is not None else 0
            finally:
                release()
            st.mark_chunk(f.chunk, f.xxh3)
            arrival.succeed()  # streams of it send their last bytes now
            self.queue_ack(P.Ack(job=job, file=f.file, chunk=f.chunk, peer=f.peer_name, ok=True,
                                 nbytes=n, local=local,
                                 seconds=round(time.monotonic() - t0, 4),
                                 wire_seconds=round(wire, 6)))
        except FetchError as e:
            arrival.fail(f"{e.kind}: {e}")
            log.info("job=%s chunk %d/%d from %s failed (%s): %s", job, f.file, f.chunk,
                     f.peer_name, e.kind, e)
            self.queue_ack(P.Ack(job=job, file=f.file, chunk=f.chunk, peer=f.peer_name, ok=False,
                                 kind=e.kind, error=str(e),
                                 seconds=round(time.monotonic() - t0, 4)))
        except asyncio.CancelledError:
            arrival.fail("cancelled")
            raise
        except Exception as e:
            arrival.fail(f"internal error: {e}")
            log.exception("job=%s chunk %d/%d: unexpected error", job, f.file, f.chunk)
            self.queue_ack(P.Ack(job=job, file=f.file, chunk=f.chunk, peer=f.peer_name, ok=False,
                                 kind=P.FAIL_LOCAL, error=f"internal error: {e}"))
        finally:
            self.arrivals.close(arrival)  # never a replacement's (see Arrivals.close)
            if self.active.get(key) is asyncio.current_task():  # not a replacement's
                del self.active[key]
                self.active_peer.pop(key, None)

    # ------------------------------------------------------------------ target: pack

    def pack(self, req: P.PackRequest) -> None:
        if req.notify and not req.file.dest:
            if req.job in self.hook_runs:
                return  # running: its outcome will be reported
            done = self.hook_results.get(req.job)
            if done is not None:
                self.spawn(self.send_fin(done))
                return
            self.hook_runs[req.job] = self.spawn(self._run_hook(req))
            return
        key = (req.job, req.file.file)
        if key in self.packs:
            return
        self.packs[key] = self.spawn(self._pack(req))

    async def _pack(self, req: P.PackRequest) -> None:
        loop = asyncio.get_running_loop()
        sf = req.file
        try:
            final = self.store.final_path(sf.dest)
            self.check_dest_allowed(final)
            if (self.store.staging(req.job, sf.file) is None
                    and self.store.source(req.job, sf.file) is None):
                # An empty file has no chunks, so no pull ever created its staging.
                await loop.run_in_executor(None, self.store.open_staging, req.job, sf.file,
                                           sf.dest, sf.size, sf.xxh3, req.chunk_size)
            res = await loop.run_in_executor(None, self.store.pack, req.job, sf.file, sf.dest)
            self.counters["packed"] += 1
            log.info("job=%s installed %s (%d bytes, %d read back) in %.3f s", req.job, res.path,
                     res.size, res.read_back, res.seconds)
            fin = P.Fin(job=req.job, host=self.name, file=sf.file, ok=True)
        except IntegrityError as e:
            self.counters["pack_failed"] += 1
            log.warning("job=%s %s", req.job, e)
            fin = P.Fin(job=req.job, host=self.name, file=sf.file, ok=False, error=str(e),
                        kind="integrity")
        except FdshipError as e:
            self.counters["pack_failed"] += 1
            log.warning("job=%s cannot install %s: %s", req.job, sf.dest, e)
            fin = P.Fin(job=req.job, host=self.name, file=sf.file, ok=False, error=str(e),
                        kind="local")
        except OSError as e:
            self.counters["pack_failed"] += 1
            fin = P.Fin(job=req.job, host=self.name, file=sf.file, ok=False,
                        error=f"cannot install {sf.dest}: {e.strerror}", kind="local")
        finally:
            self.packs.pop((req.job, sf.file), None)
        await self.send_fin(fin)

    async def _run_hook(self, req: P.PackRequest) -> None:
        files = []
        for i in range(req.files_total):
            st = self.store.staging(req.job, i)
            if st is not None:
                files.append(st.final_path)
            else:
                src = self.store.source(req.job, i)
                if src is not None:
                    files.append(src.path)
        try:
            res = await self.hooks.run(req.notify, req.job, files)
        finally:
            self.hook_runs.pop(req.job, None)
        log.info("job=%s hook %s: %s", req.job, req.notify, res.summary())
        fin = P.Fin(job=req.job, host=self.name, file=-1, ok=res.ok,
                    error="" if res.ok else res.summary(), hook=res.to_json())
        self.hook_results[req.job] = fin
        while len(self.hook_results) > 4096:  # bounded: the oldest outcomes go first
            del self.hook_results[next(iter(self.hook_results))]
        await self.send_fin(fin)

    # ------------------------------------------------------------------ source: api

    def check_source(self, path: str) -> None:
        if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
            raise BadRequest(f"{path!r} is not an absolute path: name files by their full path")
        try:
            real = os.path.realpath(path)
        except OSError as e:  # a link on the way was replaced while it was read
            raise BadRequest(f"{path} cannot be resolved: a directory on its way changed "
                             f"while it was read ({e.strerror}); try again once it stays "
                             "put") from None
        if self.allow_source_real and not any(_under(real, d) for d in self.allow_source_real):
            raise BadRequest(f"{path} is outside the directories this daemon may ship from "
                             f"({', '.join(self.cfg.allow_source)}); move it there or add its "
                             "directory to allow_source", status=403)

    async def submit(self, req: P.ApiRequest) -> tuple[str, P.JobRequest]:
        """Snapshot the files and submit the job; returns (job id, request sent)."""
        if self.chunk_size is None:
            raise Unavailable(f"this daemon has not registered with the center "
                              f"{self.cfg.center} yet; is the center running?")
        if req.dest and (not req.dest.startswith("/") or "\0" in req.dest
                         or ".." in req.dest.split("/")):
            raise BadRequest(f"dest {req.dest!r} must be an absolute directory path without '..'")
        if len(set(req.files)) != len(req.files):
            raise BadRequest("the same file is named twice")
        for path in req.files:
            self.check_source(path)
        dests = [os.path.join(req.dest, os.path.basename(p)) if req.dest else p
                 for p in req.files]
        if len(set(dests)) != len(dests):
            raise BadRequest("two files would land at the same destination; ship them with "
                             "different --dest or in separate jobs")
        loop = asyncio.get_running_loop()
        chunk_size = self.chunk_size
        snaps = []
        try:
            for path in req.files:
                snaps.append(await loop.run_in_executor(None, self.store.snapshot, path,
                                                        chunk_size, self.source_allowed))
            files = tuple(P.FileSpec(path=s.path, dest=d, size=s.size, xxh3=s.xxh3,
                                     chunks=tuple(s.chunks)) for s, d in zip(snaps, dests, strict=True))
            jreq = P.JobRequest(source=self.name, files=files, machines=req.machines,
                                chunk_size=chunk_size, callback=req.callback, notify=req.notify,
                                schedule=req.schedule)
            # From here until the commit, peers' requests for chunks this daemon
            # does not know wait for the answer (the center pulls at once).
            with self.submissions.pending():
                async with self.report_lock:  # no inventory may overtake it (see _heartbeats)
                    job = await self.center.submit(jreq)
                # Synchronously after the answer: no inventory can be taken in between.
                self.store.commit_snapshots(job, [s.key for s in snaps])
        except BaseException:
            for s in snaps:
                self.store.discard_snapshot(s.key)  # committed ones are no longer pending
            raise
        log.info("job=%s submitted: %d files (%d bytes) to %s", job, len(files),
                 sum(f.size for f in files), ",".join(req.machines))
        return job, jreq

    async def unchanged(self, req: P.ApiRequest) -> str | None:
        """Why this submission can be skipped (every file still hashes to what
        ``req.skip_if_unchanged`` says), or None.

        Hashes in place, read-only: an unchanged file costs one read, not a
        snapshot copy.  Anything odd (a missing file) is left to ``submit``,
        which refuses it with the usual sentence.
        """
        want = req.skip_if_unchanged
        if not want or set(want) != set(req.files):
            return None
        for path in req.files:
            self.check_source(path)
        loop = asyncio.get_running_loop()
        # Store.snapshot's rule: sources are confined unless "/" itself is allowed.
        hardlinks_ok = self.cfg.allow_hardlinked_sources or self.source_allowed("/")
        for path in req.files:
            if await loop.run_in_executor(None, _file_xxh3, path, self.source_allowed,
                                          hardlinks_ok) != want[path]:
                return None
        return (f"unchanged: {len(req.files)} file(s) hash as the last shipped version "
                "did; nothing to ship")

    async def wait_result(self, job: str) -> dict[str, Any]:
        """Wait for the job's result, riding through the center's absence."""
        failures = 0
        while True:
            try:
                res = await self.center.job(job, wait=25)
                failures = 0
                if res.get("state") != "running":
                    return res
            except NotFound:
                raise
            except FdshipError as e:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning("job=%s waiting for result: center unreachable (%s); retrying",
                                job, e)
                await asyncio.sleep(min(5.0, 0.25 * 2 ** min(failures, 5)))


# ---------------------------------------------------------------------- handlers


def _file_xxh3(path: str, allowed: Callable[[str], bool],
               hardlinks_ok: bool = True) -> str | None:
    """xxh3-64 of a regular file's bytes (streamed), or None if it cannot be read,
    what was opened lies outside allow_source (a link swapped in after the check),
    or it has more than one hard link and ``hardlinks_ok`` is false.

    The same rules as ``Store.snapshot``: otherwise a hard link inside
    allow_source to a file outside it would let anyone who may submit test a
    guessed hash of that file ("skipped" or not) without it ever being shipped.
    None sends the request on to ``submit``, whose snapshot refuses it with the
    same sentence whatever the guess.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not allowed(os.readlink(f"/proc/self/fd/{fd}")):
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_nlink > 1 and not hardlinks_ok:
            return None
        return hash_range(fd, 0, st.st_size)
    except OSError:
        return None
    finally:
        os.close(fd)


class DaemonHandler(BaseHandler):
    @property
    def daemon(self) -> Daemon:
        return self.settings["fdship_daemon"]  # type: ignore[no-any-return]


class ApiHandler(DaemonHandler):
    async def post(self) -> None:
        req = self.parse(P.ApiRequest.from_json)
        skip = await self.daemon.unchanged(req)
        if skip is not None:
            self.send_json({"skipped": True, "reason": skip})
            return
        job, _ = await self.daemon.submit(req)
        if req.callback or not req.wait:
            self.send_json({"job": job}, status=202)
            return
        self.send_json(await self.daemon.wait_result(job))


class PullHandler(DaemonHandler):
    async def post(self) -> None:
        req = self.parse(P.PullRequest.from_json)
        n = await self.daemon.pull(req)
        self.send_json({"accepted": n})


class PackHandler(DaemonHandler):
    async def post(self) -> None:
        req = self.parse(P.PackRequest.from_json)
        self.daemon.pack(req)
        self.send_json({"accepted": True})


class JobProxyHandler(DaemonHandler):
    """GET /daemon/jobs/ID?wait=S: the job as the center sees it, for `fdship submit`
    (the CLI only needs to reach its daemon, not the center)."""

    async def get(self, job: str) -> None:
        try:
            wait = min(60.0, max(0.0, float(self.get_query_argument("wait", "0"))))
        except ValueError:
            raise BadRequest("wait must be a number of seconds") from None
        self.send_json(await self.daemon.center.job(job, wait=wait))


class StatusHandler(DaemonHandler):
    def get(self) -> None:
        d = self.daemon
        ep = d.channel.endpoint if d.channel is not None else None
        self.send_json({"name": d.name, "address": d.cfg.advertise, "boot_id": d.boot_id,
                        "registered": d.chunk_size is not None, "jobs": sorted(d.store.jobs()),
                        "fetching": len(d.active), "acks_pending": len(d.acks),
                        "bytes_served": d.serve_stats.bytes_served,
                        # How chunks went out: sendfile, or buffered (TLS, faults).
                        "chunks_zero_copy": d.serve_stats.zero_copy,
                        "chunks_buffered": d.serve_stats.buffered,
                        # Chunks served while they were still arriving (cut-through).
                        "chunks_streamed": d.serve_stats.streamed,
                        "downloads_before_pull": d.serve_stats.awaited_pulls,
                        # ...and before this daemon had read the center's answer
                        # to the submission of their job (it was its source).
                        "downloads_before_commit": d.serve_stats.awaited_submissions,
                        "arriving": len(d.arrivals),
                        "bytes_received": d.pool.stats.bytes_received,
                        # Event-loop wake-ups moving chunk bytes, each way: what
                        # the data path costs in CPU beyond the bytes themselves.
                        "data_wakeups": {"receive": d.pool.stats.reads,
                                         "send": d.serve_stats.send_waits},
                        # Written behind: handed to the disk as chunks were verified.
                        "writeback_bytes": d.store.writeback_bytes,
                        "fetch_failures": dict(d.pool.stats.failures),
                        "drain_notices": dict(d.drain_counts),
                        # The control channel to the center, and how acks and
                        # drain notices went: over it, or over HTTP.
                        "channel": ({"state": d.channel.state, "connects": d.channel.connects,
                                     "last_error": d.channel.last_error,
                                     "served": ep.served if ep else 0,
                                     # Drain notices: one-way frames, never answered.
                                     "notices": ep.notices if ep else 0,
                                     # The center's pulls, which come the same way.
                                     "noticed": ep.noticed if ep else 0}
                                    if d.channel is not None else {"state": "off"}),
                        "reports": dict(d.report_counts),
                        "heartbeats": dict(d.beat_counts),
                        "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
                        "delta": d.delta.stats.to_json(), "version": __version__})


def make_app(d: Daemon) -> tornado.web.Application:
    return tornado.web.Application([
        (P.DAEMON_API, ApiHandler),
        (P.DAEMON_PULL, PullHandler),
        (P.DAEMON_PACK, PackHandler),
        (P.DAEMON_DOWNLOAD, DownloadHandler,
         {"store": d.store, "limiter": d.up_limiter, "stats": d.serve_stats,
          "fault": d.cfg.fault_inject, "write_timeout": d.cfg.write_timeout,
          # Chunks still arriving are streamed; a stream waits for its next
          # bytes as long as our own fetch of them would before giving up.
          "arrivals": d.arrivals, "stall_timeout": d.cfg.fetch_stall_timeout,
          "submissions": d.submissions}),
        (P.DAEMON_DELTA, DeltaHandler,
         {"store": d.store, "limiter": d.up_limiter, "stats": d.serve_stats,
          "arrivals": d.arrivals, "stall_timeout": d.cfg.fetch_stall_timeout}),
        (P.DAEMON_STATUS, StatusHandler),
        (r"/daemon/jobs/([^/]+)", JobProxyHandler),
        (P.METRICS, MetricsHandler),
    ], default_handler_class=NotFoundHandler, fdship_daemon=d, fdship_token=d.token,
        fdship_registry=d.metrics.registry, compress_response=False)


async def run_daemon(cfg: DaemonConfig) -> None:
    """Run a daemon until SIGTERM/SIGINT.  Raises ConfigError when it cannot start."""
    # Handlers first: a SIGTERM during recovery or start-up still stops cleanly.
    stop = stop_signal()
    token = read_token(cfg.token_file)
    host, port = parse_hostport(cfg.listen, "listen")
    server_ssl_context(cfg.tls_cert, cfg.tls_key)  # refuse bad TLS files before anything
    configure_tls(cfg.tls_ca, peers_https=bool(cfg.tls_cert))
    d = Daemon(cfg, token)
    try:
        await asyncio.get_running_loop().run_in_executor(None, d.store.open)
    except LocalIOError as e:
        raise ConfigError(str(e)) from None
    try:
        server = make_server(make_app(d), cfg, token)
        sockets = tornado.netutil.bind_sockets(port, address=host or None)
    except ConfigError:
        d.store.close()
        raise
    except OSError as e:
        d.store.close()
        raise ConfigError(f"cannot listen on {cfg.listen}: {e.strerror}") from None
    server.add_sockets(sockets)
    d.start()
    log.info("fdship daemon %s name=%s listening on %s://%s advertising %s, center %s",
             __version__, cfg.name, "https" if cfg.tls_cert else "http", cfg.listen,
             cfg.advertise, cfg.center)
    await stop.wait()
    log.info("stopping")
    server.stop()
    await d.stop()
    log.info("stopped")


__all__ = ["Daemon", "run_daemon", "make_app", "Unprocessable"]
