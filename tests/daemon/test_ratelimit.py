"""The token bucket's arithmetic, checked on an injected clock (never on wall time)."""

from __future__ import annotations

import asyncio

import pytest

from fdship.daemon.ratelimit import RateLimiter
from tests.daemon.conftest import run


class Clock:
    """A clock that only moves when a sleeper sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, d: float) -> None:
        self.sleeps.append(d)
        self.now += d


def test_unlimited_is_a_no_op() -> None:
    rl = RateLimiter(None)
    assert not rl.enabled
    run(rl.acquire(10**12))
    assert rl.waits == 0 and rl.waited_seconds == 0.0 and rl.bytes == 10**12


def test_rejects_nonsense_rate() -> None:
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_burst_passes_then_the_rate_holds() -> None:
    clock = Clock()
    rl = RateLimiter(1000.0, burst=500.0, clock=clock, sleep=clock.sleep)

    async def body() -> None:
        await rl.acquire(500)  # the full bucket: no wait
        assert clock.sleeps == []
        for _ in range(20):  # 20 x 250 bytes at 1000 B/s: 5 s
            await rl.acquire(250)

    run(body())
    assert clock.now - 100.0 == pytest.approx(5.0)
    assert rl.waits == 20 and rl.waited_seconds == pytest.approx(5.0)
    assert all(d == pytest.approx(0.25) for d in clock.sleeps)


def test_long_run_rate_is_exact_with_requests_larger_than_burst() -> None:
    clock = Clock()
    rl = RateLimiter(4e6, burst=256 * 1024, clock=clock, sleep=clock.sleep)
    total = 0

    async def body() -> None:
        nonlocal total
        for i in range(200):
            n = 4 * 1024 * 1024 if i % 3 else 1000  # mixes far over and under the burst
            await rl.acquire(n)
            total += n

    run(body())
    elapsed = clock.now - 100.0
    assert elapsed == pytest.approx((total - 256 * 1024) / 4e6, rel=1e-9)
    assert total / elapsed <= 4e6 * 1.01


def test_idle_time_refills_only_up_to_burst() -> None:
    clock = Clock()
    rl = RateLimiter(100.0, burst=50.0, clock=clock, sleep=clock.sleep)
    assert rl.debit(50) == 0.0
    clock.now += 3600  # an hour idle does not bank an hour of traffic
    assert rl.tokens() == pytest.approx(50.0)
    assert rl.debit(50) == 0.0
    assert rl.debit(100) == pytest.approx(1.0)


def test_concurrent_acquirers_share_the_rate() -> None:
    # Ten tasks ask at the same instant: the debt model makes the last one wait
    # for everyone before it, so together they cannot exceed the rate.
    clock = Clock()
    wakes: list[float] = []

    async def sleep(d: float) -> None:
        wakes.append(clock.now + d)  # the clock stands still: all ask at once

    rl = RateLimiter(1000.0, burst=100.0, clock=clock, sleep=sleep)

    async def body() -> None:
        await asyncio.gather(*(rl.acquire(100) for _ in range(10)))

    run(body())
    assert len(wakes) == 9  # the first fit in the burst
    assert max(wakes) - clock.now == pytest.approx((10 * 100 - 100) / 1000.0)
    assert sorted(wakes) == pytest.approx([clock.now + 0.1 * k for k in range(1, 10)])


def test_default_burst() -> None:
    assert RateLimiter(100e6).burst == pytest.approx(25e6)
    assert RateLimiter(1000.0).burst == 256 * 1024
