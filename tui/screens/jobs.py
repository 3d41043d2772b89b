"""The Jobs screen: every job the center knows, newest first.

Enter opens the highlighted job (:mod:`tui.screens.job`).  With the failures
filter on (``f``) it lists only jobs with a failed machine.
"""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType

from tui.screens.base import MonitorScreen, style_of
from tui.view import FAIL, Changes, ClusterView
from tui.widgets.panel import Panel
from tui.widgets.table import Cell, Column, RowTable

COLUMNS = [
    Column("job", "JOB", 24),  # the center's ids: 20261122T120333762Z-e444
    Column("state", "STATE", 7),
    Column("pct", "DONE", 4, right=True),
    Column("machines", "OK/ALL", 7, right=True),
    Column("failed", "FAIL", 4, right=True),
    Column("rate", "RATE", 11, right=True),
    Column("age", "AGE", 6, right=True),
]


class JobsTable(RowTable):
    """The jobs table; its enter key opens the job, and says so in the footer."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select", "Open job")]


class JobsScreen(MonitorScreen):

    def compose(self) -> ComposeResult:
        yield self.compose_header()
        yield Panel(id="summary", classes="summary")
        yield JobsTable(COLUMNS, id="jobs")
        yield Panel("No jobs yet: submit one with 'fdship submit'.", id="empty",
                     classes="empty")
        yield self.compose_status()
        yield self.compose_footer()

    def on_mount(self) -> None:
        self.sub_title = "Jobs"

    def wants(self, changes: Changes) -> bool:
        return changes.jobs

    def redraw(self, view: ClusterView, now: float, failures: bool) -> None:
        rows = view.job_rows(now, failures)
        table = self.query_one("#jobs", RowTable)
        table.set_rows([(r.job, [
            Cell(r.job, "bold red" if r.severity == FAIL else ""),
            Cell(r.state, style_of(r.severity)),
            Cell(r.percent),
            Cell(r.machines),
            Cell(str(r.failed) if r.failed else "·", "bold red" if r.failed else "dim"),
            Cell(r.rate),
            Cell(r.age),
        ]) for r in rows])
        t = view.totals()
        what = ("failed job" if failures else "job") + ("" if len(rows) == 1 else "s")
        self.query_one("#summary", Panel).show(
            f"{len(rows)} {what} shown · {t['running']} running · {t['failed']} failed"
            " · enter opens a job")
        empty = self.query_one("#empty", Panel)
        empty.display = not rows
        if failures:
            empty.show("No failed jobs.")
        else:
            empty.show("No jobs yet: submit one with 'fdship submit'.")

    def on_row_table_selected(self, event: RowTable.Selected) -> None:
        event.stop()
        self.monitor.open_job(event.key)
