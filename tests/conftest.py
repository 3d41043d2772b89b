"""Fixtures shared by the test packages (each package's own live in its conftest.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


@pytest.fixture
def mute_peer() -> Iterator[str]:
    """HOST:PORT whose kernel completes the handshake (the accept queue) and that then
    never reads or answers a byte: a daemon or peer hung with its port open."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield f"127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()
