"""What every screen of ``fdship-tui`` shares: header, status line, footer, redraw hook.

Data flows one way: the app owns the :class:`~tui.view.ClusterView` and, when
something changed, calls :meth:`MonitorScreen.redraw` on the screen in front
with the view and the current time ("attributes down").  Screens never fetch
anything themselves; they ask the app with a message or an action
("messages up").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import events
from textual.screen import Screen
from textual.widgets import Footer, Header

from tui.view import BUSY, FAIL, IDLE, OK, Changes, ClusterView
from tui.widgets import StatusLine

if TYPE_CHECKING:
    from tui.app import MonitorApp

# Severity -> Rich style.  Failures are bold red everywhere, so they stand out
# even on a monochrome-ish terminal (bold survives where colour does not).
SEVERITY_STYLE = {FAIL: "bold red", OK: "green", BUSY: "yellow", IDLE: "dim"}


def style_of(severity: str) -> str:
    return SEVERITY_STYLE.get(severity, "")


class MonitorScreen(Screen[None]):
    """Base of the three screens."""

    #: True once mounted with its widgets: the app draws only into ready screens.
    ready = False

    def _on_mount(self, event: events.Mount) -> None:
        # Mount arrives after the composed children are mounted, so the widgets
        # redraw() queries exist from here on.
        self.ready = True
        self.monitor.redraw_now()

    def _on_unmount(self) -> None:
        self.ready = False  # popped, or the app is quitting: its widgets are going

    def compose_header(self) -> Header:
        return Header(show_clock=False, icon="⇶")

    def compose_status(self) -> StatusLine:
        return StatusLine(id="status")

    def compose_footer(self) -> Footer:
        return Footer()

    @property
    def monitor(self) -> MonitorApp:
        from tui.app import MonitorApp

        assert isinstance(self.app, MonitorApp)
        return self.app

    def wants(self, changes: Changes) -> bool:
        """Whether these changes touch what this screen shows."""
        return bool(changes)

    def redraw(self, view: ClusterView, now: float, failures: bool) -> None:
        """Copy the view's rows into this screen's widgets."""
        raise NotImplementedError

    def on_screen_resume(self) -> None:
        # Coming back to a screen (escape, j, h): show the current state at once,
        # not whatever it held when it was covered.
        self.monitor.redraw_now()
