"""Scenario tests of the scheduler core, driven directly and through the simulator."""

from __future__ import annotations

import pytest

from fdship.core.actions import AssignFetch, Commit, JobEnded, Pack
from fdship.core.events import (ChunkStored, CommandUndelivered, FetchFailed, FilePacked, HostReported,
                                JobSubmitted, MachineFailed, Recovered, Tick, from_record)
from fdship.core.scheduler import Scheduler, Tunables
from fdship.core import views
from fdship.errors import TooLarge, Unprocessable
from fdship.protocol import (FAIL_CONNECT, FAIL_HASH, FAIL_LOCAL, Heartbeat, Holding, JobRequest,
                             Load)
from fdship.testing import SimCluster, fake_file

MiB = 1024 * 1024
CS = 4 * MiB
T0 = 1_790_000_000.0


def beat(name, labels=(), boot="b1", free=None, allow_dest=(), inventory=None, hooks=(),
         cpu=0.0, max_uploads=4, max_downloads=4, streams=False, upload_rate=0,
         download_rate=0):
    return HostReported(beat=Heartbeat(
        name=name, address=f"10.0.0.{int(name[1:]) + 1}:7071" if name[1:].isdigit() else
        f"{name}:7071", boot_id=boot, labels=tuple(labels), load=Load(cpu=cpu),
        free=free or {}, allow_dest=tuple(allow_dest), hooks=tuple(hooks),
        max_uploads=max_uploads, max_downloads=max_downloads, inventory=inventory,
        streams=streams, upload_rate=upload_rate, download_rate=download_rate))


def run(s: Scheduler, ev, now=T0):
    """Handle an event the way the runner does: committed decisions are fed back."""
    out = []
    stack = [ev]
    while stack:
        e = stack.pop(0)
        for a in s.handle(e, now):
            if isinstance(a, Commit):
                stack.append(a.event)
            else:
                out.append(a)
    return out


def cluster(n, **kw) -> Scheduler:
    s = Scheduler(Tunables(**kw), seed=5)
    caps = {k: kw[k] for k in ("max_uploads", "max_downloads") if k in kw}
    for i in range(n):
        run(s, beat(f"h{i}", **caps))
    return s


def submit(s, files, machines, source="h0", job="j1", now=T0, **kw):
    ev = s.admit(JobRequest(source=source, files=tuple(files), machines=tuple(machines),
                            chunk_size=CS, **kw), job, now)
    return ev, run(s, ev, now)


def fetches(actions):
    return [(a.target, f.file, f.chunk, f.peer_name) for a in actions
            if isinstance(a, AssignFetch) for f in a.fetches]


# --- admission -------------------------------------------------------------------


def test_machines_resolve_by_name_address_and_label():
    s = Scheduler(seed=1)
    run(s, beat("h0"))
    run(s, beat("h1", labels=["bidder"]))
    run(s, beat("h2", labels=["bidder", "east"]))
    assert s.resolve("h1") == ["h1"]
    assert s.resolve("10.0.0.3") == ["h2"]
    assert s.resolve("@bidder") == ["h1", "h2"]
    assert s.resolve("@east") == ["h2"]
    ev = s.admit(JobRequest(source="h0", files=(fake_file("/a", 10, CS),),
                            machines=("h1", "@bidder", "10.0.0.2"), chunk_size=CS), "j", T0)
    assert ev.targets == ("h1", "h2")  # deduplicated, in order


def test_unknown_machine_is_422_with_names():
    s = cluster(2)
    with pytest.raises(Unprocessable) as e:
        submit(s, [fake_file("/a", 10, CS)], ["h1", "nosuch", "@nolabel"])
    assert e.value.status == 422
    assert "'nosuch'" in str(e.value) and "'@nolabel'" in str(e.value)
    assert "h0, h1" in str(e.value)


