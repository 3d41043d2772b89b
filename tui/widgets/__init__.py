"""Widgets of ``fdship-tui``: a keyed table that updates in place, the status line."""

from tui.widgets.status import StatusLine
from tui.widgets.table import Cell, RowTable

__all__ = ["Cell", "RowTable", "StatusLine"]
