"""The scheduler's tunables reach a real center process: flags, config file, behaviour.

``upload_budget``, ``download_budget``, ``source_extra``, ``backoff_base`` and
``backoff_cap`` are config keys of ``fdship center`` that ``fdship.center.runner``
turns into the core's ``Tunables``.  The center logs them at start as its
scheduler holds them (read back from the scheduler, not from the config), so
a value that got lost on the way shows as the default there.  The retry
backoff is also checked by what it does: with a source that corrupts every
chunk it serves, a target's second attempt cannot start before the first
backoff has passed, so the machine fails no sooner than half of
``backoff_base`` (the jitter's lowest factor) after the job started.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

from fdship.localcluster import free_port


def _scheduling_line(log: str) -> dict[str, str]:
    lines = [ln for ln in log.splitlines() if "scheduling: " in ln]
    assert len(lines) == 1, log[-2000:]
    return dict(re.findall(r"(\w+)=(\S+)", lines[0].split("scheduling: ", 1)[1]))


def test_non_default_tunables_reach_the_scheduler_of_a_center_process(cluster_factory: Any,
                                                                       tmp_path: Any) -> None:
    """Three keys from a config file, two as flags (one of them beating the file)."""
    conf = tmp_path / "center.toml"
    conf.write_text('upload_budget = 2.5\nsource_extra = 0.35\nbackoff_cap = "45s"\n'
                    'download_budget = 9\n')
    c = cluster_factory(1, center_args=["--config", str(conf), "--download-budget", "1.75",
                                        "--backoff-base", "750ms"])
    got = _scheduling_line(c.center.log())
    assert got["upload_budget"] == "2.5"
    assert got["download_budget"] == "1.75"
    assert got["source_extra"] == "0.35"
    assert got["backoff_base"] == "0.75s"
    assert got["backoff_cap"] == "45s"


def test_default_tunables_are_logged_as_the_cores(cluster_factory: Any) -> None:
    c = cluster_factory(1)
    got = _scheduling_line(c.center.log())
    assert (got["upload_budget"], got["download_budget"], got["source_extra"],
            got["backoff_base"], got["backoff_cap"]) == ("1", "1", "0.1", "0.2s", "10s")


def test_a_bad_tunable_stops_the_center_with_one_line(tmp_path: Any) -> None:
    conf = tmp_path / "center.toml"
    conf.write_text("source_extra = 2\n")
    r = subprocess.run([sys.executable, "-m", "fdship", "center", "--listen",
                        f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "c"),
                        "--config", str(conf)], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "source_extra must be between 0" in lines[0] and "default is 0.1" in lines[0]


def test_backoff_base_spaces_the_retries_of_a_failing_chunk(cluster_factory: Any,
                                                            tmp_path: Any) -> None:
    """The source corrupts every chunk it serves; with max_attempts 2 the target fails
    after its second attempt, which waits backoff_base * (0.5 to 1.5) after the first.
    With the default (0.2 s) it would fail within a fraction of a second."""
    base = 4.0
    c = cluster_factory(2, center_args=["--chunk-size", "64K", "--max-attempts", "2",
                                        "--backoff-base", f"{base:g}s",
                                        "--backoff-cap", f"{base:g}s"],
                        daemon_args={0: ["--fault-inject", "corrupt=1",
                                         "--allow-fault-injection"]})
    src = str(tmp_path / "one-chunk.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(1000))
    res = c.submit([src], ["d1"], timeout=120)
    m = res["machines"]["d1"]
    assert res["state"] == "failed" and m["state"] == "failed", res
    assert "failed 2 times" in m["error"], m
    assert m["attempts"] == 2, m
    # The second attempt could not start before 0.5 * base had passed.
    assert m["seconds"] >= 0.5 * base, m
    assert not os.path.exists(c.dest_path(1, src))
    print(f"\nmachine failed after {m['seconds']:.2f} s with backoff_base {base:g} s "
          f"(the retry waited 0.5-1.5 x that)")
