"""The center's REDO log on real files: recovery, repair, checkpoints, locking, kill -9."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import fdship
from fdship.center.redolog import RedoLog, checkpoint_name, segment_name
from fdship.core.records import HEADER_SIZE, encode
from fdship.errors import ConfigError, LogCorruptError

REPO = str(Path(fdship.__file__).resolve().parent.parent)


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[list[RedoLog]]:
    """RedoLogs a test opens; all are closed at the end, even on failure."""
    opened: list[RedoLog] = []
    yield opened
    for log in opened:
        with contextlib.suppress(Exception):
            log.close()


def opener(logs: list[RedoLog], path: Path, segment_bytes: int = 64 * 1024 * 1024):
    def open_log() -> tuple[RedoLog, object]:
        log = RedoLog(str(path), segment_bytes=segment_bytes)
        rec = log.open()
        logs.append(log)
        return log, rec
    return open_log


def payload(i: int) -> bytes:
    return json.dumps({"n": i, "pad": "x" * (i % 37)}, separators=(",", ":")).encode()


def segments(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("redo-*.log"))


def test_append_sync_reopen(tmp_path: Path, logs: list[RedoLog]) -> None:
    open_log = opener(logs, tmp_path)
    log, rec = open_log()
    assert rec.checkpoint is None and list(rec.records) == [] and rec.end_lsn == 0
    lsns = [log.append(payload(i)) for i in range(50)]
    assert lsns == sorted(set(lsns)) and lsns[0] == HEADER_SIZE + len(payload(0))
    assert log.durable_lsn == 0
    log.sync()
    assert log.durable_lsn == lsns[-1] == log.lsn
    log.close()

    log, rec = open_log()
    assert rec.truncated == 0 and rec.notes == []
    assert len(rec.records) == 50
    assert list(rec.records) == [payload(i) for i in range(50)]
    assert list(rec.records) == [payload(i) for i in range(50)]  # re-iterable
    assert rec.end_lsn == lsns[-1] == log.lsn
    assert log.append(b"next") > lsns[-1]


def test_group_commit_counts_fsyncs(tmp_path: Path, logs: list[RedoLog]) -> None:
    log, _ = opener(logs, tmp_path)()
    base = log.fsync_count
    log.sync()  # nothing appended: no fsync needed
    assert log.fsync_count == base
    for i in range(10):
        log.append(payload(i))
    log.sync()
    assert log.fsync_count == base + 1
    assert log.last_fsync_seconds > 0
    assert log.fsync_seconds_total >= log.last_fsync_seconds
    assert len(log.fsync_latencies) == log.fsync_count


def test_segments_roll(tmp_path: Path, logs: list[RedoLog]) -> None:
    open_log = opener(logs, tmp_path, segment_bytes=500)
    log, _ = open_log()
    lsns = [log.append(payload(i)) for i in range(40)]
    segs = segments(tmp_path)
    assert len(segs) > 3
    # Each name is the LSN of its first byte; together they tile the log.
    starts = [int(s[5:25]) for s in segs]
    sizes = [os.path.getsize(tmp_path / s) for s in segs]
    assert starts[0] == 0
    assert all(a + n == b for a, n, b in zip(starts, sizes, starts[1:], strict=False))
    assert starts[-1] + sizes[-1] == lsns[-1]
    assert all(n <= 500 for n in sizes)
    log.close()
    log, rec = open_log()
    assert list(rec.records) == [payload(i) for i in range(40)]


def test_torn_tail_is_cut(tmp_path: Path, logs: list[RedoLog]) -> None:
    open_log = opener(logs, tmp_path)
    log, _ = open_log()
    for i in range(5):
        end = log.append(payload(i))
    log.close()
    seg = tmp_path / segment_name(0)
    half = encode(payload(5))[: HEADER_SIZE + 3]
    with open(seg, "ab") as f:
        f.write(half)
    log, rec = open_log()
    assert rec.truncated == len(half)
    assert any("torn tail" in n and str(seg) in n for n in rec.notes)
    assert os.path.getsize(seg) == end == rec.end_lsn
    assert list(rec.records) == [payload(i) for i in range(5)]
    # Appends after the repair land where the torn frame was, and read back.
    log.append(payload(99))
    log.close()
    log, rec = open_log()
    assert rec.truncated == 0
    assert list(rec.records) == [payload(i) for i in range(5)] + [payload(99)]


def test_torn_header_and_zero_tail(tmp_path: Path, logs: list[RedoLog]) -> None:
    open_log = opener(logs, tmp_path)
    log, _ = open_log()
    log.append(payload(1))
    log.close()
    seg = tmp_path / segment_name(0)
    with open(seg, "ab") as f:
        f.write(encode(payload(2))[:7] + bytes(4096))  # cut header, then zeros (power cut)
    log, rec = open_log()
    assert rec.truncated == 7 + 4096
    assert list(rec.records) == [payload(1)]


def test_mid_file_corruption_names_file_and_offset(tmp_path: Path, logs: list[RedoLog]) -> None:
    open_log = opener(logs, tmp_path)
    log, _ = open_log()
    lsns = [log.append(payload(i)) for i in range(6)]
    log.close()
    seg = tmp_path / segment_name(0)
    data = bytearray(seg.read_bytes())
    data[lsns[2] + HEADER_SIZE + 2] ^= 0x10  # a payload byte of record 3 of 6
    seg.write_bytes(bytes(data))
    with pytest.raises(LogCorruptError) as exc:
        open_log()
    msg = str(exc.value)
    assert str(seg) in msg
    assert f"byte {lsns[2]}" in msg
    assert f"truncate -s {lsns[2]} {seg}" in msg
    assert "backup" in msg
    # Nothing was repaired behind the operator's back, and the dir is free again.
    assert seg.read_bytes() == bytes(data)
    # Following the message's advice makes the log usable again.
    os.truncate(seg, lsns[2])
    log, rec = open_log()
    assert list(rec.records) == [payload(i) for i in range(3)]


def test_damage_in_older_segment_is_corruption(tmp_path: Path, logs: list[RedoLog]) -> None:
    open_log = opener(logs, tmp_path, segment_bytes=300)
    log, _ = open_log()
    for i in range(30):
        log.append(payload(i))
    log.close()
    segs = segments(tmp_path)
    assert len(segs) >= 3
    older = tmp_path / segs[1]
    data = older.read_bytes()
    older.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # last record of a non-newest segment
    with pytest.raises(LogCorruptError) as exc:
        open_log()
    assert str(older) in str(exc.value)
    assert "not the newest" in str(exc.value)
    assert segs[2] in str(exc.value)  # tells which later files to move aside


def test_missing_segment_is_a_gap(tmp_path: Path, logs: list[RedoLog]) -> None:
    open_log = opener(logs, tmp_path, segment_bytes=300)
    log, _ = open_log()
    for i in range(30):
        log.append(payload(i))
    log.close()
    segs = segments(tmp_path)
    (tmp_path / segs[1]).unlink()
    with pytest.raises(LogCorruptError, match="records are missing"):
        open_log()


def test_checkpoint_and_replay_after_lsn(tmp_path: Path, logs: list[RedoLog]) -> None:
    open_log = opener(logs, tmp_path)
    log, _ = open_log()
    lsns = [log.append(payload(i)) for i in range(20)]
    log.checkpoint(b'{"upto":11}', lsns[11])
    assert log.durable_lsn == lsns[-1]  # a checkpoint syncs the log first
    for i in range(20, 25):
        log.append(payload(i))
    log.close()
    log, rec = open_log()
    assert rec.checkpoint == b'{"upto":11}'
    assert rec.checkpoint_lsn == lsns[11]
    assert list(rec.records) == [payload(i) for i in range(12, 25)]


def test_checkpoint_at_end_replays_nothing(tmp_path: Path, logs: list[RedoLog]) -> None:
    open_log = opener(logs, tmp_path, segment_bytes=200)
    log, _ = open_log()
    for i in range(10):
        log.append(payload(i))
    log.checkpoint(b"all", log.lsn)
    log.close()
    log, rec = open_log()
    assert rec.checkpoint == b"all" and list(rec.records) == []
    log.append(payload(10))
    log.close()
    log, rec = open_log()
    assert list(rec.records) == [payload(10)]


def test_checkpoint_lsn_must_be_in_log(tmp_path: Path, logs: list[RedoLog]) -> None:
    log, _ = opener(logs, tmp_path)()
    end = log.append(b"x")
    with pytest.raises(ValueError, match="outside"):
        log.checkpoint(b"s", end + 1)
    log.checkpoint(b"s", end)
    with pytest.raises(ValueError, match="outside"):
        log.checkpoint(b"s", 0)  # older than the newest checkpoint


def test_covered_segments_deleted_others_kept(tmp_path: Path, logs: list[RedoLog]) -> None:
    open_log = opener(logs, tmp_path, segment_bytes=300)
    log, _ = open_log()
    lsns = [log.append(payload(i)) for i in range(40)]
    before = segments(tmp_path)
    starts = [int(s[5:25]) for s in before]
    first = lsns[20]
    log.checkpoint(b"one", first)
    # A segment goes only if it ends at or before the checkpoint (its successor
    # starts there); the one holding records after the checkpoint stays.
    kept = [s for s, nxt in zip(starts, starts[1:] + [None], strict=True) if nxt is None or nxt > first]
    assert segments(tmp_path) == [segment_name(s) for s in kept]
    assert len(kept) < len(before)

    more = [log.append(payload(i)) for i in range(40, 60)]
    log.checkpoint(b"two", more[-5])
    # The older checkpoint stays as the fallback, so the segments it needs stay.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        checkpoint_name(first), checkpoint_name(more[-5])]
    assert segments(tmp_path)[0] == segment_name(kept[0])

    log.checkpoint(b"three", more[-1])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        checkpoint_name(more[-5]), checkpoint_name(more[-1])]
    assert segment_name(kept[0]) not in segments(tmp_path)
    remaining = [int(s[5:25]) for s in segments(tmp_path)]
    assert remaining[0] <= more[-5]  # the fallback can still replay
    log.close()
    log, rec = open_log()
    assert rec.checkpoint == b"three" and list(rec.records) == []


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_bad_newest_checkpoint_falls_back(tmp_path: Path, logs: list[RedoLog]) -> None:
    open_log = opener(logs, tmp_path, segment_bytes=300)
    log, _ = open_log()
    lsns = [log.append(payload(i)) for i in range(30)]
    log.checkpoint(b"first", lsns[9])
    lsns += [log.append(payload(i)) for i in range(30, 60)]
    log.checkpoint(b"second", lsns[49])
    log.close()
    newest = tmp_path / checkpoint_name(lsns[49])
    _damage(newest)
    log, rec = open_log()
    assert rec.checkpoint == b"first" and rec.checkpoint_lsn == lsns[9]
    assert list(rec.records) == [payload(i) for i in range(10, 60)]
    assert any(str(newest) in n and "damaged" in n for n in rec.notes)
    assert not newest.exists() and Path(str(newest) + ".bad").exists()


def test_bad_sole_checkpoint_rebuilds_from_start(tmp_path: Path, logs: list[RedoLog]) -> None:
    """With the log still starting at LSN 0, the empty state is the fallback."""
    open_log = opener(logs, tmp_path)  # one big segment: nothing gets deleted
    log, _ = open_log()
    lsns = [log.append(payload(i)) for i in range(10)]
    log.checkpoint(b"only", lsns[4])
    log.close()
    _damage(tmp_path / checkpoint_name(lsns[4]))
    log, rec = open_log()
    assert rec.checkpoint is None and rec.checkpoint_lsn == 0
    assert list(rec.records) == [payload(i) for i in range(10)]
    assert any("empty state" in n for n in rec.notes)


def test_bad_sole_checkpoint_without_log_start_raises(tmp_path: Path,
                                                      logs: list[RedoLog]) -> None:
    open_log = opener(logs, tmp_path, segment_bytes=300)
    log, _ = open_log()
    lsns = [log.append(payload(i)) for i in range(30)]
    log.checkpoint(b"only", lsns[25])
    log.close()
    assert segment_name(0) not in segments(tmp_path)
    ck = tmp_path / checkpoint_name(lsns[25])
    _damage(ck)
    with pytest.raises(LogCorruptError) as exc:
        open_log()
    assert str(ck) in str(exc.value) and "backup" in str(exc.value)
    assert ck.exists()  # left as found for the operator


def test_interrupted_checkpoint_tmp_removed(tmp_path: Path, logs: list[RedoLog]) -> None:
    open_log = opener(logs, tmp_path)
    log, _ = open_log()
    end = log.append(b"a")
    log.close()
    tmp = tmp_path / (checkpoint_name(end) + ".tmp")
    tmp.write_bytes(b"half a checkpoint")
    log, rec = open_log()
    assert not tmp.exists()
    assert rec.checkpoint is None and list(rec.records) == [b"a"]
    assert any("interrupted" in n for n in rec.notes)


def test_second_log_on_same_dir_refused(tmp_path: Path, logs: list[RedoLog]) -> None:
    open_log = opener(logs, tmp_path)
    log, _ = open_log()
    log.append(b"mine")
    other = RedoLog(str(tmp_path))
    with pytest.raises(ConfigError, match=f"another center is already using {tmp_path}"):
        other.open()
    # Another process is refused too (flock is per open file, across processes).
    code = ("import sys; from fdship.center.redolog import RedoLog\n"
            "try:\n    RedoLog(sys.argv[1]).open()\nexcept Exception as e:\n"
            "    print(type(e).__name__, e); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 3, proc.stderr
    assert "ConfigError another center is already using" in proc.stdout
    assert f"pid {os.getpid()}" in proc.stdout
    log.close()
    log, rec = open_log()  # released on close
    assert list(rec.records) == [b"mine"]


def test_unusable_data_dir_is_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot use data dir"):
        RedoLog(str(blocker / "center")).open()


def test_append_after_close_refused(tmp_path: Path, logs: list[RedoLog]) -> None:
    log, _ = opener(logs, tmp_path)()
    log.close()
    with pytest.raises(RuntimeError):
        log.append(b"x")


# -- kill -9 ---------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, random, sys, time
    from fdship.center.redolog import RedoLog

    data_dir, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    log = RedoLog(data_dir, segment_bytes=32 * 1024)
    rec = log.open()
    n = json.loads(rec.checkpoint)["n"] if rec.checkpoint is not None else 0
    for p in rec.records:
        m = json.loads(p)["n"]
        assert m == n + 1, (m, n)
        n = m
    print("ready", n, flush=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for _ in range(rng.randint(1, 30)):
            n += 1
            pad = "x" * rng.choice([0, 10, 200, 5000, 40000])
            log.append(json.dumps({"n": n, "pad": pad}).encode())
        log.sync()
        print(n, flush=True)   # acknowledged: must survive kill -9
        if rng.random() < 0.1:
            log.checkpoint(json.dumps({"n": n}).encode(), log.lsn)
""")


