"""Daemons fail, disks fill, bytes rot: each failure costs only what it must.

Real processes on 127.0.0.1 (see ``conftest.py``), real kill -9, real tmpfs
mounts for full and read-only disks, and a daemon started with fault injection
that corrupts a share of the chunks it serves.  Each test checks the job's
outcome machine by machine: what failed says why in words a person can act
on, everything else completes byte-identical, and no temp file is left.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
from datetime import UTC, datetime
from typing import Any

import pytest

MiB = 1024 * 1024
CHUNK = 256 * 1024


def wait_state(c: Any, jid: str, names: list[str], state: str, timeout: float = 60) -> Any:
    """Wait until every machine in ``names`` has reached ``state``; return the job."""
    def ok() -> Any:
        res = c.job_now(jid)
        return res if all(res["machines"][n]["state"] == state for n in names) else None
    return c.wait_until(f"{names} {state}", ok, timeout=timeout)


def no_leftovers(c: Any, idx: list[int], timeout: float = 10) -> None:
    """No ``.fdship-``/``.part`` file under any of these roots (staging of an ended
    job is dropped within a couple of heartbeats)."""
    c.wait_until("temp files cleaned up", lambda: not any(c.leftovers(i) for i in idx)
                 or None, timeout=timeout, every=0.2)


def detect_dead(c: Any, name: str, t_kill: float, timeout: float = 30) -> float:
    """Seconds from ``t_kill`` until /center/hosts shows ``name`` dead."""
    c.wait_until(f"{name} marked dead", lambda: not c.hosts()[name]["alive"],
                 timeout=timeout, every=0.02)
    return time.monotonic() - t_kill


# ---------------------------------------------------------------------- daemons die


def serving_target(c: Any, jid: str, lo: int, hi: int) -> tuple[int, int]:
    """Wait for a target (d1-d3) holding between ``lo`` and ``hi`` chunks that is
    uploading to another target right now; return (its index, chunks it holds).
    Which one that is depends on how the swarm formed, so the test asks."""
    def find() -> tuple[int, int] | None:
        ms = c.job_now(jid)["machines"]
        hosts = c.hosts()
        for i in (1, 2, 3):
            n = f"d{i}"
            if lo <= ms[n]["chunks_done"] <= hi and hosts[n]["assigned"]["uploads"] > 0:
                return i, ms[n]["chunks_done"]
        return None
    return c.wait_until("a target part-way and serving", find, timeout=60, every=0.01)


@pytest.mark.slow
def test_dead_peer_detected_fetches_reassigned_target_resumes(cluster_factory, tmp_path):
    """kill -9 a target that is also serving others: it is detected dead, the
    others finish without it, and restarted within the grace period it fetches
    only the chunks it lacks and ends with a correct copy."""
    c = cluster_factory(
        4, center_args=["--chunk-size", "256K", "--heartbeat-timeout", "2",
                        "--grace-period", "60"],
        daemon_args={i: ["--heartbeat-interval", "0.5", "--upload-rate", "1M"]
                     for i in range(4)})
    path = str(tmp_path / "f.bin")
    want = c.write_random(path, 12 * MiB)
    total = 12 * MiB // CHUNK
    jid = c.submit_async([path], ["d1", "d2", "d3"])
    # Kill a target while it holds part of the file and is uploading to a peer.
    v, acked = serving_target(c, jid, 6, total - 16)
    name, others = f"d{v}", [i for i in (1, 2, 3) if i != v]
    c.kill_daemon(v)
    t_kill = time.monotonic()
    detect = detect_dead(c, name, t_kill)
    # The others finish without it: whatever they fetched from it is reassigned.
    res = wait_state(c, jid, [f"d{i}" for i in others], "done", timeout=90)
    assert res["state"] == "running" and res["machines"][name]["state"] != "failed"
    for i in others:
        assert c.sha256(c.dest_path(i, path)) == want

    # Restart it with every peer paused, so the center's view of what it holds
    # (its inventory, re-verified on disk) can be read before it fetches more.
    for i in [0, *others]:
        c.pause(i)
    try:
        c.start_daemon(v)
        c.wait_alive(30, names=[name])
        held = c.machine(jid, name)["chunks_done"]
    finally:
        for i in [0, *others]:
            c.resume(i)
    assert acked <= held < total, (acked, held)
    res = c.wait_job(jid, 90)
    assert res["state"] == "done", res
    fetched_after = int(c.daemon_metrics(v)["fdship_chunks_fetched_total"])
    print(f"\n{name} dead after {detect:.2f} s (heartbeat timeout 2 s, interval 0.5 s); "
          f"held {held}/{total} chunks at restart ({acked} acked before the kill), "
          f"fetched {fetched_after} after it")
    assert detect < 2 + 4  # timeout + a tick + a heartbeat interval, on a noisy machine
    assert fetched_after == total - held  # only what it lacked
    assert c.sha256(c.dest_path(v, path)) == want
    no_leftovers(c, [1, 2, 3])


@pytest.mark.slow
def test_hung_peer_fetches_move_to_another_peer(cluster_factory, tmp_path):
    """A peer that hangs mid-upload (SIGSTOP: connections stay open, nothing
    moves) is declared dead and its fetches go to other peers at once, long
    before any fetch timeout would have ended them."""
    c = cluster_factory(
        4, center_args=["--chunk-size", "256K", "--heartbeat-timeout", "2",
                        "--grace-period", "300", "--fetch-timeout", "300"],
        daemon_args={i: ["--heartbeat-interval", "0.5", "--upload-rate", "1M",
                         "--fetch-timeout", "300"] for i in range(4)})
    path = str(tmp_path / "f.bin")
    want = c.write_random(path, 12 * MiB)
    total = 12 * MiB // CHUNK
    jid = c.submit_async([path], ["d1", "d2", "d3"])
    v, _ = serving_target(c, jid, 6, total - 16)
    name, others = f"d{v}", [i for i in (1, 2, 3) if i != v]
    c.pause(v)
    t0 = time.monotonic()
    try:
        detect = detect_dead(c, name, t0)
        wait_state(c, jid, [f"d{i}" for i in others], "done", timeout=120)
        took = time.monotonic() - t0
    finally:
        c.resume(v)
    print(f"\nhung {name} dead after {detect:.2f} s; the others done {took:.1f} s after it "
          "hung")
    assert took < 100  # the fetch timeout is 300 s: nobody waited for it
    for i in others:
        assert c.sha256(c.dest_path(i, path)) == want
    res = c.wait_job(jid, 90)
    assert res["state"] == "done"
    assert c.sha256(c.dest_path(v, path)) == want


def test_dead_target_fails_after_grace_others_finish(cluster_factory, tmp_path):
    """A target killed and never restarted fails once the grace period is over,
    saying since when it was unreachable; the job's other targets finish."""
    c = cluster_factory(
        4, center_args=["--chunk-size", "256K", "--heartbeat-timeout", "2",
                        "--grace-period", "3"],
        daemon_args={i: ["--heartbeat-interval", "0.5", "--upload-rate", "3M"]
                     for i in range(4)})
    path = str(tmp_path / "f.bin")
    want = c.write_random(path, 6 * MiB)
    jid = c.submit_async([path], ["d1", "d2", "d3"])
    c.wait_until("d1 part-way", lambda: c.machine(jid, "d1")["chunks_done"] >= 3,
                 timeout=60, every=0.01)
    c.kill_daemon(1)
    t_kill = time.monotonic()
    killed_at = datetime.now(UTC)
    detect = detect_dead(c, "d1", t_kill)
    res = c.wait_job(jid, 90)
    failed_after = time.monotonic() - t_kill
    assert res["state"] == "failed"
    for n in ("d2", "d3"):
        m = res["machines"][n]
        assert m["state"] == "done", (n, m["error"], m)
    # Once a pull to the dead d1 was refused, it got no more until the heartbeat
    # timeout declared it dead (it used to be sent one per decision: ~50 a second).
    undelivered = c.center.log().count("host=d1 pull not delivered")
    assert undelivered <= 12, undelivered
    d1 = res["machines"]["d1"]
    assert d1["state"] == "failed"
    m = re.fullmatch(r"unreachable since (\d\d):(\d\d):(\d\d) UTC \(no heartbeat for (\d+) s\)",
                     d1["error"])
    assert m, d1["error"]
    # The last heartbeat it answered came shortly before the kill.
    since = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
    kill_s = killed_at.hour * 3600 + killed_at.minute * 60 + killed_at.second
    assert 0 <= (kill_s - since) % 86400 <= 3, (d1["error"], killed_at)
    assert failed_after >= 2 + 3 - 0.5  # not before heartbeat timeout + grace
    for i in (2, 3):
        assert c.sha256(c.dest_path(i, path)) == want
    no_leftovers(c, [2, 3])
    print(f"\nd1 dead after {detect:.2f} s; its part failed {failed_after:.1f} s after the "
          f"kill: {d1['error']}")


