"""Serve -> fetch -> pack over real loopback sockets.

Covers the zero-copy serving path and its reliance on Tornado internals, the
lean fetch client's failure kinds, keep-alive reuse, timeouts, fault
injection, TLS fallback, rate caps, and a 1 GiB round trip in bounded memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest
import tornado.httpclient
import tornado.http1connection

from fdship.daemon.fetch import FetchError, PeerPool
from fdship.daemon.ratelimit import RateLimiter
from fdship.daemon.serve import DownloadHandler, ServeStats, Submissions, parse_fault
from fdship.daemon.store import PackResult, Snapshot, Store
from fdship.errors import ConfigError, IntegrityError
from fdship.protocol import (DAEMON_DOWNLOAD, FAIL_CONNECT, FAIL_HASH, FAIL_HTTP, FAIL_LOCAL,
                             FAIL_MISSING, FAIL_TIMEOUT)
from tests.daemon.conftest import CS, run, serving, write_random

StoreFactory = Callable[..., Store]
REPO = Path(__file__).resolve().parents[2]


def source(store: Store, tmp_path: Path, size: int, job: str = "job1", seed: int = 1,
           cs: int = CS) -> tuple[Snapshot, bytes]:
    src = tmp_path / f"src-{job}-{size}.bin"
    data = write_random(src, size, seed)
    snap = store.snapshot(str(src), cs)
    store.commit_snapshots(job, [snap.key])
    return snap, data


async def ship(dst: Store, pool: PeerPool, peer: str, job: str, snap: Snapshot,
               dest: str = "/srv/out.bin") -> PackResult:
    """What the integrator's pull + pack handling does, chunk by chunk."""
    st = dst.open_staging(job, 0, dest, snap.size, snap.xxh3, snap.chunk_size)
    for c, h in enumerate(snap.chunks):
        off, length = st.span(c)
        n = await pool.fetch(peer, job, 0, c, length, h, st.write_fd, off, 30.0)
        assert n == length
        st.mark_chunk(c, h)
    return await asyncio.to_thread(dst.pack, job, 0)


async def http_get(url: str, **kw: object) -> tornado.httpclient.HTTPResponse:
    client = tornado.httpclient.AsyncHTTPClient()
    return await client.fetch(url, raise_error=False, **kw)


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CS, 3 * CS, 3 * CS + 5])
def test_round_trip_is_byte_identical(store_factory: StoreFactory, tmp_path: Path,
                                      size: int) -> None:
    a, b = store_factory("a"), store_factory("b")
    snap, data = source(a, tmp_path, size)

    async def body() -> None:
        pool = PeerPool()
        async with serving(a) as (peer, stats):
            r = await ship(b, pool, peer, "job1", snap)
        await pool.close()
        assert Path(r.path).read_bytes() == data
        assert stats.bytes_served == size and stats.chunks_served == len(snap.chunks)
        assert stats.zero_copy == len(snap.chunks) and stats.buffered == 0
        assert pool.stats.bytes_received == size and pool.stats.failures == {}

    run(body())


def test_round_trip_default_chunk_size_and_relay(store_factory: StoreFactory,
                                                 tmp_path: Path) -> None:
    # a -> b, then b serves its staged-and-packed copy on to c.
    a, b, c = store_factory("a"), store_factory("b"), store_factory("c")
    cs = 4 * 1024 * 1024
    snap, data = source(a, tmp_path, 2 * cs + 12345, cs=cs)

    async def body() -> None:
        pool = PeerPool()
        async with serving(a) as (pa, _), serving(b) as (pb, sb):
            await ship(b, pool, pa, "job1", snap)
            r = await ship(c, pool, pb, "job1", snap, dest="/other/place.bin")
        await pool.close()
        assert Path(r.path).read_bytes() == data
        assert sb.bytes_served == len(data)

    run(body())


def test_source_edited_after_snapshot_serves_snapshot_bytes(store_factory: StoreFactory,
                                                            tmp_path: Path) -> None:
    a, b = store_factory("a"), store_factory("b")
    snap, data = source(a, tmp_path, 2 * CS)
    Path(snap.path).write_bytes(b"edited!" * 1000)

    async def body() -> None:
        pool = PeerPool()
        async with serving(a) as (peer, _):
            r = await ship(b, pool, peer, "job1", snap)
        await pool.close()
        assert Path(r.path).read_bytes() == data

    run(body())


