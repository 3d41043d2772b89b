"""End to end: a real center and six real daemons on 127.0.0.1, real files.

One cluster serves the whole module (starting nine Python processes takes a
few seconds); each test ships its own files and checks the copies byte for byte.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from fdship.localcluster import LocalCluster

MiB = 1024 * 1024
TARGETS = ["d1", "d2", "d3", "d4", "d5"]


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def write_random(path: str, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(MiB, left)
            f.write(os.urandom(n))
            left -= n


def write_lines(path: str, n: int) -> None:
    with open(path, "w") as f:
        for i in range(0, n, 10_000):
            f.write("".join(f"{j:07d}\tbid-model-feature\t{(j * 7919) % 100003}\n"
                            for j in range(i, min(n, i + 10_000))))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("e2e"))
    c = LocalCluster(6, base, center_args=["--chunk-size", "1M"],
                     daemon_args={i: ["--label", "bidder" if i % 2 else "east",
                                      "--heartbeat-interval", "0.5"] for i in range(6)})
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def src_dir(cluster):
    d = os.path.join(cluster.tmp, "src")
    os.makedirs(d, exist_ok=True)
    return d


def copies_identical(cluster, src: str, names, dest: str | None = None) -> None:
    want = sha(src)
    for n in names:
        i = int(n[1:])
        path = os.path.join(cluster.root(i), (dest or src).lstrip("/"))
        assert os.path.exists(path), f"{n}: {path} missing"
        assert sha(path) == want, f"{n}: {path} differs from the source"
        leftovers = [f for f in os.listdir(os.path.dirname(path)) if ".fdship-" in f]
        assert not leftovers, f"{n}: temp files left: {leftovers}"


def test_three_files_to_five_machines_sync(cluster, src_dir):
    big = os.path.join(src_dir, "model.bin")
    text = os.path.join(src_dir, "features.txt")
    empty = os.path.join(src_dir, "empty.dat")
    write_random(big, 64 * MiB)
    write_lines(text, 1_000_000)
    open(empty, "w").close()
    t0 = time.monotonic()
    res = cluster.submit([big, text, empty], TARGETS)
    assert res["state"] == "done", json.dumps(res, indent=1)
    assert time.monotonic() - t0 < 600
    assert sorted(res["machines"]) == TARGETS
    for n, m in res["machines"].items():
        assert m["state"] == "done" and m["error"] is None and m["seconds"] > 0
    sizes = {f["path"]: f["size"] for f in res["files"]}
    assert sizes == {big: 64 * MiB, text: os.path.getsize(text), empty: 0}
    assert all(len(f["xxh3"]) == 16 for f in res["files"])
    assert res["created"].endswith("Z") and res["finished"].endswith("Z")
    for path in (big, text, empty):
        copies_identical(cluster, path, TARGETS)
    # The source sent each chunk about once; peers did the rest.
    st = cluster.request("GET", cluster.daemons[0].url + "/daemon/status")
    total = 64 * MiB + os.path.getsize(text)
    assert st["bytes_served"] <= 2.0 * total, st
    received = sum(cluster.request("GET", d.url + "/daemon/status")["bytes_received"]
                   for d in cluster.daemons[1:])
    assert received >= 5 * total


def test_edit_of_source_during_job_does_not_corrupt_copies(cluster, src_dir):
    path = os.path.join(src_dir, "edited.bin")
    write_random(path, 24 * MiB)
    want = sha(path)
    out = {}
    th = threading.Thread(target=lambda: out.update(cluster.submit([path], TARGETS[:3])))
    th.start()
    # Keep rewriting the source while the job runs: the snapshot must shield the copies.
    deadline = time.monotonic() + 60
    while th.is_alive() and time.monotonic() < deadline:
        with open(path, "r+b") as f:
            f.seek(5 * MiB)
            f.write(os.urandom(4096))
        time.sleep(0.01)
    th.join(120)
    assert out.get("state") == "done", out
    snapshot_hash = out["files"][0]["xxh3"]
    for n in TARGETS[:3]:
        copy = os.path.join(cluster.root(int(n[1:])), path.lstrip("/"))
        import xxhash
        h = xxhash.xxh3_64()
        with open(copy, "rb") as f:
            for block in iter(lambda: f.read(MiB), b""):
                h.update(block)
        assert h.hexdigest() == snapshot_hash  # every copy is the same snapshot
    assert want  # the source changed under us; the copies agree with each other


class _Catcher(http.server.BaseHTTPRequestHandler):
    got: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).got.append(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def test_callback_mode_and_a_second_job_while_the_first_runs(cluster, src_dir):
    a = os.path.join(src_dir, "first.bin")
    b = os.path.join(src_dir, "second.bin")
    write_random(a, 48 * MiB)
    write_random(b, 3 * MiB)
    _Catcher.got = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Catcher)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/done"
        t0 = time.monotonic()
        r = cluster.request("POST", cluster.daemons[0].url + "/daemon/api",
                            {"files": [a], "machines": ["@bidder", "d2"], "callback": url})
        assert time.monotonic() - t0 < 10  # answered at once
        job_a = r["job"]
        assert cluster.job(job_a)["state"] == "running"
        # A second, synchronous job from another source while the first runs.
        res_b = cluster.submit([b], ["d0", "d4"], via=3)
        assert res_b["state"] == "done"
        assert res_b["job"] > job_a  # ids sort by creation time
        deadline = time.monotonic() + 300
        while not _Catcher.got and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _Catcher.got, "callback never arrived"
        posted = _Catcher.got[0]
        assert posted["job"] == job_a and posted["state"] == "done"
        assert sorted(posted["machines"]) == ["d1", "d2", "d3", "d5"]
        copies_identical(cluster, a, ["d1", "d2", "d3", "d5"])
        copies_identical(cluster, b, ["d0", "d4"])
        deadline = time.monotonic() + 30
        while cluster.job(job_a).get("callback", {}).get("state") != "delivered":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert cluster.job(job_a)["callback"]["attempts"] == 1
    finally:
        srv.shutdown()


def test_dest_directory_and_source_as_target(cluster, src_dir):
    p = os.path.join(src_dir, "cfg.json")
    with open(p, "w") as f:
        f.write('{"bid": 1}\n')
    res = cluster.submit([p], ["d0", "d1"], dest="/opt/bidder/conf")
    assert res["state"] == "done", res
    assert res["files"][0]["dest"] == "/opt/bidder/conf/cfg.json"
    copies_identical(cluster, p, ["d0", "d1"], dest="/opt/bidder/conf/cfg.json")


def fdship(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "fdship", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cli_submit_jobs_job_hosts(cluster, src_dir):
    p = os.path.join(src_dir, "cli.bin")
    write_random(p, 2 * MiB)
    r = fdship("submit", "--daemon", cluster.daemons[0].url, "--to", "d1,d2", "--to", "@east",
               p)
    assert r.returncode == 0, r.stderr
    assert "done" in r.stdout and "d4" in r.stdout  # @east = d0, d2, d4
    copies_identical(cluster, p, ["d0", "d1", "d2", "d4"])
    r = fdship("submit", "--daemon", cluster.daemons[0].url, "--to", "d3", "--no-wait", p)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    assert cluster.wait_job(job, 120)["state"] == "done"
    r = fdship("submit", "--daemon", cluster.daemons[0].url, "--to", "d5", "--json", p)
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "done"
    r = fdship("jobs", "--center", cluster.center.url)
    assert r.returncode == 0 and job in r.stdout and "STATE" in r.stdout
    r = fdship("jobs", "--center", cluster.center.url, "--json", "--state", "done")
    assert job in [j["job"] for j in json.loads(r.stdout)["jobs"]]
    r = fdship("job", "--center", cluster.center.url, job)
    assert r.returncode == 0 and "d3" in r.stdout and "done" in r.stdout
    r = fdship("hosts", "--center", cluster.center.url)
    assert r.returncode == 0 and all(f"d{i}" in r.stdout for i in range(6))
    assert "alive" in r.stdout
    head = r.stdout.splitlines()[0].split()
    assert head[head.index("CPU"):head.index("CPU") + 3] == ["CPU", "APP", "BUSY"]
    row = next(line.split() for line in r.stdout.splitlines() if line.startswith("d1 "))
    assert row[head.index("BUSY")] == "0.00"  # nothing watched, nothing busy beyond the fleet


def test_cli_exit_statuses(cluster, src_dir):
    p = os.path.join(src_dir, "exit.bin")
    write_random(p, 1024)
    r = fdship("submit", "--daemon", cluster.daemons[0].url, "--to", "nosuch", p)
    assert r.returncode == 2 and "unknown machine 'nosuch'" in r.stderr
    r = fdship("submit", "--daemon", cluster.daemons[0].url, "--to", "d1", p + ".missing")
    assert r.returncode == 2 and "missing" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    r = fdship("submit", "--daemon", f"http://127.0.0.1:{dead}", "--to", "d1", p)
    assert r.returncode == 3 and "cannot reach" in r.stderr
    r = fdship("hosts", "--center", f"http://127.0.0.1:{dead}")
    assert r.returncode == 3


def post_raw(url: str, body: bytes, headers=None):
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.mark.parametrize("case", [
    "malformed", "missing_file", "directory", "fifo", "no_machines", "unknown_machine",
    "relative", "wrong_types"])
def test_bad_input_gets_4xx_and_a_sentence(cluster, src_dir, case):
    api = cluster.daemons[0].url + "/daemon/api"
    ok_file = os.path.join(src_dir, "ok.txt")
    with open(ok_file, "w") as f:
        f.write("x")
    fifo = os.path.join(src_dir, "a.fifo")
    if case == "fifo" and not os.path.exists(fifo):
        os.mkfifo(fifo)
    bodies = {
        "malformed": b'{"files": [',
        "missing_file": json.dumps({"files": [ok_file + ".nope"], "machines": ["d1"]}).encode(),
        "directory": json.dumps({"files": [src_dir], "machines": ["d1"]}).encode(),
        "fifo": json.dumps({"files": [fifo], "machines": ["d1"]}).encode(),
        "no_machines": json.dumps({"files": [ok_file], "machines": []}).encode(),
        "unknown_machine": json.dumps({"files": [ok_file], "machines": ["d1", "ghost"]}).encode(),
        "relative": json.dumps({"files": ["ok.txt"], "machines": ["d1"]}).encode(),
        "wrong_types": json.dumps({"files": "x", "machines": 3}).encode(),
    }
    status, body = post_raw(api, bodies[case])
    expected = 422 if case == "unknown_machine" else 400
    assert status == expected, (status, body)
    assert isinstance(body["error"], str) and len(body["error"]) > 15
    if case == "unknown_machine":
        assert "ghost" in body["error"]
    if case in ("directory", "fifo"):
        assert "regular file" in body["error"] or "not a file" in body["error"]


def test_no_stray_snapshots_after_refused_submissions(cluster):
    pending = os.path.join(cluster.data_dir(0))
    found = []
    for dirpath, _, files in os.walk(pending):
        if "pending" in dirpath:
            found += files
    assert not found, f"refused submissions left snapshots behind: {found}"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("sec"))
    allowed = os.path.join(base, "allowed-src")
    os.makedirs(allowed)
    c = LocalCluster(2, base, token="s3cret-token-for-tests",
                     daemon_args={0: ["--allow-source", allowed],
                                  1: ["--allow-dest", os.path.join(base, "root1", "data")]})
    c.start()
    yield c, allowed
    c.stop()


def test_token_required_everywhere_but_metrics(secured):
    c, _ = secured
    for url in (c.center.url + "/center/hosts", c.center.url + "/center/jobs",
                c.daemons[0].url + "/daemon/status"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=10)
        assert e.value.code == 401
        assert "token" in json.loads(e.value.read())["error"]
    status, body = post_raw(c.daemons[0].url + "/daemon/api", b"{}",
                            {"Authorization": "Bearer wrong"})
    assert status == 401
    with urllib.request.urlopen(c.center.url + "/metrics", timeout=10) as r:
        assert b"fdship_hosts_alive" in r.read()
    with urllib.request.urlopen(c.daemons[0].url + "/metrics", timeout=10) as r:
        assert b"fdship_bytes_served" in r.read()


def test_allow_source_and_allow_dest(secured):
    c, allowed = secured
    inside = os.path.join(allowed, "ok.bin")
    outside = os.path.join(c.tmp, "outside.bin")
    for p in (inside, outside):
        with open(p, "wb") as f:
            f.write(b"payload")
    hdr = {"Authorization": "Bearer " + c.token}
    api = c.daemons[0].url + "/daemon/api"
    status, body = post_raw(api, json.dumps({"files": [outside], "machines": ["d1"]}).encode(),
                            hdr)
    assert status == 403 and "allow_source" in body["error"]
    link = os.path.join(allowed, "sneaky")
    os.symlink(outside, link)
    status, body = post_raw(api, json.dumps({"files": [link], "machines": ["d1"]}).encode(), hdr)
    assert status == 403, "a symlink out of allow_source must be refused"
    status, body = post_raw(api, json.dumps({"files": [inside], "machines": ["d1"]}).encode(),
                            hdr)
    assert status == 422 and "allowed destinations" in body["error"]
    status, body = post_raw(api, json.dumps({"files": [inside], "machines": ["d1"],
                                             "dest": "/data"}).encode(), hdr)
    assert status == 200 and body["state"] == "done", body
    with open(os.path.join(c.root(1), "data", "ok.bin"), "rb") as f:
        assert f.read() == b"payload"
