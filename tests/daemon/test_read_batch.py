"""Read batching (``read_batch``, SO_RCVLOWAT) in the fetcher, over real loopback sockets.

A body trickled in small pieces must reach the fetch in a few large reads,
not one per piece; the mark must never hold back what a reply can still send
(a small chunk after a big one on the same kept-alive connection, an error
reply, a peer slower than the mark); and TLS connections never use it.  The
peer is :class:`tests.daemon.test_fetch_lead.Trickle`, plus a one-line error
server and the real download handler for TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fdship.daemon.fetch import FetchError, PeerPool
from fdship.protocol import FAIL_MISSING
from tests.daemon.conftest import run
from tests.daemon.test_fetch_lead import Trickle, blob, fetch_once, h
from tests.daemon.test_serve_fetch import CS, StoreFactory, serving, source

KiB = 1024


def _reads(batch: int, body: bytes, path: Path, piece: int, gap: float) -> int:
    async def main() -> int:
        async with Trickle({0: body}, piece=piece, gap=gap).running() as peer:
            pool = PeerPool(read_batch=batch)
            n = await fetch_once(pool, peer.address, body, path)
            await pool.close()
        assert n == len(body) and path.read_bytes() == body
        return pool.stats.reads

    return run(main())


def test_a_trickled_body_arrives_in_few_reads(tmp_path: Path) -> None:
    """256 pieces of 2 KiB: one wake-up each without the mark, about one per
    64 KiB with it, and the same bytes either way."""
    body = blob(512 * KiB, 11)
    off = _reads(0, body, tmp_path / "off", piece=2 * KiB, gap=0.002)
    on = _reads(64 * KiB, body, tmp_path / "on", piece=2 * KiB, gap=0.002)
    print(f"\nreads for 512 KiB in 2 KiB pieces: {off} without the mark, {on} with 64 KiB")
    assert off >= 100
    assert on <= 512 // 64 + 4
    assert on * 8 < off


def test_a_small_chunk_after_a_big_one_is_not_held_back(tmp_path: Path) -> None:
    """No mark set for a big chunk may outlive its reply: on the same kept-alive
    connection a 10-byte chunk would never reach it and could only end by the
    stall timeout."""
    big, small = blob(256 * KiB, 12), blob(10, 13)

    async def main() -> None:
        # One write: the big chunk's reads end with the mark still high.
        async with Trickle({0: big, 1: small}, piece=len(big)).running() as peer:
            pool = PeerPool(read_batch=64 * KiB, stall_timeout=2.0)
            assert await fetch_once(pool, peer.address, big, tmp_path / "big") == len(big)
            t0 = time.monotonic()
            assert await fetch_once(pool, peer.address, small, tmp_path / "small",
                                    chunk=1) == len(small)
            took = time.monotonic() - t0
            await pool.close()
        assert peer.connections == 1  # the same kept-alive connection
        assert (tmp_path / "small").read_bytes() == small
        assert took < 1.0, took  # far under the 2 s stall clock

    run(main())


@contextlib.asynccontextmanager
async def _not_found_peer() -> AsyncIterator[str]:
    """Answers every request with a short keep-alive 404, as a peer without the chunk."""
    body = b'{"error": "no such chunk"}'

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readline():
                while await reader.readline() not in (b"\r\n", b""):
                    pass
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def test_an_error_reply_is_not_held_back(tmp_path: Path) -> None:
    async def main() -> None:
        async with _not_found_peer() as peer:
            pool = PeerPool(read_batch=64 * KiB, stall_timeout=2.0)
            t0 = time.monotonic()
            with pytest.raises(FetchError) as ei:
                await fetch_once(pool, peer, blob(256 * KiB), tmp_path / "out")
            took = time.monotonic() - t0
            await pool.close()
        assert ei.value.kind == FAIL_MISSING and "no such chunk" in str(ei.value)
        assert took < 1.0, took

    run(main())


def test_a_peer_slower_than_the_mark_is_not_a_stall(tmp_path: Path) -> None:
    """1 KiB every 0.1 s never fills a 64 KiB mark within the 0.3 s stall
    clock: the bytes waiting in the socket prove the peer is alive, and the
    fetch then reads them as they come."""
    body = blob(8 * KiB, 14)

    async def main() -> None:
        async with Trickle({0: body}, piece=KiB, gap=0.1).running() as peer:
            pool = PeerPool(read_batch=64 * KiB, stall_timeout=0.3)
            t0 = time.monotonic()
            n = await fetch_once(pool, peer.address, body, tmp_path / "out")
            took = time.monotonic() - t0
            await pool.close()
        assert n == len(body) and (tmp_path / "out").read_bytes() == body
        assert took > 0.3  # it outlived a stall period
        assert pool.stats.failures == {}

    run(main())


def test_a_peer_that_stops_still_fails_after_the_stall_timeout(tmp_path: Path) -> None:
    body = blob(256 * KiB, 15)

    async def main() -> None:
        # Paced, so the first read takes the first 64 KiB and the last 48 KiB
        # sit below the mark when the peer goes quiet.
        async with Trickle({0: body}, piece=16 * KiB, gap=0.01,
                           stall_at=100 * KiB).running() as peer:
            pool = PeerPool(read_batch=64 * KiB, stall_timeout=0.3)
            t0 = time.monotonic()
            with pytest.raises(FetchError) as ei:
                await fetch_once(pool, peer.address, body, tmp_path / "out", timeout=60)
            took = time.monotonic() - t0
            await pool.close()
        # Whatever the mark held back was read on the way: the count is exact.
        assert f"after {112 * KiB} of {256 * KiB} body bytes" in str(ei.value)
        assert 0.6 <= took < 10  # one stall period found bytes waiting, the next none

    run(main())


def test_tls_connections_do_not_use_the_mark(store_factory: StoreFactory,
                                             tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    a = store_factory("a")
    snap, data = source(a, tmp_path, 2 * CS)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE

    async def body() -> None:
        async with serving(a, server_kw={"ssl_options": server}) as (peer, _):
            pool = PeerPool(ssl=client, read_batch=64 * KiB)
            out = tmp_path / "out"
            for chunk in (0, 1):
                part = data[chunk * CS:(chunk + 1) * CS]
                fd = os.open(out, os.O_CREAT | os.O_RDWR, 0o600)
                try:
                    assert await pool.fetch(peer, "job1", 0, chunk, len(part), h(part), fd,
                                            chunk * CS, 30) == len(part)
                finally:
                    os.close(fd)
            conn = pool._idle.take(peer, asyncio.get_running_loop().time())
            assert conn is not None
            sock = conn.transport.get_extra_info("socket")
            # The mark was never set on the wire socket under TLS.
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
            conn.close()
            await pool.close()
        assert out.read_bytes() == data

    run(body())
