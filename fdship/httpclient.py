"""A small JSON-over-HTTP helper shared by the typed clients.

Both :mod:`fdship.center.client` and :mod:`fdship.daemon.client` go through
``call``: it adds the token, encodes JSON, and turns every way a request can
fail into the error tree (``Unavailable`` when the other side cannot be
reached, the server's own ``{"error": ...}`` sentence otherwise), so callers
never see tornado's exception types.

Control messages inside a cluster (a daemon's heartbeats, acks and drain
notices to the center; the center's pulls and packs to daemons) are sent many
times a second, one after another, and a pull sits on the critical path
between two chunks.  Tornado's simple client opens a new connection for every
request (a TCP handshake, and a TLS one with TLS on), and on a busy link each
handshake waits in the same queues as the bulk data.  Clients made with
``keep_alive=True`` therefore send over a small pool of persistent HTTP/1.1
connections instead (:class:`_KeepAlive`, a few idle connections per server,
dropped after ``MAX_IDLE_AGE``, well before a server's own idle timeout).
Anything else (the CLI, a job's callback to an outside URL) keeps the one-shot
client.

It also holds the process's TLS client settings (``configure_tls``): the CA
file that certificates of the center and daemons are verified against, and
whether daemons are called over HTTPS (``peer_url``).  The CLI and the TUI
take the CA file from ``--tls-ca`` or ``$FDSHIP_TLS_CA`` (:mod:`fdship.clitls`).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import weakref
from collections import deque
from collections.abc import Hashable
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from fdship.errors import BadRequest, ConfigError, FdshipError, Unavailable

# curl_httpclient is not a dependency; the simple client is enough for JSON
# control messages (bulk data uses fdship.daemon.fetch).  Allow enough
# concurrent requests for a center talking to hundreds of daemons.
AsyncHTTPClient.configure(None, max_clients=256)

_tls_ca = ""
_tls_ctx: ssl.SSLContext | None = None
_peers_https = False


def client_ssl_context(ca_file: str = "") -> ssl.SSLContext:
    """A verifying TLS client context: ``ca_file`` if given, else the system's trust store."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"tls_ca {ca_file} is not a readable PEM CA bundle ({e}); check the "
                          "file") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def configure_tls(ca_file: str = "", peers_https: bool = False) -> None:
    """Set this process's TLS client side: the CA to verify with; daemons over HTTPS or not.

    TLS is all or nothing across a cluster: a center or daemon that serves
    HTTPS (``tls_cert`` set) calls the daemons over HTTPS too.
    """
    global _tls_ca, _tls_ctx, _peers_https
    _tls_ctx = client_ssl_context(ca_file) if ca_file else None
    _tls_ca = ca_file
    _peers_https = peers_https


def cluster_ssl_context() -> ssl.SSLContext:
    """The context for HTTPS calls inside the cluster (configured CA, $FDSHIP_TLS_CA, or system)."""
    global _tls_ctx, _tls_ca
    if _tls_ctx is None:
        ca = _tls_ca or os.environ.get("FDSHIP_TLS_CA", "")
        _tls_ctx = client_ssl_context(ca)
        _tls_ca = ca
    return _tls_ctx


def peer_url(address: str) -> str:
    """Base URL of a daemon advertised as HOST:PORT (https when the cluster uses TLS)."""
    if address.startswith(("http://", "https://")):
        return address
    return ("https://" if _peers_https else "http://") + address