# --- HTTP behaviour --------------------------------------------------------------------------


class _ProbeHandler(DownloadHandler):
    seen_attr: list[bool] = []

    def prepare(self) -> None:
        super().prepare()
        _ProbeHandler.seen_attr.append(
            hasattr(self.request.connection, "_expected_content_remaining"))


def _read_response(f) -> tuple[int, dict[str, str], bytes]:
    status = int(f.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, f.read(int(headers["content-length"]))


def test_zero_copy_keep_alive_survives_tornado(store_factory: StoreFactory,
                                               tmp_path: Path) -> None:
    """Fails if a Tornado upgrade breaks the sendfile + Content-Length bookkeeping."""
    # The private attribute the handler credits the sendfile bytes to.
    assert "_expected_content_remaining" in \
        tornado.http1connection.HTTP1Connection.__init__.__code__.co_names or \
        "_expected_content_remaining" in open(tornado.http1connection.__file__).read()
    a = store_factory("a")
    snap, data = source(a, tmp_path, 3 * CS + 17)
    _ProbeHandler.seen_attr = []

    def client(port: int) -> list[tuple[int, dict[str, str], bytes]]:
        out = []
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            f = s.makefile("rb")
            for chunk in (2, 0, 3, 1):  # four requests, one connection
                s.sendall(f"GET {DAEMON_DOWNLOAD}?job=job1&file=0&chunk={chunk} HTTP/1.1\r\n"
                          "Host: x\r\n\r\n".encode())
                out.append(_read_response(f))
        return out

    async def body() -> None:
        import tornado.httpserver
        import tornado.netutil
        import tornado.web

        stats = ServeStats()
        app = tornado.web.Application([(DAEMON_DOWNLOAD, _ProbeHandler,
                                        dict(store=a, stats=stats))])
        server = tornado.httpserver.HTTPServer(app)
        socks = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server.add_sockets(socks)
        try:
            got = await asyncio.to_thread(client, socks[0].getsockname()[1])
        finally:
            server.stop()
            await server.close_all_connections()
        for (status, headers, bodyb), chunk in zip(got, (2, 0, 3, 1)):
            assert status == 200
            assert headers.get("connection", "").lower() != "close"
            assert bodyb == data[chunk * CS:(chunk + 1) * CS]
        assert _ProbeHandler.seen_attr == [True] * 4
        assert stats.zero_copy == 4 and stats.buffered == 0

    run(body())


def test_pool_reuses_one_connection(store_factory: StoreFactory, tmp_path: Path) -> None:
    a, b = store_factory("a"), store_factory("b")
    snap, data = source(a, tmp_path, 20 * CS)

    async def body() -> None:
        pool = PeerPool()
        async with serving(a) as (peer, _):
            r = await ship(b, pool, peer, "job1", snap)
        assert Path(r.path).read_bytes() == data
        assert pool.stats.connections_opened == 1
        assert pool.stats.connections_reused == 19
        assert pool.idle_count(peer) <= 1
        await pool.close()
        assert pool.idle_count() == 0

    run(body())


def test_unknown_chunk_is_404_and_bad_params_400(store_factory: StoreFactory,
                                                 tmp_path: Path) -> None:
    a = store_factory("a")
    source(a, tmp_path, 2 * CS)

    async def body() -> None:
        async with serving(a) as (peer, stats):
            base = f"http://{peer}{DAEMON_DOWNLOAD}"
            for q in ("job=job1&file=0&chunk=2", "job=job1&file=1&chunk=0",
                      "job=nope&file=0&chunk=0"):
                r = await http_get(f"{base}?{q}")
                assert r.code == 404, q
                assert "not held verified" in json.loads(r.body)["error"]
            for q in ("job=job1&file=x&chunk=0", "job=job1&file=0", "file=0&chunk=0",
                      "job=../etc&file=0&chunk=0", "job=job1&file=-1&chunk=0"):
                r = await http_get(f"{base}?{q}")
                assert r.code == 400, q
                assert json.loads(r.body)["error"]
            pool = PeerPool()
            with pytest.raises(FetchError) as ei:
                await pool.fetch(peer, "job1", 0, 9, CS, "0" * 16, os.open(os.devnull,
                                 os.O_WRONLY), 0, 5.0)
            assert ei.value.kind == FAIL_MISSING and "404" in str(ei.value)
            await pool.close()
        assert stats.not_found == 4

    run(body())


def test_a_request_while_the_source_awaits_the_centers_answer_waits_for_the_commit(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    """The center pulls as it accepts a job, so a target's request can reach the
    source before the source has committed its snapshot under the job's id.
    While a submission is in flight such a request waits and is served; with
    none in flight, or for a chunk the submission does not bring, it is
    refused (404) as soon as the submission ends."""
    a = store_factory("a")
    src = tmp_path / "early.bin"
    data = write_random(src, 2 * CS, 3)
    snap = a.snapshot(str(src), CS)
    subs = Submissions()

    async def body() -> None:
        loop = asyncio.get_running_loop()
        async with serving(a, submissions=subs) as (peer, stats):
            pool = PeerPool()
            fd = os.open(tmp_path / "got.bin", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                # Nothing in flight: refused at once, as ever.
                with pytest.raises(FetchError) as ei:
                    await pool.fetch(peer, "job9", 0, 0, CS, snap.chunks[0], fd, 0, 5.0)
                assert ei.value.kind == FAIL_MISSING

                async def submit() -> None:
                    with subs.pending():
                        await asyncio.sleep(0.3)  # the center's answer on its way
                        a.commit_snapshots("job9", [snap.key])

                sub = asyncio.ensure_future(submit())
                await asyncio.sleep(0.05)
                t0 = loop.time()
                n = await pool.fetch(peer, "job9", 0, 1, CS, snap.chunks[1], fd, 0, 5.0)
                assert n == CS and os.pread(fd, CS, 0) == data[CS:]
                assert 0.15 < loop.time() - t0 < 4.0  # served once committed
                await sub
                assert stats.awaited_submissions == 1

                async def refused() -> None:
                    with subs.pending():
                        await asyncio.sleep(0.2)  # the center refused the job

                sub = asyncio.ensure_future(refused())
                await asyncio.sleep(0.05)
                t0 = loop.time()
                with pytest.raises(FetchError) as ei:
                    await pool.fetch(peer, "job8", 0, 0, CS, snap.chunks[0], fd, 0, 10.0)
                assert ei.value.kind == FAIL_MISSING
                assert loop.time() - t0 < 2.0  # at the end of the submission, not the 5 s bound
                await sub
            finally:
                os.close(fd)
                await pool.close()

    run(body())


def test_token_is_required_when_configured(store_factory: StoreFactory,
                                           tmp_path: Path) -> None:
    a, b = store_factory("a"), store_factory("b")
    snap, data = source(a, tmp_path, CS)

    async def body() -> None:
        async with serving(a, settings={"fdship_token": "s3cret"}) as (peer, _):
            anon = PeerPool()
            st = b.open_staging("job1", 0, "/srv/out.bin", snap.size, snap.xxh3, CS)
            with pytest.raises(FetchError) as ei:
                await anon.fetch(peer, "job1", 0, 0, CS, snap.chunks[0], st.write_fd, 0, 5.0)
            assert ei.value.kind == FAIL_HTTP and "401" in str(ei.value)
            assert "token" in str(ei.value)
            await anon.close()
            pool = PeerPool(token="s3cret")
            r = await ship(b, pool, peer, "job1", snap)
            await pool.close()
        assert Path(r.path).read_bytes() == data

    run(body())


# --- failures seen by the fetcher -------------------------------------------------------------


def test_corrupt_fault_is_caught_and_nothing_installed(store_factory: StoreFactory,
                                                       tmp_path: Path) -> None:
    a, b = store_factory("a"), store_factory("b")
    snap, _ = source(a, tmp_path, 2 * CS)

    async def body() -> None:
        pool = PeerPool()
        async with serving(a, fault="corrupt=1.0") as (peer, stats):
            st = b.open_staging("job1", 0, "/srv/out.bin", snap.size, snap.xxh3, CS)
            for c, h in enumerate(snap.chunks):
                off, length = st.span(c)
                with pytest.raises(FetchError) as ei:
                    await pool.fetch(peer, "job1", 0, c, length, h, st.write_fd, off, 10.0)
                assert ei.value.kind == FAIL_HASH
                assert peer in str(ei.value) and h in str(ei.value)
            assert stats.faults_injected == 2 and stats.buffered == 2
        await pool.close()
        assert pool.stats.failures == {FAIL_HASH: 2} and pool.stats.chunks_ok == 0
        assert b.inventory()[0].chunks == ()
        with pytest.raises(IntegrityError):
            await asyncio.to_thread(b.pack, "job1", 0)
        assert not os.path.exists(st.final_path)

    run(body())


def test_partial_corruption_only_fails_bad_chunks(store_factory: StoreFactory,
                                                  tmp_path: Path) -> None:
    a, b = store_factory("a"), store_factory("b")
    snap, data = source(a, tmp_path, 30 * CS)

    async def body() -> None:
        pool = PeerPool()
        kinds = []
        async with serving(a, fault="corrupt=0.5") as (peer, stats):
            st = b.open_staging("job1", 0, "/srv/out.bin", snap.size, snap.xxh3, CS)
            for c, h in enumerate(snap.chunks):
                off, length = st.span(c)
                try:
                    await pool.fetch(peer, "job1", 0, c, length, h, st.write_fd, off, 10.0)
                    kinds.append("ok")
                    assert os.pread(st.write_fd, length, off) == data[off:off + length]
                except FetchError as e:
                    kinds.append(e.kind)
        await pool.close()
        assert set(kinds) == {"ok", FAIL_HASH}  # P(all alike) = 2 * 0.5**30
        assert kinds.count(FAIL_HASH) == stats.faults_injected
        # A connection that saw a hash mismatch was never reused.
        assert pool.stats.connections_opened >= kinds.count(FAIL_HASH)

    run(body())


def test_drop_fault_is_a_connection_failure(store_factory: StoreFactory,
                                            tmp_path: Path) -> None:
    a, b = store_factory("a"), store_factory("b")
    snap, _ = source(a, tmp_path, 2 * CS)

    async def body() -> None:
        pool = PeerPool()
        async with serving(a, fault="drop=1.0") as (peer, stats):
            st = b.open_staging("job1", 0, "/x", snap.size, snap.xxh3, CS)
            with pytest.raises(FetchError) as ei:
                await pool.fetch(peer, "job1", 0, 0, CS, snap.chunks[0], st.write_fd, 0, 10.0)
            assert ei.value.kind == FAIL_CONNECT
            assert f"after {CS // 2} of {CS} body bytes" in str(ei.value)
            for _ in range(100):
                if stats.uploads_in_flight == 0:
                    break
                await asyncio.sleep(0.01)
            assert stats.aborted == 1 and stats.uploads_in_flight == 0
        await pool.close()
        assert pool.idle_count() == 0

    run(body())


def test_fault_spec_is_validated() -> None:
    assert parse_fault("") == ("", 0.0)
    assert parse_fault("drop=0.25") == ("drop", 0.25)
    for bad in ("corrupt", "explode=0.1", "drop=2", "drop=x"):
        with pytest.raises(ConfigError):
            parse_fault(bad)


def test_connection_refused(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()

    async def body() -> None:
        pool = PeerPool()
        with pytest.raises(FetchError) as ei:
            await pool.fetch(f"127.0.0.1:{port}", "j", 0, 0, 10, "0" * 16,
                             os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY), 0, 5.0)
        assert ei.value.kind == FAIL_CONNECT and f"127.0.0.1:{port}" in str(ei.value)
        assert pool.stats.failures == {FAIL_CONNECT: 1}
        await pool.close()

    run(body())


def test_silent_peer_times_out(tmp_path: Path) -> None:
    async def body() -> None:
        held: list[asyncio.StreamWriter] = []

        async def mute(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            held.append(w)  # accept, read the request, never answer

        server = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = PeerPool()
        t0 = time.monotonic()
        with pytest.raises(FetchError) as ei:
            await pool.fetch(f"127.0.0.1:{port}", "j", 0, 0, 10, "0" * 16,
                             os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY), 0, 0.3)
        assert ei.value.kind == FAIL_TIMEOUT and "0.3 s" in str(ei.value)
        assert time.monotonic() - t0 < 5
        await pool.close()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()

    run(body())


def test_receive_batch_wakes_once_per_batch_and_resets_for_the_next_response(
        tmp_path: Path) -> None:
    """SO_RCVLOWAT batches a dribbled body into few reads, lowers itself for a
    tail shorter than the batch, and is back to 1 before the connection's next
    response (else that small answer would wait for bytes that never come)."""
    import xxhash

    batch = 128 * 1024
    big = os.urandom(450 * 1024)  # 3 batches and a 66 KiB tail
    small = b"x" * 100
    piece = 16 * 1024

    async def body() -> None:
        async def dribble(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            for data in (big, small):
                await r.readuntil(b"\r\n\r\n")
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data))
                for i in range(0, len(data), piece):  # one piece per pause: a read each
                    w.write(data[i:i + piece])
                    await w.drain()
                    await asyncio.sleep(0.004)
            await r.read()  # until the client hangs up
            w.close()

        server = await asyncio.start_server(dribble, "127.0.0.1", 0)
        peer = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        reads = {}
        for rb in (0, batch):
            pool = PeerPool(receive_batch=rb)
            fd = os.open(tmp_path / f"out-{rb}", os.O_CREAT | os.O_RDWR)
            n = await pool.fetch(peer, "j", 0, 0, len(big), xxhash.xxh3_64(big).hexdigest(),
                                 fd, 0, 10.0)
            assert n == len(big) and os.pread(fd, len(big), 0) == big
            reads[rb] = pool.stats.reads
            # Same connection, a body far below the batch: must not hang.
            n = await pool.fetch(peer, "j", 0, 1, len(small),
                                 xxhash.xxh3_64(small).hexdigest(), fd, len(big), 3.0)
            assert n == len(small) and pool.stats.connections_reused == 1
            os.close(fd)
            await pool.close()
        # Unbatched, the 29 pieces of the big body mostly arrive as reads of their own.
        assert reads[0] >= 12, reads
        # Batched: one read per 128 KiB (the head arrives on its own), and the tail.
        assert reads[batch] <= len(big) // batch + 3, reads
        server.close()
        await server.wait_closed()

    run(body())


def test_a_peer_slower_than_the_batch_is_slow_not_stalled(tmp_path: Path) -> None:
    """Bytes held by the kernel below the wake-up batch are progress: a peer
    sending 2 KiB every 0.1 s outlives a 0.5 s stall timeout, and one that
    goes quiet is still caught."""
    import xxhash

    data = os.urandom(24 * 1024)

    async def body() -> None:
        async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            for _ in range(2):  # two requests on the kept-alive connection
                await r.readuntil(b"\r\n\r\n")
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data))
                for i in range(0, len(data), 2048):
                    if mute and i >= len(data) // 2:
                        await asyncio.sleep(5)  # goes quiet halfway
                    w.write(data[i:i + 2048])
                    await w.drain()
                    await asyncio.sleep(0.1)
            w.close()

        server = await asyncio.start_server(slow, "127.0.0.1", 0)
        peer = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        pool = PeerPool(receive_batch=128 * 1024, stall_timeout=0.5)
        fd = os.open(tmp_path / "out", os.O_CREAT | os.O_RDWR)
        h = xxhash.xxh3_64(data).hexdigest()
        n = await pool.fetch(peer, "j", 0, 0, len(data), h, fd, 0, 10.0)
        assert n == len(data) and os.pread(fd, len(data), 0) == data
        assert pool.stats.reads <= 3  # it did wait for the whole (sub-batch) body
        mute.append(True)
        with pytest.raises(FetchError) as ei:
            await pool.fetch(peer, "j", 0, 0, len(data), h, fd, 0, 10.0)
        assert ei.value.kind == FAIL_TIMEOUT and "sent no byte for 0.5 s (after 12288 of " \
            "24576 body bytes)" in str(ei.value), ei.value
        os.close(fd)
        await pool.close()
        server.close()
        await server.wait_closed()

    mute: list[bool] = []
    run(body())


