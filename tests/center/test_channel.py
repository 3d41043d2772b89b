"""The control channel: the envelope (fdship.channel), the center's end, a daemon's end.

A real center runs in the test's event loop (runner, REDO log, HTTP and
WebSocket on a loopback port); the daemon's end is the real
``CenterChannel``, or a bare WebSocket for frames no daemon would send.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket

from fdship import protocol as P
from fdship.center.client import CenterChannel
from fdship.channel import Endpoint
from fdship.errors import BadRequest, FdshipError, Unavailable
from tests.center.conftest import InProcessCenter, center_in_process
from tests.daemon.conftest import run

TOKEN = "channel-test-token"


async def raw_channel(c: InProcessCenter, host: str = "t1", token: str | None = TOKEN
                      ) -> tornado.websocket.WebSocketClientConnection:
    url = c.url.replace("http://", "ws://") + P.CENTER_CHANNEL + (f"?host={host}" if host else "")
    headers = {"Authorization": "Bearer " + token} if token else {}
    return await tornado.websocket.websocket_connect(
        tornado.httpclient.HTTPRequest(url, headers=headers, request_timeout=10))


async def until(cond: Any, what: str, limit: float = 10.0) -> None:
    for _ in range(int(limit / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def ask(conn: tornado.websocket.WebSocketClientConnection, frame: Any) -> Any:
    conn.write_message(frame if isinstance(frame, str) else json.dumps(frame))
    msg = await asyncio.wait_for(conn.read_message(), 10)
    assert msg is not None, "the center closed the channel"
    return json.loads(msg)


async def daemon_end(c: InProcessCenter, host: str) -> tuple[CenterChannel, list[Any]]:
    """A daemon's real channel end whose pulls are recorded (and answered); open."""
    got: list[Any] = []

    async def pull(body: Any) -> Any:
        got.append(body)
        return {"accepted": len(body["fetches"])}

    ch = CenterChannel(c.url, TOKEN, host, {"pull": pull})
    ch.start()
    await until(lambda: ch.open and host in c.runner.channels, "the channel")
    return ch, got


# ---------------------------------------------------------------------- the center's end


def test_the_channel_needs_the_token_and_a_host_name(tmp_path: Path) -> None:
    async def main() -> None:
        async with center_in_process(tmp_path / "c", token=TOKEN) as c:
            for token, host, status, words in ((None, "t1", 401, "missing or wrong token"),
                                               ("wrong", "t1", 401, "missing or wrong token"),
                                               (TOKEN, "", 400, "?host=NAME")):
                with pytest.raises(tornado.httpclient.HTTPClientError) as ei:
                    await raw_channel(c, host, token)
                assert ei.value.code == status
                body = ei.value.response.body if ei.value.response else b""
                assert words in json.loads(body)["error"]
            assert c.sample("fdship_control_channels") == 0
    run(main())


def test_bad_frames_get_an_error_reply_and_the_channel_stays_up(tmp_path: Path) -> None:
    async def main() -> None:
        async with center_in_process(tmp_path / "c", token=TOKEN) as c:
            conn = await raw_channel(c)
            await until(lambda: c.sample("fdship_control_channels") == 1, "the channel")
            r = await ask(conn, "{not json")
            assert r["id"] is None and r["status"] == 400
            assert "not valid JSON" in r["error"]
            r = await ask(conn, {"op": "ack"})
            assert r["id"] is None and "integer 'id'" in r["error"]
            r = await ask(conn, {"id": 1, "op": "rm -rf", "body": {}})
            assert r == {"id": 1, "status": 404, "error": r["error"]}
            assert "unknown channel op 'rm -rf'" in r["error"] and "ack, draining" in r["error"]
            r = await ask(conn, {"id": 2, "op": "ack", "body": {"host": "t1"}})
            assert r["id"] == 2 and r["status"] == 400 and "acks" in r["error"]
            # A daemon reports for itself only.
            r = await ask(conn, {"id": 3, "op": "draining", "body": {
                "host": "t2", "drains": [{"job": "J", "file": 0, "chunk": 0, "peer": "p"}]}})
            assert r["id"] == 3 and r["status"] == 403 and "cannot report for t2" in r["error"]
            # Well-formed, for a job that does not run: answered, changes nothing.
            r = await ask(conn, {"id": 4, "op": "draining", "body": {
                "host": "t1", "drains": [{"job": "J", "file": 0, "chunk": 0, "peer": "p"}]}})
            assert r == {"id": 4, "ok": {"ok": True, "ignored": 1}}
            r = await ask(conn, {"id": 5, "op": "ack", "body": {"host": "t1", "acks": [
                {"job": "J", "file": 0, "chunk": 0, "peer": "p", "ok": True}]}})
            assert r == {"id": 5, "ok": {"ok": True, "ignored": 1}}
            assert c.runner.redo.lsn == 0  # nothing about a job that does not exist was logged
            conn.close()
            await until(lambda: c.sample("fdship_control_channels") == 0, "the channel to close")
            assert "t1" not in c.runner.channels
    run(main())


