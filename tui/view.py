"""The TUI's pure view model: what the center said, turned into rows for people.

``fdship-tui`` watches the center's read API (``GET /center/jobs``,
``/center/jobs/ID``, ``/center/hosts`` and the ``/center/events`` stream, see
``docs/protocol.md``).  :mod:`tui.source` fetches those JSON documents,
:class:`ClusterView` below folds them into one current picture, and the
Textual screens in :mod:`tui.screens` only copy the rows this module computes
into tables.

Nothing here imports Textual, Tornado or asyncio, reads the wall clock or does
I/O: the current time is an argument, so every row, percentage, ETA and sort
order is unit-tested with plain data.  Styling is expressed as a *severity*
(``ok``, ``busy``, ``idle``, ``fail``) that the widgets map to colours.

Memory is bounded whatever the center sends: the job list, the per-job
machine tables and the per-host NIC history each have a cap.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# --- human formatting ---------------------------------------------------------

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float | None, short: bool = False) -> str:
    """1536 -> '1.50 KiB' (or '1.50K' when ``short``).  Binary units, like the config's sizes."""
    if n is None or _bad(n):
        return "-"
    n = float(n)
    if n < 0:
        return "-" + human_bytes(-n, short)
    if n < 1024:
        return f"{int(n)}B" if short else f"{int(n)} B"
    for unit in _BYTE_UNITS[1:]:
        n /= 1024.0
        name = unit[0] if short else " " + unit
        # Three significant digits; move up a unit before '1024 KiB' can show.
        if n < 9.995:
            return f"{n:.2f}{name}"
        if n < 99.95:
            return f"{n:.1f}{name}"
        if n < 1023.5 or unit == _BYTE_UNITS[-1]:
            return f"{n:.0f}{name}"
    raise AssertionError("unreachable: the last unit always returns")  # pragma: no cover


def human_rate(bps: float | None, short: bool = False) -> str:
    """Bytes per second -> '81.2 MiB/s' (or '81.2M' when ``short``); unknown -> '-'."""
    if bps is None or _bad(bps):
        return "-"
    return human_bytes(bps, short) + ("" if short else "/s")


def human_duration(seconds: float | None) -> str:
    """Seconds -> '9s', '1m05s', '2h03m', '3d04h'; unknown -> '-'.

    Two units at most: a person glancing at a table wants the order of
    magnitude, and the column stays narrow.
    """
    if seconds is None or _bad(seconds):
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def human_percent(fraction: float | None) -> str:
    """0.423 -> '42%'.  Rounds down so '100%' means the work really is complete."""
    if fraction is None or _bad(fraction):
        return "-"
    f = min(max(float(fraction), 0.0), 1.0)
    pct = math.floor(f * 100)
    # 0.999 is still running: never print '100%' before the last byte is in.
    return f"{pct if f >= 1.0 else min(pct, 99)}%"


def progress_bar(fraction: float | None, width: int = 10) -> str:
    """A text bar with eighth-block resolution: 0.5 -> '█████     '."""
    if fraction is None or _bad(fraction) or width <= 0:
        return " " * max(width, 0)
    f = min(max(float(fraction), 0.0), 1.0)
    eighths = int(f * width * 8)
    full, part = divmod(eighths, 8)
    bar = "█" * full
    if full < width:
        bar += " ▏▎▍▌▋▊▉"[part] if part else " "
        bar += " " * (width - full - 1)
    return bar