def test_destination_outside_allow_dest_is_422():
    s = Scheduler(seed=1)
    run(s, beat("h0"))
    run(s, beat("h1", allow_dest=["/data"]))
    with pytest.raises(Unprocessable, match="outside the allowed destinations of h1"):
        submit(s, [fake_file("/etc/passwd", 10, CS)], ["h1"])
    ev, _ = submit(s, [fake_file("/x/a", 10, CS, dest="/data/a")], ["h1"])
    assert ev.targets == ("h1",)


def test_unknown_hook_is_422():
    s = Scheduler(seed=1)
    run(s, beat("h0"))
    run(s, beat("h1", hooks=["reload"]))
    with pytest.raises(Unprocessable, match="no notify hook named 'restart'"):
        submit(s, [fake_file("/a", 10, CS)], ["h1"], notify="restart")


def test_not_enough_space_fails_only_that_machine_at_admission():
    s = Scheduler(seed=1)
    run(s, beat("h0"))
    run(s, beat("h1", free={"/": 10 * MiB}))
    run(s, beat("h2", free={"/": 1000 * MiB}))
    ev, actions = submit(s, [fake_file("/a", 200 * MiB, CS)], ["h1", "h2"])
    assert ev.failed == (("h1", "disk full: 10 MiB free under /, 200 MiB needed"),)
    job = s.jobs["j1"]
    assert job.machines["h1"].ended == "failed"
    assert job.machines["h2"].ended == ""
    assert all(t == "h2" for t, *_ in fetches(actions))


def test_job_size_limits():
    s = cluster(3, max_files=2, max_machines=1)
    with pytest.raises(TooLarge):
        submit(s, [fake_file(f"/f{i}", 1, CS) for i in range(3)], ["h1"])
    with pytest.raises(TooLarge):
        submit(s, [fake_file("/f", 1, CS)], ["h1", "h2"])


# --- scheduling ------------------------------------------------------------------


def test_first_copies_come_from_source_once_per_chunk_and_caps_hold():
    s = cluster(4)
    _, actions = submit(s, [fake_file("/a", 16 * CS, CS)], ["h1", "h2", "h3"])
    fs = fetches(actions)
    assert all(peer == "h0" for *_, peer in fs)
    chunks = [(f, c) for _, f, c, _ in fs]
    assert len(chunks) == len(set(chunks)), "the source was asked for the same chunk twice"
    # The source paces its first copies by its link budget, never above its upload cap.
    assert 1 <= len(fs) <= 4
    assert s.hosts["h0"].uploads == len(fs) <= s.hosts["h0"].max_uploads


def test_rarest_first_and_peer_to_peer_after_first_copy():
    s = cluster(3, max_uploads=1, max_downloads=1)
    _, actions = submit(s, [fake_file("/a", 2 * CS, CS)], ["h1", "h2"])
    (t, f, c, peer), = fetches(actions)
    assert peer == "h0"
    # The chunk arrives; the other target should now fetch it from the first target
    # (peer to peer), while the source sends the other chunk.
    actions = run(s, ChunkStored(job="j1", host=t, file=f, chunk=c, peer="h0"), T0 + 1)
    fs = fetches(actions)
    other = "h2" if t == "h1" else "h1"
    assert (other, 0, c, t) in fs or any(p == t for *_, p in fs)
    assert all(not (p == "h0" and ch == c) for _, _, ch, p in fs), "source re-sent a chunk"


def test_empty_file_packs_immediately_and_job_completes():
    s = cluster(2)
    _, actions = submit(s, [fake_file("/empty", 0, CS)], ["h1"])
    packs = [a for a in actions if isinstance(a, Pack)]
    assert [(p.target, p.file.file, p.last) for p in packs] == [("h1", 0, True)]
    out = run(s, FilePacked(job="j1", host="h1", file=0), T0 + 1)
    assert JobEnded(job="j1", state="done") in out
    assert s.jobs["j1"].machines["h1"].ended == "done"


