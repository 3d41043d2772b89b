"""The daemon's store: snapshots, staging, pack, restart re-verification, local errors.

Real files, real fsync and rename, real tmpfs mounts for disk-full and read-only
cases, and a second process running as an unprivileged user for permission errors.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import stat
from pathlib import Path
from typing import Callable

import pytest
import xxhash

from fdship.daemon.store import Store, free_space, start_writeback
from fdship.errors import BadRequest, Conflict, IntegrityError, LocalIOError, NotFound
from fdship.protocol import chunk_count
from tests.daemon.conftest import CS, chunk_hashes, file_xxh3, write_random

StoreFactory = Callable[..., Store]


def stage_bytes(store: Store, job: str, dest: str, data: bytes, cs: int = CS,
                file: int = 0, mark: bool = True):
    """Stage ``data`` as if every chunk had been fetched and verified."""
    st = store.open_staging(job, file, dest, len(data), xxhash.xxh3_64(data).hexdigest(), cs)
    for c, h in enumerate(chunk_hashes(data, cs)):
        off, length = st.span(c)
        os.pwrite(st.write_fd, data[off:off + length], off)
        if mark:
            st.mark_chunk(c, h)
    return st


# --- snapshots ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, 3 * CS, 3 * CS + 1])
def test_snapshot_hashes_every_chunk_and_the_whole(store_factory: StoreFactory, tmp_path: Path,
                                                   size: int) -> None:
    s = store_factory()
    src = tmp_path / "src.bin"
    data = write_random(src, size, seed=size)
    snap = s.snapshot(str(src), CS)
    assert snap.size == size
    assert snap.xxh3 == xxhash.xxh3_64(data).hexdigest()
    assert snap.chunks == chunk_hashes(data, CS)
    assert len(snap.chunks) == chunk_count(size, CS)
    assert all(len(h) == 16 for h in snap.chunks)
    assert Path(snap.copy_path).read_bytes() == data
    assert snap.path == str(src)


def test_snapshot_chunk_size_not_a_multiple_of_the_buffer(store_factory: StoreFactory,
                                                          tmp_path: Path) -> None:
    # 1.5 MiB chunks straddle the 1 MiB read buffer: chunk boundaries must not drift.
    s = store_factory()
    src = tmp_path / "odd.bin"
    data = write_random(src, 4 * 1024 * 1024 + 5, seed=9)
    cs = 1536 * 1024
    snap = s.snapshot(str(src), cs)
    assert snap.chunks == chunk_hashes(data, cs)


def test_snapshot_is_a_private_copy(store_factory: StoreFactory, tmp_path: Path) -> None:
    s = store_factory()
    src = tmp_path / "src.bin"
    data = write_random(src, 3 * CS, seed=3)
    snap = s.snapshot(str(src), CS)
    s.commit_snapshots("job-a", [snap.key])
    with open(src, "r+b") as f:  # edit in place, then truncate
        f.write(b"X" * CS)
        f.truncate(CS + 10)
    fd, off, length = s.chunk_source("job-a", 0, 0)
    assert os.pread(fd, length, off) == data[:CS]
    fd, off, length = s.chunk_source("job-a", 0, 2)
    assert os.pread(fd, length, off) == data[2 * CS:]


def test_snapshot_refuses_what_is_not_a_readable_regular_file(store_factory: StoreFactory,
                                                              tmp_path: Path) -> None:
    s = store_factory()
    with pytest.raises(BadRequest, match="no such file"):
        s.snapshot(str(tmp_path / "missing"), CS)
    with pytest.raises(BadRequest, match="is a directory, not a regular file"):
        s.snapshot(str(tmp_path), CS)
    with pytest.raises(BadRequest, match="is a device"):
        s.snapshot("/dev/null", CS)
    with pytest.raises(BadRequest, match="absolute path"):
        s.snapshot("relative/file", CS)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Must return at once (no writer will ever open the fifo), not block.
    with pytest.raises(BadRequest, match="named pipe"):
        s.snapshot(str(fifo), CS)
    assert os.listdir(os.path.join(s.data_dir, "pending")) == []


def test_snapshot_permission_denied_as_unprivileged_user(store_factory: StoreFactory,
                                                        tmp_path: Path) -> None:
    # Root reads everything, so the snapshot runs in a forked child that first
    # drops to the unprivileged 'nobody' user; the message comes back on a pipe.
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    s = store_factory()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * 100)
    os.chmod(secret, 0)
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(rd)
            os.setgid(65534)
            os.setuid(65534)
            try:
                s.snapshot(str(secret), CS)
                msg = "no error"
            except BadRequest as e:
                msg = "BadRequest: " + str(e)
            os.write(wr, msg.encode())
        finally:
            os._exit(0)
    os.close(wr)
    with os.fdopen(rd, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    assert out.startswith("BadRequest: ") and "permission denied; make the file readable" in out


def test_commit_renames_and_discard_removes(store_factory: StoreFactory, tmp_path: Path) -> None:
    s = store_factory()
    a, b = tmp_path / "a", tmp_path / "b"
    write_random(a, 10, 1)
    write_random(b, CS + 1, 2)
    sa, sb = s.snapshot(str(a), CS), s.snapshot(str(b), CS)
    ino = os.stat(sb.copy_path).st_ino
    s.commit_snapshots("job1", [sa.key, sb.key])
    src1 = s.source("job1", 1)
    assert src1 is not None and os.stat(src1.copy_path).st_ino == ino  # renamed, not copied
    assert {h.file: h.chunks for h in s.inventory()} == {0: (0,), 1: (0, 1)}
    with pytest.raises(NotFound):
        s.commit_snapshots("job2", [sa.key])  # already attached
    sc = s.snapshot(str(a), CS)
    s.discard_snapshot(sc.key)
    assert not os.path.exists(sc.copy_path)
    with pytest.raises(BadRequest, match="malformed"):
        s.commit_snapshots("../evil", [])


# --- staging ----------------------------------------------------------------------------------


def test_open_staging_creates_temp_beside_final(store_factory: StoreFactory) -> None:
    s = store_factory()
    st = s.open_staging("j1", 2, "/srv/new/dir/f.bin", 5 * CS, "0" * 16, CS)
    final = os.path.join(s.root, "srv/new/dir/f.bin")
    assert st.final_path == final
    assert os.path.dirname(st.temp_path) == os.path.dirname(final)
    assert os.path.basename(st.temp_path) == ".f.bin.fdship-j1-2.part"
    assert os.fstat(st.write_fd).st_size == 5 * CS
    assert os.stat(st.temp_path).st_blocks * 512 >= 5 * CS  # space reserved, not sparse
    assert not os.path.exists(final)
    assert s.open_staging("j1", 2, "/srv/new/dir/f.bin", 5 * CS, "0" * 16, CS) is st
    with pytest.raises(Conflict):
        s.open_staging("j1", 2, "/srv/other", 5 * CS, "0" * 16, CS)


def test_root_mapping_and_dest_validation(tmp_path: Path) -> None:
    assert Store(str(tmp_path / "d"), "/").final_path("/etc/x.conf") == "/etc/x.conf"
    s = Store(str(tmp_path / "d"), str(tmp_path / "root"))
    assert s.final_path("/etc/x.conf") == str(tmp_path / "root/etc/x.conf")
    for bad in ("relative", "/a/../../etc/passwd", "/", "/dir/"):
        with pytest.raises(BadRequest):
            s.final_path(bad)


def test_dest_is_a_directory(store_factory: StoreFactory) -> None:
    s = store_factory()
    os.makedirs(os.path.join(s.root, "srv/f.bin"))
    with pytest.raises(LocalIOError, match="is a directory; remove it or choose another"):
        s.open_staging("j", 0, "/srv/f.bin", 10, "0" * 16, CS)
    assert os.listdir(os.path.join(s.root, "srv")) == ["f.bin"]


def test_parent_is_not_a_directory(store_factory: StoreFactory) -> None:
    s = store_factory()
    os.makedirs(s.root)
    Path(s.root, "srv").write_bytes(b"a file")
    with pytest.raises(LocalIOError, match="srv exists and is not a directory"):
        s.open_staging("j", 0, "/srv/sub/f.bin", 10, "0" * 16, CS)


def test_permission_denied_immutable_dir(store_factory: StoreFactory,
                                         immutable: Callable[[str], None]) -> None:
    s = store_factory()
    d = os.path.join(s.root, "locked")
    os.makedirs(d)
    immutable(d)
    with pytest.raises(LocalIOError, match="permission denied writing .*fix its permissions"):
        s.open_staging("j", 0, "/locked/f.bin", 10, "0" * 16, CS)
    with pytest.raises(LocalIOError, match="permission denied"):
        s.open_staging("j", 1, "/locked/sub/f.bin", 10, "0" * 16, CS)


def test_read_only_file_system(store_factory: StoreFactory, tmpfs: Callable[..., str]) -> None:
    ro = tmpfs("1m", ro=True)
    s = store_factory(root=ro)
    with pytest.raises(LocalIOError, match="read-only file system"):
        s.open_staging("j", 0, "/f.bin", 10, "0" * 16, CS)


def test_disk_full_is_reported_up_front(store_factory: StoreFactory,
                                        tmpfs: Callable[..., str]) -> None:
    small = tmpfs("2m")
    s = store_factory(root=small)
    with pytest.raises(LocalIOError) as ei:
        s.open_staging("j", 0, "/big.bin", 8 * 1024 * 1024, "0" * 16, CS)
    msg = str(ei.value)
    assert "disk full" in msg and "MiB free" in msg and "8.0 MiB needed" in msg
    assert os.listdir(small) == []  # nothing half-written left behind


def test_second_staging_that_does_not_fit(store_factory: StoreFactory,
                                          tmpfs: Callable[..., str]) -> None:
    # The first staging reserved its space, so the second sees the disk as full
    # even though no byte has been fetched yet.
    small = tmpfs("4m")
    s = store_factory(root=small)
    st = s.open_staging("j", 0, "/a.bin", 3 * 1024 * 1024, "0" * 16, CS)
    assert st.size == 3 * 1024 * 1024
    with pytest.raises(LocalIOError, match=r"disk full: .* MiB free, 3.0 MiB needed"):
        s.open_staging("j", 1, "/b.bin", 3 * 1024 * 1024, "0" * 16, CS)
    assert sorted(os.listdir(small)) == [".a.bin.fdship-j-0.part"]


def test_planted_symlink_at_temp_path_is_not_followed(store_factory: StoreFactory,
                                                      tmp_path: Path) -> None:
    s = store_factory()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.makedirs(os.path.join(s.root, "srv"))
    os.symlink(victim, os.path.join(s.root, "srv/.f.bin.fdship-j-0.part"))
    st = stage_bytes(s, "j", "/srv/f.bin", b"new content")
    assert not os.path.islink(st.temp_path)
    s.pack("j", 0)
    assert victim.read_bytes() == b"precious"
    assert Path(s.root, "srv/f.bin").read_bytes() == b"new content"


def test_planted_symlink_at_final_path_is_replaced_not_followed(store_factory: StoreFactory,
                                                                tmp_path: Path) -> None:
    s = store_factory()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.makedirs(os.path.join(s.root, "srv"))
    final = os.path.join(s.root, "srv/f.bin")
    os.symlink(victim, final)
    stage_bytes(s, "j", "/srv/f.bin", b"shipped")
    s.pack("j", 0)
    assert victim.read_bytes() == b"precious"
    assert not os.path.islink(final)
    assert Path(final).read_bytes() == b"shipped"


# --- pack -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CS, 4 * CS, 4 * CS + 3])
def test_pack_installs_verified_file(store_factory: StoreFactory, size: int) -> None:
    s = store_factory()
    data = os.urandom(size)
    st = stage_bytes(s, "j", "/srv/f.bin", data)
    r = s.pack("j", 0)
    assert r.path == st.final_path and r.size == size and not r.from_snapshot
    assert Path(r.path).read_bytes() == data
    assert not os.path.exists(st.temp_path)
    assert s.pack("j", 0).already
    # Still served after install, from the installed inode.
    inv = s.inventory()
    assert inv[0].packed and inv[0].chunks == tuple(range(chunk_count(size, CS)))
    for c in range(chunk_count(size, CS)):
        fd, off, length = s.chunk_source("j", 0, c)
        assert os.pread(fd, length, off) == data[off:off + length]


def test_pack_keeps_existing_file_mode(store_factory: StoreFactory) -> None:
    s = store_factory()
    final = Path(s.root, "etc/app.conf")
    final.parent.mkdir(parents=True)
    final.write_bytes(b"old")
    os.chmod(final, 0o640)
    stage_bytes(s, "j", "/etc/app.conf", b"new")
    s.pack("j", 0)
    assert stat.S_IMODE(os.stat(final).st_mode) == 0o640
    assert final.read_bytes() == b"new"


def test_pack_mismatch_installs_nothing_and_resets_chunks(store_factory: StoreFactory) -> None:
    s = store_factory()
    final = Path(s.root, "srv/f.bin")
    final.parent.mkdir(parents=True)
    final.write_bytes(b"previous version")
    data = os.urandom(3 * CS)
    hashes = chunk_hashes(data, CS)
    st = stage_bytes(s, "j", "/srv/f.bin", data, mark=False)
    st.mark_chunk(1, hashes[1])
    st.mark_chunk(2, hashes[2])
    s.wait_writeback()  # chunk 0 is missing: nothing is hashed ahead yet
    os.pwrite(st.write_fd, b"\xff", CS + 7)  # a bit flip after chunk 1 was verified
    st.mark_chunk(0, hashes[0])
    with pytest.raises(IntegrityError, match="nothing was installed"):
        s.pack("j", 0)
    assert final.read_bytes() == b"previous version"
    assert os.path.exists(st.temp_path)
    assert s.inventory()[0].chunks == ()
    assert s.chunk_source("j", 0, 0) is None
    # The center refetches; this time the bytes are right.
    os.pwrite(st.write_fd, data, 0)
    for c, h in enumerate(chunk_hashes(data, CS)):
        st.mark_chunk(c, h)
    s.pack("j", 0)
    assert final.read_bytes() == data
    # Installed from hashes taken as the chunks arrived: it still serves them all.
    assert s.inventory()[0].chunks == (0, 1, 2)
    assert st.verified == dict(enumerate(chunk_hashes(data, CS)))


@pytest.mark.parametrize("write_behind", [True, False])
def test_install_hashes_only_what_was_not_hashed_ahead(tmp_path: Path,
                                                      write_behind: bool) -> None:
    """The writeback thread feeds the whole-file hash as verified chunks join
    the front, with or without write-behind; the install reads back only the
    rest, and a staging restored after a restart is read back whole."""
    s = Store(str(tmp_path / "data"), str(tmp_path / "root"), write_behind=write_behind)
    s.open()
    data = os.urandom(5 * CS + 77)
    hashes = chunk_hashes(data, CS)
    st = stage_bytes(s, "j", "/srv/a.bin", data, mark=False)
    for c in (1, 2, 0, 4):  # 0, 1, 2 join the front; 4 waits for 3
        st.mark_chunk(c, hashes[c])
    s.wait_writeback()
    assert st._hashed == 3 * CS
    st.mark_chunk(5, hashes[5])
    st.mark_chunk(3, hashes[3])
    res = s.pack("j", 0)  # may race the thread for chunks 3-5: both ways are right
    assert res.read_back in range(0, 2 * CS + 78) and res.read_back % CS in (0, 77)
    assert Path(s.root, "srv/a.bin").read_bytes() == data
    # Everything hashed ahead: nothing to read back.
    st = stage_bytes(s, "j", "/srv/b.bin", data, file=1)
    s.wait_writeback()
    assert s.pack("j", 1).read_back == 0
    # After a restart the hash starts over: the install reads the file back whole.
    stage_bytes(s, "j", "/srv/c.bin", data, file=2)
    s.wait_writeback()
    s.close()
    s2 = Store(str(tmp_path / "data"), str(tmp_path / "root"), write_behind=write_behind)
    s2.open()
    res = s2.pack("j", 2)
    assert res.read_back == len(data) and Path(s2.root, "srv/c.bin").read_bytes() == data
    s2.close()


def test_a_failed_read_ahead_leaves_the_hash_for_the_install(store_factory: StoreFactory,
                                                             tmp_path: Path) -> None:
    """A read that ends early (the file cut short under us) feeds nothing; the
    install then finds the file short and installs nothing."""
    s = store_factory()
    data = os.urandom(3 * CS)
    st = stage_bytes(s, "j", "/srv/f.bin", data, mark=False)
    hashes = chunk_hashes(data, CS)
    st.mark_chunk(0, hashes[0])
    s.wait_writeback()
    assert st._hashed == CS
    os.ftruncate(st.write_fd, CS + 10)  # chunk 1 now ends early
    st.mark_chunk(1, hashes[1])
    s.wait_writeback()
    assert st._hashed == CS  # not advanced, and not half-fed either
    os.ftruncate(st.write_fd, 3 * CS)
    os.pwrite(st.write_fd, data, 0)
    st.mark_chunk(2, hashes[2])
    s.wait_writeback()
    assert st._hashed == 3 * CS
    assert s.pack("j", 0).read_back == 0
    assert Path(s.root, "srv/f.bin").read_bytes() == data


def test_served_bytes_survive_replacement_of_the_installed_file(
        store_factory: StoreFactory) -> None:
    s = store_factory()
    data = os.urandom(2 * CS)
    stage_bytes(s, "j1", "/srv/f.bin", data)
    s.pack("j1", 0)
    newer = os.urandom(2 * CS)
    stage_bytes(s, "j2", "/srv/f.bin", newer)
    s.pack("j2", 0)  # renamed over j1's file
    fd, off, length = s.chunk_source("j1", 0, 1)
    assert os.pread(fd, length, off) == data[CS:]
    fd, off, length = s.chunk_source("j2", 0, 1)
    assert os.pread(fd, length, off) == newer[CS:]


def test_pack_from_own_snapshot(store_factory: StoreFactory, tmp_path: Path) -> None:
    s = store_factory()
    src = tmp_path / "src.bin"
    data = write_random(src, 5 * CS + 1, 4)
    snap = s.snapshot(str(src), CS)
    s.commit_snapshots("j", [snap.key])
    r = s.pack("j", 0, dest="/copy/of/src.bin")
    assert r.from_snapshot
    assert Path(r.path).read_bytes() == data
    assert r.path == os.path.join(s.root, "copy/of/src.bin")
    assert s.inventory()[0].packed
    with pytest.raises(NotFound):
        s.pack("j", 1)


def test_pack_from_snapshot_defaults_to_source_path(store_factory: StoreFactory,
                                                    tmp_path: Path) -> None:
    s = store_factory()
    src = tmp_path / "src.bin"
    write_random(src, CS, 5)
    snap = s.snapshot(str(src), CS)
    s.commit_snapshots("j", [snap.key])
    assert s.pack("j", 0).path == os.path.join(s.root, str(src).lstrip("/"))


# --- restart ---------------------------------------------------------------------------------


def test_staging_survives_restart_and_bad_chunks_are_dropped(tmp_path: Path) -> None:
    data_dir, root = str(tmp_path / "data"), str(tmp_path / "root")
    s = Store(data_dir, root)
    s.open()
    data = os.urandom(4 * CS + 9)
    st = stage_bytes(s, "job-7", "/srv/f.bin", data, mark=False)
    hashes = chunk_hashes(data, CS)
    for c in (0, 1, 3):
        st.mark_chunk(c, hashes[c])
    temp = st.temp_path
    s.close()  # the daemon dies ...
    with open(temp, "r+b") as f:  # ... and one recorded chunk is damaged meanwhile
        f.seek(CS + 100)
        f.write(b"\x00\x01\x02")

    s2 = Store(data_dir, root)
    s2.open()
    [h] = s2.inventory()
    assert (h.job, h.file, h.chunks, h.packed) == ("job-7", 0, (0, 3), False)
    st2 = s2.staging("job-7", 0)
    assert st2 is not None and st2.temp_path == temp
    assert s2.open_staging("job-7", 0, "/srv/f.bin", len(data),
                           xxhash.xxh3_64(data).hexdigest(), CS) is st2
    assert st2.missing() == [1, 2, 4]
    for c in st2.missing():
        off, length = st2.span(c)
        os.pwrite(st2.write_fd, data[off:off + length], off)
        st2.mark_chunk(c, hashes[c])
    s2.close()

    s3 = Store(data_dir, root)  # the records of the second run survive a third
    s3.open()
    assert s3.inventory()[0].chunks == (0, 1, 2, 3, 4)
    s3.pack("job-7", 0)
    s3.close()

    s4 = Store(data_dir, root)  # and a packed file is still offered after a restart
    s4.open()
    [h] = s4.inventory()
    assert h.packed and h.chunks == (0, 1, 2, 3, 4)
    fd, off, length = s4.chunk_source("job-7", 0, 4)
    assert os.pread(fd, length, off) == data[4 * CS:]
    assert file_xxh3(os.path.join(root, "srv/f.bin")) == xxhash.xxh3_64(data).hexdigest()
    s4.close()


def test_torn_chunk_log_line_is_ignored(tmp_path: Path) -> None:
    data_dir, root = str(tmp_path / "data"), str(tmp_path / "root")
    s = Store(data_dir, root)
    s.open()
    data = os.urandom(2 * CS)
    stage_bytes(s, "j", "/f", data)
    s.close()
    log_path = os.path.join(data_dir, "jobs/j/stage-0.chunks")
    with open(log_path, "ab") as f:
        f.write(b"1 abc")  # a crash in the middle of an append
    s2 = Store(data_dir, root)
    s2.open()
    assert s2.inventory()[0].chunks == (0, 1)
    s2.close()


def test_snapshots_are_relisted_and_reverified(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    s = Store(data_dir, "/")
    s.open()
    src = tmp_path / "src.bin"
    data = write_random(src, 3 * CS, 6)
    snap = s.snapshot(str(src), CS)
    s.commit_snapshots("j", [snap.key])
    pending = s.snapshot(str(src), CS)  # never committed: gone after restart
    copy = s.source("j", 0).copy_path
    s.close()
    with open(copy, "r+b") as f:
        f.seek(2 * CS)
        f.write(b"garbage")
    s2 = Store(data_dir, "/")
    s2.open()
    [h] = s2.inventory()
    assert h.chunks == (0, 1)
    assert s2.chunk_source("j", 0, 2) is None
    fd, off, length = s2.chunk_source("j", 0, 1)
    assert os.pread(fd, length, off) == data[CS:2 * CS]
    assert not os.path.exists(pending.copy_path)
    s2.close()


def test_drop_job_removes_everything_but_installed_files(store_factory: StoreFactory,
                                                         tmp_path: Path) -> None:
    s = store_factory()
    src = tmp_path / "src.bin"
    write_random(src, CS, 7)
    snap = s.snapshot(str(src), CS)
    s.commit_snapshots("j", [snap.key])
    st0 = stage_bytes(s, "j", "/a", b"aaa", file=0)
    st1 = stage_bytes(s, "j", "/b", b"bbb", file=1)
    s.pack("j", 1)
    stage_bytes(s, "other", "/c", b"ccc")
    assert s.jobs() == {"j", "other"}
    s.drop_job("j")
    assert s.jobs() == {"other"}
    assert not os.path.exists(st0.temp_path)
    assert Path(st1.final_path).read_bytes() == b"bbb"
    assert not os.path.exists(os.path.join(s.data_dir, "jobs/j"))
    assert s.chunk_source("j", 0, 0) is None and s.chunk_source("j", 1, 0) is None
    assert [h.job for h in s.inventory()] == ["other"]


def test_free_space_of_a_path_not_yet_created(tmp_path: Path) -> None:
    want = os.statvfs(tmp_path)
    got = free_space(str(tmp_path / "a/b/c"))
    assert abs(got - want.f_bavail * want.f_frsize) < 64 * 1024 * 1024


def test_snapshot_disk_full_in_data_dir(tmp_path: Path, tmpfs: Callable[..., str]) -> None:
    small = tmpfs("1m")
    s = Store(os.path.join(small, "data"), "/")
    s.open()
    src = tmp_path / "big.bin"
    write_random(src, 2 * 1024 * 1024, 8)
    with pytest.raises(LocalIOError, match="disk full in .* while snapshotting"):
        s.snapshot(str(src), CS)
    assert os.listdir(os.path.join(small, "data/pending")) == []
    s.close()


def test_concurrent_pack_requests_install_once(store_factory: StoreFactory) -> None:
    # The center may repeat a pack while the first is still verifying.
    import concurrent.futures

    s = store_factory()
    data = os.urandom(64 * CS)
    stage_bytes(s, "j", "/srv/f.bin", data)
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: s.pack("j", 0), range(4)))
    assert sorted(r.already for r in results) == [False, True, True, True]
    assert Path(results[0].path).read_bytes() == data


# --- write-behind -------------------------------------------------------------------------


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (longest matching mount point)."""
    best, kind = "", ""
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, fstype
    return kind


