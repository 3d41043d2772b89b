"""Shared helpers for the daemon data-plane tests: real files, real sockets, real mounts."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
import xxhash

from fdship.daemon.serve import DownloadHandler, ServeStats
from fdship.daemon.store import Store
from fdship.protocol import DAEMON_DOWNLOAD

T = TypeVar("T")

CS = 64 * 1024  # a small chunk size keeps most tests fast and multi-chunk


def run(coro: Awaitable[T], timeout: float = 120.0) -> T:
    """Run one test coroutine on a fresh event loop, bounded in time."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def write_random(path: str | Path, size: int, seed: int = 1) -> bytes:
    """Write ``size`` deterministic pseudo-random bytes; return them (keep sizes small)."""
    data = random.Random(seed).randbytes(size)
    Path(path).write_bytes(data)
    return data


def file_xxh3(path: str | Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def chunk_hashes(data: bytes, cs: int) -> list[str]:
    return [xxhash.xxh3_64(data[i:i + cs]).hexdigest() for i in range(0, len(data), cs)]


@pytest.fixture
def store_factory(tmp_path: Path) -> Iterator[Callable[..., Store]]:
    """Stores opened under tmp_path, all closed at the end of the test."""
    made: list[Store] = []

    def make(name: str = "store", root: str | None = None) -> Store:
        s = Store(str(tmp_path / name / "data"), root if root is not None else
                  str(tmp_path / name / "root"))
        s.open()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@contextlib.asynccontextmanager
async def serving(store: Store, settings: dict[str, Any] | None = None,
                  server_kw: dict[str, Any] | None = None,
                  **handler_kw: Any) -> AsyncIterator[tuple[str, ServeStats]]:
    """A real Tornado server on a loopback port with the DownloadHandler mounted."""
    stats: ServeStats = handler_kw.pop("stats", None) or ServeStats()
    app = tornado.web.Application(
        [(DAEMON_DOWNLOAD, DownloadHandler, dict(store=store, stats=stats, **handler_kw))],
        **(settings or {}))
    server = tornado.httpserver.HTTPServer(app, **(server_kw or {}))
    socks = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(socks)
    port = socks[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}", stats
    finally:
        server.stop()
        await server.close_all_connections()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Mount small tmpfs file systems for disk-full and read-only cases; unmount after."""
    mounts: list[Path] = []

    def make(size: str = "1m", ro: bool = False) -> str:
        d = tmp_path / f"tmpfs{len(mounts)}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "fdship-test", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
        mounts.append(d)
        return str(d)

    yield make
    for d in reversed(mounts):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def immutable() -> Iterator[Callable[[str], None]]:
    """chattr +i a directory (even root cannot create files in it); undone after."""
    done: list[str] = []

    def make(path: str) -> None:
        r = subprocess.run(["chattr", "+i", path], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"chattr +i is not supported here: {r.stderr.strip()}")
        done.append(path)

    yield make
    for p in done:
        subprocess.run(["chattr", "-i", p], capture_output=True)


@pytest.fixture
def unaccepting_peer() -> Iterator[str]:
    """HOST:PORT whose accept queue is full: the kernel drops further SYNs, so a
    connect hangs as it does behind a saturated link."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    filler = socket.create_connection(s.getsockname(), timeout=2)
    try:
        yield f"127.0.0.1:{s.getsockname()[1]}"
    finally:
        filler.close()
        s.close()
