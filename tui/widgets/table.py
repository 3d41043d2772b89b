"""A lean keyed table for live data: rows by key, repainting only rows that changed.

The screens of :mod:`tui.screens` hand it the rows :mod:`tui.view` computed,
several times a second while a job runs.  Textual's DataTable throws away its
whole render cache on any cell update, so a 50-row job table cost about 20 ms
of CPU per repaint; following a busy job kept a quarter of a core busy just
redrawing text that had not changed.  This widget uses Textual's line API
instead: each row is rendered once into a :class:`~textual.strip.Strip` and
cached under its key until one of its cells changes, so a repaint costs a
dictionary lookup per visible line plus the rows that really moved.

It keeps the cursor on the same *row key* (not the same index) when the order
changes, so a person's selection does not jump when a machine fails and moves
to the top.  Keys: up/down, page up/down, home/end move; enter selects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, NamedTuple

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip


class Cell(NamedTuple):
    """Text plus a Rich style string ('' for the default); cheap to compare."""

    text: str
    style: str = ""


class Column(NamedTuple):
    key: str
    label: str
    width: int | None  # None: take the width left over (one such column at most)
    right: bool = False  # numbers line up on the right


PAD = 1  # cells of padding on each side of every column


def fit(text: str, width: int, right: bool = False) -> str:
    """``text`` cut with '…' or padded to exactly ``width`` terminal cells."""
    if width <= 0:
        return ""
    n = cell_len(text)
    if n > width:
        out, used = [], 0
        for ch in text:
            w = cell_len(ch)
            if used + w > width - 1:
                break
            out.append(ch)
            used += w
        return "".join(out) + "…" + " " * (width - 1 - used)
    return (" " * (width - n) + text) if right else (text + " " * (width - n))


class RowTable(ScrollView, can_focus=True):
    """Rows by key, cells as :class:`Cell`; see the module docstring."""

    DEFAULT_CSS = """
    RowTable {
        background: $surface;
        color: $foreground;
        height: 1fr;
    }
    RowTable > .row-table--header {
        text-style: bold;
        background: $panel;
        color: $foreground;
    }
    RowTable > .row-table--cursor {
        background: $block-cursor-blurred-background;
    }
    RowTable:focus > .row-table--cursor {
        background: $block-cursor-background;
        color: $block-cursor-foreground;
        text-style: bold;
    }
    """
    COMPONENT_CLASSES: ClassVar[set[str]] = {"row-table--header", "row-table--cursor"}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "cursor_to(0)", "First", show=False),
        Binding("end", "cursor_to(-1)", "Last", show=False),
        Binding("enter", "select", "Select", show=False),
    ]

    class Highlighted(Message):
        """The cursor moved onto another row (or the table's rows changed under it)."""

        def __init__(self, table: RowTable, key: str | None) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> RowTable:
            return self.table

    class Selected(Message):
        """Enter (or a click on the row under the cursor) chose a row."""

        def __init__(self, table: RowTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> RowTable:
            return self.table

    def __init__(self, columns: Sequence[Column], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.spec = list(columns)
        self._keys: list[str] = []
        self._index: dict[str, int] = {}
        self._cells: dict[str, tuple[Cell, ...]] = {}
        self._strips: dict[str, Strip] = {}  # rendered rows, by key, at self._width
        self._styles: dict[str, Style] = {}
        self._width = 0
        self._widths: list[int] = []
        self.cursor = 0
        self.repaints = 0  # rows rendered, for tests and benchmarks

    # -- data -----------------------------------------------------------------------------

    def set_rows(self, rows: Sequence[tuple[str, Sequence[Cell]]]) -> None:
        """Show exactly these rows, in this order; only changed rows are re-rendered."""
        selected = self.selected_key()
        keys = [k for k, _ in rows]
        new_cells = {k: tuple(c) for k, c in rows}
        for k, cells in new_cells.items():
            if self._cells.get(k) != cells:
                self._strips.pop(k, None)
        for k in set(self._cells) - set(new_cells):
            self._strips.pop(k, None)
        order_changed = keys != self._keys
        self._cells = new_cells
        if order_changed:
            self._keys = keys
            self._index = {k: i for i, k in enumerate(keys)}
            self.virtual_size = Size(self._total_width(), len(keys) + 1)
            if selected is not None and selected in self._index:
                self.cursor = self._index[selected]
            self.cursor = min(self.cursor, max(0, len(keys) - 1))
            if self.selected_key() != selected:
                self.post_message(self.Highlighted(self, self.selected_key()))
        self.refresh()

    def selected_key(self) -> str | None:
        """The key of the row under the cursor, or None when the table is empty."""
        if not self._keys:
            return None
        return self._keys[min(self.cursor, len(self._keys) - 1)]

    def cell(self, key: str, column: str) -> Cell:
        """What one cell shows (tests and benchmarks read the screen this way)."""
        for col, cell in zip(self.spec, self._cells[key], strict=True):
            if col.key == column:
                return cell
        raise KeyError(column)

    def cell_text(self, key: str, column: str) -> str:
        return self.cell(key, column).text

    def row_text(self, key: str) -> str:
        """One row as the screen shows it at the current width, without styles."""
        if self._widths == [] or self._width != self._usable_width():
            self._width = self._usable_width()
            self._widths = self._column_widths(self._width)
            self._strips.clear()
        return self._render_cells(self._cells[key]).text

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    # -- geometry -------------------------------------------------------------------------

    def _column_widths(self, width: int) -> list[int]:
        fixed = sum((c.width or 0) + 2 * PAD for c in self.spec if c.width is not None)
        flexible = [c for c in self.spec if c.width is None]
        spare = max(10, width - fixed - 2 * PAD * len(flexible))
        return [c.width if c.width is not None else spare for c in self.spec]

    def _total_width(self) -> int:
        return sum(w + 2 * PAD for w in self._column_widths(self._usable_width()))

    def _usable_width(self) -> int:
        # Inside the scroll bars: the flexible column gives way when one appears.
        return max(0, self.scrollable_content_region.width)

    def on_resize(self, event: events.Resize) -> None:
        self._strips.clear()
        self.virtual_size = Size(self._total_width(), len(self._keys) + 1)

    # -- rendering ------------------------------------------------------------------------

    def _style(self, name: str) -> Style:
        s = self._styles.get(name)
        if s is None:
            s = self._styles[name] = Style.parse(name) if name else Style()
        return s

    def _render_cells(self, cells: Sequence[tuple[str, str]]) -> Strip:
        pad = " " * PAD
        segs: list[Segment] = []
        for (text, style), col, w in zip(cells, self.spec, self._widths, strict=True):
            segs.append(Segment(pad + fit(text, w, col.right) + pad, self._style(style)))
        return Strip(segs)

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        usable = self._usable_width()
        width = usable
        if usable != self._width:
            self._width = usable
            self._widths = self._column_widths(usable)
            self._strips.clear()
        base = self.rich_style
        if y == 0:  # the header stays put while the rows scroll
            head = base + self.get_component_rich_style("row-table--header")
            header = self._render_cells([(c.label, "") for c in self.spec])
            return header.apply_style(head).crop_extend(scroll_x, scroll_x + width, head)
        index = scroll_y + y - 1
        if index >= len(self._keys):
            return Strip.blank(width, base)
        key = self._keys[index]
        cached = self._strips.get(key)
        if cached is None:
            cached = self._strips[key] = self._render_cells(self._cells[key])
            self.repaints += 1
        strip = cached
        if index == self.cursor:
            cursor = self.get_component_rich_style("row-table--cursor")
            strip = strip.apply_style(base + cursor)
            return strip.crop_extend(scroll_x, scroll_x + width, base + cursor)
        return strip.apply_style(base).crop_extend(scroll_x, scroll_x + width, base)

    # -- cursor ---------------------------------------------------------------------------

    def _move(self, row: int) -> None:
        if not self._keys:
            return
        row = max(0, min(row, len(self._keys) - 1))
        if row != self.cursor:
            self.cursor = row
            self.post_message(self.Highlighted(self, self.selected_key()))
        # Row r sits on screen line r - scroll_y + 1, under the header on line 0.
        top = self.scroll_offset.y
        visible = max(1, self.scrollable_content_region.height - 1)
        if row < top:
            top = row
        elif row > top + visible - 1:
            top = row - visible + 1
        if top != self.scroll_offset.y:
            self.scroll_to(y=top, animate=False, immediate=True)
        self.refresh()

    def move_to(self, key: str) -> None:
        if key in self._index:
            self._move(self._index[key])

    def action_cursor(self, delta: int) -> None:
        self._move(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self._move(self.cursor + direction * max(1, self.size.height - 2))

    def action_cursor_to(self, row: int) -> None:
        self._move(row if row >= 0 else len(self._keys) - 1)

    def action_select(self) -> None:
        key = self.selected_key()
        if key is not None:
            self.post_message(self.Selected(self, key))

    def on_click(self, event: events.Click) -> None:
        index = self.scroll_offset.y + event.y - 1
        if 0 <= index < len(self._keys):
            if index == self.cursor:
                self.action_select()
            else:
                self._move(index)
