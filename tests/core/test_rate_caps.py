"""Scenario tests: daemons' rate caps (``upload_rate`` / ``download_rate``) in the scheduler.

A daemon reports its caps in every heartbeat.  Before any transfer has
measured a capped link, the cap is its estimate, so the center does not make a
capped target the first copy of a chunk or a relay for fast ones (a chain runs
at its slowest link); once measured, the measurement stands, and the cap still
bounds it.
"""

from __future__ import annotations

import pytest

from fdship.core import views
from fdship.core.events import ChunkStored, HostReported, Tick
from fdship.core.scheduler import Scheduler, Tunables
from fdship.protocol import Heartbeat, ProtocolError
from fdship.testing import fake_file
from tests.core.test_scheduler import CS, T0, fetches, run, submit
from tests.core.test_scheduler import beat as scheduler_beat

MiB = 1024 * 1024


def beat(name: str, up: int = 0, down: int = 0, max_uploads: int = 4) -> HostReported:
    """A heartbeat of a daemon that relays chunks, with these caps."""
    return scheduler_beat(name, max_uploads=max_uploads, streams=True, upload_rate=up,
                          download_rate=down)


def fleet(caps: dict[str, tuple[int, int]], n: int, seed: int = 5,
          source_uploads: int = 4) -> Scheduler:
    s = Scheduler(Tunables(), seed=seed)
    for i in range(n):
        up, down = caps.get(f"h{i}", (0, 0))
        run(s, beat(f"h{i}", up, down, max_uploads=source_uploads if i == 0 else 4))
    return s


def test_heartbeat_carries_the_caps_and_refuses_bad_ones():
    b = beat("h1", up=50 * MiB, down=MiB).beat
    back = Heartbeat.from_json(b.to_json())
    assert (back.upload_rate, back.download_rate) == (50 * MiB, MiB)
    old = b.to_json()
    del old["upload_rate"], old["download_rate"]  # a daemon from before caps were reported
    assert (Heartbeat.from_json(old).upload_rate, Heartbeat.from_json(old).download_rate) == (0, 0)
    for bad in (-1, "1M", 1.5, True):
        with pytest.raises(ProtocolError, match="download_rate"):
            Heartbeat.from_json({**b.to_json(), "download_rate": bad})


def test_a_cap_is_the_estimate_until_measured_and_the_hosts_view_says_so():
    s = fleet({"h1": (0, MiB), "h2": (2 * MiB, 0)}, 4)
    h1, h2, h3 = s.hosts["h1"], s.hosts["h2"], s.hosts["h3"]
    assert (h1.down_rate, h1.down_seeded, h1.up_rate) == (MiB, True, 0.0)
    assert (h2.up_rate, h2.up_seeded, h2.down_rate) == (2 * MiB, True, 0.0)
    assert h3.up_rate == h3.down_rate == 0.0
    v = views.host_view(s, "h1", T0)["link"]
    assert v == {"up": 0, "down": MiB, "up_cap": 0, "down_cap": MiB,
                 "measured": {"up": False, "down": False}, "slow": True}
    # Uncapped hosts are there, nothing is measured yet: a capped host counts as slow.
    assert views.host_view(s, "h3", T0)["link"]["slow"] is False


def test_lifting_a_cap_forgets_its_seed_and_changing_it_moves_it():
    s = fleet({"h1": (0, MiB)}, 3)
    run(s, beat("h1", down=4 * MiB))
    assert (s.hosts["h1"].down_rate, s.hosts["h1"].down_seeded) == (4 * MiB, True)
    run(s, beat("h1"))
    h1 = s.hosts["h1"]
    assert (h1.down_rate, h1.down_seeded, h1.down_cap) == (0.0, False, 0.0)
    assert not s._slow(h1)


def test_the_first_copy_goes_to_a_fast_target_not_a_capped_one():
    """The source has one upload slot: across seeds its first transfer goes to
    a target without a cap; with nobody reporting caps, the same seeds pick the
    target that is in fact capped now and then."""
    picked_capped, picked_plain = set(), set()
    for seed in range(24):
        for caps, picked in (({"h1": (0, MiB)}, picked_capped), ({}, picked_plain)):
            s = fleet(caps, 4, seed=seed, source_uploads=1)
            _, acts = submit(s, [fake_file("/a", 8 * CS, CS)], ["h1", "h2", "h3"])
            # (Others may then fetch it from that target, as it arrives.)
            first = [x for x in fetches(acts) if x[3] == "h0"]
            assert len(first) == 1, first
            picked.add(first[0][0])
    assert "h1" not in picked_capped and picked_capped <= {"h2", "h3"}
    assert "h1" in picked_plain  # the control: without caps it is a coin toss


