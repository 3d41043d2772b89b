"""Requests and replies over one persistent message channel, in both directions.

Where it sits: the control channel between a daemon and the center (a
WebSocket at ``/center/channel``, opened by the daemon) carries the messages
that come once per chunk: the center's pulls to the target, the target's
drain notices and acks back; and the daemon's heartbeats, once a second.
Over plain HTTP each of them is a whole request on both ends (parse, route,
headers, timeouts), and on a busy fleet that, not the bytes, is where the
CPU goes; over the channel each is one small frame.  Everything the channel carries is also an HTTP endpoint, and every
sender falls back to HTTP whenever the channel is down, so the channel is
an optimisation, never a dependency.

This module is the transport-free part both ends share: the envelope, ids,
the table of calls waiting for their reply, and dispatch of incoming
requests to handlers.  The WebSocket ends are ``ChannelHandler`` in
:mod:`fdship.center.http` and ``CenterChannel`` in :mod:`fdship.center.client`.

Envelope (JSON text frames)::

    request  {"id": 7, "op": "ack", "body": {...}}
    reply    {"id": 7, "ok": {...}}
    error    {"id": 7, "error": "what went wrong and what to do", "status": 400}
    notice   {"id": 8, "op": "draining", "body": {...}, "noreply": true}

Ids are per sender and per connection; a reply names the id of the request
it answers.  Requests are served concurrently (an ack waits for the center's
fsync; a drain notice behind it must not).

A notice is a request that wants no answer: the receiver serves it and sends
nothing back, not even an error (it logs one).  It saves a frame per chunk
at both ends, and suits messages whose outcome comes back another way: drain
notices (a hint; the fetch's ack follows whatever happens) and pulls (each
fetch ends in an ack, failures included; the center sends again the pulls of
a channel that closed soon after them, see ``Endpoint.on_closed``).  It keeps
an id, so an end that predates notices still takes it as a request; its
reply then finds no call waiting and is dropped like any stray reply.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fdship import protocol as P
from fdship.errors import BadRequest, FdshipError, ProtocolError, Unavailable

log = logging.getLogger("fdship.channel")

Handler = Callable[[Any], Awaitable[Any]]

#: Requests one end serves at once; more are refused (status 503) rather than
#: queued, so a flood cannot grow memory (the sender falls back to HTTP).
MAX_SERVING = 1024
#: Calls one end may have waiting for replies.
MAX_PENDING = 1024


def close_reason(reason: str | None, code: int | None) -> str:
    """Why a WebSocket closed, as the peer said it, for logs and the waiting calls' errors."""
    return reason or (f"code {code}" if code else "connection lost")


async def call_or_http(channel: Any, op: str, body: Any, timeout: float,
                       http: Callable[[], Awaitable[Any]], counts: dict[str, int]) -> Any:
    """Send ``op`` over ``channel`` while it is open, else (or when it fails) by ``http()``.

    ``channel``: an :class:`Endpoint` or anything with ``open`` and ``call``
    (None: HTTP).  A channel that fails mid-call (closed, no reply in time)
    hands over to HTTP: every message it carries is one the other end takes
    twice as a no-op, while dropping it would stall a chunk.  Errors the
    other end answered with are raised as they are, as over HTTP.
    ``counts["channel"]`` or ``counts["http"]`` counts the way it went.
    """
    if channel is not None and channel.open:
        try:
            res = await channel.call(op, body, timeout)
            counts["channel"] += 1
            return res
        except Unavailable as e:
            log.info("%s over the control channel failed (%s); sending it over HTTP", op, e)
    counts["http"] += 1
    return await http()