def parse_time(value: Any) -> float | None:
    """An ISO 8601 timestamp ('2026-11-22T10:00:00Z') -> POSIX seconds, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        # The center writes UTC; a timestamp without a zone is still UTC.
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def ellipsize(text: str, width: int) -> str:
    """Cut ``text`` to ``width`` characters, marking the cut with '…'."""
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def _bad(x: Any) -> bool:
    try:
        return not math.isfinite(float(x))
    except (TypeError, ValueError):
        return True


def _num(d: Mapping[str, Any], key: str, default: float | None = None) -> float | None:
    v = d.get(key)
    if v is None or isinstance(v, bool) or _bad(v):
        return default
    return float(v)


def _int(d: Mapping[str, Any], key: str, default: int = 0) -> int:
    v = _num(d, key)
    return default if v is None else int(v)


# --- sparklines -----------------------------------------------------------------

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int, top: float | None = None) -> str:
    """The last ``width`` values as block characters scaled to ``top`` (default: their max).

    Left-padded with spaces so a young history lines up on the right, where
    'now' is.  All-zero traffic draws the lowest bar, not nothing, so a live
    idle host is told apart from one with no samples yet.
    """
    if width <= 0:
        return ""
    vals = [max(0.0, float(v)) if not _bad(v) else 0.0 for v in list(values)[-width:]]
    if not vals:
        return " " * width
    peak = top if top and top > 0 else max(vals)
    out = []
    for v in vals:
        if peak <= 0:
            out.append(SPARK_BLOCKS[0])
        else:
            idx = round(v / peak * (len(SPARK_BLOCKS) - 1))
            out.append(SPARK_BLOCKS[min(max(idx, 0), len(SPARK_BLOCKS) - 1)])
    return " " * (width - len(out)) + "".join(out)


class HostHistory:
    """A bounded ring buffer of one host's NIC rates (bytes/s, tx and rx)."""

    def __init__(self, size: int = 60) -> None:
        if size < 1:
            raise ValueError("history size must be at least 1")
        self.tx: deque[float] = deque(maxlen=size)
        self.rx: deque[float] = deque(maxlen=size)

    def add(self, tx: float | None, rx: float | None) -> None:
        self.tx.append(float(tx or 0.0))
        self.rx.append(float(rx or 0.0))

    def __len__(self) -> int:
        return len(self.tx)

    def total(self) -> list[float]:
        """tx + rx per sample: one line that shows the host working either way."""
        return [a + b for a, b in zip(self.tx, self.rx, strict=True)]

    def spark(self, width: int) -> str:
        return sparkline(self.total(), width)


# --- rows ---------------------------------------------------------------------------

# Severity drives colour in the widgets: fail is red, busy yellow-ish, ok green.
OK, BUSY, IDLE, FAIL = "ok", "busy", "idle", "fail"

JOB_STATES = ("running", "done", "failed")
MACHINE_STATES = ("pending", "fetching", "packing", "done", "failed")
# Failures first, then the work in flight, then what waits, then what is over.
_MACHINE_ORDER = {"failed": 0, "fetching": 1, "packing": 2, "pending": 3, "done": 4}


@dataclass(frozen=True)
class JobRow:
    """One line of the Jobs screen."""

    job: str
    state: str
    severity: str
    progress: float | None
    percent: str
    bar: str
    done: int
    failed: int
    running: int
    total: int
    machines: str  # "48/50" (done/total)
    rate: str
    size: str
    age: str
    source: str
    created: float | None


@dataclass(frozen=True)
class MachineRow:
    """One line of the Job screen: a target machine's part of the job."""

    machine: str
    state: str
    severity: str
    progress: float | None
    percent: str
    chunks: str  # "12/256"
    bytes: str  # "48.0 MiB/1.00 GiB"
    rate: str
    eta: str
    took: str  # how long the machine took once done, else '-'
    attempts: int
    error: str  # the full reason, never cut here: the widget decides how much fits
    last_error: str  # why the latest attempt failed, while the machine still retries


@dataclass(frozen=True)
class HostRow:
    """One line of the Hosts screen."""

    name: str
    address: str
    labels: str
    alive: bool
    severity: str
    status: str  # "up" / "DEAD"
    cpu: str
    tx: str
    rx: str
    spark: str
    free: str
    inflight: str  # "↑1 ↓2"
    heartbeat: str  # age of the last heartbeat
    version: str
    # What the scheduler steers by (docs/protocol.md, GET /center/hosts); '-'
    # for a dead host, an older center or daemon, or a value that makes no sense.
    app_cpu: str  # "97%": the watched app (watch_pidfile), percent of one core
    app_busy_at: str  # "75%": the app CPU that counts as fully busy
    busyness: str  # "0.35": 0 idle .. 1 busy
    busy_severity: str  # BUSY from BUSY_AT on, OK below, IDLE when unknown
    link: str  # "↑9.35M ↓?": learned up/down link, '?' while not measured
    slow: bool  # the scheduler treats the host as slow
    link_severity: str  # BUSY when slow, OK when known, IDLE when unknown
    steering: str  # what busy or slow costs the host, for the detail panel; else ''
    caps: str = ""  # the daemon's rate caps, for the detail panel; '' without any


