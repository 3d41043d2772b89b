"""Chunks on their way into this daemon, for serving them on before they are whole.

Where it sits: the daemon's pull handling (``fdship/daemon/agent.py``) opens one
:class:`Arrival` per chunk the center told it to fetch, as soon as the pull is
accepted, and drives it from the fetch (:mod:`fdship.daemon.fetch` reports every
``pwrite`` through ``on_progress``).  :class:`fdship.daemon.serve.DownloadHandler`
looks a requested chunk up here when the store does not hold it verified yet,
and streams the bytes already in the staging file, waiting for more: a chunk no
longer has to arrive completely at a host before that host can pass it on
("cut-through").

An arrival only says *how far* the bytes at ``offset`` in the staging file have
been written and *whether* the fetch ended well; the bytes themselves stay in
the file.  The fetch writes its body front to back, so the first ``written``
bytes of the chunk's span are exactly what the upstream peer sent.  They are
not verified until the state is ``ok``: the server holds back the chunk's last
byte until then, so a downstream peer only ever completes a body this daemon
verified, and a failed arrival costs the downstream a short body (which its
fetch reports as a lost connection), never a wrong chunk.

Pure asyncio and synchronous bookkeeping: :meth:`Arrival.progress` runs on
every socket read of the fetch, so it is a comparison and a store when nobody
waits, and O(waiters) when someone does.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterator

PENDING = "pending"  # the pull was accepted; the fetch waits for a free fetch slot
RUNNING = "running"  # the bytes are coming from a peer
OK = "ok"  # verified and marked in the store: every byte may go out
FAILED = "failed"  # the fetch failed, was cancelled or replaced: nothing more will come

Key = tuple[str, int, int]  # (job, file, chunk)

# A stream of an arriving chunk goes on in batches of this much (or what is
# left): about 6 ms of an 80 Mbit/s link per hop, and a fraction of the
# wake-ups.  The fetch feeding a stream wakes on batches of it too.
RELAY_BATCH = 64 * 1024
# Keys whose fetch here failed, remembered (the newest this many) so that a
# download waiting for the chunk's arrival is refused at once instead of
# waiting for a pull that already came and went.
FAILED_MEMORY = 1024


class Arrival:
    """One chunk being fetched into a staging file.

    ``offset``/``length`` locate the chunk in its file; ``written`` counts the
    bytes from the chunk's start already in the file.  Waiters get a fresh
    future from :meth:`changed`, resolved at the next progress or at the end.
    """

    __slots__ = ("key", "offset", "length", "written", "state", "reason", "_waiters",
                 "streams", "on_stream")

    def __init__(self, key: Key, offset: int, length: int) -> None:
        self.key = key
        self.offset = offset
        self.length = length
        self.written = 0
        self.state = PENDING
        self.reason = ""
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.streams = 0  # peers being sent this chunk as it arrives
        # Set by the fetch while it runs: told when a stream starts, so its
        # reads can come in the streams' batches rather than larger ones.
        self.on_stream: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return (f"Arrival({self.key!r}, {self.state}, {self.written}/{self.length}"
                f"{', ' + self.reason if self.reason else ''})")

    @property
    def done(self) -> bool:
        return self.state in (OK, FAILED)

    def available(self) -> int:
        """How many bytes from the chunk's start may be sent on now.

        All of them once verified; before that, what was written less the last
        byte, which is held back so that no downstream peer ever receives a
        complete body that this daemon then finds corrupt.
        """
        if self.state == OK:
            return self.length
        return max(0, min(self.written, self.length - 1))

    # --- driven by the fetch -----------------------------------------------------------

    def start(self) -> None:
        """The bytes start coming from a peer (the fetch got its slot)."""
        if self.state == PENDING:
            self.state = RUNNING
            self._wake()

    def progress(self, written: int) -> None:
        """``written`` bytes from the chunk's start are in the file now.

        Called on every socket read of the fetch: cheap when nobody waits.
        """
        if written > self.written and not self.done:
            self.written = written
            if self._waiters:
                avail = self.available()
                if any(avail >= at for at, _ in self._waiters):
                    self._wake(avail)

    def succeed(self) -> None:
        """The chunk is verified and marked in the store."""
        if not self.done:
            self.state = OK
            self._wake()

    def fail(self, reason: str) -> None:
        """Nothing more will come (a failed, cancelled or replaced fetch)."""
        if not self.done:
            self.state = FAILED
            self.reason = reason
            self._wake()

    # --- used by the server --------------------------------------------------------------

    def stream_started(self) -> None:
        """A peer is being sent this chunk as it arrives (until :meth:`stream_ended`)."""
        self.streams += 1
        if self.streams == 1 and self.on_stream is not None:
            self.on_stream()

    def stream_ended(self) -> None:
        self.streams = max(0, self.streams - 1)

    def changed(self, at_least: int = 0) -> asyncio.Future[None]:
        """A future resolved once ``at_least`` bytes are available, or at the
        start or end of the fetch (at once if it ended).

        Asking for a batch rather than the next byte lets the server send a few
        socket reads' worth per wake-up: a relay then costs about one sendfile
        per batch instead of one per read.  The caller may cancel it (a
        timeout, a closed connection); a cancelled waiter is simply skipped.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.done or (at_least and self.available() >= at_least):
            fut.set_result(None)
        else:
            self._waiters.append((at_least, fut))
        return fut

    async def ended(self, stall_timeout: float) -> bool:
        """Wait for the fetch to end; False if ``stall_timeout`` seconds pass with
        no news from it (no start, no progress) before it does."""
        while not self.done:
            try:
                await asyncio.wait_for(self.changed(), stall_timeout)
            except TimeoutError:
                return False
        return True

    def _wake(self, avail: int | None = None) -> None:
        """Resolve the waiters (with ``avail``: those asking for no more than it)."""
        if avail is None:
            waiters, self._waiters = self._waiters, []
        else:
            waiters = [w for w in self._waiters if avail >= w[0]]
            self._waiters = [w for w in self._waiters if avail < w[0]]
        for _, fut in waiters:
            if not fut.done():
                fut.set_result(None)


