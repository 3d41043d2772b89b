"""Scenario tests of cut-through relays: a target still receiving a chunk passes it on.

A daemon whose heartbeat says ``streams`` serves a chunk while it arrives, so
the scheduler may name a target that is fetching chunk g as the peer for
another target's fetch of g.  Chains are at most ``stream_depth`` long; a
relay whose own fetch fails takes its chain down with it, and the fetches
below are retried without blaming the relay.
"""

from __future__ import annotations

from fdship.core.actions import AssignFetch
from fdship.core.events import ChunkStored, FetchFailed, HostReported
from fdship.core.scheduler import Scheduler, Tunables
from fdship.protocol import FAIL_CONNECT, Fetch, Heartbeat, Load
from fdship.testing import SimCluster, fake_file
from tests.core.test_scheduler import CS, T0, fetches, run, submit

MiB = 1024 * 1024


def streaming_cluster(n: int, streams: bool = True, **kw) -> Scheduler:
    s = Scheduler(Tunables(**kw), seed=5)
    for i in range(n):
        run(s, HostReported(beat=Heartbeat(name=f"h{i}", address=f"10.0.0.{i + 1}:7071",
                                           boot_id="b1", load=Load(), streams=streams)))
    return s


def test_a_target_still_receiving_a_chunk_relays_it_at_once():
    s = streaming_cluster(3)
    _, acts = submit(s, [fake_file("/a", CS, CS)], ["h1", "h2"])
    got = {t: (c, peer) for t, _, c, peer in fetches(acts)}
    # One chunk, one first copy from the source, and the other target does not
    # wait for it to arrive: it is fed by the first as the bytes land.
    assert sorted(got) == ["h1", "h2"]
    first = next(t for t, (_, p) in got.items() if p == "h0")
    second = next(t for t in got if t != first)
    assert got[second] == (0, first)
    assert s.jobs["j1"].streaming[0] == {first: 1, second: 2}
    assert s.jobs["j1"].source_sends[0] == 1
    # The relayed fetch says so: the relay's own pull may reach it after this
    # one reaches the second target, whose GET then waits for it.
    arriving = {a.target: f.arriving for a in acts if isinstance(a, AssignFetch)
                for f in a.fetches}
    assert arriving == {first: False, second: True}
    wire = next(f for a in acts if isinstance(a, AssignFetch) and a.target == second
                for f in a.fetches)
    assert Fetch.from_json(wire.to_json()).arriving is True
    plain = next(f for a in acts if isinstance(a, AssignFetch) and a.target == first
                 for f in a.fetches)
    assert "arriving" not in plain.to_json() and not Fetch.from_json(plain.to_json()).arriving


def test_daemons_that_do_not_stream_are_named_only_for_chunks_they_hold():
    s = streaming_cluster(3, streams=False)
    _, acts = submit(s, [fake_file("/a", CS, CS)], ["h1", "h2"])
    assert [(c, p) for _, _, c, p in fetches(acts)] == [(0, "h0")]  # the other one waits
    (tgt,) = [t for t, *_ in fetches(acts)]
    acts = run(s, ChunkStored(job="j1", host=tgt, file=0, chunk=0, peer="h0", nbytes=CS),
               T0 + 0.5)
    assert [(c, p) for _, _, c, p in fetches(acts)] == [(0, tgt)]  # now it holds it
    assert not any(f.arriving for a in acts if isinstance(a, AssignFetch) for f in a.fetches)


def test_stream_depth_zero_turns_relays_off():
    s = streaming_cluster(3, stream_depth=0)
    _, acts = submit(s, [fake_file("/a", CS, CS)], ["h1", "h2"])
    assert [(c, p) for _, _, c, p in fetches(acts)] == [(0, "h0")]


def test_chains_stay_within_stream_depth():
    s = streaming_cluster(6, stream_depth=2)
    _, acts = submit(s, [fake_file("/a", CS, CS)], ["h1", "h2", "h3", "h4", "h5"])
    depth = s.jobs["j1"].streaming[0]
    assert depth and max(depth.values()) <= 2
    assert sorted(depth.values()).count(2) >= 1  # a relay was used...
    # ...and the targets left over wait for a copy rather than join a third hop.
    assert len(fetches(acts)) == len(depth) < 5


def test_a_broken_relay_takes_its_chain_down_without_blaming_it():
    s = streaming_cluster(4)
    _, acts = submit(s, [fake_file("/a", CS, CS)], ["h1", "h2", "h3"])
    job = s.jobs["j1"]
    relay = next(t for t, _, _, p in fetches(acts) if p == "h0")
    below = [t for t, _, _, p in fetches(acts) if p == relay]
    assert below, fetches(acts)
    # The relay's own fetch fails: its chain can no longer be joined.
    run(s, FetchFailed(job="j1", host=relay, file=0, chunk=0, peer="h0", fail=FAIL_CONNECT,
                       error="reset"), T0 + 0.2)
    assert relay not in job.streaming[0] and not set(below) & set(job.streaming[0])
    assert job.machines[relay].avoid == {"h0": 1}  # the relay blames its own peer
    # The fetch below fails in turn; the relay is not held against it.
    m = job.machines[below[0]]
    run(s, FetchFailed(job="j1", host=below[0], file=0, chunk=0, peer=relay,
                       fail=FAIL_CONNECT, error="peer closed the connection"), T0 + 0.25)
    assert relay not in m.avoid and 0 not in m.last_failed_peer
    assert m.attempts[0] == 1  # still counted toward max_attempts: a loop cannot go forever
    assert m.retry_at[0] > T0 + 0.25  # and retried after the usual backoff


