"""Snapshot tests of the three screens on fixture data (deterministic data and clock).

The SVGs under __snapshots__/ are the accepted pictures; after a deliberate
change of the layout, look at the new ones and accept them with
``pytest tests/tui/test_tui_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

from typing import Any

import tui_fixtures as fx
from textual.pilot import Pilot
from tui_helpers import fixture_app, plain, ready, settled, status, table

from tui.screens import HostsScreen, JobScreen


async def open_running_job(pilot: Pilot[Any]) -> None:
    await ready(pilot)
    await pilot.press("enter")
    await settled(pilot, lambda: isinstance(pilot.app.screen, JobScreen)
                  and len(table(pilot.app, "#machines").keys) == 12, what="the job screen")


async def show_hosts(pilot: Pilot[Any]) -> None:
    await ready(pilot)
    await pilot.press("h")
    await settled(pilot, lambda: isinstance(pilot.app.screen, HostsScreen)
                  and len(table(pilot.app, "#hosts").keys) == 13, what="the hosts screen")


def test_jobs_view_80x24(snap_compare: Any) -> None:
    assert snap_compare(fixture_app(), terminal_size=(80, 24), run_before=ready)


def test_job_view_80x24(snap_compare: Any) -> None:
    assert snap_compare(fixture_app(), terminal_size=(80, 24), run_before=open_running_job)


def test_hosts_view_80x24(snap_compare: Any) -> None:
    assert snap_compare(fixture_app(), terminal_size=(80, 24), run_before=show_hosts)


def test_hosts_view_120x30_busy_host_selected(snap_compare: Any) -> None:
    """Every column in view; the busy bidder web-03 highlighted, its panel saying why."""
    async def before(pilot: Pilot[Any]) -> None:
        await show_hosts(pilot)
        await pilot.press("home", "down", "down", "down", "down")
        await settled(pilot, lambda: table(pilot.app, "#hosts").selected_key() == "web-03"
                      and "busy: fewer uploads" in plain(pilot.app.screen.query_one(
                          "#host-detail")), what="web-03 highlighted")

    assert snap_compare(fixture_app(), terminal_size=(120, 30), run_before=before)


def test_job_view_100x30_failures_only(snap_compare: Any) -> None:
    async def before(pilot: Pilot[Any]) -> None:
        await open_running_job(pilot)
        await pilot.press("f")
        await settled(pilot, lambda: table(pilot.app, "#machines").keys == ["web-04", "web-09"],
                      what="failures only")

    assert snap_compare(fixture_app(), terminal_size=(100, 30), run_before=before)


def test_jobs_view_reconnecting_80x24(snap_compare: Any) -> None:
    src = fx.source()

    async def before(pilot: Pilot[Any]) -> None:
        await ready(pilot)
        src.disconnect(retry_in=2.0, error="cannot reach the center at "
                       "http://10.0.0.1:7070: Connection refused")
        await settled(pilot, lambda: "reconnecting" in status(pilot.app), what="reconnecting")

    assert snap_compare(fixture_app(src), terminal_size=(80, 24), run_before=before)
