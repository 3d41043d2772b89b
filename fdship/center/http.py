"""The center's HTTP surface: thin handlers over the runner, and the process main.

Handlers parse a protocol message, hand an event to the :class:`Runner`, and
render its answer; they hold no state of their own.  ``run_center`` is what
``fdship center`` calls: it recovers from the REDO log, binds the port, and
stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import tornado.iostream
import tornado.netutil
import tornado.web
import tornado.websocket
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fdship import __version__
from fdship import protocol as P
from fdship.center.runner import Runner
from fdship.channel import Endpoint, close_reason
from fdship.center.schedules import routes as schedule_routes
from fdship.config import CenterConfig, parse_hostport, read_token
from fdship.core import views
from fdship.core.events import (ChunkStored, FetchDraining, FetchFailed, FilePacked, HookFinished,
                                PackFailed)
from fdship.errors import BadRequest, ConfigError, NotFound
from fdship.httpclient import configure_tls
from fdship.web import (BaseHandler, MetricsHandler, NotFoundHandler, make_server,
                        server_ssl_context, stop_signal)

log = logging.getLogger("fdship.center")

CHANNEL_PING = 10.0  # seconds between WebSocket pings on a control channel


class CenterMetrics:
    """Prometheus metrics of the center (own registry: several centers per test process)."""

    def __init__(self, runner_ref: list[Runner]) -> None:
        self.registry = r = CollectorRegistry()
        self.jobs = Counter("fdship_jobs_total", "Jobs that ended, by final state", ["state"],
                            registry=r)
        self.job_seconds = Histogram("fdship_job_duration_seconds", "Job wall time",
                                     buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
                                     registry=r)
        self.fsync = Histogram("fdship_redo_fsync_seconds", "REDO log group-commit fsync latency",
                               buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1),
                               registry=r)
        self.acks = Counter("fdship_chunks_acked_total", "Chunks targets reported stored",
                            registry=r)
        self.failures = Counter("fdship_chunk_failures_total", "Chunk fetches that failed",
                                ["reason"], registry=r)
        self.bytes = Counter("fdship_bytes_delivered_total", "Bytes targets reported stored",
                             registry=r)
        self.reused = Counter("fdship_chunks_reused_total", "Chunks targets took from their "
                              "old copy of the file, moving no bytes", registry=r)
        self.drains = Counter("fdship_drain_notices_total", "Notices that a fetch is about to "
                              "finish: 'accepted' went to the scheduler, 'ignored' named no "
                              "running job, machine or chunk", ["outcome"], registry=r)
        for outcome in ("accepted", "ignored"):
            self.drains.labels(outcome=outcome)  # exported as 0 before the first notice
        ref = runner_ref

        def alive() -> float:
            return sum(1 for h in ref[0].sched.hosts.values() if h.alive) if ref else 0

        def inflight() -> float:
            return sum(h.downloads for h in ref[0].sched.hosts.values()) if ref else 0

        def running() -> float:
            return sum(1 for j in ref[0].sched.jobs.values() if j.state == "running") if ref else 0

        Gauge("fdship_hosts_alive", "Daemons alive", registry=r).set_function(alive)
        Gauge("fdship_inflight_fetches", "Fetches assigned and not yet answered",
              registry=r).set_function(inflight)
        Gauge("fdship_jobs_running", "Jobs running", registry=r).set_function(running)

        def channels() -> float:
            return sum(1 for e in ref[0].channels.values() if e.open) if ref else 0

        Gauge("fdship_control_channels", "Daemons' control channels open",
              registry=r).set_function(channels)
        # Pulls and packs by the way they went: the daemon's channel, or HTTP.
        self.commands = Gauge("fdship_commands_sent", "Pulls and packs sent to daemons, by "
                              "transport (channel or http)", ["transport"], registry=r)
        def sent(transport: str) -> Callable[[], float]:
            return lambda: ref[0].command_counts[transport] if ref else 0

        for t in ("channel", "http"):
            self.commands.labels(transport=t).set_function(sent(t))
        self.hb_age = Gauge("fdship_heartbeat_age_seconds", "Seconds since each daemon's last "
                            "heartbeat", ["host"], registry=r)


def concerns_running_job(runner: Runner, job: str, host: str, file: int,
                         chunk: int | None = None) -> bool:
    """Whether a report names a running job, one of its machines, a file and chunk of it.

    Reports that do not are answered but never logged: the scheduler would
    ignore them anyway, and the REDO log must not grow from requests that
    change nothing (a late report of an expired job, or a forged one).
    """
    j = runner.sched.jobs.get(job)
    if j is None or j.state != "running" or host not in j.machines:
        return False
    if file == -1:  # a machine-level report (the notify hook)
        return True
    if file >= len(j.files):
        return False
    return chunk is None or chunk < j.file_chunks(file)


async def accept_acks(runner: Runner, m: CenterMetrics, batch: P.AckBatch) -> dict[str, Any]:
    """Log and apply a target's acks; answers once they are durable (one fsync for all)."""
    futs = []
    ignored = 0
    for a in batch.acks:
        if not concerns_running_job(runner, a.job, batch.host, a.file, a.chunk):
            ignored += 1
            continue
        if a.ok:
            m.acks.inc()
            m.bytes.inc(a.nbytes)  # network bytes only: 0 for a chunk reused locally
            if a.local:
                m.reused.inc()
            ev: Any = ChunkStored(job=a.job, host=batch.host, file=a.file, chunk=a.chunk,
                                  peer=a.peer, nbytes=a.nbytes, seconds=a.wire_seconds)
        else:
            m.failures.labels(reason=a.kind).inc()
            log.info("job=%s host=%s chunk %d/%d from %s failed (%s): %s", a.job, batch.host,
                     a.file, a.chunk, a.peer, a.kind, a.error)
            ev = FetchFailed(job=a.job, host=batch.host, file=a.file, chunk=a.chunk,
                             peer=a.peer, fail=a.kind, error=a.error)
        futs.append(runner.submit(ev))
    await asyncio.gather(*futs)  # all land in one turn: one fsync
    return {"ok": True, "ignored": ignored}


