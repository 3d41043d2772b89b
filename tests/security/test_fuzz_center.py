"""Property-based fuzzing of every endpoint of a real, running center.

One center and two daemons run as processes on 127.0.0.1, with a token and one
finished job (so the fuzz can name real job and host ids as well as made-up
ones).  Hypothesis builds the requests: valid-shaped messages with fields
broken (wrong types, huge or negative numbers, NaN, lone surrogates, '..',
NUL bytes), random JSON, truncated bodies, raw bytes, other encodings, deep
nesting, wrong methods, junk query strings and path ids, and no token at all.

After every request the harness (``conftest.Fuzzer``) checks: no 5xx, strict
JSON in every answer, every process alive, and the center's jobs, hosts and
REDO log unchanged.  The only valid requests the fuzz may produce are
heartbeats, which register the fake host they name (``hb-...``): that change
is checked to touch that host only.  Reports (acks, fins, drain notices)
that name no running job are answered 200 but change nothing, which the
harness verifies like a rejection; drain notices, which are never logged,
are also checked against the center's counter: none reaches the scheduler.

``FDSHIP_FUZZ_EXAMPLES`` sets the examples per endpoint (default 150);
``FDSHIP_FUZZ_REPORT=file.json`` collects the counts for docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fdship import protocol as P
from fdship.errors import ProtocolError

from .conftest import (
    FUZZ_EXAMPLES,
    WEIRD_STR,
    Fuzzer,
    Req,
    SecCluster,
    Tally,
    encode,
    get_cases,
    path_ids,
    post_cases,
    record_tallies,
    stop_cluster,
    sweep,
)

FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
HEX = "0123456789abcdef"  # a well-formed xxh3-64


@pytest.fixture(scope="module")
def fz(tmp_path_factory: Any) -> Iterator[Fuzzer]:
    base = str(tmp_path_factory.mktemp("fuzz-center"))
    c = SecCluster(2, base, center_args=["--chunk-size", "64K", "--heartbeat-timeout", "60"],
                   daemon_args={i: ["--heartbeat-interval", "0.5"] for i in range(2)})
    try:
        c.start()
        src = os.path.join(base, "src.bin")
        with open(src, "wb") as f:
            f.write(os.urandom(200_000))
        res = c.request("POST", c.daemons[0].url + "/daemon/api",
                        {"files": [src], "machines": ["d1"]}, timeout=120)
        assert res["state"] == "done", res
        f = Fuzzer(c)
        f.job = res["job"]  # type: ignore[attr-defined]
        f.file = res["files"][0]  # type: ignore[attr-defined]
        yield f
        f.close()
        record_tallies(f.tallies)
    finally:
        stop_cluster(c)


def _job_id(fz: Fuzzer) -> Any:
    return st.sampled_from([fz.job, "20260101T000000000Z-0000", "nosuch-job"]) | WEIRD_STR


def _parses(parser: Any, body: bytes) -> Any:
    """The message the center would see, or None when it would refuse the body."""
    try:
        return parser(json.loads(body))
    except (ProtocolError, ValueError, TypeError, AttributeError, RecursionError, OverflowError):
        return None


def job_is_refused(body: bytes) -> bool:
    """A /center/job body the center could admit would start a real job: every
    valid-shaped one sent must name a machine that does not exist."""
    req = _parses(P.JobRequest.from_json, body)
    return req is None or any(m.startswith("nosuch") for m in req.machines)


def heartbeat_is_harmless(body: bytes, real: set[str]) -> bool:
    """A heartbeat the center would take must name a fake host (hb-...), never a real
    daemon, and nothing a job could target by address or label."""
    beat = _parses(P.Heartbeat.from_json, body)
    return beat is None or (
        beat.name.startswith("hb-") and beat.name not in real
        and all(label.startswith("hb-") for label in beat.labels)
        and beat.address.rpartition(":")[0].startswith("hb-"))


def only_the_named_host(body: bytes) -> Any:
    """allow_change for a heartbeat: the jobs are untouched, only its host may differ."""
    beat = _parses(P.Heartbeat.from_json, body)
    name = beat.name if beat is not None else None

    def check(before: dict[str, Any], after: dict[str, Any]) -> bool:
        changed = {h for h in set(before["hosts"]) | set(after["hosts"])
                   if before["hosts"].get(h) != after["hosts"].get(h)}
        return before["jobs"] == after["jobs"] and changed <= {name}
    return check


# ---------------------------------------------------------------------- POST endpoints


def job_example(fz: Fuzzer) -> dict[str, Any]:
    f = fz.file  # type: ignore[attr-defined]
    return {"source": "d0", "files": [{"path": f["path"], "dest": f["dest"], "size": f["size"],
                                       "xxh3": f["xxh3"], "chunks": [HEX] * 4}],
            "machines": ["d1", "nosuch-2"], "chunk_size": 65536, "callback": "", "notify": ""}


def beat_example() -> dict[str, Any]:
    return {"name": "hb-sweep", "address": "hb-x:1", "boot_id": "b1", "labels": ["hb-l"],
            "load": {"cpu": 1.0, "loadavg": 0.1, "net_tx": 0, "net_rx": 0, "disk_busy": 0,
                     "uploads": 0, "downloads": 0, "bytes_served": 0, "bytes_received": 0},
            "free": {"/": 10**9}, "allow_dest": ["/data"], "hooks": ["h"], "max_uploads": 4,
            "max_downloads": 4, "version": "0",
            "inventory": [{"job": "nosuch-job", "file": 0, "chunks": [0, 1], "packed": False}]}


def ack_example(fz: Fuzzer) -> dict[str, Any]:
    return {"host": "d1", "acks": [{"job": fz.job, "file": 0, "chunk": 0, "peer": "d0",  # type: ignore[attr-defined]
                                    "ok": False, "kind": "timeout", "error": "e",
                                    "bytes": 65536, "seconds": 0.01}]}


def fin_example(fz: Fuzzer) -> dict[str, Any]:
    return {"job": fz.job, "host": "d1", "file": 0, "ok": False, "error": "e",  # type: ignore[attr-defined]
            "kind": "local", "hook": {"exit": 0, "output": "x"}}


def drain_example(fz: Fuzzer) -> dict[str, Any]:
    return {"host": "d1", "drains": [{"job": fz.job, "file": 0, "chunk": 0,  # type: ignore[attr-defined]
                                      "peer": "d0"}]}


@pytest.mark.parametrize("path", [P.CENTER_JOB, P.CENTER_HEARTBEAT, P.CENTER_ACK, P.CENTER_FIN,
                                  P.CENTER_DRAINING])
def test_sweep_every_field_with_extreme_values(fz: Fuzzer, path: str) -> None:
    """Systematic part: every field of a valid-shaped message, each extreme value."""
    example = {P.CENTER_JOB: lambda: job_example(fz), P.CENTER_HEARTBEAT: beat_example,
               P.CENTER_ACK: lambda: ack_example(fz), P.CENTER_FIN: lambda: fin_example(fz),
               P.CENTER_DRAINING: lambda: drain_example(fz)}
    real = {d.name for d in fz.c.daemons}
    sent = 0
    for desc, obj in sweep(example[path]()):
        body = encode(obj)
        if path == P.CENTER_JOB and not job_is_refused(body):
            continue
        if path == P.CENTER_HEARTBEAT and not heartbeat_is_harmless(body, real):
            continue
        st_ = fz.check(f"POST {path}", fz.c.center.port, Req("POST", path, body,
                                                             kind="sweep " + desc),
                       allow_change=only_the_named_host(body)
                       if path == P.CENTER_HEARTBEAT else None)
        if path == P.CENTER_JOB:
            assert st_ >= 400
        sent += 1
    assert sent > 100


def job_template(fz: Fuzzer) -> Any:
    f = fz.file  # type: ignore[attr-defined]
    spec = {"path": f["path"], "dest": f["dest"], "size": f["size"], "xxh3": f["xxh3"],
            "chunks": [HEX[:16]] * 4}
    return st.fixed_dictionaries({
        "source": st.sampled_from(["d0", "d1", "nosuch-source"]),
        "files": st.just([spec]),
        "machines": st.sampled_from([["nosuch-1"], ["d1", "nosuch-2"], ["@nosuch-label"]]),
        "chunk_size": st.just(65536), "callback": st.just(""), "notify": st.just("")})


@FUZZ
@given(data=st.data())
def test_fuzz_center_job(fz: Fuzzer, data: Any) -> None:
    req: Req = data.draw(post_cases(P.CENTER_JOB, job_template(fz)))
    if req.body is not None:
        assume(job_is_refused(req.body))
    st_ = fz.check("POST /center/job", fz.c.center.port, req)
    assert st_ >= 400, "a fuzzed job was admitted"


def _beat_template() -> Any:
    return st.fixed_dictionaries({
        "name": st.text(max_size=10).map(lambda s: "hb-" + s),
        "address": st.sampled_from(["hb-x:1", "hb-y:7071"]),
        "boot_id": st.sampled_from(["b1", "b2"]),
        "labels": st.sampled_from([[], ["hb-l"]]),
        "load": st.just({"cpu": 1.0, "loadavg": 0.1, "net_tx": 0, "net_rx": 0, "disk_busy": 0,
                         "uploads": 0, "downloads": 0, "bytes_served": 0,
                         "bytes_received": 0}),
        "free": st.just({"/": 10**9}), "allow_dest": st.just([]), "hooks": st.just([]),
        "max_uploads": st.just(4), "max_downloads": st.just(4), "version": st.just("0"),
        "inventory": st.sampled_from([None, [], [{"job": "nosuch-job", "file": 0,
                                                 "chunks": [0, 1], "packed": False}]])})


@FUZZ
@given(data=st.data())
def test_fuzz_center_heartbeat(fz: Fuzzer, data: Any) -> None:
    req: Req = data.draw(post_cases(P.CENTER_HEARTBEAT, _beat_template(),
                                    weird={"name": WEIRD_STR.map(lambda s: "hb-" + s)}))
    real = {d.name for d in fz.c.daemons}
    body = req.body or b""
    if req.method == "POST":
        assume(heartbeat_is_harmless(body, real))
    fz.check("POST /center/heartbeat", fz.c.center.port, req,
             allow_change=only_the_named_host(body))


def _ack_template(fz: Fuzzer) -> Any:
    ack = st.fixed_dictionaries({
        "job": _job_id(fz), "file": st.sampled_from([0, 1, 7]),
        "chunk": st.sampled_from([0, 3, 99]), "peer": st.sampled_from(["d0", "d1", "x"]),
        "ok": st.booleans(), "kind": st.sampled_from(["", "timeout", "hash_mismatch", "local"]),
        "error": st.just(""), "bytes": st.just(65536), "seconds": st.just(0.01)})
    return st.fixed_dictionaries({"host": st.sampled_from(["d1", "d0", "hb-x", "nosuch"]),
                                  "acks": st.lists(ack, min_size=1, max_size=3)})


@FUZZ
@given(data=st.data())
def test_fuzz_center_ack(fz: Fuzzer, data: Any) -> None:
    req: Req = data.draw(post_cases(P.CENTER_ACK, _ack_template(fz)))
    fz.check("POST /center/ack", fz.c.center.port, req)


def _fin_template(fz: Fuzzer) -> Any:
    return st.fixed_dictionaries({
        "job": _job_id(fz), "host": st.sampled_from(["d1", "d0", "nosuch"]),
        "file": st.sampled_from([-1, 0, 1]), "ok": st.booleans(), "error": st.just(""),
        "kind": st.sampled_from(["", "local", "integrity"]),
        "hook": st.sampled_from([None, {}, {"exit": 0, "output": "x"}])})


@FUZZ
@given(data=st.data())
def test_fuzz_center_fin(fz: Fuzzer, data: Any) -> None:
    req: Req = data.draw(post_cases(P.CENTER_FIN, _fin_template(fz)))
    fz.check("POST /center/fin", fz.c.center.port, req)


def _drain_template(fz: Fuzzer) -> Any:
    drain = st.fixed_dictionaries({
        "job": _job_id(fz), "file": st.sampled_from([0, 1, 7]),
        "chunk": st.sampled_from([0, 3, 99]), "peer": st.sampled_from(["d0", "d1", "x"])})
    return st.fixed_dictionaries({"host": st.sampled_from(["d1", "d0", "hb-x", "nosuch"]),
                                  "drains": st.lists(drain, min_size=1, max_size=3)})


def _drain_counts(fz: Fuzzer) -> dict[str, float]:
    st_, data = fz.state_raw.send("GET", "/metrics", token=None)
    assert st_ == 200
    out = {}
    for line in data.decode().splitlines():
        if line.startswith("fdship_drain_notices_total{"):
            out[line.split('"')[1]] = float(line.split()[-1])
    assert set(out) == {"accepted", "ignored"}, out
    return out


@FUZZ
@given(data=st.data())
def test_fuzz_center_draining(fz: Fuzzer, data: Any) -> None:
    """Drain notices free slots at once and are never logged: fuzzed ones must be refused
    or ignored (no job runs), change nothing, and never reach the scheduler."""
    req: Req = data.draw(post_cases(P.CENTER_DRAINING, _drain_template(fz)))
    before = _drain_counts(fz)
    st_ = fz.check("POST /center/draining", fz.c.center.port, req)
    after = _drain_counts(fz)
    # No job runs while this test fuzzes (earlier jobs of the session may have
    # had real notices accepted): nothing fuzzed may count as accepted.
    assert after["accepted"] == before["accepted"], (before, after)
    if st_ == 200:  # a valid batch: every notice in it counted as ignored
        assert req.body is not None
        n = len(P.DrainBatch.from_json(json.loads(req.body)).drains)
        assert after["ignored"] == before["ignored"] + n, (before, after, req.body)
    else:
        assert after == before, (before, after)


# ---------------------------------------------------------------------- GET endpoints


@FUZZ
@given(data=st.data())
def test_fuzz_center_jobs(fz: Fuzzer, data: Any) -> None:
    req: Req = data.draw(get_cases(P.CENTER_JOBS, {
        "state": st.sampled_from(["running", "done", "failed", ""]),
        "limit": st.sampled_from(["1", "50", "1000", "0"]),
        "before": st.sampled_from([fz.job, "z", ""])}))
    fz.check("GET /center/jobs", fz.c.center.port, req)


@FUZZ
@given(data=st.data())
def test_fuzz_center_one_job(fz: Fuzzer, data: Any) -> None:
    req: Req = data.draw(get_cases(path_ids(P.CENTER_JOBS + "/", [fz.job]),
                                   {"wait": st.sampled_from(["0", "0.01", "1"])}))
    fz.check("GET /center/jobs/ID", fz.c.center.port, req)


@FUZZ
@given(data=st.data())
def test_fuzz_center_hosts(fz: Fuzzer, data: Any) -> None:
    req: Req = data.draw(get_cases(P.CENTER_HOSTS, {"name": st.just("d0")}))
    fz.check("GET /center/hosts", fz.c.center.port, req)


@FUZZ
@given(data=st.data(), last=st.none() | WEIRD_STR.filter(lambda s: s.isprintable()
                                                         and s.isascii() and s.strip() == s))
def test_fuzz_center_events(fz: Fuzzer, data: Any, last: str | None) -> None:
    req: Req = data.draw(get_cases(P.CENTER_EVENTS, {"since": st.sampled_from(["0", "1", "-1"])}))
    if last is not None and req.method == "GET":
        req.headers = {"Last-Event-ID": last}
    fz.check("GET /center/events", fz.c.center.port, req)


@pytest.mark.parametrize("label", ["GET /metrics", "other paths"])
@FUZZ
@given(data=st.data())
def test_fuzz_center_metrics_and_unknown_paths(fz: Fuzzer, label: str, data: Any) -> None:
    if label == "GET /metrics":
        req: Req = data.draw(get_cases(P.METRICS, {"name[]": st.just("x")}))
    else:
        req = data.draw(st.one_of(
            get_cases(path_ids("/center/", ["jobs", "hosts", "events", "job"]), {}),
            get_cases(path_ids("/", ["center", "daemon", "metrics"]), {})))
    fz.check(label, fz.c.center.port, req)


def test_fuzz_center_settles_and_raw_protocol_garbage(fz: Fuzzer) -> None:
    """Last: late effects show up, and bytes that are not HTTP at all break nothing."""
    fz.settle("late reports")
    junk = [b"\x00" * 100, b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
            b"POST /center/ack HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
            b"POST /center/ack HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST /center/ack HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET /center/hosts HTTP/1.1\r\n" + b"X-A: " + b"a" * 100_000 + b"\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200),  # a TLS hello
            b"GET /center/hosts HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
            os.urandom(4096)]
    t = fz.tallies.setdefault("raw HTTP garbage", Tally())
    for blob in junk:
        t.tried += 1
        with socket.create_connection(("127.0.0.1", fz.c.center.port), timeout=10) as s:
            s.settimeout(10)
            try:
                s.sendall(blob)
                s.shutdown(socket.SHUT_WR)  # and then nothing more
                answer = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                answer = b""
        status = answer[9:12]
        assert not status.startswith(b"5"), (blob[:60], answer[:200])
        if answer:
            t.rejected += 1
        assert not fz.c.all_alive()
        fz.verify("raw HTTP garbage", repr(blob[:60]), 400)
    time.sleep(0.2)
    assert fz.c.state() == fz.baseline
