"""Damaged REDO logs on real files: what is a torn tail (cut) and what is damage (refused).

A crash in the middle of an append can leave only one partial (or, after a
power cut, partly zeroed) last record, then nothing or zeros.  Everything else
-- a flipped byte with records after it, random bytes over a stretch of the
log, random bytes from the middle of the newest segment to its end -- is
damage to records that were synced and may have been acknowledged, and the
center must refuse to start with one line naming the file, the offset and what
to do, changing nothing on disk.  The last test runs a real ``fdship center``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import fdship
from fdship.center.redolog import Recovery, RedoLog, segment_name
from fdship.core.records import HEADER_SIZE, encode
from fdship.errors import LogCorruptError
from fdship.localcluster import free_port

REPO = str(Path(fdship.__file__).resolve().parent.parent)
N = 400


def payload(i: int) -> bytes:
    return json.dumps({"n": i, "pad": "x" * (i % 53)}, separators=(",", ":")).encode()


@pytest.fixture
def logs() -> Iterator[list[RedoLog]]:
    opened: list[RedoLog] = []
    yield opened
    for log in opened:
        with contextlib.suppress(Exception):
            log.close()


def open_log(logs: list[RedoLog], path: Path, segment_bytes: int = 64 * 1024 * 1024
             ) -> tuple[RedoLog, Recovery]:
    log = RedoLog(str(path), segment_bytes=segment_bytes)
    rec = log.open()
    logs.append(log)
    return log, rec


def synced_log(logs: list[RedoLog], path: Path, n: int = N,
               segment_bytes: int = 64 * 1024 * 1024) -> list[int]:
    """Append ``n`` records, sync them (they are acknowledged from here on), close."""
    log, _ = open_log(logs, path, segment_bytes)
    lsns = [log.append(payload(i)) for i in range(n)]
    log.sync()
    log.close()
    return lsns


def garble(data: bytearray, start: int, stop: int, seed: int) -> None:
    """Overwrite [start, stop) with random bytes, each different from the one it replaces."""
    rnd = random.Random(seed)
    for i in range(start, stop):
        data[i] ^= rnd.randrange(1, 256)


def refused(logs: list[RedoLog], path: Path, seg: Path) -> str:
    """Opening must fail with one line, change nothing, and release the data dir."""
    before = seg.read_bytes()
    with pytest.raises(LogCorruptError) as exc:
        open_log(logs, path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(seg) in msg and "truncate -s" in msg and "backup" in msg
    assert seg.read_bytes() == before, "the damaged log was changed"
    return msg


def records_after_advice(logs: list[RedoLog], path: Path, msg: str) -> list[bytes]:
    """Do what the message says (cut the file at the offset it names), then reopen."""
    m = re.search(r"`truncate -s (\d+) (\S+)`", msg)
    assert m, msg
    os.truncate(m.group(2), int(m.group(1)))
    log, rec = open_log(logs, path)
    got = list(rec.records)
    log.close()
    return got


def record_at(lsns: list[int], offset: int) -> int:
    """Index of the record whose frame starts at ``offset``."""
    starts = [0] + lsns[:-1]
    return starts.index(offset)


# -- torn tails: cut and reported ---------------------------------------------


@pytest.mark.parametrize("tail", [
    "header_cut", "payload_cut", "payload_cut_garbled", "partial_then_zeros", "zeros_only",
    "short_garbage", "header_garbage_then_zeros", "last_record_payload_garbled"])
def test_what_a_crash_mid_append_leaves_is_cut_and_reported(tmp_path: Path,
                                                            logs: list[RedoLog],
                                                            tail: str) -> None:
    lsns = synced_log(logs, tmp_path)
    seg = tmp_path / segment_name(0)
    frame = encode(payload(10_000) * 3)
    rnd = random.Random(tail)
    keep = N  # records expected back
    with open(seg, "r+b") as f:
        f.seek(0, os.SEEK_END)
        if tail == "header_cut":
            f.write(frame[:7])
        elif tail == "payload_cut":
            f.write(frame[: HEADER_SIZE + 40])
        elif tail == "payload_cut_garbled":
            partial = bytearray(frame[: len(frame) - 9])
            garble(partial, HEADER_SIZE, len(partial), 5)
            f.write(partial)
        elif tail == "partial_then_zeros":  # power cut: the last blocks read as zeros
            f.write(frame[: HEADER_SIZE + 11] + bytes(8192))
        elif tail == "zeros_only":
            f.write(bytes(4096))
        elif tail == "short_garbage":  # garbage at the very end, no valid frame after
            f.write(rnd.randbytes(HEADER_SIZE - 1))
        elif tail == "header_garbage_then_zeros":
            f.write(bytes(b | 1 for b in rnd.randbytes(HEADER_SIZE)) + bytes(3000))
        elif tail == "last_record_payload_garbled":
            # The record's header holds, so its extent is known, and nothing follows it.
            last = bytearray(seg.read_bytes()[lsns[-2]:])
            garble(last, HEADER_SIZE, len(last), 6)
            f.seek(lsns[-2])
            f.write(last)
            keep = N - 1
    size = os.path.getsize(seg)
    end = lsns[keep - 1]
    log, rec = open_log(logs, tmp_path)
    assert rec.truncated == size - end
    (note,) = [n for n in rec.notes if "torn tail" in n]
    assert str(seg) in note and f"at byte {end}" in note and f"of {size - end} bytes" in note
    assert os.path.getsize(seg) == end == rec.end_lsn
    assert list(rec.records) == [payload(i) for i in range(keep)]
    # The log goes on where the tail was, and a second start finds nothing to repair.
    log.append(b"after")
    log.close()
    log, rec = open_log(logs, tmp_path)
    assert rec.truncated == 0 and rec.notes == []
    assert list(rec.records)[-2:] == [payload(keep - 1), b"after"]


# -- damage: refused ------------------------------------------------------------


@pytest.mark.parametrize("where", ["payload", "header", "length_field"])
def test_flipped_bytes_in_a_middle_record_refuse_to_start(tmp_path: Path,
                                                          logs: list[RedoLog],
                                                          where: str) -> None:
    lsns = synced_log(logs, tmp_path)
    seg = tmp_path / segment_name(0)
    victim = N // 2
    start = lsns[victim - 1]
    at = {"payload": start + HEADER_SIZE + 3, "header": start, "length_field": start + 5}[where]
    data = bytearray(seg.read_bytes())
    for k in range(3):  # a few bytes, as a bad sector or a stray write would
        data[at + k] ^= 0x41
    seg.write_bytes(bytes(data))
    msg = refused(logs, tmp_path, seg)
    assert f"is damaged at byte {start} (LSN {start})" in msg
    assert "valid record header follows" in msg
    assert records_after_advice(logs, tmp_path, msg) == [payload(i) for i in range(victim)]


def test_random_garbage_over_the_second_half_with_valid_frames_after_refuses(
        tmp_path: Path, logs: list[RedoLog]) -> None:
    lsns = synced_log(logs, tmp_path)
    seg = tmp_path / segment_name(0)
    data = bytearray(seg.read_bytes())
    n = len(data)
    garble(data, n // 2, 3 * n // 4, 7)
    seg.write_bytes(bytes(data))
    msg = refused(logs, tmp_path, seg)
    m = re.search(r"is damaged at byte (\d+) .*valid record header follows at byte (\d+)", msg)
    assert m, msg
    bad, resume = int(m.group(1)), int(m.group(2))
    assert bad <= n // 2 < 3 * n // 4 <= resume
    got = records_after_advice(logs, tmp_path, msg)
    assert got == [payload(i) for i in range(record_at(lsns, bad))]
    assert len(got) >= N // 2 - 5


def test_random_garbage_from_the_middle_to_the_end_refuses_to_start(
        tmp_path: Path, logs: list[RedoLog]) -> None:
    """The hole this closes: no valid frame is left after the damage, yet it covers half
    the newest segment's synced records.  It used to be cut off as a torn tail."""
    lsns = synced_log(logs, tmp_path)
    seg = tmp_path / segment_name(0)
    data = bytearray(seg.read_bytes())
    n = len(data)
    garble(data, n // 2, n, 8)
    seg.write_bytes(bytes(data))
    msg = refused(logs, tmp_path, seg)
    m = re.search(r"is damaged at byte (\d+) \(LSN \d+\): .*the (\d+) bytes from byte (\d+) "
                  r"to the end of the file are neither records nor zero padding", msg)
    assert m, msg
    bad, count, stray = (int(g) for g in m.groups())
    assert bad <= n // 2 and stray + count == n
    got = records_after_advice(logs, tmp_path, msg)
    assert got == [payload(i) for i in range(record_at(lsns, bad))]


def test_garbage_to_the_end_of_the_newest_of_several_segments_refuses(
        tmp_path: Path, logs: list[RedoLog]) -> None:
    synced_log(logs, tmp_path, segment_bytes=4096)
    segs = sorted(tmp_path.glob("redo-*.log"))
    assert len(segs) >= 3
    newest = segs[-1]
    data = bytearray(newest.read_bytes())
    assert len(data) > 2 * HEADER_SIZE + 200
    garble(data, len(data) // 2, len(data), 9)
    newest.write_bytes(bytes(data))
    msg = refused(logs, tmp_path, newest)
    assert "neither records nor zero padding" in msg


def test_a_zero_hole_then_stray_bytes_at_the_end_refuses(tmp_path: Path,
                                                         logs: list[RedoLog]) -> None:
    """Zeros, then bytes that are not a record: not what one torn append leaves."""
    lsns = synced_log(logs, tmp_path)
    seg = tmp_path / segment_name(0)
    with open(seg, "ab") as f:
        f.write(bytes(4096) + b"\x01stray bytes after a hole")
    msg = refused(logs, tmp_path, seg)
    assert f"damaged at byte {lsns[-1]} " in msg
    assert f"from byte {lsns[-1] + 4096} to the end" in msg
    assert records_after_advice(logs, tmp_path, msg) == [payload(i) for i in range(N)]


# -- a real center ----------------------------------------------------------------


def _center(data: str, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": REPO, "FDSHIP_TOKEN": "redo-damage-token"}
    return subprocess.Popen(
        [sys.executable, "-m", "fdship", "center", "--listen", f"127.0.0.1:{port}",
         "--data-dir", data, "--checkpoint-interval", "1h", "--checkpoint-records", "1000000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _post(port: int, path: str, body: dict[str, object]) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST",
                                 data=json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer redo-damage-token",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status


def _until(what: str, ok: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if ok():
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_real_center_refuses_garbage_to_the_end_in_one_line(tmp_path: Path) -> None:
    data = str(tmp_path / "center")
    port = free_port()
    p = _center(data, port)
    try:
        _until("the center", lambda: _post(port, "/center/heartbeat", {
            "name": "h0", "address": "h0:1", "boot_id": "b"}) == 200)
        for i in range(1, 60):  # each new host is a state change written to the log
            assert _post(port, "/center/heartbeat",
                         {"name": f"h{i}", "address": f"h{i}:1", "boot_id": "b"}) == 200
    finally:
        p.send_signal(signal.SIGKILL)  # no clean stop: no checkpoint, all of it in the log
        p.communicate(timeout=30)
    seg = max(Path(data).glob("redo-*.log"))
    raw = bytearray(seg.read_bytes())
    size = len(raw)
    assert size > 2000
    garble(raw, size // 2, size, 10)
    seg.write_bytes(bytes(raw))
    p = _center(data, free_port())
    try:
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0, "the center started on a log with synced records overwritten"
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    m = re.match(r"fdship center: REDO log (\S+) is damaged at byte (\d+) ", last)
    assert m, err
    assert m.group(1) == str(seg) and int(m.group(2)) <= size // 2
    assert "neither records nor zero padding" in last and "truncate -s" in last
    assert seg.read_bytes() == bytes(raw)  # nothing cut
