"""Drain notices end to end: real center and daemon processes on 127.0.0.1.

Targets capped with ``--download-rate`` fetch each chunk over tens of
milliseconds, long enough for ``fetch_lead`` to matter: while a multi-chunk job
runs, the targets send notices that their fetches are about to finish, the
center counts every one it received (accepted for the running job, or ignored),
the job completes byte-identical, and notices that name no running job, no
machine of it or no chunk of it change nothing.  With ``--fetch-lead 0`` no
notice is sent at all.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

MiB = 1024 * 1024
TARGETS = ["d1", "d2", "d3"]


def counter(metrics: dict[str, float], name: str, outcome: str) -> float:
    return metrics.get(f'{name}{{outcome="{outcome}"}}', 0.0)


def post_drains(c: Any, body: Any) -> tuple[int, Any]:
    req = urllib.request.Request(c.center.url + "/center/draining",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def daemon_drains(c: Any, i: int) -> dict[str, float]:
    m = c.daemon_metrics(i)
    return {k: counter(m, "fdship_drain_notices_total", k) for k in ("sent", "failed", "dropped")}


def test_notices_flow_during_a_capped_multi_chunk_job(cluster_factory, tmp_path):
    c = cluster_factory(
        4, center_args=["--chunk-size", "512K"],
        daemon_args={i: ["--heartbeat-interval", "0.5", "--download-rate", "6M",
                         "--fetch-lead", "0.05"] for i in range(4)})
    path = str(tmp_path / "f.bin")
    want = c.write_random(path, 12 * MiB)
    jid = c.submit_async([path], TARGETS)

    # While it runs: notices that must change nothing.
    c.wait_until("a chunk acked", lambda: any(
        c.machine(jid, n)["chunks_done"] >= 1 for n in TARGETS), timeout=60, every=0.02)
    junk = {"host": "d1", "drains": [
        {"job": "no-such-job", "file": 0, "chunk": 0, "peer": "d0"},  # unknown job
        {"job": jid, "file": 0, "chunk": 10**6, "peer": "d0"},  # no such chunk
        {"job": jid, "file": 7, "chunk": 0, "peer": "d0"},  # no such file
    ]}
    assert post_drains(c, junk) == (200, {"ok": True, "ignored": 3})
    stranger = {"host": "nobody", "drains": [{"job": jid, "file": 0, "chunk": 1, "peer": "d0"}]}
    assert post_drains(c, stranger) == (200, {"ok": True, "ignored": 1})
    no_chunk = {"host": "d1", "drains": [{"job": jid, "file": 0, "peer": "d0"}]}
    status, answer = post_drains(c, no_chunk)
    assert status == 400 and "missing field 'chunk'" in answer["error"]

    res = c.wait_job(jid, 120)
    assert res["state"] == "done", res
    for i in (1, 2, 3):
        assert c.sha256(c.dest_path(i, path)) == want, f"d{i} differs"

    sent = {i: daemon_drains(c, i) for i in range(4)}
    total_sent = sum(s["sent"] for s in sent.values())
    cm = c.center_metrics()
    accepted = counter(cm, "fdship_drain_notices_total", "accepted")
    ignored = counter(cm, "fdship_drain_notices_total", "ignored")
    print(f"\nnotices sent per daemon: { {f'd{i}': s['sent'] for i, s in sent.items()} }; "
          f"center accepted {accepted:.0f}, ignored {ignored:.0f}")
    # 24 chunks per target at ~6 MiB/s: most fetches last long enough to drain.
    assert total_sent >= 10, sent
    assert all(s["failed"] == 0 for s in sent.values()), sent
    # Every notice a daemon sent was counted; ours (4 junk) come on top.
    assert accepted + ignored == total_sent + 4
    assert accepted >= 1
    # The source fetches nothing, so it has nothing to drain.
    assert sent[0]["sent"] == 0


def test_fetch_lead_zero_sends_no_notice(cluster_factory, tmp_path):
    c = cluster_factory(
        3, center_args=["--chunk-size", "256K"],
        daemon_args={i: ["--heartbeat-interval", "0.5", "--download-rate", "4M",
                         "--fetch-lead", "0"] for i in range(3)})
    path = str(tmp_path / "g.bin")
    want = c.write_random(path, 3 * MiB)
    res = c.submit([path], ["d1", "d2"])
    assert res["state"] == "done", res
    for i in (1, 2):
        assert c.sha256(c.dest_path(i, path)) == want
        assert daemon_drains(c, i) == {"sent": 0, "failed": 0, "dropped": 0}
    cm = c.center_metrics()
    assert counter(cm, "fdship_drain_notices_total", "accepted") == 0
    assert counter(cm, "fdship_drain_notices_total", "ignored") == 0
