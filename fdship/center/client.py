"""Typed client for the center, used by daemons, the CLI and the TUI.

One method per endpoint; bodies are the messages of :mod:`fdship.protocol`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from fdship import protocol as P
from fdship.httpclient import JsonClient


class CenterClient(JsonClient):
    """One method per center endpoint; used by daemons, the CLI and the TUI."""

    async def heartbeat(self, beat: P.Heartbeat) -> P.HeartbeatReply:
        return P.HeartbeatReply.from_json(await self._call("POST", P.CENTER_HEARTBEAT,
                                                           beat.to_json(), timeout=10))

    async def submit(self, req: P.JobRequest) -> str:
        return str((await self._call("POST", P.CENTER_JOB, req.to_json()))["job"])

    async def ack(self, batch: P.AckBatch) -> None:
        await self._call("POST", P.CENTER_ACK, batch.to_json())

    async def draining(self, batch: P.DrainBatch, timeout: float = 5.0) -> int:
        """Tell the center fetches are about to finish; returns how many it ignored.

        Short timeout: a notice is worth something only while its fetch runs.
        """
        res = await self._call("POST", P.CENTER_DRAINING, batch.to_json(), timeout=timeout)
        return int(res.get("ignored", 0)) if isinstance(res, dict) else 0

    async def fin(self, fin: P.Fin) -> None:
        await self._call("POST", P.CENTER_FIN, fin.to_json())

    async def job(self, job_id: str, wait: float = 0.0) -> dict[str, Any]:
        q = f"?wait={wait:g}" if wait else ""
        return await self._call("GET", f"{P.CENTER_JOBS}/{quote(job_id, safe='')}{q}",
                                timeout=wait + 30)

    async def jobs(self, state: str = "", limit: int = 50, before: str = "") -> dict[str, Any]:
        q = {k: v for k, v in (("state", state), ("limit", limit), ("before", before)) if v}
        return await self._call("GET", P.CENTER_JOBS + ("?" + urlencode(q) if q else ""))

    async def hosts(self) -> dict[str, Any]:
        return await self._call("GET", P.CENTER_HOSTS)
