"""Placement: hard rules, the named-weight ranking, and load steering the scheduler.

The policy is pure, so most of this drives ``fdship.core.placement`` and the
real ``Scheduler`` directly with heartbeats and acks; the last tests run the
simulated cluster to check the effect over a whole job.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fdship.core import placement
from fdship.core.actions import AssignFetch, Commit
from fdship.core.events import ChunkStored, HostReported
from fdship.core.scheduler import Scheduler, Tunables
from fdship.protocol import Heartbeat, JobRequest, Load
from fdship.testing import SimCluster, fake_file

MiB = 1024 * 1024
CS = 4 * MiB
T0 = 1_790_000_000.0


@dataclass
class Peer:
    name: str = "p"
    alive: bool = True
    uploads: int = 0
    max_uploads: int = 4
    cpu: float = 0.0
    app_cpu: float = 0.0
    app_cpu_busy: float = 75.0
    loadavg: float = 0.0
    net_tx: float = 0.0
    net_tx_peak: float = 0.0
    up_rate: float = 0.0
    up_load: float = 0.0


# --- the policy alone -------------------------------------------------------------


def test_hard_rules_drop_dead_full_self_excluded_and_avoided_peers():
    peers = [Peer("a"), Peer("b", alive=False), Peer("c", uploads=4), Peer("t"), Peer("x"),
             Peer("bad"), Peer("ok")]
    out = placement.filter_peers(peers, "t", {"bad": placement.AVOID_AFTER_FAILURES}, "x")
    assert [p.name for p in out] == ["a", "ok"]
    # With the scheduler's own notion of room (its free-uploader set), that decides.
    out = placement.filter_peers(peers, "t", {}, free={"c", "ok"})
    assert [p.name for p in out] == ["c", "ok"]


def test_busyness_is_relative_to_the_fleet():
    busy = Peer("b", cpu=95.0)
    assert placement.busyness(busy, fleet_cpu=5.0) == 1.0
    assert placement.busyness(Peer("i", cpu=40.0), fleet_cpu=5.0) == 0.0
    # Hosts sharing one machine (or a uniformly busy fleet): nobody is busier.
    assert placement.busyness(busy, fleet_cpu=95.0) == 0.0
    assert not placement.volunteers(busy, 5.0) and placement.volunteers(busy, 95.0)
    assert placement.upload_slots(busy, 4, 5.0) == 1  # asked to serve less, never zero
    assert placement.upload_slots(Peer("h", cpu=75.0), 4, 5.0) == 2
    assert placement.upload_slots(Peer("i"), 4, 5.0) == 4


def test_rank_prefers_idle_fast_peers_and_spares_the_source():
    rng = random.Random(1)
    idle = Peer("idle", up_rate=10e6)
    busy = Peer("busy", cpu=95.0, up_rate=10e6)
    slow = Peer("slow", up_rate=2.5e6)
    src = Peer("src", up_rate=10e6)
    wins = {"idle": 0, "busy": 0, "slow": 0, "src": 0}
    for _ in range(200):
        best = placement.rank([busy, slow, src, idle], source="src", avoid={}, rng=rng,
                              fleet_cpu=5.0)
        assert best is not None
        wins[best.name] += 1
    assert wins == {"idle": 200, "busy": 0, "slow": 0, "src": 0}
    # Without the idle peer, the slow one beats the busy one and the source.
    best = placement.rank([busy, slow, src], source="src", avoid={}, rng=rng, fleet_cpu=5.0)
    assert best is not None and best.name == "slow"
    # Recent failures towards this target weigh more than speed.
    best = placement.rank([idle, slow], source="src", avoid={"idle": 1}, rng=rng)
    assert best is not None and best.name == "slow"


def test_unknown_speed_is_not_penalised():
    rng = random.Random(2)
    new = Peer("new")  # never served: no estimate yet
    fast = Peer("fast", up_rate=10e6)
    names = {placement.rank([new, fast], source="s", avoid={}, rng=rng).name  # type: ignore
             for _ in range(100)}
    assert names == {"new", "fast"}  # equal but for the jitter


# --- load steering the real scheduler ------------------------------------------------


def beat(name: str, cpu: float = 0.0, app_cpu: float = 0.0) -> HostReported:
    return HostReported(beat=Heartbeat(name=name, address=f"{name}:7071", boot_id="b1",
                                       load=Load(cpu=cpu, app_cpu=app_cpu)))


def run(s: Scheduler, ev, now: float) -> list:  # type: ignore[no-untyped-def]
    out, stack = [], [ev]
    while stack:
        for a in s.handle(stack.pop(0), now):
            (stack.append(a.event) if isinstance(a, Commit) else out.append(a))
    return out


def assignments(actions: list) -> list[tuple[str, int, str]]:  # type: ignore[type-arg]
    return [(a.target, f.chunk, f.peer_name) for a in actions if isinstance(a, AssignFetch)
            for f in a.fetches]


def two_holders(cpu_of_busy: float, app_of_busy: float = 0.0,
                seed: int = 3) -> tuple[Scheduler, list[tuple[str, int, str]], float]:
    """h1 and h2 hold every chunk (h2 at ``cpu_of_busy`` percent host CPU, its
    watched app at ``app_of_busy`` percent of a core); h3..h12 fetch them.

    Every assigned fetch is acked at once, in order, until the job ends; returns
    the scheduler, every assignment made after the holders were ready, and the time.
    """
    s = Scheduler(Tunables(heartbeat_timeout=1e9), seed=seed)
    names = [f"h{i}" for i in range(13)]
    for n in names:
        run(s, beat(n, cpu=cpu_of_busy if n == "h2" else 5.0,
                    app_cpu=app_of_busy if n == "h2" else 0.0), T0)
    n_chunks = 8
    ev = s.admit(JobRequest(source="h0", files=(fake_file("/a", n_chunks * CS, CS),),
                            machines=tuple(names[1:]), chunk_size=CS), "j1", T0)
    pending = assignments(run(s, ev, T0))
    now = T0
    # The holders get everything first (acks for chunks they were not assigned
    # are facts too: the core records them).
    for holder in ("h1", "h2"):
        for c in range(n_chunks):
            now += 0.01
            pending += assignments(run(s, ChunkStored(job="j1", host=holder, file=0, chunk=c,
                                                      peer="h0"), now))
    later: list[tuple[str, int, str]] = []
    pending = [p for p in pending if p[0] not in ("h1", "h2")]
    for _ in range(10_000):
        if not pending:
            break
        target, chunk, peer = pending.pop(0)
        now += 0.05
        new = assignments(run(s, ChunkStored(job="j1", host=target, file=0, chunk=chunk,
                                             peer=peer), now))
        later += new
        pending += new
    assert all(len(m.have) == n_chunks for m in s.jobs["j1"].machines.values())
    return s, later, now


def test_idle_holder_gets_most_assignments_and_busy_one_serves_less():
    s, later, _ = two_holders(cpu_of_busy=95.0)
    by_peer = {p: sum(1 for *_, q in later if q == p) for p in ("h1", "h2")}
    print("assignments by holder with h2 at 95% CPU:", by_peer)
    assert by_peer["h1"] >= 4 * max(1, by_peer["h2"]), by_peer
    assert s.hosts["h2"].cpu == 95.0
    # Control: the same run with h2 idle shares the load between both.
    _, later2, _ = two_holders(cpu_of_busy=5.0)
    by_peer2 = {p: sum(1 for *_, q in later2 if q == p) for p in ("h1", "h2")}
    print("assignments by holder with h2 idle:", by_peer2)
    assert by_peer2["h2"] > 3 * max(1, by_peer["h2"]), (by_peer, by_peer2)


def test_busy_host_still_serves_what_only_it_holds():
    s = Scheduler(Tunables(heartbeat_timeout=1e9), seed=4)
    for n, cpu in (("h0", 5.0), ("h1", 97.0), ("h2", 5.0), ("h3", 5.0)):
        run(s, beat(n, cpu=cpu), T0)
    ev = s.admit(JobRequest(source="h0", files=(fake_file("/a", CS, CS),),
                            machines=("h1", "h2", "h3"), chunk_size=CS), "j1", T0)
    run(s, ev, T0)
    # The source dies after h1 (busy) got the only chunk: h1 must hand it on.
    run(s, ChunkStored(job="j1", host="h1", file=0, chunk=0, peer="h0"), T0 + 1)
    s.hosts["h0"].alive = False
    s.free_up.pop("h0", None)
    out = []
    for t in (1.1, 1.2):
        out += assignments(run(s, beat("h2"), T0 + t)) + assignments(run(s, beat("h3"), T0 + t))
    for m in ("h2", "h3"):
        job = s.jobs["j1"]
        out += assignments(s._try(job, job.machines[m], T0 + 1.3, full=True))
    assert ("h2", 0, "h1") in out or ("h3", 0, "h1") in out, out


def test_cpu_burning_host_serves_far_less_in_a_simulated_job():
    sim = SimCluster(31, bandwidth=10e6, seed=5)
    sim.set_load("h00007", cpu=95.0)
    job = sim.submit([fake_file("/a", 16 * CS, CS)], [f"h{i:05d}" for i in range(1, 31)])
    sim.run(max_time=3600)
    assert sim.ended == {job: "done"}
    served = sorted(h.bytes_up for n, h in sim.hosts.items() if n not in ("h00000", "h00007"))
    busy = sim.hosts["h00007"].bytes_up
    median = served[len(served) // 2]
    print(f"busy host served {busy / MiB:.0f} MiB; median peer {median / MiB:.0f} MiB")
    assert busy <= median / 4
    assert sim.summary()["violations"] == []