def test_a_chunk_streamed_on_is_read_in_the_streams_batches(tmp_path: Path) -> None:
    """Once a peer streams the arriving chunk from here, the fetch wakes on the
    streams' 64 KiB batches, not its own larger ones: at once when the stream
    starts, and the arrival forgets the fetch when it ends."""
    import xxhash

    from fdship.daemon.arrivals import RELAY_BATCH, Arrival

    data = os.urandom(640 * 1024)
    piece = 16 * 1024
    relay = Arrival(("j", 0, 0), 0, len(data))
    seen: list[int] = []

    def lowat() -> int:
        conn = relay.on_stream.func.__self__  # type: ignore[union-attr]
        return conn._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)

    async def body() -> None:
        async def dribble(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data))
            for i in range(0, len(data), piece):
                if i == 4 * piece:
                    seen.append(lowat())  # batched alone
                    relay.stream_started()  # a peer starts streaming it from "us"
                    seen.append(lowat())
                w.write(data[i:i + piece])
                await w.drain()
                await asyncio.sleep(0.004)
            await r.read()
            w.close()

        server = await asyncio.start_server(dribble, "127.0.0.1", 0)
        pool = PeerPool(receive_batch=256 * 1024)
        fd = os.open(tmp_path / "out", os.O_CREAT | os.O_RDWR)
        n = await pool.fetch(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", "j", 0, 0,
                             len(data), xxhash.xxh3_64(data).hexdigest(), fd, 0, 10.0,
                             on_progress=relay.progress, relay=relay)
        assert n == len(data) and os.pread(fd, len(data), 0) == data
        assert relay.on_stream is None  # the fetch is over: nothing to tell any more
        os.close(fd)
        await pool.close()
        server.close()
        await server.wait_closed()
        # 10 pieces in the last one with streams: at least 6 reads of 64 KiB or less.
        assert pool.stats.reads >= 6, pool.stats.reads

    run(body())
    assert seen == [256 * 1024, RELAY_BATCH]
    relay.stream_ended()
    assert relay.streams == 0


