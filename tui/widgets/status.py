"""The status line at the bottom of every screen: connection state and totals.

It says whether what is on screen is live.  A monitor that silently shows a
frozen picture is worse than none, so 'reconnecting in 2s…' and the reason are
spelled out, in a warning colour, until the source reports live again.
"""

from __future__ import annotations

import math

from rich.text import Text

from tui.source import CONNECTING, LIVE, RECONNECTING, Status
from tui.widgets.panel import Panel


def status_text(status: Status, retry_left: float | None, totals: dict[str, int],
                failures: bool) -> Text:
    """The line itself, built from plain values so it is easy to test."""
    text = Text(no_wrap=True, overflow="ellipsis")
    if status.state == LIVE:
        text.append("● live", style="bold green")
    elif status.state == RECONNECTING:
        left = max(0, math.ceil(retry_left if retry_left is not None else 0))
        text.append(f"◌ reconnecting in {left}s…", style="bold yellow")
        if status.error:
            text.append(f" {status.error}", style="yellow")
        return text  # the reason matters more than stale totals
    elif status.state == CONNECTING:
        text.append("◌ connecting…", style="bold yellow")
    else:
        text.append(status.state)
    text.append(f" │ jobs {totals.get('running', 0)} running")
    failed = totals.get("failed", 0)
    text.append(", ")
    text.append(f"{failed} failed", style="bold red" if failed else "")
    dead = totals.get("dead", 0)
    text.append(f" │ hosts {totals.get('alive', 0)}/{totals.get('hosts', 0)} up")
    if dead:
        text.append(f", {dead} dead", style="bold red")
    if failures:
        text.append(" │ ")
        text.append("failures only", style="reverse")
    return text


class StatusLine(Panel):
    """One line; the app sets it on every render and every clock tick."""

    def show_status(self, status: Status, retry_left: float | None, totals: dict[str, int],
             failures: bool) -> None:
        self.show(status_text(status, retry_left, totals, failures))
        self.set_class(status.state == RECONNECTING, "-reconnecting")
