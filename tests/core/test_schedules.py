"""Schedules in the pure core, on a fake clock: what is due, overlap, catch-up, replay.

The harness plays the center's runner: it logs durable events (with their
time) before handling them, feeds committed decisions back, and carries out
``RunSchedule`` by "asking the source" in whichever way the test wants (the
files are unchanged, or a job is submitted and driven to its end with acks
and packs).  Replaying the log into a fresh scheduler must rebuild the same
snapshot; the cron parser is tested on its own at the end.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fdship.core import cron
from fdship.core.actions import Commit
from fdship.core.events import (
    ChunkStored,
    FetchFailed,
    FilePacked,
    HostReported,
    Recovered,
    ScheduleRemoved,
    ScheduleStartFailed,
    Tick,
)
from fdship.core.scheduler import Scheduler, Tunables
from fdship.core.schedules import RunSchedule, parse_every
from fdship.errors import BadRequest, Conflict, NotFound, Unprocessable
from fdship.protocol import FAIL_LOCAL, Heartbeat, JobRequest, Load, ScheduleRequest, chunk_count
from fdship.testing import FakeClock, fake_file

CS = 1024 * 1024
T0 = 1_790_000_000.0  # a whole minute: 2026-09-21T21:33:20Z is not, so align below
T0 = T0 - T0 % 60


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Harness:
    """A scheduler driven like the runner drives it, with a log to replay."""

    def __init__(self, hosts: int = 4, labels: dict[str, tuple[str, ...]] | None = None,
                 hooks: tuple[str, ...] = ()) -> None:
        self.s = Scheduler(Tunables(chunk_size=CS), seed=3)
        self.clock = FakeClock(T0)
        self.log: list[tuple[object, float]] = []
        self.labels = labels or {}
        self.hooks = hooks
        self.names = [f"h{i}" for i in range(hosts)]
        self.alive = set(self.names)
        self.runs: list[RunSchedule] = []
        self.jobs = 0
        self.beat_all()

    # -- the runner's part ------------------------------------------------------------

    def feed(self, ev: object) -> list[object]:
        now = self.clock()
        out: list[object] = []
        stack = [ev]
        while stack:
            e = stack.pop(0)
            if e.durable:  # type: ignore[attr-defined]
                self.log.append((e, now))
            for a in self.s.handle(e, now):  # type: ignore[arg-type]
                if isinstance(a, Commit):
                    stack.append(a.event)
                else:
                    out.append(a)
                    if isinstance(a, RunSchedule):
                        self.runs.append(a)
        return out

    def beat_all(self) -> None:
        for n in sorted(self.alive):
            self.feed(HostReported(beat=Heartbeat(
                name=n, address=f"10.0.0.{int(n[1:]) + 1}:7071", boot_id="b1",
                labels=self.labels.get(n, ()), load=Load(), hooks=self.hooks)))

    def advance(self, seconds: float, step: float = 0.25) -> list[object]:
        """Let time pass in ticks of ``step`` (hosts beat every second)."""
        out: list[object] = []
        end = self.clock() + seconds
        while self.clock() + step <= end + 1e-9:
            self.clock.advance(step)
            if int(self.clock() * 4) % 4 == 0:
                self.beat_all()
            out += self.feed(Tick())
        return out

    def add(self, **kw: object) -> None:
        req = ScheduleRequest(**{"name": "models", "source": "h0", "machines": ("h1", "h2"),
                                 "paths": ("/srv/a.bin",), **kw})  # type: ignore[arg-type]
        self.feed(self.s.schedules.admit_add(req, self.clock()))

    def submit_job(self, run: RunSchedule, size: int = 3 * CS, seed: str = "") -> str:
        """The source snapshots the files and submits the run's job."""
        self.jobs += 1
        files = tuple(fake_file(p + seed, size, CS, dest=p) for p in run.paths)
        files = tuple(type(f)(path=p, dest=f.dest, size=f.size, xxh3=f.xxh3, chunks=f.chunks)
                      for f, p in zip(files, run.paths))
        jid = f"job{self.jobs:03d}"
        ev = self.s.admit(JobRequest(source=run.source, files=files, machines=run.machines,
                                     chunk_size=CS, notify=run.notify, schedule=run.tag),
                          jid, self.clock())
        self.feed(ev)
        return jid

    def finish_job(self, jid: str, nbytes: int | None = None, fail: str = "") -> None:
        """Every target stores every chunk and packs every file (or ``fail`` fails)."""
        job = self.s.jobs[jid]
        for name in sorted(job.machines):
            if name == fail:
                self.feed(FetchFailed(job=jid, host=name, file=0, chunk=0, peer="h0",
                                      fail=FAIL_LOCAL, error="disk full: 1 MiB free"))
                continue
            for fi, f in enumerate(job.files):
                for c in range(chunk_count(f.size, CS)):
                    size = min(CS, f.size - c * CS)
                    self.feed(ChunkStored(job=jid, host=name, file=fi, chunk=c, peer="h0",
                                          nbytes=size if nbytes is None else nbytes))
                self.feed(FilePacked(job=jid, host=name, file=fi))

    def unchanged(self, run: RunSchedule) -> None:
        self.feed(ScheduleStartFailed(name=run.name, run=run.run, unchanged=True,
                                      reason="files unchanged since the last run"))

    def history(self, name: str = "models") -> list[dict]:
        return self.s.schedules.history_view(name)["history"]

    def replayed(self) -> Scheduler:
        fresh = Scheduler(Tunables(chunk_size=CS), seed=99)
        for ev, t in self.log:
            fresh.handle(ev, t)  # type: ignore[arg-type]
        return fresh


