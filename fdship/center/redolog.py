"""The center's REDO log: segments on disk, group commit, torn-tail repair, checkpoints.

The center's single writer (``fdship.center.runner``) calls ``append`` for every
state change *before* it answers the request that caused it, calls ``sync``
once per event-loop turn (group commit), and only then sends the answers.  On
start, ``open`` hands back the newest good checkpoint and the records after it,
which the runner replays through the same scheduler core.  Payloads are opaque
bytes here; the frame and checkpoint formats live in ``fdship.core.records``.

On-disk layout (all names sort in LSN order)::

    DIR/LOCK                                  flock()ed by the one center using DIR
    DIR/redo-00000000000000000000.log         segment starting at LSN 0
    DIR/redo-00000000000067108912.log         next segment, starting at its LSN
    DIR/checkpoint-00000000000067200000.ckpt  state as of LSN 67200000 (previous, kept)
    DIR/checkpoint-00000000000068000000.ckpt  state as of LSN 68000000 (newest)
    DIR/checkpoint-....ckpt.tmp               a checkpoint being written (removed on open)
    DIR/checkpoint-....ckpt.bad               a damaged checkpoint, moved aside on open

An LSN is a global byte offset: the log is one endless byte stream cut into
segment files, and a segment's name is the LSN of its first byte.  A record's
LSN is the offset just *after* its frame, so "the state at LSN L" means "every
record whose frame ends at or before L has been applied".  Segments are
contiguous: each starts exactly where the previous one ends.

Durability contract
-------------------
* ``append`` writes the frame with one ``os.write`` (kernel page cache, no
  fsync).  The record survives a crash of the *process* (the kernel still
  writes it out) but not a power cut or kernel crash.  Nothing may be
  acknowledged yet.
* ``sync`` makes every record appended so far durable with one fdatasync of
  the current segment.  Older segments were fdatasynced when the log rolled
  past them, and each segment file's directory entry was made durable (fsync
  of the directory) when it was created.  After ``sync`` returns, every record
  up to ``lsn`` survives any crash: this is the point where the center may
  answer.  Records of one event-loop turn share that one fsync.
* ``checkpoint(state, lsn)`` first syncs the log, then writes the checkpoint to
  a temp file, fsyncs it, renames it into place and fsyncs the directory.  It
  is durable when it returns.  A checkpoint therefore never claims records that
  the log could lose.

What a crash leaves, and why replay is right:

* Crash between ``append`` and ``sync``: the segment may end in a frame that
  was cut short, or in zeros, or (process crash only) in complete frames.  None
  of these records was acknowledged.  ``open`` cuts a torn tail off (truncate
  and fsync) and replays the complete frames; those were never answered, and
  replaying them is no different from having answered them just before the
  crash.  ``open`` then fdatasyncs the segment once, so the state the center
  rebuilds never rests on bytes a later power cut could take back.  A torn
  tail is only one damaged *last* frame followed by nothing or by zeros (see
  ``fdship.core.records``): damage followed by a valid frame, or by any other
  bytes, is what a disk or a stray writer does to records that may have been
  synced long ago, and ``open`` refuses to start on it instead of cutting.
* Crash while rolling: the old segment was fsynced before the new file was
  created, so the old one is complete; the new one is empty or holds a torn
  first frame, handled as above.  Only the newest segment may have a torn tail;
  damage in any other is corruption.
* Crash during ``checkpoint``: before the rename, a ``.tmp`` file is left and
  removed on open, and the previous checkpoint is still in force; after the
  rename, the new one is complete (it was fsynced before the rename).  Segment
  deletion happens only after the directory fsync, and deleting a segment is
  harmless to redo if a crash undoes it.
* Replay starts at the chosen checkpoint's LSN, which is always a record
  boundary, and applies every later record in log order, exactly once: records
  at or before the LSN are in the checkpoint's state, records after it are not.

Checkpoints and fallback: the two newest checkpoints are kept, and a segment is
deleted only once the *older* of the two covers it entirely (the segment ends
at or before that LSN; the segment being written is never deleted).  So if the
newest checkpoint is found damaged, ``open`` falls back to the previous one and
every record needed to replay from it is still there; the damaged file is
renamed to ``.bad`` and the fall-back is reported in ``Recovery.notes``.  With
no good checkpoint left, ``open`` rebuilds from the empty state when the log
still starts at LSN 0, and raises LogCorruptError otherwise (records are gone,
only a backup can help).

Errors: damage the log cannot repair raises LogCorruptError naming the file,
the byte offset and what the operator can do.  A failed write or fsync while
running raises LocalIOError; after a failed fsync the log refuses all further
use, because the kernel may have dropped the unwritten pages and a retry could
report success for data that is gone -- the center must exit and recover from
disk on restart.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Self

from fdship.core.records import (
    FrameDecoder,
    Problem,
    ProblemKind,
    decode_checkpoint,
    encode,
    encode_checkpoint,
)
from fdship.errors import ConfigError, LocalIOError, LogCorruptError

LOCK_NAME = "LOCK"
_SEGMENT_RE = re.compile(r"^redo-(\d{20})\.log$")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{20})\.ckpt$")
_CHECKPOINT_TMP_RE = re.compile(r"^checkpoint-(\d{20})\.ckpt\.tmp$")
_READ_CHUNK = 1024 * 1024
#: How many recent fsync latencies are kept for metrics.
FSYNC_HISTORY = 1024
#: How many checkpoints are kept: the newest and one to fall back to.
CHECKPOINTS_KEPT = 2


def segment_name(lsn: int) -> str:
    return f"redo-{lsn:020d}.log"


def checkpoint_name(lsn: int) -> str:
    return f"checkpoint-{lsn:020d}.ckpt"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


@dataclass
class Recovery:
    """What ``RedoLog.open`` found: the state to start from and the records to replay."""

    #: The newest good checkpoint's state, or None to start from the empty state.
    checkpoint: bytes | None
    #: The LSN that state is valid at (0 for the empty state).
    checkpoint_lsn: int
    #: Payloads of the records after ``checkpoint_lsn``, in log order.  Read
    #: lazily from the segment files (memory stays bounded however long the
    #: log is); iterate before appending.  ``len()`` gives the count.
    records: Replay
    #: The LSN where new appends go (the end of the log).
    end_lsn: int
    #: Bytes of torn tail cut off the newest segment (0 if none).
    truncated: int = 0
    #: Sentences for the center's log about anything out of the ordinary.
    notes: list[str] = field(default_factory=list)


class Replay:
    """Re-iterable payloads of the records after a checkpoint, read from disk.

    ``open`` has already read and verified these bytes once; reading them again
    keeps memory bounded.  Should the files change in between (they must not:
    the data dir is locked), iteration raises LogCorruptError.
    """

    def __init__(self, spans: list[tuple[str, int, int, int]], after: int, count: int) -> None:
        # (path, segment start LSN, LSN to read from, verified end LSN)
        self._spans = spans
        self._after = after
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for path, start, begin, end in self._spans:
            decoder = FrameDecoder(begin)
            with open(path, "rb", buffering=0) as f:
                f.seek(begin - start)
                pos = begin
                while pos < end:
                    chunk = f.read(min(_READ_CHUNK, end - pos))
                    if not chunk:
                        break
                    pos += len(chunk)
                    for rec in decoder.feed(chunk):
                        if rec.end > self._after:
                            seen += 1
                            yield rec.payload
            last, problem = decoder.finish()
            if problem is not None or last != end:
                raise LogCorruptError(
                    f"REDO log {path} changed while the center was replaying it (expected "
                    f"good records up to byte {end - start}, found {last - start}); make sure "
                    "no other program writes to the data dir, then restart the center"
                )
        if seen != self._count:
            raise LogCorruptError(
                f"REDO log replay found {seen} records where {self._count} were verified; "
                "make sure no other program writes to the data dir, then restart the center"
            )


class RedoLog:
    """Write-ahead log of the center.  See the module docstring for the contract."""

    def __init__(self, data_dir: str, segment_bytes: int = 64 * 1024 * 1024) -> None:
        if segment_bytes <= 0:
            raise ConfigError(f"REDO log segment size must be positive, got {segment_bytes}")
        self.data_dir = os.path.abspath(data_dir)
        self.segment_bytes = segment_bytes
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the segment being written
        self._segments: list[int] = []  # start LSNs of the segments on disk; last is current
        self._seg_size = 0  # bytes in the current segment
        self._lsn = 0  # end of the log
        self._durable = 0  # end of what the last fsync covered
        self._checkpoints: list[int] = []  # LSNs of checkpoint files kept, ascending
        self._failed: str | None = None
        self.fsync_count = 0
        self.fsync_seconds_total = 0.0
        self.last_fsync_seconds = 0.0
        #: The most recent fsync latencies in seconds, oldest first.
        self.fsync_latencies: collections.deque[float] = collections.deque(maxlen=FSYNC_HISTORY)

    # -- state --------------------------------------------------------------

    @property
    def lsn(self) -> int:
        """LSN of the end of the log: the LSN of the last record appended."""
        return self._lsn

    @property
    def durable_lsn(self) -> int:
        """Every record at or before this LSN is on disk for good."""
        return self._durable

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def _path(self, name: str) -> str:
        return os.path.join(self.data_dir, name)

    def __repr__(self) -> str:
        return f"RedoLog({self.data_dir!r}, lsn={self._lsn}, durable={self._durable})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- open and recovery --------------------------------------------------

    def open(self) -> Recovery:
        """Lock the data dir, repair a torn tail, and return what to replay.

        Raises ConfigError if the directory cannot be used (or read) or another
        center holds it, LogCorruptError if the log or checkpoints are damaged
        in a way a crash cannot explain.
        """
        if self._lock_fd is not None:
            raise RuntimeError("RedoLog.open() called twice")
        self._lock()
        self._failed = None
        try:
            return self._recover()
        except OSError as e:
            self._release()
            raise ConfigError(
                f"cannot read or repair the REDO log in {self.data_dir}: {e}; check the "
                "permissions of the files there and the health of the disk"
            ) from None
        except BaseException:
            self._release()
            raise

    def _lock(self) -> None:
        try:
            os.makedirs(self.data_dir, exist_ok=True)
            fd = os.open(self._path(LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise ConfigError(
                f"cannot use data dir {self.data_dir}: {e.strerror}; create it and make it "
                "writable by the user the center runs as"
            ) from None
        try:
            # flock, not fcntl: flock locks belong to the open file, so even a
            # second RedoLog in the same process is refused.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise ConfigError(
                    f"another center is already using {self.data_dir}{who}; stop it first, "
                    "or give this center its own --data-dir"
                ) from None
            raise ConfigError(f"cannot lock {self._path(LOCK_NAME)}: {e.strerror}") from None
        # The pid is for the error message above only; the lock is the flock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _recover(self) -> Recovery:
        notes: list[str] = []
        names = os.listdir(self.data_dir)
        segments = sorted(int(m[1]) for m in map(_SEGMENT_RE.match, names) if m)
        ckpts = sorted((int(m[1]) for m in map(_CHECKPOINT_RE.match, names) if m), reverse=True)
        for name in sorted(n for n in names if _CHECKPOINT_TMP_RE.match(n)):
            os.unlink(self._path(name))
            notes.append(f"removed {name}, a checkpoint a crash interrupted before it was "
                         "complete; the previous checkpoint is in force")

        state, base, bad = self._choose_checkpoint(ckpts, segments)
        if segments:
            # May raise: then nothing but a torn tail has been changed on disk.
            spans, count, end, truncated = self._scan(segments, base, notes)
        for lsn, why in bad:
            name = checkpoint_name(lsn)
            os.replace(self._path(name), self._path(name + ".bad"))
            fallback = f"checkpoint at LSN {base}" if state is not None else "the empty state"
            notes.append(f"checkpoint {self._path(name)} is damaged ({why}); moved it aside "
                         f"as {name}.bad and rebuilt from {fallback} and the log instead")
        if bad:
            _fsync_dir(self.data_dir)
        self._checkpoints = sorted(c for c in ckpts if c not in {b for b, _ in bad})

        if not segments:
            if base:
                notes.append(f"no REDO log segments in {self.data_dir}; starting a new log at "
                             f"LSN {base}, right after the checkpoint")
            self._segments = [base]
            self._open_segment(base, create=True)
            self._lsn = self._durable = base
            return Recovery(state, base, Replay([], base, 0), base, 0, notes)

        self._segments = segments
        self._open_segment(segments[-1], create=False)
        self._seg_size = end - segments[-1]
        self._lsn = end
        # What open() read may still sit only in the page cache (the previous
        # process was killed before it synced); make it durable before the
        # center builds on it, so a later power cut cannot take it back.
        self._timed_fdatasync()
        self._durable = end
        return Recovery(state, base, Replay(spans, base, count), end, truncated, notes)

    def _choose_checkpoint(self, ckpts: list[int], segments: list[int]
                           ) -> tuple[bytes | None, int, list[tuple[int, str]]]:
        """(state, its LSN, damaged checkpoints newer than it) -- newest good one first."""
        bad: list[tuple[int, str]] = []
        first = segments[0] if segments else None
        for lsn in ckpts:
            path = self._path(checkpoint_name(lsn))
            try:
                with open(path, "rb") as f:
                    state, inner = decode_checkpoint(f.read())
                if inner != lsn:
                    raise LogCorruptError(f"its name says LSN {lsn} but it holds LSN {inner}")
            except (LogCorruptError, OSError) as e:
                bad.append((lsn, str(e)))
                continue
            if first is not None and first > lsn:
                what = (f"the newest checkpoint {path}" if not bad else
                        f"the only good checkpoint left, {path}, since the newer "
                        f"{checkpoint_name(bad[0][0])} is damaged ({bad[0][1]}),")
                raise LogCorruptError(
                    f"{what} is at LSN {lsn} but the oldest REDO log segment "
                    f"{self._path(segment_name(first))} starts at LSN {first}: the records in "
                    f"between are missing. Restore {self.data_dir} from a backup."
                )
            return state, lsn, bad
        if bad and (first is None or first > 0):
            lsn, why = bad[0]
            raise LogCorruptError(
                f"checkpoint {self._path(checkpoint_name(lsn))} is damaged ({why}), no older "
                f"good checkpoint is left, and the REDO log no longer starts at LSN 0 to "
                f"rebuild from scratch. Restore {self.data_dir} from a backup."
            )
        return None, 0, bad

    def _scan(self, segments: list[int], base: int, notes: list[str]
              ) -> tuple[list[tuple[str, int, int, int]], int, int, int]:
        """Verify the segments from ``base`` on; cut a torn tail off the newest.

        Returns (spans to replay, record count after base, end LSN, bytes cut).
        """
        spans: list[tuple[str, int, int, int]] = []
        count = 0
        truncated = 0
        end = segments[-1]
        for i, start in enumerate(segments):
            path = self._path(segment_name(start))
            last = i == len(segments) - 1
            nxt = None if last else segments[i + 1]
            if nxt is not None and nxt <= base:
                # Wholly covered by the checkpoint: kept only as a fallback for
                # the previous checkpoint; just check it joins the next one.
                size = os.path.getsize(path)
                if start + size != nxt:
                    raise self._gap_error(path, start, start + size, nxt)
                continue
            # Decode from the checkpoint's LSN when it lies in this segment:
            # that is a record boundary, and what comes before it is not needed.
            begin = max(start, base)
            end, problem, n = self._verify(path, start, begin, base)
            count += n
            if problem is None:
                if nxt is not None and end != nxt:
                    raise self._gap_error(path, start, end, nxt)
            elif problem.kind is ProblemKind.TORN and last:
                os.truncate(path, problem.offset - start)
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                truncated = problem.torn_bytes
                notes.append(
                    f"cut a torn tail of {truncated} bytes off {path} at byte "
                    f"{problem.offset - start} ({problem.reason}): the newest segment ended "
                    "in one damaged last record followed by nothing but zeros, which is what "
                    "a crash in the middle of an append leaves; that record had not been "
                    "synced, so nothing acknowledged was lost"
                )
                end = problem.offset
            else:
                raise self._corrupt_error(path, start, problem, segments[i + 1:])
            spans.append((path, start, begin, end))
        return spans, count, end, truncated

    def _verify(self, path: str, start: int, begin: int, base: int
                ) -> tuple[int, Problem | None, int]:
        """Decode one segment from LSN ``begin``; (good end, problem, records after base)."""
        decoder = FrameDecoder(begin)
        count = 0
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if begin > start + size:
                raise LogCorruptError(
                    f"the checkpoint at LSN {base} lies beyond the end of the REDO log "
                    f"{path} ({size} bytes from LSN {start}): records the checkpoint includes "
                    f"are missing from the log. Restore {self.data_dir} from a backup."
                )
            f.seek(begin - start)
            while chunk := f.read(_READ_CHUNK):
                count += sum(1 for rec in decoder.feed(chunk) if rec.end > base)
        end, problem = decoder.finish()
        return end, problem, count

    def _gap_error(self, path: str, start: int, end: int, nxt: int) -> LogCorruptError:
        how = "ends before" if end < nxt else "runs past"
        return LogCorruptError(
            f"REDO log {path} {how} the next segment {segment_name(nxt)}: it ends at LSN {end} "
            f"but the next one starts at LSN {nxt}, so records are missing or doubled. "
            f"Restore {self.data_dir} from a backup."
        )

    def _corrupt_error(self, path: str, start: int, problem: Problem,
                       later: list[int]) -> LogCorruptError:
        offset = problem.offset - start
        if problem.kind is ProblemKind.CORRUPT and problem.stray_offset is not None:
            stray = problem.stray_offset - start
            what = (f"{problem.reason}, and the {problem.stream_end - problem.stray_offset} "
                    f"bytes from byte {stray} to the end of the file are neither records nor "
                    "zero padding (a crash in the middle of an append leaves one partial last "
                    "record, then at most zeros; this is damage to records that may have been "
                    "synced)")
        elif problem.kind is ProblemKind.CORRUPT:
            where = (f"byte {problem.resume_offset - start}"
                     if problem.resume_offset is not None and problem.resume_offset > problem.offset
                     else "the same byte")
            what = f"{problem.reason}, yet a valid record header follows at {where}"
        else:
            what = (f"{problem.reason} at the end of a segment that is not the newest (a "
                    "segment is synced before the next one begins, so a crash cannot do this)")
        if later:
            move = (f", then move the {len(later)} newer segment file(s) "
                    f"({segment_name(later[0])}"
                    f"{' to ' + segment_name(later[-1]) if len(later) > 1 else ''}) out of "
                    f"{self.data_dir}")
        else:
            move = ""
        return LogCorruptError(
            f"REDO log {path} is damaged at byte {offset} (LSN {problem.offset}): {what}. "
            "The center will not guess what to replay around it and refuses to start. "
            f"First copy {self.data_dir} somewhere safe. Then either restore it from a backup, "
            f"or accept losing every record from that point on: run "
            f"`truncate -s {offset} {path}`{move}, and start the center again; it replays the "
            "records before the damage."
        )

    def _open_segment(self, start: int, create: bool) -> None:
        path = self._path(segment_name(start))
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        self._fd = os.open(path, flags, 0o640)
        if create:
            self._seg_size = 0
            # The new name must survive a crash, or records synced into the
            # file would be unreachable.
            _fsync_dir(self.data_dir)

    # -- running ------------------------------------------------------------

    def _usable(self) -> int:
        if self._failed is not None:
            raise LocalIOError(
                f"the REDO log in {self.data_dir} is unusable since an earlier error "
                f"({self._failed}); stop the center and start it again to recover from disk"
            )
        if self._fd is None:
            raise RuntimeError("RedoLog is not open")
        return self._fd

    def _fail(self, what: str, e: OSError) -> LocalIOError:
        self._failed = f"{what}: {e.strerror or e}"
        return LocalIOError(
            f"REDO log in {self.data_dir}: {self._failed}. The center cannot go on without "
            "a working log; fix the disk (free space, permissions, hardware) and restart it"
        )

    def append(self, payload: bytes) -> int:
        """Write one record (not yet durable; see ``sync``) and return its LSN."""
        fd = self._usable()
        frame = encode(payload)
        if self._seg_size and self._seg_size + len(frame) > self.segment_bytes:
            self._roll()
            fd = self._usable()
        try:
            _write_all(fd, frame)
        except OSError as e:
            # Cut off whatever part of the frame got in, so later appends do
            # not sit behind a broken frame (which would read as corruption).
            try:
                os.ftruncate(fd, self._seg_size)
            except OSError:
                raise self._fail("a record write failed and could not be undone", e) from None
            raise LocalIOError(
                f"cannot append to the REDO log in {self.data_dir}: {e.strerror}; "
                "free space on that disk (the record was not written)"
            ) from None
        self._seg_size += len(frame)
        self._lsn += len(frame)
        return self._lsn

    def _timed_fdatasync(self) -> None:
        assert self._fd is not None
        t0 = time.perf_counter()
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise self._fail("fsync of the REDO log failed", e) from None
        dt = time.perf_counter() - t0
        self.fsync_count += 1
        self.fsync_seconds_total += dt
        self.last_fsync_seconds = dt
        self.fsync_latencies.append(dt)

    def sync(self) -> None:
        """Make every record appended so far durable: one fdatasync (group commit)."""
        self._usable()
        if self._durable == self._lsn:
            return  # nothing new: an fsync would buy nothing
        self._timed_fdatasync()
        self._durable = self._lsn

    def _roll(self) -> None:
        """Start a new segment at the current LSN; the old one is synced first."""
        # Sync before the new file exists: then only the newest segment can
        # ever hold a torn tail, which is what lets open() call damage in any
        # older segment corruption.
        self._timed_fdatasync()
        self._durable = self._lsn
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        try:
            self._open_segment(self._lsn, create=True)
        except OSError as e:
            raise self._fail(f"cannot create segment {segment_name(self._lsn)}", e) from None
        self._segments.append(self._lsn)

    def checkpoint(self, state: bytes, lsn: int) -> None:
        """Store ``state``, the result of applying every record up to ``lsn``.

        ``lsn`` must be a value ``append`` returned (or ``Recovery.end_lsn``):
        a record boundary.  Syncs the log first, writes the checkpoint durably,
        keeps the previous one as a fallback, and deletes the segments that
        the older kept checkpoint covers entirely.
        """
        self._usable()
        newest = self._checkpoints[-1] if self._checkpoints else 0
        if not newest <= lsn <= self._lsn:
            raise ValueError(
                f"checkpoint LSN {lsn} is outside the log's range [{newest}, {self._lsn}]"
            )
        self.sync()
        name = checkpoint_name(lsn)
        tmp = self._path(name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                _write_all(fd, encode_checkpoint(state, lsn))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._path(name))
            _fsync_dir(self.data_dir)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise LocalIOError(
                f"cannot write checkpoint {self._path(name)}: {e.strerror}; the previous "
                "checkpoint and the log are intact, so nothing is lost, but the log keeps "
                "growing until a checkpoint succeeds: free space on that disk"
            ) from None
        if lsn not in self._checkpoints:
            self._checkpoints.append(lsn)
        self._prune()

    def _prune(self) -> None:
        """Drop checkpoints beyond the kept ones, then segments the oldest kept one covers."""
        # Nothing here needs a directory fsync: should a crash undo a delete,
        # the file is merely old and open() ignores or re-deletes it.
        while len(self._checkpoints) > CHECKPOINTS_KEPT:
            old = self._checkpoints.pop(0)
            try:
                os.unlink(self._path(checkpoint_name(old)))
            except FileNotFoundError:
                pass
        floor = self._checkpoints[0]
        # A segment ends where the next begins; the current one has no end yet.
        while len(self._segments) > 1 and self._segments[1] <= floor:
            old = self._segments.pop(0)
            try:
                os.unlink(self._path(segment_name(old)))
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Sync what was appended, close the segment and release the data dir."""
        try:
            if self._fd is not None and self._failed is None:
                self.sync()
        finally:
            self._release()