def _recovered(path: Path) -> tuple[int, list[str]]:
    """The highest record number in the log, checking the sequence has no hole."""
    log = RedoLog(str(path), segment_bytes=32 * 1024)
    try:
        rec = log.open()
        n = json.loads(rec.checkpoint)["n"] if rec.checkpoint is not None else 0
        for p in rec.records:
            m = json.loads(p)["n"]
            assert m == n + 1, f"record {m} follows {n}: a hole or a reorder"
            n = m
        return n, rec.notes
    finally:
        log.close()


def test_kill_minus_nine_never_loses_a_synced_record(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    acked = 0
    trials = 0
    repaired = 0
    deadline = time.monotonic() + 120
    env = {**os.environ, "PYTHONPATH": REPO}
    while trials < 24 and time.monotonic() < deadline:
        trials += 1
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(trials)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            # Some kills land during start-up and recovery, most while appending.
            time.sleep(rng.uniform(0.0, 0.25) if trials % 4 == 0 else rng.uniform(0.3, 0.9))
            child.send_signal(signal.SIGKILL)
            out, err = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL, err.decode()
        lines = out.decode().split()
        numbers = [int(x) for x in lines if x.isdigit()]
        if numbers:
            assert numbers == sorted(numbers)
            acked = max(acked, numbers[-1])
        got, notes = _recovered(tmp_path)
        assert got >= acked, f"trial {trials}: record {acked} was synced but only {got} survived"
        repaired += any("torn tail" in n for n in notes)
    print(f'trials={trials} acked={acked} repaired={repaired}')
    assert trials >= 20
    assert acked > 0
    # Every trial's recovery passed the hole check above; a later start sees it too.
    assert _recovered(tmp_path)[0] >= acked


def test_log_restarts_after_segments_moved_aside(tmp_path: Path, logs: list[RedoLog]) -> None:
    """An operator who moved every segment aside gets a fresh log after the checkpoint."""
    open_log = opener(logs, tmp_path)
    log, _ = open_log()
    end = log.append(b"a")
    log.checkpoint(b"state", end)
    log.close()
    for seg in segments(tmp_path):
        (tmp_path / seg).unlink()
    log, rec = open_log()
    assert rec.checkpoint == b"state" and rec.end_lsn == end
    assert any("starting a new log" in n for n in rec.notes)
    assert log.append(b"b") == end + HEADER_SIZE + 1
    log.close()
    log, rec = open_log()
    assert list(rec.records) == [b"b"]


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs, to run out of space for real (needs root)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_append_leaves_log_consistent(tiny_fs: Path, logs: list[RedoLog]) -> None:
    from fdship.errors import LocalIOError

    open_log = opener(logs, tiny_fs)
    log, _ = open_log()
    good = []
    with pytest.raises(LocalIOError, match="free space"):
        for i in range(1000):
            log.append(b"%06d" % i + b"x" * 3000)
            good.append(i)
    assert 5 < len(good) < 1000
    # The partly written frame was cut off: the file ends at the last good record.
    assert os.path.getsize(tiny_fs / segment_name(0)) == log.lsn
    log.sync()
    log.close()
    log, rec = open_log()
    assert rec.truncated == 0
    assert [p[:6] for p in rec.records] == [b"%06d" % i for i in good]


def test_unreadable_segment_is_config_error(tmp_path: Path) -> None:
    (tmp_path / segment_name(0)).mkdir()  # a directory where a segment file should be
    log = RedoLog(str(tmp_path))
    with pytest.raises(ConfigError, match="cannot read or repair the REDO log") as exc:
        log.open()
    assert segment_name(0) in str(exc.value)
    assert not log.is_open
    log2 = RedoLog(str(tmp_path))  # the lock was released on the way out
    (tmp_path / segment_name(0)).rmdir()
    log2.open()
    log2.close()
