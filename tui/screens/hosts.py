"""The Hosts screen: every daemon, dead ones first, with live load and NIC history.

The NET column is a sparkline of transmit + receive rate over the last
heartbeats (a bounded ring buffer per host in :class:`tui.view.HostHistory`),
so a host that stopped moving bytes mid-job is visible at a glance.

APP, BUSY and LINK show what the center's scheduler steers by: the watched
app's CPU (percent of one core), the busyness the center makes of the load
(yellow from 0.5: fewer uploads, free slots not volunteered) and the link
speeds it has learned (yellow "slow": the host gets common chunks, not first
copies).  They come right after the host's CPU so that an 80-column terminal
still shows them; NET, FREE and I/O then scroll in sideways (left/right).
The whole table is 109 columns wide.  The panel under the table repeats them
for the highlighted host and says in words what being busy or slow costs it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType

from tui.screens.base import MonitorScreen, style_of
from tui.view import BUSY, FAIL, Changes, ClusterView, HostRow, human_bytes
from tui.widgets.panel import Panel
from tui.widgets.table import Cell, Column, RowTable

SPARK = 12
COLUMNS = [
    Column("name", "HOST", 14),
    Column("state", "UP", 4),
    Column("cpu", "CPU", 4, right=True),
    Column("app", "APP", 5, right=True),  # "1600%": a bidder on 16 cores
    Column("busy", "BUSY", 4, right=True),
    Column("tx", "TX/s", 6, right=True),
    Column("rx", "RX/s", 6, right=True),
    Column("link", "LINK", 18),  # "↑1023M ↓1023M slow" at the widest
    Column("net", "NET", SPARK),
    Column("free", "FREE", 7, right=True),
    Column("io", "I/O", 7),
]


def _warn(severity: str) -> str:
    """Colour only what costs a host work: a plain '0.12' or link stays plain."""
    return style_of(severity) if severity == BUSY else ""


class HostsScreen(MonitorScreen):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "app.show_jobs", "Back", show=False)]

    def __init__(self) -> None:
        super().__init__()
        self._rows: dict[str, HostRow] = {}
        self._hosts: dict[str, dict[str, Any]] = {}

    def compose(self) -> ComposeResult:
        yield self.compose_header()
        yield Panel(id="summary", classes="summary")
        yield RowTable(COLUMNS, id="hosts")
        yield Panel(id="host-detail", classes="detail")
        yield self.compose_status()
        yield self.compose_footer()

    def on_mount(self) -> None:
        self.sub_title = "Hosts"

    def wants(self, changes: Changes) -> bool:
        return changes.hosts

    def redraw(self, view: ClusterView, now: float, failures: bool) -> None:
        rows = view.host_rows(now, failures, spark_width=SPARK)
        self._rows = {r.name: r for r in rows}
        self._hosts = view.hosts
        self.query_one("#hosts", RowTable).set_rows([(r.name, [
            Cell(r.name, "bold red" if r.severity == FAIL else ""),
            Cell(r.status, style_of(r.severity)),
            Cell(r.cpu),
            Cell(r.app_cpu),
            Cell(r.busyness, _warn(r.busy_severity)),
            Cell(r.tx),
            Cell(r.rx),
            Cell(r.link, _warn(r.link_severity)),
            Cell(r.spark, "cyan"),
            Cell(r.free),
            Cell(r.inflight),
        ]) for r in rows])
        t = view.totals()
        self.query_one("#summary", Panel).show(
            f"{t['hosts']} hosts · {t['alive']} up · {t['dead']} dead"
            f" · {t['busy']} busy · {t['slow']} slow"
            + (" · dead hosts only" if failures else ""))
        self._show_detail(self.query_one("#hosts", RowTable).selected_key())

    def _show_detail(self, key: str | None) -> None:
        panel = self.query_one("#host-detail", Panel)
        row = self._rows.get(key) if key else None
        if row is None:
            panel.show("" if self._rows else "no hosts reported yet")
            return
        text = Text()
        text.append(row.name, style="bold")
        text.append(f"  {row.address}  ")
        text.append(row.status, style=style_of(row.severity))
        text.append(f"  last heartbeat {row.heartbeat} ago")
        if row.labels:
            text.append(f"  labels {row.labels}")
        if row.version:
            text.append(f"  v{row.version}")
        free = self._hosts.get(row.name, {}).get("free")
        if isinstance(free, dict) and free:
            text.append("\nfree: " + "  ".join(f"{k} {human_bytes(v)}"
                                                for k, v in sorted(free.items())))
        if row.alive:
            # The row's APP, BUSY and LINK again, then in words what they cost
            # the host: an operator asking "why so few uploads?" reads it here.
            text.append(f"\napp {row.app_cpu}")
            if row.app_busy_at != "-":
                text.append(f" (busy at {row.app_busy_at})")
            text.append("  busyness ")
            text.append(row.busyness, style=_warn(row.busy_severity))
            text.append("  link ")
            text.append(row.link, style=_warn(row.link_severity))
            if row.caps:
                text.append("\n" + row.caps)
            if row.steering:
                text.append("\n" + row.steering, style=style_of(BUSY))
        panel.show(text)

    def on_row_table_highlighted(self, event: RowTable.Highlighted) -> None:
        event.stop()
        self._show_detail(event.key)