@dataclass(frozen=True)
class JobHeader:
    """The summary lines above a job's machine table."""

    job: str
    state: str
    severity: str
    percent: str
    bar: str
    source: str
    files: str
    size: str
    rate: str
    machines: str  # "48 done, 2 failed, 0 running of 50"
    created: str  # age, e.g. "3m05s ago"
    took: str  # duration once finished, else '-'
    callback: str


def job_row(job: Mapping[str, Any], now: float) -> JobRow:
    """A job summary (``GET /center/jobs`` item or ``job`` event) -> a row."""
    counts = _counts(job)
    state = str(job.get("state") or "running")
    progress = _progress(job)
    created = parse_time(job.get("created"))
    failed = counts["failed"]
    if state == "failed" or failed:
        severity = FAIL
    elif state == "done":
        severity = OK
    else:
        severity = BUSY
    return JobRow(
        job=str(job.get("job", "?")),
        state=state,
        severity=severity,
        progress=progress,
        percent=human_percent(progress),
        bar=progress_bar(progress, 8),
        done=counts["done"],
        failed=failed,
        running=counts["running"],
        total=counts["total"],
        machines=f"{counts['done']}/{counts['total']}",
        rate=human_rate(_num(job, "rate")) if state == "running" else "-",
        size=human_bytes(_num(job, "bytes_total")),
        age=human_duration(now - created) if created is not None else "-",
        source=str(job.get("source") or ""),
        created=created,
    )


def machine_row(name: str, m: Mapping[str, Any]) -> MachineRow:
    """A machine entry of ``GET /center/jobs/ID`` (or a ``machine`` event) -> a row."""
    state = str(m.get("state") or "pending")
    bytes_done = _num(m, "bytes_done")
    bytes_total = _num(m, "bytes_total")
    chunks_done = _num(m, "chunks_done")
    chunks_total = _num(m, "chunks_total")
    if state == "done":
        progress: float | None = 1.0
    elif bytes_total:
        progress = (bytes_done or 0.0) / bytes_total
    elif chunks_total:
        progress = (chunks_done or 0.0) / chunks_total
    else:
        progress = _num(m, "progress")
    rate = _num(m, "rate")
    active = state in ("fetching", "packing")
    eta = _num(m, "eta")
    if eta is None and active and rate and bytes_total is not None:
        eta = max(0.0, bytes_total - (bytes_done or 0.0)) / rate
    eta_text = human_duration(eta) if active else "-"
    severity = {"failed": FAIL, "done": OK, "pending": IDLE}.get(state, BUSY)
    chunks = (f"{int(chunks_done or 0)}/{int(chunks_total)}" if chunks_total is not None
              else "-")
    size = (f"{human_bytes(bytes_done or 0)}/{human_bytes(bytes_total)}"
            if bytes_total is not None else "-")
    return MachineRow(
        machine=name,
        state=state,
        severity=severity,
        progress=progress,
        percent=human_percent(progress),
        chunks=chunks,
        bytes=size,
        # Packing moves no bytes; a '0 B/s' there would read as a stall.
        rate=human_rate(rate) if state == "fetching" else "-",
        eta=eta_text,
        took=human_duration(_num(m, "seconds")),
        attempts=_int(m, "attempts"),
        error=str(m.get("error") or ""),
        last_error=str(m.get("last_error") or "") if state != "failed" else "",
    )


# From this busyness on the center no longer volunteers a host's free upload
# slots (fdship.core.placement.volunteers): the level worth a colour.
BUSY_AT = 0.5
# What the scheduler does about it (fdship/core/placement.py, the scheduler's
# slow-target rule), short enough that both fit one line of an 80-column panel.
_BUSY_MEANS = "busy: fewer uploads, no volunteering"
_SLOW_MEANS = "slow: common chunks, not first copies"


def _busyness(h: Mapping[str, Any]) -> float | None:
    """The center's busyness of a host (0 idle .. 1 busy), None when absent or nonsense."""
    b = _num(h, "busyness")
    return b if b is not None and b >= 0 else None


