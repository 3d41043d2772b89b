"""Token-bucket bandwidth caps for a daemon's uploads and downloads.

``--upload-rate`` feeds the limiter that :mod:`fdship.daemon.serve` debits
before each slice it sends; ``--download-rate`` the one that
:mod:`fdship.daemon.fetch` debits for every buffer it receives.  One limiter is
shared by every transfer in its direction, so the cap holds for the daemon as a
whole, not per connection.

The bucket may go into debt: ``acquire(n)`` always takes ``n`` tokens at once
and then sleeps until the balance is back to zero.  That lets a caller ask for
more than the burst (a 4 MiB chunk under a 1 MiB burst) and still keeps the
long-run rate exact, because every byte is paid for exactly once.  Waits are
counted for the daemon's metrics.

The clock and the sleep are injectable so tests check the arithmetic without
depending on wall time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable


class RateLimiter:
    """An asyncio token bucket; ``rate`` None means unlimited (every call is a no-op)."""

    def __init__(self, rate: float | None, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive or None")
        self.rate = rate
        # A quarter of a second of traffic, at least 256 KiB (one serve slice), so
        # short bursts are smooth without letting an idle daemon flood the link.
        self.burst = float(burst) if burst is not None else (
            max(rate / 4, 256 * 1024) if rate is not None else 0.0)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._stamp = clock()
        # Metrics: how often and how long callers were held back.
        self.waits = 0
        self.waited_seconds = 0.0
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.rate is not None

    def _refill(self) -> None:
        now = self._clock()
        assert self.rate is not None
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def debit(self, n: int) -> float:
        """Take ``n`` tokens now; return how many seconds the caller should pause.

        The synchronous half of :meth:`acquire`, for callers that cannot await
        (an asyncio protocol pauses its transport for the returned time instead).
        """
        self.bytes += n
        if self.rate is None or n <= 0:
            return 0.0
        self._refill()
        self._tokens -= n
        if self._tokens >= 0:
            return 0.0
        delay = -self._tokens / self.rate
        self.waits += 1
        self.waited_seconds += delay
        return delay

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` more bytes may pass without exceeding the rate."""
        delay = self.debit(n)
        if delay > 0:
            await self._sleep(delay)

    def tokens(self) -> float:
        """Current balance (negative while in debt), for tests and metrics."""
        if self.rate is not None:
            self._refill()
        return self._tokens