def _sim(streams: bool, depth: int = 4, hosts: int = 21, chunks: int = 16, seed: int = 3):
    sim = SimCluster(hosts, 10 * MiB, seed=seed, latency=0.005, jitter=0.5, drain_lead=0.05,
                     streams=streams,
                     tunables=Tunables(heartbeat_timeout=1e9, chunk_size=CS, stream_depth=depth))
    deepest = [0]
    deliver = sim._deliver

    def watch(ev):
        deliver(ev)
        for j in sim.sched.jobs.values():
            for d in j.streaming:
                if d:
                    deepest[0] = max(deepest[0], max(d.values()))
    sim._deliver = watch  # type: ignore[method-assign]
    targets = [n for n in sim.hosts if n != "h00000"]
    job = sim.submit([fake_file("/f", chunks * CS, CS)], targets, chunk_size=CS)
    sim.run(max_time=600)
    return sim, job, deepest[0]


def test_simulated_swarm_with_relays_finishes_sooner_and_keeps_its_promises():
    fast, jf, deepest = _sim(streams=True, depth=3)
    slow, js, _ = _sim(streams=False)
    assert fast.ended == {jf: "done"} and slow.ended == {js: "done"}
    assert fast.summary()["violations"] == [] and slow.summary()["violations"] == []
    assert fast.relayed > 0 and slow.relayed == 0
    assert 2 <= deepest <= 3
    t_fast = max(fast.finish_times(jf).values())
    t_slow = max(slow.finish_times(js).values())
    # Same seed, same cluster: deterministic, so a plain comparison is safe.
    assert t_fast < 0.95 * t_slow, (t_fast, t_slow)
    # Relays do not cost the source more sends: still about one copy.
    assert fast.hosts["h00000"].bytes_up <= 1.15 * 16 * CS


def test_simulated_relays_survive_failing_links():
    sim = SimCluster(21, 10 * MiB, seed=4, latency=0.005, jitter=0.5, drain_lead=0.05,
                     tunables=Tunables(heartbeat_timeout=1e9, chunk_size=MiB))
    sim.fail_links = {("h00001", "h00002"), ("h00003", "h00004"), ("h00000", "h00005")}
    targets = [n for n in sim.hosts if n != "h00000"]
    job = sim.submit([fake_file("/f", 32 * MiB, MiB)], targets, chunk_size=MiB)
    sim.run(max_time=600)
    assert sim.ended == {job: "done"}
    assert sim.summary()["violations"] == []
    assert sim.relayed > 0
    assert not sim.relay_wait  # nothing left waiting on a relay


def test_a_target_on_a_link_known_to_be_slow_relays_nothing():
    s = streaming_cluster(4)
    s.ref_rate = 10 * MiB
    s.hosts["h1"].down_rate = 1 * MiB  # a quarter-speed host, measured
    s.hosts["h2"].down_rate = s.hosts["h3"].down_rate = 10 * MiB
    _, acts = submit(s, [fake_file("/a", CS, CS)], ["h1", "h2", "h3"])
    job = s.jobs["j1"]
    assert "h1" not in job.streaming[0]  # a chain runs at its slowest link
    assert all(p != "h1" for _, _, _, p in fetches(acts))
    # The fast ones relay as usual.
    assert any(p in ("h2", "h3") for _, _, _, p in fetches(acts))


def test_the_source_hedges_only_on_targets_that_cannot_relay():
    # Link speeds unknown: the source takes two first copies at once for
    # targets that cannot pass a chunk on while it arrives (one might be slow)...
    plain = streaming_cluster(3, streams=False)
    _, acts = submit(plain, [fake_file("/a", 2 * CS, CS)], ["h1", "h2"])
    assert sorted(p for *_, p in fetches(acts)) == ["h0", "h0"]
    # ...but one at the full rate for relays: two at half speed would halve
    # the speed of every chain below them.
    relays = streaming_cluster(3)
    _, acts = submit(relays, [fake_file("/a", 2 * CS, CS)], ["h1", "h2"])
    assert sorted(p for *_, p in fetches(acts)).count("h0") == 1


def test_a_fast_target_is_not_tied_to_slow_peers_nobody_has_measured():
    """Fresh center, 10% of hosts at a quarter speed, no link measured yet.

    Once, a fast target whose first peers were slow hosts took every chunk
    from them at a quarter speed (3.8 x S/B): each sample was ambiguous (both
    ends unknown), and a target not measured yet gave a slow transfer its
    whole downlink.  Now an ambiguous slow sample marks the peer's uplink
    (until it shows more), and an unmeasured target counts as fast, so a
    slow peer only adds to its faster transfers.
    """
    for seed in (1, 2):
        sim = SimCluster(51, 10 * MiB, seed=seed, latency=0.005, jitter=0.5, drain_lead=0.05,
                         slow_fraction=0.1,
                         tunables=Tunables(heartbeat_timeout=1e9, chunk_size=CS))
        targets = [n for n in sim.hosts if n != "h00000"]
        job = sim.submit([fake_file("/f", 50 * CS, CS)], targets, chunk_size=CS)
        sim.run(max_time=3000)
        assert sim.ended == {job: "done"} and sim.summary()["violations"] == []
        bound = 50 * CS / (10 * MiB)
        fin = sim.finish_times(job)
        fast = [v for n, v in fin.items() if n not in sim.slow]
        slow = [v for n, v in fin.items() if n in sim.slow]
        assert max(fast) < 1.4 * bound, (seed, max(fast) / bound)
        assert max(slow) < 1.1 * 4 * bound  # the slow ones at about their own bound
