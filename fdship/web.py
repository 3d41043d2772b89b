"""The one Tornado base handler shared by the center and the daemons.

Thin transport: handlers parse, submit, render.  This module gives them a
common way to check the shared token (constant-time), parse a JSON body into a
protocol message, and render every error as ``{"error": "..."}`` with the
status carried by the :mod:`fdship.errors` tree.  It also serves ``/metrics``.

``make_server`` builds the HTTP server both processes listen with: optional
TLS, a request body limit, and timeouts so a client that connects and says
nothing, or sends headers and never the body, cannot hold a connection open.
A request without the right token may not even send a large body: the limit
drops to 64K for it as soon as its headers are in, before the body is read.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import os
import ssl
import stat
from typing import Any, Awaitable, Callable, TypeVar

import tornado.httpserver
import tornado.web
from tornado import httputil

from fdship import protocol as P
from fdship.errors import BadRequest, ConfigError, FdshipError, ProtocolError, Unauthorized

log = logging.getLogger("fdship.web")
T = TypeVar("T")

MAX_JSON_BODY = 64 * 1024 * 1024  # a job manifest of 10k files fits comfortably


class BaseHandler(tornado.web.RequestHandler):
    """JSON in, JSON out, token checked, errors rendered in one place."""

    # Set per application via settings["fdship_token"]; empty means auth off.
    public = False  # True for /metrics

    def prepare(self) -> None:
        token: str = self.settings.get("fdship_token", "")
        if token and not self.public:
            got = self.request.headers.get("Authorization", "")
            want = "Bearer " + token
            if not hmac.compare_digest(got.encode(), want.encode()):
                raise Unauthorized("missing or wrong token: send 'Authorization: Bearer TOKEN' "
                                   "with the cluster's shared token")

    def json_body(self) -> Any:
        body = self.request.body
        limit = self.settings.get("fdship_max_body", MAX_JSON_BODY)
        if len(body) > limit:
            raise BadRequest(f"request body of {len(body)} bytes is over the limit of {limit} "
                             "bytes (max_body); split the request", status=413)
        if not body:
            raise ProtocolError("request body is empty: send a JSON object")
        try:
            return P.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ProtocolError(f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise ProtocolError("request body is not valid JSON: nested too deeply") from None

    def parse(self, parser: Callable[[Any], T]) -> T:
        return parser(self.json_body())

    def send_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj, separators=(",", ":")))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, FdshipError):
            msg = exc.message
        elif isinstance(exc, tornado.web.HTTPError):
            msg = exc.log_message or self._reason
        else:
            msg = "internal error: " + (self._reason or "see the server log")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": msg}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, FdshipError) and value.status < 500:
            log.info("rejected %s %s: %s", self.request.method, self.request.path, value)
            return
        super().log_exception(typ, value, tb)

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, FdshipError) and not self._finished:
            self.send_error(e.status, exc_info=(type(e), e, e.__traceback__))
            self.log_exception(type(e), e, e.__traceback__)
            return
        super()._handle_request_exception(e)


class MetricsHandler(BaseHandler):
    """GET /metrics in Prometheus text format (never needs the token)."""

    public = True

    def get(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        registry = self.settings["fdship_registry"]
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(registry))


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()  # without the token, nobody learns which paths exist
        raise BadRequest(f"no such endpoint: {self.request.method} {self.request.path}",
                         status=404)


# --- the server ----------------------------------------------------------------------------

# What a request that does not carry the token may send: enough for any error a
# client might make, far too little to make the server buffer much memory.
UNAUTHENTICATED_MAX_BODY = 64 * 1024


def _authorized(headers: httputil.HTTPHeaders, token: str) -> bool:
    got = headers.get("Authorization", "")
    return hmac.compare_digest(got.encode(), ("Bearer " + token).encode())


class _GateMessage(httputil.HTTPMessageDelegate):
    """Lowers the body limit of a request without the token, then defers to the app.

    The handler still answers it (401 from ``BaseHandler.prepare``, or the
    public ``/metrics``); this only decides how much of a body is read first.
    """

    def __init__(self, inner: httputil.HTTPMessageDelegate,
                 conn: httputil.HTTPConnection, token: str) -> None:
        self.inner = inner
        self.conn = conn
        self.token = token

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        setter = getattr(self.conn, "set_max_body_size", None)
        if self.token and setter is not None and not _authorized(headers, self.token):
            setter(UNAUTHENTICATED_MAX_BODY)
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self.inner.finish()

    def on_connection_close(self) -> None:
        self.inner.on_connection_close()


class _Gate(httputil.HTTPServerConnectionDelegate):
    def __init__(self, app: tornado.web.Application, token: str) -> None:
        self.app = app
        self.token = token

    def start_request(self, server_conn: object,
                      request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return _GateMessage(self.app.start_request(server_conn, request_conn), request_conn,
                            self.token)

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext | None:
    """The TLS context to serve with, or None when TLS is off.  Raises ConfigError."""
    if not cert:
        return None
    try:
        st = os.stat(key)
    except OSError as e:
        raise ConfigError(f"cannot read tls_key {key}: {e.strerror}") from None
    if st.st_mode & stat.S_IRWXO:
        raise ConfigError(f"tls_key {key} is readable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {key}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:  # before OSError, of which it is a subclass
        raise ConfigError(f"tls_cert {cert} and tls_key {key} are not a PEM certificate and "
                          f"its private key ({e.reason or e}); check both files") from None
    except OSError as e:
        raise ConfigError(f"cannot read tls_cert {cert} or tls_key {key}: {e.strerror}") \
            from None
    return ctx


def make_server(app: tornado.web.Application, cfg: Any,
                token: str) -> tornado.httpserver.HTTPServer:
    """The HTTP(S) server of a center or daemon, with its limits and timeouts from ``cfg``.

    ``idle_timeout`` bounds a connection that sends no (complete) request
    headers, ``body_timeout`` one that sent headers but not the body; both
    close the connection and free whatever it held.  Bodies over ``max_body``
    are refused before they are read (Tornado answers 400 and closes).
    """
    app.settings["fdship_max_body"] = cfg.max_body
    return tornado.httpserver.HTTPServer(
        _Gate(app, token), ssl_options=server_ssl_context(cfg.tls_cert, cfg.tls_key),
        max_body_size=cfg.max_body, max_buffer_size=cfg.max_body + 1024 * 1024,
        idle_connection_timeout=cfg.idle_timeout, body_timeout=cfg.body_timeout,
        decompress_request=False)


def stop_signal() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: how the center and the daemons stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