def _pages_written() -> int:
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("nr_written "):
                return int(line.split()[1])
    raise AssertionError("/proc/vmstat has no nr_written")


def test_verified_chunks_are_written_behind(tmp_path: Path) -> None:
    # A disk-backed directory: tmpfs pages are never written anywhere.
    where = next((d for d in (tmp_path, Path(__file__).parent)
                  if _fs_type(d) not in ("tmpfs", "ramfs", "")), None)
    if where is None:
        pytest.skip("no disk-backed directory to write to (tmp and the checkout are tmpfs)")
    base = Path(tempfile.mkdtemp(dir=where, prefix=".wb-"))
    try:
        s = Store(str(base / "data"), str(base / "root"))
        s.open()
        try:
            size = 64 * CS
            data = os.urandom(size)
            before = _pages_written()
            st = stage_bytes(s, "j", "/srv/wb.bin", data)
            s.wait_writeback()
            # Every verified byte was handed to the kernel's writeback, in the
            # background, long before any fsync...
            assert s.writeback_bytes == size
            # ...and the kernel really wrote it (nr_written counts pages whose
            # writeback completed, machine-wide: other writers only add to it).
            # Without write-behind these pages would stay dirty for 30 s.
            for _ in range(100):
                if _pages_written() - before >= size // 4096:
                    break
                time.sleep(0.05)
            assert _pages_written() - before >= size // 4096
            s.pack("j", 0)
            assert Path(st.final_path).read_bytes() == data
            # Packed: no more write-behind for it, and marking is a no-op.
            st.mark_chunk(0, "0" * 16)
            s.wait_writeback()
            assert s.writeback_bytes == size
        finally:
            s.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_write_behind_off_leaves_it_to_the_fsync(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "data"), str(tmp_path / "root"), write_behind=False)
    s.open()
    try:
        data = os.urandom(8 * CS)
        st = stage_bytes(s, "j", "/srv/wb.bin", data)
        s.wait_writeback()
        assert s.writeback_bytes == 0
        s.pack("j", 0)
        assert Path(st.final_path).read_bytes() == data
    finally:
        s.close()


def test_start_writeback_declines_what_it_cannot_write(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        assert start_writeback(r, 0, 4096) is False  # ESPIPE: nothing to write back
    finally:
        os.close(r)
        os.close(w)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    os.close(fd)
    with pytest.raises(OSError):
        start_writeback(fd, 0, 4096)  # a closed fd is an error, not a silent no