class Arrivals:
    """The registry: at most one live :class:`Arrival` per (job, file, chunk)."""

    def __init__(self) -> None:
        self._by_key: dict[Key, Arrival] = {}
        # Downloads that came before the pull that opens their chunk here (see
        # :meth:`opened`), woken by :meth:`open`.
        self._awaited: dict[Key, list[asyncio.Future[None]]] = {}
        # Keys whose last fetch here failed, and no new one opened since.
        self._failed: OrderedDict[Key, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Arrival]:
        return iter(list(self._by_key.values()))

    def open(self, key: Key, offset: int, length: int) -> Arrival:
        """Register a new pending arrival for ``key``.

        One still registered for the same key belongs to a fetch being replaced
        (the center moved the chunk to another peer): it fails, so whoever
        streams from it hangs up, rather than mixing two fetches' bytes.
        """
        old = self._by_key.get(key)
        if old is not None:
            old.fail("replaced by a fetch from another peer")
        arrival = self._by_key[key] = Arrival(key, offset, length)
        self._failed.pop(key, None)
        for fut in self._awaited.pop(key, ()):
            if not fut.done():
                fut.set_result(None)
        return arrival

    async def opened(self, key: Key, timeout: float) -> Arrival | None:
        """The arrival of ``key``, waiting up to ``timeout`` s for it to be opened.

        The center sends a relay's pull and the pull of the peer that fetches
        from it at the same moment, over different connections: the peer's
        request can come first.  It waits here instead of being refused,
        unless this daemon's own fetch of the chunk already failed: its pull
        came and went, and the center, told of the failure, has no relay here
        to offer any more (waiting would only hold the request up).
        """
        arrival = self._by_key.get(key)
        if arrival is not None or timeout <= 0 or key in self._failed:
            return arrival
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._awaited.setdefault(key, [])
        waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            if fut in waiters:
                waiters.remove(fut)
            if not waiters and self._awaited.get(key) is waiters:
                del self._awaited[key]
        return self._by_key.get(key)

    def get(self, key: Key) -> Arrival | None:
        return self._by_key.get(key)

    def close(self, arrival: Arrival, reason: str = "the fetch ended") -> None:
        """End ``arrival`` (failed unless it succeeded) and forget it.

        Idempotent, and it never removes a replacement registered under the
        same key since.
        """
        arrival.fail(reason)
        if self._by_key.get(arrival.key) is arrival:
            del self._by_key[arrival.key]
            if arrival.state == FAILED:
                self._failed[arrival.key] = None
                if len(self._failed) > FAILED_MEMORY:
                    self._failed.popitem(last=False)

    def fail_all(self, reason: str) -> None:
        for arrival in list(self._by_key.values()):
            self.close(arrival, reason)
