"""The fetcher's clocks over real loopback sockets: drain lead, stall, connect, idle pool.

A small peer written here (:class:`Trickle`) answers ``GET /daemon/download``
the way a real peer does, but at a pace the test sets: pieces with gaps, a
stall mid-body, silence before the headers.  Against it the tests check when
:class:`fdship.daemon.fetch.PeerPool` calls a fetch's ``on_drain`` (once, when
the bytes still due would take at most ``drain_lead`` at the rate so far, never
for a body that lands in one read), that a peer sending nothing for
``stall_timeout`` loses the fetch while a slow but steady one and our own rate
cap do not, that a connect the peer's kernel never completes fails after
``connect_timeout``, and that the idle pool keeps the most recent peers warm.
The last test runs a real :class:`fdship.daemon.agent.Daemon` against a real
in-process center: a draining fetch gives back its download slot and the center
counts the notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import xxhash

from fdship import protocol as P
from fdship.config import DaemonConfig, load
from fdship.daemon.agent import Daemon
from fdship.daemon.fetch import FetchError, PeerPool
from fdship.daemon.ratelimit import RateLimiter
from fdship.protocol import FAIL_TIMEOUT
from tests.center.conftest import center_in_process
from tests.daemon.conftest import run

KiB = 1024


class Trickle:
    """A keep-alive HTTP/1.1 peer serving ``bodies[chunk]`` in ``piece``-byte writes
    with ``gap`` seconds between them, except that the first ``burst`` body bytes go
    out at once.  ``stall_at``: stop sending (connection kept open) once that many
    body bytes are out; ``mute``: never answer at all.

    Records the loop time each GET arrived and each body's last byte was written.
    """

    def __init__(self, bodies: dict[int, bytes], piece: int = 64 * KiB, gap: float = 0.0,
                 stall_at: int | None = None, mute: bool = False, burst: int = 0) -> None:
        self.bodies = bodies
        self.piece = piece
        self.gap = gap
        self.burst = burst
        self.stall_at = stall_at
        self.mute = mute
        self.gets: list[tuple[int, float]] = []
        self.done: list[tuple[int, float]] = []
        self.connections = 0
        self.release = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.address = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                while await reader.readline() not in (b"\r\n", b""):
                    pass
                chunk = int(parse_qs(urlsplit(line.split()[1].decode()).query)["chunk"][0])
                self.gets.append((chunk, loop.time()))
                if self.mute:
                    await self.release.wait()
                    return
                body = self.bodies[chunk]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body))
                for off in range(0, len(body), self.piece):
                    if self.stall_at is not None and off >= self.stall_at:
                        await self.release.wait()
                        return
                    if off >= self.burst and off and self.gap:
                        await asyncio.sleep(self.gap)
                    writer.write(body[off:off + self.piece])
                    await writer.drain()
                self.done.append((chunk, loop.time()))
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Trickle]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            self.release.set()
            self.server.close()
            for w in self._writers:
                w.close()
            await self.server.wait_closed()


def blob(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def h(data: bytes) -> str:
    return xxhash.xxh3_64(data).hexdigest()


async def fetch_once(pool: PeerPool, peer: str, body: bytes, path: Path, chunk: int = 0,
                     timeout: float = 30.0, on_drain=None) -> int:  # type: ignore[no-untyped-def]
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        return await pool.fetch(peer, "J", 0, chunk, len(body), h(body), fd, 0, timeout,
                                on_drain=on_drain)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- drain lead


def test_notice_comes_once_near_the_end_of_a_trickled_body(tmp_path: Path) -> None:
    """640 KiB in 64 KiB pieces every 20 ms: with a 50 ms lead the notice comes
    once, after more than half of the body and before its end."""
    body = blob(640 * KiB)

    async def main() -> None:
        async with Trickle({0: body}, piece=64 * KiB, gap=0.02).running() as peer:
            pool = PeerPool(drain_lead=0.05)
            loop = asyncio.get_running_loop()
            calls: list[tuple[int, float]] = []

            def on_drain() -> None:
                calls.append((pool.stats.bytes_received, loop.time()))

            n = await fetch_once(pool, peer.address, body, tmp_path / "out", on_drain=on_drain)
            ended = loop.time()
            await pool.close()
        assert n == len(body) and (tmp_path / "out").read_bytes() == body
        assert len(calls) == 1, calls
        got, at = calls[0]
        # The estimate never runs ahead of the peer (bytes cannot arrive faster than
        # it writes them), so the notice cannot come in the first half; and it comes
        # while bytes are still due.
        assert len(body) // 2 < got < len(body), got
        assert at < ended

    run(main())


def test_no_notice_without_a_lead_or_for_a_body_that_lands_in_one_read(tmp_path: Path) -> None:
    big, small = blob(256 * KiB, 2), blob(8 * KiB, 3)

    async def main() -> None:
        calls: list[str] = []
        async with Trickle({0: big}, piece=32 * KiB, gap=0.01).running() as peer:
            off = PeerPool(drain_lead=0.0)  # fetch_lead 0: notices off
            await fetch_once(off, peer.address, big, tmp_path / "a",
                             on_drain=lambda: calls.append("off"))
            await off.close()
        async with Trickle({0: small}, piece=len(small)).running() as peer:
            # Even a lead longer than the whole fetch says nothing when the body
            # is complete in the read that brought its first bytes.
            eager = PeerPool(drain_lead=10.0)
            await fetch_once(eager, peer.address, small, tmp_path / "b",
                             on_drain=lambda: calls.append("one read"))
            await eager.close()
        assert calls == []

    run(main())


def test_a_long_lead_fires_once_half_the_body_is_in(tmp_path: Path) -> None:
    """A lead longer than the whole transfer fires, once, as soon as half the body
    has arrived, not before: the first bytes of a body say nothing about the rate."""
    body = blob(512 * KiB, 4)

    async def main() -> None:
        async with Trickle({0: body}, piece=32 * KiB, gap=0.01).running() as peer:
            pool = PeerPool(drain_lead=10.0)
            seen: list[int] = []
            await fetch_once(pool, peer.address, body, tmp_path / "out",
                             on_drain=lambda: seen.append(pool.stats.bytes_received))
            await pool.close()
        assert len(seen) == 1
        assert len(body) // 2 <= seen[0] < len(body), seen

    run(main())


def test_a_burst_of_early_bytes_does_not_send_the_notice_early(tmp_path: Path) -> None:
    """The first quarter of the body arrives at once (bytes the socket held while
    the daemon was off the CPU, or a link's burst allowance), the rest at 32 KiB
    per 20 ms.  Reads that close together once made the link look 100 times its
    speed and sent the notice with most of the body still to come; the notice
    must come near the real end instead."""
    body = blob(1024 * KiB, 6)

    async def main() -> None:
        async with Trickle({0: body}, piece=32 * KiB, gap=0.02, burst=256 * KiB).running() \
                as peer:
            pool = PeerPool(drain_lead=0.05)
            loop = asyncio.get_running_loop()
            calls: list[tuple[int, float]] = []
            await fetch_once(pool, peer.address, body, tmp_path / "out",
                             on_drain=lambda: calls.append((pool.stats.bytes_received,
                                                            loop.time())))
            ended = loop.time()
            await pool.close()
        assert len(calls) == 1, calls
        got, at = calls[0]
        # 768 KiB trickle in over about 480 ms; a 50 ms lead is a few pieces.
        assert got >= 3 * len(body) // 4, got
        assert ended - at < 0.3, ended - at

    run(main())


def test_a_failing_notice_does_not_fail_the_fetch(tmp_path: Path) -> None:
    body = blob(256 * KiB, 5)

    async def main() -> None:
        async with Trickle({0: body}, piece=32 * KiB, gap=0.01).running() as peer:
            pool = PeerPool(drain_lead=10.0)
            calls = []

            def boom() -> None:
                calls.append(1)
                raise RuntimeError("the notice's own bug")

            n = await fetch_once(pool, peer.address, body, tmp_path / "out", on_drain=boom)
            await pool.close()
        assert n == len(body) and calls == [1]
        assert pool.stats.chunks_ok == 1 and pool.stats.failures == {}

    run(main())


# ---------------------------------------------------------------------- stall timeout


def test_peer_that_stops_mid_body_fails_after_the_stall_timeout(tmp_path: Path) -> None:
    body = blob(256 * KiB, 6)

    async def main() -> None:
        async with Trickle({0: body}, piece=64 * KiB, stall_at=128 * KiB).running() as peer:
            pool = PeerPool(stall_timeout=0.3)
            t0 = time.monotonic()
            with pytest.raises(FetchError) as ei:
                await fetch_once(pool, peer.address, body, tmp_path / "out", timeout=60)
            took = time.monotonic() - t0
            await pool.close()
        assert ei.value.kind == FAIL_TIMEOUT
        assert str(ei.value) == (f"peer {peer.address} sent no byte for 0.3 s (after "
                                 f"{128 * KiB} of {256 * KiB} body bytes); giving the chunk back")
        assert 0.3 <= took < 10  # the stall clock, not the 60 s fetch timeout
        assert pool.stats.failures == {FAIL_TIMEOUT: 1} and pool.idle_count() == 0

    run(main())


def test_peer_that_never_answers_fails_after_the_stall_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        async with Trickle({0: b"x"}, mute=True).running() as peer:
            pool = PeerPool(stall_timeout=0.3)
            t0 = time.monotonic()
            with pytest.raises(FetchError) as ei:
                await fetch_once(pool, peer.address, b"x" * 10, tmp_path / "out", timeout=60)
            took = time.monotonic() - t0
            await pool.close()
        assert ei.value.kind == FAIL_TIMEOUT
        assert "sent no byte for 0.3 s (before a complete response)" in str(ei.value)
        assert 0.3 <= took < 10

    run(main())


def test_slow_but_steady_peer_is_not_a_stall(tmp_path: Path) -> None:
    """A byte now and then keeps the fetch alive well past the stall timeout."""
    body = blob(24 * KiB, 7)

    async def main() -> None:
        async with Trickle({0: body}, piece=2 * KiB, gap=0.1).running() as peer:
            pool = PeerPool(stall_timeout=0.35)
            t0 = time.monotonic()
            n = await fetch_once(pool, peer.address, body, tmp_path / "out")
            took = time.monotonic() - t0
            await pool.close()
        assert n == len(body) and (tmp_path / "out").read_bytes() == body
        assert took > 3 * 0.35  # it outlived several stall periods

    run(main())


def test_our_own_rate_cap_is_not_a_stall(tmp_path: Path) -> None:
    """The download cap pauses reading for ~0.5 s at a time, longer than the stall
    timeout: those pauses are ours, not the peer's, and must not fail the fetch."""
    body = blob(1024 * KiB, 8)

    async def main() -> None:
        async with Trickle({0: body}, piece=len(body)).running() as peer:
            limiter = RateLimiter(512 * KiB)
            pool = PeerPool(stall_timeout=0.2, limiter=limiter)
            n = await fetch_once(pool, peer.address, body, tmp_path / "out")
            await pool.close()
        assert n == len(body) and (tmp_path / "out").read_bytes() == body
        assert limiter.waits >= 1 and limiter.waited_seconds > 0.2

    run(main())


# ---------------------------------------------------------------------- connect timeout




def test_connect_that_never_completes_fails_after_connect_timeout(
        tmp_path: Path, unaccepting_peer: str) -> None:
    async def main() -> None:
        for pool, lo, hi in ((PeerPool(connect_timeout=0.3), 0.3, 0.9),
                             (PeerPool(), 1.0, 3.0)):  # the default: 1 s, not 5
            t0 = time.monotonic()
            with pytest.raises(FetchError) as ei:
                await fetch_once(pool, unaccepting_peer, b"x" * 10, tmp_path / "out", timeout=60)
            took = time.monotonic() - t0
            await pool.close()
            assert ei.value.kind == FAIL_TIMEOUT
            # One attempt at 0, a second at 0.25 s, a third at 0.5 s (3 at most).
            attempts = min(3, 1 + int(pool.connect_timeout / pool.connect_stagger))
            assert f"timed out connecting to peer {unaccepting_peer} after " \
                   f"{pool.connect_timeout:g} s ({attempts} attempts)" == str(ei.value)
            assert lo <= took < hi, (pool.connect_timeout, took)

    run(main())


async def fetch_behind_a_dropped_syn(pool: PeerPool, body: bytes, path: Path) -> float:
    """Fetch ``body`` from a peer whose accept queue is full when the first SYN
    comes (the kernel drops it, as a full link queue does) and that starts
    accepting 0.1 s later; return how long the fetch took."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=2)
    peer = Trickle({0: body})
    loop = asyncio.get_running_loop()

    async def open_later() -> None:
        await asyncio.sleep(0.1)
        peer.server = await asyncio.start_server(peer._serve, sock=listener)

    opener = asyncio.create_task(open_later())
    t0 = loop.time()
    try:
        n = await fetch_once(pool, "%s:%d" % listener.getsockname(), body, path)
        took = loop.time() - t0
        assert n == len(body)
        return took
    finally:
        await opener
        filler.close()
        peer.release.set()
        assert peer.server is not None
        peer.server.close()
        for w in peer._writers:
            w.close()
        await pool.close()


def test_a_dropped_syn_costs_the_stagger_not_the_kernels_one_second_retry(
        tmp_path: Path) -> None:
    """A second connection attempt goes out 0.25 s after the first; when the
    first's SYN was dropped, the second wins and the fetch completes in about
    that, where a single attempt waits for the kernel's SYN retransmission at
    1 s.  The losing attempt is cancelled: one connection is kept."""
    body = blob(64 * KiB)

    async def main() -> None:
        staggered = PeerPool()
        took = await fetch_behind_a_dropped_syn(staggered, body, tmp_path / "a")
        assert 0.2 <= took < 0.9, took
        assert staggered.stats.connections_opened == 1
        single = PeerPool(connect_timeout=5.0, connect_stagger=0)
        took_single = await fetch_behind_a_dropped_syn(single, body, tmp_path / "b")
        assert took_single >= 0.9, took_single  # the kernel's own retry, 1 s after
        assert single.stats.connections_opened == 1

    run(main())


def test_daemon_builds_its_pool_from_the_config(tmp_path: Path) -> None:
    cfg = load(DaemonConfig, {"data_dir": str(tmp_path / "d"), "root": str(tmp_path / "r"),
                              "listen": "127.0.0.1:0", "name": "t1",
                              "connect_timeout": "700ms", "fetch_stall_timeout": "4s",
                              "fetch_lead": "0.02"})
    defaults = DaemonConfig()
    assert (defaults.connect_timeout, defaults.fetch_stall_timeout, defaults.fetch_lead) == \
        (1.0, 10.0, 0.05)

    async def main() -> None:
        d = Daemon(cfg)
        try:
            assert (d.pool.connect_timeout, d.pool.stall_timeout, d.pool.drain_lead) == \
                pytest.approx((0.7, 4.0, 0.02))
        finally:
            await d.stop()

    run(main())


# ---------------------------------------------------------------------- idle pool


def test_pool_keeps_the_most_recent_peers_warm(tmp_path: Path) -> None:
    """With room for two idle connections, fetching from A, B, then C keeps B and C
    (A, idle the longest, goes); C's next fetch skips the handshake."""
    body = blob(16 * KiB, 9)

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            peers = [await stack.enter_async_context(Trickle({0: body}).running())
                     for _ in range(3)]
            a, b, c = (p.address for p in peers)
            pool = PeerPool(max_idle=2)
            for p in (a, b, c):
                await fetch_once(pool, p, body, tmp_path / "out")
            assert (pool.idle_count(a), pool.idle_count(b), pool.idle_count(c)) == (0, 1, 1)
            assert pool.stats.connections_opened == 3
            await fetch_once(pool, c, body, tmp_path / "out")
            assert pool.stats.connections_reused == 1 and pool.stats.connections_opened == 3
            assert peers[2].connections == 1
            await pool.close()

    run(main())


def test_full_pool_keeps_the_connection_just_returned(tmp_path: Path) -> None:
    """Room for one idle connection, two fetches from one peer at once: the second
    connection to come back replaces the first (evicted as the oldest) and is the
    one the next fetch reuses."""
    body = blob(64 * KiB, 13)

    async def main() -> None:
        async with Trickle({0: body}, piece=16 * KiB, gap=0.01).running() as peer:
            pool = PeerPool(max_idle=1)
            await asyncio.gather(fetch_once(pool, peer.address, body, tmp_path / "a"),
                                 fetch_once(pool, peer.address, body, tmp_path / "b"))
            assert pool.stats.connections_opened == 2
            assert pool.idle_count() == 1 and pool.idle_count(peer.address) == 1
            await fetch_once(pool, peer.address, body, tmp_path / "c")
            assert (pool.stats.connections_opened, pool.stats.connections_reused) == (2, 1)
            await pool.close()
        assert peer.connections == 2

    run(main())


def test_idle_connection_older_than_max_idle_age_is_not_reused(tmp_path: Path) -> None:
    body = blob(16 * KiB, 10)

    async def main() -> None:
        async with Trickle({0: body}).running() as peer:
            pool = PeerPool(max_idle_age=0.2)
            await fetch_once(pool, peer.address, body, tmp_path / "out")
            await fetch_once(pool, peer.address, body, tmp_path / "out")  # fresh: reused
            assert (pool.stats.connections_opened, pool.stats.connections_reused) == (1, 1)
            await asyncio.sleep(0.3)
            await fetch_once(pool, peer.address, body, tmp_path / "out")  # stale: new one
            assert (pool.stats.connections_opened, pool.stats.connections_reused) == (2, 1)
            assert peer.connections == 2
            await pool.close()

    run(main())


# ---------------------------------------------------------------------- the daemon


def _daemon_cfg(tmp_path: Path, center: str, lead: float) -> DaemonConfig:
    cfg: DaemonConfig = load(DaemonConfig, {
        "center": center, "data_dir": str(tmp_path / f"data-{lead}"),
        "root": str(tmp_path / f"root-{lead}"), "listen": "127.0.0.1:0", "name": "t1",
        "max_downloads": "1", "fetch_lead": str(lead)})
    os.makedirs(cfg.root, exist_ok=True)
    return cfg


@pytest.mark.parametrize("lead", [0.2, 0.0])
def test_draining_fetch_frees_the_download_slot_and_tells_the_center(
        tmp_path: Path, lead: float) -> None:
    """One download slot, two chunks from a peer that takes ~0.3 s per chunk.

    With a lead, the first fetch gives its slot back near its end: the second
    GET reaches the peer before the first body's last byte left it, and the
    center counts the notice.  Without one (0), the second fetch waits for the
    first to end and no notice is sent.
    """
    cs = 1024 * KiB
    bodies = {0: blob(cs, 11), 1: blob(cs, 12)}
    whole = bodies[0] + bodies[1]

    async def main() -> None:
        async with center_in_process(tmp_path / f"center-{lead}") as center, \
                Trickle(bodies, piece=64 * KiB, gap=0.02).running() as peer:
            d = Daemon(_daemon_cfg(tmp_path, center.url, lead))
            await asyncio.get_running_loop().run_in_executor(None, d.store.open)
            try:
                req = P.PullRequest(job="J-drain", files=(P.StagedFile(
                    file=0, dest="/out.bin", size=len(whole), xxh3=h(whole)),),
                    fetches=tuple(P.Fetch(file=0, chunk=c, offset=c * cs, size=cs,
                                          xxh3=h(bodies[c]), peer=peer.address,
                                          peer_name="p1") for c in (0, 1)))
                assert await d.pull(req) == 2
                for _ in range(3000):
                    if not d.active and (not lead or d.drains_in_flight == 0):
                        break
                    await asyncio.sleep(0.01)
                assert not d.active
                acks = list(d.acks)
                assert [(a.chunk, a.ok) for a in sorted(acks, key=lambda a: a.chunk)] == \
                    [(0, True), (1, True)], acks
                # Each ack times its transfer on the wire for the center's link
                # estimates: 16 pieces 20 ms apart, inside the whole fetch's time.
                for a in acks:
                    assert 0.28 <= a.wire_seconds <= a.seconds, a
                gets, done = dict(peer.gets), dict(peer.done)
                if lead:
                    assert gets[1] < done[0], (gets, done)
                    assert d.drain_counts["sent"] >= 1 and d.drain_counts["failed"] == 0
                    # The center did not run this job: the notices are counted, ignored.
                    assert center.sample("fdship_drain_notices_total", outcome="ignored") == \
                        d.drain_counts["sent"]
                else:
                    assert gets[1] >= done[0], (gets, done)
                    assert d.drain_counts == {"sent": 0, "failed": 0, "dropped": 0}
                    assert center.sample("fdship_drain_notices_total", outcome="ignored") == 0
                # Whatever happened to the notices, the slot is whole again.
                assert d.fetch_slots._value == 1  # noqa: SLF001 - the semaphore's count
            finally:
                await d.stop()

    run(main())
