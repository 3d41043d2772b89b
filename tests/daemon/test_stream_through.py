"""Cut-through serving: a daemon serves a chunk while it is still arriving.

Over real loopback sockets and real files: an upstream peer (a store behind
:class:`fdship.daemon.serve.DownloadHandler`, slowed by its upload cap or made
to fail with the serve fault injection) sends a chunk to a real in-process
:class:`fdship.daemon.agent.Daemon` ("P") through ``/daemon/pull``'s fetch
path, and a downstream :class:`fdship.daemon.fetch.PeerPool` fetches the same
chunk from P meanwhile.  The downstream must get every byte right, start
receiving before P has the whole chunk, and never finish before P verified it;
when P's fetch fails, the downstream's fails too and nobody marks the chunk.
A GET that arrives while P's pull still waits for a fetch slot waits, then
streams; a GET for a chunk P neither holds nor expects is refused as before;
and a stream whose source stops progressing hangs up after the stall timeout.
A few tests drive :mod:`fdship.daemon.arrivals` by hand behind a bare
handler (TLS, stalls) with real fetches and real staging files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.netutil
import xxhash

from fdship import protocol as P
from fdship.config import DaemonConfig, load
from fdship.daemon.agent import Daemon, make_app
from fdship.daemon.arrivals import FAILED, OK, PENDING, RUNNING, Arrival, Arrivals
from fdship.daemon.delta import DeltaFetcher
from fdship.daemon.fetch import FetchError, PeerPool
from fdship.daemon.ratelimit import RateLimiter
from fdship.daemon.store import Snapshot, Store
from fdship.protocol import FAIL_CONNECT, FAIL_HASH, FAIL_MISSING
from tests.daemon.conftest import run, serving, write_random

StoreFactory = Callable[..., Store]
MiB = 1024 * 1024
JOB = "J-stream"


def source(store: Store, tmp_path: Path, size: int, cs: int, seed: int = 7) -> tuple[Snapshot,
                                                                                    bytes]:
    src = tmp_path / f"src-{seed}.bin"
    data = write_random(src, size, seed)
    snap = store.snapshot(str(src), cs)
    store.commit_snapshots(JOB, [snap.key])
    return snap, data


def pull_request(snap: Snapshot, peer: str, chunks: list[int],
                 peer_name: str = "up") -> P.PullRequest:
    cs = snap.chunk_size
    return P.PullRequest(job=JOB, files=(P.StagedFile(file=0, dest="/out.bin", size=snap.size,
                                                      xxh3=snap.xxh3),),
                         fetches=tuple(P.Fetch(file=0, chunk=c, offset=c * cs,
                                               size=min(cs, snap.size - c * cs),
                                               xxh3=snap.chunks[c], peer=peer,
                                               peer_name=peer_name) for c in chunks))


@contextlib.asynccontextmanager
async def daemon_p(tmp_path: Path, **cfg: str) -> AsyncIterator[tuple[Daemon, str]]:
    """A real daemon, its store open and its app on a loopback port; never started
    (no center): pulls are handed to it directly and its acks stay queued."""
    c = load(DaemonConfig, {"center": "http://127.0.0.1:9", "data_dir": str(tmp_path / "p-data"),
                            "root": str(tmp_path / "p-root"), "listen": "127.0.0.1:0",
                            "name": "p", **cfg})
    os.makedirs(c.root, exist_ok=True)
    d = Daemon(c)
    await asyncio.get_running_loop().run_in_executor(None, d.store.open)
    server = tornado.httpserver.HTTPServer(make_app(d))
    socks = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(socks)
    try:
        yield d, f"127.0.0.1:{socks[0].getsockname()[1]}"
    finally:
        server.stop()
        await server.close_all_connections()
        await d.stop()


async def until(cond: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """Poll ``cond`` every 2 ms, at most ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