def runs_in(actions: list[object]) -> list[RunSchedule]:
    return [a for a in actions if isinstance(a, RunSchedule)]


# --- intervals, unchanged files, overlap --------------------------------------------------


def test_interval_runs_at_once_then_every_interval_and_ships_changes_only():
    h = Harness()
    h.add(every="10s")
    first = runs_in(h.advance(0.25))
    assert [(r.name, r.run, r.source, r.address, r.skip) for r in first] == \
        [("models", 1, "h0", "10.0.0.1:7071", ())]
    jid = h.submit_job(first[0])
    h.advance(2)
    h.finish_job(jid)
    assert h.s.jobs[jid].state == "done"
    (e,) = h.history()
    assert e["result"] == "done" and e["job"] == jid and e["run"] == 1
    assert e["bytes"] == 2 * 3 * CS  # two targets, three 1 MiB chunks each
    assert e["start"] == utc(T0 + 0.25) and e["end"] == utc(T0 + 2.25)
    # Nothing until the next multiple of 10 s after the add.
    assert runs_in(h.advance(7.5)) == []
    second = runs_in(h.advance(0.25))
    assert len(second) == 1 and second[0].run == 2
    assert h.clock() == T0 + 10.0
    f = h.s.jobs[jid].files[0]
    assert second[0].skip == (("/srv/a.bin", f.xxh3),)
    # The source says nothing changed: a skipped run that moved nothing.
    h.unchanged(second[0])
    e = h.history()[0]
    assert (e["run"], e["result"], e["bytes"], e["job"]) == (2, "skipped", 0, None)
    assert "unchanged" in e["reason"]
    # The third run still compares against run 1, the last one that shipped.
    third = runs_in(h.advance(10))
    assert [r.run for r in third] == [3] and third[0].skip == second[0].skip
    jid3 = h.submit_job(third[0], seed="v2")
    h.finish_job(jid3)
    fourth = runs_in(h.advance(10))
    assert fourth[0].skip == (("/srv/a.bin", h.s.jobs[jid3].files[0].xxh3),)
    view = h.s.schedules.view("models", h.clock())
    assert view["runs"] == 4 and view["last_ok_run"] == 3 and view["running"]["run"] == 4


def test_runs_never_overlap_the_skip_is_recorded_with_its_reason():
    h = Harness()
    h.add(every=10)
    (r1,) = runs_in(h.advance(0.25))
    jid = h.submit_job(r1)
    # Run 1 is still going when runs 2 and 3 fall due.
    assert runs_in(h.advance(25)) == []
    skips = [e for e in h.history() if e["result"] == "skipped"]
    assert len(skips) == 2
    for e in skips:
        assert e["run"] is None and e["bytes"] == 0
        assert f"previous run 1 (job {jid}) still running since" in e["reason"]
        assert "never overlap" in e["reason"]
    assert [e["due"] for e in skips] == [utc(T0 + 20), utc(T0 + 10)]
    h.finish_job(jid)
    # The next run comes at its own due time (T0 + 30), not at once.
    assert h.clock() == T0 + 25.25
    assert runs_in(h.advance(4.5)) == []
    assert [r.run for r in runs_in(h.advance(0.25))] == [2]


