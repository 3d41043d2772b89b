"""A fixed-height text panel that repaints only when its text really changed.

Summary lines, the job header and the detail panels are rewritten on every
redraw, several times a second while a job runs.  ``Static.update`` would
re-layout the whole screen each time; these panels have a fixed height in
app.tcss, so a changed text only needs a repaint, and an unchanged one
nothing at all.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class Panel(Static):
    def show(self, content: Text | str) -> None:
        if isinstance(content, str):
            content = Text(content)
        old = self.content
        if isinstance(old, Text) and old == content and old.style == content.style:
            return
        self.update(content, layout=False)

    @property
    def plain(self) -> str:
        c = self.content
        return c.plain if isinstance(c, Text) else str(c)
