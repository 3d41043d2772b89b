"""Widgets of ``fdship-tui``: a keyed table that updates in place, text panels, the status line."""

from tui.widgets.panel import Panel
from tui.widgets.status import StatusLine
from tui.widgets.table import Cell, Column, RowTable

__all__ = ["Cell", "Column", "Panel", "RowTable", "StatusLine"]