class Endpoint:
    """One end of a channel: ``call`` out, ``received`` in, ``closed`` once.

    ``send`` writes one text frame (it may return an awaitable, which is
    not waited for: frames are queued by the transport in order).
    """

    def __init__(self, name: str, send: Callable[[str], Any],
                 handlers: Mapping[str, Handler],
                 close: Callable[[], Any] | None = None) -> None:
        self.name = name  # the peer, for messages
        self._send = send
        # Closes the transport when this end gives up on it (replaced by a new
        # channel): the peer then sees the close and falls back or reconnects
        # at once, instead of waiting out its calls' timeouts.
        self._close = close
        self._handlers = dict(handlers)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._serving: set[asyncio.Task[Any]] = set()
        self.closed_why = ""
        self.calls = 0  # requests sent
        self.served = 0  # requests answered
        self.notices = 0  # notices sent
        self.noticed = 0  # notices served
        # Called once when the channel closes, after the waiting calls failed:
        # whoever sent notices over it can send again what may not have arrived.
        self.on_closed: Callable[[], None] | None = None

    @property
    def open(self) -> bool:
        return not self.closed_why

    async def call(self, op: str, body: Any, timeout: float) -> Any:
        """Send a request and wait for its reply.

        Raises Unavailable when the channel is (or goes) down or no reply
        comes within ``timeout`` (the caller then uses HTTP), and the error
        the other end sent back, as the same FdshipError an HTTP call gives.
        """
        if self.closed_why:
            raise Unavailable(f"channel to {self.name} is down: {self.closed_why}")
        if len(self._pending) >= MAX_PENDING:
            raise Unavailable(f"channel to {self.name} has {MAX_PENDING} calls waiting")
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            if not self._write({"id": rid, "op": op, "body": body}):
                raise Unavailable(f"channel to {self.name} closed: {self.closed_why}")
            self.calls += 1
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"channel to {self.name}: no reply to {op} in {timeout:g} s") \
                from None
        finally:
            self._pending.pop(rid, None)

    def notify(self, op: str, body: Any) -> bool:
        """Send a notice: a request the other end serves without answering.

        True once the frame is queued; False when the channel is down (the
        caller may use HTTP instead).  Whether the other end took it is never
        known here: only send what may be lost.
        """
        if not self._write({"id": next(self._ids), "op": op, "body": body, "noreply": True}):
            return False
        self.notices += 1
        return True

    def received(self, text: str | bytes) -> None:
        """Handle one incoming frame (never raises)."""
        try:
            msg = P.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            self._refuse(None, ProtocolError(f"channel frame is not valid JSON: {e}"))
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("id"), int) \
                or isinstance(msg.get("id"), bool):
            self._refuse(None, ProtocolError("channel frame must be an object with an integer "
                                             "'id'"))
            return
        rid = msg["id"]
        if "op" in msg:
            self._request(rid, msg.get("op"), msg.get("body"), msg.get("noreply") is True)
            return
        fut = self._pending.get(rid)
        if fut is None or fut.done():
            return  # the caller gave up (timeout) or it is a stray reply: nothing waits
        if "error" in msg:
            status = msg.get("status")
            status = status if isinstance(status, int) and 400 <= status <= 599 else 500
            text_ = str(msg.get("error") or f"error {status} from {self.name}")
            fut.set_exception(BadRequest(text_, status=status) if status < 500
                              else FdshipError(text_, status=status))
        else:
            fut.set_result(msg.get("ok"))

    def closed(self, why: str) -> None:
        """The transport is gone: every waiting call fails with Unavailable."""
        if self.closed_why:
            return
        self.closed_why = why or "closed"
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(Unavailable(f"channel to {self.name} closed: {self.closed_why}"))
        self._pending.clear()
        for t in self._serving:
            t.cancel()
        if self._close is not None:
            try:
                self._close()
            except Exception:  # already closed: nothing more to do
                pass
        if self.on_closed is not None:
            self.on_closed()

    # --- internals ---------------------------------------------------------------------------

    def _request(self, rid: int, op: Any, body: Any, noreply: bool = False) -> None:
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            self._refuse(rid, BadRequest(f"unknown channel op {op!r} (this end serves "
                                         f"{', '.join(sorted(self._handlers)) or 'none'}); "
                                         "use the HTTP endpoint instead", status=404), noreply)
            return
        if len(self._serving) >= MAX_SERVING:
            self._refuse(rid, Unavailable(f"{MAX_SERVING} channel requests in progress; "
                                          "retry over HTTP"), noreply)
            return
        task = asyncio.ensure_future(self._serve(rid, handler, body, noreply))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def _serve(self, rid: int, handler: Handler, body: Any, noreply: bool) -> None:
        try:
            reply = await handler(body)
        except FdshipError as e:
            self._refuse(rid, e, noreply)
            return
        except asyncio.CancelledError:
            return  # closed under us: nobody to answer
        except Exception as e:  # a bug: answer like the HTTP base handler, keep serving
            log.exception("channel request from %s failed", self.name)
            self._refuse(rid, FdshipError(f"internal error: {e}"), noreply)
            return
        if noreply:
            self.noticed += 1
            return
        self.served += 1
        self._write({"id": rid, "ok": reply})

    def _refuse(self, rid: int | None, e: FdshipError, noreply: bool = False) -> None:
        if noreply:
            # Nobody waits for an answer: the log is the only place it can go.
            log.warning("notice from %s refused: %s", self.name, e)
            return
        if rid is None:
            log.warning("bad frame on the channel from %s: %s", self.name, e)
        self._write({"id": rid, "error": e.message, "status": e.status})

    def _write(self, obj: Any) -> bool:
        """Queue one frame; False (and the channel closed) when the transport refuses it."""
        if self.closed_why:
            return False
        try:
            res = self._send(json.dumps(obj, separators=(",", ":")))
        except Exception as e:  # the transport closed between our check and the write
            self.closed(f"write failed: {e}")
            return False
        if isinstance(res, asyncio.Future):
            # Frames are queued in order by the transport; only a failure matters.
            res.add_done_callback(self._write_done)
        return True

    def _write_done(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self.closed(f"write failed: {fut.exception()}")
