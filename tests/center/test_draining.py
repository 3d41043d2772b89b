"""Drain notices at the center: the wire message, POST /center/draining, the runner.

A drain notice (``fdship.protocol.DrainBatch``) says a fetch is about to
finish.  The center must take it as a soft event: validate it, hand
``FetchDraining`` to the scheduler, answer at once, log nothing and fsync
nothing.  These tests run a real center in the test's event loop (runner, REDO
log, HTTP on a loopback port) so they can also hold its single writer still
and look at its scheduler afterwards.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from fdship import protocol as P
from fdship.center.client import CenterClient
from fdship.core.events import HostReported
from fdship.errors import BadRequest, ProtocolError
from tests.center.conftest import InProcessCenter, center_in_process
from tests.daemon.conftest import run

TOKEN = "drain-test-token"


def batch(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"host": "t1", "drains": [{"job": "J", "file": 0, "chunk": 3,
                                                    "peer": "src"}]}
    d.update(over)
    return d


# ---------------------------------------------------------------------- the message


def test_drain_batch_round_trips() -> None:
    b = P.DrainBatch(host="web-7", drains=(P.Drain(job="J1", file=2, chunk=17, peer="web-3"),
                                           P.Drain(job="J2", file=0, chunk=0, peer="src")))
    assert P.DrainBatch.from_json(b.to_json()) == b
    assert b.to_json() == {"host": "web-7", "drains": [
        {"job": "J1", "file": 2, "chunk": 17, "peer": "web-3"},
        {"job": "J2", "file": 0, "chunk": 0, "peer": "src"}]}


@pytest.mark.parametrize("body, words", [
    ([], "drain batch must be a JSON object"),
    (batch(host=None), "drain batch: missing field 'host'"),
    (batch(host=""), "'host' must be 1-255 characters"),
    (batch(host=7), "field 'host' must be a string"),
    (batch(drains=[]), "'drains' is empty"),
    (batch(drains="x"), "field 'drains' must be a list"),
    (batch(drains=[{"job": "J", "file": 0, "chunk": -1, "peer": "p"}]),
     "field 'chunk' must be between 0 and 2^62"),
    (batch(drains=[{"job": "J", "file": True, "chunk": 0, "peer": "p"}]),
     "field 'file' must be an integer, not a boolean"),
    (batch(drains=[{"job": "J", "file": 0, "chunk": 0}]), "missing field 'peer'"),
    (batch(drains=[{"job": "", "file": 0, "chunk": 0, "peer": "p"}]),
     "'job' and 'peer' must be 1-255 characters"),
    (batch(drains=[["J", 0, 0, "p"]]), "drain notice must be a JSON object"),
    (batch(drains=[{"job": "J", "file": 0, "chunk": 0, "peer": "p"}] * 1001),
     "at most 1000 notices per request"),
])
def test_bad_drain_batches_are_refused_with_a_sentence(body: Any, words: str) -> None:
    with pytest.raises(ProtocolError) as ei:
        P.DrainBatch.from_json(body)
    assert words in str(ei.value)


# ---------------------------------------------------------------------- the endpoint


def test_endpoint_refuses_bad_input_with_4xx_and_changes_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with center_in_process(tmp_path / "c", token=TOKEN) as c:
            lsn = c.runner.redo.lsn
            cases: list[tuple[bytes | None, Any, int, str]] = [
                (b"{not json", None, 400, "request body is not valid JSON"),
                (b"", None, 400, "request body is empty"),
                (None, batch(drains=[]), 400, "'drains' is empty"),
                (None, batch(drains=[{"job": "J", "file": 0, "chunk": -4, "peer": "p"}]), 400,
                 "field 'chunk' must be between 0 and 2^62"),
                (None, {"drains": [{"job": "J", "file": 0, "chunk": 0, "peer": "p"}]}, 400,
                 "missing field 'host'"),
            ]
            for raw, obj, status, words in cases:
                code, answer = await c.post(P.CENTER_DRAINING, obj, raw=raw)
                assert code == status, (raw, obj, answer)
                assert isinstance(answer, dict) and words in answer["error"], answer
            code, answer = await c.post(P.CENTER_DRAINING, batch(), token="wrong")
            assert code == 401 and "Authorization: Bearer" in answer["error"]
            code, answer = await c.post(P.CENTER_DRAINING, batch(), token="")
            assert code == 401
            assert c.sample("fdship_drain_notices_total", outcome="accepted") == 0
            assert c.sample("fdship_drain_notices_total", outcome="ignored") == 0
            assert c.runner.redo.lsn == lsn

    run(body())


def test_notice_for_unknown_job_or_chunk_is_accepted_harmlessly(tmp_path: Path) -> None:
    async def body() -> None:
        async with center_in_process(tmp_path / "c", token=TOKEN) as c:
            lsn, fsyncs = c.runner.redo.lsn, c.fsyncs()
            code, answer = await c.post(P.CENTER_DRAINING, batch(drains=[
                {"job": "no-such-job", "file": 0, "chunk": 0, "peer": "p"},
                {"job": "another", "file": 9, "chunk": 2**40, "peer": "q"}]))
            assert (code, answer) == (200, {"ok": True, "ignored": 2})
            # The typed client says the same.
            ignored = await CenterClient(c.url, TOKEN).draining(P.DrainBatch(
                host="ghost", drains=(P.Drain(job="nope", file=0, chunk=1, peer="p"),)))
            assert ignored == 1
            assert c.sample("fdship_drain_notices_total", outcome="ignored") == 3
            assert c.sample("fdship_drain_notices_total", outcome="accepted") == 0
            assert c.runner.inbox.qsize() == 0  # nothing reached the writer
            assert (c.runner.redo.lsn, c.fsyncs()) == (lsn, fsyncs)
            with pytest.raises(BadRequest) as ei:
                await CenterClient(c.url, "wrong").draining(P.DrainBatch(
                    host="ghost", drains=(P.Drain(job="nope", file=0, chunk=1, peer="p"),)))
            assert ei.value.status == 401

    run(body())


# ---------------------------------------------------------------------- the runner


def _running_job(c: InProcessCenter, address: str, nchunks: int) -> tuple[str, int, str]:
    """Register a source and a one-download target, submit a job of ``nchunks`` chunks
    through the runner's own code, and return (job, the chunk in flight, its peer).

    The runner is not started: decisions are made here, so their pulls are not sent."""
    r = c.runner
    now = r.clock()
    for name, downloads in (("src", 4), ("t1", 1)):
        beat = P.Heartbeat(name=name, address=address, boot_id="boot-" + name,
                           free={"/": 10**12}, max_downloads=downloads, max_uploads=4)
        r._process(HostReported(beat=beat), now)
    cs = 4096
    spec = P.FileSpec(path="/src/f.bin", dest="/dst/f.bin", size=nchunks * cs,
                      xxh3="0123456789abcdef", chunks=tuple(f"{i:016x}" for i in range(nchunks)))
    req = P.JobRequest(source="src", files=(spec,), machines=("t1",), chunk_size=cs)
    ev = r.sched.admit(req, r.new_job_id(now), now)
    r._process(ev, now)
    r.redo.sync()
    m = r.sched.jobs[ev.job].machines["t1"]
    assert len(m.inflight) == 1, m.inflight  # one download slot: one fetch
    (g, (peer, *_)), = m.inflight.items()
    return ev.job, g, peer


def test_notice_is_answered_without_the_writer_and_frees_the_slots_without_fsync(
        tmp_path: Path, mute_peer: str) -> None:
    """The handler answers while the single writer is stopped (so it cannot be waiting
    for a group commit); once the writer runs, the notice frees the fetch's slots, the
    target gets its next chunk at once, and neither a record nor an fsync was made."""

    async def body() -> None:
        async with center_in_process(tmp_path / "c", start=False, heartbeat_timeout=600,
                                     grace_period=600) as c:
            job, g, peer = _running_job(c, mute_peer, nchunks=3)
            r = c.runner
            m = r.sched.jobs[job].machines["t1"]
            assert g in m.loads
            lsn, fsyncs = r.redo.lsn, c.fsyncs()

            t0 = time.monotonic()
            code, answer = await c.post(P.CENTER_DRAINING, {"host": "t1", "drains": [
                {"job": job, "file": 0, "chunk": g, "peer": peer}]}, timeout=5)
            took = time.monotonic() - t0
            assert (code, answer) == (200, {"ok": True, "ignored": 0})
            assert took < 5
            assert r.inbox.qsize() == 1  # queued for the writer, which is not running
            assert g in m.loads  # ... so nothing was decided yet
            assert c.sample("fdship_drain_notices_total", outcome="accepted") == 1

            r.start()
            for _ in range(500):
                if r.stats["pulls_sent"] >= 1:
                    break
                await asyncio.sleep(0.01)
            # The slots went back; the chunk stays in flight until its ack...
            assert g not in m.loads
            assert g in m.inflight
            # ... and the freed download slot went to the next chunk at once.
            assert r.stats["pulls_sent"] == 1
            assert len(m.inflight) == 2
            assert (r.redo.lsn, c.fsyncs()) == (lsn, fsyncs)

            # A stale notice (same chunk again) changes nothing; an ack is durable
            # and fsyncs, which shows the fsync counter above could have moved.
            code, _ = await c.post(P.CENTER_DRAINING, {"host": "t1", "drains": [
                {"job": job, "file": 0, "chunk": g, "peer": peer}]})
            assert code == 200
            await asyncio.sleep(0.1)
            assert r.stats["pulls_sent"] == 1 and len(m.inflight) == 2
            code, _ = await c.post(P.CENTER_ACK, P.AckBatch(host="t1", acks=(P.Ack(
                job=job, file=0, chunk=g, peer=peer, ok=True, nbytes=4096),)).to_json())
            assert code == 200
            assert c.fsyncs() == fsyncs + 1 and r.redo.lsn > lsn
            assert g in m.have and g not in m.inflight

    run(body())


def test_notify_refuses_durable_events(tmp_path: Path) -> None:
    """Runner.notify is for soft events only: a durable one must be logged and waited for."""
    from fdship.core.events import FilePacked

    async def body() -> None:
        async with center_in_process(tmp_path / "c") as c:
            with pytest.raises(ValueError, match="durable"):
                c.runner.notify(FilePacked(job="J", host="h", file=0))
            assert c.runner.inbox.qsize() == 0

    run(body())
