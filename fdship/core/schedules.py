"""Schedules: recurring pushes decided by the pure core.

Where it sits: :class:`fdship.core.scheduler.Scheduler` owns one
:class:`Schedules` and hands it the schedule events (and a look at every
other event and the actions it caused); the center's runner carries out the
:class:`RunSchedule` actions it returns (:mod:`fdship.center.schedules` asks
the source daemon to submit the run's job).  Like the rest of the core it
does no I/O and reads no clock: ``now`` is an argument, so the REDO log
replays schedules to the same state and the tests drive it with a fake clock.

A schedule is a definition (files on a source daemon, target machines,
destination, notify hook) plus *when*: ``every`` N seconds (anchored at the
time it was added, first run at once) or a :mod:`cron <fdship.core.cron>`
expression.  Every decision that changes durable state is a durable event:

* ``ScheduleAdded`` / ``ScheduleRemoved``: the definitions;
* ``ScheduleRunStarted``: a due run begins (the next due time moves on);
* ``ScheduleSkipped``: a due run did not start, and why (the previous run
  still runs: runs of one schedule never overlap; or the source is down);
* ``ScheduleRunEnded``: the run's outcome (done, failed, or skipped because
  its files were unchanged), bytes moved, and, for a done run, the files'
  hashes, which the next run sends to the source so that it can answer
  "unchanged" without creating a job.

A run's job carries the tag ``NAME#RUN`` (in ``JobSubmitted.schedule``), which
ties the job to the run in the same durable record that creates the job, so
a center crash between the two cannot orphan it.  When the center was down,
the first tick after restart finds the due time long past: the missed runs
collapse into one catch-up run, whose history entry counts what it stands in
for.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fdship.core import cron as cronlib
from fdship.core.actions import Action, Commit, JobEnded
from fdship.core.events import (
    ChunkStored,
    Event,
    JobSubmitted,
    Recovered,
    ScheduleAdded,
    ScheduleRemoved,
    ScheduleRunEnded,
    ScheduleRunStarted,
    ScheduleSkipped,
    ScheduleStartFailed,
    Tick,
)
from fdship.errors import BadRequest, Conflict, NotFound, Unprocessable

if TYPE_CHECKING:  # pragma: no cover
    from fdship.core.scheduler import Scheduler

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HISTORY_KEEP = 200  # history entries kept per schedule (the oldest go first)
MIN_EVERY = 1.0
MAX_EVERY = 366 * 86400.0
MAX_SCHEDULES = 1000
# A run whose source daemon has not submitted a job after this long is failed
# (the runner's own call gives up sooner; this only catches a lost answer).
START_TIMEOUT = 900.0
# After a center restart, a run that was starting gets this long for its job
# to show up (the source daemon may still be snapshotting) before it fails.
RESTART_START_TIMEOUT = 60.0
# How many missed due times a catch-up run counts at most (cron walks them).
MISSED_COUNT_CAP = 10_000
RESULTS = ("done", "failed", "skipped")

_DUR_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hms(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%H:%M:%S UTC")


def parse_every(value: Any) -> float:
    """'10m' / '90s' / '2h' / '1d' / a number of seconds -> seconds (at least 1)."""
    if isinstance(value, bool):
        raise BadRequest(f"every: {value!r} is not an interval; write e.g. 30s, 10m or 2h")
    if isinstance(value, (int, float)):
        secs = float(value)
    else:
        m = _DUR_RE.match(str(value))
        if not m:
            raise BadRequest(f"every: {value!r} is not an interval; write e.g. 30s, 10m or 2h")
        secs = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]
    if not MIN_EVERY <= secs <= MAX_EVERY:
        raise BadRequest(f"every: {value!r} is out of range; an interval is between 1 second "
                         "and 366 days")
    return secs


# --- actions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSchedule(Action):
    """Ask ``source`` (at ``address``) to submit the run's job: POST /daemon/api.

    ``skip`` holds the hashes of the last successful run's files; the source
    answers "unchanged" without creating a job when every file still has them.
    """

    name: str
    run: int
    source: str
    address: str
    paths: tuple[str, ...]
    machines: tuple[str, ...]
    dest: str
    notify: str
    skip: tuple[tuple[str, str], ...]

    @property
    def tag(self) -> str:
        return f"{self.name}#{self.run}"


# --- state ---------------------------------------------------------------------------------


@dataclass
class Run:
    """The run in progress (at most one per schedule)."""

    run: int
    due: float
    started: float
    missed: int
    job: str = ""
    nbytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "due": self.due, "started": self.started,
                "missed": self.missed, "job": self.job, "nbytes": self.nbytes}


@dataclass
class Schedule:
    name: str
    every: float
    cron: str
    source: str
    machines: tuple[str, ...]
    paths: tuple[str, ...]
    dest: str
    notify: str
    created: float
    next_due: float
    runs: int = 0
    current: Run | None = None
    last_ok: dict[str, str] = field(default_factory=dict)
    last_ok_targets: tuple[str, ...] = ()
    last_ok_run: int = 0
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY_KEEP))
    # soft: the parsed cron expression
    parsed: cronlib.Cron | None = None

    def next_after(self, now: float) -> float:
        """The first due time strictly after ``now``."""
        if self.parsed is not None:
            return self.parsed.next_after(now)
        k = int((now - self.created) // self.every) + 1
        return self.created + max(k, 1) * self.every

    def missed_by(self, now: float) -> int:
        """Due times in (next_due, now] passed over besides ``next_due`` itself."""
        if now < self.next_due:
            return 0
        if self.parsed is None:
            return int((now - self.next_due) // self.every)
        n, t = 0, self.next_due
        while n < MISSED_COUNT_CAP:
            t = self.parsed.next_after(t)
            if t > now:
                break
            n += 1
        return n


class Schedules:
    """Every schedule of the center, and the decisions about them."""

    def __init__(self, sched: Scheduler) -> None:
        self.s = sched
        self.items: dict[str, Schedule] = {}
        self.by_job: dict[str, str] = {}  # job id -> schedule name (runs in progress)
        self.recovered_at: float | None = None  # soft: when this process recovered

    # ------------------------------------------------------------------ admission (pure)

    def admit_add(self, req: Any, now: float) -> ScheduleAdded:
        """Validate a ``protocol.ScheduleRequest``; raise a 4xx or return the event to log."""
        name = req.name
        if not NAME_RE.match(name or ""):
            raise BadRequest(f"schedule name {name!r} is not valid: use 1-64 letters, digits, "
                             "'.', '_' or '-', starting with a letter or digit")
        if name in self.items:
            raise Conflict(f"a schedule named {name!r} exists already; remove it first "
                           f"(fdship schedule rm {name}) or pick another name")
        if len(self.items) >= MAX_SCHEDULES:
            raise Conflict(f"this center already has {MAX_SCHEDULES} schedules; remove some")
        has_every = req.every not in (None, "", 0)
        if has_every == bool(req.cron):
            raise BadRequest("give exactly one of every (an interval like 10m) or cron (an "
                             "expression like \"*/10 * * * *\")")
        every = parse_every(req.every) if has_every else 0.0
        if req.cron:
            cronlib.parse(req.cron)
        if not req.paths:
            raise BadRequest("a schedule needs at least one file to ship")
        if len(req.paths) > self.s.t.max_files:
            raise BadRequest(f"a schedule may name at most {self.s.t.max_files} files")
        for p in req.paths:
            if not isinstance(p, str) or not p.startswith("/") or "\0" in p:
                raise BadRequest(f"file {p!r} must be an absolute path on the source daemon")
        if len(set(req.paths)) != len(req.paths):
            raise BadRequest("the same file is named twice")
        if req.dest and (not req.dest.startswith("/") or ".." in req.dest.split("/")):
            raise BadRequest(f"dest {req.dest!r} must be an absolute directory path without '..'")
        src = self.s.resolve(req.source) if req.source else []
        if len(src) != 1:
            known = ", ".join(sorted(self.s.hosts)) or "none yet"
            what = "matches no" if not src else f"matches {len(src)}"
            raise Unprocessable(f"source {req.source!r} {what} registered daemon; name exactly "
                                f"one daemon (known: {known})")
        if not req.machines:
            raise BadRequest("a schedule needs target machines: name at least one")
        unknown = [m for m in req.machines if not self.s.resolve(m)]
        if unknown:
            known = ", ".join(sorted(self.s.hosts)) or "none yet"
            raise Unprocessable(f"unknown machine(s) {', '.join(map(repr, unknown))}: no "
                                f"registered daemon has that name, address or label (known "
                                f"daemons: {known})")
        if req.notify:
            for entry in req.machines:
                for n in self.s.resolve(entry):
                    h = self.s.hosts[n]
                    if req.notify not in h.hooks:
                        raise Unprocessable(
                            f"machine {n} has no notify hook named {req.notify!r} (its hooks: "
                            f"{', '.join(h.hooks) or 'none'}); configure it in the daemon's "
                            f"[hooks.{req.notify}] section")
        return ScheduleAdded(name=name, every=every, cron=req.cron.strip() if req.cron else "",
                             source=src[0], machines=tuple(req.machines),
                             paths=tuple(req.paths), dest=req.dest or "",
                             notify=req.notify or "")

    def admit_remove(self, name: str) -> ScheduleRemoved:
        if name not in self.items:
            raise NotFound(f"no schedule named {name!r} (fdship schedule list shows them)")
        return ScheduleRemoved(name=name)

    def check_tag(self, tag: str) -> None:
        """A job that says it belongs to run ``NAME#RUN`` is only accepted while that run
        waits for its job (a late job of a run already given up is refused, 409)."""
        name, _, run = tag.rpartition("#")
        s = self.items.get(name)
        cur = s.current if s is not None else None
        if cur is None or str(cur.run) != run or cur.job:
            raise Conflict(f"schedule run {tag} is not waiting for a job (it ended or was "
                           "removed); this job was not started")

    # ------------------------------------------------------------------ events

    def handle(self, ev: Event, now: float) -> list[Action]:
        method = getattr(self, "_on_" + type(ev).__name__)
        return method(ev, now)  # type: ignore[no-any-return]

    def _on_ScheduleAdded(self, ev: ScheduleAdded, now: float) -> list[Action]:
        parsed = cronlib.parse(ev.cron) if ev.cron else None
        s = Schedule(name=ev.name, every=ev.every, cron=ev.cron, source=ev.source,
                     machines=tuple(ev.machines), paths=tuple(ev.paths), dest=ev.dest,
                     notify=ev.notify, created=now, next_due=now, parsed=parsed)
        # An interval schedule runs at once, then every `every` seconds after;
        # a cron schedule waits for its first matching second.
        if parsed is not None:
            s.next_due = parsed.next_after(now)
        self.items[ev.name] = s
        return []

    def _on_ScheduleRemoved(self, ev: ScheduleRemoved, now: float) -> list[Action]:
        s = self.items.pop(ev.name, None)
        if s is not None and s.current is not None and s.current.job:
            # The job goes on; it is simply no longer tracked by a schedule.
            self.by_job.pop(s.current.job, None)
        return []

    def _on_ScheduleRunStarted(self, ev: ScheduleRunStarted, now: float) -> list[Action]:
        s = self.items.get(ev.name)
        if s is None or s.current is not None:
            return []
        s.runs = ev.run
        s.current = Run(run=ev.run, due=ev.due, started=now, missed=ev.missed)
        s.next_due = s.next_after(now)
        h = self.s.hosts.get(s.source)
        targets = self._targets(s)
        skip: tuple[tuple[str, str], ...] = ()
        # Ask the source to skip unchanged files only when the last good run
        # shipped the same files to every machine the schedule names now (a
        # daemon that joined a label since must get them).
        if s.last_ok and set(s.last_ok) == set(s.paths) and \
                set(targets) <= set(s.last_ok_targets):
            skip = tuple(sorted(s.last_ok.items()))
        return [RunSchedule(name=s.name, run=ev.run, source=s.source,
                            address=h.address if h is not None else "", paths=s.paths,
                            machines=s.machines, dest=s.dest, notify=s.notify, skip=skip)]

    def _on_ScheduleSkipped(self, ev: ScheduleSkipped, now: float) -> list[Action]:
        s = self.items.get(ev.name)
        if s is None:
            return []
        s.history.append({"run": None, "due": ev.due, "started": now, "ended": now,
                          "result": "skipped", "job": None, "bytes": 0, "reason": ev.reason,
                          "missed": ev.missed})
        s.next_due = s.next_after(now)
        return []

    def _on_ScheduleRunEnded(self, ev: ScheduleRunEnded, now: float) -> list[Action]:
        s = self.items.get(ev.name)
        if s is None or s.current is None or s.current.run != ev.run:
            return []  # already ended (a repeated report) or the schedule is gone
        cur = s.current
        s.history.append({"run": cur.run, "due": cur.due, "started": cur.started, "ended": now,
                          "result": ev.result, "job": ev.job or cur.job or None,
                          "bytes": ev.nbytes, "reason": ev.reason or None,
                          "missed": cur.missed})
        if ev.result == "done":
            s.last_ok = dict(ev.hashes)
            s.last_ok_targets = tuple(ev.targets)
            s.last_ok_run = cur.run
        if cur.job:
            self.by_job.pop(cur.job, None)
        s.current = None
        return []

    def _on_ScheduleStartFailed(self, ev: ScheduleStartFailed, now: float) -> list[Action]:
        s = self.items.get(ev.name)
        if s is None or s.current is None or s.current.run != ev.run or s.current.job:
            return []  # the job arrived after all, or the run is over
        return [Commit(ScheduleRunEnded(name=ev.name, run=ev.run,
                                        result="skipped" if ev.unchanged else "failed",
                                        reason=ev.reason))]

    # ------------------------------------------------------------------ the rest of the core

    def after(self, ev: Event, actions: list[Action], now: float) -> list[Action]:
        """Look at an event the scheduler handled (and what it decided)."""
        if isinstance(ev, Recovered):
            self.recovered_at = now
            return actions
        if not self.items:
            return actions
        if isinstance(ev, JobSubmitted) and ev.schedule:
            name, _, run = ev.schedule.rpartition("#")
            s = self.items.get(name)
            if s is not None and s.current is not None and str(s.current.run) == run \
                    and not s.current.job:
                s.current.job = ev.job
                self.by_job[ev.job] = name
        elif isinstance(ev, ChunkStored) and ev.job in self.by_job:
            s = self.items[self.by_job[ev.job]]
            if s.current is not None:
                s.current.nbytes += ev.nbytes
        if self.by_job:
            for a in actions:
                if isinstance(a, JobEnded) and a.job in self.by_job:
                    end = self._job_outcome(self.items[self.by_job[a.job]])
                    if end is not None:
                        actions = actions + [Commit(end)]
        if isinstance(ev, Tick):
            ending = {a.event.name for a in actions
                      if isinstance(a, Commit) and isinstance(a.event, ScheduleRunEnded)}
            return actions + self._tick(now, ending)
        return actions

    def _job_outcome(self, s: Schedule) -> ScheduleRunEnded | None:
        cur = s.current
        if cur is None or not cur.job:
            return None
        job = self.s.jobs.get(cur.job)
        if job is None:
            return ScheduleRunEnded(name=s.name, run=cur.run, result="failed", job=cur.job,
                                    nbytes=cur.nbytes,
                                    reason=f"job {cur.job} is gone (expired before it ended)")
        if job.state == "running":
            return None
        hashes = tuple(sorted((f.path, f.xxh3) for f in job.files))
        if job.state == "done":
            return ScheduleRunEnded(name=s.name, run=cur.run, result="done", job=job.id,
                                    nbytes=cur.nbytes, hashes=hashes,
                                    targets=tuple(sorted(job.machines)))
        bad = sorted((n, m.error or "failed") for n, m in job.machines.items()
                     if m.ended == "failed")
        reason = f"failed on {len(bad)} of {len(job.machines)} machines: " + "; ".join(
            f"{n}: {e}" for n, e in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        return ScheduleRunEnded(name=s.name, run=cur.run, result="failed", job=job.id,
                                nbytes=cur.nbytes, reason=reason[:1000])

    def _targets(self, s: Schedule) -> list[str]:
        out: list[str] = []
        for entry in s.machines:
            for n in self.s.resolve(entry):
                if n not in out:
                    out.append(n)
        return out

    def _tick(self, now: float, ending: set[str]) -> list[Action]:
        """Start the runs that are due; ``ending`` names schedules whose current run
        ends in this same turn (its outcome is already on its way to the log)."""
        out: list[Action] = []
        for name in sorted(self.items):
            s = self.items[name]
            cur = s.current
            if cur is not None and name not in ending:
                end = self._check_current(s, cur, now)
                if end:
                    ending.add(name)
                    out += end
            if now < s.next_due:
                continue
            missed = s.missed_by(now)
            if s.current is not None and name not in ending:
                cur = s.current
                what = f"job {cur.job}" if cur.job else "its job not yet submitted"
                out.append(Commit(ScheduleSkipped(
                    name=name, due=s.next_due, missed=missed,
                    reason=f"previous run {cur.run} ({what}) still running since "
                           f"{_hms(cur.started)}; runs of a schedule never overlap")))
                continue
            if s.current is not None:
                continue  # it ends in this very tick; the next tick starts the new run
            h = self.s.hosts.get(s.source)
            if h is None or not h.alive:
                # Give the source a moment (after a center restart every daemon
                # first has to send a heartbeat) before giving up on this run.
                waited = now - max(s.next_due, self.recovered_at or s.next_due)
                if waited < 2 * self.s.t.heartbeat_timeout:
                    continue
                since = f" since {_hms(h.last_seen)}" if h is not None and h.last_seen else ""
                out.append(Commit(ScheduleSkipped(
                    name=name, due=s.next_due, missed=missed,
                    reason=f"source daemon {s.source} is not alive{since}")))
                continue
            out.append(Commit(ScheduleRunStarted(name=name, run=s.runs + 1, due=s.next_due,
                                                 missed=missed)))
        return out

    def _check_current(self, s: Schedule, cur: Run, now: float) -> list[Action]:
        if cur.job:
            # Normally the job's end is seen as it happens; this catches a
            # crash between the job ending and the run's outcome being logged.
            job = self.s.jobs.get(cur.job)
            if job is None or job.state != "running":
                end = self._job_outcome(s)
                return [Commit(end)] if end is not None else []
            return []
        limit = START_TIMEOUT
        since = cur.started
        if self.recovered_at is not None and cur.started < self.recovered_at:
            limit, since = RESTART_START_TIMEOUT, self.recovered_at
        if now - since > limit:
            why = ("the center restarted during the run and the source daemon did not submit "
                   "its job" if since != cur.started else
                   f"the source daemon {s.source} did not submit the run's job")
            return [Commit(ScheduleRunEnded(name=s.name, run=cur.run, result="failed",
                                            reason=f"{why} within {limit:.0f} s"))]
        return []

    # ------------------------------------------------------------------ durable state

    def snapshot(self) -> dict[str, Any]:
        out = {}
        for name in sorted(self.items):
            s = self.items[name]
            out[name] = {"every": s.every, "cron": s.cron, "source": s.source,
                         "machines": list(s.machines), "paths": list(s.paths), "dest": s.dest,
                         "notify": s.notify, "created": s.created, "next_due": s.next_due,
                         "runs": s.runs,
                         "current": s.current.to_json() if s.current is not None else None,
                         "last_ok": dict(sorted(s.last_ok.items())),
                         "last_ok_targets": list(s.last_ok_targets),
                         "last_ok_run": s.last_ok_run, "history": list(s.history)}
        return out

    def restore(self, snap: dict[str, Any]) -> None:
        self.items.clear()
        self.by_job.clear()
        for name, d in snap.items():
            s = Schedule(name=name, every=d["every"], cron=d["cron"], source=d["source"],
                         machines=tuple(d["machines"]), paths=tuple(d["paths"]),
                         dest=d["dest"], notify=d["notify"], created=d["created"],
                         next_due=d["next_due"], runs=d["runs"],
                         last_ok=dict(d["last_ok"]),
                         last_ok_targets=tuple(d["last_ok_targets"]),
                         last_ok_run=d["last_ok_run"],
                         parsed=cronlib.parse(d["cron"]) if d["cron"] else None)
            s.history.extend(d["history"])
            c = d["current"]
            if c is not None:
                s.current = Run(run=c["run"], due=c["due"], started=c["started"],
                                missed=c["missed"], job=c["job"], nbytes=c["nbytes"])
                if s.current.job:
                    self.by_job[s.current.job] = name
            self.items[name] = s

    # ------------------------------------------------------------------ views

    def view(self, name: str, now: float) -> dict[str, Any]:
        s = self.items.get(name)
        if s is None:
            raise NotFound(f"no schedule named {name!r} (fdship schedule list shows them)")
        last = s.history[-1] if s.history else None
        cur = s.current
        return {"name": s.name, "every": s.every or None, "cron": s.cron or None,
                "source": s.source, "machines": list(s.machines), "files": list(s.paths),
                "dest": s.dest or None, "notify": s.notify or None, "created": iso(s.created),
                "next_due": iso(s.next_due), "runs": s.runs,
                "running": None if cur is None else {
                    "run": cur.run, "started": iso(cur.started), "job": cur.job or None,
                    "bytes": cur.nbytes, "missed": cur.missed},
                "last": None if last is None else _entry_view(last),
                "last_ok_run": s.last_ok_run or None}

    def list_view(self, now: float) -> dict[str, Any]:
        return {"schedules": [self.view(n, now) for n in sorted(self.items)]}

    def history_view(self, name: str, limit: int = 50) -> dict[str, Any]:
        s = self.items.get(name)
        if s is None:
            raise NotFound(f"no schedule named {name!r} (fdship schedule list shows them)")
        entries: Iterable[dict[str, Any]] = list(s.history)[-limit:] if limit > 0 else []
        return {"name": name, "history": [_entry_view(e) for e in reversed(list(entries))]}


def _entry_view(e: dict[str, Any]) -> dict[str, Any]:
    return {"run": e["run"], "due": iso(e["due"]), "start": iso(e["started"]),
            "end": iso(e["ended"]),
            "seconds": round(e["ended"] - e["started"], 3) if e["ended"] is not None else None,
            "result": e["result"], "job": e["job"], "bytes": e["bytes"], "reason": e["reason"],
            "missed": e["missed"]}
