"""A small JSON-over-HTTP helper shared by the typed clients.

Both :mod:`fdship.center.client` and :mod:`fdship.daemon.client` go through
``call``: it adds the token, encodes JSON, and turns every way a request can
fail into the error tree (``Unavailable`` when the other side cannot be
reached, the server's own ``{"error": ...}`` sentence otherwise), so callers
never see tornado's exception types.
"""

from __future__ import annotations

import json
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from fdship.errors import BadRequest, FdshipError, Unavailable

# curl_httpclient is not a dependency; the simple client is enough for JSON
# control messages (bulk data uses fdship.daemon.fetch).  Allow enough
# concurrent requests for a center talking to hundreds of daemons.
AsyncHTTPClient.configure(None, max_clients=256)


async def call(method: str, url: str, body: Any = None, *, token: str = "",
               timeout: float = 30.0, connect_timeout: float = 5.0) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
    req = HTTPRequest(url, method=method, headers=headers, body=data,
                      request_timeout=timeout, connect_timeout=connect_timeout,
                      allow_nonstandard_methods=True)
    try:
        resp = await AsyncHTTPClient().fetch(req, raise_error=False)
    except HTTPClientError as e:  # pragma: no cover - raise_error=False prevents most
        raise Unavailable(f"{method} {url}: {e}") from None
    except OSError as e:
        raise Unavailable(f"cannot reach {url}: {e.strerror or e}") from None
    if resp.code == 599:
        raise Unavailable(f"cannot reach {url}: {resp.error}")
    try:
        obj = json.loads(resp.body) if resp.body else None
    except ValueError:
        obj = None
    if resp.code >= 400:
        msg = obj.get("error") if isinstance(obj, dict) else None
        msg = msg or f"HTTP {resp.code} from {url}"
        if resp.code >= 500:
            raise FdshipError(msg, status=resp.code)
        raise BadRequest(msg, status=resp.code)
    return obj
