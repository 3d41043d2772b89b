"""Measurement helpers the data-path benchmarks share (loopback.py, tls.py).

Not a test module: the benchmark scripts import it after putting the
repository root on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


async def fetch_all(pool: Any, port: int, job: str, chunks: list[str], size: int, chunk: int,
                    fd: int, parallel: int, timeout: float) -> float:
    """Fetch every chunk of file 0 of ``job`` from 127.0.0.1:``port`` through
    ``pool`` (a ``PeerPool``), ``parallel`` at a time, into ``fd``; the seconds taken."""
    from fdship.protocol import chunk_span

    peer = f"127.0.0.1:{port}"
    sem = asyncio.Semaphore(parallel)

    async def one(c: int, h: str) -> None:
        async with sem:
            off, length = chunk_span(size, chunk, c)
            await pool.fetch(peer, job, 0, c, length, h, fd, off, timeout)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(c, h) for c, h in enumerate(chunks)))
    return time.perf_counter() - t0


def proc_cpu(pid: int) -> Callable[[], float]:
    """A reader of the CPU seconds (user + system) process ``pid`` has used so far.

    CPU seconds sampled around each run are far steadier than MB/s on a shared
    machine, and they are what decides how much a daemon steals from the
    server it runs on.
    """
    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick
    return cpu
