"""Events: past-tense facts the scheduler core is told about.

Two kinds, and the difference matters for recovery:

* **Durable** events change the state that must survive a crash (jobs, which
  chunks each machine holds, which files landed, terminal outcomes).  The
  center appends them to the REDO log, with the time they happened, before it
  acts on them; replaying the log through ``Scheduler.handle`` rebuilds exactly
  the same durable state.
* **Soft** events (load reports, fetch failures, ticks) only touch soft state:
  liveness, in-flight assignments, retry counters.  They are never logged.
  When one of them leads to a durable decision (a machine fails after too many
  attempts), the core does not apply it directly: it returns a ``Commit``
  action carrying a durable event, which the runner logs and feeds back.

Every event serialises to a plain dict (``to_record``) for the log.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from fdship.protocol import FileSpec, Heartbeat, Holding


@dataclass(frozen=True)
class Event:
    durable: ClassVar[bool] = False
    kind: ClassVar[str] = ""

    def to_record(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        out: dict[str, Any] = {"type": self.kind}
        for k, v in d.items():
            if k == "files":
                v = [f.to_json() for f in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[k] = v
        return out


# --- durable events (REDO records) ----------------------------------------------


@dataclass(frozen=True)
class HostRegistered(Event):
    """A daemon was seen for the first time, or its address, labels or boot changed."""

    durable: ClassVar[bool] = True
    kind: ClassVar[str] = "HOST"
    name: str
    address: str
    labels: tuple[str, ...]
    boot_id: str


@dataclass(frozen=True)
class JobSubmitted(Event):
    """JOB: a job was accepted.  ``failed`` holds machines refused at admission
    (e.g. not enough free space), decided once from the load reports of that moment."""

    durable: ClassVar[bool] = True
    kind: ClassVar[str] = "JOB"
    job: str
    source: str
    files: tuple[FileSpec, ...]
    targets: tuple[str, ...]
    chunk_size: int
    callback: str = ""
    notify: str = ""
    failed: tuple[tuple[str, str], ...] = ()
    # "NAME#RUN" when a schedule's run submitted this job (fdship.core.schedules).
    schedule: str = ""


@dataclass(frozen=True)
class ChunkStored(Event):
    """ACK: ``host`` holds chunk ``chunk`` of file ``file`` verified on disk."""

    durable: ClassVar[bool] = True
    kind: ClassVar[str] = "ACK"
    job: str
    host: str
    file: int
    chunk: int
    peer: str = ""
    nbytes: int = 0
    # How long the bytes took on the wire, timed by the target (connect,
    # request, body); 0 when it did not say.  The center's own view (assign
    # to ack) adds the pull and ack round trips and any wait behind the
    # target's previous chunk, and so reads a link at a fraction of its speed.
    seconds: float = 0.0


@dataclass(frozen=True)
class ChunksLost(Event):
    """Chunks the center recorded for a host are no longer there (reconciliation,
    or a file whose whole-file hash failed at pack time)."""

    durable: ClassVar[bool] = True
    kind: ClassVar[str] = "LOST"
    job: str
    host: str
    file: int
    chunks: tuple[int, ...]
    reason: str = ""


@dataclass(frozen=True)
class FilePacked(Event):
    """FIN: ``host`` verified, fsynced and renamed file ``file`` into place."""

    durable: ClassVar[bool] = True
    kind: ClassVar[str] = "FIN"
    job: str
    host: str
    file: int


@dataclass(frozen=True)
class HookFinished(Event):
    """The notify hook of a job ran on ``host`` after all its files landed."""

    durable: ClassVar[bool] = True
    kind: ClassVar[str] = "HOOK"
    job: str
    host: str
    ok: bool
    error: str = ""
    detail: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class MachineFailed(Event):
    """A machine's part of a job ended in failure, for the reason given."""

    durable: ClassVar[bool] = True
    kind: ClassVar[str] = "MFAIL"
    job: str
    host: str
    reason: str


@dataclass(frozen=True)
class CallbackDelivered(Event):
    """The outcome of delivering a job's result to its callback URL."""

    durable: ClassVar[bool] = True
    kind: ClassVar[str] = "CALLBACK"
    job: str
    ok: bool
    attempts: int
    error: str = ""


@dataclass(frozen=True)
class JobsExpired(Event):
    """Finished jobs older than the retention were dropped."""

    durable: ClassVar[bool] = True
    kind: ClassVar[str] = "EXPIRE"
    jobs: tuple[str, ...]


# --- soft events ------------------------------------------------------------------


@dataclass(frozen=True)
class HostReported(Event):
    """A heartbeat arrived (load, free space, caps; inventory when registering)."""

    kind: ClassVar[str] = "BEAT"
    beat: Heartbeat


@dataclass(frozen=True)
class FetchFailed(Event):
    """A target could not fetch a chunk from a peer (a nack)."""

    kind: ClassVar[str] = "NACK"
    job: str
    host: str
    file: int
    chunk: int
    peer: str
    fail: str  # one of protocol.FAIL_*
    error: str


