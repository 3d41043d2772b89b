"""REDO record and checkpoint codec: bytes in, bytes out, no I/O.

Sits under ``fdship.center.redolog``, which owns the files; this module only
frames payloads and tells, for a run of bytes read back from a log segment,
which frames are good and what is wrong with the first one that is not.  It is
pure (no files, no clock, no tornado or asyncio) so that its whole decision
logic is tested with generated inputs.

Record frame
------------
Every record is one frame: a fixed 20-byte header, then the payload.  All
integers are little-endian::

    offset size  field
    0      2     magic            b"\\xfdR"
    2      1     version          1
    3      1     reserved         0
    4      4     length           u32, bytes of payload (at most MAX_PAYLOAD)
    8      8     payload checksum xxh3_64(payload)
    16     4     header checksum  xxh32(bytes 0..16)

The header checksum is what makes the length field trustworthy: a torn or
flipped length would otherwise send the reader to a wrong place and turn one
bad frame into garbage for everything after it.  Byte 0xFD never occurs in
UTF-8, so the magic can never appear inside the compact-JSON payloads the center
writes; a frame header found by scanning is a real frame header.

Telling a torn tail from corruption
-----------------------------------
The decoder reads frames in order from a known frame boundary (the start of a
segment, or a checkpoint's LSN).  The first frame that is incomplete or fails
any check is the *bad frame*, at offset P.  A torn tail is only what a crash in
the middle of an append can leave: one partial or damaged *last* frame, then
nothing, or nothing but zeros.  Everything else is corruption.  Concretely:

* The bad frame's *reach*: if its header is valid (magic, version, reserved
  byte, header checksum and a length within limits all check out) its length
  is trusted and the frame reaches to P + HEADER_SIZE + length; its payload is
  opaque and is never searched.  If the header itself is bad or incomplete, the
  length cannot be trusted and the frame reaches only over its HEADER_SIZE
  header bytes.
* The decoder looks at every position after P (after the reach, for a valid
  header) for a *valid header*: the magic and a matching header checksum (a
  false match is a 1 in 2**32 event even in random bytes, and the magic cannot
  occur in JSON).  A header that passes its checksum but carries an unknown
  version or an impossible length was written by someone, not torn, so the scan
  starts on it and finds it: that frame is reported as corruption, never cut
  off as a torn tail.  If one is found, the problem is ``CORRUPT`` at P with
  ``resume_offset`` there: something written after the bad frame survived
  while the bad frame did not, which a crash while appending cannot produce.
* Otherwise, if any byte past the reach is not zero, the problem is
  ``CORRUPT`` at P with ``stray_offset`` at that byte: data that is neither a
  record nor the zeros of never-written blocks follows the bad frame.  This is
  what random bytes written over a stretch of the log that runs to its end
  look like (disk damage, a stray write by another program): the records they
  cover may have been synced long ago, so they are never cut off silently.
* Otherwise the problem is ``TORN`` at P: the data ends inside the bad frame,
  or in zeros after it -- a process killed in the middle of ``write``, or a
  machine that lost power before the file's last pages were written, which
  leaves the tail short, zero-filled, or partly written.

Why that is safe: the log is append-only and each frame is written with one
``write`` at the end of the file.  A crash can damage only bytes that were
written after the last fsync, and those are all at the end of the file, so
everything the crash damaged is a suffix.  A killed process leaves a prefix of
its last frame; a power cut can also leave blocks that read as zeros.  Neither
leaves a valid frame, or bytes that are not zeros, after a bad frame.  Cutting
the file at P therefore loses only the one damaged last frame, which a crash
can only have left behind if it was never reported durable (``RedoLog.sync``
had not returned for it).  The codec cannot tell a frame a crash tore from a
last frame the disk damaged after it was synced: the length of the log at the
last fsync is not stored anywhere (storing it would cost a second fsync per
group commit).  Confining a torn tail to one last frame bounds what such
damage can cost to that one record; anything larger is refused.

The rule errs on the strict side: after a power cut, a filesystem may write
the pages of *unsynced* data out of order and leave a hole before a surviving
later frame or the middle of a long one.  That case is reported as corruption
too -- the center then refuses to start with a message saying what to do --
rather than ever dropping a record that may have been acknowledged.
``fdship.center.redolog`` adds one more rule the codec cannot see: only the
newest segment may have a torn tail, since older ones were fsynced before the
next was begun.

Checkpoint file
---------------
One file holds one opaque state snapshot and the LSN it is valid at::

    offset size  field
    0      8     magic     b"FDSHIPCK"
    8      4     version   1
    12     4     reserved  0
    16     8     lsn       u64
    24     8     length    u64, bytes of state
    32     8     checksum  xxh3_64(bytes 0..32 + state)
    40     ...   state

A checkpoint is written whole and renamed into place, so a bad one means media
damage or a foreign file; ``decode_checkpoint`` raises LogCorruptError for it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple

import xxhash

from fdship.errors import LogCorruptError

MAGIC = b"\xfdR"
VERSION = 1
HEADER = struct.Struct("<2sBBIQI")
HEADER_SIZE = HEADER.size  # 20
_HEADER_BODY = 16  # bytes covered by the header checksum
#: Largest payload one record may carry.  The center's records are small JSON
#: documents; the bound keeps the decoder's buffer bounded whatever it reads.
MAX_PAYLOAD = 64 * 1024 * 1024

CHECKPOINT_MAGIC = b"FDSHIPCK"
CHECKPOINT_VERSION = 1
CHECKPOINT_HEADER = struct.Struct("<8sIIQQQ")
CHECKPOINT_HEADER_SIZE = CHECKPOINT_HEADER.size  # 40
_CHECKPOINT_BODY = 32  # header bytes covered by the checksum


class Record(NamedTuple):
    """One good frame: where it starts and ends (absolute offsets) and its payload.

    ``end`` is the record's LSN when the offsets are global log positions.
    """

    start: int
    end: int
    payload: bytes


class ProblemKind(enum.Enum):
    TORN = "torn"
    CORRUPT = "corrupt"


@dataclass(frozen=True)
class Problem:
    """What is wrong with the first bad frame of a stream.

    ``offset`` is the absolute offset of the bad frame, i.e. where the good
    data ends.  ``stream_end`` is the absolute offset just past the last byte
    seen, so a torn tail covers ``stream_end - offset`` bytes.  A CORRUPT
    problem carries its evidence: ``resume_offset``, where a valid frame header
    follows the bad frame, or else ``stray_offset``, the first byte past the
    bad frame's reach that is not zero (see the module docstring).
    """

    kind: ProblemKind
    offset: int
    reason: str
    stream_end: int
    resume_offset: int | None = None
    stray_offset: int | None = None

    @property
    def torn_bytes(self) -> int:
        return self.stream_end - self.offset


def encode(payload: bytes) -> bytes:
    """Frame one payload: header + payload, ready for a single ``write``."""
    length = len(payload)
    if length > MAX_PAYLOAD:
        raise ValueError(
            f"a REDO record of {length} bytes is over the limit of {MAX_PAYLOAD} bytes; "
            "split the state change into smaller records"
        )
    body = struct.pack("<2sBBIQ", MAGIC, VERSION, 0, length, xxhash.xxh3_64_intdigest(payload))
    return b"".join((body, struct.pack("<I", xxhash.xxh32_intdigest(body)), payload))


def _header_problem(view: memoryview | bytes | bytearray, at: int,
                    max_payload: int) -> tuple[str, int] | None:
    """None if the HEADER_SIZE bytes at ``at`` are a good header, else (why, skip).

    ``skip`` is how many bytes, from ``at``, the scan for later frames must
    pass over: 1 for a header that fails its own checksum (its length cannot
    be trusted), 0 for one that passes it but is not ours to read (another
    version, an impossible length) -- such a header was written, not torn, so
    the scan finds it at once and the frame is reported as corruption.
    """
    magic, version, reserved, length, _, check = HEADER.unpack_from(view, at)
    if magic != MAGIC:
        return "no record header (bad magic)", 1
    if xxhash.xxh32_intdigest(view[at : at + _HEADER_BODY]) != check:
        return "record header checksum mismatch", 1
    if version != VERSION or reserved != 0:
        return f"record written in unknown format {version}.{reserved}", 0
    if length > max_payload:
        return f"record length {length} over the limit of {max_payload}", 0
    return None


def _header_sound(view: memoryview | bytes | bytearray, at: int) -> bool:
    """Whether a frame header was evidently written at ``at`` (magic and header checksum)."""
    return (view[at : at + 2] == MAGIC
            and xxhash.xxh32_intdigest(view[at : at + _HEADER_BODY])
            == HEADER.unpack_from(view, at)[5])


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes in file order, then ``finish``.

    Memory stays bounded: the decoder holds at most one frame that is not
    complete yet (header plus at most ``max_payload`` bytes) or, once a bad
    frame has been found, fewer than HEADER_SIZE bytes of look-ahead.  After
    the first bad frame no more records are returned; the decoder only looks
    for a valid header, and for bytes that are not zero past the bad frame's
    reach, to decide between a torn tail and corruption (see the module
    docstring).  Once a valid header is found further input is ignored.
    """

    _PARSE, _SCAN, _DONE = range(3)

    def __init__(self, base_offset: int = 0, max_payload: int = MAX_PAYLOAD) -> None:
        self._max_payload = max_payload
        self._buf = bytearray()
        self._pos = base_offset  # absolute offset of self._buf[0]
        self._seen = base_offset  # absolute offset just past the last byte fed
        self._end = base_offset  # absolute offset just past the last good frame
        self._mode = self._PARSE
        self._bad_offset = 0
        self._bad_reason = ""
        self._skip = 0  # bytes still to pass over before the scan may look
        self._reach = 0  # absolute offset the bad frame reaches to; only zeros may follow
        self._resume: int | None = None  # where a valid header follows the bad frame
        self._stray: int | None = None  # first byte past the reach that is not zero
        self._problem: Problem | None = None
        self._finished = False

    @property
    def end(self) -> int:
        """Absolute offset just past the last good frame so far."""
        return self._end

    def feed(self, data: bytes | bytearray | memoryview) -> list[Record]:
        if self._finished:
            raise RuntimeError("FrameDecoder.feed() after finish()")
        self._seen += len(data)
        if self._mode == self._DONE:
            return []  # corruption is certain; only count the bytes
        self._buf += data
        records = self._parse() if self._mode == self._PARSE else []
        if self._mode == self._SCAN:
            self._scan()
        return records

    def finish(self) -> tuple[int, Problem | None]:
        """No more data: return (end of the last good frame, problem or None)."""
        if self._finished:
            return self._end, self._problem
        self._finished = True
        if self._mode == self._PARSE and self._buf:
            self._incomplete()
        if self._mode == self._SCAN:
            self._scan()
        if self._mode == self._SCAN:
            # No valid header after the bad frame: the bytes held back in case
            # one started there are the last to check for stray data.
            self._pass(len(self._buf))
            if self._stray is None:
                # The data ends inside the bad frame or in zeros after it: torn tail.
                self._problem = Problem(ProblemKind.TORN, self._bad_offset, self._bad_reason,
                                        stream_end=self._seen)
            else:
                self._problem = Problem(ProblemKind.CORRUPT, self._bad_offset,
                                        self._bad_reason, stream_end=self._seen,
                                        stray_offset=self._stray)
        elif self._resume is not None:
            self._problem = Problem(ProblemKind.CORRUPT, self._bad_offset, self._bad_reason,
                                    stream_end=self._seen, resume_offset=self._resume)
        self._mode = self._DONE
        self._buf = bytearray()
        return self._end, self._problem

    def _incomplete(self) -> None:
        """The data ends inside the frame at the start of the buffer."""
        have = len(self._buf)
        if have < HEADER_SIZE:
            self._to_scan(f"incomplete record header ({have} of {HEADER_SIZE} bytes)", 1)
            return
        bad = _header_problem(self._buf, 0, self._max_payload)
        if bad is not None:  # cannot happen after _parse, kept for safety
            self._to_scan(*bad)
            return
        length = HEADER.unpack_from(self._buf, 0)[3]
        self._to_scan(f"incomplete record payload ({have - HEADER_SIZE} of {length} bytes)",
                      HEADER_SIZE + length)

    def _parse(self) -> list[Record]:
        records: list[Record] = []
        view = memoryview(self._buf)
        i = 0
        bad: tuple[str, int] | None = None  # (reason, bytes the scan must pass over)
        try:
            while len(view) - i >= HEADER_SIZE:
                bad = _header_problem(view, i, self._max_payload)
                if bad is not None:
                    break
                _, _, _, length, checksum, _ = HEADER.unpack_from(view, i)
                stop = i + HEADER_SIZE + length
                if stop > len(view):
                    break  # wait for the rest of the payload
                with view[i + HEADER_SIZE : stop] as payload:
                    good = xxhash.xxh3_64_intdigest(payload) == checksum
                    data = bytes(payload) if good else b""
                if not good:
                    # The header is valid, so its length is trusted: the scan
                    # for later frames starts after this frame, never inside
                    # its opaque payload.
                    bad = ("record payload checksum mismatch", HEADER_SIZE + length)
                    break
                start = self._pos + i
                records.append(Record(start, start + HEADER_SIZE + length, data))
                i = stop
        finally:
            view.release()
        self._consume(i)
        self._end = self._pos
        if bad is not None:
            self._to_scan(*bad)
        return records

    def _consume(self, n: int) -> None:
        if n:
            del self._buf[:n]
            self._pos += n

    def _to_scan(self, reason: str, skip: int) -> None:
        """The frame at the start of the buffer is bad; look past its first ``skip`` bytes.

        ``skip`` is the frame's length for a trusted header, and then also its
        reach; an untrusted header reaches over its own HEADER_SIZE bytes only.
        """
        self._mode = self._SCAN
        self._bad_offset = self._pos
        self._bad_reason = reason
        self._end = self._pos
        self._skip = skip
        self._reach = self._pos + max(skip, HEADER_SIZE)

    def _pass(self, n: int) -> None:
        """Drop ``n`` bytes after the bad frame, noting the first stray one past its reach.

        A crash leaves nothing but zeros (blocks never written) after the frame
        it tore, so any other byte there is evidence of damage.
        """
        if n and self._stray is None and self._pos + n > self._reach:
            lo = max(0, self._reach - self._pos)
            with memoryview(self._buf)[lo:n] as tail:
                rest = bytes(tail).lstrip(b"\0")
            if rest:
                self._stray = self._pos + n - len(rest)
        self._consume(n)

    def _scan(self) -> None:
        """Look for a valid header after the bad frame; keep only what may start one."""
        if self._skip:
            n = min(self._skip, len(self._buf))
            self._pass(n)
            self._skip -= n
            if self._skip:
                return
        buf = self._buf
        view = memoryview(buf)
        i = 0
        try:
            while True:
                i = buf.find(MAGIC, i)
                if i < 0:
                    # Keep a trailing first magic byte: the next feed may complete it.
                    i = len(buf) - 1 if buf.endswith(MAGIC[:1]) else len(buf)
                    break
                if len(buf) - i < HEADER_SIZE:
                    break  # a header may still complete here
                if _header_sound(view, i):
                    self._resume = self._pos + i
                    self._mode = self._DONE
                    break
                i += 1
        finally:
            view.release()
        if self._mode == self._DONE:
            self._buf = bytearray()
        else:
            self._pass(i)


