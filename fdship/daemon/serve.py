"""GET /daemon/download: hand one verified chunk to a peer, zero copy.

Where it sits: every daemon mounts :class:`DownloadHandler`; peers running
:mod:`fdship.daemon.fetch` call it for the chunks the center assigned them.
Which bytes to send comes only from :meth:`fdship.daemon.store.Store.open_chunk`
(job, file and chunk are dictionary keys, never path parts), so a request can
only ever read what the store holds verified.

The body goes out with ``sendfile(2)`` on the connection's own socket, driven
by the event loop (see ``DownloadHandler._sendfile``): the bytes travel page
cache -> socket without entering Python.  Tornado does not know about those
bytes, so after sending we credit them against the connection's
Content-Length accounting (``HTTP1Connection._expected_content_remaining``, a
private attribute) and let Tornado finish the response normally, which keeps
the connection alive for the peer's next chunk.  ``tests/daemon/test_serve_fetch.py`` fails loudly if a
Tornado upgrade changes that contract; if the attribute is gone the handler
falls back to the buffered path rather than corrupting the stream.

The buffered path (``os.pread`` slices + ``write``) serves TLS connections,
where sendfile cannot work, and the fault injection used by tests.

Cut-through: a chunk not held verified but still arriving here (an
:class:`fdship.daemon.arrivals.Arrival`, registered when the pull was
accepted) is streamed instead of refused.  The headers go out at once with the
full Content-Length; then the bytes the fetch has written so far go out (the
same sendfile or buffered loop), the handler waits for more, and so on.  The
last byte leaves only once this daemon verified the chunk.  If the arrival
fails, or nothing arrives for ``stall_timeout`` seconds, the connection is
closed: the downstream peer sees a short body and its fetch fails; it never
verifies partial bytes because it hashes the whole chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tornado.iostream import SSLIOStream, StreamClosedError

from fdship.daemon.arrivals import FAILED, RELAY_BATCH, Arrival, Arrivals
from fdship.daemon.ratelimit import RateLimiter
from fdship.daemon.store import Store, check_job_id
from fdship.errors import BadRequest, ConfigError, NotFound
from fdship.web import BaseHandler

log = logging.getLogger("fdship.daemon.serve")

# Without a rate cap a chunk goes out as one sendfile run; under a cap it goes
# in 256 KiB slices, each paid for before it is sent, which keeps the rate smooth.
LIMITED_SLICE = 256 * 1024
BUFFERED_SLICE = 256 * 1024
YIELD_EVERY = 8 * 1024 * 1024
WRITE_TIMEOUT = 30.0  # seconds without any progress before a peer is hung up on
# Seconds a stream of a chunk still arriving waits for its next bytes before it
# hangs up; the daemon passes its fetch_stall_timeout (the same default).
STALL_TIMEOUT = 10.0
# Longest a request marked ``arriving`` (the chunk is on its way here, relayed)
# waits for this daemon's own pull of the chunk before it is refused; bounded
# by the stall timeout too.  Both pulls leave the center together, so this only
# covers a busy event loop or a slow control channel.
ARRIVING_WAIT = 5.0

_rng = random.Random()


class Submissions:
    """This daemon's job submissions waiting for the center's answer.

    The center sends a job's first pulls as it accepts the job, so a target's
    request for a chunk can reach the source before the source has read that
    answer and committed its snapshot under the job's id.  Such a request
    waits for the submissions in flight (one center round trip) instead of
    being refused, which cost the target a retry and counted against the
    source.
    """

    def __init__(self) -> None:
        self._inflight: set[asyncio.Future[None]] = set()

    @property
    def busy(self) -> bool:
        return bool(self._inflight)

    @contextlib.contextmanager
    def pending(self) -> Iterator[None]:
        """Around a submission: from before it is sent until its snapshots are
        committed (or discarded)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight.add(fut)
        try:
            yield
        finally:
            self._inflight.discard(fut)
            fut.set_result(None)

    async def settled(self, timeout: float) -> None:
        """Wait, at most ``timeout`` s, for the submissions in flight now to end."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout)


@dataclass
class ServeStats:
    """Plain counters for the daemon's /metrics and load reports."""

    bytes_served: int = 0
    chunks_served: int = 0
    send_waits: int = 0  # sendfile found the socket full and waited to write again
    uploads_in_flight: int = 0
    not_found: int = 0
    aborted: int = 0  # the peer went away, stalled past the timeout, or a fault dropped it
    zero_copy: int = 0  # chunks sent with sendfile
    buffered: int = 0  # chunks sent through Python (TLS, fault injection)
    faults_injected: int = 0
    streamed: int = 0  # chunks served complete while they were still arriving here
    awaited_pulls: int = 0  # requests that came before this daemon's pull of their chunk
    # Requests that came while a submission of this daemon awaited its answer.
    awaited_submissions: int = 0