def test_a_run_whose_job_fails_is_failed_and_does_not_count_as_shipped():
    h = Harness()
    h.add(every=10)
    (r1,) = runs_in(h.advance(0.25))
    jid = h.submit_job(r1)
    h.finish_job(jid, fail="h2")
    e = h.history()[0]
    assert e["result"] == "failed" and e["job"] == jid
    assert "failed on 1 of 2 machines: h2: disk full: 1 MiB free" == e["reason"]
    (r2,) = runs_in(h.advance(10))
    assert r2.skip == ()  # nothing shipped successfully yet: the next run must ship


def test_source_errors_fail_the_run_and_a_late_job_is_refused():
    h = Harness()
    h.add(every=10)
    (r1,) = runs_in(h.advance(0.25))
    h.feed(ScheduleStartFailed(name="models", run=1,
                               reason="the source daemon h0 could not start the run: "
                                      "/srv/a.bin: no such file; check the path"))
    e = h.history()[0]
    assert e["result"] == "failed" and "no such file" in e["reason"]
    with pytest.raises(Conflict, match="not waiting for a job"):
        h.submit_job(r1)
    assert not h.s.jobs


def test_a_new_machine_under_the_label_gets_the_files_even_if_unchanged():
    h = Harness(hosts=4, labels={"h1": ("bidder",), "h2": ("bidder",)})
    h.add(every=10, machines=("@bidder",))
    (r1,) = runs_in(h.advance(0.25))
    h.finish_job(h.submit_job(r1))
    (r2,) = runs_in(h.advance(10))
    assert r2.skip != ()
    h.unchanged(r2)
    h.labels["h3"] = ("bidder",)
    h.beat_all()  # h3 joins the label
    (r3,) = runs_in(h.advance(10))
    assert r3.skip == ()


# --- downtime, restart, replay -------------------------------------------------------------


def restart(h: Harness, down: float) -> Harness:
    """The center dies and comes back ``down`` seconds later: checkpoint + replay."""
    snap = h.s.snapshot()
    h.clock.advance(down)
    fresh = Scheduler(Tunables(chunk_size=CS), seed=7)
    fresh.restore(snap)
    fresh.handle(Recovered(), h.clock())
    h.s = fresh
    return h


def test_missed_runs_collapse_into_one_catch_up_run_after_downtime():
    h = Harness()
    h.add(every=10)
    (r1,) = runs_in(h.advance(0.25))
    h.finish_job(h.submit_job(r1))
    h.advance(5)  # T0 + 5.25
    restart(h, 60)  # back at T0 + 65.25: due times 10, 20, ..., 60 all passed
    # The daemons have not re-registered yet: the run waits for its source.
    assert runs_in(h.feed(Tick())) == []
    h.beat_all()
    out = runs_in(h.advance(0.25))
    assert [r.run for r in out] == [2]
    view = h.s.schedules.view("models", h.clock())
    assert view["running"]["missed"] == 5
    assert view["next_due"] == utc(T0 + 70)
    h.unchanged(out[0])
    e = h.history()[0]
    assert e["missed"] == 5 and e["due"] == utc(T0 + 10)
    # And then it is back to normal.
    assert runs_in(h.advance(4.25)) == []
    assert [r.run for r in runs_in(h.advance(0.5))] == [3]


def test_source_that_stays_down_gives_skipped_runs_with_the_reason():
    h = Harness()
    h.alive.discard("h0")
    h.advance(6)  # h0 missed its heartbeats: dead
    assert not h.s.hosts["h0"].alive
    h.add(every=30)
    assert runs_in(h.advance(9.75)) == [] and h.history() == []  # waiting for h0
    assert runs_in(h.advance(0.5)) == []  # 2 x heartbeat_timeout: give up on run 1
    (e,) = h.history()
    assert e["result"] == "skipped" and "source daemon h0 is not alive since" in e["reason"]
    assert h.s.schedules.view("models", h.clock())["next_due"] == utc(T0 + 36)


def test_restart_during_a_starting_run_fails_it_after_a_grace():
    h = Harness()
    h.add(every=600)
    (r1,) = runs_in(h.advance(0.25))
    restart(h, 2)
    h.beat_all()
    assert runs_in(h.advance(59)) == [] and h.history() == []
    h.advance(2)
    e = h.history()[0]
    assert e["result"] == "failed" and "center restarted during the run" in e["reason"]
    with pytest.raises(Conflict):
        h.submit_job(r1)