def test_no_relay_chain_runs_through_a_capped_target():
    """A target that may relay a chunk on is entered in ``streaming``; a capped
    (slow) one never is, so no fast target fetches a chunk through it."""
    s = fleet({"h1": (0, MiB), "h2": (0, MiB)}, 6)
    _, acts = submit(s, [fake_file("/a", 8 * CS, CS)], ["h1", "h2", "h3", "h4", "h5"])
    assert fetches(acts)
    job = s.jobs["j1"]
    relays = {name for chain in job.streaming for name in chain}
    assert relays and not relays & {"h1", "h2"}, relays
    # The same fleet without caps lets them relay like anyone.
    s = fleet({}, 6)
    submit(s, [fake_file("/a", 8 * CS, CS)], ["h1", "h2", "h3", "h4", "h5"])
    assert {name for chain in s.jobs["j1"].streaming for name in chain} & {"h1", "h2"}


def test_all_hosts_capped_alike_are_not_slow_and_a_far_lower_cap_is():
    s = fleet({f"h{i}": (100 * MiB, 100 * MiB) for i in range(4)} | {"h4": (MiB, MiB)}, 5)
    assert [s._slow(s.hosts[f"h{i}"]) for i in range(5)] == [False] * 4 + [True]


def test_a_measurement_replaces_the_seed_and_the_cap_bounds_later_ones():
    s = fleet({"h1": (0, 8 * MiB)}, 2)
    _, acts = submit(s, [fake_file("/a", 4 * CS, CS)], ["h1"])
    (tgt, f, c, peer), = fetches(acts)
    # Slower than its cap (the link, not the cap, is the bottleneck): 2 MiB/s
    # replaces the 8 MiB/s seed outright instead of decaying from it.
    acts = run(s, ChunkStored(job="j1", host=tgt, file=f, chunk=c, peer=peer, nbytes=CS,
                              seconds=2.0), T0 + 2.5)
    h1 = s.hosts["h1"]
    assert h1.down_rate == pytest.approx(2 * MiB) and not h1.down_seeded
    assert views.host_view(s, "h1", T0 + 2.5)["link"]["measured"]["down"] is True
    # A later sample above the cap (a timing artefact) counts only up to the cap.
    nxt = [x for x in fetches(acts) if x[0] == "h1"]
    assert nxt, acts
    (tgt, f, c, peer) = nxt[0]
    run(s, ChunkStored(job="j1", host=tgt, file=f, chunk=c, peer=peer, nbytes=CS,
                       seconds=0.2), T0 + 2.8)
    assert h1.down_rate == pytest.approx(8 * MiB)


def test_what_counts_as_slow_follows_hosts_joining_and_dying():
    """Before anything is measured: all capped alike, none is slow; an uncapped
    host joins and the capped ones become the slower kind; it dies and they
    are peers again."""
    s = fleet({f"h{i}": (8 * MiB, 8 * MiB) for i in range(3)}, 3)
    assert not any(s._slow(h) for h in s.hosts.values())
    run(s, beat("h3"))
    assert [s._slow(s.hosts[f"h{i}"]) for i in range(4)] == [True, True, True, False]
    # h3 falls silent past the heartbeat timeout while the others keep beating.
    later = T0 + s.t.heartbeat_timeout + 1
    for i in range(3):
        run(s, beat(f"h{i}", 8 * MiB, 8 * MiB), later)
    run(s, Tick(), later)
    assert not s.hosts["h3"].alive
    assert not any(s._slow(s.hosts[f"h{i}"]) for i in range(3))


def test_a_capped_source_still_heads_relay_chains_for_first_copies():
    """The source capped to a fraction of the links: a chunk nobody holds yet
    comes no faster any other way, so its first copy may still be relayed on
    (the targets would otherwise wait idle for the source's next chunk)."""
    s = fleet({"h0": (MiB, 0)}, 6)
    assert s._is_slow(s.hosts["h0"].up_rate, "up")
    submit(s, [fake_file("/a", 8 * CS, CS)], ["h1", "h2", "h3", "h4", "h5"])
    assert {name for chain in s.jobs["j1"].streaming for name in chain}


def test_caps_on_one_end_are_compared_with_that_end_only():
    """Every daemon caps its uploads alike and none its downloads: no uplink
    counts as slow, though downlinks are uncapped."""
    s = fleet({f"h{i}": (3 * MiB, 0) for i in range(4)}, 4)
    assert not any(s._is_slow(h.up_rate, "up") or s._slow(h) for h in s.hosts.values())