def decode_stream(buf: bytes | bytearray | memoryview,
                  base_offset: int = 0) -> tuple[list[Record], int, Problem | None]:
    """Decode a whole run of frames that starts at absolute offset ``base_offset``.

    Returns (good records in order, end of the last good frame, problem or
    None).  ``problem`` is None only for a clean end: the data ends exactly
    after a good frame.
    """
    decoder = FrameDecoder(base_offset)
    records = decoder.feed(buf)
    end, problem = decoder.finish()
    return records, end, problem


def encode_checkpoint(state: bytes, lsn: int) -> bytes:
    """One checkpoint file's bytes: header, then the state."""
    if lsn < 0:
        raise ValueError(f"checkpoint LSN must not be negative, got {lsn}")
    body = struct.pack("<8sIIQQ", CHECKPOINT_MAGIC, CHECKPOINT_VERSION, 0, lsn, len(state))
    hasher = xxhash.xxh3_64(body)
    hasher.update(state)
    return b"".join((body, struct.pack("<Q", hasher.intdigest()), state))


def decode_checkpoint(data: bytes | bytearray | memoryview) -> tuple[bytes, int]:
    """(state, lsn) from a checkpoint file's bytes; LogCorruptError if it is not a good one."""
    if len(data) < CHECKPOINT_HEADER_SIZE:
        raise LogCorruptError(
            f"checkpoint is too short ({len(data)} bytes, the header alone is "
            f"{CHECKPOINT_HEADER_SIZE})"
        )
    magic, version, reserved, lsn, length, check = CHECKPOINT_HEADER.unpack_from(data, 0)
    if magic != CHECKPOINT_MAGIC:
        raise LogCorruptError("not an fdship checkpoint (bad magic)")
    if len(data) != CHECKPOINT_HEADER_SIZE + length:
        raise LogCorruptError(
            f"checkpoint length mismatch: header says {length} bytes of state, "
            f"file holds {len(data) - CHECKPOINT_HEADER_SIZE}"
        )
    view = memoryview(data)
    hasher = xxhash.xxh3_64(view[:_CHECKPOINT_BODY])
    hasher.update(view[CHECKPOINT_HEADER_SIZE:])
    if hasher.intdigest() != check:
        raise LogCorruptError("checkpoint checksum mismatch")
    if version != CHECKPOINT_VERSION or reserved != 0:
        raise LogCorruptError(
            f"checkpoint version {version}.{reserved} is not one this fdship can read "
            f"(it reads {CHECKPOINT_VERSION}.0)"
        )
    return bytes(view[CHECKPOINT_HEADER_SIZE:]), lsn
