"""Typed client for a daemon, used by the center (pull, pack) and the CLI (api).

Bulk chunk downloads do not go through here: they use the lean keep-alive
reader in :mod:`fdship.daemon.fetch`.
"""

from __future__ import annotations

from typing import Any

from fdship import protocol as P
from fdship.httpclient import JsonClient


def daemon_url(address: str) -> str:
    return address if address.startswith(("http://", "https://")) else "http://" + address


class DaemonClient(JsonClient):
    def __init__(self, base_url: str, token: str = "", timeout: float = 30.0,
                 keep_alive: bool = False) -> None:
        super().__init__(daemon_url(base_url), token, timeout, keep_alive)

    async def pull(self, req: P.PullRequest) -> Any:
        return await self._call("POST", P.DAEMON_PULL, req.to_json(), timeout=15)

    async def pack(self, req: P.PackRequest) -> Any:
        return await self._call("POST", P.DAEMON_PACK, req.to_json(), timeout=15)

    async def api(self, req: P.ApiRequest, timeout: float = 7 * 86400) -> Any:
        """Submit a job.  Blocks until it ends unless ``req.callback`` is set."""
        return await self._call("POST", P.DAEMON_API, req.to_json(), timeout=timeout)

    async def status(self) -> Any:
        return await self._call("GET", P.DAEMON_STATUS)
