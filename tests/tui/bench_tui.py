"""Benchmark of fdship-tui: event latency and CPU while following a 50-machine job.

Run from the repository root::

    python tests/tui/bench_tui.py [--seconds 20] [--rate 400] [--machines 50]

Two figures, printed as medians (and 95th percentiles):

* **latency**: from an event leaving the center to the TUI's table holding it.
  A feeder process (tui_center.py, the read API on a real socket) stamps each
  event with ``time.monotonic()`` (one clock for every process on Linux); the
  TUI, in this process and following over HTTP/SSE like in production,
  records when the redraw that showed the event finished.  Measured twice:
  for isolated events (one every 250 ms, longer than the app's redraw
  coalescing interval) and under the load below.
* **CPU**: this process's CPU time (``time.process_time()``) divided by wall
  time while it follows a job of ``--machines`` targets with ``--rate``
  machine events per second (a 1 GiB file in 4 MiB chunks to 50 machines is
  12,800 chunk events; 400/s is such a job in about 30 s), a job summary every
  tenth event and one heartbeat per host per second, with the Job screen of
  that job open at 100x30.

No speed goal is asserted anywhere: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from tui.app import MonitorApp, SourceUpdate
from tui.screens import JobScreen
from tui.source import Backoff, Batch, Event, HTTPSource
from tui.widgets import RowTable

HERE = os.path.dirname(os.path.abspath(__file__))

BENCH_JOB = "20261122T100000-0050"


class MeasuredApp(MonitorApp):
    """The real app, plus a record of center-to-screen latency of every event."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.waiting: list[float] = []  # sent_at of events applied but not yet drawn
        self.latencies: list[float] = []
        self.events_seen = 0

    def on_source_update(self, message: SourceUpdate) -> None:
        u = message.update
        events = [u] if isinstance(u, Event) else u.events if isinstance(u, Batch) else []
        for ev in events:
            self.events_seen += 1
            sent = ev.data.get("sent_at")
            # Host heartbeats do not show on the Job screen; they would only wait.
            if isinstance(sent, float) and ev.kind != "host":
                self.waiting.append(sent)
        super().on_source_update(message)

    def _redraw(self, screen: Any) -> None:
        super()._redraw(screen)
        if isinstance(screen, JobScreen) and self.waiting:
            done = time.monotonic()
            self.latencies.extend(done - t for t in self.waiting)
            self.waiting.clear()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_one(machines: int, rate: float, seconds: float,
            redraw_interval: float = 0.1) -> dict[str, Any]:
    """Start a feeder process, follow its job through the HTTP source, stop the feeder."""
    port = free_port()
    feeder = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "tui_center.py"), "--port", str(port),
         "--machines", str(machines), "--rate", str(rate), "--seconds", str(seconds),
         "--start-delay", "2.5"], cwd=HERE)
    try:
        return asyncio.run(follow(port, machines, seconds, redraw_interval))
    finally:
        feeder.terminate()
        try:
            feeder.wait(10)
        except subprocess.TimeoutExpired:
            feeder.kill()
            feeder.wait()


async def follow(port: int, machines: int, seconds: float,
                 redraw_interval: float) -> dict[str, Any]:
    """Follow the fed job with its Job screen open; return latencies and CPU share."""
    src = HTTPSource(f"http://127.0.0.1:{port}", backoff=Backoff(0.05, 0.2, 0))
    app = MeasuredApp(src, tick=1.0, redraw_interval=redraw_interval)
    async with app.run_test(size=(100, 30)) as pilot:
        deadline = time.monotonic() + 15
        while BENCH_JOB not in app.view.jobs:
            if time.monotonic() > deadline:
                raise RuntimeError("the feeder never served its job")
            await pilot.pause(0.05)
        app.open_job(BENCH_JOB)
        while not (isinstance(app.screen, JobScreen)
                   and sum(len(t.keys) for t in app.screen.query(RowTable)) == machines):
            if time.monotonic() > deadline:
                raise RuntimeError("the job screen never showed every machine")
            await pilot.pause(0.05)
        while app.events_seen == 0:  # the feed has started
            if time.monotonic() > deadline:
                raise RuntimeError("no event arrived")
            await pilot.pause(0.01)
        app.latencies.clear()
        cpu0, wall0, ev0 = time.process_time(), time.monotonic(), app.events_seen
        await asyncio.sleep(seconds - 1.0)  # stay inside the feed window
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        events = app.events_seen - ev0
        table = app.screen.query_one("#machines", RowTable)
        moving = sum(1 for k in table.keys if table.cell_text(k, "rate") != "-")
        return {"latencies": list(app.latencies), "cpu": cpu / wall, "events": events,
                "wall": wall, "redraws": app.redraws, "machines_moving": moving,
                "rows_rendered": table.repaints}


def report(name: str, r: dict[str, Any]) -> None:
    lat = [x * 1000 for x in r["latencies"]]
    print(f"{name}: {r['events']} events in {r['wall']:.1f}s "
          f"({r['events'] / r['wall']:.0f}/s), {len(lat)} latency samples, "
          f"{r['machines_moving']} machines moving on screen")
    print(f"  latency center->screen: median {statistics.median(lat):.1f} ms, "
          f"p95 {pct(lat, 0.95):.1f} ms")
    print(f"  TUI CPU: {100 * r['cpu']:.1f}% of one core")


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rate", type=float, default=400.0, help="machine events per second")
    p.add_argument("--machines", type=int, default=50)
    p.add_argument("--redraw-interval", type=float, default=0.1,
                   help="the app's redraw coalescing interval, seconds (default 0.1)")
    a = p.parse_args(argv)
    out = {
        # 4 machine events/s: each arrives after the last redraw, so this is the bare
        # path from the center's socket to the table, with no coalescing wait.
        "isolated": run_one(a.machines, 4.0, min(a.seconds, 10.0), a.redraw_interval),
        "loaded": run_one(a.machines, a.rate, a.seconds, a.redraw_interval),
    }
    report("isolated events (4/s)", out["isolated"])
    report(f"{a.machines}-machine job at {a.rate:.0f} machine events/s", out["loaded"])
    return out


if __name__ == "__main__":
    main()
