"""Where a store may write and what it may ship, on real files, links and hard links.

Destinations are reached from an allowed directory one component at a time
without following links, and the temp file is created and renamed relative to
the directory so reached; a thread that swaps a directory for a link while
files are staged and installed must never get one byte outside the allowed
root.  Sources with more than one hard link are refused while sources are
confined, unless the store opts in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xxhash

from fdship.daemon.store import Store
from fdship.errors import BadRequest, LocalIOError
from tests.daemon.conftest import CS, chunk_hashes

VICTIM = b"victim: must never change\n"


class Site:
    """A root with an allowed directory inside it, and OUT outside both."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.data = self.root / "data"  # the allowed directory
        self.out = base / "OUT"
        self.victim_dir = self.out / "dir"
        for d in (self.data, self.victim_dir):
            d.mkdir(parents=True)
        (self.out / "victim").write_bytes(VICTIM)
        (self.victim_dir / "f.bin").write_bytes(VICTIM)
        self.before = self.snapshot_out()

    def snapshot_out(self) -> dict[str, str]:
        found = {}
        for dirpath, dirs, files in os.walk(self.out):
            for name in files + dirs:
                p = os.path.join(dirpath, name)
                found[p] = ("link" if os.path.islink(p) else "dir" if os.path.isdir(p) else
                            hashlib.sha256(Path(p).read_bytes()).hexdigest())
        return found

    def intact(self) -> None:
        """Nothing in OUT was added, removed or changed."""
        assert self.snapshot_out() == self.before


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


@pytest.fixture
def stores() -> Iterator[Callable[..., Store]]:
    made: list[Store] = []

    def make(data_dir: Path, root: Path | str, **kw: object) -> Store:
        s = Store(str(data_dir), str(root), **kw)  # type: ignore[arg-type]
        s.open()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def stage(store: Store, job: str, dest: str, data: bytes) -> None:
    """Stage ``data`` at ``dest`` as the fetcher would: pwrite every chunk, mark it."""
    st = store.open_staging(job, 0, dest, len(data), xxhash.xxh3_64(data).hexdigest(), CS)
    for c, h in enumerate(chunk_hashes(data, CS)):
        off, length = st.span(c)
        os.pwrite(st.write_fd, data[off:off + length], off)
        st.mark_chunk(c, h)


# -- links below, at and above the allowed directory ---------------------------------


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_a_link_below_the_allowed_directory_is_never_followed(site: Site, stores, target: str
                                                              ) -> None:
    s = stores(site.base / "d", site.root, allow_dest=[str(site.data)])
    (site.data / "real").mkdir()
    os.symlink(site.victim_dir if target == "outside" else site.data / "real",
               site.data / "sub")
    with pytest.raises(LocalIOError, match=r"sub is a symbolic link inside a directory this "
                                           r"daemon may write to.*replace it with a real"):
        s.open_staging("j", 0, "/data/sub/f.bin", 5, "0" * 16, CS)
    # Deeper too: a link two levels down, and a link as the last directory.
    (site.data / "a").mkdir()
    os.symlink(site.victim_dir, site.data / "a" / "b")
    with pytest.raises(LocalIOError, match="symbolic link"):
        s.open_staging("j", 1, "/data/a/b/c/f.bin", 5, "0" * 16, CS)
    site.intact()
    assert os.listdir(site.data / "real") == []


def test_a_destination_outside_allow_dest_is_refused_by_the_store(site: Site, stores) -> None:
    s = stores(site.base / "d", site.root, allow_dest=[str(site.data)])
    (site.root / "other").mkdir()
    with pytest.raises(LocalIOError, match=r"is not inside allow_dest .*choose a destination"):
        s.open_staging("j", 0, "/other/f.bin", 5, "0" * 16, CS)
    # A sibling whose name merely starts like the allowed directory is outside too.
    with pytest.raises(LocalIOError, match="not inside allow_dest"):
        s.open_staging("j", 1, "/data-evil/f.bin", 5, "0" * 16, CS)
    assert not (site.root / "data-evil").exists()
    assert os.listdir(site.root / "other") == []