@dataclass(frozen=True)
class FetchDraining(Event):
    """A fetch is about to finish: ``host`` has all but its last few
    milliseconds' worth of bytes of the chunk from ``peer``.

    The chunk is not held yet (it is neither complete nor verified), but the
    two links it uses are about to fall idle.  Telling the center now, one
    round trip early, lets it hand both ends their next transfer so the bytes
    of the next chunk start to flow as the last ones of this chunk arrive,
    instead of a round trip later (``Scheduler._on_FetchDraining``).
    """

    kind: ClassVar[str] = "DRAIN"
    job: str
    host: str
    file: int
    chunk: int
    peer: str


@dataclass(frozen=True)
class PackFailed(Event):
    """A target could not install a file: ``kind`` 'integrity' (refetch) or 'local'."""

    kind: ClassVar[str] = "PACKFAIL"
    job: str
    host: str
    file: int
    fail: str
    error: str


@dataclass(frozen=True)
class CommandUndelivered(Event):
    """The center could not deliver a pull or pack to ``host`` (it is unreachable)."""

    kind: ClassVar[str] = "UNDELIVERED"
    job: str
    host: str
    fetches: tuple[tuple[int, int], ...] = ()  # (file, chunk) of an undelivered pull
    pack_file: int = -1
    error: str = ""


@dataclass(frozen=True)
class Tick(Event):
    """Time passed: check timeouts, backoffs, dead hosts, grace periods."""

    kind: ClassVar[str] = "TICK"


@dataclass(frozen=True)
class Recovered(Event):
    """The center (re)started after replaying its log: soft state starts over."""

    kind: ClassVar[str] = "RECOVERED"


# --- schedules (fdship.core.schedules) ---------------------------------------------------


@dataclass(frozen=True)
class ScheduleAdded(Event):
    """A schedule was defined: ship ``paths`` from ``source`` to ``machines`` every
    ``every`` seconds (first run at once) or whenever ``cron`` matches."""

    durable: ClassVar[bool] = True
    kind: ClassVar[str] = "SCHED_ADD"
    name: str
    every: float
    cron: str
    source: str
    machines: tuple[str, ...]
    paths: tuple[str, ...]
    dest: str = ""
    notify: str = ""


@dataclass(frozen=True)
class ScheduleRemoved(Event):
    durable: ClassVar[bool] = True
    kind: ClassVar[str] = "SCHED_RM"
    name: str


@dataclass(frozen=True)
class ScheduleRunStarted(Event):
    """Run ``run`` of a schedule began for the time ``due``; ``missed`` earlier due
    times (center downtime) collapse into it."""

    durable: ClassVar[bool] = True
    kind: ClassVar[str] = "SCHED_RUN"
    name: str
    run: int
    due: float
    missed: int = 0


@dataclass(frozen=True)
class ScheduleSkipped(Event):
    """A due run of a schedule did not start, for ``reason``."""

    durable: ClassVar[bool] = True
    kind: ClassVar[str] = "SCHED_SKIP"
    name: str
    due: float
    reason: str
    missed: int = 0


@dataclass(frozen=True)
class ScheduleRunEnded(Event):
    """The outcome of run ``run``: done, failed or skipped (files unchanged).

    A done run records its files' hashes and targets, so the next run can skip
    unchanged files without moving a byte."""

    durable: ClassVar[bool] = True
    kind: ClassVar[str] = "SCHED_END"
    name: str
    run: int
    result: str
    reason: str = ""
    job: str = ""
    nbytes: int = 0
    hashes: tuple[tuple[str, str], ...] = ()
    targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScheduleStartFailed(Event):
    """The source daemon did not start a run's job: its files were unchanged
    (``unchanged``) or it could not (``reason``).  Soft: the core decides."""

    kind: ClassVar[str] = "SCHED_NOSTART"
    name: str
    run: int
    reason: str
    unchanged: bool = False


DURABLE_TYPES: dict[str, type[Event]] = {
    c.kind: c for c in (HostRegistered, JobSubmitted, ChunkStored, ChunksLost, FilePacked,
                        HookFinished, MachineFailed, CallbackDelivered, JobsExpired,
                        ScheduleAdded, ScheduleRemoved, ScheduleRunStarted, ScheduleSkipped,
                        ScheduleRunEnded)
}


def from_record(rec: dict[str, Any]) -> Event:
    """Inverse of ``Event.to_record`` for durable events (REDO replay)."""
    cls = DURABLE_TYPES[rec["type"]]
    kw: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in rec:
            continue
        v = rec[f.name]
        if f.name == "files":
            v = tuple(FileSpec.from_json(x) for x in v)
        elif f.name in ("failed", "detail", "hashes"):
            v = tuple(tuple(x) for x in v)
        elif isinstance(v, list):
            v = tuple(v)
        kw[f.name] = v
    return cls(**kw)


__all__ = [n for n in dir() if not n.startswith("_")] + ["asdict", "field", "Holding"]
