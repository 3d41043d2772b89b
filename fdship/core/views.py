"""Read-only views of the scheduler state: the JSON the center's API renders.

Pure functions of a :class:`~fdship.core.scheduler.Scheduler` and ``now``;
used by the center's handlers, the event stream and the tests.  The shapes are
documented in ``docs/protocol.md`` and the job result follows the CONTRACT.
"""

from __future__ import annotations

from typing import Any

from fdship.core import placement
from fdship.core.scheduler import Job, Machine, Scheduler, iso
from fdship.protocol import Fetch


def machine_state(job: Job, m: Machine) -> str:
    if m.ended:
        return m.ended
    if len(m.have) == job.nchunks and (m.packing or len(m.packed) < len(job.files)):
        return "packing"
    if m.have or m.inflight or m.packed:
        return "fetching"
    return "pending"


def machine_rate(m: Machine, now: float) -> float:
    h = m.history
    if len(h) < 2:
        return 0.0
    # Bytes per second over the recent window, decaying to 0 once acks stop.
    t0, b0 = h[0]
    t1, b1 = h[-1]
    span = max(now, t1) - t0
    return (b1 - b0) / span if span > 0 else 0.0


def machine_view(job: Job, m: Machine, now: float) -> dict[str, Any]:
    total = sum(f.size for f in job.files)
    rate = 0.0 if m.ended else machine_rate(m, now)
    left = total - m.bytes_done
    eta = (left / rate) if rate > 0 and not m.ended else None
    return {
        "state": machine_state(job, m),
        "error": m.error,
        "error_at": iso(m.error_at),
        "seconds": round(m.finished - job.created, 3) if m.finished is not None else None,
        "chunks_done": len(m.have),
        "chunks_total": job.nchunks,
        "files_done": len(m.packed),
        "files_total": len(job.files),
        "bytes_done": m.bytes_done,
        "bytes_total": total,
        "rate": round(rate, 1),
        "eta": round(eta, 1) if eta is not None else None,
        "attempts": m.total_attempts,
        "last_error": m.last_error or None,
        "hook": m.hook,
    }


def job_summary(job: Job, now: float) -> dict[str, Any]:
    ms = job.machines.values()
    per = sum(f.size for f in job.files)
    bytes_total = per * len(job.machines)
    bytes_done = sum(m.bytes_done for m in ms)
    done = sum(1 for m in ms if m.ended == "done")
    failed = sum(1 for m in ms if m.ended == "failed")
    units = max(1, job.nchunks + len(job.files)) * max(1, len(job.machines))
    progress_units = sum(len(m.have) + len(m.packed) if not m.ended else
                         job.nchunks + len(job.files) for m in ms)
    return {
        "job": job.id,
        "state": job.state,
        "created": iso(job.created),
        "finished": iso(job.finished),
        "source": job.source,
        "files": len(job.files),
        "bytes_total": bytes_total,
        "bytes_done": bytes_done,
        "progress": round(min(1.0, progress_units / units), 4),
        "rate": round(sum(machine_rate(m, now) for m in ms if not m.ended), 1),
        "machines": {"total": len(job.machines), "done": done, "failed": failed,
                     "running": len(job.machines) - done - failed},
    }


def job_result(job: Job, now: float) -> dict[str, Any]:
    """The CONTRACT's job result, plus per-machine progress."""
    out = job_summary(job, now)
    out["files"] = [{"path": f.path, "dest": f.dest, "size": f.size, "xxh3": f.xxh3}
                    for f in job.files]
    out["machines"] = {n: machine_view(job, m, now) for n, m in job.machines.items()}
    out["notify"] = job.notify or None
    if job.callback_state:
        out["callback"] = dict(job.callback_state)
        if "at" in out["callback"]:
            out["callback"]["at"] = iso(out["callback"]["at"])
    return out


def jobs_list(s: Scheduler, now: float, state: str = "", limit: int = 50,
              before: str = "") -> dict[str, Any]:
    ids = sorted(s.jobs, reverse=True)  # ids sort by creation time: newest first
    if before:
        ids = [j for j in ids if j < before]
    if state:
        ids = [j for j in ids if s.jobs[j].state == state]
    page = ids[:limit]
    nxt = page[-1] if len(ids) > limit else None
    return {"jobs": [job_summary(s.jobs[j], now) for j in page], "next": nxt}


def host_view(s: Scheduler, name: str, now: float) -> dict[str, Any]:
    h = s.hosts[name]
    return {
        "name": h.name, "address": h.address, "labels": list(h.labels), "alive": h.alive,
        # False from a pull or pack the center could not deliver until the next
        # heartbeat: no new work goes to it meanwhile.
        "reachable": not h.undeliverable,
        "last_heartbeat": iso(h.last_seen) if h.last_seen else None,
        "heartbeat_age": round(now - h.last_seen, 3) if h.last_seen else None,
        "load": {"cpu": h.cpu, "loadavg": h.loadavg, "net_tx": h.net_tx, "net_rx": h.net_rx,
                 "disk_busy": h.disk_busy, "uploads": h.reported_uploads,
                 "downloads": h.reported_downloads, "bytes_served": h.bytes_served,
                 "bytes_received": h.bytes_received, "app_cpu": h.app_cpu,
                 "app_cpu_busy": h.app_cpu_busy},
        # What the scheduler makes of the load (0 idle .. 1 busy: fewer uploads).
        "busyness": round(placement.busyness(h, s.fleet_cpu), 3),
        "assigned": {"uploads": h.uploads, "downloads": h.downloads},
        # The link speeds the scheduler has learned from finished fetches
        # (bytes/s, 0 unknown), the daemon's own caps (0: none), whether an
        # estimate is still only its cap, and whether it treats the host as slow.
        "link": {"up": round(h.up_rate), "down": round(h.down_rate),
                 "up_cap": round(h.up_cap), "down_cap": round(h.down_cap),
                 "measured": {"up": h.up_rate > 0 and not h.up_seeded,
                              "down": h.down_rate > 0 and not h.down_seeded},
                 "slow": s._slow(h)},
        "free": dict(h.free), "hooks": list(h.hooks), "version": h.version,
    }


def still_assigned(s: Scheduler, job: str, target: str,
                   fetches: tuple[Fetch, ...]) -> tuple[Fetch, ...]:
    """The fetches of a pull that ``target`` still has in flight from the peer named.

    A pull whose delivery is in doubt (its channel closed) is sent again with
    these only: one already answered, or given to another peer since, must
    not start a second fetch.
    """
    j = s.jobs.get(job)
    m = j.machines.get(target) if j is not None and j.state == "running" else None
    if j is None or m is None:
        return ()
    out = []
    for f in fetches:
        if f.file >= len(j.files) or f.chunk >= j.file_chunks(f.file):
            continue
        entry = m.inflight.get(j.base[f.file] + f.chunk)
        if entry is not None and entry[0] == f.peer_name:
            out.append(f)
    return tuple(out)