def test_source_as_target_packs_from_its_store_without_fetching():
    s = cluster(2)
    _, actions = submit(s, [fake_file("/a", 3 * CS, CS)], ["h0", "h1"])
    assert not [f for f in fetches(actions) if f[0] == "h0"]
    assert any(isinstance(a, Pack) and a.target == "h0" for a in actions)


def test_failed_fetch_is_retried_from_another_peer_with_backoff():
    s = cluster(4, max_downloads=1)
    _, actions = submit(s, [fake_file("/a", CS, CS)], ["h1", "h2", "h3"])
    first = fetches(actions)
    # h1 gets the chunk from the source; h2 then fetches it from h1 and fails.
    src_target = first[0][0]
    actions = run(s, ChunkStored(job="j1", host=src_target, file=0, chunk=0, peer="h0"), T0 + 1)
    peer_fetch = [x for x in fetches(actions) if x[3] == src_target]
    assert peer_fetch
    victim = peer_fetch[0][0]
    out = run(s, FetchFailed(job="j1", host=victim, file=0, chunk=0, peer=src_target,
                             fail=FAIL_CONNECT, error="reset"), T0 + 2)
    assert not [x for x in fetches(out) if x[0] == victim], "retried before the backoff"
    m = s.jobs["j1"].machines[victim]
    assert m.retry_at[0] > T0 + 2 and m.attempts[0] == 1
    for name in list(s.hosts):
        run(s, beat(name, max_downloads=1), T0 + 29)
    out = run(s, Tick(), T0 + 30)
    retry = [x for x in fetches(out) if x[0] == victim]
    assert retry and retry[0][3] != src_target, "retried from the peer that just failed"


def test_too_many_failures_fail_the_machine_with_the_last_error():
    s = cluster(2, max_attempts=3, backoff_base=0.0)
    submit(s, [fake_file("/a", CS, CS)], ["h1"])
    now = T0
    for i in range(3):
        now += 100
        for name in list(s.hosts):
            run(s, beat(name), now)
        run(s, Tick(), now)
        run(s, FetchFailed(job="j1", host="h1", file=0, chunk=0, peer="h0", fail=FAIL_HASH,
                           error=f"xxh3 mismatch #{i}"), now)
    m = s.jobs["j1"].machines["h1"]
    assert m.ended == "failed"
    assert "failed 3 times" in m.error and "xxh3 mismatch #2" in m.error
    assert s.jobs["j1"].state == "failed"


def test_local_error_fails_machine_at_once_and_others_continue():
    s = cluster(3)
    submit(s, [fake_file("/a", CS, CS)], ["h1", "h2"])
    run(s, FetchFailed(job="j1", host="h1", file=0, chunk=0, peer="h0", fail=FAIL_LOCAL,
                       error="permission denied writing /a"))
    job = s.jobs["j1"]
    assert job.machines["h1"].ended == "failed"
    assert job.machines["h1"].error == "permission denied writing /a"
    assert job.machines["h2"].ended == "" and job.state == "running"


def test_dead_target_fails_after_grace_with_time_and_others_finish():
    s = cluster(3, heartbeat_timeout=5, grace_period=20)
    submit(s, [fake_file("/a", CS, CS)], ["h1", "h2"])
    run(s, beat("h0"), T0 + 4)
    run(s, beat("h2"), T0 + 4)
    run(s, Tick(), T0 + 6)
    assert not s.hosts["h1"].alive
    assert s.jobs["j1"].machines["h1"].ended == ""  # within grace
    for t in (10, 15, 20, 24):
        run(s, beat("h0"), T0 + t)
        run(s, beat("h2"), T0 + t)
    run(s, Tick(), T0 + 26)
    m = s.jobs["j1"].machines["h1"]
    assert m.ended == "failed" and m.error.startswith("unreachable since ")


