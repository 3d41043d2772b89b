"""``fdship-tui``: a terminal monitor that follows an fdship center live.

It only watches.  :mod:`tui.source` reads the center's read API (or fixtures),
:mod:`tui.view` turns what it read into rows without any UI code, and
:mod:`tui.app` with :mod:`tui.screens` and :mod:`tui.widgets` puts the rows on
screen with Textual.  Nothing in the ``fdship`` package imports this one, so
the center and the daemons never load Textual.
"""