def accept_drains(runner: Runner, m: CenterMetrics, batch: P.DrainBatch) -> dict[str, Any]:
    """Queue a target's drain notices for the scheduler; answers at once (see DrainingHandler)."""
    ignored = 0
    for d in batch.drains:
        if not concerns_running_job(runner, d.job, batch.host, d.file, d.chunk):
            ignored += 1
            continue
        runner.notify(FetchDraining(job=d.job, host=batch.host, file=d.file,
                                    chunk=d.chunk, peer=d.peer))
    accepted = len(batch.drains) - ignored
    if accepted:
        m.drains.labels(outcome="accepted").inc(accepted)
    if ignored:
        m.drains.labels(outcome="ignored").inc(ignored)
    return {"ok": True, "ignored": ignored}


class CenterHandler(BaseHandler):
    @property
    def runner(self) -> Runner:
        return self.settings["fdship_runner"]  # type: ignore[no-any-return]


class JobHandler(CenterHandler):
    async def post(self) -> None:
        req = self.parse(P.JobRequest.from_json)
        job = await self.runner.admit(req)
        log.info("job=%s accepted from %s: %d files to %s", job, req.source, len(req.files),
                 ",".join(req.machines))
        self.send_json({"job": job})


class AckHandler(CenterHandler):
    async def post(self) -> None:
        batch = self.parse(P.AckBatch.from_json)
        self.send_json(await accept_acks(self.runner, self.settings["fdship_metrics"], batch))


class DrainingHandler(CenterHandler):
    """POST /center/draining: fetches about to finish; their two slots are reused now.

    A soft notice: nothing is logged, and the answer does not wait for the
    single writer at all (so never for a group commit's fsync).  The events
    are queued and the handler answers at once; a notice that turns out stale
    by the time the scheduler sees it (the ack overtook it, or the fetch was
    reassigned) changes nothing.
    """

    def post(self) -> None:
        batch = self.parse(P.DrainBatch.from_json)
        self.send_json(accept_drains(self.runner, self.settings["fdship_metrics"], batch))


