"""Everything a daemon keeps on disk: source snapshots, staging files, installed files.

Where it sits: the daemon's HTTP handlers (``fdship/daemon/app.py``) call this
module; :mod:`fdship.daemon.serve` asks it which fd holds a chunk, and
:mod:`fdship.daemon.fetch` writes into the fds it hands out.  Nothing here
speaks HTTP or touches the event loop; the slow calls (:meth:`Store.snapshot`,
:meth:`Store.pack`, :meth:`Store.open`) block and are meant to run in a thread.

A job's data flows through it one way::

    source daemon:  snapshot() -> commit_snapshots() -> chunk_source() for peers
    target daemon:  open_staging() -> pwrite + mark_chunk() per fetched chunk
                    (a writeback thread starts its writeback and feeds the
                    whole-file hash, in order, as chunks join the front)
                    -> pack(): hash the rest, verify, fsync, rename onto the final path
                    -> chunk_source() keeps serving the installed inode

Layout under ``data_dir`` (internal; may change between versions)::

    pending/KEY.data, KEY.json      snapshots not yet attached to a job
    jobs/JOB/src-N.data, src-N.json  file N of JOB as snapshotted on the source
    jobs/JOB/stage-N.json           staging manifest of file N (dest, size, hash, temp path)
    jobs/JOB/stage-N.chunks         append-only log of chunks verified since the manifest

Where writes may go.  Every destination directory is reached from an
*allowed directory* (one of ``allow_dest``, or ``--root`` when it is not ``/``)
by opening one component at a time with ``O_NOFOLLOW`` relative to the
directory opened before it; the temp file is created, and renamed onto the
final name, relative to the directory descriptor so reached.  A local user who
can write inside an allowed directory and swaps one of its subdirectories for
a symbolic link therefore cannot redirect a write: the walk refuses the link,
and a swap after the walk changes nothing, since no path is looked up again.
The allowed directories themselves are resolved once, when the store is made,
as the daemon resolves them for its own checks.  With root ``/`` and no
``allow_dest`` nothing is confined, and links on the way are followed.

Which sources may be shipped.  A hard link inside ``allow_source`` is another
name for a file that may live anywhere on the same file system, so a source
with more than one link is refused while sources are confined, unless the
store was made with ``allow_hardlinked_sources``.

Durability is spent only where it buys something.  Snapshots, manifests and
the chunk log are never fsynced: after a crash :meth:`Store.open` re-hashes
every chunk it claims to hold and forgets those that no longer match, so a
torn write costs a refetch, never a wrong byte.  The installed file is fsynced
before the rename and its directory after, because that is the promise made to
users: no reader ever sees a partial or unverified file at the final path.

Write-behind.  Left alone, a staging file's pages stay dirty until that fsync
(the kernel's background writeback starts only at ``dirty_background_ratio``
of RAM), so the fsync at pack time writes the whole file in one burst, at the
end of the job when every target does the same, and the job waits for it.  So
each verified chunk's range is handed to the kernel's writeback at once
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``, as RocksDB's ``bytes_per_sync``
does), from one worker thread since the call may wait for a busy disk queue.
The fsync at pack time then finds little left to write, and a bidding host
never carries a whole file's worth of dirty pages.  Durability is unchanged:
only the fsync is a promise.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import xxhash

from fdship.errors import BadRequest, Conflict, IntegrityError, LocalIOError, NotFound
from fdship.protocol import Holding, chunk_count, chunk_span

log = logging.getLogger("fdship.daemon.store")

# One read buffer per blocking operation: large enough that syscall overhead
# vanishes, small enough that memory stays flat whatever the file size.
IO_BUFFER = 1024 * 1024

MiB = 1024 * 1024

_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_HEX_RE = re.compile(r"^[0-9a-f]{16}$")

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# How a directory on the way to a destination is opened: read-only (enough for
# openat, renameat and fsync), never a link.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def _find_sync_file_range() -> Callable[..., int] | None:
    """libc's sync_file_range, or None where there is none (not Linux)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _find_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to disk.

    Does not wait for the writes and promises nothing about durability.
    Returns False where the call does not exist or the file system refuses it
    (then there is nothing to do: the fsync at pack time writes everything);
    raises OSError for an I/O error, which the fsync would report too.
    """
    if _sync_file_range is None:
        return False
    if _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err))


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n >= 10 * MiB else f"{n / MiB:.1f} MiB"


def check_job_id(job: str) -> str:
    """Job ids become directory names, so only a safe alphabet is accepted."""
    if not isinstance(job, str) or not _JOB_RE.match(job):
        raise BadRequest(f"job id {job!r} is malformed: expected up to 128 letters, digits, "
                         "'.', '_', ':' or '-', not starting with a punctuation mark")
    return job


def free_space(path: str) -> int:
    """Bytes available to an unprivileged writer on the file system holding ``path``.

    ``path`` need not exist yet: the nearest existing ancestor is asked, which
    is where a missing destination directory would be created.
    """
    p = os.path.abspath(path)
    while True:
        try:
            st = os.statvfs(p)
            return st.f_bavail * st.f_frsize
        except (FileNotFoundError, NotADirectoryError):
            parent = os.path.dirname(p)
            if parent == p:
                raise
            p = parent


def hash_range(fd: int, offset: int, length: int, buf: bytearray | None = None) -> str:
    """xxh3-64 of ``length`` bytes at ``offset`` of ``fd``, streamed through one buffer.

    A short file hashes what is there: the caller compares against a recorded
    hash, so missing bytes simply fail the comparison.
    """
    mv = memoryview(buf if buf is not None else bytearray(min(IO_BUFFER, max(length, 1))))
    h = xxhash.xxh3_64()
    _feed(h, fd, offset, length, mv)
    return h.hexdigest()


def _feed(h: Any, fd: int, offset: int, length: int, buf: memoryview) -> bool:
    """Hash ``length`` bytes of ``fd`` at ``offset`` into ``h``; False if the file ends first."""
    pos = 0
    while pos < length:
        n = os.preadv(fd, [buf[:min(len(buf), length - pos)]], offset + pos)
        if n == 0:
            return False
        h.update(buf[:n])
        pos += n
    return True


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _atomic_json(path: str, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON: a reader sees the old or the new, never half.

    No fsync: these records are re-verified against the data on every start.
    """
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"))
    os.rename(tmp, path)


def _under(path: str, directory: str) -> bool:
    return directory == "/" or path == directory or path.startswith(directory + "/")