def test_wrong_size_is_an_http_failure(store_factory: StoreFactory, tmp_path: Path) -> None:
    a = store_factory("a")
    snap, _ = source(a, tmp_path, CS)

    async def body() -> None:
        pool = PeerPool()
        async with serving(a) as (peer, _):
            with pytest.raises(FetchError) as ei:
                await pool.fetch(peer, "job1", 0, 0, CS + 1, snap.chunks[0],
                                 os.open(tmp_path / "f", os.O_CREAT | os.O_WRONLY), 0, 5.0)
        assert ei.value.kind == FAIL_HTTP and "announced" in str(ei.value)
        await pool.close()

    run(body())


def test_disk_full_while_writing_is_local(store_factory: StoreFactory, tmp_path: Path,
                                          tmpfs: Callable[..., str]) -> None:
    a = store_factory("a")
    cs = 2 * 1024 * 1024
    snap, _ = source(a, tmp_path, cs, cs=cs)
    small = tmpfs("1m")
    target = os.path.join(small, "chunk.part")

    async def body() -> None:
        pool = PeerPool()
        fd = os.open(target, os.O_CREAT | os.O_RDWR)
        try:
            async with serving(a) as (peer, _):
                with pytest.raises(FetchError) as ei:
                    await pool.fetch(peer, "job1", 0, 0, cs, snap.chunks[0], fd, 0, 10.0)
        finally:
            os.close(fd)
        assert ei.value.kind == FAIL_LOCAL
        assert f"disk full writing {target}: 0 MiB free" == str(ei.value)
        await pool.close()

    run(body())