def test_links_above_the_allowed_directory_are_the_operators_and_honoured(site: Site,
                                                                          stores) -> None:
    """allow_dest named through a link, and a destination spelled through another."""
    (site.base / "alias").symlink_to(site.root)
    s = stores(site.base / "d", "/", allow_dest=[str(site.base / "alias" / "data")])
    for i, dest in enumerate((site.base / "alias" / "data" / "x" / "a.bin",
                              site.data / "x" / "b.bin")):
        stage(s, f"j{i}", str(dest), b"content %d" % i)
        s.pack(f"j{i}", 0)
    assert (site.data / "x" / "a.bin").read_bytes() == b"content 0"
    assert (site.data / "x" / "b.bin").read_bytes() == b"content 1"


def test_the_root_alone_confines_when_there_is_no_allow_dest(site: Site, stores) -> None:
    s = stores(site.base / "d", site.root)
    os.symlink(site.victim_dir, site.root / "away")
    with pytest.raises(LocalIOError, match="symbolic link"):
        s.open_staging("j", 0, "/away/f.bin", 5, "0" * 16, CS)
    stage(s, "ok", "/fresh/dirs/f.bin", b"fine")  # missing directories are still made
    s.pack("ok", 0)
    assert (site.root / "fresh" / "dirs" / "f.bin").read_bytes() == b"fine"
    site.intact()


def test_without_confinement_links_are_followed_as_before(site: Site, stores) -> None:
    """Root / and no allow_dest: the daemon may write anywhere, so a link is just a path."""
    (site.base / "lnk").symlink_to(site.data)
    s = stores(site.base / "d", "/")
    stage(s, "j", str(site.base / "lnk" / "f.bin"), b"through the link")
    s.pack("j", 0)
    assert (site.data / "f.bin").read_bytes() == b"through the link"


# -- a directory changed between staging and install ----------------------------------


def test_a_directory_swapped_for_a_link_before_pack_installs_nothing(site: Site,
                                                                      stores) -> None:
    s = stores(site.base / "d", site.root, allow_dest=[str(site.data)])
    stage(s, "j", "/data/sub/f.bin", b"shipped bytes")
    sub = site.data / "sub"
    os.rename(sub, site.data / "sub.real")
    os.symlink(site.victim_dir, sub)
    with pytest.raises(LocalIOError, match="symbolic link"):
        s.pack("j", 0)
    site.intact()
    # Put back, the same staging installs: nothing was lost or half-done.
    sub.unlink()
    os.rename(site.data / "sub.real", sub)
    s.pack("j", 0)
    assert (sub / "f.bin").read_bytes() == b"shipped bytes"
    assert sorted(os.listdir(sub)) == ["f.bin"]


def test_a_directory_replaced_by_another_before_pack_installs_nothing(site: Site,
                                                                       stores) -> None:
    """A real directory swapped in: the temp file found there is not ours, so no rename."""
    s = stores(site.base / "d", site.root, allow_dest=[str(site.data)])
    stage(s, "j", "/data/sub/f.bin", b"shipped bytes")
    sub = site.data / "sub"
    os.rename(sub, site.data / "moved")
    sub.mkdir()
    planted = sub / ".f.bin.fdship-j-0.part"
    planted.write_bytes(b"planted by someone else")
    with pytest.raises(LocalIOError, match="moved or replaced while job j file 0"):
        s.pack("j", 0)
    assert sorted(os.listdir(sub)) == [planted.name]
    assert planted.read_bytes() == b"planted by someone else"
    # Dropping the job leaves the stranger's file alone too.
    s.drop_job("j")
    assert planted.read_bytes() == b"planted by someone else"


def test_drop_job_removes_its_temp_file_through_the_walk(site: Site, stores) -> None:
    s = stores(site.base / "d", site.root, allow_dest=[str(site.data)])
    stage(s, "j", "/data/sub/f.bin", b"abc")
    assert os.listdir(site.data / "sub") == [".f.bin.fdship-j-0.part"]
    s.drop_job("j")
    assert os.listdir(site.data / "sub") == []


def test_a_staging_behind_a_swapped_link_is_forgotten_on_restart(site: Site,
                                                                  stores) -> None:
    data_dir = site.base / "d"
    s = stores(data_dir, site.root, allow_dest=[str(site.data)])
    stage(s, "j", "/data/sub/f.bin", b"abc")
    s.close()
    sub = site.data / "sub"
    os.rename(sub, site.data / "sub.real")
    os.symlink(site.victim_dir, sub)
    s2 = stores(data_dir, site.root, allow_dest=[str(site.data)])
    assert s2.staging("j", 0) is None
    site.intact()


