"""The center crashes and nothing is lost: kill -9, replay, damaged REDO logs.

Real processes on 127.0.0.1 (see ``conftest.py``): a center and daemons, each
with its own data dir and ``--root``.  The center is killed with SIGKILL at
random moments while jobs run and restarted at once; every job must still
complete, every copy must be byte-identical, and no chunk may be fetched
twice (a chunk a target acked before a kill is recorded in the REDO log; one
whose ack was lost is found again in the target's inventory when it
re-registers).  Then the REDO log itself is damaged the ways a crash can and
cannot damage it.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

MiB = 1024 * 1024
CHUNK = 256 * 1024
TARGETS = ["d1", "d2", "d3"]


def nchunks(size: int) -> int:
    return max(1, -(-size // CHUNK))


def fetched(c: Any, idx: list[int]) -> int:
    """Chunks fetched and verified by daemons ``idx`` since they started."""
    return int(sum(c.daemon_metrics(i)["fdship_chunks_fetched_total"] for i in idx))


def hash_mismatches(c: Any, idx: list[int]) -> int:
    return int(sum(c.daemon_metrics(i)["fdship_hash_mismatches_total"] for i in idx))


KILLS = 20


def stuck_report(c: Any, jid: str) -> str:
    """What a job that never ends looks like from the center and every daemon."""
    out = [json.dumps(c.job_now(jid), indent=1)]
    for h in c.request("GET", c.center.url + "/center/hosts")["hosts"]:
        out.append(f"host {h['name']}: alive={h['alive']} assigned={h['assigned']} "
                   f"load={h['load']}")
    for i in range(c.n):
        try:
            out.append(f"d{i} status: {c.status(i)}")
        except OSError as e:  # a dead daemon (URLError is an OSError)
            out.append(f"d{i} status: {e!r}")
    return "\n".join(out)


@pytest.mark.slow  # about 1-1.5 min: 20 kills; runs in CI too
def test_center_kill9_at_random_moments_loses_nothing(cluster_factory, tmp_path):
    """>= 20 SIGKILLs of the center while jobs run: all done, identical, no refetch."""
    rng = random.Random(int(os.environ.get("FDSHIP_KILL_SEED", "20261122")))
    c = cluster_factory(
        4,
        center_args=["--chunk-size", "256K", "--heartbeat-timeout", "3", "--grace-period", "600",
                     # Small checkpoints: kills land before, during and after them.
                     "--checkpoint-records", "150", "--checkpoint-interval", "1"],
        daemon_args={i: ["--heartbeat-interval", "0.5", "--upload-rate", "1M"]
                     for i in range(4)})
    src = tmp_path / "src"
    src.mkdir()
    want: dict[str, str] = {}  # source path -> sha256
    jobs: dict[str, list[str]] = {}  # job id -> its files

    def new_file(name: str, size: int) -> str:
        path = str(src / name)
        want[path] = c.write_random(path, size, seed=rng.random())
        return path

    # A synchronous POST /daemon/api in a thread: it must get its result across
    # every restart of the center (the daemon rides through its absence).
    sync_file = new_file("sync.bin", 12 * MiB + 12345)
    sync_out: dict[str, Any] = {}

    def sync_call() -> None:
        try:
            sync_out["res"] = c.submit([sync_file], TARGETS, timeout=280)
        except Exception as e:  # noqa: BLE001 -- any failure is reported by the assertion below
            sync_out["err"] = repr(e)

    th = threading.Thread(target=sync_call, daemon=True)
    th.start()
    c.wait_until("sync job submitted", lambda: c.request(
        "GET", c.center.url + "/center/jobs")["jobs"], timeout=30)

    kills = 0
    kills_with_running = 0
    restart_seconds: list[float] = []
    t_start = time.monotonic()
    for k in range(KILLS):
        f1 = new_file(f"job{k}-a.bin", rng.randrange(CHUNK, 2 * MiB))
        files = [f1]
        if k % 3 == 0:
            files.append(new_file(f"job{k}-b.bin", rng.randrange(1, 3 * CHUNK)))
        jobs[c.submit_async(files, TARGETS)] = files
        time.sleep(rng.uniform(0.1, 3.0))
        running = c.request("GET", c.center.url + "/center/jobs?state=running")["jobs"]
        c.kill_center()
        kills += 1
        kills_with_running += bool(running)
        restart_seconds.append(c.restart_center())

    th.join(timeout=280)
    assert not th.is_alive(), "the synchronous /daemon/api call never returned"
    assert "err" not in sync_out, sync_out.get("err")
    sync_res = sync_out["res"]
    assert sync_res["state"] == "done", json.dumps(sync_res, indent=1)
    jobs[sync_res["job"]] = [sync_file]

    for jid in jobs:
        try:
            res = c.wait_job(jid, timeout=float(os.environ.get('FDSHIP_JOB_WAIT', '240')))
        except TimeoutError:
            raise AssertionError(stuck_report(c, jid)) from None
        assert res["state"] == "done", json.dumps(res, indent=1)
        for n, m in res["machines"].items():
            assert m["state"] == "done" and m["error"] is None, (jid, n, m)
    elapsed = time.monotonic() - t_start

    for files in jobs.values():
        for path in files:
            for i in (1, 2, 3):
                got = c.dest_path(i, path)
                assert os.path.exists(got), f"d{i}: {got} missing"
                assert c.sha256(got) == want[path], f"d{i}: {got} differs from {path}"
    for i in (1, 2, 3):  # nothing half-written is left beside the copies
        assert not c.leftovers(i), c.leftovers(i)

    needed = sum(nchunks(os.path.getsize(p)) for files in jobs.values() for p in files) * 3
    got = fetched(c, [1, 2, 3])
    refetched = got - needed
    mism = hash_mismatches(c, [1, 2, 3])
    print(f"\nkills survived: {kills} ({kills_with_running} with jobs running), jobs: "
          f"{len(jobs)}, chunks needed: {needed}, fetched: {got}, refetched: {refetched}, "
          f"hash mismatches: {mism}, center restart to listening: "
          f"median {sorted(restart_seconds)[len(restart_seconds) // 2]:.2f} s, "
          f"max {max(restart_seconds):.2f} s, run {elapsed:.0f} s")
    assert kills >= 20 and kills_with_running >= 15
    assert mism == 0
    assert refetched == 0, f"{refetched} chunks were fetched again after center kills"


# Fields of a job result that are soft state (rebuilt from traffic after a
# restart, so they legitimately differ); everything else is durable.
SOFT_JOB = ("rate",)
SOFT_MACHINE = ("rate", "eta", "attempts", "last_error")


def durable_view(res: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in res.items() if k not in SOFT_JOB}
    out["machines"] = {n: {k: v for k, v in m.items() if k not in SOFT_MACHINE}
                       for n, m in res["machines"].items()}
    return out


def all_jobs(c: Any, url: str | None = None) -> dict[str, Any]:
    base = url or c.center.url
    ids = [j["job"] for j in c.request("GET", base + "/center/jobs?limit=1000")["jobs"]]
    return {j: durable_view(c.request("GET", f"{base}/center/jobs/{j}")) for j in ids}


def test_replay_on_a_real_center_equals_live_state(cluster_factory, callback_server, tmp_path):
    """Stop the center (kill -9, then SIGTERM), start another on its data dir: every
    job reads back identically -- done, failed, callback delivered, and mid-flight."""
    c = cluster_factory(
        4, center_args=["--chunk-size", "256K", "--grace-period", "600",
                        "--checkpoint-records", "40"],
        daemon_args={i: ["--heartbeat-interval", "0.5", "--upload-rate", "2M"]
                     for i in range(4)})
    src = tmp_path / "src"
    src.mkdir()
    a = str(src / "a.bin")
    c.write_random(a, 1 * MiB + 17)
    done = c.submit([a], TARGETS)
    assert done["state"] == "done"
    # One machine fails: its destination is a directory.
    b = str(src / "b.bin")
    c.write_random(b, 300_000)
    os.makedirs(c.dest_path(2, b))
    failed = c.submit([b], TARGETS)
    assert failed["state"] == "failed" and failed["machines"]["d2"]["state"] == "failed"
    cb = callback_server(0)
    jcb = c.submit_async([a], ["d1"], callback=cb.url)
    assert c.wait_job(jcb, 60)["state"] == "done"
    c.wait_until("callback recorded", lambda: c.job_now(jcb)["callback"]["state"] == "delivered")
    # A job frozen mid-flight: every target holds some chunks, none is done.
    big = str(src / "big.bin")
    c.write_random(big, 12 * MiB)
    jrun = c.submit_async([big], TARGETS)
    c.wait_until("every target part-way", lambda: all(
        2 <= m["chunks_done"] < m["chunks_total"] - 8
        for m in c.job_now(jrun)["machines"].values()), timeout=60, every=0.02)
    for i in range(4):
        c.kill_daemon(i)  # nothing changes the state from here on
    time.sleep(0.5)  # acks already on their way land first
    live = all_jobs(c)
    assert set(live) == {done["job"], failed["job"], jcb, jrun}
    assert live[jrun]["state"] == "running"
    assert live[jcb]["callback"]["state"] == "delivered"

    c.kill_center()
    c.restart_center()
    assert "records replayed" in c.center.log()
    after_kill = all_jobs(c)
    assert after_kill == live

    c.center.kill(signal.SIGTERM)  # a clean stop writes a final checkpoint
    assert c.center.popen is not None and c.center.popen.returncode == 0
    assert glob.glob(os.path.join(c.tmp, "center-data", "checkpoint-*.ckpt"))
    c.restart_center()
    after_stop = all_jobs(c)
    assert after_stop == live


def _newest_segment(data_dir: str) -> str:
    return max(glob.glob(os.path.join(data_dir, "redo-*.log")))


def test_damaged_redo_log_torn_tail_flipped_byte_garbage_checkpoint(cluster_factory, tmp_path):
    """A torn tail is cut and reported; a flipped byte mid-log stops the center with
    one line naming file and offset; a hand-edited checkpoint is set aside."""
    c = cluster_factory(3, center_args=["--chunk-size", "256K", "--checkpoint-interval", "1h",
                                        "--checkpoint-records", "1000000"],
                        daemon_args={i: ["--heartbeat-interval", "0.5"] for i in range(3)})
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for k in range(3):
        files.append(str(src / f"f{k}.bin"))
        c.write_random(files[-1], 700_000 * (k + 1))
        assert c.submit([files[-1]], ["d1", "d2"])["state"] == "done"
    live = all_jobs(c)
    assert len(live) == 3
    c.kill_center()
    data = os.path.join(c.tmp, "center-data")
    assert not glob.glob(os.path.join(data, "checkpoint-*"))  # all of it is in the log

    # (a) A torn tail: the newest segment loses its last few bytes.
    torn = str(tmp_path / "torn")
    shutil.copytree(data, torn)
    seg = _newest_segment(torn)
    size = os.path.getsize(seg)
    os.truncate(seg, size - 5)
    p = c.extra_center(torn)
    c.wait_center(proc=p)
    log = p.log()
    assert re.search(r"cut a torn tail of \d+ bytes off \S*redo-\d+\.log", log), log
    assert os.path.getsize(seg) < size - 5  # the partial record itself is gone
    assert set(all_jobs(c, p.url)) == set(live)
    p.kill(signal.SIGTERM)

    # (b) A byte flipped in the middle of a segment: records follow it, so no crash
    # did this; the center refuses to start and says where.
    flipped = str(tmp_path / "flipped")
    shutil.copytree(data, flipped)
    seg = _newest_segment(flipped)
    size = os.path.getsize(seg)
    with open(seg, "r+b") as f:
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x20]))
    r = subprocess.run([sys.executable, "-m", "fdship", "center", "--listen", "127.0.0.1:0",
                        "--data-dir", flipped], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    m = re.match(r"fdship center: REDO log (\S+) is damaged at byte (\d+) ", last)
    assert m, r.stderr
    assert m.group(1) == seg and 0 <= int(m.group(2)) <= size // 2
    assert "truncate -s" in last  # it says what to do
    assert os.path.getsize(seg) == size  # and changed nothing

    # (c) A hand-edited checkpoint: detected, moved aside, state rebuilt from the log.
    edited = str(tmp_path / "edited")
    shutil.copytree(data, edited)
    p = c.extra_center(edited)
    c.wait_center(proc=p)
    p.kill(signal.SIGTERM)  # a clean stop writes a checkpoint
    assert p.popen is not None and p.popen.returncode == 0, p.log()
    (ckpt,) = glob.glob(os.path.join(edited, "checkpoint-*.ckpt"))
    with open(ckpt, "rb") as f:
        raw = f.read()
    assert b'"done"' in raw
    with open(ckpt, "wb") as f:
        f.write(raw.replace(b'"done"', b'"dune"', 1))
    p = c.extra_center(edited)
    c.wait_center(proc=p)
    log = p.log()
    assert "is damaged (checkpoint checksum mismatch); moved it aside" in log, log
    assert os.path.exists(ckpt + ".bad") and not os.path.exists(ckpt)
    assert all_jobs(c, p.url) == live