def test_source_dies_before_any_copy_job_fails_naming_it(cluster_factory, tmp_path):
    """The source is killed before any target holds a chunk: the job fails, and
    the reason names the source."""
    c = cluster_factory(
        # Chunks four times the upload limiter's burst (256 KiB) at 4 KiB/s: no
        # chunk can arrive before the kill, even one requested the moment the
        # source committed its snapshot.
        3, center_args=["--chunk-size", "1M", "--heartbeat-timeout", "2",
                        "--grace-period", "2"],
        daemon_args={0: ["--heartbeat-interval", "0.5", "--upload-rate", "4K"],
                     1: ["--heartbeat-interval", "0.5"], 2: ["--heartbeat-interval", "0.5"]})
    path = str(tmp_path / "f.bin")
    c.write_random(path, 2 * MiB)
    jid = c.submit_async([path], ["d1", "d2"])
    c.kill_daemon(0)
    res = c.wait_job(jid, 60)
    assert res["state"] == "failed"
    for n in ("d1", "d2"):
        m = res["machines"][n]
        assert m["state"] == "failed" and m["chunks_done"] == 0
        assert re.fullmatch(r"source d0 unreachable since \d\d:\d\d:\d\d UTC and \d+ chunk\(s\) "
                            r"exist on no other live machine", m["error"]), m["error"]
    no_leftovers(c, [1, 2])


