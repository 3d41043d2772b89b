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
        self.keep = 1000  # events kept for resuming
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

    def cut_streams(self) -> None:
        """Drop every open event stream but keep serving: a network blip, not a restart."""
        for conn in list(self._streams):
            conn.close()
        self._streams.clear()

    async def stop(self) -> None:
        """Stop listening and cut every open event stream, like a center that died."""
        if self._server is not None:
            self._server.stop()
            for conn in list(self._streams):
                conn.close()
            self._streams.clear()
            await self._server.close_all_connections()
            self._server = None
            # Wake the stream handlers so they see their closed connections and end
            # now, rather than being cancelled mid-wait when the test's loop closes.
            if self._cond is not None:
                async with self._cond:
                    self._cond.notify_all()
                for _ in range(3):
                    await asyncio.sleep(0)

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
        del self.events[:-self.keep]
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
        assert conn is not None
        self.c._streams.add(conn)
        oldest = self.c.events[0][0] if self.c.events else self.c.next_id
        try:
            if last + 1 < oldest:  # like the center: "you missed too much, re-fetch"
                self.write(f"event: reset\ndata: {{\"oldest\": {oldest}}}\n\n")
            self.write(": hello\n\n")
            await self.flush()
            while not conn.stream.closed():  # type: ignore[attr-defined]
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
                    except TimeoutError:
                        pass
        except tornado.iostream.StreamClosedError:
            pass
        finally:
            self.c._streams.discard(conn)


# --- a feeder for the TUI benchmark: a 50-machine job progressing at a set event rate ----


BENCH_JOB = "20261122T100000-0050"


def setup_job(c: FakeCenter, job_id: str, machines: int, chunks: int, hosts: int) -> None:
    """Replace the fixture data with one running job of ``machines`` targets, all pending."""
    chunk = 4 * 1024 * 1024
    names = [f"m-{i:03d}" for i in range(machines)]
    c.details = {job_id: {"job": job_id, "machines": {n: {
        "state": "pending", "chunks_done": 0, "chunks_total": chunks, "bytes_done": 0,
        "bytes_total": chunks * chunk, "rate": 0.0, "eta": None, "attempts": 0,
        "error": None} for n in names}}}
    c.jobs = {job_id: {"job": job_id, "state": "running", "created": fx._ts(0),
                       "finished": None, "source": "src", "files": 1,
                       "bytes_total": machines * chunks * chunk, "bytes_done": 0,
                       "progress": 0.0, "rate": 0.0,
                       "machines": {"total": machines, "done": 0, "failed": 0,
                                    "running": machines}}}
    c.hosts = {f"h-{i:03d}": fx.host(f"h-{i:03d}", i % 200) for i in range(hosts)}


def feed_job(c: FakeCenter, job_id: str, machines: int, chunks: int, rate: float,
             seconds: float) -> None:
    """Publish machine, job and host events like a center following one big job.

    ``rate`` machine events per second spread round-robin over the machines
    (one per acked chunk, the way the center reports progress), a job summary
    every tenth, and one host heartbeat per host per second.  Each event
    carries ``sent_at`` (``time.monotonic()``, system-wide on Linux) so the
    benchmark can measure center-to-screen latency from another process.
    """
    import time

    from tornado.ioloop import PeriodicCallback

    chunk = 4 * 1024 * 1024
    names = [f"m-{i:03d}" for i in range(machines)]
    done = dict.fromkeys(names, 0)
    t0 = time.monotonic()
    state = {"i": 0, "sent": 0}
    beat = [0.0]
    tick = 0.01

    def step() -> None:
        now = time.monotonic()
        elapsed = now - t0
        if elapsed > seconds:
            return
        want = int(elapsed * rate)
        while state["sent"] < want:
            n = names[state["i"] % machines]
            state["i"] += 1
            state["sent"] += 1
            done[n] = min(chunks, done[n] + 1)
            st = "done" if done[n] == chunks else "fetching"
            c.publish("machine", {"job": job_id, "machine": n, "state": st,
                                  "chunks_done": done[n], "chunks_total": chunks,
                                  "bytes_done": done[n] * chunk, "bytes_total": chunks * chunk,
                                  "rate": 60.0 * 1024 * 1024, "eta": (chunks - done[n]) / 15,
                                  "attempts": 1, "error": None, "sent_at": time.monotonic()})
            if state["sent"] % 10 == 0:
                total = sum(done.values())
                c.publish("job", {"job": job_id, "state": "running",
                                  "bytes_done": total * chunk,
                                  "progress": total / (machines * chunks),
                                  "rate": machines * 60.0 * 1024 * 1024,
                                  "machines": {"total": machines,
                                               "done": sum(1 for v in done.values()
                                                           if v == chunks),
                                               "failed": 0, "running": machines},
                                  "sent_at": time.monotonic()})
        if now - beat[0] >= 1.0:
            beat[0] = now
            for h in c.hosts.values():
                c.publish("host", {**h, "sent_at": time.monotonic()})

    PeriodicCallback(step, tick * 1000).start()


def main() -> None:
    """``python tui_center.py --port P ...``: serve a fake center feeding one job; runs
    until ``--seconds`` plus a grace period have passed (bounded in time)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--machines", type=int, default=50)
    p.add_argument("--chunks", type=int, default=256)
    p.add_argument("--rate", type=float, default=400.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--hosts", type=int, default=51)
    p.add_argument("--start-delay", type=float, default=2.0)
    a = p.parse_args()

    async def run() -> None:
        c = FakeCenter()
        c.port = a.port
        setup_job(c, BENCH_JOB, a.machines, a.chunks, a.hosts)
        c.start()
        await asyncio.sleep(a.start_delay)  # let the follower connect first
        feed_job(c, BENCH_JOB, a.machines, a.chunks, a.rate, a.seconds)
        await asyncio.sleep(a.seconds + 5)
        await c.stop()

    asyncio.run(run())


if __name__ == "__main__":
    main()