def test_a_job_that_ended_while_its_outcome_was_lost_is_settled_on_the_next_tick():
    h = Harness()
    h.add(every=600)
    (r1,) = runs_in(h.advance(0.25))
    jid = h.submit_job(r1)
    h.finish_job(jid)
    assert h.log[-1][0].kind == "SCHED_END"  # type: ignore[attr-defined]
    # A crash tore off the last record: the job's end survived, the run's did not.
    h.log.pop()
    h.s = h.replayed()
    h.s.handle(Recovered(), h.clock())
    assert h.s.schedules.view("models", h.clock())["running"]["job"] == jid
    h.beat_all()
    h.feed(Tick())
    e = h.history()[0]
    assert e["result"] == "done" and e["job"] == jid and e["bytes"] == 6 * CS


def test_replay_and_checkpoint_rebuild_the_same_schedules():
    h = Harness(labels={"h1": ("bidder",), "h2": ("bidder",)})
    h.add(every=10)
    h.add(name="nightly", cron="0 0 3 * * *", machines=("@bidder",), dest="/srv/models")
    (r1,) = runs_in(h.advance(0.25))
    h.finish_job(h.submit_job(r1), nbytes=1000)
    h.advance(21)  # runs 2 and 3 start; leave 3 running
    h.unchanged(h.runs[1])
    snap = h.s.snapshot()
    assert set(snap["schedules"]) == {"models", "nightly"}
    assert snap == h.replayed().snapshot()
    # A checkpoint half way, then the rest of the log.
    mid = len(h.log) // 2
    part = Scheduler(Tunables(chunk_size=CS), seed=11)
    for ev, t in h.log[:mid]:
        part.handle(ev, t)  # type: ignore[arg-type]
    fresh = Scheduler(Tunables(chunk_size=CS), seed=12)
    fresh.restore(part.snapshot())
    for ev, t in h.log[mid:]:
        fresh.handle(ev, t)  # type: ignore[arg-type]
    assert fresh.snapshot() == snap


def test_bytes_moved_are_network_bytes_reused_chunks_count_zero():
    h = Harness()
    h.add(every=10)
    (r1,) = runs_in(h.advance(0.25))
    jid = h.submit_job(r1)
    h.finish_job(jid, nbytes=0)  # every chunk reused locally on the targets
    assert h.history()[0]["bytes"] == 0
    assert h.history()[0]["result"] == "done"


def test_remove_stops_future_runs_and_lets_the_running_job_finish():
    h = Harness()
    h.add(every=10)
    (r1,) = runs_in(h.advance(0.25))
    jid = h.submit_job(r1)
    h.feed(h.s.schedules.admit_remove("models"))
    assert h.s.schedules.list_view(h.clock()) == {"schedules": []}
    h.finish_job(jid)
    assert h.s.jobs[jid].state == "done"
    assert runs_in(h.advance(30)) == []
    with pytest.raises(NotFound):
        h.s.schedules.admit_remove("models")
    with pytest.raises(NotFound):
        h.s.schedules.history_view("models")
    assert isinstance(h.log[-1][0], ScheduleRemoved) or any(
        isinstance(ev, ScheduleRemoved) for ev, _ in h.log)


def test_cron_schedule_fires_on_its_seconds():
    h = Harness()
    h.add(cron="*/15 * * * * *")
    starts = []
    for _ in range(4):
        (r,) = runs_in(h.advance(15))
        starts.append(h.clock() - T0)
        h.unchanged(r)
    assert starts == [15.0, 30.0, 45.0, 60.0]


def test_history_keeps_the_latest_entries_newest_first():
    h = Harness()
    h.add(every=1)
    for _ in range(250):
        (r,) = runs_in(h.advance(1))
        h.unchanged(r)
    hist = h.s.schedules.history_view("models", limit=1000)["history"]
    assert len(hist) == 200
    assert hist[0]["run"] == 250 and hist[-1]["run"] == 51


@pytest.mark.parametrize("kw, err, text", [
    ({"name": "bad name!"}, BadRequest, "is not valid"),
    ({"every": "10m", "cron": "* * * * *"}, BadRequest, "exactly one of every"),
    ({}, BadRequest, "exactly one of every"),
    ({"every": "0.5s"}, BadRequest, "between 1 second"),
    ({"every": "ten minutes"}, BadRequest, "not an interval"),
    ({"cron": "61 * * * *"}, BadRequest, "minute 61 is out of range 0-59"),
    ({"every": 10, "paths": ("rel/a.bin",)}, BadRequest, "absolute path"),
    ({"every": 10, "paths": ()}, BadRequest, "at least one file"),
    ({"every": 10, "source": "nobody"}, Unprocessable, "matches no registered daemon"),
    ({"every": 10, "machines": ("h1", "@nolabel")}, Unprocessable, "'@nolabel'"),
    ({"every": 10, "notify": "reload"}, Unprocessable, "no notify hook named 'reload'"),
    ({"every": 10, "dest": "/srv/../etc"}, BadRequest, "without '..'"),
])
def test_bad_schedules_are_refused_with_a_sentence(kw, err, text):
    h = Harness()
    with pytest.raises(err, match=text.replace("(", r"\(").replace(")", r"\)")):
        h.add(**kw)
    assert h.s.schedules.items == {}


