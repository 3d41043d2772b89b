"""The Job screen: one job's machines, failures first, with the full error reason.

The table shows one line per target machine; the panel under it spells out
the highlighted machine (chunks, bytes, attempts and the whole error, which a
table cell would cut).  Escape goes back to the Jobs screen.
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType

from tui.screens.base import MonitorScreen, style_of
from tui.view import FAIL, Changes, ClusterView, MachineRow
from tui.widgets.panel import Panel
from tui.widgets.table import Cell, Column, RowTable

FIXED = [
    Column("machine", "MACHINE", 16),
    Column("state", "STATE", 8),
    Column("pct", "DONE", 4, right=True),
    Column("rate", "RATE", 11, right=True),
    Column("eta", "ETA", 6, right=True),
    Column("attempts", "TRY", 3, right=True),
]
COLUMNS = FIXED + [Column("error", "ERROR", None)]  # takes the width left over


class JobScreen(MonitorScreen):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "back", "Back")]

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id
        self.loading_error = ""
        self._rows: dict[str, MachineRow] = {}

    def compose(self) -> ComposeResult:
        yield self.compose_header()
        yield Panel(id="job-header", classes="job-header")
        yield RowTable(COLUMNS, id="machines")
        yield Panel(id="machine-detail", classes="detail")
        yield self.compose_status()
        yield self.compose_footer()

    def on_mount(self) -> None:
        self.sub_title = f"Job {self.job_id}"

    def wants(self, changes: Changes) -> bool:
        return self.job_id in changes.job_ids or changes.jobs

    def redraw(self, view: ClusterView, now: float, failures: bool) -> None:
        h = view.header(self.job_id, now)
        head = Text(no_wrap=True, overflow="ellipsis")
        head.append(f"job {h.job}  ", style="bold")
        head.append(h.state, style=style_of(h.severity))
        head.append(f"  {h.bar} {h.percent}  {h.rate}\n")
        head.append(f"from {h.source} · {h.files} · {h.size} · started {h.created}"
                    f" · took {h.took}\n")
        head.append("machines: ")
        head.append(h.machines, style="bold red" if h.severity == FAIL else "")
        if failures:
            head.append(" │ failures only", style="reverse")
        self.query_one("#job-header", Panel).show(head)

        rows = view.machine_rows(self.job_id, failures)
        table = self.query_one("#machines", RowTable)
        self._rows = {r.machine: r for r in rows}
        table.set_rows([(r.machine, [
            Cell(r.machine, "bold red" if r.severity == FAIL else ""),
            Cell(r.state, style_of(r.severity)),
            Cell(r.percent),
            Cell(r.rate),
            Cell(r.eta),
            Cell(str(r.attempts) if r.attempts else "·"),
            # The table cuts it to fit; the panel below shows it whole.
            Cell(r.error, "red") if r.error else
            Cell(f"retrying: {r.last_error}", "yellow") if r.last_error else Cell(""),
        ]) for r in rows])
        self._show_detail(table.selected_key(), view)

    def _show_detail(self, key: str | None, view: ClusterView) -> None:
        panel = self.query_one("#machine-detail", Panel)
        row = self._rows.get(key) if key else None
        if row is None:
            if self.loading_error:
                panel.show(Text(self.loading_error, style="bold red"))
            elif not view.has_detail(self.job_id):
                panel.show("loading machines…")
            else:
                panel.show("no machines to show")
            return
        text = Text()
        text.append(row.machine, style="bold")
        text.append(f"  {row.state}", style=style_of(row.severity))
        text.append(f"  {row.chunks} chunks  {row.bytes}  attempts {row.attempts}")
        if row.took != "-":
            text.append(f"  {'failed after' if row.state == 'failed' else 'took'} {row.took}")
        if row.error:
            text.append("\nerror: ", style="bold red")
            text.append(row.error, style="red")
        elif row.last_error:
            text.append("\nlast attempt failed: ", style="bold yellow")
            text.append(row.last_error, style="yellow")
        panel.show(text)

    def on_row_table_highlighted(self, event: RowTable.Highlighted) -> None:
        event.stop()
        self._show_detail(event.key, self.monitor.view)

    def action_back(self) -> None:
        self.monitor.pop_screen()
