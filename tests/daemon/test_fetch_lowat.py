"""The fetch path asks the kernel to wake it per batch of body bytes (SO_RCVLOWAT).

A peer on a link of tens of MB/s delivers a packet or two per wake-up; each
wake-up costs a trip through the event loop, a hash update and a pwrite.
These tests serve a chunk in small pieces over a real socket and count the
reads the fetcher made (its progress callback runs once per read).
"""

from __future__ import annotations

import asyncio
import os

import xxhash

from fdship.daemon.fetch import RCV_LOWAT, PeerPool


async def _trickle_server(body: bytes, piece: int, pause: float) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
                for i in range(0, len(body), piece):
                    writer.write(body[i:i + piece])
                    await writer.drain()
                    await asyncio.sleep(pause)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _fetch(tmp_path, size: int, piece: int, pause: float) -> tuple[int, list[int], bool]:
    body = os.urandom(size)

    async def main() -> tuple[int, list[int]]:
        server = await _trickle_server(body, piece, pause)
        port = server.sockets[0].getsockname()[1]
        pool = PeerPool(stall_timeout=5.0)
        reads: list[int] = []
        fd = os.open(tmp_path / "stage", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            n = await pool.fetch(f"127.0.0.1:{port}", "j", 0, 0, size,
                                 xxhash.xxh3_64_hexdigest(body), fd, 0, 30.0,
                                 on_progress=reads.append)
            # The kept-alive connection serves the next chunk too: the low-water
            # mark went back to 1 for its headers, else they would never wake us.
            n2 = await pool.fetch(f"127.0.0.1:{port}", "j", 0, 0, size,
                                  xxhash.xxh3_64_hexdigest(body), fd, 0, 30.0)
            assert n2 == size and pool.stats.connections_reused == 1
        finally:
            os.close(fd)
            await pool.close()
            server.close()
            await server.wait_closed()
        return n, reads

    n, reads = asyncio.run(main())
    return n, reads, (tmp_path / "stage").read_bytes()[:size] == body


def test_a_trickled_body_is_read_in_batches_not_per_piece(tmp_path):
    size = 1024 * 1024
    n, reads, same = _fetch(tmp_path, size, piece=4096, pause=0.0005)
    assert n == size and same and reads[-1] == size
    # 256 pieces of 4 KiB, 0.5 ms apart: read per piece that is ~256 wake-ups;
    # per batch of RCV_LOWAT (32 KiB) about 32.
    assert RCV_LOWAT >= 16 * 1024
    assert len(reads) <= 64, len(reads)
    assert all(b > a for a, b in zip(reads, reads[1:]))


def test_a_body_smaller_than_the_batch_and_an_odd_tail_still_complete(tmp_path):
    for size in (1000, RCV_LOWAT + 3, 3 * RCV_LOWAT - 1):
        n, reads, same = _fetch(tmp_path, size, piece=997, pause=0.001)
        assert n == size and same and reads[-1] == size