# --- the serving side under misbehaving peers -----------------------------------------------


def test_stalled_reader_does_not_hold_the_slot(store_factory: StoreFactory,
                                               tmp_path: Path) -> None:
    a = store_factory("a")
    cs = 64 * 1024 * 1024  # far more than loopback socket buffers absorb
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        f.truncate(cs)
    snap = a.snapshot(str(src), cs)
    a.commit_snapshots("job1", [snap.key])

    async def body() -> None:
        async with serving(a, write_timeout=0.5) as (peer, stats):
            host, port = peer.split(":")
            r, w = await asyncio.open_connection(host, int(port))
            w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            w.write(f"GET {DAEMON_DOWNLOAD}?job=job1&file=0&chunk=0 HTTP/1.1\r\n"
                    "Host: x\r\n\r\n".encode())
            for _ in range(500):  # never read; wait (bounded) for the server to give up
                if stats.aborted:
                    break
                await asyncio.sleep(0.02)
            assert stats.aborted == 1 and stats.uploads_in_flight == 0
            assert 0 < stats.bytes_served < cs
            w.close()
            # The server is still healthy for others.
            resp = await http_get(f"http://{peer}{DAEMON_DOWNLOAD}?job=job1&file=0&chunk=1")
            assert resp.code == 404

    run(body())


