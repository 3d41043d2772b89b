"""A real center inside the test's own event loop: runner, REDO log, HTTP app.

For tests that need to see the center's insides while it serves real HTTP on
a loopback port (its scheduler, its inbox, its REDO log position), or to hold
its single writer still (``start=False``) to prove a handler does not wait for
it.  Everything it starts is stopped in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tornado.httpclient
import tornado.netutil

from fdship.center.http import CenterMetrics, make_app
from fdship.center.runner import Runner
from fdship.config import CenterConfig
from fdship.web import make_server


@dataclass
class InProcessCenter:
    url: str
    runner: Runner
    metrics: CenterMetrics
    token: str = ""

    def sample(self, name: str, **labels: str) -> float:
        """One sample of the center's metrics registry (0 if it was never set)."""
        v = self.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else float(v)

    def fsyncs(self) -> float:
        return self.sample("fdship_redo_fsync_seconds_count")

    async def post(self, path: str, body: Any, token: str | None = None,
                   raw: bytes | None = None, timeout: float = 10.0) -> tuple[int, Any]:
        """POST JSON (or ``raw`` bytes); return (status, parsed body or text)."""
        tok = self.token if token is None else token
        headers = {"Content-Type": "application/json"}
        if tok:
            headers["Authorization"] = "Bearer " + tok
        data = raw if raw is not None else json.dumps(body).encode()
        resp = await tornado.httpclient.AsyncHTTPClient().fetch(
            urllib.parse.urljoin(self.url, path), method="POST", body=data, headers=headers,
            raise_error=False, request_timeout=timeout)
        try:
            return resp.code, json.loads(resp.body or b"null")
        except ValueError:
            return resp.code, (resp.body or b"").decode("utf-8", "replace")


@contextlib.asynccontextmanager
async def center_in_process(data_dir: Path, token: str = "", start: bool = True,
                            **cfg_kw: Any) -> AsyncIterator[InProcessCenter]:
    """A center on 127.0.0.1 with its data in ``data_dir``; ``start=False`` leaves its
    writer stopped (the caller may ``runner.start()`` it later)."""
    cfg = CenterConfig(data_dir=str(data_dir), listen="127.0.0.1:0", **cfg_kw)
    cfg.validate()
    ref: list[Runner] = []
    metrics = CenterMetrics(ref)
    runner = Runner(cfg, token, metrics)
    ref.append(runner)
    runner.recover()
    server = make_server(make_app(runner, token, metrics), cfg, token)
    socks = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(socks)
    if start:
        runner.start()
    try:
        yield InProcessCenter(f"http://127.0.0.1:{socks[0].getsockname()[1]}", runner,
                              metrics, token)
    finally:
        server.stop()
        await server.close_all_connections()
        await runner.stop()
