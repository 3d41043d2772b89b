"""A stand-in for the center's *read API* over real HTTP, for the TUI's source tests.

It serves the documented shapes (docs/protocol.md) from fixture data on a
real socket with Tornado: ``GET /center/jobs``, ``/center/jobs/ID``,
``/center/hosts`` and the ``/center/events`` server-sent event stream with ids
and ``since=`` / ``Last-Event-ID`` resume.  Tests use it to break and restore
the connection at will (stop the server and cut open streams, start again on
the same port), delay an answer, or demand a token -- things the real center
cannot be made to do on cue.  The real center is exercised separately in
test_tui_real_center.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
from typing import Any

import tornado.httpserver
import tornado.iostream
import tornado.web

import tui_fixtures as fx


class FakeCenter:
    def __init__(self, token: str = "") -> None:
        self.token = token
        self.jobs: dict[str, dict[str, Any]] = {j["job"]: j for j in fx.jobs()}
        self.details = fx.details()
        self.hosts = {h["name"]: h for h in fx.hosts()}
        self.events: list[tuple[int, str, dict[str, Any]]] = []  # the replay buffer
        self.next_id = 1
        self.since_seen: list[str | None] = []  # what each stream asked to resume from
        self.jobs_delay = 0.0  # seconds /center/jobs waits before answering
        self.publish_during_jobs: list[tuple[str, dict[str, Any]]] = []
        self.silent = False  # accept streams but never send a byte (a hung center)
        self.requests: list[str] = []
        self._cond: asyncio.Condition | None = None
        self._server: tornado.httpserver.HTTPServer | None = None
        self._streams: set[Any] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen on 127.0.0.1 (a fresh port the first time, the same one after)."""
        app = tornado.web.Application([
            (r"/center/jobs", _Jobs, {"c": self}),
            (r"/center/jobs/([^/]+)", _Job, {"c": self}),
            (r"/center/hosts", _Hosts, {"c": self}),
            (r"/center/events", _Events, {"c": self}),
        ])
        self._server = tornado.httpserver.HTTPServer(app)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._server.add_sockets([sock])
        self._cond = asyncio.Condition()

    async def stop(self) -> None:
        """Stop listening and cut every open event stream, like a center that died."""
        if self._server is not None:
            self._server.stop()
            for conn in list(self._streams):
                conn.close()
            self._streams.clear()
            await self._server.close_all_connections()
            self._server = None

    def publish(self, kind: str, data: dict[str, Any]) -> int:
        if kind == "job":
            self.jobs[data["job"]] = {**self.jobs.get(data["job"], {}), **data}
        elif kind == "host":
            self.hosts[data["name"]] = data
        elif kind == "machine":
            d = self.details.setdefault(data["job"], {"job": data["job"], "machines": {}})
            d["machines"][data["machine"]] = {**d["machines"].get(data["machine"], {}), **data}
        ident = self.next_id
        self.next_id += 1
        self.events.append((ident, kind, data))
        del self.events[:-1000]
        if self._cond is not None:
            cond = self._cond

            async def wake() -> None:
                async with cond:
                    cond.notify_all()
            asyncio.ensure_future(wake())
        return ident


class _Base(tornado.web.RequestHandler):
    def initialize(self, c: FakeCenter) -> None:
        self.c = c

    def prepare(self) -> None:
        self.c.requests.append(self.request.uri or "")
        if self.c.token:
            got = self.request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.c.token}".encode()):
                self.set_status(401)
                self.finish({"error": "missing or wrong token: send 'Authorization: Bearer "
                                      "TOKEN' with the cluster's shared token"})


class _Jobs(_Base):
    async def get(self) -> None:
        if self.c.jobs_delay:
            await asyncio.sleep(self.c.jobs_delay)
            for kind, data in self.c.publish_during_jobs:
                self.c.publish(kind, data)
            self.c.publish_during_jobs = []
            await asyncio.sleep(self.c.jobs_delay)
        limit = int(self.get_argument("limit", "50"))
        jobs = sorted(self.c.jobs.values(), key=lambda j: j["job"], reverse=True)
        self.finish({"jobs": jobs[:limit], "next": None})


class _Job(_Base):
    def get(self, job_id: str) -> None:
        d = self.c.details.get(job_id)
        if d is None:
            self.set_status(404)
            self.finish({"error": f"no job {job_id}"})
            return
        self.finish({**self.c.jobs.get(job_id, {}), **d})


class _Hosts(_Base):
    def get(self) -> None:
        self.finish({"hosts": list(self.c.hosts.values())})


class _Events(_Base):
    async def get(self) -> None:
        since_arg = self.get_argument("since", None) or self.request.headers.get("Last-Event-ID")
        self.c.since_seen.append(since_arg)
        last = int(since_arg) if since_arg and since_arg.isdigit() else None
        if last is None:
            last = self.c.next_id - 1  # a fresh follower gets what happens from now on
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        conn = self.request.connection
        self.c._streams.add(conn)
        try:
            self.write(": hello\n\n")
            await self.flush()
            while not conn.stream.closed():
                if self.c.silent:
                    await asyncio.sleep(0.05)
                    continue
                pending = [e for e in self.c.events if e[0] > last]
                for ident, kind, data in pending:
                    self.write(f"id: {ident}\nevent: {kind}\ndata: {json.dumps(data)}\n\n")
                    last = ident
                if pending:
                    await self.flush()
                cond = self.c._cond
                assert cond is not None
                async with cond:
                    try:
                        await asyncio.wait_for(cond.wait(), 0.5)
                    except asyncio.TimeoutError:
                        pass
        except tornado.iostream.StreamClosedError:
            pass
        finally:
            self.c._streams.discard(conn)