def _link(h: Mapping[str, Any]) -> Mapping[str, Any] | None:
    link = h.get("link")
    return link if isinstance(link, Mapping) else None


def _is_busy(h: Mapping[str, Any]) -> bool:
    b = _busyness(h)
    return b is not None and b >= BUSY_AT


def _is_slow(h: Mapping[str, Any]) -> bool:
    link = _link(h)
    return link is not None and link.get("slow") is True


def _link_speed(link: Mapping[str, Any], key: str) -> str:
    """One direction of a learned link: '9.35M' (bytes/s), '?' while unknown (0)."""
    rate = _num(link, key)
    # 0 is the center's "not measured yet"; a negative or garbage rate is no
    # better known than that.
    return human_rate(rate, short=True) if rate is not None and rate > 0 else "?"


def _link_caps(link: Mapping[str, Any]) -> str:
    """The daemon's own rate caps, for the panel: '' without any, else e.g.
    'caps ↑- ↓1.00M (↓ not measured: the cap is the estimate)'."""
    caps = {d: _num(link, f"{d}_cap") for d in ("up", "down")}
    if not any(c is not None and c > 0 for c in caps.values()):
        return ""
    text = "caps " + " ".join(
        f"{arrow}{human_rate(c, short=True) if c is not None and c > 0 else '-'}"
        for arrow, c in (("↑", caps["up"]), ("↓", caps["down"])))
    measured = link.get("measured")
    if isinstance(measured, Mapping):
        # Centers from before caps were reported send no 'measured'.
        guessed = [arrow for arrow, d in (("↑", "up"), ("↓", "down"))
                   if measured.get(d) is False and (caps[d] or 0) > 0]
        if guessed:
            text += f" ({' '.join(guessed)} not measured: the cap is the estimate)"
    return text


def host_row(h: Mapping[str, Any], history: HostHistory | None, now: float,
             spark_width: int = 12) -> HostRow:
    """A host entry of ``GET /center/hosts`` (or a ``host`` event) -> a row."""
    load = h.get("load") if isinstance(h.get("load"), Mapping) else {}
    assert isinstance(load, Mapping)
    alive = bool(h.get("alive", False))
    free = h.get("free") if isinstance(h.get("free"), Mapping) else {}
    assert isinstance(free, Mapping)
    # The tightest file system is the one that will fail a job first.
    spaces = [float(v) for v in free.values() if not isinstance(v, bool) and not _bad(v)]
    cpu = _num(load, "cpu")
    age = _num(h, "heartbeat_age")
    if age is None:
        last = parse_time(h.get("last_heartbeat"))
        age = now - last if last is not None else None
    labels = h.get("labels") or []
    # Absent from older daemons' heartbeats; 0 means nothing watched or running.
    app = _num(load, "app_cpu")
    app_busy = _num(load, "app_cpu_busy")
    busy = _busyness(h) if alive else None
    is_busy = alive and _is_busy(h)
    link = _link(h) if alive else None
    slow = alive and _is_slow(h)
    if link is None:
        link_text, link_severity = "-", IDLE
    else:
        link_text = f"↑{_link_speed(link, 'up')} ↓{_link_speed(link, 'down')}"
        link_severity = OK
        if slow:
            link_text += " slow"
            link_severity = BUSY
    return HostRow(
        name=str(h.get("name", "?")),
        address=str(h.get("address") or ""),
        labels=",".join(str(x) for x in labels) if isinstance(labels, list) else "",
        alive=alive,
        severity=OK if alive else FAIL,
        status="up" if alive else "DEAD",
        # A dead host's last load report is history, not its current state.
        cpu=f"{cpu:.0f}%" if cpu is not None and alive else "-",
        tx=human_rate(_num(load, "net_tx"), short=True) if alive else "-",
        rx=human_rate(_num(load, "net_rx"), short=True) if alive else "-",
        spark=history.spark(spark_width) if history is not None else " " * spark_width,
        free=human_bytes(min(spaces), short=True) if spaces else "-",
        inflight=f"↑{_int(load, 'uploads')} ↓{_int(load, 'downloads')}" if alive else "-",
        heartbeat=human_duration(age) if age is not None else "-",
        version=str(h.get("version") or ""),
        app_cpu=f"{app:.0f}%" if app is not None and app > 0 and alive else "-",
        app_busy_at=f"{app_busy:.0f}%" if app_busy is not None and app_busy > 0 else "-",
        busyness=f"{busy:.2f}" if busy is not None else "-",
        busy_severity=IDLE if busy is None else BUSY if is_busy else OK,
        link=link_text,
        slow=slow,
        link_severity=link_severity,
        steering="; ".join(([_BUSY_MEANS] if is_busy else []) + ([_SLOW_MEANS] if slow else [])),
        caps=_link_caps(link) if link is not None else "",
    )


