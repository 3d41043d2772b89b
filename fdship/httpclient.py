"""A small JSON-over-HTTP helper shared by the typed clients.

Both :mod:`fdship.center.client` and :mod:`fdship.daemon.client` go through
``call``: it adds the token, encodes JSON, and turns every way a request can
fail into the error tree (``Unavailable`` when the other side cannot be
reached, the server's own ``{"error": ...}`` sentence otherwise), so callers
never see tornado's exception types.

It also holds the process's TLS client settings (``configure_tls``): the CA
file that certificates of the center and daemons are verified against, and
whether daemons are called over HTTPS (``peer_url``).  The CLI and the TUI
take the CA file from ``--tls-ca`` or ``$FDSHIP_TLS_CA`` (:mod:`fdship.clitls`).
"""

from __future__ import annotations

import json
import os
import ssl
from typing import Any

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
               cluster: bool = True) -> Any:
    """One JSON request.  ``cluster`` False: an outside URL (a job's callback), which is
    verified against the system's trust store rather than the cluster's CA."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
    tls = cluster_ssl_context() if cluster and url.startswith("https://") else None
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

    def __init__(self, base_url: str, token: str = "", timeout: float = 30.0) -> None:
        self.base = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    async def _call(self, method: str, path: str, body: Any = None,
                    timeout: float | None = None) -> Any:
        return await call(method, self.base + path, body, token=self.token,
                          timeout=timeout or self.timeout)