class Downstream:
    """One fetch from P into a file of its own, recording what P's arrival looked
    like when the first body bytes came and when the fetch ended."""

    def __init__(self, tmp_path: Path, name: str, size: int) -> None:
        self.path = tmp_path / f"down-{name}.bin"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.size = size
        self.pool = PeerPool(stall_timeout=10.0)
        self.first: tuple[str, int] | None = None  # (P's state, P's bytes written)
        self.first_at = 0.0
        self.done_at = 0.0
        self.watch: Arrival | None = None
        self.streams = -1  # the watched arrival's streams when the first bytes came

    async def fetch(self, peer: str, chunk: int, xxh3: str, watch: Arrival | None,
                    arriving: bool = False) -> int:
        self.watch = watch
        loop = asyncio.get_running_loop()

        def progress(n: int) -> None:
            if self.first is None:
                self.first_at = loop.time()
                if self.watch is not None:
                    self.first = (self.watch.state, self.watch.written)
                    self.streams = self.watch.streams
                else:
                    self.first = ("", 0)

        try:
            return await self.pool.fetch(peer, JOB, 0, chunk, self.size, xxh3, self.fd, 0,
                                         timeout=20.0, on_progress=progress, arriving=arriving)
        finally:
            self.done_at = loop.time()

    def data(self) -> bytes:
        return os.pread(self.fd, self.size + 1, 0)

    async def close(self) -> None:
        await self.pool.close()
        os.close(self.fd)


async def ended_at(arrival: Arrival) -> float:
    """Loop time at which ``arrival`` ended (its waiters are woken in order)."""
    while not arrival.done:
        await arrival.changed()
    return asyncio.get_running_loop().time()


async def status(address: str) -> dict[str, Any]:
    r = await tornado.httpclient.AsyncHTTPClient().fetch(f"http://{address}{P.DAEMON_STATUS}")
    return json.loads(r.body)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- the registry


def test_arrivals_wake_waiters_and_keep_replacements_apart() -> None:
    async def main() -> None:
        reg = Arrivals()
        key = (JOB, 0, 3)
        a = reg.open(key, 100, 10)
        assert (a.state, a.written, a.available(), reg.get(key)) == (PENDING, 0, 0, a)
        w1, w2 = a.changed(), a.changed()
        a.start()
        assert a.state == RUNNING and w1.done() and w2.done()
        w = a.changed()
        a.progress(4)
        assert w.done() and a.available() == 4
        a.progress(3)  # never backwards
        a.progress(10)
        assert a.written == 10 and a.available() == 9  # the last byte waits for ok
        # A replacement fails the old arrival; closing the old one leaves it alone.
        waiting = a.changed()
        b = reg.open(key, 100, 10)
        assert a.state == FAILED and "replaced" in a.reason and waiting.done()
        reg.close(a)
        assert reg.get(key) is b and len(reg) == 1
        cancelled = b.changed()
        cancelled.cancel()  # a timed-out waiter is skipped, not an error
        b.progress(10)
        b.succeed()
        assert b.state == OK and b.available() == 10 and b.changed().done()
        b.fail("late")  # an ended arrival stays ended
        assert b.state == OK
        reg.close(b)
        assert reg.get(key) is None and len(reg) == 0

    run(main())


