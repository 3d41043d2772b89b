"""Scenario tests of ``FetchDraining``: a fetch about to finish gives its slots back early.

The notice is soft (never logged): it frees the upload slot of the peer and
the download slot of the target one round trip before the ack, so both get
their next transfer while the last bytes arrive.  The chunk itself stays in
flight until its ack: nobody else is sent to fetch it, and a failure after
the notice still retries it.
"""

from __future__ import annotations

import pytest

from fdship.core.actions import AssignFetch
from fdship.core.events import ChunkStored, FetchDraining, FetchFailed
from fdship.protocol import FAIL_CONNECT
from fdship.testing import SimCluster, fake_file
from tests.core.test_scheduler import CS, T0, cluster, fetches, run, submit

MiB = 1024 * 1024
B = 10 * MiB


def one_target(chunks: int = 4):
    """Source h0, one target h1, ``chunks`` chunks: h1 gets one fetch from h0."""
    s = cluster(2, max_downloads=4)
    _, acts = submit(s, [fake_file("/a", chunks * CS, CS)], ["h1"])
    first = fetches(acts)
    assert len(first) == 1 and first[0][3] == "h0"
    return s, first[0]


def counts(s, name):
    h = s.hosts[name]
    return h.uploads, h.downloads


def test_notice_frees_both_slots_and_assigns_the_next_chunk_at_once():
    s, (tgt, f, c, peer) = one_target()
    assert counts(s, "h0") == (1, 0) and counts(s, "h1") == (0, 1)
    acts = run(s, FetchDraining(job="j1", host=tgt, file=f, chunk=c, peer=peer), T0 + 0.4)
    nxt = fetches(acts)
    # The next chunk is assigned before the first is acked...
    assert len(nxt) == 1 and nxt[0][0] == "h1" and nxt[0][2] != c
    # ...and the draining one is still in flight: counted once, not offered again.
    m = s.jobs["j1"].machines["h1"]
    g = s.jobs["j1"].base[f] + c
    assert g in m.inflight and s.jobs["j1"].inflight_count[g] == 1
    assert counts(s, "h0") == (1, 0) and counts(s, "h1") == (0, 1)  # the new fetch only
    # The ack of the drained fetch releases nothing more: no slot count goes wrong.
    run(s, ChunkStored(job="j1", host="h1", file=f, chunk=c, peer="h0", nbytes=CS), T0 + 0.45)
    assert g in m.have and g not in m.inflight
    assert counts(s, "h0") == (1, 0) and counts(s, "h1") == (0, 1)


def test_a_notice_is_handled_once_and_stale_ones_change_nothing():
    s, (tgt, f, c, peer) = one_target()
    run(s, FetchDraining(job="j1", host=tgt, file=f, chunk=c, peer=peer), T0 + 0.4)
    before = (counts(s, "h0"), counts(s, "h1"), dict(s.jobs["j1"].machines["h1"].inflight))
    stale = [
        FetchDraining(job="j1", host=tgt, file=f, chunk=c, peer=peer),  # a repeat
        FetchDraining(job="j1", host=tgt, file=f, chunk=c, peer="h9"),  # wrong peer
        FetchDraining(job="j1", host=tgt, file=f, chunk=3, peer=peer),  # not in flight
        FetchDraining(job="j1", host=tgt, file=5, chunk=0, peer=peer),  # no such file
        FetchDraining(job="j1", host=tgt, file=f, chunk=99, peer=peer),  # no such chunk
        FetchDraining(job="nope", host=tgt, file=f, chunk=c, peer=peer),  # no such job
        FetchDraining(job="j1", host="h7", file=f, chunk=c, peer=peer),  # not a target
    ]
    for ev in stale:
        assert run(s, ev, T0 + 0.41) == []
    assert before == (counts(s, "h0"), counts(s, "h1"),
                      dict(s.jobs["j1"].machines["h1"].inflight))


