"""Write docs/tui-jobs.svg (and docs/tui-job.svg): fdship-tui on realistic fixture data.

Run from the repository root after a deliberate change of the TUI's look::

    python tests/tui/make_screenshot.py [OUTPUT_DIR]

The data and the clock are the fixed ones of the snapshot tests, so the
pictures only change when the TUI does.
"""

from __future__ import annotations

import asyncio
import os
import sys

import tui_fixtures as fx
from tui_helpers import fixture_app, ready, settled, table

from tui.screens import JobScreen


async def shoot(out_dir: str) -> list[str]:
    app = fixture_app(fx.source())
    written = []
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        written.append(app.save_screenshot("tui-jobs.svg", path=out_dir))
        await pilot.press("enter")
        await settled(pilot, lambda: isinstance(app.screen, JobScreen)
                      and len(table(app, "#machines").keys) == 12, what="the job screen")
        written.append(app.save_screenshot("tui-job.svg", path=out_dir))
    return written


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "..", "docs")
    for path in asyncio.run(shoot(os.path.abspath(out))):
        print(path)


if __name__ == "__main__":
    main()