def test_peer_hanging_up_mid_chunk_frees_the_slot(store_factory: StoreFactory,
                                                  tmp_path: Path) -> None:
    a = store_factory("a")
    cs = 64 * 1024 * 1024
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        f.truncate(cs)
    snap = a.snapshot(str(src), cs)
    a.commit_snapshots("job1", [snap.key])

    async def body() -> None:
        async with serving(a, write_timeout=60) as (peer, stats):
            host, port = peer.split(":")
            r, w = await asyncio.open_connection(host, int(port))
            w.write(f"GET {DAEMON_DOWNLOAD}?job=job1&file=0&chunk=0 HTTP/1.1\r\n"
                    "Host: x\r\n\r\n".encode())
            await r.readexactly(1000)
            w.transport.abort()  # RST, not a polite close
            for _ in range(500):
                if stats.uploads_in_flight == 0:
                    break
                await asyncio.sleep(0.02)
            # Freed long before the 60 s write timeout.
            assert stats.uploads_in_flight == 0 and stats.aborted == 1

    run(body())


def test_idle_connection_closed_by_peer_is_retried(store_factory: StoreFactory,
                                                   tmp_path: Path) -> None:
    a, b = store_factory("a"), store_factory("b")
    snap, data = source(a, tmp_path, 2 * CS)

    async def body() -> None:
        pool = PeerPool()
        async with serving(a, server_kw={"idle_connection_timeout": 0.2}) as (peer, _):
            st = b.open_staging("job1", 0, "/x", snap.size, snap.xxh3, CS)
            await pool.fetch(peer, "job1", 0, 0, CS, snap.chunks[0], st.write_fd, 0, 5.0)
            await asyncio.sleep(0.6)  # the server closes the idle connection
            await pool.fetch(peer, "job1", 0, 1, CS, snap.chunks[1], st.write_fd, CS, 5.0)
        assert pool.stats.failures == {} and pool.stats.connections_opened == 2
        assert os.pread(st.write_fd, 2 * CS, 0) == data
        await pool.close()

    run(body())


