"""The TUI benchmark runs end to end (short), and what it measures is sane.

The figures themselves are printed, not asserted: the machine is shared and
noisy.  The full run is ``python tests/tui/bench_tui.py`` (see docs/operations.md).
"""

from __future__ import annotations

import math

import bench_tui
import pytest


@pytest.mark.slow
def test_bench_follows_a_50_machine_job_and_measures(capsys: pytest.CaptureFixture[str]) -> None:
    out = bench_tui.main(["--seconds", "5", "--rate", "200", "--machines", "50"])
    printed = capsys.readouterr().out
    for name in ("isolated", "loaded"):
        r = out[name]
        assert r["machines_moving"] > 0, r  # progress reached the screen
        assert r["latencies"], r
        assert all(0 <= x < 30 for x in r["latencies"])  # seconds; a sanity bound only
        assert 0 < r["cpu"] and math.isfinite(r["cpu"])
        # Only rows that changed were rendered again, not every row on every redraw.
        assert r["rows_rendered"] < 50 * max(1, r["redraws"])
    assert out["loaded"]["machines_moving"] == 50  # every machine's progress got there
    assert out["loaded"]["events"] > out["isolated"]["events"]
    assert "latency center->screen: median" in printed and "TUI CPU:" in printed
