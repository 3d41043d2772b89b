"""Cut-through relays with real processes: chunks flow on from hosts still receiving them.

Real center and daemons on 127.0.0.1 (see ``conftest.py``).  The source's
upload is capped so that each chunk takes a while to leave it: the center
then names targets still receiving a chunk as peers for the others, and
their daemons stream it on as it lands.  A relay killed with kill -9 in the
middle breaks the fetches below it; they are retried elsewhere, the job
finishes, and every copy is byte-identical.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

MiB = 1024 * 1024


def streamed(c: Any, idx: list[int]) -> dict[int, int]:
    return {i: c.status(i)["chunks_streamed"] for i in idx}


def test_targets_relay_chunks_still_arriving_and_the_source_sends_one_copy(
        cluster_factory, tmp_path):
    c = cluster_factory(5, center_args=["--chunk-size", "1M"],
                        daemon_args={0: ["--upload-rate", "4M"]})
    path = str(tmp_path / "f.bin")
    want = c.write_random(path, 16 * MiB)
    served0 = c.status(0)["bytes_served"]
    res = c.submit([path], ["d1", "d2", "d3", "d4"])
    assert res["state"] == "done", res
    for i in (1, 2, 3, 4):
        assert c.sha256(c.dest_path(i, path)) == want
    relayed = streamed(c, [1, 2, 3, 4])
    # With the source at 4 MiB/s and the loopback far faster, the newest chunk
    # (held by nobody yet) is the only new content: targets took it from the
    # one receiving it rather than idle.  (Holders come first where free, so
    # older chunks went host to host the usual way.)
    assert sum(relayed.values()) >= 3, relayed
    # The source still sends about one copy: the relays carried the rest.
    assert c.status(0)["bytes_served"] - served0 <= 1.25 * 16 * MiB
    assert c.status(0)["chunks_streamed"] == 0  # it holds everything: nothing to relay


@pytest.mark.slow
def test_a_relay_killed_mid_chain_costs_a_retry_not_the_job(cluster_factory, tmp_path):
    c = cluster_factory(
        5, center_args=["--chunk-size", "1M", "--heartbeat-timeout", "2", "--grace-period", "60"],
        daemon_args={0: ["--upload-rate", "2M"],
                     **{i: ["--heartbeat-interval", "0.5"] for i in (1, 2, 3, 4)}})
    path = str(tmp_path / "f.bin")
    want = c.write_random(path, 24 * MiB)
    jid = c.submit_async([path], ["d1", "d2", "d3", "d4"])

    def relaying() -> int | None:
        # A target that has relayed chunks and holds some, but not all, of the file.
        ms = c.job_now(jid)["machines"]
        for i in (1, 2, 3, 4):
            if c.status(i)["chunks_streamed"] > 0 and 4 <= ms[f"d{i}"]["chunks_done"] <= 16:
                return i
        return None

    v = c.wait_until("a target relaying part-way", relaying, timeout=60, every=0.05)
    c.kill_daemon(v)
    others = [i for i in (1, 2, 3, 4) if i != v]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        res = c.job_now(jid)
        if all(res["machines"][f"d{i}"]["state"] == "done" for i in others):
            break
        time.sleep(0.2)
    res = c.job_now(jid)
    for i in others:
        m = res["machines"][f"d{i}"]
        assert m["state"] == "done", m
        assert c.sha256(c.dest_path(i, path)) == want
    # The killed relay is not failed (it may come back within the grace period)...
    assert res["machines"][f"d{v}"]["state"] not in ("done", "failed")
    # ...and back, it finishes too.
    c.start_daemon(v)
    res = c.wait_job(jid, 120)
    assert res["state"] == "done", res
    assert c.sha256(c.dest_path(v, path)) == want