# -- the race -----------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> None:
    """Swap two names atomically (renameat2 RENAME_EXCHANGE); two renames where missing."""
    if hasattr(_libc, "renameat2"):
        if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                           _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    tmp = a.with_name(a.name + ".x")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


def test_racing_directory_swap_never_writes_outside_the_allowed_root(site: Site,
                                                                     stores) -> None:
    """One thread swaps data/sub between a real directory and a link to OUT/dir as fast
    as it can; the main thread stages, writes and installs files under data/sub.  Each
    install lands inside data (in whichever name the real directory has) or is refused;
    OUT never changes."""
    s = stores(site.base / "d", site.root, allow_dest=[str(site.data)])
    sub, other = site.data / "sub", site.data / "sub.other"
    sub.mkdir()
    other.symlink_to(site.victim_dir)
    stop = threading.Event()
    swaps = [0]
    errors: list[OSError] = []

    def swapper() -> None:
        deadline = time.monotonic() + 20
        try:
            while not stop.is_set() and swaps[0] < 2_000_000 and time.monotonic() < deadline:
                exchange(sub, other)
                swaps[0] += 1
        except OSError as e:  # surfaced below, never lost in the thread
            errors.append(e)

    th = threading.Thread(target=swapper, daemon=True)
    installed: dict[str, bytes] = {}
    refused = 0
    attempts = 0
    th.start()
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and attempts < 300:
            job = f"r{attempts}"
            data = os.urandom(2 * CS + attempts)
            attempts += 1
            try:
                stage(s, job, f"/data/sub/f{attempts}.bin", data)
                s.pack(job, 0)
                installed[f"f{attempts}.bin"] = data
            except LocalIOError:
                refused += 1
            finally:
                s.drop_job(job)
    finally:
        stop.set()
        th.join(10)
    assert not errors, errors
    print(f"swaps={swaps[0]} attempts={attempts} installed={len(installed)} refused={refused}")
    assert swaps[0] > 100 and attempts >= 20
    assert len(installed) + refused == attempts
    site.intact()
    # Every installed file is inside data, whole; no temp file was left anywhere.
    real = sub if sub.is_dir() and not sub.is_symlink() else other
    assert real.is_dir() and not real.is_symlink()
    assert sorted(os.listdir(real)) == sorted(installed)
    for name, data in installed.items():
        assert (real / name).read_bytes() == data


# -- hard links -------------------------------------------------------------------------


def inside(directory: Path) -> Callable[[str], bool]:
    d = str(directory)
    return lambda p: p == d or p.startswith(d + "/")


def test_a_hard_link_to_a_file_elsewhere_is_not_shipped(site: Site, stores) -> None:
    allowed = site.base / "A"
    allowed.mkdir()
    secret = site.out / "victim"
    os.link(secret, allowed / "hl")
    s = stores(site.base / "d", "/")
    with pytest.raises(BadRequest, match=r"has 2 hard links.*ship a copy of it instead .*"
                                         r"allow_hardlinked_sources") as ei:
        s.snapshot(str(allowed / "hl"), CS, inside(allowed))
    assert ei.value.status == 403
    assert os.listdir(site.base / "d" / "pending") == []  # no copy of the secret kept
    # A plain file beside it ships; so does the hard link when nothing is confined.
    (allowed / "plain").write_bytes(b"plain")
    assert s.snapshot(str(allowed / "plain"), CS, inside(allowed)).size == 5
    assert s.snapshot(str(allowed / "hl"), CS, lambda p: True).size == len(VICTIM)
    assert s.snapshot(str(allowed / "hl"), CS, None).size == len(VICTIM)


def test_hard_links_ship_when_the_store_opts_in(site: Site, stores) -> None:
    allowed = site.base / "A"
    allowed.mkdir()
    (allowed / "one").write_bytes(b"twice linked")
    os.link(allowed / "one", allowed / "two")  # both names inside: still refused by default
    s = stores(site.base / "d", "/")
    with pytest.raises(BadRequest, match="hard links"):
        s.snapshot(str(allowed / "two"), CS, inside(allowed))
    s2 = stores(site.base / "d2", "/", allow_hardlinked_sources=True)
    snap = s2.snapshot(str(allowed / "two"), CS, inside(allowed))
    assert Path(snap.copy_path).read_bytes() == b"twice linked"
