"""The center's side of schedules: HTTP endpoints, carrying out runs, and the CLI.

Where it sits: the decisions live in the pure core (:mod:`fdship.core.schedules`);
this module is the thin part around them.

* Handlers for ``/center/schedules`` (list, add), ``/center/schedules/NAME``
  (show, remove) and ``/center/schedules/NAME/history``.  Adding and removing
  are validated *inside* the runner's single writer (:meth:`Runner.decide`), so
  two requests can never both create the same name.
* :func:`run_schedule` carries out a ``RunSchedule`` action: the center holds
  no files, so it asks the schedule's source daemon to submit the job
  (``POST /daemon/api`` with ``skip_if_unchanged`` and the run's tag).  The
  job ties itself to the run when the center logs it; only a source that
  answers "unchanged" or fails comes back here, as a ``ScheduleStartFailed``
  event for the core to decide on.
* :func:`cli` is ``fdship schedule add|list|rm|history``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fdship import protocol as P
from fdship.config import human_bytes
from fdship.core.events import ScheduleStartFailed
from fdship.core.schedules import RunSchedule
from fdship.daemon.client import DaemonClient
from fdship.errors import BadRequest, FdshipError, Unavailable
from fdship.httpclient import call, peer_url
from fdship.web import BaseHandler

if TYPE_CHECKING:  # pragma: no cover
    from fdship.center.runner import Runner

log = logging.getLogger("fdship.center.schedules")

# How long the source may take to snapshot and hash the files and submit the
# job (a 1 GiB file on a slow disk takes a while).  The core gives up on a
# run without a job later than this, so this call always reports first.
API_TIMEOUT = 600.0


async def run_schedule(runner: Runner, a: RunSchedule) -> None:
    """Ask the source daemon to start run ``a.run`` of schedule ``a.name``."""
    req = P.ApiRequest(files=a.paths, machines=a.machines, dest=a.dest, notify=a.notify,
                       wait=False, skip_if_unchanged=dict(a.skip), schedule=a.tag)
    log.info("schedule=%s run=%d: asking %s to ship %d file(s) to %s", a.name, a.run, a.source,
             len(a.paths), ",".join(a.machines))
    try:
        if not a.address:
            raise Unavailable(f"daemon {a.source} has no known address")
        res = await DaemonClient(peer_url(a.address), runner.token).api(req,
                                                                     timeout=API_TIMEOUT)
    except FdshipError as e:
        log.warning("schedule=%s run=%d: %s could not start it: %s", a.name, a.run, a.source, e)
        ev = ScheduleStartFailed(name=a.name, run=a.run,
                                 reason=f"the source daemon {a.source} could not start the "
                                        f"run: {e}")
    else:
        if isinstance(res, dict) and res.get("skipped"):
            log.info("schedule=%s run=%d skipped: %s", a.name, a.run, res.get("reason"))
            ev = ScheduleStartFailed(name=a.name, run=a.run, unchanged=True,
                                     reason=str(res.get("reason") or "files unchanged"))
        else:
            job = res.get("job") if isinstance(res, dict) else None
            log.info("schedule=%s run=%d: job %s", a.name, a.run, job)
            return
    try:
        await runner.submit(ev)
    except FdshipError:
        log.exception("schedule=%s run=%d: could not record the outcome", a.name, a.run)


# ---------------------------------------------------------------------- HTTP


class _Handler(BaseHandler):
    @property
    def runner(self) -> Runner:
        return self.settings["fdship_runner"]  # type: ignore[no-any-return]


class SchedulesHandler(_Handler):
    """GET /center/schedules: every schedule; POST: add one (201 with its view)."""

    def get(self) -> None:
        self.send_json(self.runner.sched.schedules.list_view(time.time()))

    async def post(self) -> None:
        req = self.parse(P.ScheduleRequest.from_json)
        r = self.runner
        view = await r.decide(lambda now: r.sched.schedules.admit_add(req, now),
                              reply=lambda: r.sched.schedules.view(req.name, r.clock()))
        log.info("schedule %s added: %s from %s to %s", req.name,
                 f"every {req.every}" if req.every else f"cron {req.cron!r}", req.source,
                 ",".join(req.machines))
        self.send_json(view, status=201)


class ScheduleHandler(_Handler):
    """GET /center/schedules/NAME: one schedule; DELETE: remove it."""

    def get(self, name: str) -> None:
        self.send_json(self.runner.sched.schedules.view(name, time.time()))

    async def delete(self, name: str) -> None:
        r = self.runner
        await r.decide(lambda now: r.sched.schedules.admit_remove(name))
        log.info("schedule %s removed", name)
        self.send_json({"removed": name})


class ScheduleHistoryHandler(_Handler):
    """GET /center/schedules/NAME/history?limit=N: newest first."""

    def get(self, name: str) -> None:
        try:
            limit = int(self.get_query_argument("limit", "50"))
        except ValueError:
            raise BadRequest("limit must be a whole number") from None
        self.send_json(self.runner.sched.schedules.history_view(name, max(1, min(limit, 1000))))


def routes() -> list[tuple[str, type]]:
    return [(P.CENTER_SCHEDULES, SchedulesHandler),
            (P.CENTER_SCHEDULES + r"/([^/]+)", ScheduleHandler),
            (P.CENTER_SCHEDULES + r"/([^/]+)/history", ScheduleHistoryHandler)]


# ---------------------------------------------------------------------- CLI




def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*map(str, r)) for r in rows])


def _when(s: dict[str, Any]) -> str:
    if s.get("cron"):
        return f"cron {s['cron']}"
    secs = float(s["every"])
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= n and secs % n == 0:
            return f"every {secs / n:.0f}{unit}"
    return f"every {secs:g}s"


async def cli(args: argparse.Namespace, token: str) -> int:
    """``fdship schedule add|list|rm|history``: talk to the center, print for people."""
    base = args.center.rstrip("/") + P.CENTER_SCHEDULES
    cmd = args.schedule_cmd
    if cmd == "add":
        bad = [f for f in args.files if not f.startswith("/")]
        if bad:
            raise BadRequest(f"{bad[0]!r} is not an absolute path: name files by their full "
                             f"path on the source daemon {args.source}")
        machines = tuple(m.strip() for e in args.to for m in e.split(",") if m.strip())
        req = P.ScheduleRequest(name=args.name, source=args.source, machines=machines,
                                paths=tuple(args.files), every=args.every or None,
                                cron=args.cron or "", dest=args.dest or "",
                                notify=args.notify or "")
        res = await call("POST", base, req.to_json(), token=token)
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            print(f"schedule {res['name']} added: {_when(res)}, next run {res['next_due']}")
        return 0
    if cmd == "list":
        res = await call("GET", base, token=token)
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        rows = []
        for s in res["schedules"]:
            last = s.get("last") or {}
            state = f"running (run {s['running']['run']})" if s.get("running") else \
                (last.get("result") or "-")
            rows.append([s["name"], _when(s), s["source"], ",".join(s["machines"]),
                         str(len(s["files"])), s["next_due"] or "-", state])
        print(_table(rows, ["NAME", "WHEN", "SOURCE", "TO", "FILES", "NEXT", "LAST"])
              if rows else "no schedules")
        return 0
    name = quote(args.name, safe="")
    if cmd == "rm":
        res = await call("DELETE", f"{base}/{name}", token=token)
        print(json.dumps(res) if args.json else f"schedule {args.name} removed")
        return 0
    res = await call("GET", f"{base}/{name}/history?limit={args.limit}", token=token)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    rows = []
    for e in res["history"]:
        rows.append([str(e["run"] or "-"), e["start"] or "-", e["end"] or "-", e["result"],
                     human_bytes(e["bytes"]), e["job"] or "-",
                     (f"caught up {e['missed']} missed; " if e.get("missed") else "")
                     + (e["reason"] or "")])
    print(_table(rows, ["RUN", "START", "END", "RESULT", "BYTES", "JOB", "REASON"])
          if rows else f"schedule {args.name} has not run yet")
    return 0