def test_source_dies_after_every_chunk_has_a_copy_swarm_finishes(cluster_factory, tmp_path):
    """The source is killed once one target holds every chunk: the others finish
    from the swarm."""
    c = cluster_factory(
        # Relays on, as by default: the daemons report their caps, so the center
        # never runs d1's chunks through the capped targets (a chain runs at its
        # slowest link), and d1 is complete while they still fetch.
        4, center_args=["--chunk-size", "256K", "--heartbeat-timeout", "2",
                        "--grace-period", "2"],
        daemon_args={0: ["--heartbeat-interval", "0.5"], 1: ["--heartbeat-interval", "0.5"],
                     # Slow targets: still fetching when d1 is complete.
                     2: ["--heartbeat-interval", "0.5", "--download-rate", "1M"],
                     3: ["--heartbeat-interval", "0.5", "--download-rate", "1M"]})
    path = str(tmp_path / "f.bin")
    want = c.write_random(path, 6 * MiB)
    hosts = c.hosts()
    assert [hosts[n]["link"]["down_cap"] for n in ("d1", "d2", "d3")] == [0, MiB, MiB]
    assert hosts["d2"]["link"]["slow"] and not hosts["d1"]["link"]["slow"]
    jid = c.submit_async([path], ["d1", "d2", "d3"])
    wait_state(c, jid, ["d1"], "done", timeout=60)
    res = c.job_now(jid)
    assert res["machines"]["d2"]["state"] != "done" or res["machines"]["d3"]["state"] != "done"
    c.kill_daemon(0)
    res = c.wait_job(jid, 90)
    assert res["state"] == "done", res
    for i in (1, 2, 3):
        assert c.sha256(c.dest_path(i, path)) == want
    no_leftovers(c, [1, 2, 3])


# ---------------------------------------------------------------------- target-side errors