def test_tls_uses_the_buffered_path(store_factory: StoreFactory, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    a = store_factory("a")
    snap, data = source(a, tmp_path, 3 * CS + 1)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def body() -> None:
        async with serving(a, server_kw={"ssl_options": ctx}) as (peer, stats):
            client = ssl.create_default_context()
            client.check_hostname = False
            client.verify_mode = ssl.CERT_NONE
            host, port = peer.split(":")
            rd, wr = await asyncio.open_connection(host, int(port), ssl=client)
            for chunk in (3, 0):
                wr.write(f"GET {DAEMON_DOWNLOAD}?job=job1&file=0&chunk={chunk} HTTP/1.1\r\n"
                         "Host: x\r\n\r\n".encode())
                head = await rd.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                length = int([ln for ln in head.split(b"\r\n")
                              if ln.lower().startswith(b"content-length")][0].split(b":")[1])
                assert await rd.readexactly(length) == data[chunk * CS:(chunk + 1) * CS]
            wr.close()
            assert stats.buffered == 2 and stats.zero_copy == 0

    run(body())


def test_rate_caps_on_both_sides(store_factory: StoreFactory, tmp_path: Path) -> None:
    a, b = store_factory("a"), store_factory("b")
    cs = 1024 * 1024
    snap, data = source(a, tmp_path, 4 * cs, cs=cs)
    up = RateLimiter(64 * 1024 * 1024, burst=256 * 1024)
    down = RateLimiter(64 * 1024 * 1024, burst=256 * 1024)

    async def body() -> None:
        pool = PeerPool(limiter=down)
        async with serving(a, limiter=up) as (peer, stats):
            r = await ship(b, pool, peer, "job1", snap)
        await pool.close()
        assert Path(r.path).read_bytes() == data
        # Every byte was paid for on both sides, and both buckets had to wait.
        assert up.bytes == len(data) and down.bytes == len(data)
        assert up.waits > 0 and down.waits > 0
        assert stats.zero_copy == 4

    run(body())


# --- one big file, bounded memory --------------------------------------------------------------

_BIG = textwrap.dedent("""
    import asyncio, json, os, random, resource, sys
    from fdship.daemon.fetch import PeerPool
    from fdship.daemon.store import Store
    from tests.daemon.conftest import file_xxh3, serving

    tmp = sys.argv[1]
    GiB, CS = 1 << 30, 4 << 20

    def rss_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    src = os.path.join(tmp, "big.bin")
    rng = random.Random(7)
    with open(src, "wb") as f:
        f.truncate(GiB)  # sparse, with random blocks sprinkled in
        for _ in range(64):
            f.seek(rng.randrange(GiB - 65536))
            f.write(rng.randbytes(65536))
        f.seek(GiB - 3)
        f.write(b"end")
    a = Store(os.path.join(tmp, "a"), "/"); a.open()
    b = Store(os.path.join(tmp, "b"), os.path.join(tmp, "root")); b.open()
    base = rss_mib()
    snap = a.snapshot(src, CS)
    a.commit_snapshots("big", [snap.key])
    after_snapshot = rss_mib()

    async def main():
        pool = PeerPool()
        async with serving(a) as (peer, stats):
            st = b.open_staging("big", 0, "/dst/big.bin", snap.size, snap.xxh3, CS)
            sem = asyncio.Semaphore(4)
            async def one(c, h):
                async with sem:
                    off, length = st.span(c)
                    await pool.fetch(peer, "big", 0, c, length, h, st.write_fd, off, 60)
                    st.mark_chunk(c, h)
            await asyncio.gather(*(one(c, h) for c, h in enumerate(snap.chunks)))
        await pool.close()
        return await asyncio.to_thread(b.pack, "big", 0)

    r = asyncio.run(main())
    print(json.dumps({"base": base, "after_snapshot": after_snapshot, "end": rss_mib(),
                      "src": file_xxh3(src), "snap": snap.xxh3, "dst": file_xxh3(r.path),
                      "size": os.path.getsize(r.path)}))
""")


def test_one_gib_round_trip_in_bounded_memory(tmp_path: Path) -> None:
    # A child process, so ru_maxrss (the peak) is this transfer's and nobody else's.
    t0 = time.monotonic()
    work = tmp_path / "big"
    work.mkdir()
    try:
        r = subprocess.run([sys.executable, "-c", _BIG, str(work)], capture_output=True,
                           text=True, cwd=REPO, timeout=280,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        shutil.rmtree(work, ignore_errors=True)  # 3 GiB: do not leave it to tmp retention
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["size"] == 1 << 30
    assert out["src"] == out["snap"] == out["dst"]
    # Peak RSS growth over the whole snapshot + serve + fetch + pack of 1 GiB.
    assert out["after_snapshot"] - out["base"] < 64, out
    assert out["end"] - out["base"] < 64, out
    print(f"1 GiB round trip: {time.monotonic() - t0:.1f} s, rss {out}")


def test_job_dropped_mid_upload_finishes_from_its_own_fd(store_factory: StoreFactory,
                                                          tmp_path: Path) -> None:
    # The store closes its cached fd on drop_job; an upload in progress holds a
    # dup and must still send the right bytes, never whatever reuses the number.
    a, b = store_factory("a"), store_factory("b")
    cs = 2 * 1024 * 1024
    snap, data = source(a, tmp_path, cs, cs=cs)
    slow = RateLimiter(8 * 1024 * 1024, burst=256 * 1024)

    async def body() -> None:
        pool = PeerPool()
        async with serving(a, limiter=slow) as (peer, stats):
            st = b.open_staging("job1", 0, "/x", snap.size, snap.xxh3, cs)
            task = asyncio.ensure_future(
                pool.fetch(peer, "job1", 0, 0, cs, snap.chunks[0], st.write_fd, 0, 10.0))
            for _ in range(500):
                if stats.bytes_served:
                    break
                await asyncio.sleep(0.005)
            assert 0 < stats.bytes_served < cs
            a.drop_job("job1")
            # Open files that may take over the closed fd numbers meanwhile.
            decoys = [os.open(tmp_path / f"decoy{i}", os.O_CREAT | os.O_RDWR) for i in range(4)]
            for d in decoys:
                os.write(d, b"\xee" * 4096)
            assert await task == cs
            for d in decoys:
                os.close(d)
            assert os.pread(st.write_fd, cs, 0) == data
            r = await http_get(f"http://{peer}{DAEMON_DOWNLOAD}?job=job1&file=0&chunk=0")
            assert r.code == 404
        await pool.close()

    run(body())