def test_pulls_go_over_the_channel_and_over_http_once_it_is_gone(tmp_path: Path) -> None:
    async def main() -> None:
        async with center_in_process(tmp_path / "c", token=TOKEN) as c:
            ch, got = await daemon_end(c, "t1")
            try:
                http: list[str] = []

                async def by_http() -> Any:
                    http.append("pull")
                    return {"accepted": 0}

                body = {"job": "J", "files": [], "fetches": [{"file": 0, "chunk": 1}]}
                assert await c.runner._command("t1", "pull", body, by_http) == {"accepted": 1}
                assert got == [body] and http == []
                assert c.sample("fdship_commands_sent", transport="channel") == 1
                # The daemon's end serves only what it was given.
                with pytest.raises(BadRequest, match="unknown channel op 'pack'"):
                    await c.runner._command("t1", "pack", {}, by_http)
                # The daemon's calls: answered by the center.
                assert await ch.call("draining", {"host": "t1", "drains": [
                    {"job": "J", "file": 0, "chunk": 0, "peer": "p"}]}, 5) == \
                    {"ok": True, "ignored": 1}
            finally:
                await ch.stop()
            await until(lambda: "t1" not in c.runner.channels, "the center to see it close")
            assert await c.runner._command("t1", "pull", body, by_http) == {"accepted": 0}
            assert http == ["pull"] and len(got) == 1
            assert c.sample("fdship_commands_sent", transport="http") == 1
            with pytest.raises(Unavailable, match="no channel to the center"):
                await ch.call("draining", {}, 1)
    run(main())


def test_a_new_channel_from_the_same_host_replaces_the_old(tmp_path: Path) -> None:
    async def main() -> None:
        async with center_in_process(tmp_path / "c", token=TOKEN) as c:
            first = await raw_channel(c)
            await until(lambda: "t1" in c.runner.channels, "the first channel")
            old = c.runner.channels["t1"]
            second = await raw_channel(c)
            await until(lambda: c.runner.channels.get("t1") is not old, "the second channel")
            assert not old.open and "replaced" in old.closed_why
            # ...and the replaced connection is closed, so its daemon notices now.
            assert await asyncio.wait_for(first.read_message(), 5) is None
            # The first one closing later does not take the second one with it.
            first.close()
            await asyncio.sleep(0.2)
            assert c.runner.channels["t1"].open
            second.close()
            await until(lambda: "t1" not in c.runner.channels, "the second to close")
    run(main())


def test_a_center_without_the_token_refuses_and_the_daemon_keeps_using_http(
        tmp_path: Path) -> None:
    async def main() -> None:
        async with center_in_process(tmp_path / "c", token=TOKEN) as c:
            ch = CenterChannel(c.url, "not-the-token", "t1", {})
            ch.RETRY_REFUSED = 0.05
            ch.start()
            try:
                await until(lambda: ch.state == "refused", "the refusal")
                assert "HTTP 401" in ch.last_error and not ch.open
                assert "t1" not in c.runner.channels
            finally:
                await ch.stop()
    run(main())


# ---------------------------------------------------------------------- the envelope