def test_target_side_errors_fail_only_that_machine(cluster_factory, unwritable_dir, tmp_path):
    """One job, five targets, four of them unable to take the file for a different
    reason: each fails alone with an actionable reason, the healthy one is done,
    and no temp file is left anywhere."""
    hb = ["--heartbeat-interval", "0.5"]
    c = cluster_factory(
        6, center_args=["--chunk-size", "256K"],
        daemon_args={i: hb for i in range(6)}, mounts={4: "8m"}, start=False)
    # --allow-dest names a directory as this machine sees it (under its --root).
    c.daemon_args[2] = hb + ["--allow-dest", os.path.join(c.root(2), "srv/in")]
    # d2: the destination's parent is a link leading outside its allowed directory.
    os.makedirs(os.path.join(c.root(2), "srv/in"))
    os.makedirs(os.path.join(c.root(2), "elsewhere"))
    os.symlink(os.path.join(c.root(2), "elsewhere"), os.path.join(c.root(2), "srv/in/link"))
    # d3: the destination directory refuses new files.
    os.makedirs(os.path.join(c.root(3), "srv/in/link"))
    how = unwritable_dir(os.path.join(c.root(3), "srv/in/link"))
    # d5: a directory sits where the file should go.
    os.makedirs(os.path.join(c.root(5), "srv/in/link/model.bin"))
    c.start()
    path = str(tmp_path / "model.bin")
    want = c.write_random(path, 32 * MiB)
    dest = "/srv/in/link/model.bin"

    # Outside d2's allowed directories altogether: refused before anything starts.
    with pytest.raises(urllib.error.HTTPError) as exc:
        c.request("POST", c.daemons[0].url + "/daemon/api",
                  {"files": [path], "machines": ["d1", "d2"], "dest": "/tmp/x"})
    body = exc.value.read().decode()
    assert exc.value.code == 422, body
    assert "outside the allowed destinations of d2" in body and "--dest" in body, body

    res = c.submit([path], ["d1", "d2", "d3", "d4", "d5"], dest="/srv/in/link")
    ms = res["machines"]
    assert res["state"] == "failed"
    assert ms["d1"]["state"] == "done" and ms["d1"]["error"] is None
    assert c.sha256(c.dest_path(1, dest)) == want
    errors = {n: ms[n]["error"] for n in ("d2", "d3", "d4", "d5")}
    assert all(ms[n]["state"] == "failed" for n in errors), ms
    assert re.search(r"destination .*model\.bin is not allowed on d2: it resolves to "
                     r".*/elsewhere/model\.bin, outside allow_dest", errors["d2"]), errors
    if how == "immutable":
        assert re.search(r"permission denied writing .*: the daemon cannot write to .*srv/in/link;"
                         r" fix its permissions or choose another --dest", errors["d3"]), errors
    else:
        assert "read-only file system; choose another --dest" in errors["d3"], errors
    assert re.fullmatch(r"disk full: \d+(\.\d)? MiB free under /, 32 MiB needed", errors["d4"]), \
        errors
    assert re.search(r"destination .*model\.bin is a directory; remove it or choose another "
                     r"--dest", errors["d5"]), errors
    assert not os.path.exists(os.path.join(c.root(2), "elsewhere/model.bin"))
    no_leftovers(c, [1, 2, 3, 4, 5])
    assert os.path.isdir(c.dest_path(5, dest))  # left as it was

    # Disk full found by the target itself, after admission: d4's last report
    # still showed room when the job was accepted; the disk filled since.
    small = str(tmp_path / "small.bin")
    want_small = c.write_random(small, 6 * MiB)
    c.pause(4)  # its reports stop; the center keeps the last one (8 MiB free)
    try:
        filler = os.path.join(c.root(4), "filler")
        subprocess.run(["fallocate", "-l", "4M", filler], check=True)
        jid = c.submit_async([small], ["d1", "d4"], dest="/data")
    finally:
        c.resume(4)
    res = c.wait_job(jid, 60)
    assert res["machines"]["d1"]["state"] == "done"
    assert c.sha256(c.dest_path(1, "/data/small.bin")) == want_small
    m4 = res["machines"]["d4"]
    assert m4["state"] == "failed"
    assert re.fullmatch(r"disk full: \d+(\.\d)? MiB free, 6\.0 MiB needed for \S+/data/small\.bin; "
                        r"free space or choose another --dest", m4["error"]), m4["error"]
    no_leftovers(c, [1, 4])


# ---------------------------------------------------------------------- corrupt chunks


