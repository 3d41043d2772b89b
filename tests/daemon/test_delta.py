"""Delta fetches over real loopback sockets: old copy + block hashes + ranges.

A source store serves a new version of a file (``POST /daemon/delta`` and the
ordinary download); a target store holds the old version at the destination
and builds each chunk with :class:`DeltaFetcher`.  The tests check the bytes
that crossed the network, that nothing wrong is ever marked good (a chunk
that does not verify is reported not ok, for a full fetch), and the peer
handler's input checks.  The pure helpers are checked against a brute-force
comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.netutil
import tornado.web
import xxhash

from fdship import protocol as P
from fdship.daemon.delta import (
    BLOCK,
    SUB,
    DeltaFetcher,
    DeltaHandler,
    block_sums,
    dirty_ranges,
    peer_sums,
)
from fdship.daemon.serve import ServeStats
from fdship.daemon.store import Snapshot, Store
from tests.daemon.conftest import run

CS = 256 * 1024  # chunk size: several chunks, each with many 4 KiB blocks
StoreFactory = Callable[..., Store]
DEST = "/srv/models/lines.txt"


def text(n_lines: int, seed: int = 1) -> bytearray:
    rng = random.Random(seed)
    out = bytearray()
    for i in range(n_lines):
        feats = bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz0123456789", k=150))
        out += b"%010d\tprice=%08.4f\t%s\n" % (i, rng.random() * 100, feats)
    return out


def edit_lines(data: bytearray, every: int, seed: int = 2) -> bytearray:
    """Change the price of every ``every``-th line, in place (same length)."""
    rng = random.Random(seed)
    new = bytearray(data)
    pos = 0
    line = 0
    while True:
        at = new.find(b"price=", pos)
        if at < 0:
            break
        if line % every == 0:
            new[at + 6:at + 14] = b"%08.4f" % (rng.random() * 100)
        pos = at + 14
        line += 1
    return new


@contextlib.asynccontextmanager
async def peer(store: Store) -> AsyncIterator[tuple[str, ServeStats]]:
    stats = ServeStats()
    app = tornado.web.Application([(P.DAEMON_DELTA, DeltaHandler,
                                    {"store": store, "stats": stats})])
    server = tornado.httpserver.HTTPServer(app)
    socks = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(socks)
    try:
        yield f"127.0.0.1:{socks[0].getsockname()[1]}", stats
    finally:
        server.stop()
        await server.close_all_connections()


def publish(store: Store, tmp_path: Path, data: bytes, job: str = "job1") -> Snapshot:
    src = tmp_path / f"src-{job}.txt"
    src.write_bytes(data)
    snap = store.snapshot(str(src), CS)
    store.commit_snapshots(job, [snap.key])
    return snap


def place_old(target: Store, data: bytes, dest: str = DEST) -> str:
    final = target.final_path(dest)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    Path(final).write_bytes(data)
    return final


async def build(target: Store, snap: Snapshot, address: str, job: str = "job1",
                fetcher: DeltaFetcher | None = None) -> tuple[list[Any], DeltaFetcher]:
    """Run the delta fetch for every chunk; return the results in chunk order."""
    st = target.open_staging(job, 0, DEST, snap.size, snap.xxh3, CS)
    d = fetcher or DeltaFetcher()
    out = []
    for c, h in enumerate(snap.chunks):
        off, size = st.span(c)
        f = P.Fetch(file=0, chunk=c, offset=off, size=size, xxh3=h, peer=address,
                    peer_name="src")
        res = await d.fetch(job, f, st.final_path, st.write_fd, 30.0)
        out.append(res)
        if res is not None and res.ok:
            st.mark_chunk(c, h)
    return out, d


def test_unchanged_chunks_come_from_the_old_copy_with_no_traffic(store_factory, tmp_path):
    a, b = store_factory("a"), store_factory("b")
    data = bytes(text(6000))
    snap = publish(a, tmp_path, data)
    place_old(b, data)

    async def body() -> None:
        async with peer(a) as (address, stats):
            results, d = await build(b, snap, address)
        assert all(r is not None and r.ok and r.local and r.nbytes == 0 for r in results)
        assert stats.bytes_served == 0  # the peer was never asked
        assert d.stats.chunks_local == len(snap.chunks) and d.stats.bytes_reused == len(data)
        res = await asyncio.to_thread(b.pack, "job1", 0)
        assert Path(res.path).read_bytes() == data

    run(body())


def test_scattered_edits_fetch_a_few_percent_and_install_verified(store_factory, tmp_path):
    a, b = store_factory("a"), store_factory("b")
    old = text(8000)
    new = bytes(edit_lines(old, every=100))  # 1% of the lines
    assert new != bytes(old) and len(new) == len(old)
    snap = publish(a, tmp_path, new)
    place_old(b, bytes(old))

    async def body() -> None:
        async with peer(a) as (address, stats):
            results, d = await build(b, snap, address)
        assert all(r is not None and r.ok and not r.local for r in results)
        spent = sum(r.nbytes for r in results)
        assert 0 < spent < 0.05 * len(new), spent
        assert d.stats.chunks_patched == len(snap.chunks)
        assert d.stats.bytes_network == spent
        assert stats.bytes_served < spent  # the rest is what we sent: our block hashes
        res = await asyncio.to_thread(b.pack, "job1", 0)
        assert Path(res.path).read_bytes() == new

    run(body())


def test_appended_lines_reuse_the_old_prefix(store_factory, tmp_path):
    a, b = store_factory("a"), store_factory("b")
    old = bytes(text(4000))[:2 * CS + 100_000]
    new = old + bytes(text(200, seed=9))[:20_000]
    snap = publish(a, tmp_path, new)
    place_old(b, old)

    async def body() -> None:
        async with peer(a) as (address, _):
            results, _ = await build(b, snap, address)
        # Chunks wholly before the old end are local; the one spanning it is
        # patched; chunks wholly past it have nothing to reuse (None).
        nfull = len(old) // CS
        assert all(r.local for r in results[:nfull])
        tail = results[nfull]
        assert tail is not None and tail.ok and not tail.local
        assert tail.nbytes < (len(new) - len(old)) + 0.05 * CS
        assert all(r is None for r in results[nfull + 1:])

    run(body())


def test_an_unrelated_old_file_costs_only_the_hashes_then_falls_back(store_factory, tmp_path):
    a, b = store_factory("a"), store_factory("b")
    new = random.Random(5).randbytes(3 * CS)
    snap = publish(a, tmp_path, new)
    place_old(b, random.Random(6).randbytes(3 * CS))

    async def body() -> None:
        async with peer(a) as (address, _):
            results, d = await build(b, snap, address)
        for r in results:
            assert r is not None and not r.ok
            # Our block hashes and the peer's sub-block hashes: ~3.3% of a chunk.
            assert 0 < r.nbytes < 0.04 * CS
        assert d.stats.chunks_full == 3 and d.stats.chunks_patched == 0
        assert b.staging("job1", 0).verified == {}

    run(body())


def test_nothing_to_reuse_without_an_old_regular_file(store_factory, tmp_path):
    a, b = store_factory("a"), store_factory("b")
    data = bytes(text(2000))
    snap = publish(a, tmp_path, data)
    final = b.final_path(DEST)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    other = tmp_path / "elsewhere.txt"
    other.write_bytes(data)
    os.symlink(other, final)  # never read through a link at the destination

    async def body() -> None:
        async with peer(a) as (address, _):
            results, _ = await build(b, snap, address)
        assert results == [None] * len(snap.chunks)

    run(body())


def test_a_chunk_that_does_not_verify_is_never_marked(store_factory, tmp_path):
    """The peer holds different bytes than the manifest says (a corrupted peer):
    the rebuilt chunk fails its hash and is reported not ok."""
    a, b = store_factory("a"), store_factory("b")
    old = text(3000)
    new = bytes(edit_lines(old, every=50))
    snap = publish(a, tmp_path, bytes(edit_lines(old, every=40, seed=7)))  # what it serves
    lying = Snapshot(key="", path=snap.path, size=len(new), xxh3=xxhash.xxh3_64(new).hexdigest(),
                     chunks=[xxhash.xxh3_64(new[i:i + CS]).hexdigest()
                             for i in range(0, len(new), CS)], chunk_size=CS)
    place_old(b, bytes(old))

    async def body() -> None:
        async with peer(a) as (address, _):
            results, d = await build(b, lying, address)
        verified = b.staging("job1", 0).verified
        for c, r in enumerate(results):
            if new[c * CS:(c + 1) * CS] == bytes(old[c * CS:(c + 1) * CS]):
                assert r is not None and r.local  # truly unchanged: the old copy is right
            else:
                assert r is not None and not r.ok and c not in verified, (c, r)
        assert d.stats.chunks_full >= 2

    run(body())


def test_a_peer_without_the_chunk_makes_it_a_full_fetch(store_factory, tmp_path):
    a, b = store_factory("a"), store_factory("b")
    old = text(2000)
    snap = publish(a, tmp_path, bytes(edit_lines(old, every=10)))

    async def body() -> None:
        place_old(b, bytes(old))
        async with peer(store_factory("empty")) as (address, _):
            results, _ = await build(b, snap, address)
        assert all(r is not None and not r.ok for r in results)

    run(body())


async def post(address: str, query: str, body: bytes) -> tornado.httpclient.HTTPResponse:
    return await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://{address}{P.DAEMON_DELTA}?{query}", method="POST", body=body,
        raise_error=False)


def test_peer_handler_refuses_bad_requests(store_factory, tmp_path):
    a = store_factory("a")
    data = bytes(text(2000))
    publish(a, tmp_path, data)

    async def body() -> None:
        async with peer(a) as (address, _):
            base = "job=job1&file=0&chunk=0"
            cases = [
                (f"{base}&op=nope", b"", 400),
                (f"{base}&op=sums&block=100&sub=64", b"", 400),  # sub must divide block
                (f"{base}&op=sums", b"\0" * 7, 400),
                (f"{base}&op=sums", b"\0" * 8 * (CS // BLOCK + 1), 400),
                (f"{base}&op=ranges", struct.pack(">II", CS - 10, 20), 400),
                (f"{base}&op=ranges", struct.pack(">IIII", 100, 10, 50, 10), 400),
                (f"{base}&op=ranges", struct.pack(">II", 10, 0), 400),
                ("job=job1&file=0&chunk=99&op=sums", b"", 404),
                ("job=../etc&file=0&chunk=0&op=sums", b"", 400),
            ]
            for query, payload, code in cases:
                r = await post(address, query, payload)
                assert r.code == code, (query, r.code, r.body)
            r = await post(address, f"{base}&op=ranges",
                           struct.pack(">IIII", 0, 5, 1000, 3))
            assert r.code == 200 and r.body == data[:5] + data[1000:1003]

    run(body())


def brute_force_ranges(ours: bytes, theirs: bytes) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for j in range(0, len(theirs), SUB):
        if ours[j:j + SUB] != theirs[j:j + SUB]:
            n = len(theirs[j:j + SUB])
            if out and out[-1][0] + out[-1][1] == j:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((j, n))
    return out


@pytest.mark.parametrize("length, old_len, edits", [
    (CS, CS, 30), (CS - 1000, CS - 1000, 5), (CS, CS // 3, 10), (5000, 5000, 2),
    (CS, CS, 0), (700, 300, 1),
])
def test_sums_and_ranges_find_exactly_the_changed_sub_blocks(tmp_path, length, old_len, edits):
    rng = random.Random(length + edits)
    theirs = bytearray(rng.randbytes(length))
    ours = bytearray(theirs[:old_len]) + bytearray(length - old_len)  # zeros past the old end
    for _ in range(edits):
        at = rng.randrange(min(old_len, length))
        ours[at] ^= 0x5A
    p_ours, p_theirs = tmp_path / "ours", tmp_path / "theirs"
    p_ours.write_bytes(ours)
    p_theirs.write_bytes(theirs)
    fo, ft = os.open(p_ours, os.O_RDONLY), os.open(p_theirs, os.O_RDONLY)
    try:
        whole, sums = block_sums(fo, 0, length)
        assert whole == xxhash.xxh3_64(bytes(ours)).hexdigest()
        assert len(sums) == (length + BLOCK - 1) // BLOCK
        reply = peer_sums(ft, 0, length, tuple(sums), BLOCK, SUB)
        ranges = dirty_ranges(fo, 0, length, reply, BLOCK, SUB)
        assert ranges == brute_force_ranges(bytes(ours), bytes(theirs))
        assert dirty_ranges(fo, 0, length, reply[:-1], BLOCK, SUB) is None or not edits
    finally:
        os.close(fo)
        os.close(ft)
