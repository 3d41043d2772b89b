"""The daemon's side of confinement, on a real :class:`fdship.daemon.agent.Daemon` and real files.

The store's own rules are tested in ``test_store_confinement.py``; here we
check that the daemon builds its store with them (``allow_dest`` and
``allow_hardlinked_sources`` from its config), that its destination check
turns a directory swapped under it into a refusal instead of an exception
(the center would have seen a 500), and that the skip-if-unchanged check
applies the store's hard-link rule, so it cannot be used to test a guessed
hash of a file outside ``allow_source``.  The end-to-end escapes against
real processes are in ``tests/security/test_confinement.py``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import xxhash

from fdship import protocol as P
from fdship.config import DaemonConfig, load
from fdship.daemon.agent import Daemon
from fdship.errors import BadRequest, LocalIOError
from tests.daemon.conftest import run

SECRET = b"outside allow_source: never shipped, never confirmed\n"
HEX0 = "2d06800538d394c2"  # xxh3-64 of no bytes


def daemon_cfg(tmp_path: Path, **kw: Any) -> DaemonConfig:
    values = {"data_dir": str(tmp_path / "data"), "listen": "127.0.0.1:0", "name": "t1",
              "root": str(tmp_path / "root"), **kw}
    return load(DaemonConfig, values)  # type: ignore[no-any-return]


async def _with_daemon(cfg: DaemonConfig, body: Any) -> Any:
    d = Daemon(cfg)
    d.store.open()
    try:
        return await body(d)
    finally:
        await d.stop()


# ---------------------------------------------------------------------- the store's wiring


def test_allow_dest_confines_the_store_even_with_root_slash(tmp_path: Path) -> None:
    """With root / and allow_dest A, a link inside A passes the daemon's path check (it
    resolves inside A) but the store, built with allow_dest, never follows it.  Built
    without it (root /: nothing confined) the write would have gone through the link."""
    allowed = tmp_path / "A"
    (allowed / "real").mkdir(parents=True)
    (allowed / "link").symlink_to(allowed / "real")
    cfg = daemon_cfg(tmp_path, root="/", allow_dest=[str(allowed)])

    async def body(d: Daemon) -> None:
        final = d.store.final_path(str(allowed / "link" / "f.bin"))
        d.check_dest_allowed(final)  # the path check alone lets it through
        with pytest.raises(LocalIOError, match="symbolic link inside a directory"):
            d.store.open_staging("J1", 0, str(allowed / "link" / "f.bin"), 0, HEX0, 65536)
        assert os.listdir(allowed / "real") == []
        # A real directory under A is fine, and the file lands there.
        st = d.store.open_staging("J1", 1, str(allowed / "real" / "g.bin"), 0, HEX0, 65536)
        d.store.pack("J1", 1)
        assert (allowed / "real" / "g.bin").read_bytes() == b""
        assert st.final_path == str(allowed / "real" / "g.bin")
        # Outside A: refused by the store too, whatever the path check says.
        with pytest.raises(LocalIOError, match="not inside allow_dest"):
            d.store.open_staging("J1", 2, str(tmp_path / "elsewhere" / "h.bin"), 0, HEX0,
                                 65536)
        assert not (tmp_path / "elsewhere").exists()

    run(_with_daemon(cfg, body))


def _hardlinked(tmp_path: Path) -> tuple[Path, Path]:
    allowed, out = tmp_path / "A", tmp_path / "OUT"
    allowed.mkdir()
    out.mkdir()
    secret = out / "secret"
    secret.write_bytes(SECRET)
    link = allowed / "hardlink"
    os.link(secret, link)
    return allowed, link


@pytest.mark.parametrize("opt_in", [False, True])
def test_hardlinked_sources_follow_the_config(tmp_path: Path, opt_in: bool) -> None:
    allowed, link = _hardlinked(tmp_path)
    cfg = daemon_cfg(tmp_path, allow_source=[str(allowed)], allow_hardlinked_sources=opt_in)

    async def body(d: Daemon) -> None:
        if opt_in:
            snap = d.store.snapshot(str(link), 65536, d.source_allowed)
            assert snap.xxh3 == xxhash.xxh3_64(SECRET).hexdigest()
        else:
            with pytest.raises(BadRequest, match="has 2 hard links") as ei:
                d.store.snapshot(str(link), 65536, d.source_allowed)
            assert ei.value.status == 403 and "allow_hardlinked_sources" in str(ei.value)

    run(_with_daemon(cfg, body))


# ---------------------------------------------------------------------- skip if unchanged


@pytest.mark.parametrize("opt_in", [False, True])
def test_skip_if_unchanged_cannot_confirm_a_hash_through_a_hard_link(tmp_path: Path,
                                                                     opt_in: bool) -> None:
    """A right guess of the secret's hash and a wrong one get the same answer (no skip)
    while hard-linked sources are refused; with the opt-in the link is a source like any
    other, and an unchanged one is skipped."""
    allowed, link = _hardlinked(tmp_path)
    cfg = daemon_cfg(tmp_path, allow_source=[str(allowed)], allow_hardlinked_sources=opt_in)
    right = xxhash.xxh3_64(SECRET).hexdigest()

    async def body(d: Daemon) -> None:
        def req(guess: str) -> P.ApiRequest:
            return P.ApiRequest.from_json({"files": [str(link)], "machines": ["t2"],
                                           "skip_if_unchanged": {str(link): guess}})
        got_right = await d.unchanged(req(right))
        got_wrong = await d.unchanged(req("0123456789abcdef"))
        assert got_wrong is None
        if opt_in:
            assert got_right is not None and got_right.startswith("unchanged")
        else:
            assert got_right is None, "a guessed hash was confirmed through a hard link"

    run(_with_daemon(cfg, body))


def test_skip_if_unchanged_still_skips_a_single_link_file(tmp_path: Path) -> None:
    """The hard-link rule costs nothing for ordinary files: one link, unchanged, skipped."""
    allowed = tmp_path / "A"
    allowed.mkdir()
    f = allowed / "plain"
    f.write_bytes(b"plain bytes\n")
    cfg = daemon_cfg(tmp_path, allow_source=[str(allowed)])

    async def body(d: Daemon) -> None:
        r = P.ApiRequest.from_json({"files": [str(f)], "machines": ["t2"],
                                    "skip_if_unchanged": {
                                        str(f): xxhash.xxh3_64(b"plain bytes\n").hexdigest()}})
        assert (await d.unchanged(r) or "").startswith("unchanged")

    run(_with_daemon(cfg, body))


# ---------------------------------------------------------------------- a racing directory

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _exchange(a: str, b: str) -> None:
    """Swap two names atomically (renameat2 RENAME_EXCHANGE)."""
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_a_directory_swapped_during_the_destination_check_is_a_refusal(tmp_path: Path) -> None:
    """os.path.realpath raises EINVAL when a link it has just seen is a directory again by
    the time it reads it.  The check must turn that into LocalIOError (a nack with a
    sentence), never let the OSError out (a 500 to the center)."""
    if not hasattr(_libc, "renameat2"):
        pytest.skip("renameat2 is needed to swap a directory and a link atomically")
    cfg = daemon_cfg(tmp_path)
    race = tmp_path / "root" / "race"
    sub, other = race / "sub", race / "sub.other"
    sub.mkdir(parents=True)
    (tmp_path / "away").mkdir()
    other.symlink_to(tmp_path / "away")
    stop = threading.Event()
    thread_errors: list[OSError] = []

    def swapper() -> None:
        deadline = time.monotonic() + 30
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                _exchange(str(sub), str(other))
        except OSError as e:
            thread_errors.append(e)

    async def body(d: Daemon) -> tuple[int, int, int]:
        final = d.store.final_path("/race/sub/f.bin")
        ok = refused = changed = 0
        th = threading.Thread(target=swapper, daemon=True)
        th.start()
        try:
            # Until the race has been hit a few times (it takes thousands of calls), bounded.
            deadline = time.monotonic() + 10
            calls = 0
            while time.monotonic() < deadline and changed < 3 and calls < 2_000_000:
                calls += 1
                try:
                    d.check_dest_allowed(final)
                    ok += 1
                except LocalIOError as e:
                    refused += 1
                    msg = str(e)
                    if "changed while it was resolved" in msg:
                        changed += 1
                        assert "try again" in msg and final in msg, msg
                    else:  # it resolved through the link: outside the root
                        assert "outside the root" in msg, msg
        finally:
            stop.set()
            th.join(10)
        return ok, refused, changed

    ok, refused, changed = run(_with_daemon(cfg, body))
    assert not thread_errors, thread_errors
    print(f"destination checks: passed={ok} refused={refused} (directory changed: {changed})")
    assert ok > 0 and refused > 0
    assert changed >= 1, "the race was never hit: the test proved nothing"