def test_a_fetch_that_fails_after_its_notice_is_retried():
    s, (tgt, f, c, peer) = one_target(chunks=2)
    run(s, FetchDraining(job="j1", host=tgt, file=f, chunk=c, peer=peer), T0 + 0.4)
    g = s.jobs["j1"].base[f] + c
    m = s.jobs["j1"].machines["h1"]
    run(s, FetchFailed(job="j1", host="h1", file=f, chunk=c, peer="h0", fail=FAIL_CONNECT,
                       error="reset"), T0 + 0.42)
    assert g not in m.inflight and g not in m.have
    assert m.attempts[g] == 1 and m.retry_at[g] > T0 + 0.42
    assert s.jobs["j1"].inflight_count[g] == 0
    # Only the fetch assigned at the notice is left holding slots.
    assert counts(s, "h0") == (1, 0) and counts(s, "h1") == (0, 1)


def test_notices_are_soft_and_never_reach_the_log():
    assert not FetchDraining.durable
    sim = SimCluster(6, bandwidth=B, seed=3, latency=0.005, drain_lead=0.05)
    job = sim.submit([fake_file("/a", 8 * CS, CS)], [f"h{i:05d}" for i in range(1, 6)],
                     chunk_size=CS)
    sim.run(max_time=600)
    assert sim.ended == {job: "done"}
    assert not any(rec["type"] == "DRAIN" for rec, _ in sim.durable_log)


def ship(lead: float, seed: int):
    sim = SimCluster(21, bandwidth=B, seed=seed, latency=0.005, jitter=0.5, drain_lead=lead)
    size = 32 * MiB
    job = sim.submit([fake_file("/a", size, MiB)], [f"h{i:05d}" for i in range(1, 21)],
                     chunk_size=MiB)
    sim.run(max_time=3600)
    assert sim.ended == {job: "done"}
    assert not sim.violations, sim.violations[:3]
    return sim, max(sim.finish_times(job).values())


def test_notices_hide_the_round_trip_between_chunks():
    """Without notices a target waits at least one round trip (ack, pull, GET)
    between chunks; with them the next chunk's bytes flow before the last ones
    of the previous chunk arrive, and the job ends sooner on every seed."""
    for seed in (1, 2, 3):
        off, t_off = ship(0.0, seed)
        on, t_on = ship(0.05, seed)
        gap_off = off.summary()["mean_slot_gap"]
        gap_on = on.summary()["mean_slot_gap"]
        print(f"seed {seed}: gap {gap_off * 1000:.1f} -> {gap_on * 1000:.1f} ms, "
              f"job {t_off:.2f} -> {t_on:.2f} s")
        assert gap_off >= 2 * off.latency * 0.5  # a pull and a GET, at least
        assert gap_on < 0.25 * gap_off
        assert t_on < t_off


def test_a_drained_upload_still_counts_against_the_peers_hard_cap():
    """The peer serves a drained transfer until its ack: with max_uploads 1 the
    notice must not put a second transfer on it; with room under the cap it does."""
    for cap in (1, 4):
        s = cluster(3, max_uploads=cap, max_downloads=4)
        _, acts = submit(s, [fake_file("/a", 6 * CS, CS)], ["h1", "h2"])
        tgt, f, c, _ = next(x for x in fetches(acts) if x[3] == "h0")
        acts = run(s, FetchDraining(job="j1", host=tgt, file=f, chunk=c, peer="h0"), T0 + 0.4)
        from_src = [x for x in fetches(acts) if x[3] == "h0"]
        assert (len(from_src) == 0) if cap == 1 else (len(from_src) >= 1), (cap, from_src)
        assert s.hosts["h0"].draining_uploads == 1
        assert s.hosts["h0"].uploads + s.hosts["h0"].draining_uploads <= cap
        # The ack ends the drained transfer and frees its hold on the cap.
        run(s, ChunkStored(job="j1", host=tgt, file=f, chunk=c, peer="h0", nbytes=CS), T0 + 0.45)
        assert s.hosts["h0"].draining_uploads == 0


