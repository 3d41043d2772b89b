"""The REDO codec: framing round trips, and torn tail versus corruption."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fdship.core import records
from fdship.core.records import (
    HEADER_SIZE,
    MAGIC,
    FrameDecoder,
    ProblemKind,
    decode_checkpoint,
    decode_stream,
    encode,
    encode_checkpoint,
)
from fdship.errors import LogCorruptError

payload_lists = st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=12)
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def frames_of(payloads: list[bytes]) -> tuple[bytes, list[int]]:
    """The concatenated frames and the start offset of each (plus the end)."""
    starts = [0]
    out = []
    for p in payloads:
        f = encode(p)
        out.append(f)
        starts.append(starts[-1] + len(f))
    return b"".join(out), starts


def test_frame_layout() -> None:
    frame = encode(b'{"a":1}')
    assert len(frame) == HEADER_SIZE + 7
    assert frame[:2] == MAGIC
    assert struct.unpack_from("<I", frame, 4)[0] == 7
    assert frame[HEADER_SIZE:] == b'{"a":1}'


def test_round_trip_with_base_offset() -> None:
    blob, starts = frames_of([b"one", b"", b"three"])
    recs, end, problem = decode_stream(blob, 1000)
    assert problem is None
    assert end == 1000 + len(blob)
    assert [r.payload for r in recs] == [b"one", b"", b"three"]
    assert [r.start for r in recs] == [1000 + s for s in starts[:-1]]
    assert [r.end for r in recs] == [1000 + s for s in starts[1:]]


def test_empty_stream_is_clean() -> None:
    assert decode_stream(b"", 7) == ([], 7, None)


def test_oversize_payload_refused() -> None:
    with pytest.raises(ValueError, match="over the limit"):
        encode(b"x" * (records.MAX_PAYLOAD + 1))


@SETTINGS
@given(payload_lists)
def test_round_trip(payloads: list[bytes]) -> None:
    blob, _ = frames_of(payloads)
    recs, end, problem = decode_stream(blob, 0)
    assert problem is None
    assert end == len(blob)
    assert [r.payload for r in recs] == payloads


@SETTINGS
@given(payload_lists, st.data())
def test_incremental_feed_matches_whole(payloads: list[bytes], data: st.DataObject) -> None:
    blob, _ = frames_of(payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=8)))
    decoder = FrameDecoder(50)
    got = []
    prev = 0
    for c in cuts + [len(blob)]:
        got += decoder.feed(blob[prev:c])
        prev = c
    end, problem = decoder.finish()
    assert problem is None and end == 50 + len(blob)
    assert [r.payload for r in got] == payloads


@SETTINGS
@given(payload_lists, st.data())
def test_truncation_is_always_torn_tail(payloads: list[bytes], data: st.DataObject) -> None:
    blob, starts = frames_of(payloads)
    cut = data.draw(st.integers(0, len(blob)))
    recs, end, problem = decode_stream(blob[:cut], 0)
    # The good records are exactly the frames that fit entirely before the cut.
    complete = [s for s in starts[1:] if s <= cut]
    assert [r.payload for r in recs] == payloads[: len(complete)]
    assert end == (complete[-1] if complete else 0)
    if cut in starts:
        assert problem is None
    else:
        assert problem is not None
        assert problem.kind is ProblemKind.TORN
        assert problem.offset == end
        assert problem.torn_bytes == cut - end


@SETTINGS
@given(payload_lists, st.data())
def test_zero_filled_tail_is_torn(payloads: list[bytes], data: st.DataObject) -> None:
    """A power cut can leave the file longer than its data, padded with zeros."""
    blob, starts = frames_of(payloads)
    cut = data.draw(st.integers(0, len(blob)))
    pad = data.draw(st.integers(1, 5000))
    # Zeros that rebuild the cut frame byte for byte (its missing bytes were
    # zeros too) make a whole, checksum-valid record: not a torn tail.
    nxt = min((s for s in starts if s > cut), default=len(blob))
    assume(not (cut < nxt and pad >= nxt - cut and not any(blob[cut:nxt])))
    _, end, problem = decode_stream(blob[:cut] + bytes(pad), 0)
    assert problem is not None and problem.kind is ProblemKind.TORN
    assert problem.stream_end == cut + pad
    assert end == max(s for s in starts if s <= cut)


@SETTINGS
@given(payload_lists, st.data())
def test_flip_followed_by_valid_records_is_corruption(payloads: list[bytes],
                                                      data: st.DataObject) -> None:
    payloads = payloads + [b"tail record"]
    blob, starts = frames_of(payloads)
    victim = data.draw(st.integers(0, len(payloads) - 2))
    pos = data.draw(st.integers(starts[victim], starts[victim + 1] - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(blob)
    damaged[pos] ^= 1 << bit
    recs, end, problem = decode_stream(bytes(damaged), 0)
    assert problem is not None
    assert problem.kind is ProblemKind.CORRUPT
    assert problem.offset == starts[victim] == end
    assert problem.resume_offset is not None and problem.resume_offset > problem.offset
    assert [r.payload for r in recs] == payloads[:victim]


def garble(blob: bytes, start: int, stop: int, seed: int) -> bytes:
    """``blob`` with bytes [start, stop) replaced by random ones, each different from the
    byte it replaces and never zero (so it can pass neither for the original nor for the
    zeros of a block that was never written)."""
    rnd = random.Random(seed)
    out = bytearray(blob)
    for i in range(start, stop):
        d = rnd.randrange(1, 256)
        out[i] = blob[i] ^ d if blob[i] ^ d else blob[i] ^ (d % 255 + 1)
    return bytes(out)


@SETTINGS
@given(payload_lists, st.data())
def test_flip_in_last_record_payload_is_torn(payloads: list[bytes], data: st.DataObject) -> None:
    """The last frame's header holds, so its reach is known and nothing follows it."""
    payloads = payloads + [b"last record"]
    blob, starts = frames_of(payloads)
    pos = data.draw(st.integers(starts[-2] + HEADER_SIZE, starts[-1] - 1))
    damaged = bytearray(blob)
    damaged[pos] ^= 1 << data.draw(st.integers(0, 7))
    recs, end, problem = decode_stream(bytes(damaged), 0)
    assert problem is not None and problem.kind is ProblemKind.TORN
    assert problem.offset == starts[-2] == end
    assert problem.torn_bytes == len(encode(b"last record"))
    assert [r.payload for r in recs] == payloads[:-1]