def test_a_request_can_wait_for_its_arrival_to_be_opened() -> None:
    """``opened`` returns at once when the arrival exists, wakes when it is opened,
    gives None after its timeout, and leaves no waiter behind either way."""
    async def main() -> None:
        reg = Arrivals()
        key = (JOB, 0, 1)
        assert await reg.opened(key, 0.05) is None
        assert reg._awaited == {}
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        waiting = asyncio.ensure_future(reg.opened(key, 5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        a = reg.open(key, 0, 10)
        assert await waiting is a and loop.time() - t0 < 4.0
        assert reg._awaited == {}
        assert await reg.opened(key, 5.0) is a  # already there: no wait
        # A waiter cancelled with its request (the peer hung up) is removed too.
        other = asyncio.ensure_future(reg.opened((JOB, 0, 2), 5.0))
        await asyncio.sleep(0.01)
        other.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await other
        assert reg._awaited == {}
        # A key whose fetch here failed is not waited for: its pull came and went.
        failed = reg.open((JOB, 0, 3), 0, 10)
        reg.close(failed)
        t0 = loop.time()
        assert await reg.opened((JOB, 0, 3), 5.0) is None and loop.time() - t0 < 1.0
        # A new pull for it (the center retried) opens it again, found at once.
        again = reg.open((JOB, 0, 3), 0, 10)
        assert (JOB, 0, 3) not in reg._failed
        assert await reg.opened((JOB, 0, 3), 5.0) is again
        reg.close(again, "cancelled")
        # A fetch that ended well is not remembered as failed.
        ok = reg.open((JOB, 0, 4), 0, 10)
        ok.progress(10)
        ok.succeed()
        reg.close(ok)
        assert (JOB, 0, 4) not in reg._failed and (JOB, 0, 3) in reg._failed

    run(main())


def test_a_waiter_asking_for_a_batch_sleeps_through_smaller_reads() -> None:
    async def main() -> None:
        a = Arrivals().open((JOB, 0, 0), 0, 1000)
        a.start()
        batch, small = a.changed(300), a.changed(50)
        a.progress(100)  # one socket read: wakes the small waiter only
        assert small.done() and not batch.done()
        a.progress(250)
        assert not batch.done()
        a.progress(301)
        assert batch.done()
        assert a.changed(301).done()  # already there: no wait at all
        # Past the held-back last byte only the end wakes a waiter...
        tail = a.changed(1000)
        a.progress(1000)
        assert a.available() == 999 and not tail.done()
        a.succeed()
        assert tail.done()
        # ...and a failure wakes every waiter, whatever it asked for.
        b = Arrivals().open((JOB, 0, 1), 0, 1000)
        w = b.changed(900)
        b.fail("reset")
        assert w.done()

    run(main())


# ---------------------------------------------------------------------- cut-through


def test_a_chunk_is_served_on_while_it_arrives(store_factory: StoreFactory,
                                               tmp_path: Path) -> None:
    """Upstream capped at 8 MiB/s, one 2 MiB chunk: the downstream's first bytes
    come while P is still receiving, its last only after P verified the chunk."""
    cs = 2 * MiB
    up = store_factory("up")
    snap, data = source(up, tmp_path, cs, cs)

    async def main() -> None:
        async with serving(up, limiter=RateLimiter(8 * MiB, burst=256 * 1024)) as (upstream, _), \
                daemon_p(tmp_path) as (d, p):
            assert d.beat().streams is True
            assert await d.pull(pull_request(snap, upstream, [0])) == 1
            arrival = d.arrivals.get((JOB, 0, 0))
            assert arrival is not None and arrival.length == cs
            p_end = asyncio.ensure_future(ended_at(arrival))
            down = Downstream(tmp_path, "a", cs)
            try:
                n = await down.fetch(p, 0, snap.chunks[0], arrival)
                assert n == cs and down.data() == data
                assert xxhash.xxh3_64(down.data()).hexdigest() == snap.chunks[0]
                # Cut-through: bytes flowed on before P had the whole chunk...
                assert down.first is not None and down.first[0] == RUNNING, down.first
                assert down.first[1] < cs // 2, down.first
                # ...but the body completed only after P verified it.
                assert arrival.state == OK
                p_ok = await p_end
                assert p_ok <= down.done_at
                # P counted the stream while it ran, and its fetch (which read
                # in the stream's batches meanwhile) let go of the arrival.
                assert down.streams == 1 and arrival.streams == 0
                assert arrival.on_stream is None
                # P took ~0.25 s; the downstream ended right behind it.
                assert down.done_at - down.first_at > 0.1
            finally:
                await down.close()
            await until(lambda: not d.active, "P's fetch to end")
            acks = list(d.acks)
            assert [(a.chunk, a.ok) for a in acks] == [(0, True)], acks
            assert len(d.arrivals) == 0
            assert d.serve_stats.streamed == 1 and d.serve_stats.zero_copy == 1
            assert d.serve_stats.bytes_served == cs and d.serve_stats.aborted == 0
            await until(lambda: d.store.writeback_bytes == cs, "the chunk to be written behind")
            st = await status(p)
            assert st["chunks_streamed"] == 1 and st["arriving"] == 0
            assert st["writeback_bytes"] == cs
            r = await tornado.httpclient.AsyncHTTPClient().fetch(f"http://{p}{P.METRICS}")
            assert b"fdship_chunks_streamed_total 1.0" in r.body
            wb = [ln for ln in r.body.decode().splitlines()
                  if ln.startswith("fdship_writeback_bytes_total ")]
            assert len(wb) == 1 and float(wb[0].split()[1]) == cs, wb
            # The capped upstream delivered the chunk over many socket reads.
            reads = d.pool.stats.reads
            assert reads >= 4 and st["data_wakeups"] == {
                "receive": reads, "send": d.serve_stats.send_waits}, st["data_wakeups"]
            assert f'fdship_data_wakeups_total{{direction="receive"}} {float(reads)}' in \
                r.body.decode()
            # Now held verified: served as ever, and not counted as streamed.
            again = Downstream(tmp_path, "b", cs)
            try:
                await again.fetch(p, 0, snap.chunks[0], None)
                assert again.data() == data
            finally:
                await again.close()
            assert d.serve_stats.streamed == 1 and d.serve_stats.chunks_served == 2

    run(main())


@pytest.mark.parametrize("fault", ["corrupt", "drop"])
def test_a_failing_upstream_fails_the_downstream_and_nobody_marks_the_chunk(
        store_factory: StoreFactory, tmp_path: Path, fault: str) -> None:
    cs = 2 * MiB
    up = store_factory("up")
    snap, _ = source(up, tmp_path, cs, cs)

    async def main() -> None:
        async with serving(up, limiter=RateLimiter(8 * MiB, burst=256 * 1024),
                           fault=f"{fault}=1") as (upstream, upstats), \
                daemon_p(tmp_path) as (d, p):
            assert await d.pull(pull_request(snap, upstream, [0])) == 1
            arrival = d.arrivals.get((JOB, 0, 0))
            assert arrival is not None
            await until(lambda: arrival.written > 0, "P's first bytes")
            down = Downstream(tmp_path, "a", cs)
            try:
                with pytest.raises(FetchError) as err:
                    await down.fetch(p, 0, snap.chunks[0], arrival)
                # A short body: P hung up, it did not hand over a bad chunk.
                assert err.value.kind == FAIL_CONNECT, err.value
                assert "closed the connection after" in str(err.value)
                assert down.first is not None and down.first[0] == RUNNING
            finally:
                await down.close()
            await until(lambda: not d.active, "P's fetch to end")
            assert upstats.faults_injected == 1
            acks = list(d.acks)
            assert len(acks) == 1 and not acks[0].ok
            assert acks[0].kind == (FAIL_HASH if fault == "corrupt" else FAIL_CONNECT), acks
            assert arrival.state == FAILED and len(d.arrivals) == 0
            st = d.store.staging(JOB, 0)
            assert st is not None and st.verified == {}
            assert d.store.open_chunk(JOB, 0, 0) is None
            assert d.serve_stats.aborted == 1 and d.serve_stats.streamed == 0
            assert d.serve_stats.uploads_in_flight == 0
            # Once the arrival is gone, the chunk is simply not here.
            late = Downstream(tmp_path, "b", cs)
            try:
                with pytest.raises(FetchError) as err:
                    await late.fetch(p, 0, snap.chunks[0], None)
                assert err.value.kind == FAIL_MISSING
            finally:
                await late.close()

    run(main())


def test_a_get_while_the_pull_waits_for_a_slot_waits_then_streams(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    """One fetch slot, two 1 MiB chunks at 8 MiB/s: chunk 1 is pending while chunk 0
    arrives; a GET for it waits, then streams.  A chunk neither held nor arriving
    is refused with 404 as before."""
    cs = MiB
    up = store_factory("up")
    snap, data = source(up, tmp_path, 3 * cs, cs)

    async def main() -> None:
        async with serving(up, limiter=RateLimiter(8 * MiB, burst=256 * 1024)) as (upstream, _), \
                daemon_p(tmp_path, max_downloads="1") as (d, p):
            assert await d.pull(pull_request(snap, upstream, [0, 1])) == 2
            a0, a1 = d.arrivals.get((JOB, 0, 0)), d.arrivals.get((JOB, 0, 1))
            assert a0 is not None and a1 is not None
            # Registered with the pull, before either task ran.
            assert a0.state == PENDING and a1.state == PENDING
            await until(lambda: a0.written > 0, "chunk 0's first bytes")
            assert a1.state == PENDING
            down = Downstream(tmp_path, "a", cs)
            missing = Downstream(tmp_path, "m", cs)
            try:
                task = asyncio.ensure_future(down.fetch(p, 1, snap.chunks[1], a1))
                await asyncio.sleep(0.05)
                assert not task.done() and a1.state == PENDING and down.first is None
                assert d.serve_stats.uploads_in_flight == 1  # the GET is waiting
                # Chunk 2 was never pulled: 404, as today.
                with pytest.raises(FetchError) as err:
                    await missing.fetch(p, 2, snap.chunks[2], None)
                assert err.value.kind == FAIL_MISSING and "not held verified" in str(err.value)
                assert d.serve_stats.not_found == 1
                assert await task == cs
                assert down.data() == data[cs:2 * cs]
                assert down.first is not None and down.first[0] == RUNNING, down.first
                assert a1.state == OK
            finally:
                await down.close()
                await missing.close()
            await until(lambda: not d.active, "P's fetches to end")
            assert sorted((a.chunk, a.ok) for a in d.acks) == [(0, True), (1, True)]
            assert d.serve_stats.streamed == 1 and len(d.arrivals) == 0

    run(main())


def test_a_get_that_beats_the_relays_own_pull_waits_for_it(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    """The center sends P's pull of a chunk and the downstream's pull naming P as its
    relay together; the downstream's GET can reach P first.  Marked ``arriving`` it
    waits for P's pull and streams; unmarked, or marked for a chunk whose pull never
    comes (within the stall timeout), it is refused with 404."""
    cs = MiB
    up = store_factory("up")
    snap, data = source(up, tmp_path, 3 * cs, cs)

    async def main() -> None:
        async with serving(up, limiter=RateLimiter(16 * MiB, burst=256 * 1024)) as (upstream,
                                                                                   _), \
                daemon_p(tmp_path, fetch_stall_timeout="0.5") as (d, p):
            early = Downstream(tmp_path, "early", cs)
            plain = Downstream(tmp_path, "plain", cs)
            never = Downstream(tmp_path, "never", cs)
            try:
                # Before any pull: an unmarked request is refused at once.
                with pytest.raises(FetchError) as err:
                    await plain.fetch(p, 0, snap.chunks[0], None)
                assert err.value.kind == FAIL_MISSING and "not held verified" in str(err.value)
                task = asyncio.ensure_future(early.fetch(p, 0, snap.chunks[0], None,
                                                         arriving=True))
                await until(lambda: d.serve_stats.awaited_pulls == 1, "the GET to wait")
                await asyncio.sleep(0.1)
                assert not task.done() and early.first is None
                # P's own pull comes late, but within the wait.
                assert await d.pull(pull_request(snap, upstream, [0])) == 1
                assert await task == cs
                assert early.data() == data[:cs]
                assert d.serve_stats.streamed == 1
                # Marked, but P never pulls chunk 2: refused once the wait is over,
                # bounded by the stall timeout (0.5 s), not held forever.
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                with pytest.raises(FetchError) as err:
                    await never.fetch(p, 2, snap.chunks[2], None, arriving=True)
                assert err.value.kind == FAIL_MISSING
                assert 0.4 < loop.time() - t0 < 5.0
                assert d.serve_stats.awaited_pulls == 2 and d.serve_stats.not_found == 2
                st = await status(p)
                assert st["downloads_before_pull"] == 2
                assert st["downloads_before_commit"] == 0  # P submitted nothing
            finally:
                for ds in (early, plain, never):
                    await ds.close()
            await until(lambda: not d.active, "P's fetch to end")
            assert [(a.chunk, a.ok) for a in d.acks] == [(0, True)]
            assert d.arrivals._awaited == {}

    run(main())


def test_a_marked_get_after_the_relays_own_fetch_failed_is_refused_at_once(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    """P's pull came and its fetch failed (nothing listens where its upstream
    should be): a downstream's GET marked ``arriving`` for that chunk, sent by a
    center that had not heard of the failure yet, is refused at once.  It used
    to wait out the whole bound (5 s, or the stall timeout) for a pull that had
    already come and gone, holding the downstream's link idle."""
    cs = 256 * 1024
    up = store_factory("up")
    snap, _ = source(up, tmp_path, 2 * cs, cs)

    async def main() -> None:
        async with daemon_p(tmp_path, fetch_stall_timeout="30") as (d, p):
            down = Downstream(tmp_path, "late", cs)
            try:
                assert await d.pull(pull_request(snap, "127.0.0.1:9", [1], "gone")) == 1
                await until(lambda: not d.active, "P's fetch to fail")
                assert [(a.chunk, a.ok) for a in d.acks] == [(1, False)]
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                with pytest.raises(FetchError) as err:
                    await down.fetch(p, 1, snap.chunks[1], None, arriving=True)
                assert err.value.kind == FAIL_MISSING
                assert loop.time() - t0 < 2.0  # not the 5 s bound
            finally:
                await down.close()

    run(main())


def test_a_replaced_fetch_aborts_its_streams_and_the_replacement_serves(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    """The center moves a chunk P is fetching to another peer: the old fetch is
    cancelled, streams of its bytes hang up, the new fetch registers afresh."""
    cs = 2 * MiB
    up = store_factory("up")
    snap, data = source(up, tmp_path, cs, cs)

    async def main() -> None:
        async with serving(up, limiter=RateLimiter(8 * MiB, burst=256 * 1024)) as (slow, _), \
                serving(up) as (fast, _), daemon_p(tmp_path) as (d, p):
            assert await d.pull(pull_request(snap, slow, [0], peer_name="slow")) == 1
            old = d.arrivals.get((JOB, 0, 0))
            assert old is not None
            await until(lambda: old.written > 0, "the first fetch's first bytes")
            down = Downstream(tmp_path, "a", cs)
            try:
                task = asyncio.ensure_future(down.fetch(p, 0, snap.chunks[0], old))
                await until(lambda: down.first is not None, "the stream's first bytes")
                assert await d.pull(pull_request(snap, fast, [0], peer_name="fast")) == 1
                new = d.arrivals.get((JOB, 0, 0))
                assert new is not None and new is not old and old.state == FAILED
                with pytest.raises(FetchError) as err:
                    await task
                assert err.value.kind == FAIL_CONNECT
            finally:
                await down.close()
            await until(lambda: not d.active, "the replacement to end")
            assert new.state == OK and len(d.arrivals) == 0
            assert [(a.peer, a.ok) for a in d.acks] == [("fast", True)]
            assert os.pread(d.store.staging(JOB, 0).write_fd, cs, 0) == data  # type: ignore

    run(main())


# ---------------------------------------------------------------------- the handler alone


def test_streaming_over_tls_uses_the_buffered_path(store_factory: StoreFactory,
                                                   tmp_path: Path) -> None:
    """TLS cannot sendfile: the stream reads only the written span with pread."""
    import ssl

    from tests.security.conftest import make_pki

    pki = make_pki(str(tmp_path / "pki"))
    cs = MiB
    up, mid = store_factory("up"), store_factory("mid")
    snap, data = source(up, tmp_path, cs, cs)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.cert, pki.key)
    client_ctx = ssl.create_default_context(cafile=pki.ca)

    async def main() -> None:
        arrivals = Arrivals()
        st = mid.open_staging(JOB, 0, "/out.bin", snap.size, snap.xxh3, cs)
        key = (JOB, 0, 0)
        arrival = arrivals.open(key, 0, cs)
        async with serving(up, limiter=RateLimiter(8 * MiB, burst=128 * 1024)) as (upstream, _), \
                serving(mid, server_kw={"ssl_options": server_ctx}, arrivals=arrivals) \
                as (p, stats):
            fetcher = PeerPool()

            async def fetch_into_mid() -> None:
                arrival.start()
                await fetcher.fetch(upstream, JOB, 0, 0, cs, snap.chunks[0], st.write_fd, 0,
                                    20.0, on_progress=arrival.progress)
                st.mark_chunk(0, snap.chunks[0])
                arrival.succeed()
                arrivals.close(arrival)

            inbound = asyncio.ensure_future(fetch_into_mid())
            down = Downstream(tmp_path, "a", cs)
            down.pool = PeerPool(ssl=client_ctx)
            try:
                assert await down.fetch(p, 0, snap.chunks[0], arrival) == cs
                assert down.data() == data
                assert down.first is not None and down.first[0] == RUNNING
            finally:
                await down.close()
                await inbound
                await fetcher.close()
            assert stats.buffered == 1 and stats.zero_copy == 0 and stats.streamed == 1
            assert stats.bytes_served == cs

    run(main())


@pytest.mark.parametrize("written", [0, 300 * 1024])
def test_a_stream_without_progress_is_aborted_after_the_stall_timeout(
        store_factory: StoreFactory, tmp_path: Path, written: int) -> None:
    """Nothing (pending) or part of the chunk arrived, then nothing more: the GET
    hangs up after the handler's stall timeout, well before the client's own."""
    cs = MiB
    mid = store_factory("mid")
    body = os.urandom(cs)

    async def main() -> None:
        arrivals = Arrivals()
        st = mid.open_staging(JOB, 0, "/out.bin", cs, xxhash.xxh3_64(body).hexdigest(), cs)
        arrival = arrivals.open((JOB, 0, 0), 0, cs)
        if written:
            os.pwrite(st.write_fd, body[:written], 0)
            arrival.start()
            arrival.progress(written)
        async with serving(mid, arrivals=arrivals, stall_timeout=0.3) as (p, stats):
            down = Downstream(tmp_path, "a", cs)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            try:
                with pytest.raises(FetchError) as err:
                    await down.fetch(p, 0, xxhash.xxh3_64(body).hexdigest(), arrival)
                took = loop.time() - t0
                assert down.data() == body[:written]
            finally:
                await down.close()
            assert err.value.kind == FAIL_CONNECT, err.value
            assert f"after {written} of {cs} body bytes" in str(err.value)
            assert 0.25 <= took < 5.0, took
            await until(lambda: stats.uploads_in_flight == 0, "the handler to end")
            assert stats.aborted == 1 and stats.streamed == 0

    run(main())


def test_a_slow_but_steady_arrival_is_not_a_stall(store_factory: StoreFactory,
                                                  tmp_path: Path) -> None:
    """Pieces every 0.1 s under a 0.5 s stall timeout: every wait ends in progress,
    and the stream completes once the arrival succeeds."""
    cs = 256 * 1024
    piece = 32 * 1024
    mid = store_factory("mid")
    body = os.urandom(cs)
    h = xxhash.xxh3_64(body).hexdigest()

    async def main() -> None:
        arrivals = Arrivals()
        st = mid.open_staging(JOB, 0, "/out.bin", cs, h, cs)
        arrival = arrivals.open((JOB, 0, 0), 0, cs)

        async def trickle() -> None:
            arrival.start()
            for off in range(0, cs, piece):
                await asyncio.sleep(0.1)
                os.pwrite(st.write_fd, body[off:off + piece], off)
                arrival.progress(off + piece)
            st.mark_chunk(0, h)
            arrival.succeed()
            arrivals.close(arrival)

        async with serving(mid, arrivals=arrivals, stall_timeout=0.5) as (p, stats):
            writer = asyncio.ensure_future(trickle())
            down = Downstream(tmp_path, "a", cs)
            try:
                assert await down.fetch(p, 0, h, arrival) == cs
                assert down.data() == body
            finally:
                await down.close()
                await writer
            assert stats.streamed == 1 and stats.aborted == 0 and stats.zero_copy == 1

    run(main())


def test_a_downstream_that_hangs_up_frees_the_waiting_stream_at_once(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    """The peer goes away while its GET waits for bytes: the handler ends now,
    not when the (long) stall timeout runs out."""
    cs = MiB
    mid = store_factory("mid")

    async def main() -> None:
        arrivals = Arrivals()
        mid.open_staging(JOB, 0, "/out.bin", cs, "0" * 16, cs)
        arrivals.open((JOB, 0, 0), 0, cs)
        async with serving(mid, arrivals=arrivals, stall_timeout=30.0) as (p, stats):
            host, port = p.split(":")
            rd, wr = await asyncio.open_connection(host, int(port))
            wr.write(f"GET {P.DAEMON_DOWNLOAD}?job={JOB}&file=0&chunk=0 HTTP/1.1\r\n"
                     "Host: x\r\n\r\n".encode())
            head = await asyncio.wait_for(rd.readuntil(b"\r\n\r\n"), 5.0)
            # The headers come at once, with the whole chunk's length.
            assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {cs}".encode() in head
            assert stats.uploads_in_flight == 1
            wr.close()
            await until(lambda: stats.uploads_in_flight == 0, "the handler to end", limit=5.0)
            assert stats.aborted == 1 and stats.bytes_served == 0

    run(main())


def test_a_delta_request_for_a_chunk_still_arriving_waits_for_it(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    """A downstream holding an old copy asks P for block sums of a chunk P is
    still fetching: the answer waits until P verified it, and the downstream
    rebuilds the chunk from its old copy instead of fetching it whole."""
    cs = 2 * MiB
    up = store_factory("up")
    snap, data = source(up, tmp_path, cs, cs)
    old = bytearray(data)
    for off in range(0, cs, 512 * 1024):
        old[off + 100] ^= 0xFF  # four small edits
    old_path = tmp_path / "old.bin"
    old_path.write_bytes(bytes(old))

    async def main() -> None:
        async with serving(up, limiter=RateLimiter(8 * MiB, burst=256 * 1024)) as (upstream, _), \
                daemon_p(tmp_path) as (d, p):
            assert await d.pull(pull_request(snap, upstream, [0])) == 1
            arrival = d.arrivals.get((JOB, 0, 0))
            assert arrival is not None
            await until(lambda: arrival.written > 0, "P's first bytes")
            delta = DeltaFetcher()
            out = os.open(tmp_path / "rebuilt.bin", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                got = await delta.fetch(JOB, P.Fetch(file=0, chunk=0, offset=0, size=cs,
                                                     xxh3=snap.chunks[0], peer=p,
                                                     peer_name="p"),
                                        str(old_path), out, 20.0)
                assert arrival.state == OK  # answered only once P had the chunk
                assert got is not None and got.ok and not got.local, got
                assert 0 < got.nbytes < cs // 10, got
                assert os.pread(out, cs + 1, 0) == data
            finally:
                os.close(out)
            assert delta.stats.chunks_patched == 1

    run(main())
