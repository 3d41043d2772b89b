"""The one Tornado base handler shared by the center and the daemons.

Thin transport: handlers parse, submit, render.  This module gives them a
common way to check the shared token (constant-time), parse a JSON body into a
protocol message, and render every error as ``{"error": "..."}`` with the
status carried by the :mod:`fdship.errors` tree.  It also serves ``/metrics``.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, Callable, TypeVar

import tornado.web

from fdship.errors import BadRequest, FdshipError, ProtocolError, Unauthorized

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
        if len(body) > self.settings.get("fdship_max_body", MAX_JSON_BODY):
            raise BadRequest("request body too large", status=413)
        if not body:
            raise ProtocolError("request body is empty: send a JSON object")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ProtocolError(f"request body is not valid JSON: {e}") from None

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
        raise BadRequest(f"no such endpoint: {self.request.method} {self.request.path}",
                         status=404)