def test_duplicate_names_conflict_and_hooks_are_checked_on_every_target():
    h = Harness(hooks=("reload",))
    h.add(every=10, notify="reload")
    with pytest.raises(Conflict, match="exists already"):
        h.add(every=20)
    assert parse_every("10m") == 600.0 and parse_every(90) == 90.0


# --- the cron parser ----------------------------------------------------------------------


def nxt(expr: str, when: str) -> str:
    ts = datetime.fromisoformat(when).replace(tzinfo=UTC).timestamp()
    return utc(cron.parse(expr).next_after(ts))


@pytest.mark.parametrize("expr, when, want", [
    ("*/10 * * * *", "2026-11-22T10:03:05", "2026-11-22T10:10:00Z"),
    ("*/10 * * * *", "2026-11-22T10:10:00", "2026-11-22T10:20:00Z"),  # strictly after
    ("*/15 * * * * *", "2026-11-22T10:03:05", "2026-11-22T10:03:15Z"),
    ("5,35 * * * * *", "2026-11-22T10:03:35", "2026-11-22T10:04:05Z"),
    ("0 0 10-12 * * *", "2026-11-22T12:00:01", "2026-11-23T10:00:00Z"),
    ("0 30 9 * * mon-fri", "2026-11-21T10:00:00", "2026-11-23T09:30:00Z"),  # Sat -> Mon
    ("0 0 * * 7", "2026-11-22T00:00:00", "2026-11-29T00:00:00Z"),  # 7 is Sunday
    ("0 0 * * sun", "2026-11-21T23:59:59", "2026-11-22T00:00:00Z"),
    ("0 0 29 feb *", "2026-11-22T00:00:00", "2028-02-29T00:00:00Z"),
    ("0 0 1 jan,JUL *", "2026-11-22T00:00:00", "2027-01-01T00:00:00Z"),
    ("0 0 13 * fri", "2026-11-21T00:00:00", "2026-11-27T00:00:00Z"),  # either day field
    ("0 0 */2 * fri", "2026-11-21T00:00:00", "2026-11-27T00:00:00Z"),  # '*/2': both must
    ("0 12 1-7 * *", "2026-12-31T13:00:00", "2027-01-01T12:00:00Z"),  # year rolls over
    ("10/20 * * * * *", "2026-11-22T10:00:31", "2026-11-22T10:00:50Z"),
    ("0 0 0 1-10/3 * *", "2026-11-02T00:00:00", "2026-11-04T00:00:00Z"),
    ("@hourly", "2026-11-22T10:00:00", "2026-11-22T11:00:00Z"),
    ("@daily", "2026-11-22T10:00:00", "2026-11-23T00:00:00Z"),
    ("@weekly", "2026-11-22T10:00:00", "2026-11-29T00:00:00Z"),
    ("@monthly", "2026-11-22T10:00:00", "2026-12-01T00:00:00Z"),
    ("@yearly", "2026-11-22T10:00:00", "2027-01-01T00:00:00Z"),
    ("* * * * * *", "2026-11-22T10:00:00.7", "2026-11-22T10:00:01Z"),
])
def test_cron_next_after(expr, when, want):
    assert nxt(expr, when) == want


@pytest.mark.parametrize("expr, text", [
    ("", "empty"),
    ("* * * *", "has 4 fields"),
    ("* * * * * * *", "has 7 fields"),
    ("60 * * * * *", "second 60 is out of range 0-59"),
    ("* 24 * * *", "hour 24 is out of range 0-23"),
    ("* * 0 * *", "day of month 0 is out of range 1-31"),
    ("* * * foo *", "'foo' is not a valid month"),
    ("* * * * funday", "not a valid day of week"),
    ("*/0 * * * *", "step '0'"),
    ("5-1 * * * *", "runs backwards"),
    ("1,,2 * * * *", "empty entry"),
    ("? * * * *", "only allowed in the day fields"),
    ("0 0 30 2 *", "never matches"),
    ("@sometimes", "unknown shortcut"),
])
def test_cron_errors_say_what_to_fix(expr, text):
    with pytest.raises(cron.CronError, match=text):
        cron.parse(expr)