def test_a_target_whose_pull_was_not_delivered_gets_no_work_until_its_next_heartbeat():
    """A crashed daemon is not sent a pull per decision until the heartbeat
    timeout: the first undelivered pull parks it, its next beat resumes it."""
    s = cluster(3, max_uploads=4, max_downloads=1)
    _, a = submit(s, [fake_file("/a", 8 * CS, CS)], ["h1", "h2"])
    mine = [(f, c) for t, f, c, _ in fetches(a) if t == "h1"]
    assert mine
    assert run(s, CommandUndelivered(job="j1", host="h1", fetches=tuple(mine),
                                     error="pull not delivered: connection refused"),
               T0 + 0.1) == []
    assert s.jobs["j1"].machines["h1"].inflight == {}
    assert views.host_view(s, "h1", T0 + 0.1)["reachable"] is False
    # Work keeps moving for h2; none of it is offered to h1, not even by the tick.
    later = []
    for i, (t, f, c, p) in enumerate(x for x in fetches(a) if x[0] == "h2"):
        later += fetches(run(s, ChunkStored(job="j1", host=t, file=f, chunk=c, peer=p),
                             T0 + 0.2 + i / 10))
    later += fetches(run(s, Tick(), T0 + 0.5))
    assert later and all(t != "h1" for t, *_ in later)
    # Its next heartbeat (it is alive after all) gives it work at once.
    again = fetches(run(s, beat("h1", max_downloads=1), T0 + 1))
    assert any(t == "h1" for t, *_ in again)
    assert views.host_view(s, "h1", T0 + 1)["reachable"] is True


def test_fetch_from_dead_peer_is_reassigned():
    s = cluster(4, heartbeat_timeout=5, max_downloads=1)
    _, a = submit(s, [fake_file("/a", CS, CS)], ["h1", "h2", "h3"])
    t1 = fetches(a)[0][0]
    a = run(s, ChunkStored(job="j1", host=t1, file=0, chunk=0, peer="h0"), T0 + 1)
    victims = [x[0] for x in fetches(a) if x[3] == t1]
    assert victims
    for name in s.hosts:
        if name != t1:
            run(s, beat(name), T0 + 5)
    out = run(s, Tick(), T0 + 7)  # t1 is now dead: its uploads are reassigned
    assert not s.hosts[t1].alive
    re = [x for x in fetches(out) if x[0] in victims]
    assert re and all(p != t1 for *_, p in re)


def test_source_dying_before_any_copy_fails_job_clearly():
    s = cluster(2, heartbeat_timeout=2, grace_period=3)
    submit(s, [fake_file("/a", 2 * CS, CS)], ["h1"])
    run(s, beat("h1"), T0 + 2)
    run(s, Tick(), T0 + 3)
    for t in (4, 6):
        run(s, beat("h1"), T0 + t)
    run(s, Tick(), T0 + 6.5)
    m = s.jobs["j1"].machines["h1"]
    assert m.ended == "failed"
    assert "source h0 unreachable since" in m.error and "exist on no other live machine" in m.error


def test_restarted_daemon_reconciles_inventory():
    s = cluster(3)
    submit(s, [fake_file("/a", 4 * CS, CS)], ["h1"])
    for c in range(3):
        run(s, ChunkStored(job="j1", host="h1", file=0, chunk=c, peer="h0"))
    # h1 restarts; on disk it only has chunks 0 and 3 (3 arrived but the ack was lost).
    out = run(s, beat("h1", boot="b2", inventory=(Holding(job="j1", file=0, chunks=(0, 3)),)),
              T0 + 1)
    m = s.jobs["j1"].machines["h1"]
    assert sorted(m.have) == [0, 3]
    assert {c for t, f, c, p in fetches(out) if t == "h1"} <= {1, 2}


# --- the simulated cluster ---------------------------------------------------------


