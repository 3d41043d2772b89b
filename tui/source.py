"""Where ``fdship-tui`` gets its data: the center over HTTP, or fixtures in tests.

The Textual app (:mod:`tui.app`) follows one :class:`DataSource`.  A source is
an async iterator of *updates*:

* :class:`Status` -- connection state for the status line (``connecting``,
  ``live``, ``reconnecting`` with the delay and the reason);
* :class:`Snapshot` -- a fresh full state (the job list and the host list),
  sent after every (re)connection;
* :class:`Event` -- one change from the center's ``/center/events`` stream
  (``job``, ``machine`` or ``host``, each carrying a whole row), or a
  :class:`Batch` of them when several were already waiting.

plus :meth:`DataSource.job` for the per-machine table of one job.

:class:`HTTPSource` is the production implementation.  It opens the event
stream *first* and only then fetches the full state, so nothing that changes
between the two is lost: events that arrive while the GETs run are queued and
delivered after the snapshot (every event is a whole row, so folding one that
the snapshot already contains is harmless).  When the stream breaks it backs
off exponentially (capped), reconnects and re-fetches the full state.  It
resumes with ``since=`` the last event id (and ``Last-Event-ID``) when the
center stayed up -- a dropped connection, an idle timeout -- and handles the
center's ``reset`` event (we asked for more than it keeps, or for ids from a
center that has since restarted) with a full re-fetch.  Once a connection
attempt has been refused the center is taken to have restarted and the source
follows from "now" instead of resuming, which the stream-first ordering above
makes lossless anyway.  A restarted center numbers its events from its clock
in milliseconds, so an old id is normally below its range and answered with
``reset``; not sending it at all also covers a center that published more
than one event per millisecond, or whose clock stepped back.

:class:`MemorySource` is an in-memory center for tests and screenshots: the
test pushes events, drops and restores the "connection", and the app cannot
tell it from the real thing.

The SSE stream is read with plain asyncio (HTTP/1.1, chunked or not) so that
cancelling the app's worker closes the socket at once; the one-shot GETs use
Tornado's ``AsyncHTTPClient``.  Over https:// both verify the center's
certificate against the same CA (``tls_ca``, else ``$FDSHIP_TLS_CA``, else the
system's trust store), and a failed handshake is put in words on the status
line (the CA it was checked against, and ``--tls-ca``).  This module imports
no Textual.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlencode, urlsplit

from fdship import protocol
from fdship.errors import (
    BadRequest,
    FdshipError,
    NotFound,
    ProtocolError,
    Unauthorized,
    Unavailable,
)

# --- updates -----------------------------------------------------------------------

CONNECTING, LIVE, RECONNECTING = "connecting", "live", "reconnecting"


@dataclass(frozen=True)
class Status:
    """The connection state, for the status line."""

    state: str
    retry_in: float | None = None  # seconds until the next attempt (reconnecting)
    error: str = ""  # why the last attempt failed, in words
    attempt: int = 0


@dataclass(frozen=True)
class Snapshot:
    """A fresh full state: replaces everything the view held about jobs and hosts."""

    jobs: list[dict[str, Any]]
    hosts: list[dict[str, Any]]


@dataclass(frozen=True)
class Event:
    """One change from ``/center/events``; ``received`` is ``time.perf_counter()`` on arrival."""

    kind: str
    data: dict[str, Any]
    id: int | None = None
    received: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Batch:
    """Events that were already waiting together: one message to the app, not many.

    A busy center sends hundreds of events a second; handing them over in
    batches keeps the UI's per-message cost from growing with the event rate.
    """

    events: list[Event]


Update = Status | Snapshot | Event | Batch


@runtime_checkable
class DataSource(Protocol):
    """What the app needs from wherever data comes from."""

    #: Shown in the title bar: the center's URL or a fixture name.
    description: str

    def updates(self) -> AsyncIterator[Update]:
        """Status, snapshots and events, in order, until closed or cancelled."""
        ...

    async def job(self, job_id: str) -> dict[str, Any]:
        """One job with every machine row (``GET /center/jobs/ID``)."""
        ...

    async def close(self) -> None:
        """Stop following; further ``updates()`` end."""
        ...


# --- server-sent events ------------------------------------------------------------


@dataclass(frozen=True)
class SSEMessage:
    event: str
    data: str
    id: str | None


class SSEDecoder:
    """Incremental text/event-stream decoder: ``feed(bytes) -> [SSEMessage]``.

    Follows the WHATWG rules that matter here: lines end in LF, CRLF or CR;
    ``:`` starts a comment (keep-alives); ``data`` lines join with newlines; a
    blank line dispatches; a message without data is dropped.  A line longer
    than ``max_line`` is a protocol error rather than unbounded memory.
    """

    def __init__(self, max_line: int = 8 * 1024 * 1024) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self.last_id: str | None = None
        self.retry_ms: int | None = None
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        out: list[SSEMessage] = []
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across two reads
        self._pending_cr = False
        self._buf += chunk
        start = 0
        buf = self._buf
        n = len(buf)
        while start < n:
            lf = buf.find(b"\n", start)
            cr = buf.find(b"\r", start)
            if lf < 0 and cr < 0:
                break
            if cr < 0 or (0 <= lf < cr):
                end, nxt = lf, lf + 1
            else:
                end = cr
                if cr + 1 < n:
                    nxt = cr + 2 if buf[cr + 1] == 0x0A else cr + 1
                else:
                    nxt = cr + 1
                    self._pending_cr = True
            msg = self._line(bytes(buf[start:end]).decode("utf-8", "replace"))
            if msg is not None:
                out.append(msg)
            start = nxt
        del self._buf[:start]
        if len(self._buf) > self.max_line:
            raise ProtocolError(f"event stream line longer than {self.max_line} bytes")
        return out

    def _line(self, line: str) -> SSEMessage | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            msg = SSEMessage(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data = "", []
            return msg
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
                self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


# --- backoff -----------------------------------------------------------------------------


class Backoff:
    """Exponential reconnect delays with a cap and a little jitter: 0.5, 1, 2, 4, ... cap.

    Jitter keeps a fleet of monitors from reconnecting in lock step when the
    center restarts; it is seeded so tests see fixed delays.
    """

    def __init__(self, base: float = 0.5, cap: float = 15.0, jitter: float = 0.1,
                 rng: random.Random | None = None) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base, self.cap, self.jitter = base, cap, jitter
        self.rng = rng or random.Random()
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        if self.jitter:
            delay *= 1.0 + self.rng.uniform(-self.jitter, self.jitter)
        return min(delay, self.cap)

    def reset(self) -> None:
        self.attempt = 0


# --- the HTTP source ---------------------------------------------------------------------


class StreamEnded(Unavailable):
    """The center closed the event stream (it stopped, or restarted)."""


class HTTPSource:
    """Follows a real center: full state over GET, then ``/center/events``."""

    def __init__(self, center: str, token: str = "", *, tls_ca: str = "",
                 connect_timeout: float = 5.0,
                 request_timeout: float = 30.0, idle_timeout: float = 60.0,
                 backoff: Backoff | None = None, jobs_limit: int = 200,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        parts = urlsplit(center)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest(f"center URL {center!r} must look like http://HOST:PORT")
        self.center = center.rstrip("/")
        self.description = self.center
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self.token = token
        # TLS: the event stream (read here) and the GETs (fdship's CenterClient)
        # verify the center against the same CA: ``tls_ca`` when given (it then
        # becomes this process's CA for fdship's HTTP calls), else
        # $FDSHIP_TLS_CA, else the system's trust store.
        self.tls_ca = tls_ca
        self._ssl: ssl.SSLContext | None = None
        if tls_ca:
            from fdship.httpclient import configure_tls  # tornado: only for a real center

            configure_tls(tls_ca)
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        # No byte for this long means a dead peer that never sent a FIN or RST.
        # Host heartbeats keep a working stream busy every second or so.
        self.idle_timeout = idle_timeout
        self.backoff = backoff or Backoff()
        self.jobs_limit = jobs_limit
        self._sleep = sleep
        self.last_event_id: str | None = None
        # Resume with since= only while the center is believed to be the same
        # process.  A restarted center's ids start from its clock, but an old id
        # that happened to fall inside the new range would hide the events below
        # it.  See updates().
        self.resumable = False
        self._closed = False
        self._writer: asyncio.StreamWriter | None = None
        self.connections = 0  # successful stream openings, for tests and the log
        self.stream_paths: deque[str] = deque(maxlen=16)  # the last event-stream requests

    # -- one-shot GETs ----------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        h = {"Accept": "application/json"}
        if self.token:
            h["Authorization"] = "Bearer " + self.token
        return h

    def _client(self) -> Any:
        # The center's typed client (the one every part of fdship uses); imported
        # here so that importing this module stays free of tornado.
        from fdship.center.client import CenterClient

        return CenterClient(self.center, self.token, timeout=self.request_timeout)

    async def job(self, job_id: str) -> dict[str, Any]:
        doc = await self._client().job(job_id)
        if not isinstance(doc, dict):
            raise ProtocolError(f"the center's answer for job {job_id} is not a JSON object")
        return doc

    async def snapshot(self) -> Snapshot:
        client = self._client()
        jobs_doc, hosts_doc = await asyncio.gather(client.jobs(limit=self.jobs_limit),
                                                   client.hosts())
        jobs = jobs_doc.get("jobs") if isinstance(jobs_doc, dict) else None
        hosts = hosts_doc.get("hosts") if isinstance(hosts_doc, dict) else None
        if not isinstance(jobs, list) or not isinstance(hosts, list):
            raise ProtocolError("the center's /center/jobs or /center/hosts answer lacks "
                                "its 'jobs' or 'hosts' list; is this an fdship center?")
        return Snapshot([j for j in jobs if isinstance(j, dict)],
                        [h for h in hosts if isinstance(h, dict)])

    # -- the event stream ---------------------------------------------------------------

    async def _open_stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                          dict[str, str]]:
        ctx = self._ssl_context() if self._scheme == "https" else None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port, ssl=ctx, limit=1 << 20),
                self.connect_timeout)
        except TimeoutError:
            self.resumable = False
            # A plain HTTP server never answers a TLS hello: it waits for a request line.
            hint = ("; if it serves plain HTTP, use an http:// URL"
                    if self._scheme == "https" else "")
            raise Unavailable(f"cannot reach the center at {self.center}: "
                              f"connect timed out after {self.connect_timeout:g}s{hint}") \
                from None
        except ssl.SSLError as e:  # before OSError, of which it is a subclass
            # Retrying cannot fix this, but the status line keeps saying why,
            # and a center given a new certificate is followed again.
            self.resumable = False
            raise Unavailable(self._tls_reason(e)) from None
        except OSError as e:
            # Nobody listening: the center is down, and the one that comes back
            # may be a new process whose event ids started again at 1.
            self.resumable = False
            raise Unavailable(f"cannot reach the center at {self.center}: "
                              f"{e.strerror or e}") from None
        self._writer = writer
        path = self._prefix + protocol.CENTER_EVENTS
        headers = {"Host": f"{self._host}:{self._port}", "Accept": "text/event-stream",
                   "Cache-Control": "no-cache", "Connection": "keep-alive"}
        if self.last_event_id is not None and self.resumable:
            path += "?" + urlencode({"since": self.last_event_id})
            headers["Last-Event-ID"] = self.last_event_id
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        self.stream_paths.append(path)
        head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(head.encode("latin-1") + b"\r\n")
        try:
            try:
                status_line = await self._read(reader.readline())
            except Unavailable as e:
                if "lost the connection" not in e.message:
                    raise
                raise Unavailable(e.message + self._plain_to_tls_hint()) from None
            if not status_line:
                raise Unavailable(f"the center at {self.center} closed the connection without "
                                  f"answering{self._plain_to_tls_hint()}")
            parts = status_line.decode("latin-1").split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
                raise ProtocolError(f"the center at {self.center} did not answer HTTP"
                                    f"{self._plain_to_tls_hint()}")
            code = int(parts[1])
            resp_headers: dict[str, str] = {}
            while True:
                line = await self._read(reader.readline())
                if line in (b"\r\n", b"\n", b""):
                    break
                k, _, v = line.decode("latin-1").partition(":")
                resp_headers[k.strip().lower()] = v.strip()
            if code != 200:
                body = b""
                async for piece in self._body(reader, resp_headers, limit=65536):
                    body += piece
                raise _http_error(code, body, self.center + path)
        except BaseException:
            writer.close()
            raise
        return reader, writer, resp_headers

    def _ssl_context(self) -> ssl.SSLContext:
        """The verifying TLS context of the event stream (the GETs use the same CA file)."""
        if self._ssl is None:
            from fdship.httpclient import client_ssl_context, cluster_ssl_context

            self._ssl = client_ssl_context(self.tls_ca) if self.tls_ca else \
                cluster_ssl_context()
        return self._ssl

    def _tls_reason(self, e: ssl.SSLError) -> str:
        """A failed handshake in words, what to do first: the status line is one line."""
        text = str(e)
        if isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
            detail = getattr(e, "verify_message", "") or text
            if "mismatch" in detail:
                return (f"certificate of {self._host} is not issued for that name: use the "
                        f"name or address it was issued for ({detail})")
            if "expired" in detail:
                return f"certificate of the center at {self.center} has expired: renew it"
            ca = self.tls_ca or os.environ.get("FDSHIP_TLS_CA", "")
            by = f"the CA in {ca}" if ca else "the system's trust store"
            return (f"certificate not trusted: pass --tls-ca FILE, the CA that signed the "
                    f"center's (checked against {by}: {detail})")
        if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
            return f"the center at {self.center} does not speak TLS: use an http:// URL"
        return f"TLS with the center at {self.center} failed: {e.reason or text}"

    def _plain_to_tls_hint(self) -> str:
        # A TLS server drops a plain request without a word.
        return "; if it serves HTTPS, use an https:// URL" if self._scheme == "http" else ""

    async def _read(self, aw: Any) -> bytes:
        try:
            data: bytes = await asyncio.wait_for(aw, self.idle_timeout)
        except TimeoutError:
            raise Unavailable(f"the center at {self.center} sent nothing for "
                              f"{self.idle_timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as e:
            raise Unavailable(f"lost the connection to the center at {self.center}: "
                              f"{getattr(e, 'strerror', None) or e or type(e).__name__}") \
                from None
        return data

    async def _body(self, reader: asyncio.StreamReader, headers: Mapping[str, str],
                    limit: int | None = None) -> AsyncIterator[bytes]:
        """The response body as it arrives: chunked, sized, or until the peer closes."""
        got = 0
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await self._read(reader.readline())
                if not size_line:
                    raise StreamEnded(f"the center at {self.center} closed the event stream")
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ProtocolError("bad chunk size in the center's event stream") from None
                if size == 0:
                    return
                piece = await self._read(reader.readexactly(size + 2))
                got += size
                yield piece[:-2]
                if limit is not None and got >= limit:
                    return
        elif "content-length" in headers:
            remaining = int(headers["content-length"])
            while remaining > 0:
                piece = await self._read(reader.read(min(remaining, 65536)))
                if not piece:
                    return
                remaining -= len(piece)
                yield piece
        else:
            while True:
                piece = await self._read(reader.read(65536))
                if not piece:
                    return
                yield piece
                got += len(piece)
                if limit is not None and got >= limit:
                    return

    async def _pump(self, reader: asyncio.StreamReader, headers: Mapping[str, str],
                    queue: asyncio.Queue[Event | BaseException | object]) -> None:
        """Decode the stream into the queue; end it with the exception that stopped it."""
        decoder = SSEDecoder()
        try:
            async for piece in self._body(reader, headers):
                for msg in decoder.feed(piece):
                    if msg.id is not None:
                        self.last_event_id = msg.id
                    if msg.event == "reset":
                        # We asked to resume from further back than the center
                        # keeps: what we hold is incomplete, fetch it all again.
                        queue.put_nowait(_RESET)
                        continue
                    ev = _event(msg)
                    if ev is not None:
                        queue.put_nowait(ev)
            queue.put_nowait(StreamEnded(f"the center at {self.center} closed the event "
                                         f"stream"))
        except asyncio.CancelledError:
            raise
        except FdshipError as e:
            queue.put_nowait(e)
        except Exception as e:  # noqa: BLE001 - a bug must still end the stream, visibly
            queue.put_nowait(Unavailable(f"event stream failed: {e!r}"))

    async def updates(self) -> AsyncGenerator[Update, None]:
        attempt = 0
        while not self._closed:
            yield Status(CONNECTING, attempt=attempt)
            pump: asyncio.Task[None] | None = None
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer, headers = await self._open_stream()
                queue: asyncio.Queue[Event | BaseException | object] = asyncio.Queue()
                pump = asyncio.ensure_future(self._pump(reader, headers, queue))
                snap = await self.snapshot()
                self.connections += 1
                self.backoff.reset()
                self.resumable = True
                attempt = 0
                yield snap
                yield Status(LIVE)
                held: object = None  # a non-event met while batching: next in line
                while True:
                    item = held if held is not None else await queue.get()
                    held = None
                    if isinstance(item, BaseException):
                        raise item
                    if item is _RESET:
                        yield await self.snapshot()
                        continue
                    assert isinstance(item, Event)
                    batch = [item]
                    while not queue.empty() and len(batch) < MAX_BATCH:
                        nxt = queue.get_nowait()
                        if not isinstance(nxt, Event):
                            held = nxt  # an error or a reset: right after this batch
                            break
                        batch.append(nxt)
                    yield item if len(batch) == 1 else Batch(batch)
            except FdshipError as e:  # Unavailable, Unauthorized, ProtocolError, ...
                error = e.message
            finally:
                if pump is not None:
                    pump.cancel()
                if writer is not None:
                    writer.close()
                self._writer = None
            if self._closed:
                return
            attempt += 1
            delay = self.backoff.next()
            yield Status(RECONNECTING, retry_in=delay, error=error, attempt=attempt)
            await self._sleep(delay)

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()


_RESET = object()  # queued when the center says "event: reset"
MAX_BATCH = 1000


def _event(msg: SSEMessage) -> Event | None:
    if msg.event not in ("job", "machine", "host"):
        return None  # other kinds (added later) are not this TUI's business
    try:
        data = json.loads(msg.data)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    ident: int | None = None
    if msg.id is not None and msg.id.isdigit():
        ident = int(msg.id)
    return Event(msg.event, data, ident)


def _http_error(code: int, body: bytes, url: str) -> FdshipError:
    """An HTTP error answer -> the matching fdship error with the center's sentence."""
    reason = ""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            reason = doc["error"]
    except ValueError:
        pass
    if code == 401:
        return Unauthorized(reason or "the center wants a token: pass --token-file FILE or "
                            "set FDSHIP_TOKEN")
    if code == 404:
        return NotFound(reason or f"not found: {url}")
    if 400 <= code < 500:
        return BadRequest(reason or f"the center refused {url} (HTTP {code})", status=code)
    return Unavailable(f"the center answered HTTP {code} for {url}"
                       + (f": {reason}" if reason else ""))