def test_corrupt_chunks_caught_retried_and_bad_peer_avoided(cluster_factory, tmp_path):
    """A daemon corrupting 30% of what it serves is, at first, the only peer that
    holds the chunks: every bad chunk is caught by its hash and fetched again,
    the corrupting peer is soon avoided (the source, peer of last resort, sends
    the rest), and every copy is identical."""
    hb = ["--heartbeat-interval", "0.5"]
    c = cluster_factory(
        4, center_args=["--chunk-size", "256K", "--heartbeat-timeout", "2"],
        daemon_args={0: hb, 1: hb + ["--fault-inject", "corrupt=0.3",
                                     "--allow-fault-injection"], 2: hb, 3: hb})
    path = str(tmp_path / "f.bin")
    want = c.write_random(path, 32 * MiB)
    total = 32 * MiB // CHUNK
    # d2 and d3 are away while d1 takes every chunk from the source (which sends
    # each chunk once), so that d1 is then the only peer holding them; d2 comes
    # back first and has nobody else to fetch from, d3 once d2 is done.
    c.pause(2)
    c.pause(3)
    try:
        c.wait_until("d2, d3 dead", lambda: not any(
            h["alive"] for n, h in c.hosts().items() if n in ("d2", "d3")), timeout=30)
        jid = c.submit_async([path], ["d1", "d2", "d3"])
        wait_state(c, jid, ["d1"], "done", timeout=60)
        served_src = int(c.daemon_metrics(0)["fdship_bytes_served_total"]) // CHUNK
        c.resume(2)
        wait_state(c, jid, ["d2"], "done", timeout=60)
    finally:
        c.resume(2)
        c.resume(3)
    res = c.wait_job(jid, 120)
    assert res["state"] == "done", res
    for i in (1, 2, 3):
        assert c.sha256(c.dest_path(i, path)) == want
    caught = {i: int(c.daemon_metrics(i)["fdship_hash_mismatches_total"]) for i in (2, 3)}
    served_bad = int(c.daemon_metrics(1)["fdship_bytes_served_total"]) // CHUNK
    served_src = int(c.daemon_metrics(0)["fdship_bytes_served_total"]) // CHUNK - served_src
    fetched = sum(int(c.daemon_metrics(i)["fdship_chunks_fetched_total"]) for i in (1, 2, 3))
    print(f"\ncorrupt chunks caught: {sum(caught.values())} {caught}; chunks served by the "
          f"corrupting peer: ~{served_bad} of {2 * total} the others needed; source resent "
          f"{served_src}; chunks fetched in all: {fetched} for {3 * total} needed")
    # d2 met bad chunks (d1 was its only peer) and dropped d1 after 2 of them;
    # fetches already under way (up to 4) may still have failed.
    assert 2 <= caught[2] <= 2 + 4, caught
    assert caught[3] <= 2 + 4, caught
    # Every bad chunk was fetched again, once; nothing good was fetched twice.
    assert fetched == 3 * total
    # After that the source sent d2 what only d1 held: it resent most chunks.
    assert served_src >= total - served_bad, (served_src, served_bad)
    assert served_bad <= total // 2, served_bad
    no_leftovers(c, [1, 2, 3])


def test_daemon_refuses_fault_injection_without_the_safety_flag(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fdship", "daemon", "--listen", "127.0.0.1:0",
                        "--data-dir", str(tmp_path / "d"), "--fault-inject", "corrupt=0.3"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fdship daemon: fault_inject is set but allow_fault_injection "
                               "is not"), lines[0]
    assert not os.path.exists(tmp_path / "d")  # it stopped before touching anything


# ---------------------------------------------------------------------- callbacks


def test_callback_retried_until_delivered_and_unreachable_recorded(
        cluster_factory, callback_server, tmp_path):
    """A callback failing twice gets the result on the third try (recorded as
    delivered, attempts=3); an unreachable one ends as failed with the error."""
    c = cluster_factory(2, center_args=["--callback-attempts", "3"],
                        daemon_args={0: ["--heartbeat-interval", "0.5"],
                                     1: ["--heartbeat-interval", "0.5"]})
    path = str(tmp_path / "f.bin")
    c.write_random(path, 100_000)
    cb = callback_server(2)
    jid = c.submit_async([path], ["d1"], callback=cb.url)
    c.wait_until("callback delivered", lambda: c.job_now(jid)["callback"]["state"] != "pending",
                 timeout=30)
    res = c.job_now(jid)
    assert res["callback"]["state"] == "delivered", res["callback"]
    assert res["callback"]["attempts"] == 3 and res["callback"]["error"] is None
    assert [s for _, s, _ in cb.calls] == [503, 503, 200]
    body = cb.calls[-1][2]
    assert body["job"] == jid and body["state"] == "done"
    assert body["machines"]["d1"]["state"] == "done"
    # Retried with backoff, not hammered.
    assert cb.calls[1][0] - cb.calls[0][0] >= 0.2 and cb.calls[2][0] - cb.calls[1][0] >= 0.4

    # Nobody listens on this port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    jid2 = c.submit_async([path], ["d1"], callback=dead_url, dest="/other")
    c.wait_until("callback given up", lambda: c.job_now(jid2)["callback"]["state"] != "pending",
                 timeout=30)
    cbs = c.job_now(jid2)["callback"]
    assert cbs["state"] == "failed" and cbs["attempts"] == 3, cbs
    assert cbs["error"] and "127.0.0.1" in cbs["error"], cbs
    # And it survives a restart of the center as it is (durable, not retried).
    c.kill_center()
    c.restart_center()
    assert c.job_now(jid2)["callback"] == cbs