@SETTINGS
@given(payload_lists, st.data())
def test_flip_in_last_record_header_before_its_payload_is_corruption(
        payloads: list[bytes], data: st.DataObject) -> None:
    """A whole header that fails its checksum, with payload bytes after it: a killed writer
    leaves a prefix of its frame, never that, so the record is not cut off."""
    payloads = payloads + [b"last record"]
    blob, starts = frames_of(payloads)
    pos = data.draw(st.integers(starts[-2], starts[-2] + HEADER_SIZE - 1))
    damaged = bytearray(blob)
    damaged[pos] ^= 1 << data.draw(st.integers(0, 7))
    recs, end, problem = decode_stream(bytes(damaged), 0)
    assert problem is not None and problem.kind is ProblemKind.CORRUPT
    assert problem.offset == starts[-2] == end
    assert problem.resume_offset is None
    assert problem.stray_offset == starts[-2] + HEADER_SIZE  # the payload's first byte
    assert [r.payload for r in recs] == payloads[:-1]


@SETTINGS
@given(payload_lists, st.data())
def test_garbage_from_a_record_to_the_end_is_corruption(payloads: list[bytes],
                                                        data: st.DataObject) -> None:
    """Random bytes over the log from inside any record but the last one up to the end:
    no valid frame follows, yet it is not a torn tail, because the bytes past the damaged
    record are neither records nor zeros.  The records they cover may have been synced."""
    payloads = payloads + [b"tail record"]
    blob, starts = frames_of(payloads)
    victim = data.draw(st.integers(0, len(payloads) - 2))
    pos = data.draw(st.integers(starts[victim], starts[victim + 1] - 1))
    damaged = garble(blob, pos, len(blob), data.draw(st.integers(0, 2**32)))
    recs, end, problem = decode_stream(damaged, 0)
    assert problem is not None and problem.kind is ProblemKind.CORRUPT, problem
    assert problem.offset == starts[victim] == end
    assert problem.resume_offset is None
    assert problem.stray_offset is not None
    assert problem.offset < problem.stray_offset <= starts[victim + 1] + HEADER_SIZE
    assert problem.stream_end == len(blob)
    assert [r.payload for r in recs] == payloads[:victim]


