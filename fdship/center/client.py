"""Typed client for the center, used by daemons, the CLI and the TUI.

One method per endpoint; bodies are the messages of :mod:`fdship.protocol`.
:class:`CenterChannel` is a daemon's end of its control channel to the center
(see :mod:`fdship.channel`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

import tornado.httpclient
import tornado.websocket

from fdship import protocol as P
from fdship.channel import Endpoint, Handler, close_reason
from fdship.errors import Unavailable
from fdship.httpclient import JsonClient, cluster_ssl_context

log = logging.getLogger("fdship.channel")


class CenterClient(JsonClient):
    """One method per center endpoint; used by daemons, the CLI and the TUI."""

    async def heartbeat(self, beat: P.Heartbeat) -> P.HeartbeatReply:
        return P.HeartbeatReply.from_json(await self._call("POST", P.CENTER_HEARTBEAT,
                                                           beat.to_json(), timeout=10))

    async def submit(self, req: P.JobRequest) -> str:
        return str((await self._call("POST", P.CENTER_JOB, req.to_json()))["job"])

    async def ack(self, batch: P.AckBatch) -> None:
        await self._call("POST", P.CENTER_ACK, batch.to_json())

    async def draining(self, batch: P.DrainBatch, timeout: float = 5.0) -> int:
        """Tell the center fetches are about to finish; returns how many it ignored.

        Short timeout: a notice is worth something only while its fetch runs.
        """
        res = await self._call("POST", P.CENTER_DRAINING, batch.to_json(), timeout=timeout)
        return int(res.get("ignored", 0)) if isinstance(res, dict) else 0

    async def fin(self, fin: P.Fin) -> None:
        await self._call("POST", P.CENTER_FIN, fin.to_json())

    async def job(self, job_id: str, wait: float = 0.0) -> dict[str, Any]:
        q = f"?wait={wait:g}" if wait else ""
        return await self._call("GET", f"{P.CENTER_JOBS}/{quote(job_id, safe='')}{q}",
                                timeout=wait + 30)

    async def jobs(self, state: str = "", limit: int = 50, before: str = "") -> dict[str, Any]:
        q = {k: v for k, v in (("state", state), ("limit", limit), ("before", before)) if v}
        return await self._call("GET", P.CENTER_JOBS + ("?" + urlencode(q) if q else ""))

    async def hosts(self) -> dict[str, Any]:
        return await self._call("GET", P.CENTER_HOSTS)


class CenterChannel:
    """A daemon's control channel to the center: kept open, reopened when it drops.

    ``handlers`` serve the center's requests (``pull``, ``pack``); ``call``
    sends the daemon's (``ack``, ``draining``) and raises Unavailable while the
    channel is down, so the caller uses HTTP then.  A center that does not
    offer channels (an older version: 404) or refuses this one is retried
    rarely; nothing else changes, since everything also goes over HTTP.
    """

    PING = 10.0  # seconds between pings; a center that does not answer one in as long is gone
    RETRY_MIN, RETRY_MAX, RETRY_REFUSED = 0.5, 10.0, 60.0

    def __init__(self, center_url: str, token: str, host: str,
                 handlers: Mapping[str, Handler]) -> None:
        base = center_url.rstrip("/")
        self.url = ("wss://" + base[len("https://"):] if base.startswith("https://") else
                    "ws://" + base[len("http://"):] if base.startswith("http://") else
                    "ws://" + base) + P.CENTER_CHANNEL + "?host=" + quote(host, safe="")
        self.token = token
        self.host = host
        self.handlers = dict(handlers)
        self.endpoint: Endpoint | None = None
        self.state = "connecting"  # connecting / connected / refused
        self.last_error = ""
        self.connects = 0
        self._task: asyncio.Task[None] | None = None
        self._conn: tornado.websocket.WebSocketClientConnection | None = None

    @property
    def open(self) -> bool:
        """Whether the channel is up now (calls go over it)."""
        return self.endpoint is not None and self.endpoint.open

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._conn is not None:
            self._conn.close()
        if self.endpoint is not None:
            self.endpoint.closed("daemon stopping")

    async def call(self, op: str, body: Any, timeout: float) -> Any:
        ep = self.endpoint
        if ep is None or not ep.open:
            raise Unavailable(f"no channel to the center ({self.state})")
        return await ep.call(op, body, timeout)

    def notify(self, op: str, body: Any) -> bool:
        """Send a notice (no answer); False when the channel is down."""
        ep = self.endpoint
        return ep is not None and ep.open and ep.notify(op, body)

    async def _run(self) -> None:
        delay = self.RETRY_MIN
        while True:
            t0 = time.monotonic()
            try:
                await self._session()
                self.last_error = "closed by the center"
            except tornado.httpclient.HTTPClientError as e:
                # Answered, but not upgraded: refused (token, an older center).
                self.state = "refused"
                why = f"center refused the channel: HTTP {e.code}"
                if why != self.last_error:  # once, not every retry (an older center: 404)
                    log.warning("%s; acks and pulls go over HTTP (retrying every %.0f s)",
                                why, self.RETRY_REFUSED)
                self.last_error = why
                await asyncio.sleep(self.RETRY_REFUSED)
                continue
            except (OSError, asyncio.TimeoutError, tornado.websocket.WebSocketError) as e:
                self.last_error = f"cannot connect: {e}"
            self.state = "connecting"
            if time.monotonic() - t0 > 30:
                delay = self.RETRY_MIN  # it had been up: try again soon
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(self.RETRY_MAX, delay * 2)

    async def _session(self) -> None:
        headers = {"Authorization": "Bearer " + self.token} if self.token else {}
        req = tornado.httpclient.HTTPRequest(
            self.url, headers=headers, connect_timeout=5, request_timeout=10,
            ssl_options=cluster_ssl_context() if self.url.startswith("wss://") else None)
        conn = await tornado.websocket.websocket_connect(
            req, ping_interval=self.PING, ping_timeout=self.PING,
            max_message_size=P.CHANNEL_MAX_FRAME)
        self._conn = conn
        # One small frame per message, each waited for by someone: Nagle's
        # algorithm would hold a drain notice back until the last frame's ACK.
        if conn.protocol is not None:  # always set once connected; typed Optional
            conn.protocol.set_nodelay(True)
        ep = Endpoint("the center", conn.write_message, self.handlers)
        self.endpoint = ep
        self.state = "connected"
        self.connects += 1
        log.info("control channel to the center open (%s)", self.url)
        try:
            while True:
                msg = await conn.read_message()
                if msg is None:
                    break
                ep.received(msg)
        finally:
            reason = close_reason(conn.close_reason, conn.close_code)
            ep.closed(reason)
            conn.close()
            self._conn = None
            log.info("control channel to the center closed: %s", reason)