async def call(method: str, url: str, body: Any = None, *, token: str = "",
               timeout: float = 30.0, connect_timeout: float = 5.0,
               cluster: bool = True, keep_alive: bool = False) -> Any:
    """One JSON request.  ``cluster`` False: an outside URL (a job's callback), which is
    verified against the system's trust store rather than the cluster's CA.
    ``keep_alive``: send over a pooled persistent connection (see the module doc)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
    tls = cluster_ssl_context() if cluster and url.startswith("https://") else None
    if keep_alive:
        code, raw = await _keep_alive_call(method, url, headers, data, timeout,
                                           connect_timeout, tls)
        return _decode(url, code, raw)
    req = HTTPRequest(url, method=method, headers=headers, body=data,
                      request_timeout=timeout, connect_timeout=connect_timeout,
                      allow_nonstandard_methods=True, ssl_options=tls)
    try:
        resp = await AsyncHTTPClient().fetch(req, raise_error=False)
    except HTTPClientError as e:  # pragma: no cover - raise_error=False prevents most
        raise Unavailable(f"{method} {url}: {e}") from None
    except ssl.SSLError as e:
        raise Unavailable(f"cannot reach {url}: TLS failed ({e}){_tls_hint(e)}") from None
    except OSError as e:
        raise Unavailable(f"cannot reach {url}: {e.strerror or e}") from None
    if resp.code == 599:
        raise Unavailable(f"cannot reach {url}: {resp.error}{_tls_hint(resp.error)}")
    return _decode(url, resp.code, resp.body)


def _decode(url: str, code: int, raw: bytes | None) -> Any:
    """The JSON body of a response, or the error it carries, as an ``FdshipError``."""
    try:
        obj = json.loads(raw) if raw else None
    except ValueError:
        obj = None
    if code >= 400:
        msg = obj.get("error") if isinstance(obj, dict) else None
        msg = msg or f"HTTP {code} from {url}"
        if code >= 500:
            raise FdshipError(msg, status=code)
        raise BadRequest(msg, status=code)
    return obj


# ---------------------------------------------------------------- keep-alive path

#: Largest response body the keep-alive path reads (a hosts list of thousands of
#: machines is a few MB).
MAX_RESPONSE = 256 * 1024 * 1024
MAX_HEADERS = 100
#: Idle connections kept per server, and in all (a center talks to thousands).
MAX_IDLE_PER_ORIGIN = 2
MAX_IDLE = 512
#: An idle connection older than this is closed rather than reused: well under
#: fdship's own server idle timeout (``idle_timeout``, 120 s by default), so a
#: reuse rarely meets a connection the server is just closing.
MAX_IDLE_AGE = 20.0

_Origin = tuple[str, str, int]


class IdleConn(Protocol):
    """What :class:`IdlePool` needs of a connection."""

    idle_since: float  # loop time it went back to the pool

    def alive(self) -> bool: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=IdleConn)


class IdlePool(Generic[C]):
    """Idle keep-alive connections by server, for any client that keeps them.

    Newest reused first: the least likely to have been closed by the server.
    At most ``per_server`` idle per server and ``total`` in all; when full, the
    connection idle the longest goes, not the one just used, so the servers
    in current use stay warm.  One idle over ``max_age`` is closed rather than
    reused, ahead of the server's own idle timeout.  Used by the JSON client's
    keep-alive path here and by the chunk fetcher (``fdship.daemon.fetch``).
    """

    def __init__(self, per_server: int, total: int, max_age: float) -> None:
        self.per_server = per_server
        self.total = total
        self.max_age = max_age
        self._idle: dict[Hashable, deque[C]] = {}

    def count(self, server: Hashable | None = None) -> int:
        if server is not None:
            return len(self._idle.get(server, ()))
        return sum(len(q) for q in self._idle.values())

    def take(self, server: Hashable, now: float) -> C | None:
        q = self._idle.get(server)
        if q is None:
            return None
        found = None
        while q:
            c = q.pop()
            if c.alive() and now - c.idle_since < self.max_age:
                found = c
                break
            c.close()
        if not q:
            del self._idle[server]
        return found

    def give(self, server: Hashable, c: C, now: float) -> None:
        c.idle_since = now
        q = self._idle.get(server)
        if q is not None and len(q) >= self.per_server:
            q.popleft().close()  # this server's oldest idle connection
        elif self.count() >= self.total:
            self._evict_oldest()  # may empty (and drop) this server's queue
        self._idle.setdefault(server, deque()).append(c)

    def _evict_oldest(self) -> None:
        """Close the connection idle the longest, whichever server it goes to."""
        server = min((k for k, q in self._idle.items() if q),
                     key=lambda k: self._idle[k][0].idle_since, default=None)
        if server is None:
            return
        q = self._idle[server]
        q.popleft().close()
        if not q:
            del self._idle[server]

    def close(self) -> None:
        for q in self._idle.values():
            while q:
                q.pop().close()
        self._idle.clear()


class _Conn:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def alive(self) -> bool:
        # A server that hung up on an idle connection shows as EOF (or a closing
        # transport) here, before we write into it.
        return (not self.reader.at_eof() and self.reader.exception() is None
                and not self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, IdlePool[_Conn]] = \
    weakref.WeakKeyDictionary()


def keep_alive_pool() -> IdlePool[_Conn]:
    """This event loop's pool (each ``asyncio.run`` gets its own)."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = IdlePool(MAX_IDLE_PER_ORIGIN, MAX_IDLE, MAX_IDLE_AGE)
    return pool