@SETTINGS
@given(payload_lists, st.data())
def test_garbage_over_a_stretch_with_records_after_it_is_corruption(
        payloads: list[bytes], data: st.DataObject) -> None:
    payloads = payloads + [b"record after the damage"]
    blob, starts = frames_of(payloads)
    victim = data.draw(st.integers(0, len(payloads) - 2))
    pos = data.draw(st.integers(starts[victim], starts[victim + 1] - 1))
    stop = data.draw(st.integers(pos + 1, starts[-2]))  # the last record survives whole
    damaged = garble(blob, pos, stop, data.draw(st.integers(0, 2**32)))
    recs, end, problem = decode_stream(damaged, 0)
    assert problem is not None and problem.kind is ProblemKind.CORRUPT
    assert problem.offset == starts[victim] == end
    # The scan finds the surviving last record (or an earlier one) again.
    assert problem.resume_offset is not None
    assert problem.offset < problem.resume_offset <= starts[-2]
    assert [r.payload for r in recs] == payloads[:victim]


@SETTINGS
@given(payload_lists, st.data())
def test_a_short_tail_of_anything_is_torn(payloads: list[bytes], data: st.DataObject) -> None:
    """Fewer bytes than a header after the last good record: nothing there can be judged,
    and it is all a killed writer can have left of a header."""
    blob, _ = frames_of(payloads)
    tail = data.draw(st.binary(min_size=1, max_size=HEADER_SIZE - 1))
    recs, end, problem = decode_stream(blob + tail, 0)
    assert problem is not None and problem.kind is ProblemKind.TORN
    assert problem.offset == end == len(blob) and problem.torn_bytes == len(tail)
    assert [r.payload for r in recs] == payloads


@SETTINGS
@given(payload_lists, st.data())
def test_a_partial_last_frame_with_garbled_payload_is_torn(payloads: list[bytes],
                                                           data: st.DataObject) -> None:
    """A valid header whose payload the data ends inside: whatever the payload bytes are,
    the record was never complete."""
    blob, _ = frames_of(payloads)
    last = encode(bytes(range(200)))
    cut = data.draw(st.integers(HEADER_SIZE + 1, len(last) - 1))
    partial = garble(last, HEADER_SIZE, cut, data.draw(st.integers(0, 2**32)))[:cut]
    recs, end, problem = decode_stream(blob + partial, 0)
    assert problem is not None and problem.kind is ProblemKind.TORN
    assert problem.offset == end == len(blob) and problem.torn_bytes == cut
    assert "incomplete record payload" in problem.reason
    assert [r.payload for r in recs] == payloads


@SETTINGS
@given(payload_lists, st.data())
def test_a_zero_hole_then_stray_bytes_is_corruption(payloads: list[bytes],
                                                    data: st.DataObject) -> None:
    """Zeros (a block never written) followed by bytes that are not zeros: a power cut that
    wrote pages out of order, or damage.  Either way not provably unacknowledged."""
    blob, _ = frames_of(payloads)
    hole = data.draw(st.integers(HEADER_SIZE, 5000))
    junk = data.draw(st.binary(min_size=1, max_size=100).filter(lambda b: any(b)))
    recs, end, problem = decode_stream(blob + bytes(hole) + junk, 0)
    assert problem is not None and problem.kind is ProblemKind.CORRUPT
    assert problem.offset == end == len(blob)
    assert problem.stray_offset == len(blob) + hole + (len(junk) - len(junk.lstrip(b"\0")))
    assert [r.payload for r in recs] == payloads