def parse_fault(spec: str) -> tuple[str, float]:
    """``"corrupt=0.3"`` -> ("corrupt", 0.3); ``""`` -> ("", 0.0)."""
    if not spec:
        return "", 0.0
    kind, sep, p = spec.partition("=")
    try:
        prob = float(p)
    except ValueError:
        prob = -1.0
    if not sep or kind not in ("corrupt", "drop") or not 0.0 <= prob <= 1.0:
        raise ConfigError(f"fault_inject {spec!r} is malformed: write corrupt=P or drop=P with "
                          "P between 0 and 1")
    return kind, prob


def _cork(sock: socket.socket, on: bool) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)
    except OSError:
        pass  # not TCP (a test's unix socket) or already closed: nothing to batch


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Aborted(Exception):
    """The transfer cannot continue; the connection has been closed."""


class DownloadHandler(BaseHandler):
    """GET /daemon/download?job=J&file=F&chunk=C -> the chunk's bytes."""

    def initialize(self, store: Store, limiter: RateLimiter | None = None,
                   stats: ServeStats | None = None, fault: str = "",
                   write_timeout: float = WRITE_TIMEOUT, arrivals: Arrivals | None = None,
                   stall_timeout: float = STALL_TIMEOUT,
                   submissions: Submissions | None = None) -> None:
        self.store = store
        self.submissions = submissions
        # Chunks being fetched here; None serves verified chunks only.
        self.arrivals = arrivals
        self.stall_timeout = stall_timeout
        self.limiter = limiter if limiter is not None and limiter.enabled else None
        self.stats = stats if stats is not None else ServeStats()
        self.fault = parse_fault(fault)
        self.write_timeout = write_timeout
        self._send_fut: asyncio.Future[Any] | None = None
        self._closed = False

    def compute_etag(self) -> str | None:
        return None  # chunks are immutable and never conditionally requested

    def on_connection_close(self) -> None:
        # Tornado closed the socket (the peer hung up): a sendfile still waiting
        # for it to become writable would wait forever, so stop it now.
        self._closed = True
        if self._send_fut is not None and not self._send_fut.done():
            self._send_fut.cancel()

    def _int_arg(self, name: str) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            raise BadRequest(f"missing query parameter '{name}': call "
                             "/daemon/download?job=J&file=F&chunk=C")
        if not raw.isdigit() or len(raw) > 12:
            raise BadRequest(f"query parameter '{name}' must be a non-negative integer, "
                             f"got {raw[:40]!r}")
        return int(raw)

    async def get(self) -> None:
        job = self.get_query_argument("job", None)
        if job is None:
            raise BadRequest("missing query parameter 'job': call "
                             "/daemon/download?job=J&file=F&chunk=C")
        check_job_id(job)
        file, chunk = self._int_arg("file"), self._int_arg("chunk")
        src, arrival = self._source(job, file, chunk)
        if src is None and self.arrivals is not None and \
                self.get_query_argument("arriving", "") == "1" and \
                self.arrivals.get((job, file, chunk)) is None:
            # The requester was told the chunk is on its way here: our pull of
            # it may simply not have come yet.
            self.stats.awaited_pulls += 1
            await self.arrivals.opened((job, file, chunk), min(ARRIVING_WAIT, self.stall_timeout))
            src, arrival = self._source(job, file, chunk)
        if src is None and self.submissions is not None and self.submissions.busy:
            # Perhaps a job this daemon just submitted, accepted but not yet
            # committed here (see Submissions).
            self.stats.awaited_submissions += 1
            await self.submissions.settled(min(ARRIVING_WAIT, self.stall_timeout))
            src, arrival = self._source(job, file, chunk)
        if src is None:
            self.stats.not_found += 1
            raise NotFound(f"chunk {chunk} of job {job} file {file} is not held verified by "
                           "this daemon; ask the center for another peer")
        fd, offset, length = src
        self.stats.uploads_in_flight += 1
        if arrival is not None:
            arrival.stream_started()
        try:
            self.set_header("Content-Type", "application/octet-stream")
            self.set_header("Content-Length", str(length))
            await self._send(fd, offset, length, arrival)
            if arrival is not None:
                self.stats.streamed += 1
        except _Aborted:
            self.stats.aborted += 1
        finally:
            self.stats.uploads_in_flight -= 1
            if arrival is not None:
                arrival.stream_ended()
            os.close(fd)

    def _source(self, job: str, file: int,
                chunk: int) -> tuple[tuple[int, int, int] | None, Arrival | None]:
        """((fd, offset, length), arrival) of the chunk: held verified (arrival
        None), else still arriving here, else (None, None).

        The fd is our own reference to the open file: if the job is dropped
        mid-send the store closes its fd, and a recycled fd number must not be
        read from.
        """
        src = self.store.open_chunk(job, file, chunk)
        if src is None and self.arrivals is not None:
            return self._arriving(job, file, chunk)
        return src, None

    def _arriving(self, job: str, file: int,
                  chunk: int) -> tuple[tuple[int, int, int] | None, Arrival | None]:
        """((fd, offset, length), arrival) of a chunk still arriving here, or (None, None).

        The fd is our own dup of the staging file, as for a verified chunk.
        """
        assert self.arrivals is not None
        arrival = self.arrivals.get((job, file, chunk))
        if arrival is None or arrival.state == FAILED:
            return None, None
        fd = self.store.open_staging_fd(job, file)
        if fd is None:  # the job was dropped meanwhile
            return None, None
        return (fd, arrival.offset, arrival.length), arrival

    async def _more(self, arrival: Arrival, have: int) -> int:
        """Wait until ``arrival`` has more than ``have`` bytes to send; return its count.

        Every wait is bounded: no news from the fetch for ``stall_timeout``
        seconds, a failed fetch, or the peer hanging up closes the connection.
        """
        while True:
            avail = arrival.available()
            if avail > have:
                return avail
            if arrival.state == FAILED:
                log.info("upload of arriving chunk %s to %s aborted after %d of %d bytes: its "
                         "fetch ended (%s)", arrival.key, self.request.remote_ip, have,
                         arrival.length, arrival.reason)
                raise self._abort()
            if self._closed:
                raise self._abort()
            # A batch at a time (or the rest): one wake-up and one sendfile per
            # RELAY_BATCH bytes, not per socket read of the fetch.
            # The last byte waits for verification: past it, only the end can wake us.
            want = min(have + RELAY_BATCH, arrival.length - 1)
            fut = arrival.changed(want if want > have else arrival.length)
            self._send_fut = fut
            try:
                await asyncio.wait_for(fut, self.stall_timeout)
            except asyncio.TimeoutError:
                log.info("upload of arriving chunk %s to %s aborted after %d of %d bytes: no "
                         "byte arrived for %g s", arrival.key, self.request.remote_ip, have,
                         arrival.length, self.stall_timeout)
                raise self._abort() from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we are being cancelled ourselves
                raise self._abort() from None  # on_connection_close: the peer went away
            finally:
                self._send_fut = None

    async def _send(self, fd: int, offset: int, length: int,
                    arrival: Arrival | None = None) -> None:
        kind, prob = self.fault
        fault = kind if kind and _rng.random() < prob else ""
        conn = self.request.connection
        stream = getattr(conn, "stream", None)
        if fault:
            self.stats.faults_injected += 1
        if fault == "corrupt":
            await self._send_buffered(fd, offset, length, corrupt_at=_rng.randrange(length),
                                      arrival=arrival)
        elif isinstance(stream, SSLIOStream) or stream is None or \
                not hasattr(conn, "_expected_content_remaining"):
            await self._send_buffered(fd, offset, length, arrival=arrival)
        else:
            await self._send_zero_copy(fd, offset, length, drop=fault == "drop", arrival=arrival)

    def _abort(self) -> _Aborted:
        stream = getattr(self.request.connection, "stream", None)
        if stream is not None:
            stream.close()
        return _Aborted()

    async def _send_zero_copy(self, fd: int, offset: int, length: int, drop: bool,
                              arrival: Arrival | None = None) -> None:
        conn: Any = self.request.connection
        stream = conn.stream
        sock: socket.socket = stream.socket
        # Cork the socket so the headers leave in the same segment as the first
        # body bytes: on loopback every separate segment costs a delivery to
        # (and a wake-up of) the peer, which measured as a third of a small
        # chunk's serving time.  nginx's tcp_nopush does the same.
        _cork(sock, True)
        try:
            # Headers first, through Tornado.  IOStream writes at once when it
            # can; only if they did not all fit must we wait before sendfile,
            # or the body would overtake them.
            headers = self.flush()
            if stream.writing():
                await asyncio.wait_for(headers, self.write_timeout)
        except (StreamClosedError, asyncio.TimeoutError):
            raise self._abort() from None
        # A dropped connection mid-chunk: send half, then hang up.
        end = length // 2 if drop else length
        if arrival is None:
            sent = await self._pump(stream, fd, offset, 0, end, length)
        else:
            sent, corked = 0, True
            while sent < end:
                avail = arrival.available()
                if avail <= sent:
                    if corked:
                        # Out with the headers and any partial segment now, not
                        # when the cork's 200 ms run out: the peer is waiting.
                        _cork(sock, False)
                        corked = False
                    avail = await self._more(arrival, sent)
                sent = await self._pump(stream, fd, offset, sent, min(avail, end), length)
        _cork(sock, False)  # push out the last partial segment now
        if drop:
            raise self._abort()
        # Tell Tornado the body went out so its Content-Length check passes and
        # the connection stays open for the next request.
        conn._expected_content_remaining -= sent
        self.stats.chunks_served += 1
        self.stats.zero_copy += 1
        self.finish()

    async def _pump(self, stream: Any, fd: int, offset: int, sent: int, end: int,
                    length: int) -> int:
        """sendfile bytes ``sent``..``end`` of the chunk at ``offset``; return ``end``."""
        step = LIMITED_SLICE if self.limiter else end - sent
        while sent < end:
            n = min(step, end - sent)
            if self.limiter:
                await self.limiter.acquire(n)
            if self._closed or stream.closed():
                raise self._abort()
            try:
                got = await self._sendfile(stream.socket, fd, offset + sent, n)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we are being cancelled ourselves
                raise self._abort() from None  # on_connection_close stopped the send
            except (OSError, asyncio.TimeoutError) as e:
                # A broken pipe, a reset, or a peer that stopped reading for
                # write_timeout seconds: free the upload slot.
                log.info("upload to %s aborted after %d of %d bytes: %s",
                         self.request.remote_ip, sent, length, e or type(e).__name__)
                raise self._abort() from None
            sent += got
            if got < n:
                # The file is shorter than the store claims (truncated under us):
                # hanging up is the only honest answer once headers are out.
                raise self._abort()
        return sent

    async def _sendfile(self, sock: socket.socket, fd: int, offset: int, count: int) -> int:
        """sendfile(2) ``count`` bytes of ``fd`` at ``offset`` to ``sock``; return bytes sent.

        The same zero-copy syscall as ``loop.sock_sendfile(..., fallback=False)``,
        but it calls sendfile again at once while the socket accepts more and
        only waits for writability on EAGAIN; asyncio's version waits for an
        event-loop round trip after every call, including after the last one,
        which left a window in which a peer that had already read the whole
        body and hung up made a complete upload look aborted.  The wait for
        writability is the stall timeout: no progress for ``write_timeout``
        seconds and the connection is closed.
        """
        loop = asyncio.get_running_loop()
        sfd = sock.fileno()
        sent = 0
        while sent < count:
            try:
                n = os.sendfile(sfd, fd, offset + sent, count - sent)
            except (BlockingIOError, InterruptedError):
                self.stats.send_waits += 1
                fut = loop.create_future()
                self._send_fut = fut
                loop.add_writer(sfd, _wake, fut)
                try:
                    await asyncio.wait_for(fut, self.write_timeout)
                finally:
                    loop.remove_writer(sfd)
                    self._send_fut = None
                continue
            if n == 0:
                break  # end of file
            sent += n
            self.stats.bytes_served += n
            if sent % YIELD_EVERY < n:
                # A fast reader can keep the socket writable for a whole big
                # chunk; let other connections run now and then.
                await asyncio.sleep(0)
        return sent

    async def _send_buffered(self, fd: int, offset: int, length: int,
                             corrupt_at: int = -1, arrival: Arrival | None = None) -> None:
        if arrival is not None:
            # The headers at once, whenever the first bytes arrive.
            try:
                await asyncio.wait_for(self.flush(), self.write_timeout)
            except (StreamClosedError, asyncio.TimeoutError):
                raise self._abort() from None
        sent = 0
        while sent < length:
            limit = length
            if arrival is not None:
                limit = arrival.available()
                if limit <= sent:
                    limit = await self._more(arrival, sent)
            n = min(BUFFERED_SLICE, limit - sent)
            data = os.pread(fd, n, offset + sent)
            if not data:
                raise self._abort()
            if sent <= corrupt_at < sent + len(data):
                b = bytearray(data)
                b[corrupt_at - sent] ^= 0xFF
                data = bytes(b)
            if self.limiter:
                await self.limiter.acquire(len(data))
            if self._closed:
                raise self._abort()
            self.write(data)
            try:
                await asyncio.wait_for(self.flush(), self.write_timeout)
            except (StreamClosedError, asyncio.TimeoutError):
                raise self._abort() from None
            sent += len(data)
            self.stats.bytes_served += len(data)
        self.stats.chunks_served += 1
        self.stats.buffered += 1
        self.finish()
