"""The TUI's data sources: SSE decoding, backoff, and the HTTP source on real sockets.

The HTTP source is driven against tui_center.FakeCenter (the read API served
by Tornado on 127.0.0.1) so the tests can kill and restore the "center", make
it hang, or demand a token.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import tui_fixtures as fx
from tui_center import FakeCenter

from fdship.errors import BadRequest
from tui.source import (
    CONNECTING,
    LIVE,
    RECONNECTING,
    Backoff,
    Batch,
    DataSource,
    Event,
    HTTPSource,
    MemorySource,
    Snapshot,
    SSEDecoder,
    Status,
    Update,
)

# --- SSE decoding -------------------------------------------------------------------------


def test_sse_basic_and_comments() -> None:
    d = SSEDecoder()
    msgs = d.feed(b": keepalive\n\nid: 7\nevent: job\ndata: {\"a\": 1}\n\n")
    assert [(m.event, m.data, m.id) for m in msgs] == [("job", '{"a": 1}', "7")]
    assert d.last_id == "7"


def test_sse_split_anywhere_gives_same_messages() -> None:
    stream = (b"id: 1\r\nevent: host\r\ndata: {\"name\": \"a\"}\r\n\r\n"
              b"id: 2\nevent: machine\ndata: line1\ndata: line2\n\n"
              b"id: 3\revent: job\rdata:no-space\r\r"
              b"retry: 1500\n: c\ndata: x\n\n")
    whole = [(m.event, m.data, m.id) for m in SSEDecoder().feed(stream)]
    assert whole == [("host", '{"name": "a"}', "1"), ("machine", "line1\nline2", "2"),
                     ("job", "no-space", "3"), ("message", "x", "3")]
    for size in (1, 2, 3, 5, 7, 13):
        d = SSEDecoder()
        got = []
        for i in range(0, len(stream), size):
            got += [(m.event, m.data, m.id) for m in d.feed(stream[i:i + size])]
        assert got == whole, size
        assert d.retry_ms == 1500


def test_sse_event_without_data_is_dropped_and_type_resets() -> None:
    d = SSEDecoder()
    assert d.feed(b"event: job\n\ndata: y\n\n")[0].event == "message"


def test_sse_line_too_long_is_an_error() -> None:
    d = SSEDecoder(max_line=10)
    with pytest.raises(Exception, match="longer than 10 bytes"):
        d.feed(b"data: " + b"x" * 100)


# --- backoff ------------------------------------------------------------------------------


def test_backoff_doubles_to_cap_and_resets() -> None:
    b = Backoff(base=0.5, cap=6.0, jitter=0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 6.0, 6.0]
    b.reset()
    assert b.next() == 0.5
    j = Backoff(base=1.0, cap=100.0, jitter=0.1, rng=random.Random(3))
    ds = [j.next() for _ in range(4)]
    for d, want in zip(ds, [1, 2, 4, 8], strict=True):
        assert want * 0.9 <= d <= want * 1.1
    assert len(set(ds)) == 4
    with pytest.raises(ValueError):
        Backoff(base=0)


# --- helpers ------------------------------------------------------------------------------


async def collect_until(it: AsyncIterator[Update], pred: Callable[[Update], bool],
                        timeout: float = 10.0) -> list[Update]:
    """Updates up to and including the first matching ``pred`` (fails after ``timeout``)."""
    out: list[Update] = []

    async def run() -> None:
        async for u in it:
            # A batch is several events that were waiting together: look at each.
            for one in (u.events if isinstance(u, Batch) else [u]):
                out.append(one)
                if pred(one):
                    return
        raise AssertionError(f"source ended before the awaited update; got {out}")

    try:
        await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        raise AssertionError(f"no matching update within {timeout}s; got {out}") from None
    return out


def is_state(state: str) -> Callable[[Update], bool]:
    return lambda u: isinstance(u, Status) and u.state == state


def is_event(kind: str, **match: Any) -> Callable[[Update], bool]:
    return lambda u: (isinstance(u, Event) and u.kind == kind
                      and all(u.data.get(k) == v for k, v in match.items()))


def quick_source(url: str, **kw: Any) -> HTTPSource:
    kw.setdefault("backoff", Backoff(base=0.05, cap=0.2, jitter=0))
    kw.setdefault("connect_timeout", 2.0)
    return HTTPSource(url, **kw)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --- the HTTP source on real sockets -------------------------------------------------------


def test_http_source_snapshot_then_live_events() -> None:
    async def main() -> None:
        c = FakeCenter()
        c.start()
        src = quick_source(c.url)
        assert isinstance(src, DataSource)
        it = src.updates()
        try:
            got = await collect_until(it, is_state(LIVE))
            assert isinstance(got[0], Status) and got[0].state == CONNECTING
            (snap,) = [u for u in got if isinstance(u, Snapshot)]
            assert {j["job"] for j in snap.jobs} == set(c.jobs)
            assert {h["name"] for h in snap.hosts} == set(c.hosts)
            c.publish("machine", {"job": fx.RUNNING, "machine": "web-05", "state": "failed",
                                  "error": "disk full"})
            got = await collect_until(it, is_event("machine"))
            ev = got[-1]
            assert isinstance(ev, Event)
            assert ev.id == 1 and ev.data["error"] == "disk full"
            assert src.last_event_id == "1"
            detail = await src.job(fx.RUNNING)
            assert detail["machines"]["web-05"]["state"] == "failed"
            assert len(detail["machines"]) == 12
            with pytest.raises(BadRequest, match="no job nope"):
                await src.job("nope")
        finally:
            await src.close()
            await it.aclose()
            await c.stop()

    asyncio.run(main())


def test_http_source_resumes_with_since_after_a_dropped_stream() -> None:
    async def main() -> None:
        c = FakeCenter()
        c.start()
        src = quick_source(c.url)
        it = src.updates()
        try:
            await collect_until(it, is_state(LIVE))
            c.publish("host", {**fx.host("web-06", 6), "alive": True})
            await collect_until(it, is_event("host", name="web-06"))
            c.cut_streams()  # the center stays up: a network blip
            got = await collect_until(it, is_state(RECONNECTING))
            st = got[-1]
            assert isinstance(st, Status) and st.retry_in is not None and st.retry_in > 0
            assert "closed the event stream" in st.error  # a reason for the status line
            c.publish("job", {"job": fx.RUNNING, "state": "failed"})  # during the gap
            got = await collect_until(it, is_state(LIVE))
            (snap,) = [u for u in got if isinstance(u, Snapshot)]
            assert {j["job"]: j["state"] for j in snap.jobs}[fx.RUNNING] == "failed"
            # Resumed from the last id seen, so the missed event is replayed too.
            assert c.since_seen == [None, "1"]
            got = await collect_until(it, is_event("job", state="failed"))
            assert isinstance(got[-1], Event) and got[-1].id == 2
            assert src.connections == 2
        finally:
            await src.close()
            await it.aclose()
            await c.stop()

    asyncio.run(main())


def test_http_source_follows_a_restarted_center_whose_ids_start_again() -> None:
    """A new center process numbers events from 1: an old since= must not hide them."""

    async def main() -> None:
        c = FakeCenter()
        c.start()
        src = quick_source(c.url)
        it = src.updates()
        try:
            await collect_until(it, is_state(LIVE))
            for i in range(5):
                c.publish("host", {**fx.host("web-06", 6), "alive": True, "n": i})
            await collect_until(it, is_event("host", n=4))
            assert src.last_event_id == "5"
            await c.stop()
            # Keep following while it is down: attempts are refused.
            await collect_until(it, lambda u: isinstance(u, Status) and u.state == RECONNECTING
                                and "cannot reach" in u.error)
            c2 = FakeCenter()  # the restarted center: same port, ids from 1 again
            c2.port = c.port
            c2.jobs[fx.RUNNING] = {**c2.jobs[fx.RUNNING], "state": "done"}
            c2.start()
            try:
                got = await collect_until(it, is_state(LIVE))
                (snap,) = [u for u in got if isinstance(u, Snapshot)]
                assert {j["job"]: j["state"] for j in snap.jobs}[fx.RUNNING] == "done"
                assert c2.since_seen == [None]  # from "now", not from the old id 5
                c2.publish("machine", {"job": fx.RUNNING, "machine": "web-03",
                                       "state": "done"})
                got = await collect_until(it, is_event("machine", machine="web-03"))
                assert isinstance(got[-1], Event) and got[-1].id == 1
            finally:
                await c2.stop()
        finally:
            await src.close()
            await it.aclose()
            await c.stop()

    asyncio.run(main())


def test_http_source_refetches_everything_on_reset() -> None:
    """Resuming from further back than the center keeps: it says reset, we re-fetch."""

    async def main() -> None:
        c = FakeCenter()
        c.keep = 3
        c.start()
        src = quick_source(c.url)
        it = src.updates()
        try:
            await collect_until(it, is_state(LIVE))
            c.publish("host", {**fx.host("web-06", 6), "alive": True})
            await collect_until(it, is_event("host"))
            c.cut_streams()
            await collect_until(it, is_state(RECONNECTING))
            for i in range(10):  # far more than the center keeps
                c.publish("job", {"job": fx.DONE, "n": i})
            got = await collect_until(it, is_event("job", n=9))
            snaps = [u for u in got if isinstance(u, Snapshot)]
            assert len(snaps) == 2  # the reconnect's, and the reset's
            assert c.since_seen == [None, "1"]
            assert [u.data["n"] for u in got if isinstance(u, Event)] == [7, 8, 9]
        finally:
            await src.close()
            await it.aclose()
            await c.stop()

    asyncio.run(main())


def test_http_source_loses_no_event_published_while_fetching_the_snapshot() -> None:
    async def main() -> None:
        c = FakeCenter()
        c.jobs_delay = 0.2
        c.publish_during_jobs = [("machine", {"job": fx.RUNNING, "machine": "web-03",
                                              "state": "done"})]
        c.start()
        src = quick_source(c.url)
        it = src.updates()
        try:
            got = await collect_until(it, is_event("machine", machine="web-03"))
            kinds = [type(u).__name__ for u in got]
            # Snapshot first, the event that raced it after: folding stays correct.
            assert kinds.index("Snapshot") < kinds.index("Event")
        finally:
            await src.close()
            await it.aclose()
            await c.stop()

    asyncio.run(main())


def test_http_source_token() -> None:
    async def main() -> None:
        c = FakeCenter(token="s3cret")
        c.start()
        bad = quick_source(c.url)
        good = quick_source(c.url, token="s3cret")
        it_bad, it_good = bad.updates(), good.updates()
        try:
            got = await collect_until(it_bad, is_state(RECONNECTING))
            st = got[-1]
            assert isinstance(st, Status) and "token" in st.error
            await collect_until(it_good, is_state(LIVE))
        finally:
            for s, it in ((bad, it_bad), (good, it_good)):
                await s.close()
                await it.aclose()
            await c.stop()

    asyncio.run(main())


def test_http_source_unreachable_center_backs_off() -> None:
    async def main() -> None:
        sleeps: list[float] = []

        async def fake_sleep(d: float) -> None:
            sleeps.append(d)  # record the schedule, wait only a little
            await asyncio.sleep(0.01)

        src = HTTPSource(f"http://127.0.0.1:{free_port()}",
                         backoff=Backoff(base=0.5, cap=2.0, jitter=0), sleep=fake_sleep)
        it = src.updates()
        try:
            statuses: list[Status] = []
            while len(statuses) < 4:
                u = await asyncio.wait_for(it.__anext__(), 5)
                if isinstance(u, Status) and u.state == RECONNECTING:
                    statuses.append(u)
            assert [s.retry_in for s in statuses] == [0.5, 1.0, 2.0, 2.0]
            assert sleeps == [0.5, 1.0, 2.0]  # the 4th waits for the caller to go on
            assert "cannot reach the center" in statuses[0].error
            assert [s.attempt for s in statuses] == [1, 2, 3, 4]
        finally:
            await src.close()
            await it.aclose()

    asyncio.run(main())


def test_http_source_idle_stream_is_dropped() -> None:
    async def main() -> None:
        c = FakeCenter()
        c.start()
        src = quick_source(c.url, idle_timeout=0.3)
        it = src.updates()
        try:
            await collect_until(it, is_state(LIVE))
            c.silent = True
            t0 = time.monotonic()
            got = await collect_until(it, is_state(RECONNECTING), timeout=5)
            st = got[-1]
            assert isinstance(st, Status) and "sent nothing" in st.error
            assert time.monotonic() - t0 < 4
            c.silent = False
            await collect_until(it, is_state(LIVE))
        finally:
            await src.close()
            await it.aclose()
            await c.stop()

    asyncio.run(main())


def test_http_source_reads_close_delimited_stream() -> None:
    """A plain HTTP/1.1 answer without chunking or length: events until the peer closes."""

    async def main() -> None:
        c = FakeCenter()
        c.start()  # serves the GETs; the raw server below serves only the stream

        async def raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"/center/events" not in head:
                # The snapshot GETs: answered from the fake center's data.
                import json
                path = head.split(b" ")[1].decode()
                body = (json.dumps({"jobs": list(c.jobs.values()), "next": None})
                        if path.startswith("/center/jobs") else
                        json.dumps({"hosts": list(c.hosts.values())}))
                writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
                             f"Content-Type: application/json\r\n\r\n{body}".encode())
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                             b"id: 41\nevent: job\ndata: {\"job\": \"x\", \"state\": \"done\"}"
                             b"\n\nid: 42\nevent: bogus\ndata: {}\n\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(raw, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        src = quick_source(f"http://127.0.0.1:{port}")
        it = src.updates()
        try:
            got = await collect_until(it, is_state(RECONNECTING))
            evs = [u for u in got if isinstance(u, Event)]
            assert [(e.kind, e.id) for e in evs] == [("job", 41)]  # unknown kinds skipped
            assert src.last_event_id == "42"
            st = got[-1]
            assert isinstance(st, Status) and "closed the event stream" in st.error
        finally:
            await src.close()
            await it.aclose()
            server.close()
            await c.stop()

    asyncio.run(main())


def test_http_source_rejects_bad_url() -> None:
    for bad in ("127.0.0.1:7070", "ftp://x", "http://"):
        with pytest.raises(BadRequest, match="must look like http://HOST:PORT"):
            HTTPSource(bad)


# --- the in-memory source ---------------------------------------------------------------


def test_memory_source_script() -> None:
    async def main() -> None:
        src = MemorySource(fx.jobs(), fx.hosts(), fx.details())
        src.push("job", {"job": fx.DONE, "state": "done"})  # before following: kept
        it = src.updates()
        got = await collect_until(it, is_state(LIVE))
        assert [type(u).__name__ for u in got] == ["Status", "Snapshot", "Status"]
        got = await collect_until(it, is_event("job"))
        assert got[-1].id == 1  # type: ignore[union-attr]
        src.disconnect(retry_in=2.0, error="connection refused")
        src.push("machine", {"job": fx.FAILED, "machine": "db-1", "state": "failed",
                             "error": "x"})
        src.reconnect()
        got = await collect_until(it, is_state(LIVE))
        assert [type(u).__name__ for u in got] == ["Status", "Event", "Status", "Snapshot",
                                                   "Status"]
        assert (await src.job(fx.FAILED))["machines"]["db-1"]["state"] == "failed"
        assert src.job_requests == [fx.FAILED]
        await src.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(it.__anext__(), 2)

    asyncio.run(main())