@SETTINGS
@given(payload_lists, st.data())
def test_classification_does_not_depend_on_feed_sizes(payloads: list[bytes],
                                                      data: st.DataObject) -> None:
    """Whatever the damage (a flip, a short tail, zeros, garbage, or zeros then garbage),
    feeding the bytes in pieces of any size gives the same answer as feeding them whole."""
    payloads = payloads + [b"x"]
    blob, _ = frames_of(payloads)
    damaged = bytearray(blob)
    damaged[data.draw(st.integers(0, len(blob) - 1))] ^= 0x40
    kind = data.draw(st.sampled_from(["flip", "short", "zeros", "garbage", "hole"]))
    rnd = random.Random(data.draw(st.integers(0, 2**32)))
    if kind == "short":
        damaged = bytearray(blob) + rnd.randbytes(rnd.randrange(1, HEADER_SIZE))
    elif kind == "zeros":
        damaged = bytearray(blob[: rnd.randrange(len(blob))]) + bytes(rnd.randrange(1, 300))
    elif kind == "garbage":
        damaged = bytearray(garble(blob, rnd.randrange(len(blob)), len(blob),
                                    rnd.randrange(2**32)))
    elif kind == "hole":
        damaged = bytearray(blob) + bytes(rnd.randrange(300)) + b"\xfd" + rnd.randbytes(40)
    whole = decode_stream(bytes(damaged), 3)
    decoder = FrameDecoder(3)
    got = []
    step = data.draw(st.integers(1, 64))
    for i in range(0, len(damaged), step):
        got += decoder.feed(bytes(damaged[i : i + step]))
    end, problem = decoder.finish()
    assert (got, end, problem) == whole


def test_corruption_with_garbage_header_before_valid_frame() -> None:
    blob, starts = frames_of([b"a" * 40, b"b" * 40, b"c" * 40])
    damaged = bytearray(blob)
    damaged[starts[1] : starts[1] + 4] = b"\x00\x00\x00\x00"  # magic and version wiped
    recs, _, problem = decode_stream(bytes(damaged), 0)
    assert [r.payload for r in recs] == [b"a" * 40]
    assert problem is not None and problem.kind is ProblemKind.CORRUPT
    assert problem.offset == starts[1]
    assert problem.resume_offset == starts[2]
    assert "magic" in problem.reason


def test_payload_is_never_searched_when_header_is_good() -> None:
    """A payload that happens to carry a frame does not make a torn tail look corrupt."""
    inner = encode(b"inner")
    blob, starts = frames_of([b"a", b"xx" + inner + b"yy"])
    damaged = bytearray(blob)
    damaged[starts[1] + HEADER_SIZE] ^= 1  # payload byte of the last record
    _, _, problem = decode_stream(bytes(damaged), 0)
    assert problem is not None and problem.kind is ProblemKind.TORN


def test_unknown_version_is_corruption_not_torn() -> None:
    """A header that passes its checksum was written, not torn: never cut it off."""
    body = struct.pack("<2sBBIQ", MAGIC, 9, 0, 0, 0)
    import xxhash

    future = body + struct.pack("<I", xxhash.xxh32_intdigest(body))
    blob = encode(b"ok") + future
    recs, end, problem = decode_stream(blob, 0)
    assert [r.payload for r in recs] == [b"ok"]
    assert problem is not None and problem.kind is ProblemKind.CORRUPT
    assert problem.offset == end == len(encode(b"ok"))
    assert "unknown format" in problem.reason


def test_checkpoint_round_trip() -> None:
    data = encode_checkpoint(b'{"jobs":[]}', 12345)
    assert decode_checkpoint(data) == (b'{"jobs":[]}', 12345)
    assert decode_checkpoint(encode_checkpoint(b"", 0)) == (b"", 0)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: d[:10], "too short"),
        (lambda d: b"X" + d[1:], "bad magic"),
        (lambda d: d[:-1], "length mismatch"),
        (lambda d: d + b"!", "length mismatch"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum mismatch"),
        (lambda d: d[:16] + bytes([d[16] ^ 1]) + d[17:], "checksum mismatch"),  # the LSN
    ],
)
def test_bad_checkpoint_raises(damage, match) -> None:  # type: ignore[no-untyped-def]
    good = encode_checkpoint(b"state" * 10, 99)
    with pytest.raises(LogCorruptError, match=match):
        decode_checkpoint(damage(good))


@SETTINGS
@given(st.binary(max_size=2000), st.integers(0, 2**63), st.data())
def test_checkpoint_any_flip_detected(state: bytes, lsn: int, data: st.DataObject) -> None:
    good = encode_checkpoint(state, lsn)
    assert decode_checkpoint(good) == (state, lsn)
    damaged = bytearray(good)
    damaged[data.draw(st.integers(0, len(good) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(LogCorruptError):
        decode_checkpoint(bytes(damaged))


def test_core_codec_is_pure() -> None:
    """records.py must not pull in tornado, asyncio or the file side."""
    import os
    import subprocess
    import sys

    code = ("import sys, fdship.core.records; "
            "bad = [m for m in ('tornado', 'asyncio', 'fdship.center') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(records.__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(repo)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