class ChannelHandler(CenterHandler, tornado.websocket.WebSocketHandler):
    """GET /center/channel?host=NAME: a daemon's control channel (a WebSocket).

    The daemon sends its heartbeats, acks and drain notices over it, and the
    center its pulls and packs (see :mod:`fdship.channel`).  The token is
    checked before the upgrade, as for every request.  One channel per host: a new one
    replaces the old (the daemon reconnected), whose waiting calls fail over
    to HTTP.
    """

    host = ""
    endpoint: Endpoint | None = None

    def prepare(self) -> None:
        super().prepare()  # the token
        host = self.get_query_argument("host", "")
        if not host or len(host) > 253 or not host.isprintable():
            raise BadRequest("channel: give the daemon's name as ?host=NAME")
        self.host = host

    def open(self, *args: Any, **kwargs: Any) -> None:
        m: CenterMetrics = self.settings["fdship_metrics"]
        runner = self.runner

        async def ack(body: Any) -> Any:
            batch = P.AckBatch.from_json(body)
            self._same_host(batch.host)
            return await accept_acks(runner, m, batch)

        async def draining(body: Any) -> Any:
            batch = P.DrainBatch.from_json(body)
            self._same_host(batch.host)
            return accept_drains(runner, m, batch)

        async def heartbeat(body: Any) -> Any:
            beat = P.Heartbeat.from_json(body)
            self._same_host(beat.name)
            return (await runner.heartbeat(beat)).to_json()

        self.set_nodelay(True)  # one small frame per message: never wait to coalesce
        self.endpoint = Endpoint(f"daemon {self.host}", self.write_message,
                                 {"ack": ack, "draining": draining, "heartbeat": heartbeat},
                                 close=self.close)
        runner.attach_channel(self.host, self.endpoint)

    def _same_host(self, host: str) -> None:
        if host != self.host:
            raise BadRequest(f"channel of {self.host} cannot report for {host}; each daemon "
                             "reports for itself", status=403)

    def on_message(self, message: str | bytes) -> None:
        if self.endpoint is not None:
            self.endpoint.received(message)

    def on_close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.closed(close_reason(self.close_reason, self.close_code))
            self.runner.detach_channel(self.host, self.endpoint)


class FinHandler(CenterHandler):
    async def post(self) -> None:
        fin = self.parse(P.Fin.from_json)
        if not concerns_running_job(self.runner, fin.job, fin.host, fin.file):
            self.send_json({"ok": True, "ignored": 1})
            return
        if fin.file == -1:
            detail = tuple(sorted((fin.hook or {}).items()))
            ev: Any = HookFinished(job=fin.job, host=fin.host, ok=fin.ok, error=fin.error,
                                   detail=detail)
        elif fin.ok:
            ev = FilePacked(job=fin.job, host=fin.host, file=fin.file)
        else:
            log.warning("job=%s host=%s file %d not installed: %s", fin.job, fin.host, fin.file,
                        fin.error)
            ev = PackFailed(job=fin.job, host=fin.host, file=fin.file,
                            fail=fin.kind or "local", error=fin.error)
        await self.runner.submit(ev)
        self.send_json({"ok": True})


class HeartbeatHandler(CenterHandler):
    async def post(self) -> None:
        beat = self.parse(P.Heartbeat.from_json)
        reply = await self.runner.heartbeat(beat)
        self.send_json(reply.to_json())


class JobsHandler(CenterHandler):
    def get(self) -> None:
        state = self.get_query_argument("state", "")
        if state not in ("", "running", "done", "failed"):
            raise BadRequest("state must be running, done or failed")
        try:
            limit = int(self.get_query_argument("limit", "50"))
        except ValueError:
            raise BadRequest("limit must be a whole number") from None
        limit = max(1, min(limit, 1000))
        before = self.get_query_argument("before", "")
        self.send_json(views.jobs_list(self.runner.sched, time.time(), state, limit, before))


class OneJobHandler(CenterHandler):
    async def get(self, job_id: str) -> None:
        try:
            wait = float(self.get_query_argument("wait", "0"))
        except ValueError:
            raise BadRequest("wait must be a number of seconds") from None
        if not 0 <= wait <= 3600:
            raise BadRequest("wait must be between 0 and 3600 seconds")
        self.send_json(await self.runner.wait_job(job_id, wait))


class HostsHandler(CenterHandler):
    def get(self) -> None:
        now = time.time()
        m: CenterMetrics = self.settings["fdship_metrics"]
        for h in self.runner.sched.hosts.values():
            if h.last_seen:
                m.hb_age.labels(host=h.name).set(now - h.last_seen)
        self.send_json({"hosts": [self.runner.host_view(n, now)
                                  for n in sorted(self.runner.sched.hosts)]})