class Pair:
    """Two endpoints wired to each other through the event loop (no sockets)."""

    def __init__(self, a_handlers: dict[str, Any], b_handlers: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        self.a = Endpoint("b", lambda m: loop.call_soon(self.b.received, m), a_handlers)
        self.b = Endpoint("a", lambda m: loop.call_soon(self.a.received, m), b_handlers)


def test_errors_come_back_as_the_same_errors_http_gives() -> None:
    async def main() -> None:
        async def conflict(body: Any) -> Any:
            raise BadRequest("already staged elsewhere", status=409)

        async def crash(body: Any) -> Any:
            raise ZeroDivisionError("division by zero")

        p = Pair({}, {"conflict": conflict, "crash": crash, "echo": lambda b: _echo(b)})
        with pytest.raises(BadRequest, match="already staged elsewhere") as ei:
            await p.a.call("conflict", {}, 5)
        assert ei.value.status == 409
        with pytest.raises(FdshipError, match="internal error: division by zero") as ej:
            await p.a.call("crash", {}, 5)
        assert ej.value.status == 500
        assert await p.a.call("echo", {"x": [1, 2]}, 5) == {"x": [1, 2]}
        assert p.a.calls == 3 and p.b.served == 1
    run(main())


async def _echo(body: Any) -> Any:
    return body


def test_calls_fail_over_when_no_reply_comes_or_the_channel_closes() -> None:
    async def main() -> None:
        never = asyncio.Event()

        async def hang(body: Any) -> Any:
            await never.wait()

        p = Pair({}, {"hang": hang})
        with pytest.raises(Unavailable, match="no reply to hang in 0.1 s"):
            await p.a.call("hang", {}, 0.1)
        waiting = asyncio.ensure_future(p.a.call("hang", {}, 30))
        await asyncio.sleep(0.05)
        p.a.closed("connection lost")
        with pytest.raises(Unavailable, match="closed: connection lost"):
            await waiting
        with pytest.raises(Unavailable, match="is down: connection lost"):
            await p.a.call("hang", {}, 1)
        p.b.closed("test over")  # cancels the handlers still waiting
        await asyncio.sleep(0)
    run(main())


def test_a_transport_that_refuses_a_write_closes_the_endpoint() -> None:
    async def main() -> None:
        def refuse(_: str) -> None:
            raise tornado.websocket.WebSocketClosedError()

        e = Endpoint("peer", refuse, {})
        with pytest.raises(Unavailable, match="write failed"):
            await e.call("ack", {}, 1)
        assert not e.open
    run(main())


# ---------------------------------------------------------------------- notices


def test_a_notice_is_served_and_never_answered(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        got: list[Any] = []
        frames: list[str] = []

        async def draining(body: Any) -> Any:
            got.append(body)
            return {"ok": True}

        async def refuse(body: Any) -> Any:
            raise BadRequest("drains: 'drains' is empty")

        loop = asyncio.get_running_loop()
        p = Pair({}, {"draining": draining, "refuse": refuse})

        def b_send(m: str) -> None:  # b's frames to a, recorded
            frames.append(m)
            loop.call_soon(p.a.received, m)
        p.b._send = b_send
        assert p.a.notify("draining", {"n": 1})
        assert p.a.notify("refuse", {})
        assert p.a.notify("no such op", {})
        # A call after the notices is answered: the only frame b ever sends.
        assert await p.a.call("draining", {"n": 2}, 5) == {"ok": True}
        assert got == [{"n": 1}, {"n": 2}]
        assert [json.loads(f)["id"] for f in frames] == [4]
        assert p.a.notices == 3 and p.a.calls == 1
        assert p.b.noticed == 1 and p.b.served == 1
        assert "notice from a refused: drains: 'drains' is empty" in caplog.text
        assert "unknown channel op 'no such op'" in caplog.text
        # Down: the caller learns it and may use HTTP instead.
        p.a.closed("connection lost")
        assert not p.a.notify("draining", {"n": 3})
        assert p.a.notices == 3
    caplog.set_level("INFO", logger="fdship.channel")
    run(main())


def test_an_end_that_predates_notices_answers_and_the_answer_is_dropped() -> None:
    async def main() -> None:
        got: list[Any] = []

        async def draining(body: Any) -> Any:
            got.append(body)
            return {"ok": True}

        p = Pair({}, {"draining": draining})
        received = p.b.received

        def old_received(text: str | bytes) -> None:
            msg = json.loads(text)
            msg.pop("noreply", None)  # an older end: it knows no notices
            received(json.dumps(msg))
        p.b.received = old_received  # type: ignore[method-assign]
        p.a._send = lambda m: asyncio.get_running_loop().call_soon(p.b.received, m)
        assert p.a.notify("draining", {"n": 1})
        assert await p.a.call("draining", {"n": 2}, 5) == {"ok": True}
        assert got == [{"n": 1}, {"n": 2}]
        assert p.b.served == 2  # it answered both; a dropped the answer to the notice
        assert p.a.open and not p.a._pending
    run(main())


def test_the_center_serves_drain_notices_without_an_answer(tmp_path: Path) -> None:
    async def main() -> None:
        async with center_in_process(tmp_path / "c", token=TOKEN) as c:
            conn = await raw_channel(c)
            await until(lambda: c.sample("fdship_control_channels") == 1, "the channel")
            drains = [{"job": "J", "file": 0, "chunk": 0, "peer": "p"}]
            conn.write_message(json.dumps({"id": 1, "op": "draining", "noreply": True,
                                           "body": {"host": "t1", "drains": drains}}))
            # Refused (another host's notice): still no answer, and the channel stays up.
            conn.write_message(json.dumps({"id": 2, "op": "draining", "noreply": True,
                                           "body": {"host": "t2", "drains": drains}}))
            # The next frame back answers the next request, not the notices.
            r = await ask(conn, {"id": 3, "op": "draining", "body": {"host": "t1",
                                                                      "drains": drains}})
            assert r == {"id": 3, "ok": {"ok": True, "ignored": 1}}
            assert c.sample("fdship_drain_notices_total", outcome="ignored") == 2
            conn.close()
    run(main())


def test_pulls_are_notices_and_a_closed_channels_last_ones_are_sent_again(
        tmp_path: Path) -> None:
    import dataclasses

    import tornado.web

    from fdship.core.actions import AssignFetch
    from fdship.core.events import ChunkStored
    from fdship.testing import fake_file
    from tests.core.test_scheduler import CS, T0, cluster, submit
    from tests.core.test_scheduler import run as decide

    by_http: list[Any] = []

    class DaemonPull(tornado.web.RequestHandler):
        def post(self) -> None:
            body = json.loads(self.request.body)
            by_http.append(body)
            self.write({"accepted": len(body["fetches"])})

    async def main() -> None:
        app = tornado.web.Application([(P.DAEMON_PULL, DaemonPull)])
        server = app.listen(0, "127.0.0.1")
        port = next(iter(server._sockets.values())).getsockname()[1]
        # The scheduler's own decisions, for a job it runs: h1 fetches from h0.
        # (The writer is not started: its ticks would judge these hosts by the
        # wall clock.)
        sched = cluster(3, upload_budget=4.0, download_budget=4.0)
        _, actions = submit(sched, [fake_file("/a", 16 * CS, CS)], ["h1"])
        pulls = [dataclasses.replace(a, address=f"127.0.0.1:{port}") for a in actions
                 if isinstance(a, AssignFetch) and a.target == "h1"]
        fetched = [f for a in pulls for f in a.fetches]
        assert len(fetched) >= 3, fetched
        try:
            async with center_in_process(tmp_path / "c", token=TOKEN, start=False) as c:
                c.runner.sched = sched
                ch, got = await daemon_end(c, "h1")
                try:
                    c.runner._carry_out(pulls)
                    await until(lambda: len(got) == len(pulls), "the pulls")
                    assert [f["chunk"] for b in got for f in b["fetches"]] == \
                        [f.chunk for f in fetched]
                    # Notices: served, never answered.
                    assert ch.endpoint is not None
                    assert ch.endpoint.noticed == len(pulls) and ch.endpoint.served == 0
                    assert c.sample("fdship_commands_sent", transport="channel") == len(pulls)
                finally:
                    await ch.stop()
                # Delivered, but the center cannot know: the fetches still in flight
                # as assigned come again, over HTTP (no channel is open); the one
                # acked meanwhile does not.
                first = fetched[0]
                decide(sched, ChunkStored(job="j1", host="h1", file=first.file, chunk=first.chunk,
                                          peer="h0", nbytes=first.size, seconds=0.1), T0 + 1)
                await until(lambda: "h1" not in c.runner.channels, "the center to see it close")
                await until(lambda: sum(len(b["fetches"]) for b in by_http) == len(fetched) - 1,
                            "the fetches sent again over HTTP")
                assert sorted(f["chunk"] for b in by_http for f in b["fetches"]) == \
                    sorted(f.chunk for f in fetched[1:])
                assert all(f["peer_name"] == "h0" for b in by_http for f in b["fetches"])
                assert c.runner._recent_pulls == {}
                # A channel that closes with nothing in flight sends nothing.
                conn = await raw_channel(c, host="h1")
                await until(lambda: "h1" in c.runner.channels, "the second channel")
                c.runner._carry_out([dataclasses.replace(pulls[0], fetches=(first,))])
                await asyncio.sleep(0.1)
                conn.close()
                await until(lambda: "h1" not in c.runner.channels, "the second to close")
                await asyncio.sleep(0.3)
                assert sum(len(b["fetches"]) for b in by_http) == len(fetched) - 1
        finally:
            server.stop()
    run(main())


# ---------------------------------------------------------------------- heartbeats


def test_heartbeats_go_over_the_channel_and_fall_back_to_http(tmp_path: Path) -> None:
    """A real daemon's beats: the registration (with its inventory) over HTTP, then
    one frame each on the channel; another host's beat is refused; a center that
    takes no beats on its channel (an older one) gets them over HTTP from then on;
    and with the channel gone they go over HTTP again."""
    from fdship.config import DaemonConfig, load
    from fdship.daemon.agent import Daemon

    async def main() -> None:
        async with center_in_process(tmp_path / "c", token=TOKEN) as c:
            cfg = load(DaemonConfig, {"center": c.url, "data_dir": str(tmp_path / "d"),
                                      "root": str(tmp_path / "root"), "name": "t1",
                                      "listen": "127.0.0.1:0", "advertise": "127.0.0.1:7"})
            (tmp_path / "root").mkdir()
            d = Daemon(cfg, token=TOKEN)
            await asyncio.get_running_loop().run_in_executor(None, d.store.open)
            assert d.channel is not None
            try:
                first = await d._send_beat(d.beat())  # want_inventory: a registration
                assert d.beat_counts == {"channel": 0, "http": 1}
                assert "t1" in c.runner.sched.hosts and first.chunk_size > 0
                d.want_inventory = first.want_inventory
                assert not d.want_inventory
                d.channel.start()
                await until(lambda: d.channel.open and "t1" in c.runner.channels, "the channel")
                seen = c.runner.sched.hosts["t1"].last_seen
                served = c.runner.channels["t1"].served
                reply = await d._send_beat(d.beat())
                assert d.beat_counts == {"channel": 1, "http": 1}
                assert reply.chunk_size == first.chunk_size
                assert c.runner.channels["t1"].served == served + 1
                assert c.runner.sched.hosts["t1"].last_seen > seen
                # The channel is this host's: a beat for another is refused, not applied.
                with pytest.raises(BadRequest, match="cannot report for t2"):
                    await d.channel.call("heartbeat", P.Heartbeat(
                        name="t2", address="127.0.0.1:8", boot_id="b").to_json(), 5)
                assert "t2" not in c.runner.sched.hosts
                # An older center serves no beats on the channel: HTTP, and it stays so.
                c.runner.channels["t1"]._handlers.pop("heartbeat")
                await d._send_beat(d.beat())
                await d._send_beat(d.beat())
                assert d.beat_counts == {"channel": 1, "http": 3}
                assert d._beats_refused is d.channel.endpoint
                await d.channel.stop()
                await d._send_beat(d.beat())
                assert d.beat_counts == {"channel": 1, "http": 4}
            finally:
                await d.stop()
    run(main())
