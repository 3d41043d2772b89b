"""The watched app's CPU (``Load.app_cpu``, the bidder) as load the scheduler steers by.

A daemon with ``watch_pidfile`` reports its app's CPU in percent of one core;
``placement.busyness`` counts it beside the host-wide CPU.  These drive the real
``Scheduler`` with heartbeats and acks: a holder whose bidder is busy while its
host CPU reads low gets far fewer assignments than an idle holder, gets its
share back once the bidder calms down, and ``GET /center/hosts`` shows both.
"""

from __future__ import annotations

from fdship.core import placement, views
from fdship.core.actions import AssignFetch, Commit
from fdship.core.events import HostReported
from fdship.core.scheduler import Scheduler, Tunables
from fdship.protocol import Heartbeat, Load
from fdship.testing import fake_file
from tests.core.test_placement import Peer, two_holders

MiB = 1024 * 1024
CS = 4 * MiB
T0 = 1_790_000_000.0
HOLDERS = ("h1", "h2")


def test_app_cpu_counts_on_its_own_scale_beside_host_cpu():
    b = placement.busyness
    assert b(Peer(app_cpu=10.0)) == 0.0
    assert b(Peer(app_cpu=placement.APP_IDLE)) == 0.0
    assert b(Peer(app_cpu=50.0)) == 0.5  # half a core: half busy, no volunteering
    assert b(Peer(app_cpu=placement.APP_BUSY)) == 1.0
    assert b(Peer(app_cpu=350.0)) == 1.0  # several cores: capped
    # Low host CPU on a many-core host does not hide the bidder...
    assert b(Peer(cpu=8.0, app_cpu=95.0), fleet_cpu=5.0) == 1.0
    # ...and a fleet whose hosts are as busy as this one does not excuse it
    # (host CPU is compared with the fleet's, the app's figure is its own).
    assert b(Peer(cpu=90.0, app_cpu=95.0), fleet_cpu=90.0) == 1.0
    # The larger reading wins: a busy host with an idle app is still busy.
    assert b(Peer(cpu=95.0, app_cpu=0.0), fleet_cpu=5.0) == 1.0
    busy = Peer(cpu=5.0, app_cpu=90.0)
    assert not placement.volunteers(busy, 5.0)
    assert placement.upload_slots(busy, 4, 5.0) == 1  # serves less, never nothing
    assert placement.upload_slots(Peer(cpu=5.0, app_cpu=50.0), 4, 5.0) == 2
    assert placement.volunteers(Peer(cpu=5.0, app_cpu=20.0), 5.0)


def test_an_old_daemons_load_without_app_cpu_parses_as_zero():
    old = {"cpu": 12.5, "loadavg": 0.2, "net_tx": 1.0, "net_rx": 2.0, "disk_busy": 3.0,
           "uploads": 1, "downloads": 2, "bytes_served": 0, "bytes_received": 0}
    assert Load.from_json(old).app_cpu == 0.0
    assert Load.from_json({**old, "app_cpu": 187.5}).app_cpu == 187.5
    assert Load.from_json(Load(app_cpu=42.0).to_json()).app_cpu == 42.0


# --- the real scheduler -----------------------------------------------------------


def beat(name: str, cpu: float = 5.0, app_cpu: float = 0.0) -> HostReported:
    return HostReported(beat=Heartbeat(name=name, address=f"{name}:7071", boot_id="b1",
                                       load=Load(cpu=cpu, app_cpu=app_cpu)))


def run(s: Scheduler, ev: object, now: float) -> list[object]:
    out: list[object] = []
    stack = [ev]
    while stack:
        for a in s.handle(stack.pop(0), now):  # type: ignore[arg-type]
            (stack.append(a.event) if isinstance(a, Commit) else out.append(a))
    return out


def assignments(actions: list[object]) -> list[tuple[str, int, str]]:
    return [(a.target, f.chunk, f.peer_name) for a in actions if isinstance(a, AssignFetch)
            for f in a.fetches]