class EventsHandler(CenterHandler):
    """GET /center/events: server-sent events; resume with ?since=N or Last-Event-ID."""

    async def get(self) -> None:
        raw = self.request.headers.get("Last-Event-ID") or self.get_query_argument("since", "")
        try:
            last = int(raw) if raw else -1
        except ValueError:
            raise BadRequest("since / Last-Event-ID must be an event id (a whole number)") from None
        bus = self.runner.bus
        if last < 0:
            last = bus.next_id - 1  # a new client starts from now (after a full GET)
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        if last + 1 < bus.oldest() or last >= bus.next_id:
            # The client missed more than we keep, or its id comes from a center
            # that has since restarted: tell it to re-fetch the full state.
            self.write(f"event: reset\ndata: {{\"oldest\": {bus.oldest()}}}\n\n")
            last = bus.next_id - 1
        self.write("retry: 1000\n\n")
        await self.flush()
        try:
            while True:
                items = bus.since(last)
                if items:
                    for eid, kind, data in items:
                        self.write(f"id: {eid}\nevent: {kind}\ndata: "
                                   f"{json.dumps(data, separators=(',', ':'))}\n\n")
                        last = eid
                    await self.flush()
                else:
                    async with bus.cond:
                        try:
                            await asyncio.wait_for(bus.cond.wait(), 15)
                        except asyncio.TimeoutError:
                            self.write(": keep-alive\n\n")
                            await self.flush()
        except tornado.iostream.StreamClosedError:
            return


def make_app(runner: Runner, token: str, metrics: CenterMetrics) -> tornado.web.Application:
    return tornado.web.Application([
        (P.CENTER_JOB, JobHandler),
        (P.CENTER_ACK, AckHandler),
        (P.CENTER_DRAINING, DrainingHandler),
        (P.CENTER_FIN, FinHandler),
        (P.CENTER_HEARTBEAT, HeartbeatHandler),
        (P.CENTER_CHANNEL, ChannelHandler),
        (P.CENTER_JOBS, JobsHandler),
        (P.CENTER_JOBS + r"/([^/]+)", OneJobHandler),
        (P.CENTER_HOSTS, HostsHandler),
        (P.CENTER_EVENTS, EventsHandler),
        *schedule_routes(),
        (P.METRICS, MetricsHandler),
    ], default_handler_class=NotFoundHandler, fdship_runner=runner, fdship_token=token,
        fdship_metrics=metrics, fdship_registry=metrics.registry, compress_response=False,
        # Control channels: a daemon that vanished without closing is found by
        # the missing pongs (its heartbeats stop too, and the center declares it
        # dead on its own schedule); a frame is at most a control message.
        websocket_ping_interval=CHANNEL_PING, websocket_ping_timeout=CHANNEL_PING,
        websocket_max_message_size=P.CHANNEL_MAX_FRAME)


async def run_center(cfg: CenterConfig) -> None:
    """Run the center until SIGTERM/SIGINT.  Raises ConfigError when it cannot start."""
    # Handlers first: a SIGTERM during recovery or start-up still stops cleanly.
    stop = stop_signal()
    token = read_token(cfg.token_file)
    host, port = parse_hostport(cfg.listen, "listen")
    # TLS settings are checked before recovery, which may take a while.
    server_ssl_context(cfg.tls_cert, cfg.tls_key)
    configure_tls(cfg.tls_ca, peers_https=bool(cfg.tls_cert))
    try:
        os.makedirs(cfg.data_dir, exist_ok=True)
        if not os.access(cfg.data_dir, os.W_OK):
            raise ConfigError(f"data dir {cfg.data_dir} is not writable by this user")
    except OSError as e:
        raise ConfigError(f"cannot create data dir {cfg.data_dir}: {e.strerror}") from None
    ref: list[Runner] = []
    metrics = CenterMetrics(ref)
    runner = Runner(cfg, token, metrics)
    ref.append(runner)
    for note in runner.recover():
        log.info("%s", note)
    try:
        server = make_server(make_app(runner, token, metrics), cfg, token)
        sockets = tornado.netutil.bind_sockets(port, address=host or None)
    except ConfigError:
        runner.redo.close()
        raise
    except OSError as e:
        runner.redo.close()
        raise ConfigError(f"cannot listen on {cfg.listen}: {e.strerror}") from None
    server.add_sockets(sockets)
    runner.start()
    log.info("fdship center %s listening on %s://%s (data dir %s, chunk size %d)", __version__,
             "https" if cfg.tls_cert else "http", cfg.listen, cfg.data_dir, cfg.chunk_size)
    await stop.wait()
    log.info("stopping")
    server.stop()
    await runner.stop()
    log.info("stopped")


__all__ = ["run_center", "make_app", "CenterMetrics", "NotFound"]