def _components(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


def _fd_path(fd: int) -> str:
    """The path an open file has now (the kernel's answer, links resolved)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink_at(dfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass


def _free_in(dfd: int) -> int:
    """Bytes available to an unprivileged writer in the open directory ``dfd``."""
    st = os.fstatvfs(dfd)
    return st.f_bavail * st.f_frsize


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (fifo)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


# --- value types --------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A source file copied into the store and hashed, waiting for (or attached to) a job."""

    key: str
    path: str  # the source path it was taken from (FileSpec.path)
    size: int
    xxh3: str
    chunks: list[str]
    chunk_size: int = 0
    copy_path: str = ""  # where the private copy lives under data_dir


@dataclass(frozen=True)
class PackResult:
    """What :meth:`Store.pack` installed."""

    job: str
    file: int
    path: str  # final path on this machine (root + dest)
    size: int
    xxh3: str
    seconds: float
    from_snapshot: bool = False  # copied from this daemon's own source snapshot
    already: bool = False  # the file had been packed before; nothing was done
    # Bytes the install read back to hash (the rest was hashed as chunks arrived).
    read_back: int = 0


@dataclass
class _Source:
    """A committed snapshot: file ``file`` of ``job`` as the source daemon serves it."""

    job: str
    file: int
    src_path: str
    data_path: str
    size: int
    xxh3: str
    chunk_size: int
    chunks: list[str]
    fd: int
    valid: set[int] = field(default_factory=set)


class Staging:
    """The temporary file a target assembles one job file in, beside its final path.

    ``write_fd`` is open read-write for ``os.pwrite`` by the fetcher; after
    :meth:`Store.pack` the same fd keeps the installed inode open so peers can
    still be served from it.  ``_dir_fd`` is the directory the temp file was
    created in, kept until the install only to remove the temp file should the
    job be dropped (its path may lead elsewhere by then).
    """

    def __init__(self, store: Store, job: str, file: int, dest: str, final_path: str,
                 temp_path: str, size: int, xxh3: str, chunk_size: int, write_fd: int,
                 log_fd: int, created_dirs: list[str], dir_fd: int = -1) -> None:
        self._store = store
        self.job = job
        self.file = file
        self.dest = dest
        self.final_path = final_path
        self.temp_path = temp_path
        self.size = size
        self.xxh3 = xxh3
        self.chunk_size = chunk_size
        self.write_fd = write_fd
        self._log_fd = log_fd
        self._dir_fd = dir_fd
        self.created_dirs = created_dirs  # parents we made, fsynced at pack time
        self.verified: dict[int, str] = {}
        self.packed = False
        # The whole-file hash, fed in order by the store's writeback thread as
        # verified chunks join the front (:meth:`hash_ahead`), so that the
        # install only hashes what is left instead of the whole file at the
        # moment every target of a job installs at once.
        self._whole = xxhash.xxh3_64()
        self._hashed = 0  # bytes from the start fed to _whole
        self._hash_lock = threading.Lock()
        # Serialises pack() for this file: the center may repeat a pack request
        # while the first is still verifying, and only one may rename.
        self.pack_lock = threading.Lock()

    @property
    def nchunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def span(self, chunk: int) -> tuple[int, int]:
        """(offset, length) of ``chunk`` in this file."""
        return chunk_span(self.size, self.chunk_size, chunk)

    def complete(self) -> bool:
        return len(self.verified) == self.nchunks

    def describes(self, dest: str, size: int, xxh3: str, chunk_size: int) -> bool:
        """Whether this staging file is the one a pull with these details asks for."""
        return (self.dest, self.size, self.xxh3, self.chunk_size) == \
            (dest, size, xxh3, chunk_size)

    def missing(self) -> list[int]:
        return [c for c in range(self.nchunks) if c not in self.verified]

    def mark_chunk(self, chunk: int, xxh3: str) -> None:
        """Record that ``chunk`` was written and its bytes hashed to ``xxh3``.

        One short append to the chunk log, no fsync: :meth:`Store.open`
        re-hashes what the log claims, so a lost line only costs a refetch.
        """
        if not 0 <= chunk < self.nchunks:
            raise BadRequest(f"chunk {chunk} is out of range for job {self.job} file "
                             f"{self.file} ({self.nchunks} chunks)")
        with self._store._lock:
            if self.packed or self._log_fd < 0:
                return
            self.verified[chunk] = xxh3
            self._store._write_behind(self, *self.span(chunk))
            try:
                os.write(self._log_fd, f"{chunk} {xxh3}\n".encode())
            except OSError as e:
                # The record is an optimisation for restarts; the chunk is still
                # good in memory, so keep serving it and only log the lost record.
                log.warning("cannot record chunk %d of %s/%d: %s", chunk, self.job,
                            self.file, e)

    def _reset_chunks(self) -> None:
        with self._store._lock:
            self.verified.clear()
            if self._log_fd >= 0:
                os.ftruncate(self._log_fd, 0)
        with self._hash_lock:
            self._whole.reset()
            self._hashed = 0

    def hash_ahead(self, fd: int, buf: memoryview) -> None:
        """Feed the whole-file hash the verified chunks that now follow what it
        has, read back through ``fd`` (the page cache: they were just written).

        Runs in the store's writeback thread.  A chunk is only ever read after
        it was verified, and verified bytes are never written again (a failed
        install resets both the chunks and this hash), so what was fed stays
        true of the file until the install, which hashes the rest.
        """
        with self._hash_lock:
            while not self.packed and self._hashed < self.size:
                chunk = self._hashed // self.chunk_size
                if chunk not in self.verified:
                    return
                off, length = self.span(chunk)
                # Into a copy: a read that fails halfway must leave the hash
                # as it was, for the install to read that chunk again.
                whole = self._whole.copy()
                if not _feed(whole, fd, off, length, buf):
                    return
                self._whole, self._hashed = whole, off + length

    def whole_hash_from(self, fd: int, buf: memoryview) -> tuple[str, int]:
        """The whole file's xxh3, from what :meth:`hash_ahead` fed and the rest
        read now ("size-mismatch" if the file is shorter than it should be),
        and how many bytes had to be read now."""
        with self._hash_lock:
            whole = self._whole.copy()
            rest = self.size - self._hashed
            if not _feed(whole, fd, self._hashed, rest, buf):
                return "size-mismatch", rest
        if os.fstat(fd).st_size != self.size:
            return "size-mismatch", rest
        return whole.hexdigest(), rest

    def _manifest(self) -> dict[str, Any]:
        return {"job": self.job, "file": self.file, "dest": self.dest,
                "final_path": self.final_path, "temp_path": self.temp_path, "size": self.size,
                "xxh3": self.xxh3, "chunk_size": self.chunk_size, "packed": self.packed,
                "created_dirs": self.created_dirs,
                "chunks": {str(k): v for k, v in sorted(self.verified.items())}}

    def _close(self) -> None:
        _close(self.write_fd)
        _close(self._log_fd)
        _close(self._dir_fd)
        self.write_fd = -1
        self._log_fd = -1
        self._dir_fd = -1


# --- the store ---------------------------------------------------------------------------


class Store:
    """A daemon's chunk store and staging area.  Call :meth:`open` before anything else."""

    def __init__(self, data_dir: str, root: str = "/", allow_dest: Sequence[str] = (),
                 allow_hardlinked_sources: bool = False, write_behind: bool = True) -> None:
        if not os.path.isabs(root):
            raise BadRequest(f"root {root!r} must be an absolute path")
        self.data_dir = os.path.abspath(data_dir)
        self.root = os.path.normpath(root)
        self.allow_dest = list(allow_dest)
        self.allow_hardlinked_sources = allow_hardlinked_sources
        # The directories every write must stay inside, resolved once (like the
        # daemon's own checks): below them no link is followed.  None: nothing
        # is confined (root "/" and no allow_dest), links are followed as usual.
        root_real = os.path.realpath(self.root)
        bounds = [os.path.realpath(d) for d in allow_dest] if allow_dest else [root_real]
        # Everything is written under the root: an allowed directory outside it
        # can hold no destination (the daemon warns about it at start).
        bounds = [b for b in bounds if _under(b, root_real)]
        self._bounds: list[str] | None = (
            None if "/" in bounds else sorted(set(bounds), key=len))
        self._pending_dir = os.path.join(self.data_dir, "pending")
        self._jobs_dir = os.path.join(self.data_dir, "jobs")
        # Guards the indexes below.  The event loop reads them (chunk_source,
        # mark_chunk) while snapshot/pack run in worker threads.
        self._lock = threading.RLock()
        self._create_lock = threading.Lock()
        self._pending: dict[str, Snapshot] = {}
        self._sources: dict[tuple[str, int], _Source] = {}
        self._stagings: dict[tuple[str, int], Staging] = {}
        # Write-behind (see the module docstring): one thread, so the requests
        # reach the disk in the order the chunks were verified.
        self._writeback: ThreadPoolExecutor | None = None
        self.writeback_bytes = 0  # handed to the kernel's writeback so far
        self._write_behind_off = _sync_file_range is None or not write_behind
        self._behind_buf = memoryview(bytearray(0))  # the writeback thread's read buffer

    # --- life cycle -----------------------------------------------------------------

    def open(self) -> None:
        """Create the directories and rebuild the index from disk (blocking).

        Every chunk a previous run recorded as held is hashed again; those that
        no longer match (the records were never fsynced) are forgotten, so the
        inventory reports only bytes that are really there.
        """
        for d in (self.data_dir, self._pending_dir, self._jobs_dir):
            try:
                os.makedirs(d, mode=0o700, exist_ok=True)
            except OSError as e:
                raise LocalIOError(f"cannot create data directory {d}: {e.strerror}; make "
                                   "--data-dir writable by the daemon's user") from None
        # Snapshots never attached to a job belong to submissions that died with
        # the previous run; nobody can name them any more.
        for name in os.listdir(self._pending_dir):
            _unlink(os.path.join(self._pending_dir, name))
        buf = bytearray(IO_BUFFER)
        for job in sorted(os.listdir(self._jobs_dir)):
            jdir = os.path.join(self._jobs_dir, job)
            if not _JOB_RE.match(job) or not os.path.isdir(jdir):
                continue
            for name in sorted(os.listdir(jdir)):
                path = os.path.join(jdir, name)
                try:
                    if name.startswith("src-") and name.endswith(".json"):
                        self._load_source(job, path, buf)
                    elif name.startswith("stage-") and name.endswith(".json"):
                        self._load_staging(job, path, buf)
                    elif ".json.tmp" in name:
                        _unlink(path)
                except (OSError, ValueError, KeyError, TypeError) as e:
                    log.warning("dropping unreadable record %s: %s", path, e)
                    _unlink(path)
            # A job with nothing left is just an empty directory.
            if not any(k[0] == job for k in self._sources) and \
                    not any(k[0] == job for k in self._stagings):
                shutil.rmtree(jdir, ignore_errors=True)

    def close(self) -> None:
        """Close every cached fd (the files stay on disk)."""
        if self._writeback is not None:
            # Drained, not cancelled: each queued item owns a dup'ed fd it closes
            # (and starting writeback does not wait for the disk).
            self._writeback.shutdown(wait=True)
            self._writeback = None
        with self._lock:
            for src in self._sources.values():
                _close(src.fd)
            for st in self._stagings.values():
                st._close()
            self._sources.clear()
            self._stagings.clear()

    def _load_source(self, job: str, meta_path: str, buf: bytearray) -> None:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        file = int(meta["file"])
        data_path = meta_path[:-len(".json")] + ".data"
        fd = os.open(data_path, os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW)
        src = _Source(job=job, file=file, src_path=meta["path"], data_path=data_path,
                      size=int(meta["size"]), xxh3=meta["xxh3"],
                      chunk_size=int(meta["chunk_size"]), chunks=list(meta["chunks"]), fd=fd)
        if os.fstat(fd).st_size != src.size:
            log.warning("snapshot %s has the wrong size; dropping it", data_path)
            os.close(fd)
            _unlink(data_path)
            _unlink(meta_path)
            return
        for i, want in enumerate(src.chunks):
            off, length = chunk_span(src.size, src.chunk_size, i)
            if hash_range(fd, off, length, buf) == want:
                src.valid.add(i)
        self._sources[(job, file)] = src

    def _load_staging(self, job: str, meta_path: str, buf: bytearray) -> None:
        with open(meta_path, encoding="utf-8") as f:
            m = json.load(f)
        file = int(m["file"])
        size, chunk_size = int(m["size"]), int(m["chunk_size"])
        packed = bool(m.get("packed"))
        log_path = meta_path[:-len(".json")] + ".chunks"
        claimed: dict[int, str] = {int(k): v for k, v in m.get("chunks", {}).items()}
        path = m["final_path"] if packed else m["temp_path"]
        if os.path.dirname(path) != os.path.dirname(m["final_path"]):
            raise ValueError(f"temp file {path} is not beside {m['final_path']}")
        try:
            flags = (os.O_RDONLY if packed else os.O_RDWR) | os.O_NONBLOCK
            fd, dfd = self._open_at_final(path, flags)
        except (OSError, LocalIOError) as e:
            # The temp file vanished (or the installed file, or a directory on
            # the way, was replaced by something we must not follow): nothing
            # left to offer.  The center re-sends the pull, which opens a fresh
            # staging.
            log.info("staging %s of job %s file %d is gone (%s); forgetting it", path, job,
                     file, getattr(e, "strerror", None) or e)
            _unlink(meta_path)
            _unlink(log_path)
            return
        if packed:
            os.close(dfd)  # nothing left to clean up beside an installed file
            dfd = -1
        st_ = os.fstat(fd)
        if not stat.S_ISREG(st_.st_mode) or st_.st_size != size:
            os.close(fd)
            _close(dfd)
            _unlink(meta_path)
            _unlink(log_path)
            return
        if not packed:
            try:
                with open(log_path, encoding="ascii", errors="replace") as f:
                    for line in f:
                        parts = line.split()
                        # A torn last line (crash mid-append) is just ignored.
                        if len(parts) == 2 and parts[0].isdigit() and _HEX_RE.match(parts[1]):
                            claimed[int(parts[0])] = parts[1]
            except FileNotFoundError:
                pass
        st = Staging(self, job=job, file=file, dest=m["dest"], final_path=m["final_path"],
                     temp_path=m["temp_path"], size=size, xxh3=m["xxh3"],
                     chunk_size=chunk_size, write_fd=fd, log_fd=-1,
                     created_dirs=list(m.get("created_dirs", [])), dir_fd=dfd)
        st.packed = packed
        n = st.nchunks
        for c, want in claimed.items():
            if 0 <= c < n:
                off, length = st.span(c)
                if hash_range(fd, off, length, buf) == want:
                    st.verified[c] = want
                else:
                    log.info("job %s file %d chunk %d no longer matches its hash on disk; "
                             "it will be fetched again", job, file, c)
        # Rewrite the records compactly so the log only lists what survived.
        _atomic_json(meta_path, st._manifest())
        if not packed:
            st._log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                                 | _O_CLOEXEC, 0o600)
        else:
            _unlink(log_path)
        self._stagings[(job, file)] = st

    # --- source side ------------------------------------------------------------------

    def snapshot(self, src_path: str, chunk_size: int,
                 allowed: Callable[[str], bool] | None = None) -> Snapshot:
        """Copy ``src_path`` into the store, hashing every chunk and the whole (blocking).

        One pass over the source through one buffer: the bytes hashed are
        exactly the bytes copied, so a concurrent edit of the source can only
        change what the snapshot contains, never make it disagree with its own
        hashes.  Later edits do not reach the copy at all.

        ``allowed`` judges the resolved path of the file actually opened, and
        like a set of allowed directories it allows whatever lies below a path
        it allows.  When it confines (it does not allow ``/``), a file with
        more than one hard link is refused unless the store was made with
        ``allow_hardlinked_sources``: its other names may lie anywhere on the
        file system, and the resolved path shows only the one used to open it.
        """
        if chunk_size <= 0:
            raise BadRequest("chunk size must be positive")
        if not isinstance(src_path, str) or not os.path.isabs(src_path):
            raise BadRequest(f"{src_path!r} is not an absolute path: name files by their "
                             "full path, e.g. /srv/data/file.bin")
        try:
            # O_NONBLOCK: opening a fifo must not wait for a writer; fstat then
            # refuses it along with directories and devices.
            fd = os.open(src_path, os.O_RDONLY | os.O_NONBLOCK | _O_CLOEXEC)
        except FileNotFoundError:
            raise BadRequest(f"{src_path}: no such file; check the path") from None
        except PermissionError:
            raise BadRequest(f"{src_path}: permission denied; make the file readable by the "
                             "daemon's user") from None
        except OSError as e:
            raise BadRequest(f"{src_path}: cannot open it ({e.strerror}); check the path and "
                             "its permissions") from None
        if allowed is not None:
            # Checked on what was opened, not on the name: a link swapped in after
            # the caller's check must not make us ship a file from elsewhere.
            real = _fd_path(fd)
            if not allowed(real):
                os.close(fd)
                raise BadRequest(f"{src_path} resolves to {real}, outside the directories this "
                                 "daemon may ship from (allow_source)", status=403)
        key = secrets.token_hex(8)
        copy = os.path.join(self._pending_dir, key + ".data")
        out = -1
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BadRequest(f"{src_path} is {_kind(st.st_mode)}, not a regular file: "
                                 "only regular files can be shipped")
            if st.st_nlink > 1 and allowed is not None and \
                    not self.allow_hardlinked_sources and not allowed("/"):
                raise BadRequest(
                    f"{src_path} has {st.st_nlink} hard links, and another of its names may "
                    "lie outside the directories this daemon may ship from (allow_source), "
                    "so it is not shipped; ship a copy of it instead (cp, not ln), or set "
                    "allow_hardlinked_sources in the daemon's config if hard-linked files "
                    "there are expected", status=403)
            try:
                out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
            except OSError as e:
                raise LocalIOError(f"cannot create a snapshot in {self._pending_dir}: "
                                   f"{e.strerror}; check --data-dir") from None
            size, whole, chunks = self._copy_hashing(fd, out, st.st_size, chunk_size,
                                                     src_path)
        except BaseException:
            _close(out)
            _unlink(copy)
            raise
        finally:
            os.close(fd)
        os.close(out)
        snap = Snapshot(key=key, path=os.path.normpath(src_path), size=size, xxh3=whole,
                        chunks=chunks, chunk_size=chunk_size, copy_path=copy)
        try:
            _atomic_json(os.path.join(self._pending_dir, key + ".json"),
                         {"path": snap.path, "size": size, "xxh3": whole,
                          "chunk_size": chunk_size, "chunks": chunks})
        except OSError as e:
            _unlink(copy)
            raise LocalIOError(f"cannot record a snapshot in {self._pending_dir}: "
                               f"{e.strerror}; check --data-dir") from None
        with self._lock:
            self._pending[key] = snap
        return snap

    def _copy_hashing(self, src: int, out: int, limit: int, chunk_size: int,
                      src_path: str) -> tuple[int, str, list[str]]:
        buf = bytearray(IO_BUFFER)
        mv = memoryview(buf)
        whole = xxhash.xxh3_64()
        part = xxhash.xxh3_64()
        chunks: list[str] = []
        pos = fill = 0
        # Read at most the size seen at open: a file that keeps growing (a log)
        # is snapshotted as it was, not chased forever.
        while pos < limit:
            want = min(len(mv), limit - pos, chunk_size - fill)
            try:
                n = os.readv(src, [mv[:want]])
            except OSError as e:
                raise BadRequest(f"{src_path}: read failed at byte {pos} ({e.strerror}); "
                                 "check the disk holding it") from None
            if n == 0:
                break  # truncated while we read: the snapshot is what was there
            data = mv[:n]
            whole.update(data)
            part.update(data)
            try:
                _write_all(out, data)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise LocalIOError(
                        f"disk full in {self.data_dir} while snapshotting {src_path}: "
                        f"{_mib(free_space(self.data_dir))} free, {_mib(limit)} needed; "
                        "free space under --data-dir") from None
                raise LocalIOError(f"cannot write a snapshot in {self.data_dir}: "
                                   f"{e.strerror}") from None
            pos += n
            fill += n
            if fill == chunk_size:
                chunks.append(part.hexdigest())
                part.reset()
                fill = 0
        if fill:
            chunks.append(part.hexdigest())
        return pos, whole.hexdigest(), chunks

    def commit_snapshots(self, job: str, keys: list[str]) -> None:
        """Attach pending snapshots to ``job`` as files 0..n-1 (renames, never copies)."""
        check_job_id(job)
        with self._lock:
            snaps = []
            for k in keys:
                if k not in self._pending:
                    raise NotFound(f"snapshot {k!r} is unknown (already committed, discarded, "
                                   "or lost in a restart): submit the job again")
                snaps.append(self._pending[k])
            jdir = os.path.join(self._jobs_dir, job)
            os.makedirs(jdir, mode=0o700, exist_ok=True)
            for i, snap in enumerate(snaps):
                if (job, i) in self._sources:
                    raise Conflict(f"job {job} already has a source file {i}")
            for i, snap in enumerate(snaps):
                base = os.path.join(jdir, f"src-{i}")
                os.rename(snap.copy_path, base + ".data")
                _atomic_json(base + ".json", {"job": job, "file": i, "path": snap.path,
                                              "size": snap.size, "xxh3": snap.xxh3,
                                              "chunk_size": snap.chunk_size,
                                              "chunks": snap.chunks})
                _unlink(os.path.join(self._pending_dir, snap.key + ".json"))
                fd = os.open(base + ".data", os.O_RDONLY | _O_CLOEXEC)
                self._sources[(job, i)] = _Source(
                    job=job, file=i, src_path=snap.path, data_path=base + ".data",
                    size=snap.size, xxh3=snap.xxh3, chunk_size=snap.chunk_size,
                    chunks=list(snap.chunks), fd=fd, valid=set(range(len(snap.chunks))))
                del self._pending[snap.key]

    def discard_snapshot(self, key: str) -> None:
        """Forget a pending snapshot (the submission was refused); unknown keys are ignored."""
        with self._lock:
            snap = self._pending.pop(key, None)
        if snap is not None:
            _unlink(snap.copy_path)
            _unlink(os.path.join(self._pending_dir, key + ".json"))

    def source(self, job: str, file: int) -> Snapshot | None:
        """The committed snapshot of ``file`` of ``job``, if this daemon is its source."""
        with self._lock:
            s = self._sources.get((job, file))
            if s is None:
                return None
            return Snapshot(key="", path=s.src_path, size=s.size, xxh3=s.xxh3,
                            chunks=list(s.chunks), chunk_size=s.chunk_size,
                            copy_path=s.data_path)

    # --- target side -------------------------------------------------------------------

    def final_path(self, dest: str) -> str:
        """Where ``dest`` lands on this machine: ``root + dest``, refusing '..' escapes."""
        if not isinstance(dest, str) or not dest.startswith("/"):
            raise BadRequest(f"destination {dest!r} must be an absolute path")
        if "\0" in dest or any(p == ".." for p in dest.split("/")):
            raise BadRequest(f"destination {dest!r} must not contain '..' or NUL bytes")
        norm = os.path.normpath(dest)
        if dest.endswith("/") or norm == "/":
            raise BadRequest(f"destination {dest!r} names a directory; give a file path")
        if self.root == "/":
            return norm
        return os.path.join(self.root, norm.lstrip("/"))

    def staging(self, job: str, file: int) -> Staging | None:
        with self._lock:
            return self._stagings.get((job, file))

    def open_staging(self, job: str, file: int, dest: str, size: int, xxh3: str,
                     chunk_size: int) -> Staging:
        """Create (or return the existing) temporary file for ``file`` of ``job``.

        The temp file sits beside the final path so the install is a rename
        within one directory.  It is created exclusively and without following
        symlinks, and space is reserved up front so a full disk shows now, as
        one clear error, rather than as a failed write halfway through.
        """
        check_job_id(job)
        if file < 0 or size < 0 or chunk_size <= 0:
            raise BadRequest("file index, size and chunk size must not be negative")
        if not _HEX_RE.match(xxh3 or ""):
            raise BadRequest(f"xxh3 {xxh3!r} must be 16 lowercase hex digits")
        final = self.final_path(dest)
        # Creation (mkdir, fallocate) runs under its own lock so two pulls for
        # the same file cannot both create it, while the event loop's lookups
        # (chunk_source, mark_chunk) never wait for a slow disk.
        with self._create_lock:
            with self._lock:
                have = self._stagings.get((job, file))
            if have is not None:
                if not have.describes(dest, size, xxh3, chunk_size):
                    raise Conflict(f"job {job} file {file} is already staged for {have.dest} "
                                   f"({have.size} bytes, {have.xxh3}); the new request differs")
                return have
            st = self._create_staging(job, file, dest, final, size, xxh3, chunk_size)
            with self._lock:
                self._stagings[(job, file)] = st
            return st

    def _create_staging(self, job: str, file: int, dest: str, final: str, size: int,
                        xxh3: str, chunk_size: int) -> Staging:
        parent, base = os.path.split(final)
        # NAME_MAX is 255 bytes: keep the temp name inside it for long file names.
        tname = f".{base[:120]}.fdship-{job}-{file}.part"
        temp = os.path.join(parent, tname)
        dfd, created = self._walk(parent, final, create=True)
        try:
            try:
                fst: os.stat_result | None = os.stat(base, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                fst = None
            except OSError as e:
                raise LocalIOError(f"cannot inspect {final}: {e.strerror}") from None
            if fst is not None and stat.S_ISDIR(fst.st_mode):
                raise LocalIOError(f"destination {final} is a directory; remove it or choose "
                                   "another --dest")
            free = _free_in(dfd)
            if free < size:
                raise LocalIOError(f"disk full: {_mib(free)} free, {_mib(size)} needed for "
                                   f"{final}; free space or choose another --dest")
            fd = self._create_exclusive(dfd, tname, temp, final)
            try:
                if fst is not None and stat.S_ISREG(fst.st_mode):
                    # Replacing a file keeps its mode (and owner, when we may set it),
                    # as an in-place edit would.
                    os.fchmod(fd, stat.S_IMODE(fst.st_mode))
                    if os.geteuid() == 0:
                        os.fchown(fd, fst.st_uid, fst.st_gid)
                if size:
                    os.posix_fallocate(fd, 0, size)
            except OSError as e:
                os.close(fd)
                _unlink_at(dfd, tname)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise LocalIOError(f"disk full: {_mib(_free_in(dfd))} free, "
                                       f"{_mib(size)} needed for {final}; free space or "
                                       "choose another --dest") from None
                raise LocalIOError(f"cannot reserve {_mib(size)} for {final}: "
                                   f"{e.strerror}") from None
            jdir = os.path.join(self._jobs_dir, job)
            meta = os.path.join(jdir, f"stage-{file}.json")
            try:
                os.makedirs(jdir, mode=0o700, exist_ok=True)
                log_fd = os.open(meta[:-len(".json")] + ".chunks",
                                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                                 | _O_CLOEXEC, 0o600)
            except OSError as e:
                os.close(fd)
                _unlink_at(dfd, tname)
                raise LocalIOError(f"cannot write staging records under {self.data_dir}: "
                                   f"{e.strerror}; check --data-dir") from None
            st = Staging(self, job=job, file=file, dest=dest, final_path=final, temp_path=temp,
                         size=size, xxh3=xxh3, chunk_size=chunk_size, write_fd=fd,
                         log_fd=log_fd, created_dirs=created, dir_fd=os.dup(dfd))
            try:
                _atomic_json(meta, st._manifest())
            except OSError as e:
                st._close()
                _unlink_at(dfd, tname)
                raise LocalIOError(f"cannot write staging records under {self.data_dir}: "
                                   f"{e.strerror}; check --data-dir") from None
            return st
        finally:
            os.close(dfd)

    # --- reaching a destination directory without following planted links ------------------

    def _anchor(self, parent: str, final: str) -> tuple[str, list[str]]:
        """(allowed directory, components below it) that lead to ``parent``.

        The shortest leading part of ``parent`` that resolves into an allowed
        directory decides which one: links on the way there (above the allowed
        directory, set up by the operator) are honoured, as the daemon's own
        check honours them.  What lies below it is only *named* here; the walk
        opens it without following links, so a link swapped in between is
        refused, not followed.
        """
        assert self._bounds is not None
        parts = _components(parent)
        for k in range(len(parts) + 1):
            try:
                real = os.path.realpath("/" + "/".join(parts[:k]))
            except OSError as e:  # a link on the way changed while it was read
                raise LocalIOError(f"cannot resolve {final}: {e.strerror}; try again, and "
                                   "check that nothing keeps changing the directories on "
                                   "the way") from None
            for bound in self._bounds:
                if _under(real, bound):
                    return bound, _components(real[len(bound):]) + parts[k:]
        where = (f"allow_dest ({', '.join(self.allow_dest)})" if self.allow_dest
                 else f"the root {self.root}")
        raise LocalIOError(f"destination {final} is not inside {where}: refusing to write it; "
                           "choose a destination there")

    def _walk(self, parent: str, final: str, create: bool,
              fsync: frozenset[str] = frozenset()) -> tuple[int, list[str]]:
        """Open ``parent`` one component at a time; return (its fd, directories created).

        Below an allowed directory every component is opened with O_NOFOLLOW
        relative to the one before, and created (``create``) when missing; the
        directories named in ``fsync`` are fsynced on the way.  Without
        confinement links are followed as usual.  The caller closes the fd.
        """
        if self._bounds is None:
            start, rest, follow = "/", _components(parent), True
        else:
            bound, below = self._anchor(parent, final)
            # The allowed directory's own path was free of links when resolved;
            # walking it too with O_NOFOLLOW keeps it so.
            start, rest, follow = "/", _components(bound) + below, False
        flags = _DIR_FLAGS & ~_O_NOFOLLOW if follow else _DIR_FLAGS
        created: list[str] = []
        path = start
        fd = os.open(start, flags)
        try:
            if path in fsync:
                os.fsync(fd)
            for name in rest:
                path = os.path.join(path, name)
                try:
                    nfd = os.open(name, flags, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise LocalIOError(f"directory {path} is gone, so {final} cannot be "
                                           "installed; nothing was written there") from None
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                        created.append(path)
                    except FileExistsError:
                        pass  # made meanwhile by another pull: open what is there
                    except OSError as e:
                        raise self._local_error(e, path, final) from None
                    nfd = self._open_below(fd, name, flags, path, final)
                except OSError as e:
                    nfd = self._open_below(fd, name, flags, path, final, e)
                os.close(fd)
                fd = nfd
                if path in fsync:
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd, created

    def _open_below(self, fd: int, name: str, flags: int, path: str, final: str,
                    error: OSError | None = None) -> int:
        """Open directory ``name`` under ``fd`` (again), turning failures into sentences."""
        if error is None:
            try:
                return os.open(name, flags, dir_fd=fd)
            except OSError as e:
                error = e
        try:
            kind = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
        except OSError:
            kind = 0
        if stat.S_ISLNK(kind):
            raise LocalIOError(
                f"refusing to write {final}: {path} is a symbolic link inside a directory this "
                "daemon may write to, and links there are never followed (one could be swapped "
                "to lead elsewhere); replace it with a real directory or choose another --dest")
        if kind and not stat.S_ISDIR(kind):
            raise LocalIOError(f"cannot create {final}: {path} exists and is not a directory; "
                               "remove it or choose another --dest")
        raise self._local_error(error, path, final)

    def _create_exclusive(self, dfd: int, tname: str, temp: str, final: str) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
        for _ in range(2):
            try:
                return os.open(tname, flags, 0o644, dir_fd=dfd)
            except FileExistsError:
                # A leftover from a run that died before recording it, or a
                # planted link: never write through it, remove and recreate.
                try:
                    mode = os.stat(tname, dir_fd=dfd, follow_symlinks=False).st_mode
                    if stat.S_ISDIR(mode):
                        raise LocalIOError(f"{temp} is a directory in the way of staging "
                                           f"{final}; remove it") from None
                    os.unlink(tname, dir_fd=dfd)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise self._local_error(e, temp, final) from None
            except OSError as e:
                raise self._local_error(e, temp, final) from None
        raise LocalIOError(f"cannot create {temp}: something keeps recreating it")

    @staticmethod
    def _local_error(e: OSError, path: str, final: str) -> LocalIOError:
        d = os.path.dirname(path)
        if e.errno in (errno.EACCES, errno.EPERM):
            return LocalIOError(f"permission denied writing {path}: the daemon cannot write "
                                f"to {d}; fix its permissions or choose another --dest")
        if e.errno == errno.EROFS:
            return LocalIOError(f"cannot write {path}: {d} is on a read-only file system; "
                                "choose another --dest")
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return LocalIOError(f"disk full creating {path}: {_mib(free_space(d))} free; "
                                "free space or choose another --dest")
        if e.errno == errno.ENOTDIR:
            return LocalIOError(f"cannot create {final}: a parent of it is not a directory; "
                                "remove it or choose another --dest")
        if e.errno == errno.ELOOP:
            return LocalIOError(f"refusing to write through the symbolic link {path}")
        return LocalIOError(f"cannot write {path}: {e.strerror}")

    # --- install ---------------------------------------------------------------------------

    def pack(self, job: str, file: int, dest: str | None = None) -> PackResult:
        """Verify file ``file`` of ``job``, make it durable and rename it into place (blocking).

        With a staging file: its whole xxh3 is checked against the expected
        one.  On a mismatch nothing at the final path is touched, the chunk
        records are reset so the center refetches, and IntegrityError is raised.

        Without one, but with this daemon's own snapshot of the file (the
        source is also a target), the snapshot is copied in the kernel beside
        the final path and installed the same way; ``dest`` then defaults to the
        snapshot's source path.
        """
        t0 = time.monotonic()
        with self._lock:
            st = self._stagings.get((job, file))
            src = self._sources.get((job, file))
        if st is None and src is None:
            raise NotFound(f"job {job} file {file} has no staging file and no snapshot here; "
                           "it cannot be packed before it is pulled")
        if st is None:
            assert src is not None
            st = self.open_staging(job, file, dest or src.src_path, src.size, src.xxh3,
                                   src.chunk_size)
        with st.pack_lock:
            if st.packed:
                return PackResult(job, file, st.final_path, st.size, st.xxh3,
                                  time.monotonic() - t0, already=True)
            use_snapshot = src is not None and len(src.valid) == len(src.chunks) and \
                not st.complete()
            read_back = self._install(st, src if use_snapshot else None)
        return PackResult(job, file, st.final_path, st.size, st.xxh3, time.monotonic() - t0,
                          from_snapshot=use_snapshot, read_back=read_back)

    def _install(self, st: Staging, src: _Source | None) -> int:
        """Verify, fsync and rename ``st`` into place; return the bytes read back to hash."""
        job, file = st.job, st.file
        # Our own reference to the open file: drop_job() closing the cached fd
        # mid-pack must not let a recycled fd number receive the fsync.
        fd = os.dup(st.write_fd)
        try:
            if src is not None:
                self._kernel_copy(src.fd, fd, src.size, st.final_path)
            # Fetched chunks were each hashed as they arrived (or re-hashed
            # when a restart restored them), and the writeback thread has fed
            # most of the file to the whole-file hash already: only the rest
            # is read now.  A snapshot copy (or a file installed without all
            # its chunks) is hashed whole, chunk by chunk too: that gives the
            # chunks this daemon can then serve.
            per_chunk = src is not None or not st.complete()
            chunk_hashes: list[str] = []
            if per_chunk:
                got, chunk_hashes = self._hash_file(fd, st.size, st.chunk_size)
                read_back = st.size
            else:
                got, read_back = st.whole_hash_from(fd, memoryview(bytearray(IO_BUFFER)))
            if got != st.xxh3:
                st._reset_chunks()
                raise IntegrityError(
                    f"job {job} file {file} ({st.final_path}) hashed to {got}, expected "
                    f"{st.xxh3}; nothing was installed and its chunks will be fetched again")
            try:
                os.fsync(fd)
                self._rename_into_place(st, fd)
            except LocalIOError:
                raise
            except OSError as e:
                raise self._local_error(e, st.final_path, st.final_path) from None
        finally:
            os.close(fd)
        with self._lock:
            st.packed = True
            if per_chunk:
                st.verified = dict(enumerate(chunk_hashes))
            _close(st._log_fd)
            st._log_fd = -1
            _close(st._dir_fd)
            st._dir_fd = -1
            meta = os.path.join(self._jobs_dir, job, f"stage-{file}.json")
            try:
                _atomic_json(meta, st._manifest())
                _unlink(meta[:-len(".json")] + ".chunks")
            except OSError as e:
                log.warning("cannot record that job %s file %d was packed: %s", job, file, e)
        return read_back

    def _rename_into_place(self, st: Staging, fd: int) -> None:
        """Rename the verified temp file (open as ``fd``) onto the final name, durably.

        The destination directory is reached again by the same link-refusing
        walk as when the temp file was made, and the temp name found there must
        still be the very file that was verified: whatever was done to the
        directories in between, the rename happens inside the allowed directory
        and installs our bytes, or does not happen at all.
        """
        parent, base = os.path.split(st.final_path)
        tname = os.path.basename(st.temp_path)
        # Directories we created must survive a crash too, or the file we make
        # durable would be unreachable: their parents are fsynced on the way.
        dfd, _ = self._walk(parent, st.final_path, create=False,
                            fsync=frozenset(os.path.dirname(d) for d in st.created_dirs))
        try:
            mine = os.fstat(fd)
            try:
                there = os.stat(tname, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                there = None
            if there is None or (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
                raise LocalIOError(
                    f"the directory of {st.final_path} was moved or replaced while job "
                    f"{st.job} file {st.file} was being fetched (its temp file {tname} is no "
                    "longer there); nothing was installed: restore the directory and submit "
                    "the job again")
            try:
                fst: os.stat_result | None = os.stat(base, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                fst = None
            if fst is not None and stat.S_ISDIR(fst.st_mode):
                raise LocalIOError(f"destination {st.final_path} is a directory; remove "
                                   "it or choose another --dest")
            os.rename(tname, base, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _open_at_final(self, path: str, flags: int) -> tuple[int, int]:
        """(fd of ``path``, fd of its directory), reached by the link-refusing walk."""
        parent, name = os.path.split(path)
        dfd, _ = self._walk(parent, path, create=False)
        try:
            return os.open(name, flags | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dfd), dfd
        except BaseException:
            os.close(dfd)
            raise

    @staticmethod
    def _remove_temp(st: Staging) -> None:
        """Delete ``st``'s temp file, by name in the directory it was made in, if it is ours.

        The directory is the one held since the temp file was created, not a
        path looked up now: wherever it has been moved, only our own file's
        name is removed, and nothing is removed through a link swapped in.
        """
        if st._dir_fd < 0 or st.write_fd < 0:
            return
        tname = os.path.basename(st.temp_path)
        try:
            mine = os.fstat(st.write_fd)
            there = os.stat(tname, dir_fd=st._dir_fd, follow_symlinks=False)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(tname, dir_fd=st._dir_fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove the temp file %s of job %s: %s", st.temp_path, st.job, e)

    @staticmethod
    def _kernel_copy(src: int, dst: int, size: int, final: str) -> None:
        """Copy ``size`` bytes between fds inside the kernel (no bytes through Python)."""
        pos = 0
        try:
            while pos < size:
                try:
                    n = os.copy_file_range(src, dst, size - pos, pos, pos)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                       errno.EOPNOTSUPP):
                        raise
                    # Older kernels refuse cross-file-system copies; sendfile
                    # writes at the destination's file position instead.
                    os.lseek(dst, pos, os.SEEK_SET)
                    n = os.sendfile(dst, src, pos, size - pos)
                if n == 0:
                    raise LocalIOError(f"snapshot ended early while copying to {final}")
                pos += n
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LocalIOError(f"disk full writing {final}: "
                                   f"{_mib(free_space(os.path.dirname(final)))} free") from None
            raise LocalIOError(f"cannot copy the snapshot to {final}: {e.strerror}") from None

    @staticmethod
    def _hash_file(fd: int, size: int, chunk_size: int) -> tuple[str, list[str]]:
        """Whole-file and per-chunk xxh3 in one streaming pass."""
        mv = memoryview(bytearray(IO_BUFFER))
        whole = xxhash.xxh3_64()
        part = xxhash.xxh3_64()
        chunks: list[str] = []
        pos = fill = 0
        while pos < size:
            want = min(len(mv), size - pos, chunk_size - fill)
            n = os.preadv(fd, [mv[:want]], pos)
            if n == 0:
                break
            whole.update(mv[:n])
            part.update(mv[:n])
            pos += n
            fill += n
            if fill == chunk_size:
                chunks.append(part.hexdigest())
                part.reset()
                fill = 0
        if fill:
            chunks.append(part.hexdigest())
        if os.fstat(fd).st_size != size:
            return "size-mismatch", chunks
        return whole.hexdigest(), chunks

    def wait_writeback(self, timeout: float = 30.0) -> None:
        """Block until every writeback queued so far was handed to the kernel."""
        if self._writeback is not None:
            self._writeback.submit(lambda: None).result(timeout)

    def _write_behind(self, st: Staging, offset: int, length: int) -> None:
        """Queue, for a verified range of ``st``, the start of its writeback and
        the whole-file hash of what it joins to the front (caller holds the lock)."""
        if st.write_fd < 0 or length <= 0:
            return
        # Our own fd: drop_job() or pack may close the staging's meanwhile, and
        # a recycled fd number must not be the one written back.
        fd = os.dup(st.write_fd)
        if self._writeback is None:
            self._writeback = ThreadPoolExecutor(1, thread_name_prefix="fdship-writeback")
            self._behind_buf = memoryview(bytearray(IO_BUFFER))

        def run() -> None:
            try:
                if not self._write_behind_off:
                    if start_writeback(fd, offset, length):
                        self.writeback_bytes += length
                    else:
                        self._write_behind_off = True  # the fsync at pack time does it all
                st.hash_ahead(fd, self._behind_buf)
            except OSError as e:
                # The install meets the same error (its fsync, or its read of
                # what is not hashed yet) and fails the file properly; here it
                # is only worth a line in the log.
                log.warning("cannot write back or hash ahead %s: %s", st.temp_path, e)
            finally:
                os.close(fd)

        try:
            self._writeback.submit(run)
        except RuntimeError:  # shut down by close(): nothing more to write behind
            os.close(fd)

    # --- serving and bookkeeping ---------------------------------------------------------

    def chunk_source(self, job: str, file: int, chunk: int) -> tuple[int, int, int] | None:
        """(fd, offset, length) of a chunk held verified here, else None.

        The fd is cached and owned by the store: a caller that needs it beyond
        the current event-loop step should ``os.dup`` it, because
        :meth:`drop_job` closes it.
        """
        with self._lock:
            src = self._sources.get((job, file))
            if src is not None and chunk in src.valid:
                off, length = chunk_span(src.size, src.chunk_size, chunk)
                return src.fd, off, length
            st = self._stagings.get((job, file))
            if st is not None and chunk in st.verified and st.write_fd >= 0:
                off, length = st.span(chunk)
                return st.write_fd, off, length
        return None

    def open_chunk(self, job: str, file: int, chunk: int) -> tuple[int, int, int] | None:
        """Like :meth:`chunk_source`, but the fd is a fresh ``dup`` the caller must close.

        Taken under the store's lock, so a concurrent :meth:`drop_job` cannot
        close the cached fd between the lookup and the dup.
        """
        with self._lock:
            src = self.chunk_source(job, file, chunk)
            if src is None:
                return None
            return os.dup(src[0]), src[1], src[2]

    def open_staging_fd(self, job: str, file: int) -> int | None:
        """A fresh ``dup`` of the staging file's fd (the caller closes it), or None.

        For serving a chunk still arriving (:mod:`fdship.daemon.arrivals`): the
        caller reads only the bytes the fetch reported written.  Taken under
        the lock for the same reason as :meth:`open_chunk`.
        """
        with self._lock:
            st = self._stagings.get((job, file))
            if st is None or st.write_fd < 0:
                return None
            return os.dup(st.write_fd)

    def inventory(self) -> list[Holding]:
        """What this daemon holds verified, per job file."""
        with self._lock:
            keys = sorted(set(self._sources) | set(self._stagings))
            out = []
            for key in keys:
                src = self._sources.get(key)
                st = self._stagings.get(key)
                chunks = set(src.valid) if src is not None else set()
                if st is not None:
                    chunks |= set(st.verified)
                out.append(Holding(job=key[0], file=key[1], chunks=tuple(sorted(chunks)),
                                   packed=bool(st is not None and st.packed)))
            return out

    def jobs(self) -> set[str]:
        with self._lock:
            return {k[0] for k in self._sources} | {k[0] for k in self._stagings}

    def drop_job(self, job: str) -> None:
        """Forget ``job``: close its fds, delete its temp files, snapshots and records.

        Installed files stay where they are; only our handle on them goes.
        """
        with self._lock:
            srcs = [k for k in self._sources if k[0] == job]
            stgs = [k for k in self._stagings if k[0] == job]
            for k in srcs:
                _close(self._sources.pop(k).fd)
            for k in stgs:
                st = self._stagings.pop(k)
                if not st.packed:
                    self._remove_temp(st)
                st._close()
        if _JOB_RE.match(job):
            shutil.rmtree(os.path.join(self._jobs_dir, job), ignore_errors=True)
