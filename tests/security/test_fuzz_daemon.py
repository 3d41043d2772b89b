"""Property-based fuzzing of every endpoint of real, running daemons.

A center and three daemons run as processes on 127.0.0.1 with a token: d0 is
a source confined by ``--allow-source`` (to an empty directory), d1 a target
confined by ``--allow-dest``, d2 a target with only its ``--root``.  One job
has shipped a file to d1 and d2, so real job ids, held chunks and packed files
exist beside made-up ones.

The cases (see ``conftest``): valid-shaped messages with broken fields, random
JSON, truncated bodies, raw bytes, other encodings, deep nesting, wrong
methods, junk query strings, hostile path ids, no token.  After every request:
no 5xx, strict JSON, every process alive, and the *center's* state and REDO
log unchanged (what a fuzzed pull or pack makes a daemon report about a job
that is not running changes nothing there).  Valid pulls and packs for made-up
jobs are legitimate (the token holder is the center): their only effect is
files under the daemon's root, and the run ends by checking that nothing
appeared outside the roots, nothing outside d1's allowed directory, and that
a canary file outside every root is untouched.

Two guards keep the fuzz itself harmless: a fetch may only name a peer on
loopback (or no valid address at all), and a staged size stays under 1 MiB or
beyond any disk, so no case sends traffic off this machine or fills its disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fdship import protocol as P
from fdship.errors import ProtocolError

from .conftest import (
    EXTREMES,
    FUZZ_EXAMPLES,
    WEIRD_STR,
    Fuzzer,
    Req,
    SecCluster,
    encode,
    get_cases,
    path_ids,
    post_cases,
    record_tallies,
    stop_cluster,
    sweep,
    tree,
)

FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
HEX = "0123456789abcdef"
SAFE_PEERS = ["127.0.0.1:1", "127.0.0.1:0", "[::1]:1", "127.0.0.1:99999", "127.0.0.1:x",
              "127.0.0.1", "", "no-port-here", "127.0.0.1:-1"]


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def fz(tmp_path_factory: Any) -> Iterator[Fuzzer]:
    base = str(tmp_path_factory.mktemp("fuzz-daemon"))
    allowed_src = os.path.join(base, "allowed-src")
    outside = os.path.join(base, "outside")
    os.makedirs(allowed_src)
    os.makedirs(outside)
    canary = os.path.join(outside, "canary")
    with open(canary, "wb") as f:
        f.write(b"canary: nothing may write here\n")
    src = os.path.join(base, "src.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(200_000))
    c = SecCluster(3, base, center_args=["--chunk-size", "64K", "--heartbeat-timeout", "60"],
                   daemon_args={0: ["--heartbeat-interval", "0.5", "--allow-source", base],
                                1: ["--heartbeat-interval", "0.5", "--allow-dest",
                                    os.path.join(base, "root1", "data")],
                                2: ["--heartbeat-interval", "0.5"]})
    try:
        c.start()
        res = c.request("POST", c.daemons[0].url + "/daemon/api",
                        {"files": [src], "machines": ["d1", "d2"], "dest": "/data"},
                        timeout=120)
        assert res["state"] == "done", res
        # From now on d0 may only ship from an empty directory: restart it confined.
        c.daemons[0].kill(15)
        c.daemon_args[0] = ["--heartbeat-interval", "0.5", "--allow-source", allowed_src]
        c.start_daemon(0)
        c.wait_alive(30)
        f = Fuzzer(c)
        f.job = res["job"]  # type: ignore[attr-defined]
        f.base, f.canary = base, canary  # type: ignore[attr-defined]
        f.canary_sha = _sha(canary)  # type: ignore[attr-defined]
        f.allowed_src = allowed_src  # type: ignore[attr-defined]
        skip = tuple(os.path.join(base, n) for n in ("root0", "root1", "root2", "data0",
                                                     "data1", "data2", "center-data"))
        f.skip = skip  # type: ignore[attr-defined]
        f.outside_before = {p for p in tree(base, skip) if not p.endswith(".log")}  # type: ignore[attr-defined]
        yield f
        f.close()
        record_tallies(f.tallies)
    finally:
        stop_cluster(c)


# ---------------------------------------------------------------------- guards


def _parses(parser: Any, body: bytes | None) -> Any:
    try:
        return parser(json.loads(body or b""))
    except (ProtocolError, ValueError, TypeError, AttributeError, RecursionError, OverflowError):
        return None


def _peer_is_local(peer: str) -> bool:
    host, sep, _ = peer.rpartition(":")
    return not sep or host.strip("[]") in ("127.0.0.1", "::1", "")


def _size_is_harmless(size: int) -> bool:
    return size <= 1024 * 1024 or size >= 2**50


def pull_is_harmless(body: bytes | None) -> bool:
    req = _parses(P.PullRequest.from_json, body)
    return req is None or (all(_peer_is_local(f.peer) for f in req.fetches)
                           and all(_size_is_harmless(f.size) for f in req.files))


def pack_is_harmless(body: bytes | None) -> bool:
    req = _parses(P.PackRequest.from_json, body)
    return req is None or _size_is_harmless(req.file.size)


def api_is_refused(fz: Fuzzer, body: bytes | None) -> bool:
    """No fuzzed submission may name a file d0 could ship (there is none to name)."""
    req = _parses(P.ApiRequest.from_json, body)
    if req is None:
        return True
    allowed = fz.allowed_src  # type: ignore[attr-defined]
    return not any(os.path.isfile(p) and os.path.realpath(p).startswith(allowed + "/")
                   for p in req.files if "\0" not in p)


# ---------------------------------------------------------------------- templates


def _dests(fz: Fuzzer) -> Any:
    canary = fz.canary  # type: ignore[attr-defined]
    return st.sampled_from([
        "/data/fz.bin", "/data/sub/dir/fz.bin", "/etc/fz.conf", "/data/../etc/x", "data/rel",
        "/data/a\x00b", canary, "/../../" + canary.lstrip("/"), "/data/" + "n" * 255,
        "/" + "d" * 300 + "/x", "/data/", "/", "//data//fz2.bin", "/data/./fz3.bin",
        "/data/src.bin"]) | WEIRD_STR


def _job_ids(fz: Fuzzer) -> Any:
    return st.sampled_from([fz.job, "FZ-job-1", "FZ-job-2"]) | WEIRD_STR  # type: ignore[attr-defined]


def pull_template(fz: Fuzzer) -> Any:
    staged = st.fixed_dictionaries({"file": st.sampled_from([0, 1]), "dest": _dests(fz),
                                    "size": st.sampled_from([0, 1, 65536, 200_000, 2**50]),
                                    "xxh3": st.just(HEX)})
    fetch = st.fixed_dictionaries({"file": st.sampled_from([0, 1]),
                                   "chunk": st.sampled_from([0, 1, 3]),
                                   "offset": st.sampled_from([0, 65536]),
                                   "size": st.sampled_from([1, 65536]), "xxh3": st.just(HEX),
                                   "peer": st.sampled_from(SAFE_PEERS),
                                   "peer_name": st.sampled_from(["d0", "nosuch"])})
    return st.fixed_dictionaries({"job": _job_ids(fz),
                                  "files": st.lists(staged, min_size=0, max_size=2),
                                  "fetches": st.lists(fetch, min_size=0, max_size=3)})


PEER_WEIRD = {"peer": st.sampled_from(SAFE_PEERS) | st.sampled_from(EXTREMES)
              | st.text(max_size=20).filter(lambda s: ":" not in s)}


def pack_template(fz: Fuzzer) -> Any:
    staged = st.fixed_dictionaries({"file": st.sampled_from([0, 1]),
                                    "dest": _dests(fz) | st.just(""),
                                    "size": st.sampled_from([0, 1, 200_000, 2**50]),
                                    "xxh3": st.sampled_from([HEX, "2d06800538d394c2"])})
    return st.fixed_dictionaries({"job": _job_ids(fz), "file": staged,
                                  "chunk_size": st.sampled_from([65536, 4096, 1]),
                                  "notify": st.sampled_from(["", "nosuch-hook"]),
                                  "last": st.booleans(),
                                  "files_total": st.sampled_from([1, 2, 10**6])})


def api_template(fz: Fuzzer) -> Any:
    allowed = fz.allowed_src  # type: ignore[attr-defined]
    files = st.sampled_from([
        os.path.join(allowed, "nope.bin"), fz.canary, allowed,  # type: ignore[attr-defined]
        os.path.join(allowed, "..", "outside", "canary"), "relative.bin", "/etc/hostname",
        "/proc/self/environ", "/dev/zero", allowed + "\x00x"])
    return st.fixed_dictionaries({
        "files": st.lists(files, min_size=1, max_size=2),
        "machines": st.sampled_from([["d1"], ["d1", "d2"], ["@nolabel"], ["nosuch"]]),
        "callback": st.just(""), "dest": st.sampled_from(["", "/data", "/data/../etc"]),
        "notify": st.just(""), "wait": st.just(False)})


def _target(fz: Fuzzer, which: int) -> int:
    return fz.c.daemons[which].port


# ---------------------------------------------------------------------- POST endpoints


@FUZZ
@given(data=st.data(), which=st.sampled_from([1, 2]))
def test_fuzz_daemon_pull(fz: Fuzzer, data: Any, which: int) -> None:
    req: Req = data.draw(post_cases(P.DAEMON_PULL, pull_template(fz), PEER_WEIRD))
    assume(pull_is_harmless(req.body))
    fz.check("POST /daemon/pull", _target(fz, which), req)


@FUZZ
@given(data=st.data(), which=st.sampled_from([1, 2]))
def test_fuzz_daemon_pack(fz: Fuzzer, data: Any, which: int) -> None:
    req: Req = data.draw(post_cases(P.DAEMON_PACK, pack_template(fz)))
    assume(pack_is_harmless(req.body))
    fz.check("POST /daemon/pack", _target(fz, which), req)


@FUZZ
@given(data=st.data())
def test_fuzz_daemon_api(fz: Fuzzer, data: Any) -> None:
    req: Req = data.draw(post_cases(P.DAEMON_API, api_template(fz)))
    assume(api_is_refused(fz, req.body))
    st_ = fz.check("POST /daemon/api", _target(fz, 0), req)
    assert st_ >= 400 or req.method != "POST", "a fuzzed submission was accepted"


def test_sweep_every_field_with_extreme_values(fz: Fuzzer) -> None:
    pull = {"job": "FZ-sweep", "files": [{"file": 0, "dest": "/data/sweep.bin", "size": 65536,
                                          "xxh3": HEX}],
            "fetches": [{"file": 0, "chunk": 0, "offset": 0, "size": 65536, "xxh3": HEX,
                         "peer": "127.0.0.1:1", "peer_name": "d0"}]}
    pack = {"job": "FZ-sweep2", "file": {"file": 0, "dest": "/data/sweep2.bin", "size": 0,
                                         "xxh3": HEX}, "chunk_size": 65536, "notify": "",
            "last": True, "files_total": 1}
    api = {"files": [os.path.join(fz.allowed_src, "nope.bin")],  # type: ignore[attr-defined]
           "machines": ["d1"], "callback": "", "dest": "/data", "notify": "", "wait": False}
    sent = 0
    for path, example, port, harmless in (
            (P.DAEMON_PULL, pull, _target(fz, 1), pull_is_harmless),
            (P.DAEMON_PACK, pack, _target(fz, 2), pack_is_harmless),
            (P.DAEMON_API, api, _target(fz, 0), lambda b: api_is_refused(fz, b))):
        for desc, obj in sweep(example):
            body = encode(obj)
            if not harmless(body):
                continue
            st_ = fz.check(f"POST {path}", port, Req("POST", path, body, kind="sweep " + desc))
            if path == P.DAEMON_API:
                assert st_ >= 400
            sent += 1
    assert sent > 300


# ---------------------------------------------------------------------- GET endpoints


@FUZZ
@given(data=st.data(), which=st.sampled_from([0, 1, 2]))
def test_fuzz_daemon_download(fz: Fuzzer, data: Any, which: int) -> None:
    req: Req = data.draw(get_cases(P.DAEMON_DOWNLOAD, {
        "job": st.sampled_from([fz.job, fz.job, "FZ-job-1"]),  # type: ignore[attr-defined]
        "file": st.sampled_from(["0", "0", "1"]),
        "chunk": st.sampled_from(["0", "1", "2", "3", "4"])}))
    if data.draw(st.integers(0, 3)) == 0 and req.method == "GET":
        # Path tricks in the one field that names something held on disk.
        trick = data.draw(st.sampled_from(["../../etc", "..%2f..", "..", "%2e%2e", "/etc/passwd",
                                           "a%00b", fz.job + "/../x", fz.job + "%00"]))  # type: ignore[attr-defined]
        req.target = f"{P.DAEMON_DOWNLOAD}?job={trick}&file=0&chunk=0"
    # Daemons drop a job's chunks once it ended, so nothing here may be served.
    st_ = fz.check("GET /daemon/download", _target(fz, which), req)
    assert st_ >= 400 or req.method != "GET"


@pytest.mark.parametrize("label", ["GET /daemon/status", "GET /daemon/jobs/ID",
                                   "GET /metrics (daemon)", "other paths (daemon)"])
@FUZZ
@given(data=st.data(), which=st.sampled_from([0, 1, 2]))
def test_fuzz_daemon_status_jobs_metrics(fz: Fuzzer, label: str, data: Any,
                                         which: int) -> None:
    cases = {
        "GET /daemon/status": lambda: get_cases(P.DAEMON_STATUS, {"verbose": st.just("1")}),
        "GET /daemon/jobs/ID": lambda: get_cases(
            path_ids("/daemon/jobs/", [fz.job]),  # type: ignore[attr-defined]
            {"wait": st.sampled_from(["0", "0.01", "0.5"])}),
        "GET /metrics (daemon)": lambda: get_cases(P.METRICS, {}),
        "other paths (daemon)": lambda: get_cases(
            path_ids("/daemon/", ["api", "pull", "pack", "download", "status", "jobs"]), {}),
    }
    fz.check(label, _target(fz, which), data.draw(cases[label]()))


def test_after_the_fuzz_nothing_escaped(fz: Fuzzer) -> None:
    """Last: late reports changed nothing at the center, and no file escaped its root."""
    fz.settle("late reports (daemons)", seconds=2.0)
    base = fz.base  # type: ignore[attr-defined]
    now = {p for p in tree(base, fz.skip) if not p.endswith(".log")}  # type: ignore[attr-defined]
    assert now == fz.outside_before, f"files appeared outside every root: {now ^ fz.outside_before}"  # type: ignore[attr-defined]
    assert _sha(fz.canary) == fz.canary_sha  # type: ignore[attr-defined]
    # d1 may only write under its allowed directory (temp files included).
    root1 = os.path.join(base, "root1")
    allowed = os.path.join(root1, "data")
    stray = [p for p in tree(root1) if not (p == allowed or p.startswith(allowed + "/"))]
    assert not stray, f"d1 wrote outside --allow-dest: {stray}"
    assert not fz.c.all_alive()


@pytest.mark.parametrize("files_total", [2**40, 2**62])
def test_a_huge_file_count_in_a_hook_pack_does_not_stall_the_daemon(fz: Fuzzer,
                                                                     files_total: int) -> None:
    """Found by the fuzz: the hook's file list used to be built by counting up to
    ``files_total``, so one number could keep a daemon's event loop busy for ever."""
    req = Req("POST", P.DAEMON_PACK, encode({
        "job": "FZ-hook", "file": {"file": 0, "dest": "", "size": 0, "xxh3": HEX},
        "chunk_size": 65536, "notify": "nosuch-hook", "last": True,
        "files_total": files_total}), kind="regression")
    fz.check("POST /daemon/pack", _target(fz, 2), req)
    for _ in range(3):  # the daemon still answers at once
        raw = fz.raw(_target(fz, 2))
        raw.timeout = 5
        st_, _ = raw.send("GET", P.DAEMON_STATUS)
        assert st_ == 200