def holders_job(app_of_h2: float, seed: int = 3) -> tuple[Scheduler, dict[str, int], float]:
    """h1 and h2 hold all 8 chunks first; h3..h12 then fetch them, every fetch acked
    in order (``tests.core.test_placement.two_holders``).  h2's bidder runs at
    ``app_of_h2`` percent of a core while every host, h2 included, reads 5 %
    host CPU.  Returns the scheduler, the fetches assigned to each holder once
    both were ready, and the time at the end."""
    s, later, now = two_holders(5.0, app_of_busy=app_of_h2, seed=seed)
    return s, {h: sum(1 for *_, p in later if p == h) for h in HOLDERS}, now


def test_holder_with_a_busy_bidder_gets_fewer_assignments_than_an_idle_holder():
    s, busy_run, _ = holders_job(app_of_h2=95.0)
    _, idle_run, _ = holders_job(app_of_h2=0.0)
    print(f"\nassignments by holder, h2's bidder at 95% of a core (host CPU 5%): {busy_run}; "
          f"h2's bidder idle: {idle_run}")
    assert s.hosts["h2"].app_cpu == 95.0 and s.hosts["h2"].cpu == 5.0
    assert busy_run["h1"] >= 4 * max(1, busy_run["h2"]), busy_run
    # Control: with its bidder idle h2 takes a fair share, so the gap above is
    # the bidder's doing and not the seed's.
    assert idle_run["h2"] > 3 * max(1, busy_run["h2"]), (busy_run, idle_run)
    assert idle_run["h2"] >= idle_run["h1"] / 3, idle_run


def test_host_serves_again_once_its_bidder_calms_down_and_hosts_view_shows_it():
    s = Scheduler(Tunables(heartbeat_timeout=1e9), seed=5)
    for n in ("h0", "h1", "h2"):
        run(s, beat(n), T0)
    run(s, beat("h1", app_cpu=180.0), T0 + 1)
    h1 = s.hosts["h1"]
    assert placement.upload_slots(h1, h1.max_uploads, s.fleet_cpu) == 1
    row = views.host_view(s, "h1", T0 + 1.5)
    assert row["load"]["app_cpu"] == 180.0 and row["busyness"] == 1.0
    assert views.host_view(s, "h2", T0 + 1.5)["busyness"] == 0.0
    # The bidder calms down: the next beat gives the host its slots back.
    run(s, beat("h1", app_cpu=3.0), T0 + 2)
    assert placement.upload_slots(h1, h1.max_uploads, s.fleet_cpu) == h1.max_uploads
    assert "h1" in s.free_up
    assert views.host_view(s, "h1", T0 + 2)["load"]["app_cpu"] == 3.0


def test_each_host_judges_its_app_on_the_scale_its_daemon_reports():
    """watch_busy_cpu (app_cpu_busy): a bidder built to use eight cores is not
    busy at two, while the default scale would call it fully busy."""
    b = placement.busyness
    assert b(Peer(app_cpu=200.0)) == 1.0  # default scale: 75 % of a core is busy
    wide = Peer(app_cpu=200.0, app_cpu_busy=800.0)
    assert b(wide) == 0.0  # a quarter of its eight cores: below a third, idle
    assert placement.volunteers(wide)
    assert b(Peer(app_cpu=800.0, app_cpu_busy=800.0)) == 1.0
    assert 0.0 < b(Peer(app_cpu=500.0, app_cpu_busy=800.0)) < 1.0


def test_the_source_gives_first_copies_to_idle_targets_before_a_busy_one():
    """A first copy on a busy host would make it serve (it alone holds the
    chunk): while idle targets wait, the source hands first copies to them."""
    from fdship.core.actions import AssignFetch
    from fdship.core.events import HostReported
    from fdship.protocol import Heartbeat, Load
    from tests.core.test_scheduler import CS, cluster, run, submit

    s = cluster(5, max_uploads=4, max_downloads=4)
    run(s, HostReported(beat=Heartbeat(name="h1", address="10.0.0.2:7071", boot_id="b1",
                                       load=Load(cpu=5.0, app_cpu=95.0))))
    _, acts = submit(s, [fake_file("/a", 8 * CS, CS)], ["h1", "h2", "h3", "h4"])
    first = [(a.target, f.peer_name) for a in acts if isinstance(a, AssignFetch)
             for f in a.fetches]
    assert first and all(p == "h0" for _, p in first)
    assert "h1" not in {t for t, _ in first}, first