@pytest.mark.parametrize("n_targets,size_chunks", [(50, 16), (80, 5)])
def test_simulated_cluster_every_target_completes_and_promises_hold(n_targets, size_chunks):
    sim = SimCluster(n_targets + 1, bandwidth=10e6, seed=11)
    files = [fake_file("/data/big.bin", size_chunks * CS - 123, CS),
             fake_file("/data/small.txt", 1, CS), fake_file("/data/empty", 0, CS)]
    targets = [f"h{i:05d}" for i in range(1, n_targets + 1)]
    job = sim.submit(files, targets)
    sim.run(max_time=3600)
    assert sim.ended == {job: "done"}
    j = sim.sched.jobs[job]
    assert all(m.ended == "done" for m in j.machines.values())
    summ = sim.summary()
    assert summ["violations"] == []  # no chunk from a peer lacking it; caps held
    assert summ["max_source_sends"] <= 2, summ
    assert summ["mean_source_sends"] <= 1.1, summ
    for h in sim.hosts.values():
        assert h.max_up_seen <= 4 and h.max_down_seen <= 4


def test_simulated_cluster_survives_a_failing_link_and_two_jobs():
    sim = SimCluster(21, bandwidth=10e6, seed=2)
    sim.fail_links = {("h00001", "h00002"), ("h00003", "h00004")}
    a = sim.submit([fake_file("/a", 8 * CS, CS)], [f"h{i:05d}" for i in range(1, 21)], job_id="ja")
    b = sim.submit([fake_file("/b", 3 * CS, CS)], [f"h{i:05d}" for i in range(5, 15)], job_id="jb",
                   source="h00007")
    sim.run(max_time=3600)
    assert sim.ended == {a: "done", b: "done"}
    assert sim.summary()["violations"] == []


# --- durability: replay reproduces the live state -------------------------------------


def test_replaying_durable_events_reproduces_live_state():
    sim = SimCluster(31, bandwidth=10e6, seed=4)
    sim.fail_links = {("h00001", "h00002")}
    sim.submit([fake_file("/a", 10 * CS, CS), fake_file("/e", 0, CS)],
               [f"h{i:05d}" for i in range(1, 31)], job_id="j1")
    sim.run(max_time=5.0, until_jobs_end=False)  # stop mid-job
    mid = sim.sched.snapshot()
    assert any(m["ended"] == "" for m in mid["jobs"]["j1"]["machines"].values())

    fresh = Scheduler(Tunables(), seed=999)  # a different seed: decisions differ, state may not
    for rec, t in sim.durable_log:
        fresh.handle(from_record(rec), t)
    assert fresh.snapshot() == mid

    sim.run(max_time=3600)
    live = sim.sched.snapshot()
    fresh2 = Scheduler(Tunables(), seed=1)
    for rec, t in sim.durable_log:
        fresh2.handle(from_record(rec), t)
    assert fresh2.snapshot() == live
    assert live["jobs"]["j1"]["state"] == "done"


def test_checkpoint_restore_then_replay_matches():
    sim = SimCluster(11, bandwidth=10e6, seed=9)
    sim.submit([fake_file("/a", 6 * CS, CS)], [f"h{i:05d}" for i in range(1, 11)], job_id="j1")
    sim.run(max_time=2.0, until_jobs_end=False)
    k = len(sim.durable_log)
    ckpt = sim.sched.snapshot()
    sim.run(max_time=3600)
    restored = Scheduler(Tunables(), seed=3)
    restored.restore(ckpt)
    for rec, t in sim.durable_log[k:]:
        restored.handle(from_record(rec), t)
    assert restored.snapshot() == sim.sched.snapshot()


