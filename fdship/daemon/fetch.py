"""Fetch chunks from peers: stream, verify, pwrite.

Where it sits: the daemon's pull handling (``fdship/daemon/agent.py``) runs one
:meth:`PeerPool.fetch` per chunk the center assigned, writing into the fd of a
:class:`fdship.daemon.store.Staging`, then acks the outcome to the center.  The
other end is :class:`fdship.daemon.serve.DownloadHandler` on the peer.

This is a deliberately small HTTP/1.1 client rather than Tornado's
``AsyncHTTPClient``: it only ever sends one GET and reads one
Content-Length body, and doing just that lets the body land straight from the
socket into one reusable buffer per connection (``asyncio.BufferedProtocol``),
from which it is hashed and ``pwrite``-n without further copies or
allocations.  On loopback that is about 2.5x the throughput of
``AsyncHTTPClient`` with a streaming callback (numbers in docs/benchmarks.md).

Failures come back as :class:`FetchError` whose ``kind`` is one of the
``fdship.protocol.FAIL_*`` constants, ready for the ack the center turns into a
scheduling decision; a connection that saw any error is closed, never reused.
Three clocks bound a fetch: ``connect_timeout`` (a SYN-ACK lost to a saturated
link should cost a second, not the kernel's retry ladder: the center gives the
chunk to another holder as soon as the nack arrives), ``stall_timeout`` (a peer
that sends no byte this long, heartbeating or not, loses the fetch) and the
caller's overall ``timeout``.

Once a body is under way the connection's ``SO_RCVLOWAT`` is raised to
``receive_batch`` (or what is left of the body, if less): the kernel then
wakes the daemon when that many bytes wait, not on every burst of packets.
At 80 Mbit/s a 1 MiB chunk otherwise arrived in about 20 reads; each read is
an event-loop wake-up and a pass through the Python below, which is most of a
chunk's CPU cost here.  It goes back to 1 before the connection is reused, so
the next response's head is read at once.  While peers stream the chunk on
from here as it arrives (an :class:`fdship.daemon.arrivals.Arrival` with
streams), the batch is the streams' own (``RELAY_BATCH``): a larger one would
hold every hop of a relay back by the difference.  TLS connections keep the
default: their reads are of records, not of the body.

While a body streams, the fetch estimates when its last byte will arrive from
the rate so far; ``drain_lead`` seconds before that it calls the request's
``on_drain`` once, so the daemon can tell the center that this link is about to
fall idle (``fdship.core.events.FetchDraining``) and the next chunk can start
flowing while this one ends, instead of a round trip later.
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import functools
import json
import logging
import os
import socket
import ssl as ssl_module
import termios
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

import xxhash

from fdship.daemon.arrivals import RELAY_BATCH, Arrival
from fdship.daemon.ratelimit import RateLimiter
from fdship.daemon.store import free_space
from fdship.errors import FdshipError
from fdship.httpclient import IdlePool
from fdship.protocol import (DAEMON_DOWNLOAD, FAIL_CONNECT, FAIL_HASH, FAIL_HTTP, FAIL_LOCAL,
                             FAIL_MISSING, FAIL_TIMEOUT)

# One receive buffer per connection.  256 KiB measured as fast as 1 MiB on
# loopback (the socket rarely holds more per wakeup) at a quarter of the memory.
BUFFER_SIZE = 256 * 1024
MAX_HEAD = 64 * 1024  # response line + headers
MAX_ERROR_BODY = 4096  # enough of an error body to quote its message

MiB = 1024 * 1024

log = logging.getLogger("fdship.daemon")


class FetchError(FdshipError):
    """A chunk could not be fetched; ``kind`` says why (a ``fdship.protocol.FAIL_*``)."""

    status = 502

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class FetchStats:
    """Plain counters for the daemon's /metrics and load reports."""

    bytes_received: int = 0
    reads: int = 0  # socket reads that delivered response bytes (event-loop wake-ups)
    chunks_ok: int = 0
    in_flight: int = 0
    connections_opened: int = 0
    connections_reused: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def failed(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def _local_error(e: OSError, fd: int) -> FetchError:
    path = _fd_path(fd)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            vfs = os.fstatvfs(fd)
            free = f"{vfs.f_bavail * vfs.f_frsize / MiB:.0f} MiB free"
        except OSError:
            free = f"{free_space(os.path.dirname(path)) / MiB:.0f} MiB free" \
                if path.startswith("/") else "no space left"
        return FetchError(FAIL_LOCAL, f"disk full writing {path}: {free}")
    return FetchError(FAIL_LOCAL, f"cannot write {path}: {e.strerror}")


class _Request:
    """State of the one request in flight on a connection."""

    def __init__(self, peer: str, fd: int, offset: int, size: int, xxh3: str,
                 fut: asyncio.Future[int], on_drain: Callable[[], None] | None = None,
                 lead: float = 0.0, on_progress: Callable[[int], None] | None = None,
                 relay: Arrival | None = None) -> None:
        self.peer = peer
        self.fd = fd
        self.offset = offset
        self.size = size
        self.xxh3 = xxh3
        self.fut = fut
        self.head = bytearray()
        self.status = 0
        self.keep_alive = True
        self.error_len = 0
        self.error_body = bytearray()
        self.in_body = False
        self.pos = 0
        self.got_any = False
        self.hasher = xxhash.xxh3_64()
        # Drain notice: called once, ``lead`` seconds before the estimated last byte.
        self.on_drain = on_drain if lead > 0 else None
        self.lead = lead
        # Told the count of body bytes written after every pwrite (cut-through serving).
        self.on_progress = on_progress
        self.relay = relay  # the arrival peers may stream from: its streams set the batch
        self.t_sent = 0.0  # loop time the request was written: the rate counts from there
        # Stall watch: loop time of the last byte (or of our own limiter's resume).
        self.last_rx = 0.0
        self.queued = 0  # bytes the kernel held below the wake-up batch at the last stall check
        self.stall_handle: asyncio.TimerHandle | None = None


class _Conn(asyncio.BufferedProtocol):
    """One keep-alive connection to a peer, reading into one reusable buffer."""

    def __init__(self, pool: PeerPool, peer: str) -> None:
        self.pool = pool
        self.peer = peer
        self._buf = memoryview(bytearray(BUFFER_SIZE))
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.req: _Request | None = None
        self._paused = False
        self.idle_since = 0.0  # loop time it went back to the pool
        # The socket whose SO_RCVLOWAT batches a body's reads (None: not batched).
        self._sock: socket.socket | None = None
        self._lowat = 1  # the kernel's value: only changes are written

    def alive(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    # --- asyncio protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport; both
        # have what is used here (write, pause/resume_reading, close).
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.pool.receive_batch > 1 and self.pool.ssl is None:
                self._sock = sock

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        req = self.req
        if req is None or req.fut.done():
            # Bytes nobody asked for: the stream is out of step; never reuse it.
            self.close()
            return
        req.last_rx = self._loop.time()
        req.queued = 0
        self.pool.stats.reads += 1
        try:
            self._feed(req, self._buf[:nbytes])
        except FetchError as e:
            self._fail(req, e)
        except OSError as e:
            self._fail(req, _local_error(e, req.fd))

    def eof_received(self) -> bool | None:
        self.lost = True
        req = self.req
        if req is not None and not req.fut.done():
            self._fail(req, self._eof_error(req))
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        req = self.req
        if req is not None and not req.fut.done():
            if exc is None:
                self._fail(req, self._eof_error(req))
            else:
                self._fail(req, FetchError(FAIL_CONNECT, f"connection to peer {self.peer} "
                                           f"lost: {exc}"))

    # --- request handling --------------------------------------------------------------

    def send(self, req: _Request, request: bytes) -> None:
        """Write ``request`` and start watching for a stalled peer."""
        assert self.transport is not None
        self.req = req
        req.t_sent = self._loop.time()
        self.transport.write(request)
        if req.relay is not None and self._sock is not None:
            req.relay.on_stream = functools.partial(self._rebatch, req)
        stall = self.pool.stall_timeout
        if stall > 0:
            req.last_rx = self._loop.time()
            req.stall_handle = self._loop.call_at(req.last_rx + stall, self._check_stall, req)

    def _check_stall(self, req: _Request) -> None:
        """Fail the request if the peer sent nothing for ``stall_timeout`` seconds.

        One timer per stall period rather than one per read: each read only
        stamps ``last_rx``, and the timer re-arms itself from the newest stamp.
        """
        req.stall_handle = None
        if req.fut.done() or self.req is not req:
            return
        stall = self.pool.stall_timeout
        now = self._loop.time()
        if self._paused:
            # Our own download cap holds the bytes back, not the peer.
            req.stall_handle = self._loop.call_at(now + stall, self._check_stall, req)
            return
        if now - req.last_rx >= stall and self._queued_grew(req):
            req.last_rx = now  # bytes came, below the wake-up batch: a slow peer, not a dead one
        if now - req.last_rx < stall:
            req.stall_handle = self._loop.call_at(req.last_rx + stall, self._check_stall, req)
            return
        # Bytes waiting below the batch count as received: they are, just not read.
        where = f"after {req.pos + req.queued} of {req.size} body bytes" if req.in_body else \
            "before a complete response"
        self._fail(req, FetchError(FAIL_TIMEOUT, f"peer {self.peer} sent no byte for "
                                   f"{stall:g} s ({where}); giving the chunk back"))

    def _queued_grew(self, req: _Request) -> bool:
        """Did more bytes reach the socket since the last check, waiting for the batch?"""
        if self._sock is None or self._lowat <= 1:
            return False
        n = array.array("i", [0])
        try:
            fcntl.ioctl(self._sock.fileno(), termios.FIONREAD, n)
        except OSError:
            return False
        grew, req.queued = n[0] > req.queued, n[0]
        return grew

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()

    def _eof_error(self, req: _Request) -> FetchError:
        where = f"after {req.pos} of {req.size} body bytes" if req.in_body else \
            "before a complete response"
        return FetchError(FAIL_CONNECT, f"peer {self.peer} closed the connection {where}")

    def _fail(self, req: _Request, err: FetchError) -> None:
        self.close()
        if not req.fut.done():
            req.fut.set_exception(err)

    def _maybe_drain(self, req: _Request) -> None:
        """Call ``req.on_drain`` once the bytes still to come would take at most ``lead``.

        The rate is the body bytes so far over the time since the request was
        written.  That can only err low (the round trip and TCP's ramp count
        as time with no bytes), and erring low only sends the notice a little
        late.  A rate counted from the first body bytes instead errs high:
        a daemon that was off the CPU for a moment then finds a socket buffer
        full of bytes, reads them in a burst, and a burst read right after the
        first one looked like a link 100 times its real speed.  The notice
        then went out with most of the chunk still to come, the center gave
        both ends a second transfer, and both ran at half speed (31 of 320
        notices in a 20-host shaped run).  For the same reason nothing is
        announced before half the body is in: a link's burst allowance (a
        token bucket) can also deliver the first bytes faster than the rate.
        """
        if 2 * req.pos < req.size:
            return
        dt = self._loop.time() - req.t_sent
        # left / (pos / dt) <= lead, without dividing by a rate that may be 0.
        if dt > 0 and (req.size - req.pos) * dt <= req.lead * req.pos:
            cb, req.on_drain = req.on_drain, None
            try:
                cb()  # type: ignore[misc]
            except Exception:  # a notice is a hint: it must never fail the fetch
                log.exception("drain notice for a fetch from %s failed", self.peer)

    def _set_lowat(self, n: int) -> None:
        """Wake on ``n`` waiting bytes (the kernel caps it at half the receive buffer)."""
        if n == self._lowat or self._sock is None:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self._lowat = n
        except OSError:
            # Closed under us, or a socket that has no such option: read as it comes.
            self._sock = None

    def _progress(self, req: _Request) -> None:
        try:
            req.on_progress(req.pos)  # type: ignore[misc]
        except Exception:
            # Progress feeds other peers' downloads; it must never fail ours.  A
            # broken callback would fail again on every read: call it no more.
            req.on_progress = None
            log.exception("progress report for a fetch from %s failed", self.peer)

    def _feed(self, req: _Request, data: memoryview) -> None:
        req.got_any = True
        if not req.status:
            prev = len(req.head)
            req.head += data[:MAX_HEAD - prev]
            end = req.head.find(b"\r\n\r\n", max(0, prev - 3))
            if end < 0:
                if len(req.head) >= MAX_HEAD:
                    raise FetchError(FAIL_HTTP, f"peer {self.peer} sent a response header "
                                     f"over {MAX_HEAD} bytes")
                return
            self._parse_head(req, bytes(req.head[:end]))
            data = data[end + 4 - prev:]
        if req.status != 200:
            self._error_body(req, data)
            return
        if data:
            self._body(req, data)
        if self._sock is not None:
            self._rebatch(req)

    def _rebatch(self, req: _Request) -> None:
        """Set the wake-up batch for the rest of ``req``'s body."""
        if self.req is not req or not req.in_body:
            return
        left = req.size - req.pos
        if left <= 0:
            self._set_lowat(1)  # all in: the next response's head is read at once
            return
        batch = self.pool.receive_batch
        if req.relay is not None and req.relay.streams:
            batch = min(batch, RELAY_BATCH)
        # Never more than is coming: that read would wait for bytes that never come.
        self._set_lowat(min(left, batch))

    def _parse_head(self, req: _Request, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise FetchError(FAIL_HTTP, f"peer {self.peer} answered with something that is "
                             f"not HTTP/1.x: {lines[0][:80]!r}")
        req.status = int(parts[1])
        length = -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                v = value.strip()
                if not v.isdigit():
                    raise FetchError(FAIL_HTTP, f"peer {self.peer} sent a bad Content-Length")
                length = int(v)
            elif name == b"connection" and value.strip().lower() == b"close":
                req.keep_alive = False
            elif name == b"transfer-encoding":
                req.keep_alive = False  # never sent by our server for a chunk
        if req.status == 200:
            if length != req.size:
                raise FetchError(FAIL_HTTP, f"peer {self.peer} announced {length} bytes for a "
                                 f"chunk of {req.size} bytes")
            req.in_body = True
            if req.size == 0:
                self._complete(req)
        else:
            req.keep_alive = False
            req.error_len = min(length if length >= 0 else MAX_ERROR_BODY, MAX_ERROR_BODY)
            if req.error_len == 0:
                self._error_done(req)

    def _error_body(self, req: _Request, data: memoryview) -> None:
        req.error_body += data[:req.error_len - len(req.error_body)]
        if len(req.error_body) >= req.error_len:
            self._error_done(req)

    def _error_done(self, req: _Request) -> None:
        msg = req.error_body.decode("utf-8", "replace")
        try:
            msg = str(json.loads(msg).get("error", msg))
        except (ValueError, AttributeError):
            pass
        kind = FAIL_MISSING if req.status == 404 else FAIL_HTTP
        raise FetchError(kind, f"peer {self.peer} answered HTTP {req.status}: {msg[:500]}")

    def _body(self, req: _Request, data: memoryview) -> None:
        n = len(data)
        if req.pos + n > req.size:
            raise FetchError(FAIL_HTTP, f"peer {self.peer} sent more than the {req.size} bytes "
                             "it announced")
        req.hasher.update(data)
        off = req.offset + req.pos
        while data:
            w = os.pwrite(req.fd, data, off)
            data = data[w:]
            off += w
        req.pos += n
        self.pool.stats.bytes_received += n
        if req.on_progress is not None:
            self._progress(req)
        if req.on_drain is not None and req.pos < req.size:
            self._maybe_drain(req)
        limiter = self.pool.limiter
        if limiter is not None:
            delay = limiter.debit(n)
            if delay > 0 and self.transport is not None and not self._paused:
                # Stop reading; TCP flow control then slows the sender for us.
                self._paused = True
                self.transport.pause_reading()
                asyncio.get_running_loop().call_later(delay, self._resume)
        if req.pos == req.size:
            self._complete(req)

    def _resume(self) -> None:
        self._paused = False
        if self.req is not None:
            self.req.last_rx = self._loop.time()  # the stall clock restarts from our resume
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _complete(self, req: _Request) -> None:
        got = req.hasher.hexdigest()
        if got != req.xxh3:
            raise FetchError(FAIL_HASH, f"chunk from peer {self.peer} hashed to {got}, expected "
                             f"{req.xxh3}")
        req.fut.set_result(req.pos)


# Parallel connection attempts to one peer at most (see PeerPool._connect).
MAX_CONNECT_ATTEMPTS = 3


def _close_if_connected(t: asyncio.Task[_Conn]) -> None:
    if not t.cancelled() and t.exception() is None:
        t.result().close()


class PeerPool:
    """Keep-alive connections to peers and the fetch that uses them.

    Idle connections are kept per peer, newest reused first, so most fetches
    skip the TCP (and TLS) handshake.  When the pool is full, the connection
    idle the longest goes, not the one just used: the peers of the current
    job stay warm.  A connection idle over ``max_idle_age`` is dropped rather
    than reused, ahead of the peer's own idle timeout (``idle_timeout``, 120 s
    by default), so a reuse rarely races the peer's hang-up; when it does, the
    fetch retries once on a new connection.  The keeping itself is
    :class:`fdship.httpclient.IdlePool`, shared with the JSON client.
    """

    def __init__(self, token: str = "", connect_timeout: float = 1.0,
                 limiter: RateLimiter | None = None, max_idle_per_peer: int = 4,
                 max_idle: int = 64, ssl: ssl_module.SSLContext | None = None,
                 stall_timeout: float = 10.0, drain_lead: float = 0.0,
                 max_idle_age: float = 60.0, connect_stagger: float = 0.25,
                 receive_batch: int = 0) -> None:
        self.token = token
        # Body bytes that wake a read (SO_RCVLOWAT); 0 or 1: every packet.
        self.receive_batch = receive_batch
        # A connection attempt unanswered this long gets a second one beside
        # it (then a third...), the first to complete wins: a SYN or SYN-ACK
        # dropped by a full queue otherwise costs the kernel's 1 s SYN
        # retransmission timer.  0: one attempt only.
        self.connect_stagger = connect_stagger
        # TLS to peers (the cluster serves HTTPS): the handshake counts against
        # connect_timeout, and the body still lands in the one reusable buffer.
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout  # 0: no stall watch (only the overall timeout)
        self.drain_lead = drain_lead  # 0: never call on_drain
        self.limiter = limiter if limiter is not None and limiter.enabled else None
        self.stats = FetchStats()
        self._idle: IdlePool[_Conn] = IdlePool(max_idle_per_peer, max_idle, max_idle_age)
        self._closed = False

    def idle_count(self, peer: str | None = None) -> int:
        return self._idle.count(peer)

    async def _connect(self, peer: str) -> _Conn:
        """A new connection to ``peer``, from staggered parallel attempts.

        Like Happy Eyeballs (RFC 8305) across time instead of address
        families: attempt k+1 starts when attempts 1..k have gone
        ``connect_stagger`` seconds without completing, and the first to
        complete is used; the others are closed.  On a quiet network the
        first answers in a round trip and no second attempt is made.  A peer
        that refuses outright fails at once, whatever attempts are pending.
        """
        host, sep, port = peer.rpartition(":")
        if not sep or not port.isdigit():
            raise FetchError(FAIL_CONNECT, f"peer address {peer!r} is not HOST:PORT")
        loop = asyncio.get_running_loop()
        addr = host.strip("[]")

        async def attempt() -> _Conn:
            _, conn = await loop.create_connection(
                lambda: _Conn(self, peer), addr, int(port), ssl=self.ssl,
                server_hostname=addr if self.ssl else None)
            return conn

        deadline = loop.time() + self.connect_timeout
        most = MAX_CONNECT_ATTEMPTS if self.connect_stagger > 0 else 1
        tries: list[asyncio.Task[_Conn]] = []
        try:
            started = 0
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise FetchError(FAIL_TIMEOUT, f"timed out connecting to peer {peer} after "
                                     f"{self.connect_timeout:g} s ({started} attempts)")
                if started < most:
                    tries.append(asyncio.ensure_future(attempt()))
                    started += 1
                wait = min(left, self.connect_stagger) if started < most else left
                done, _ = await asyncio.wait(tries, timeout=wait,
                                             return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    tries.remove(t)
                    e = t.exception()
                    if e is None:
                        self.stats.connections_opened += 1
                        return t.result()
                    if isinstance(e, ssl_module.SSLError):
                        raise FetchError(FAIL_CONNECT, f"TLS with peer {peer} failed: {e}") \
                            from None
                    if isinstance(e, OSError):
                        raise FetchError(FAIL_CONNECT, f"cannot connect to peer {peer}: "
                                         f"{e.strerror or e}") from None
                    raise e
        finally:
            for t in tries:  # the losers: cancel, or close what completed meanwhile
                t.cancel()
                t.add_done_callback(_close_if_connected)

    def _give_back(self, conn: _Conn) -> None:
        conn.req = None
        if self._closed or conn.lost:
            conn.close()
            return
        self._idle.give(conn.peer, conn, asyncio.get_running_loop().time())

    async def fetch(self, peer: str, job: str, file: int, chunk: int, size: int, xxh3: str,
                    fd: int, offset: int, timeout: float,
                    on_drain: Callable[[], None] | None = None,
                    on_progress: Callable[[int], None] | None = None,
                    relay: Arrival | None = None, arriving: bool = False) -> int:
        """Fetch one chunk from ``peer`` into ``fd`` at ``offset``; return its size.

        Raises FetchError (kind in ``fdship.protocol.FAIL_KINDS``) unless the
        bytes arrived complete and hash to ``xxh3``.  Bytes of a failed fetch
        may have been written; they are never marked verified by the caller.
        ``on_drain`` is called at most once, synchronously from the read path,
        when the rest of the body should arrive within ``drain_lead`` seconds
        (never when the whole body arrives in one read); it must not block.
        ``on_progress(n)`` is called synchronously after every write into
        ``fd`` with ``n``, the count of this chunk's bytes written so far (from
        ``offset`` on, front to back, not yet verified); it must not block
        either: it runs on every socket read.  ``relay`` is the chunk's
        arrival when peers may stream it on from here: while they do, the body
        is read in their batches (see the module's docstring).  ``arriving``:
        the peer is itself still receiving the chunk (the center's
        ``Fetch.arriving``), so it is asked to wait for the chunk's arrival
        there instead of answering 404 when this request beats its own pull.
        """
        self.stats.in_flight += 1
        try:
            n = await self._fetch(peer, job, file, chunk, size, xxh3, fd, offset, timeout,
                                  on_drain, on_progress, relay, arriving)
        except FetchError as e:
            self.stats.failed(e.kind)
            raise
        finally:
            self.stats.in_flight -= 1
            if relay is not None:
                relay.on_stream = None
        self.stats.chunks_ok += 1
        return n

    async def _fetch(self, peer: str, job: str, file: int, chunk: int, size: int, xxh3: str,
                     fd: int, offset: int, timeout: float,
                     on_drain: Callable[[], None] | None,
                     on_progress: Callable[[int], None] | None = None,
                     relay: Arrival | None = None, arriving: bool = False) -> int:
        if self._closed:
            raise FetchError(FAIL_CONNECT, "the peer pool is closed")
        target = (f"{DAEMON_DOWNLOAD}?job={quote(job, safe='')}&file={int(file)}"
                  f"&chunk={int(chunk)}" + ("&arriving=1" if arriving else ""))
        head = f"GET {target} HTTP/1.1\r\nHost: {peer}\r\n"
        if self.token:
            head += f"Authorization: Bearer {self.token}\r\n"
        request = (head + "\r\n").encode("latin-1")
        # Our own reference to the staging file: if the job is dropped while we
        # write, the store closes its fd, and a recycled fd number must never
        # receive these bytes.
        fd = os.dup(fd)
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(timeout):
                # One retry, only when a reused idle connection turns out to have
                # been closed by the peer before it answered a single byte: the
                # GET is idempotent, and the peer's idle timeout is no failure.
                for attempt in (0, 1):
                    conn = self._idle.take(peer, asyncio.get_running_loop().time()) \
                        if attempt == 0 else None
                    reused = conn is not None
                    if conn is None:
                        conn = await self._connect(peer)
                    else:
                        self.stats.connections_reused += 1
                    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
                    req = _Request(peer, fd, offset, size, xxh3, fut, on_drain,
                                   self.drain_lead, on_progress, relay)
                    conn.send(req, request)
                    try:
                        n = await fut
                    except FetchError as e:
                        if reused and not req.got_any and e.kind == FAIL_CONNECT:
                            conn = None
                            continue
                        raise
                    finally:
                        if req.stall_handle is not None:
                            req.stall_handle.cancel()
                            req.stall_handle = None
                    if req.keep_alive:
                        self._give_back(conn)
                    else:
                        conn.close()
                    conn = None
                    return n
        except TimeoutError:
            if conn is not None:
                conn.close()
                conn = None
            raise FetchError(FAIL_TIMEOUT, f"fetching chunk {chunk} of job {job} file {file} "
                             f"from peer {peer} took over {timeout:g} s") from None
        finally:
            if conn is not None:  # error or cancellation: the stream state is unknown
                conn.close()
                conn.req = None
            os.close(fd)
        raise FetchError(FAIL_CONNECT, f"peer {peer} closed the connection twice")

    async def close(self) -> None:
        """Close every idle connection; fetches in flight close theirs when they end."""
        self._closed = True
        self._idle.close()
        await asyncio.sleep(0)  # let the transports run their close callbacks