def job_header(job: Mapping[str, Any], now: float) -> JobHeader:
    row = job_row(job, now)
    finished = parse_time(job.get("finished"))
    took = (human_duration(finished - row.created)
            if finished is not None and row.created is not None else "-")
    files = job.get("files")
    nfiles = len(files) if isinstance(files, list) else _int(job, "files")
    cb = job.get("callback")
    callback = ""
    if isinstance(cb, Mapping) and cb.get("url"):
        callback = f"{cb.get('url')} ({cb.get('state') or 'pending'})"
        if cb.get("error"):
            callback += f": {cb.get('error')}"
    return JobHeader(
        job=row.job,
        state=row.state,
        severity=row.severity,
        percent=row.percent,
        bar=progress_bar(row.progress, 20),
        source=row.source or "-",
        files=f"{nfiles} file" + ("" if nfiles == 1 else "s"),
        size=row.size,
        rate=row.rate,
        machines=(f"{row.done} done, {row.failed} failed, {row.running} running"
                  f" of {row.total}"),
        created=f"{row.age} ago" if row.age != "-" else "-",
        took=took,
        callback=callback,
    )


def _counts(job: Mapping[str, Any]) -> dict[str, int]:
    """Machine counts of a job, from the summary's counts or the detail's rows."""
    m = job.get("machines")
    out = {"total": 0, "done": 0, "failed": 0, "running": 0}
    if isinstance(m, Mapping) and m and all(isinstance(v, Mapping) for v in m.values()):
        # A detailed job: machine name -> row.
        out["total"] = len(m)
        for row in m.values():
            st = row.get("state")
            if st == "done":
                out["done"] += 1
            elif st == "failed":
                out["failed"] += 1
            else:
                out["running"] += 1
        return out
    if isinstance(m, Mapping):
        for k in out:
            v = m.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                out[k] = v
        if not out["total"]:
            out["total"] = out["done"] + out["failed"] + out["running"]
    return out


def _progress(job: Mapping[str, Any]) -> float | None:
    p = _num(job, "progress")
    if p is not None:
        return p
    total = _num(job, "bytes_total")
    if total:
        return (_num(job, "bytes_done") or 0.0) / total
    if job.get("state") == "done":
        return 1.0
    return None


# --- sorting and filtering ------------------------------------------------------------


def sort_jobs(rows: Iterable[JobRow]) -> list[JobRow]:
    """Newest first.  Ids sort by creation time, so they break ties the same way."""
    return sorted(rows, key=lambda r: (r.created if r.created is not None else -math.inf,
                                       r.job), reverse=True)


def sort_machines(rows: Iterable[MachineRow]) -> list[MachineRow]:
    """Failures first (they need a person), then work in flight, then the rest by name."""
    return sorted(rows, key=lambda r: (_MACHINE_ORDER.get(r.state, 5), r.machine))


def sort_hosts(rows: Iterable[HostRow]) -> list[HostRow]:
    """Dead hosts first, then by name."""
    return sorted(rows, key=lambda r: (r.alive, r.name))


def failures_only(rows: Iterable[Any]) -> list[Any]:
    """Keep rows whose severity is 'fail' (failed jobs, failed machines, dead hosts)."""
    return [r for r in rows if r.severity == FAIL]


# --- the folded picture ----------------------------------------------------------------------


def machine_name(data: Mapping[str, Any]) -> str | None:
    """The machine a ``machine`` event is about; the field name is tolerated loosely."""
    for key in ("machine", "name", "host"):
        v = data.get(key)
        if isinstance(v, str) and v:
            return v
    return None