def test_after_recovery_scheduling_resumes_without_refetching_acked_chunks():
    sim = SimCluster(6, bandwidth=10e6, seed=8)
    sim.submit([fake_file("/a", 12 * CS, CS)], [f"h{i:05d}" for i in range(1, 6)], job_id="j1")
    sim.run(max_time=1.5, until_jobs_end=False)
    s2 = Scheduler(Tunables(), seed=2)
    for rec, t in sim.durable_log:
        s2.handle(from_record(rec), t)
    now = sim.clock.now + 1
    s2.handle(Recovered(), now)
    acked = {n: set(m.have) for n, m in s2.jobs["j1"].machines.items()}
    out = []
    for n in sim.hosts:
        out += run(s2, beat(n), now)
    for a in out:
        if isinstance(a, AssignFetch):
            for f in a.fetches:
                assert f.chunk not in acked[a.target], "an acked chunk was assigned again"


def test_views_follow_contract_shape():
    s = cluster(3, heartbeat_timeout=5)
    submit(s, [fake_file("/a", CS + 1, CS)], ["h1", "h2"])
    run(s, MachineFailed(job="j1", host="h2", reason="disk full: 1 MiB free, 5 MiB needed"))
    res = views.job_result(s.jobs["j1"], T0 + 1)
    assert set(res) >= {"job", "state", "created", "finished", "files", "machines"}
    assert res["files"][0] == {"path": "/a", "dest": "/a", "size": CS + 1,
                               "xxh3": s.jobs["j1"].files[0].xxh3}
    assert res["machines"]["h2"]["state"] == "failed"
    assert res["machines"]["h2"]["error"].startswith("disk full")
    assert res["machines"]["h1"]["chunks_total"] == 2
    assert res["created"].endswith("Z")


def test_still_assigned_keeps_only_fetches_in_flight_from_the_peer_named():
    # What the center sends again when a channel closed with pulls maybe unread.
    import dataclasses

    s = cluster(3, upload_budget=4.0, download_budget=4.0)
    _, actions = submit(s, [fake_file("/a", 16 * CS, CS)], ["h1"])
    fs = [f for a in actions if isinstance(a, AssignFetch) for f in a.fetches]
    assert len(fs) == 4
    assert views.still_assigned(s, "j1", "h1", tuple(fs)) == tuple(fs)
    # Acked: no longer in flight.  Named with another peer: not this assignment.
    run(s, ChunkStored(job="j1", host="h1", file=0, chunk=fs[0].chunk, peer="h0",
                       nbytes=CS, seconds=0.4), T0 + 1)
    other = dataclasses.replace(fs[1], peer_name="h2")
    assert views.still_assigned(s, "j1", "h1", (fs[0], other, fs[2], fs[3])) == (fs[2], fs[3])
    # Unknown jobs, machines and chunks out of range: nothing.
    assert views.still_assigned(s, "nope", "h1", tuple(fs)) == ()
    assert views.still_assigned(s, "j1", "h2", tuple(fs)) == ()
    assert views.still_assigned(s, "j1", "h1", (dataclasses.replace(fs[2], chunk=99),)) == ()
    # A job that ended has nothing in flight.
    run(s, MachineFailed(job="j1", host="h1", reason="disk full"), T0 + 2)
    assert views.still_assigned(s, "j1", "h1", (fs[2],)) == ()


def test_a_chunk_lost_without_notice_is_offered_again_within_seconds():
    """The stall guard: whatever path loses a chunk, the job cannot stall for good."""
    s = cluster(3)
    _, actions = submit(s, [fake_file("/a", 2 * CS, CS)], ["h1", "h2"])
    t, f, c, peer = fetches(actions)[0]
    assert peer == "h0"
    job = s.jobs["j1"]
    g = job.base[f] + c
    # Lose the only copy in flight the way no event reports it (white box).
    s._release(job, job.machines[t], g)
    job.resend.discard(g)
    assert not job.holders[g] and job.inflight_count[g] == 0 and g not in job.unsent
    out = []
    for k in range(1, 4):
        for name in ("h0", "h1", "h2"):
            out += run(s, beat(name), T0 + k)
        out += run(s, Tick(), T0 + k + 0.5)
    again = [x for x in fetches(out) if (x[1], x[2]) == (f, c)]
    assert again and again[0][3] == "h0", "the lost chunk was never offered again"
