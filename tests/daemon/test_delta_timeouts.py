"""The delta fetcher's clocks over real loopback sockets: the daemon's connect_timeout.

A delta is an optimisation: a peer that cannot be reached, or does not answer,
must cost the delta (the chunk is then fetched in full, and that fetch reports
the peer), never the fetch itself.  Before, the delta had its own hard-coded
5 s connect timeout, and a timeout escaped as an exception the daemon turned
into a fatal local failure of the whole machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import xxhash

from fdship import protocol as P
from fdship.config import DaemonConfig, load
from fdship.daemon.agent import Daemon
from fdship.daemon.delta import DeltaFetcher, DeltaResult
from tests.daemon.conftest import run

CS = 64 * 1024




def _old_and_staging(tmp_path: Path) -> tuple[str, int, P.Fetch]:
    """An old copy at the final path that differs from the new chunk (so the delta must
    ask the peer), and a staging file to build into."""
    final = tmp_path / "dest.bin"
    old = os.urandom(CS)
    final.write_bytes(old)
    new = bytes(b ^ 1 for b in old[:100]) + old[100:]
    staging = os.open(tmp_path / "staging.part", os.O_RDWR | os.O_CREAT, 0o600)
    f = P.Fetch(file=0, chunk=0, offset=0, size=CS, xxh3=xxhash.xxh3_64(new).hexdigest(),
                peer="", peer_name="p")
    return str(final), staging, f


def _fetch_with(tmp_path: Path, fetcher: DeltaFetcher, peer: str,
                timeout: float) -> tuple[DeltaResult | None, float]:
    final, staging, f = _old_and_staging(tmp_path)
    f = P.Fetch(file=f.file, chunk=f.chunk, offset=f.offset, size=f.size, xxh3=f.xxh3,
                peer=peer, peer_name=f.peer_name)

    async def main() -> tuple[DeltaResult | None, float]:
        t0 = time.monotonic()
        res = await fetcher.fetch("J1", f, final, staging, timeout)
        return res, time.monotonic() - t0

    try:
        return run(main())
    finally:
        os.close(staging)


def test_an_unreachable_peer_costs_the_delta_after_connect_timeout(
        tmp_path: Path, unaccepting_peer: str) -> None:
    fetcher = DeltaFetcher(connect_timeout=0.3)
    res, took = _fetch_with(tmp_path, fetcher, unaccepting_peer, timeout=60)
    assert res is not None and not res.ok, res  # fetched in full next, not a failure
    assert fetcher.stats.chunks_full == 1
    # The connect timeout, not the fetch timeout (60 s) nor a fixed 5 s.
    assert 0.3 <= took < 4.0, took


def test_a_peer_that_never_answers_costs_the_delta_not_the_fetch(tmp_path: Path,
                                                                mute_peer: str) -> None:
    """A request timeout is raised by Tornado even with raise_error=False: it must come
    back as "no delta", not as an exception out of fetch()."""
    fetcher = DeltaFetcher(connect_timeout=1.0)
    res, took = _fetch_with(tmp_path, fetcher, mute_peer, timeout=0.5)
    assert res is not None and not res.ok, res
    assert fetcher.stats.chunks_full == 1
    assert took >= 0.5, took


def test_the_daemon_gives_its_delta_fetcher_its_connect_timeout(tmp_path: Path) -> None:
    assert DeltaFetcher().connect_timeout == DaemonConfig().connect_timeout
    cfg = load(DaemonConfig, {"data_dir": str(tmp_path / "d"), "root": str(tmp_path / "r"),
                              "listen": "127.0.0.1:0", "name": "t1", "connect_timeout": "350ms"})

    async def main() -> None:
        d = Daemon(cfg)
        try:
            assert d.delta.connect_timeout == pytest.approx(0.35)
            assert d.pool.connect_timeout == pytest.approx(0.35)
        finally:
            await d.stop()

    run(main())