def close_keep_alive() -> None:
    """Close this loop's idle connections (a server shutting down calls this)."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        pool.close()


class _Stale(Exception):
    """A reused connection the server had closed: nothing was sent back, try a new one."""


async def _keep_alive_call(method: str, url: str, headers: dict[str, str], data: bytes | None,
                           timeout: float, connect_timeout: float,
                           tls: ssl.SSLContext | None) -> tuple[int, bytes]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"not an http(s) URL: {url}")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    origin = (parts.scheme, host, port)
    netloc = parts.netloc.rpartition("@")[2]
    head = [f"{method} {target} HTTP/1.1", f"Host: {netloc}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head.append(f"Content-Length: {len(data or b'')}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (data or b"")
    if tls is None and parts.scheme == "https":
        tls = client_ssl_context()  # an outside URL: the system's trust store
    pool = keep_alive_pool()
    loop = asyncio.get_running_loop()

    async def once() -> tuple[int, bytes]:
        # One retry, and only for a reused connection that the server closed
        # before answering anything: it never saw (or never acted on) the request.
        for _ in range(2):
            c = pool.take(origin, loop.time())
            reused = c is not None
            if c is None:
                try:
                    r, w = await asyncio.wait_for(
                        asyncio.open_connection(host, port, ssl=tls,
                                                server_hostname=host if tls else None,
                                                limit=MAX_HEADERS * 1024),
                        connect_timeout)
                except TimeoutError:
                    raise Unavailable(f"cannot reach {url}: timed out connecting after "
                                      f"{connect_timeout:g} s") from None
                c = _Conn(r, w)
            try:
                code, body, keep = await _exchange(c, request, reused)
            except _Stale:
                c.close()
                continue
            except BaseException:
                c.close()
                raise
            if keep:
                pool.give(origin, c, loop.time())
            else:
                c.close()
            return code, body
        raise Unavailable(f"cannot reach {url}: the server closed the connection twice "
                          "without answering")

    try:
        return await asyncio.wait_for(once(), timeout)
    except TimeoutError:
        raise Unavailable(f"cannot reach {url}: no answer within {timeout:g} s") from None
    except ssl.SSLError as e:
        raise Unavailable(f"cannot reach {url}: TLS failed ({e}){_tls_hint(e)}") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        # asyncio's connect errors carry the errno but a strerror of its own
        # ("Connect call failed ..."): the system's wording says more.
        num = getattr(e, "errno", None)
        why = os.strerror(num) if num else (str(e) or type(e).__name__)
        raise Unavailable(f"cannot reach {url}: {why}") from None


async def _exchange(c: _Conn, request: bytes, reused: bool) -> tuple[int, bytes, bool]:
    """Send one request and read its response: (status, body, keep the connection)."""
    reader = c.reader
    try:
        c.writer.write(request)
        await c.writer.drain()
        line = await reader.readline()
    except (ConnectionResetError, BrokenPipeError):
        if reused:
            raise _Stale() from None
        raise
    if not line:
        if reused:
            raise _Stale()
        raise ConnectionError("the server closed the connection without answering")
    version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
    code_s = rest[:3]
    if not version.startswith("HTTP/1.") or not code_s.isdigit():
        raise ValueError(f"the server did not answer in HTTP/1.x: {line[:80]!r}")
    code = int(code_s)
    length: int | None = None
    chunked = False
    conn_hdr = ""
    for _ in range(MAX_HEADERS):
        h = await reader.readline()
        if h in (b"\r\n", b"\n"):
            break
        if not h:
            raise ConnectionError("the server closed the connection mid-headers")
        name, _, value = h.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif name == "connection":
            conn_hdr = value.lower()
    else:
        raise ValueError(f"more than {MAX_HEADERS} response headers")
    keep = version == "HTTP/1.1" and "close" not in conn_hdr
    if code in (204, 304) or 100 <= code < 200:
        body = b""
    elif chunked:
        parts: list[bytes] = []
        total = 0
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"x", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            total += size
            if total > MAX_RESPONSE:
                raise ValueError(f"response larger than {MAX_RESPONSE} bytes")
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    elif length is not None:
        if length > MAX_RESPONSE:
            raise ValueError(f"response of {length} bytes, more than {MAX_RESPONSE}")
        body = await reader.readexactly(length)
    else:  # delimited by the end of the connection
        body = await reader.read(MAX_RESPONSE + 1)
        if len(body) > MAX_RESPONSE:
            raise ValueError(f"response larger than {MAX_RESPONSE} bytes")
        keep = False
    return code, body, keep


def _tls_hint(err: object) -> str:
    text = str(err)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return ("; the server's certificate is not signed by a trusted CA: set tls_ca (or "
                "--tls-ca / $FDSHIP_TLS_CA for the command line) to the CA file that signed it")
    if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
        return "; the server does not speak TLS: use an http:// URL or turn TLS on there"
    return ""


class JsonClient:
    """Base of the typed clients: a base URL, the token, a default timeout."""

    def __init__(self, base_url: str, token: str = "", timeout: float = 30.0,
                 keep_alive: bool = False) -> None:
        self.base = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.keep_alive = keep_alive  # pooled persistent connections (cluster control traffic)

    async def _call(self, method: str, path: str, body: Any = None,
                    timeout: float | None = None) -> Any:
        return await call(method, self.base + path, body, token=self.token,
                          timeout=timeout or self.timeout, keep_alive=self.keep_alive)
