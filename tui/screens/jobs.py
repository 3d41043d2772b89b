"""The Jobs screen: every job the center knows, newest first.

Enter opens the highlighted job (:mod:`tui.screens.job`).  With the failures
filter on (``f``) it lists only jobs with a failed machine.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from tui.screens.base import MonitorScreen, style_of
from tui.view import FAIL, ClusterView, Changes, ellipsize
from tui.widgets.table import Cell, Column, RowTable

COLUMNS = [
    Column("job", "JOB", 20),
    Column("state", "STATE", 7),
    Column("pct", "DONE", 4, right=True),
    Column("machines", "OK/ALL", 7, right=True),
    Column("failed", "FAIL", 4, right=True),
    Column("rate", "RATE", 11, right=True),
    Column("age", "AGE", 6, right=True),
]


class JobsTable(RowTable):
    """The jobs table; its enter key opens the job, and says so in the footer."""

    BINDINGS = [Binding("enter", "select_cursor", "Open job")]


class JobsScreen(MonitorScreen):
    BINDINGS = [Binding("enter", "open_job", "Open job", show=False)]

    def compose(self) -> ComposeResult:
        yield self.compose_header()
        yield Static(id="summary", classes="summary")
        yield JobsTable(COLUMNS, id="jobs")
        yield Static("No jobs yet: submit one with 'fdship submit'.", id="empty",
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
            Cell(ellipsize(r.job, 20), "bold red" if r.severity == FAIL else ""),
            Cell(r.state, style_of(r.severity)),
            Cell(r.percent),
            Cell(r.machines),
            Cell(str(r.failed) if r.failed else "·", "bold red" if r.failed else "dim"),
            Cell(r.rate),
            Cell(r.age),
        ]) for r in rows])
        t = view.totals()
        what = "failed jobs" if failures else "jobs"
        self.query_one("#summary", Static).update(
            f"{len(rows)} {what} shown · {t['running']} running · {t['failed']} failed"
            " · enter opens a job")
        empty = self.query_one("#empty", Static)
        empty.display = not rows
        if failures:
            empty.update("No failed jobs.")
        else:
            empty.update("No jobs yet: submit one with 'fdship submit'.")

    def action_open_job(self) -> None:
        key = self.query_one("#jobs", RowTable).selected_key()
        if key is not None:
            self.monitor.open_job(key)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.monitor.open_job(event.row_key.value)