# --- the in-memory source ---------------------------------------------------------------


class MemorySource:
    """An in-memory center for tests, screenshots and benchmarks.

    It holds jobs, job details and hosts like the center does, hands the app a
    snapshot on "connect", and then whatever the test pushes: events (which it
    also folds into its own state so :meth:`job` stays current), connection
    drops and reconnections.
    """

    def __init__(self, jobs: list[dict[str, Any]] | None = None,
                 hosts: list[dict[str, Any]] | None = None,
                 details: dict[str, dict[str, Any]] | None = None,
                 description: str = "fixture") -> None:
        self.description = description
        self.jobs: dict[str, dict[str, Any]] = {j["job"]: dict(j) for j in jobs or []}
        self.hosts: dict[str, dict[str, Any]] = {h["name"]: dict(h) for h in hosts or []}
        self.details: dict[str, dict[str, Any]] = {k: _deep(v) for k, v in
                                                   (details or {}).items()}
        self._queue: asyncio.Queue[Update | None] | None = None
        self._backlog: deque[Update | None] = deque()
        self._closed = False
        self._connected = False
        self.next_id = 1
        self.job_requests: list[str] = []  # job ids the app asked for, for tests

    def _put(self, item: Update | None) -> None:
        if self._queue is None:
            self._backlog.append(item)  # before the app started following
        else:
            self._queue.put_nowait(item)

    def push(self, kind: str, data: dict[str, Any]) -> Event:
        """The center saw a change: fold it here and send it as an event."""
        data = _deep(data)
        if kind == "job":
            self.jobs[data["job"]] = {**self.jobs.get(data["job"], {}), **data}
        elif kind == "machine":
            name = data.get("machine") or data.get("name")
            d = self.details.setdefault(data["job"], {"job": data["job"], "machines": {}})
            d["machines"][name] = {**d["machines"].get(name, {}), **data}
        elif kind == "host":
            self.hosts[data["name"]] = data
        ev = Event(kind, data, self.next_id)
        self.next_id += 1
        self._put(ev)
        return ev

    def disconnect(self, retry_in: float = 2.0, error: str = "connection refused") -> None:
        """The connection to the center broke; the app should say it is reconnecting."""
        self._put(Status(RECONNECTING, retry_in=retry_in, error=error, attempt=1))

    def reconnect(self) -> None:
        """The center is back: connecting, a fresh full state, live again."""
        self._put(Status(CONNECTING, attempt=1))
        self._put(self.snapshot())
        self._put(Status(LIVE))

    def snapshot(self) -> Snapshot:
        return Snapshot(_deep(list(self.jobs.values())), _deep(list(self.hosts.values())))

    async def updates(self) -> AsyncGenerator[Update, None]:
        self._queue = asyncio.Queue()
        while self._backlog:
            self._queue.put_nowait(self._backlog.popleft())
        if not self._connected:
            self._connected = True
            yield Status(CONNECTING)
            yield self.snapshot()
            yield Status(LIVE)
        while not self._closed:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    async def job(self, job_id: str) -> dict[str, Any]:
        self.job_requests.append(job_id)
        d = self.details.get(job_id)
        if d is None:
            raise NotFound(f"no job {job_id}")
        out = {**self.jobs.get(job_id, {}), **_deep(d)}
        out["machines"] = _deep(d.get("machines", {}))
        return out

    async def close(self) -> None:
        self._closed = True
        self._put(None)


def _deep(obj: Any) -> Any:
    """A copy deep enough that the app never shares a dict with the fixture."""
    return json.loads(json.dumps(obj))
