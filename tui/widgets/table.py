"""A DataTable that takes whole rows by key and changes only the cells that moved.

The screens of :mod:`tui.screens` hand it the rows :mod:`tui.view` computed,
several times a second while a job runs.  Rebuilding a 50-row table on every
event would burn the CPU the monitored hosts need, so when the row keys come
in the same order it updates just the cells whose text or style changed, and
it keeps the cursor on the same *row key* (not the same index) when the order
does change, so a person's selection does not jump when a machine fails.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from rich.text import Text
from textual.widgets import DataTable


class Cell(NamedTuple):
    """Text plus a style name ('' for the default); cheap to compare between updates."""

    text: str
    style: str = ""


class Column(NamedTuple):
    key: str
    label: str
    width: int | None  # None: as wide as the content
    right: bool = False  # numbers line up on the right


class RowTable(DataTable[Text]):
    """Rows by key, cells as :class:`Cell`; see the module docstring."""

    def __init__(self, columns: Sequence[Column], *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=False)
        self.spec = list(columns)
        self._keys: list[str] = []
        self._cells: dict[str, tuple[Cell, ...]] = {}

    def on_mount(self) -> None:
        self._ensure_columns()

    def _ensure_columns(self) -> None:
        # The screen may hand rows over before this widget's own mount handler ran.
        if self.columns:
            return
        for col in self.spec:
            label = Text(col.label, justify="right" if col.right else "left")
            self.add_column(label, key=col.key, width=col.width)

    def _text(self, col: Column, cell: Cell) -> Text:
        return Text(cell.text, style=cell.style, justify="right" if col.right else "left",
                    no_wrap=True, overflow="ellipsis")

    def set_rows(self, rows: Sequence[tuple[str, Sequence[Cell]]]) -> None:
        self._ensure_columns()
        keys = [k for k, _ in rows]
        if keys == self._keys:
            for key, cells in rows:
                old = self._cells.get(key, ())
                new = tuple(cells)
                if new == old:
                    continue
                for i, (col, cell) in enumerate(zip(self.spec, new)):
                    if i >= len(old) or old[i] != cell:
                        self.update_cell(key, col.key, self._text(col, cell),
                                         update_width=col.width is None)
                self._cells[key] = new
            return
        selected = self.selected_key()
        self.clear()
        self._cells = {}
        for key, cells in rows:
            self.add_row(*(self._text(c, cell) for c, cell in zip(self.spec, cells)), key=key)
            self._cells[key] = tuple(cells)
        self._keys = keys
        if selected in self._cells:
            self.move_cursor(row=keys.index(selected), animate=False)

    def selected_key(self) -> str | None:
        """The key of the row under the cursor, or None when the table is empty."""
        if not self._keys or not 0 <= self.cursor_row < len(self._keys):
            return None
        return self._keys[self.cursor_row]

    def cell_text(self, key: str, column: str) -> str:
        """The plain text shown in one cell (tests and benchmarks read the screen this way)."""
        value = self.get_cell(key, column)
        return value.plain if isinstance(value, Text) else str(value)

    @property
    def keys(self) -> list[str]:
        return list(self._keys)