def test_hosts_view_shows_the_link_speeds_the_scheduler_learned():
    """GET /center/hosts carries the learned uplink/downlink and the slow flag,
    so an operator can see why a host gets fewer first copies."""
    from fdship.core import views
    sim = SimCluster(6, bandwidth=B, seed=3, latency=0.005, drain_lead=0.05, slow_fraction=0.2)
    job = sim.submit([fake_file("/a", 8 * CS, CS)], [f"h{i:05d}" for i in range(1, 6)],
                     chunk_size=CS)
    sim.run(max_time=600)
    assert sim.ended == {job: "done"}
    rows = {n: views.host_view(sim.sched, n, sim.clock.now) for n in sim.hosts}
    assert all(set(r["link"]) == {"up", "down", "up_cap", "down_cap", "measured", "slow"}
               for r in rows.values())
    assert any(r["link"]["up"] > 0 for r in rows.values())  # learned from finished fetches
    slow = [n for n, r in rows.items() if r["link"]["slow"]]
    assert set(slow) <= sim.slow, (slow, sim.slow)  # never a fast host taken for slow


# --- link speeds: what a finished fetch teaches ----------------------------------


def test_a_link_speed_comes_from_the_targets_own_timing():
    """The center sees assignment to ack (two round trips and the ack batching
    on top of the transfer); the target times the bytes on the wire.  Its
    figure is used, unless it claims more than the center's own interval."""
    s, (tgt, f, c, peer) = one_target()
    run(s, ChunkStored(job="j1", host=tgt, file=f, chunk=c, peer=peer, nbytes=CS, seconds=0.5),
        T0 + 2.0)
    assert s.hosts["h1"].down_rate == pytest.approx(CS / 0.5)
    assert s.hosts["h0"].up_rate == pytest.approx(CS / 0.5)
    s, (tgt, f, c, peer) = one_target()
    run(s, ChunkStored(job="j1", host=tgt, file=f, chunk=c, peer=peer, nbytes=CS, seconds=9.0),
        T0 + 2.0)
    assert s.hosts["h1"].down_rate == pytest.approx(CS / 2.0)


def test_transfers_that_overlap_only_the_tail_do_not_inflate_a_link_speed():
    """A fetch that ran alone, acked while two others (started at its drain
    notice and by a second job) run from the same peer, measured the peer's
    whole uplink: its speed is that fetch's rate, not twice it.  Scaling by the
    count at the ack once read 80 Mbit/s links as up to 125, so every other
    host looked slow and peers took four uploads at once."""
    s = cluster(3, max_downloads=4)
    _, acts = submit(s, [fake_file("/a", 4 * CS, CS)], ["h1"])
    (tgt, f, c, peer), = fetches(acts)
    run(s, FetchDraining(job="j1", host=tgt, file=f, chunk=c, peer=peer), T0 + 0.4)
    _, acts = submit(s, [fake_file("/b", 4 * CS, CS)], ["h2"], job="j2", now=T0 + 0.42)
    assert [a[3] for a in fetches(acts)] == ["h0"]
    assert s.hosts["h0"].uploads == 2  # the drained fetch is no longer counted
    run(s, ChunkStored(job="j1", host=tgt, file=f, chunk=c, peer=peer, nbytes=CS, seconds=0.4),
        T0 + 0.45)
    assert s.hosts["h0"].up_rate == pytest.approx(CS / 0.4)
    assert s.ref_rate == pytest.approx(CS / 0.4)


def test_a_fetch_that_shared_its_link_throughout_teaches_nothing_about_it():
    """Two fetches hedged from the source to two targets of unknown speed share
    its uplink from start to end: neither measures it (each got about half)."""
    s = cluster(3, max_downloads=4)
    _, acts = submit(s, [fake_file("/a", 4 * CS, CS)], ["h1", "h2"])
    got = fetches(acts)
    assert sorted(a[0] for a in got) == ["h1", "h2"] and {a[3] for a in got} == {"h0"}
    tgt, f, c, peer = got[0]
    run(s, ChunkStored(job="j1", host=tgt, file=f, chunk=c, peer=peer, nbytes=CS, seconds=0.8),
        T0 + 0.85)
    assert s.hosts["h0"].up_rate == 0.0  # unknown, not half its real speed
    assert s.hosts[tgt].down_rate == pytest.approx(CS / 0.8)  # its own downlink ran alone