@dataclass
class Changes:
    """What an update touched, so screens redraw only when their data moved."""

    jobs: bool = False
    hosts: bool = False
    job_ids: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return self.jobs or self.hosts or bool(self.job_ids)

    def merge(self, other: Changes) -> None:
        self.jobs |= other.jobs
        self.hosts |= other.hosts
        self.job_ids |= other.job_ids


class ClusterView:
    """The center's state as the TUI knows it: snapshots and events folded in order.

    Every event carries a whole row (a job summary, a machine row, a host row),
    so folding is an upsert and replaying an event twice is harmless; that is
    what lets the source resume a stream with ``since=`` after a reconnect.
    """

    def __init__(self, max_jobs: int = 500, max_details: int = 16,
                 history_size: int = 60) -> None:
        self.max_jobs = max_jobs
        self.max_details = max_details
        self.history_size = history_size
        self.jobs: dict[str, dict[str, Any]] = {}
        # Job id -> {"job": summary-ish fields, "machines": {name: row}}; LRU-bounded
        # because a job of 10,000 machines is big and only a few are looked at.
        self.details: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.hosts: dict[str, dict[str, Any]] = {}
        self.history: dict[str, HostHistory] = {}
        self.events = 0  # events folded, for the status line

    # -- input -------------------------------------------------------------------------

    def load_snapshot(self, jobs: Sequence[Mapping[str, Any]],
                      hosts: Sequence[Mapping[str, Any]]) -> Changes:
        """Replace jobs and hosts with a fresh full state (after connecting or reconnecting).

        Jobs missing from the snapshot but still held in detail are kept in the
        detail cache (a screen may be showing one) and dropped from the list.
        """
        self.jobs = {}
        for j in jobs:
            if isinstance(j, Mapping) and isinstance(j.get("job"), str):
                self.jobs[j["job"]] = dict(j)
        self._trim_jobs()
        self.hosts = {}
        for h in hosts:
            if isinstance(h, Mapping) and isinstance(h.get("name"), str):
                self._put_host(h)
        for name in list(self.history):
            if name not in self.hosts:
                del self.history[name]
        for job_id, d in self.details.items():
            if job_id in self.jobs:
                d["job"].update(self.jobs[job_id])
        return Changes(jobs=True, hosts=True, job_ids=set(self.details))

    def load_job(self, detail: Mapping[str, Any]) -> Changes:
        """Fold a ``GET /center/jobs/ID`` answer: the job plus every machine row."""
        job_id = detail.get("job")
        if not isinstance(job_id, str):
            return Changes()
        machines = detail.get("machines")
        rows: dict[str, dict[str, Any]] = {}
        if isinstance(machines, Mapping):
            for name, m in machines.items():
                if isinstance(m, Mapping):
                    rows[str(name)] = dict(m)
        summary = {k: v for k, v in detail.items() if k != "machines"}
        d = self._detail(job_id)
        d["job"].update(summary)
        d["machines"] = rows
        d["loaded"] = True
        if job_id in self.jobs:
            # Keep the list's counts; refresh what the detail knows better.
            for k in ("state", "finished", "progress", "rate", "bytes_done", "bytes_total"):
                if k in summary:
                    self.jobs[job_id][k] = summary[k]
        else:
            self.jobs[job_id] = {**summary, "machines": _counts(detail)}
            self._trim_jobs()
        return Changes(jobs=True, job_ids={job_id})

    def apply(self, kind: str, data: Any) -> Changes:
        """Fold one event of the ``/center/events`` stream; unknown kinds are ignored."""
        if not isinstance(data, Mapping):
            return Changes()
        self.events += 1
        if kind == "job":
            job_id = data.get("job")
            if not isinstance(job_id, str):
                return Changes()
            old = self.jobs.get(job_id, {})
            self.jobs[job_id] = {**old, **data}
            self._trim_jobs()
            ch = Changes(jobs=True)
            if job_id in self.details:
                self.details[job_id]["job"].update(
                    {k: v for k, v in data.items() if k != "machines"})
                ch.job_ids.add(job_id)
            return ch
        if kind == "machine":
            job_id = data.get("job")
            name = machine_name(data)
            if not isinstance(job_id, str) or name is None:
                return Changes()
            d = self._detail(job_id)
            old = d["machines"].get(name, {})
            d["machines"][name] = {**old, **data}
            return Changes(job_ids={job_id})
        if kind == "host":
            if not isinstance(data.get("name"), str):
                return Changes()
            self._put_host(data)
            return Changes(hosts=True)
        self.events -= 1
        return Changes()

    def _put_host(self, h: Mapping[str, Any]) -> None:
        name = str(h["name"])
        self.hosts[name] = dict(h)
        load = h.get("load") if isinstance(h.get("load"), Mapping) else None
        hist = self.history.get(name)
        if hist is None:
            hist = self.history[name] = HostHistory(self.history_size)
        if load is not None and h.get("alive", True):
            hist.add(_num(load, "net_tx", 0.0), _num(load, "net_rx", 0.0))
        elif not h.get("alive", True):
            hist.add(0.0, 0.0)  # a dead host moves nothing; keep the timeline honest

    def _detail(self, job_id: str) -> dict[str, Any]:
        d = self.details.get(job_id)
        if d is None:
            d = {"job": dict(self.jobs.get(job_id, {"job": job_id})), "machines": {},
                 "loaded": False}
            self.details[job_id] = d
        self.details.move_to_end(job_id)
        while len(self.details) > self.max_details:
            self.details.popitem(last=False)
        return d

    def _trim_jobs(self) -> None:
        if len(self.jobs) <= self.max_jobs:
            return
        # Drop the oldest finished jobs first; running ones are what people watch.
        order = sorted(self.jobs.values(),
                       key=lambda j: (j.get("state") == "running",
                                      parse_time(j.get("created")) or 0.0, j.get("job", "")))
        for j in order[: len(self.jobs) - self.max_jobs]:
            self.jobs.pop(j["job"], None)

    # -- output ------------------------------------------------------------------------

    def job_rows(self, now: float, failures: bool = False) -> list[JobRow]:
        rows = sort_jobs(job_row(j, now) for j in self.jobs.values())
        return failures_only(rows) if failures else rows

    def has_detail(self, job_id: str) -> bool:
        d = self.details.get(job_id)
        return bool(d and d.get("loaded"))

    def job_summary(self, job_id: str) -> dict[str, Any]:
        """The freshest summary of a job: list counts merged with detail fields."""
        base = dict(self.jobs.get(job_id, {"job": job_id}))
        d = self.details.get(job_id)
        if d is not None:
            base.update({k: v for k, v in d["job"].items() if k != "machines"})
            if d["machines"]:
                base["machines"] = _counts({"machines": d["machines"]})
            elif "machines" in self.jobs.get(job_id, {}):
                base["machines"] = self.jobs[job_id]["machines"]
        return base

    def header(self, job_id: str, now: float) -> JobHeader:
        return job_header(self.job_summary(job_id), now)

    def machine_rows(self, job_id: str, failures: bool = False) -> list[MachineRow]:
        d = self.details.get(job_id)
        if d is None:
            return []
        rows = sort_machines(machine_row(n, m) for n, m in d["machines"].items())
        return failures_only(rows) if failures else rows

    def host_rows(self, now: float, failures: bool = False,
                  spark_width: int = 12) -> list[HostRow]:
        rows = sort_hosts(host_row(h, self.history.get(n), now, spark_width)
                          for n, h in self.hosts.items())
        return failures_only(rows) if failures else rows

    def totals(self) -> dict[str, int]:
        """Counts for the title bar: jobs running/failed, hosts alive/dead/busy/slow."""
        running = sum(1 for j in self.jobs.values() if j.get("state") == "running")
        failed = sum(1 for j in self.jobs.values() if j.get("state") == "failed")
        live = [h for h in self.hosts.values() if h.get("alive")]
        alive = len(live)
        # Why live hosts get less work: busy (fewer uploads) or a slow link.
        busy = sum(1 for h in live if _is_busy(h))
        slow = sum(1 for h in live if _is_slow(h))
        return {"jobs": len(self.jobs), "running": running, "failed": failed,
                "hosts": len(self.hosts), "alive": alive, "dead": len(self.hosts) - alive,
                "busy": busy, "slow": slow}
