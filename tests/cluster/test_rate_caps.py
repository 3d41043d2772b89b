"""``--upload-rate`` and ``--download-rate`` hold on real daemons, sendfile included.

Where it sits: cluster-level checks of the token buckets in
:mod:`fdship.daemon.ratelimit` as the serving (:mod:`fdship.daemon.serve`,
zero-copy ``sendfile`` in slices) and fetching (:mod:`fdship.daemon.fetch`)
paths use them.  A center and two daemons run as real processes on loopback,
which is far faster than the caps, so the cap is the only thing holding the
rate.  The rate is sampled from the daemons' own byte counters while the job
runs and printed; the band asserted is loose (the machine is shared): below
1.3 x the cap, and not absurdly low.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from fdship.demo import generate
from fdship.localcluster import LocalCluster

MiB = 1024 * 1024
CAP = 20 * MiB  # "20M" on the command line: sizes are powers of 1024


def shipped_rate(daemon_args: dict[int, list[str]], counter: str, watch: int,
                 size: int = 64 * MiB) -> tuple[float | None, float]:
    """Ship a file from d0 to d1; return (steady rate of ``counter`` on daemon ``watch``
    from the first byte on, after the bucket's initial burst), and the job's own rate)."""
    with LocalCluster(2, daemon_args=daemon_args) as c:
        src = os.path.join(c.tmp, "payload.bin")
        generate(src, size, seed=5)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            url = c.daemons[watch].url + "/daemon/status"
            deadline = time.monotonic() + 120
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    samples.append((time.monotonic(), int(c.request("GET", url)[counter])))
                except OSError:
                    pass
                stop.wait(0.1)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            res = c.submit([src], ["d1"], dest="/data")
        finally:
            stop.set()
            th.join(10)
        assert res["state"] == "done", res
        landed = os.path.join(c.root(1), "data", "payload.bin")
        assert os.path.getsize(landed) == size
        seconds = res["machines"]["d1"]["seconds"]
    # From the first sample that saw bytes moving to the last before completion,
    # leaving out the first quarter second of a cap (the bucket's burst).
    moving = [(t, b) for t, b in samples if 0 < b < size]
    if len(moving) < 10:
        return None, size / seconds  # too quick to sample (no cap)
    t0, b0 = moving[0]
    t1, b1 = moving[-1]
    steady = (b1 - b0) / (t1 - t0)
    return steady, size / seconds


@pytest.mark.parametrize("flag,counter,watch", [
    ("--upload-rate", "bytes_served", 0),
    ("--download-rate", "bytes_received", 1),
])
def test_cap_holds(flag: str, counter: str, watch: int) -> None:
    steady, overall = shipped_rate({watch: [flag, "20M"]}, counter, watch)
    assert steady is not None, "the capped transfer ended too soon to sample: the cap failed"
    print(f"{flag} 20M: steady {steady / MiB:.1f} MiB/s, whole job {overall / MiB:.1f} MiB/s "
          f"(cap {CAP / MiB:.0f} MiB/s)")
    assert steady < 1.3 * CAP
    assert overall < 1.3 * CAP
    assert steady > 0.3 * CAP  # it did run at about the cap, not at a crawl


def test_uncapped_loopback_is_far_faster_than_the_cap() -> None:
    """The control: without a cap the same transfer runs well above 20 MiB/s,
    so the capped runs above measured the cap and not the machine."""
    _, overall = shipped_rate({}, "bytes_served", 0)
    print(f"uncapped: whole job {overall / MiB:.1f} MiB/s")
    assert overall > 1.5 * CAP
