"""Deterministic cluster data for the TUI tests, snapshots and the README screenshot.

Shapes follow docs/protocol.md (the center's read API).  The clock is fixed at
``NOW`` so ages, ETAs and the screenshots never change between runs.
"""

from __future__ import annotations

import copy
import random
from datetime import UTC
from typing import Any

from tui.source import MemorySource
from tui.view import parse_time

NOW_ISO = "2026-11-22T10:05:00Z"
_now = parse_time(NOW_ISO)
assert _now is not None
NOW: float = _now
GiB = 1024**3
MiB = 1024**2

# Job ids in the center's format: creation time to the millisecond, a random tail.
RUNNING = "20261122T100200412Z-7f3a"
FAILED = "20261122T094500087Z-c41e"
DONE = "20261122T093000950Z-0b9d"
EMPTY_DONE = "20261122T090000001Z-e2a0"
DISK_FULL = "disk full on /srv: 10.0 MiB free, 640 MiB needed; free space or pick another --dest"
RETRYING = "timeout: web-02 sent nothing for 30s (chunk 88); retrying from another peer"
PERM = ("cannot write /srv/app/current/model.bin: permission denied (the daemon runs as fdship; "
        "check --allow-dest and the directory's owner)")


def _ts(seconds_before_now: float) -> str:
    from datetime import datetime
    return datetime.fromtimestamp(NOW - seconds_before_now, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def _machine(state: str, done: int, total: int = 160, rate: float | None = None,
             error: str | None = None, attempts: int = 1, seconds: float | None = None,
             last_error: str | None = None) -> dict[str, Any]:
    chunk = 4 * MiB
    m: dict[str, Any] = {
        "state": state, "chunks_done": done, "chunks_total": total,
        "bytes_done": done * chunk, "bytes_total": total * chunk,
        "rate": rate, "eta": None, "attempts": attempts, "error": error,
        "error_at": _ts(30) if error else None, "last_error": last_error,
    }
    if seconds is not None:
        m["seconds"] = seconds
    return m


def running_machines() -> dict[str, dict[str, Any]]:
    """12 targets of the running job: two failed, most fetching, some done or pending."""
    rng = random.Random(7)
    out: dict[str, dict[str, Any]] = {}
    for i in range(1, 13):
        name = f"web-{i:02d}"
        if i == 4:
            out[name] = _machine("failed", 37, error=DISK_FULL, attempts=1)
        elif i == 9:
            out[name] = _machine("failed", 0, error=PERM, attempts=8)
        elif i in (1, 2):
            out[name] = _machine("done", 160, seconds=71.0 + i)
        elif i == 12:
            out[name] = _machine("pending", 0, attempts=0)
        elif i == 11:
            out[name] = _machine("packing", 160, rate=0.0)
        else:
            done = rng.randint(40, 150)
            out[name] = _machine("fetching", done, rate=rng.uniform(40, 110) * MiB)
            if i == 7:
                out[name].update(attempts=3, last_error=RETRYING)
    return out


def failed_machines() -> dict[str, dict[str, Any]]:
    out = {f"db-{i}": _machine("done", 16, 16, seconds=3.2 + i) for i in range(1, 5)}
    out["db-5"] = _machine("failed", 3, 16, error="hash mismatch on chunk 3 from 8 peers; "
                           "the source file changed while shipping", attempts=8)
    return out


def jobs() -> list[dict[str, Any]]:
    run = running_machines()
    done_bytes = sum(m["bytes_done"] for m in run.values())
    total_bytes = sum(m["bytes_total"] for m in run.values())
    return [
        {"job": RUNNING, "state": "running", "created": _ts(180), "finished": None,
         "source": "build-1", "files": 2, "bytes_total": 640 * MiB,
         "bytes_done": done_bytes // 12, "progress": done_bytes / total_bytes,
         "rate": 612.5 * MiB,
         "machines": {"total": 12, "done": 2, "failed": 2, "running": 8}},
        {"job": FAILED, "state": "failed", "created": _ts(1200), "finished": _ts(1130),
         "source": "build-1", "files": 1, "bytes_total": 64 * MiB, "bytes_done": 64 * MiB,
         "progress": 0.85, "rate": 0.0,
         "machines": {"total": 5, "done": 4, "failed": 1, "running": 0}},
        {"job": DONE, "state": "done", "created": _ts(2100), "finished": _ts(2050),
         "source": "build-2", "files": 3, "bytes_total": 1 * GiB, "bytes_done": 1 * GiB,
         "progress": 1.0, "rate": 0.0,
         "machines": {"total": 40, "done": 40, "failed": 0, "running": 0}},
        {"job": EMPTY_DONE, "state": "done", "created": _ts(3900), "finished": _ts(3895),
         "source": "build-2", "files": 1, "bytes_total": 12345, "bytes_done": 12345,
         "progress": 1.0, "rate": 0.0,
         "machines": {"total": 3, "done": 3, "failed": 0, "running": 0}},
    ]


def details() -> dict[str, dict[str, Any]]:
    js = {j["job"]: j for j in jobs()}
    return {
        RUNNING: {**js[RUNNING], "files": [
            {"path": "/srv/app/releases/app.tar", "dest": "/srv/app/releases/app.tar",
             "size": 600 * MiB, "xxh3": "0123456789abcdef"},
            {"path": "/srv/app/releases/model.bin", "dest": "/srv/app/releases/model.bin",
             "size": 40 * MiB, "xxh3": "fedcba9876543210"}],
            "callback": {"url": "http://deploy.example:8080/done", "state": "pending",
                         "attempts": 0, "error": None},
            "machines": running_machines()},
        FAILED: {**js[FAILED], "files": [
            {"path": "/srv/db/schema.sql", "dest": "/srv/db/schema.sql", "size": 64 * MiB,
             "xxh3": "00000000deadbeef"}], "machines": failed_machines()},
    }


def host(name: str, i: int, alive: bool = True, tx: float = 0.0, rx: float = 0.0,
         cpu: float = 10.0, app_cpu: float | None = 0.0, busyness: float | None = 0.0,
         link: tuple[float, float, bool] | None = (0, 0, False),
         down_cap: float = 0.0) -> dict[str, Any]:
    """One host as ``GET /center/hosts`` shows it.

    ``app_cpu=None`` is an older daemon's heartbeat (no ``app_cpu`` nor
    ``app_cpu_busy``); ``busyness=None`` or ``link=None`` an older center's row.
    ``link`` is (up, down, slow), bytes/s with 0 for not measured yet;
    ``down_cap`` the daemon's download cap, whose estimate the down figure is.
    """
    h: dict[str, Any] = {
        "name": name, "address": f"10.0.0.{10 + i}:7071",
        "labels": ["web"] if name.startswith("web") else ["build"],
        "alive": alive, "last_heartbeat": _ts(0.4 if alive else 95),
        "heartbeat_age": 0.4 if alive else 95.0,
        "load": {"cpu": cpu, "loadavg": cpu / 50, "net_tx": tx, "net_rx": rx,
                 "disk_busy": 3.0, "uploads": 2 if tx else 0, "downloads": 3 if rx else 0,
                 "bytes_served": 0, "bytes_received": 0},
        "assigned": {"uploads": 2 if tx else 0, "downloads": 3 if rx else 0},
        "free": {"/srv": (200 - 9 * i) * GiB, "/var/lib/fdship": (30 + 37 * i % 90) * GiB},
        "version": "0.1.0"}
    if app_cpu is not None:
        h["load"].update(app_cpu=app_cpu, app_cpu_busy=75.0)
    if busyness is not None:
        h["busyness"] = busyness
    if link is not None:
        h["link"] = {"up": link[0], "down": link[1], "slow": link[2]}
        if down_cap:
            h["link"] |= {"up_cap": 0, "down_cap": down_cap,
                          "measured": {"up": link[0] > 0, "down": False}}
    return h


# What the scheduler makes of each web host (index -> host() keywords): idle and
# fast by default; a busy bidder or two, a slow link, hosts not measured yet, an
# old daemon that reports no app CPU, and a dead host whose last report was busy.
FAST = (112 * MiB, 117 * MiB, False)
_WEB: dict[int, dict[str, Any]] = {
    2: {"app_cpu": 40.0, "busyness": 0.3},
    3: {"app_cpu": 97.0, "busyness": 1.0},
    4: {"app_cpu": 52.0, "busyness": 0.54},
    6: {"app_cpu": 99.0, "busyness": 1.0, "link": (9_800_000, 9_900_000, True)},
    7: {"app_cpu": 20.0, "link": (9_800_000, 9_900_000, True)},
    8: {"app_cpu": 0.0},  # nothing watched, or its process is not running
    10: {"link": (0, 0, False)},
    11: {"link": (0, 96 * MiB, False), "down_cap": 96 * MiB},  # capped, not measured
    12: {"app_cpu": None},
}


def hosts() -> list[dict[str, Any]]:
    # The source: an older daemon (no app CPU), its downlink never measured.
    out = [host("build-1", 0, tx=220 * MiB, rx=1 * MiB, cpu=31.0, app_cpu=None,
                link=(230 * MiB, 0, False))]
    for i in range(1, 13):
        alive = i != 6
        kw: dict[str, Any] = {"app_cpu": 6.0 + i, "link": FAST, **_WEB.get(i, {})}
        out.append(host(f"web-{i:02d}", i, alive=alive, tx=(30 + 5 * i) * MiB if alive else 0,
                        rx=(80 - 3 * i) * MiB if alive else 0, cpu=8.0 + i, **kw))
    return out


def host_history_events(samples: int = 14) -> list[dict[str, Any]]:
    """A deterministic NIC history: each host ramps up and down over ``samples`` beats."""
    out = []
    base = {h["name"]: h for h in hosts()}
    shape = [0.1, 0.3, 0.6, 0.9, 1.0, 0.8, 0.95, 0.7, 0.5, 0.65, 0.85, 1.0, 0.9, 0.75]
    for s in range(samples):
        for k, h in enumerate(base.values()):
            wave = shape[(s + 3 * k) % len(shape)]  # each host at its own phase
            h2 = copy.deepcopy(h)
            if h2["alive"]:
                h2["load"]["net_tx"] *= wave
                h2["load"]["net_rx"] *= wave
            out.append(h2)
    return out


def source() -> MemorySource:
    """A fixture center with jobs, job details and hosts with NIC history."""
    src = MemorySource(jobs(), hosts(), details(), description="http://10.0.0.1:7070")
    for h in host_history_events():
        src.push("host", h)
    return src


def clock() -> float:
    assert NOW is not None
    return NOW
