"""Small helpers shared by the TUI's Pilot, snapshot and real-center tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import tui_fixtures as fx
from rich.text import Text
from textual.css.query import NoMatches
from textual.pilot import Pilot
from textual.widgets import Static

from tui.app import MonitorApp
from tui.source import DataSource
from tui.widgets import RowTable, StatusLine


def fixture_app(source: DataSource | None = None, **kw: Any) -> MonitorApp:
    """The app on fixture data with the clock stopped at fx.NOW (no ticking)."""
    kw.setdefault("clock", fx.clock)
    kw.setdefault("tick", 0)
    return MonitorApp(source if source is not None else fx.source(), **kw)


async def wait_until(pilot: Pilot[Any], pred: Callable[[], bool], timeout: float = 10.0,
                     what: str = "condition") -> None:
    """Let the app run until ``pred()`` holds; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not _holds(pred):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pilot.pause(0.02)


def _holds(pred: Callable[[], bool]) -> bool:
    try:
        return pred()
    except NoMatches:  # a screen still composing its widgets
        return False


def plain(widget: Static) -> str:
    content = widget.content
    return content.plain if isinstance(content, Text) else str(content)


def table(app: Any, selector: str) -> RowTable:
    return app.screen.query_one(selector, RowTable)


def status(app: Any) -> str:
    return plain(app.screen.query_one(StatusLine))


async def ready(pilot: Pilot[Any]) -> None:
    """Wait for the first snapshot to be on screen."""
    app = pilot.app
    assert isinstance(app, MonitorApp)
    await settled(pilot, lambda: bool(app.view.jobs) and "live" in status(app),
                  what="the first snapshot on screen")


async def settled(pilot: Pilot[Any], pred: Callable[[], bool] = lambda: True,
                  timeout: float = 10.0, what: str = "the screen to catch up") -> None:
    """Wait until every update the app received is drawn and ``pred()`` holds."""
    app = pilot.app
    assert isinstance(app, MonitorApp)
    await wait_until(pilot, lambda: app.applied > 0 and app.drawn == app.applied and pred(),
                     timeout, what)
