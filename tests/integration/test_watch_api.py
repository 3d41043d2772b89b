"""Watching a running cluster: jobs list, job detail, hosts, the event stream, metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from fdship.localcluster import LocalCluster

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(3, str(tmp_path_factory.mktemp("watch")),
                     center_args=["--chunk-size", "256K"],
                     daemon_args={i: ["--heartbeat-interval", "0.3", "--label", "w"]
                                  for i in range(3)})
    c.start()
    yield c
    c.stop()


def make_file(cluster, name: str, size: int) -> str:
    d = os.path.join(cluster.tmp, "src")
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.write(os.urandom(size))
    return p


class SSE:
    """A minimal server-sent-events reader over a raw socket (what a client sees)."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        self.buf = b""
        self.events: list[dict] = []
        self.head = b""

    def read_until(self, pred, timeout: float = 30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            if pred(self.events):
                return self.events
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                break
            self.buf += data
            if not self.head and b"\r\n\r\n" in self.buf:
                self.head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self._parse()
        return self.events

    def _parse(self) -> None:
        # Chunked transfer encoding: strip chunk-size lines crudely by scanning for events.
        text = self.buf.decode(errors="replace")
        while "\n\n" in text:
            block, text = text.split("\n\n", 1)
            ev: dict = {}
            for line in block.splitlines():
                if line.startswith("id: "):
                    ev["id"] = int(line[4:])
                elif line.startswith("event: "):
                    ev["event"] = line[7:]
                elif line.startswith("data: "):
                    ev["data"] = json.loads(line[6:])
            if "event" in ev:
                self.events.append(ev)
        self.buf = text.encode()

    def close(self) -> None:
        self.sock.close()


def test_event_stream_shows_job_machine_and_host_changes_and_resumes(cluster):
    port = cluster.center.port
    sse = SSE(port, "/center/events?since=0")
    path = make_file(cluster, "ev.bin", 2 * MiB)
    res = cluster.submit([path], ["d1", "d2"])
    assert res["state"] == "done"
    job = res["job"]
    evs = sse.read_until(lambda es: any(e["event"] == "job" and e["data"]["job"] == job
                                        and e["data"]["state"] == "done" for e in es)
                         and any(e["event"] == "host" for e in es))  # hosts: every <= 2 s
    sse.close()
    kinds = {e["event"] for e in evs}
    assert {"job", "machine", "host"} <= kinds, kinds
    machine_rows = [e["data"] for e in evs if e["event"] == "machine" and e["data"]["job"] == job]
    assert {r["name"] for r in machine_rows} == {"d1", "d2"}
    assert any(r["state"] == "done" for r in machine_rows)
    assert evs[0]["event"] == "reset"  # since=0 predates this center's ids: re-fetch first
    ids = [e["id"] for e in evs if "id" in e]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # Reconnect with Last-Event-ID: only newer events come, none is repeated.
    last = ids[len(ids) // 2]
    again = SSE(port, "/center/events", {"Last-Event-ID": str(last)})
    got = again.read_until(lambda es: len(es) >= 3, timeout=10)
    again.close()
    assert got and all(e["id"] > last for e in got)
    assert got[0]["id"] == last + 1


def test_jobs_list_filters_newest_first_and_pages(cluster):
    path = make_file(cluster, "page.bin", 300 * 1024)
    ids = [cluster.submit([path], ["d1"])["job"] for _ in range(4)]
    base = cluster.center.url + "/center/jobs"
    page = cluster.request("GET", base + "?limit=2")
    got = [j["job"] for j in page["jobs"]]
    assert got == sorted(got, reverse=True) and len(got) == 2
    assert page["next"] == got[-1]
    page2 = cluster.request("GET", base + f"?limit=2&before={page['next']}")
    assert all(j["job"] < got[-1] for j in page2["jobs"])
    done = cluster.request("GET", base + "?state=done&limit=100")
    assert set(ids) <= {j["job"] for j in done["jobs"]}
    assert all(j["state"] == "done" for j in done["jobs"])
    one = done["jobs"][0]
    assert set(one) >= {"job", "state", "created", "finished", "progress", "machines", "rate",
                        "bytes_total", "bytes_done"}
    assert one["progress"] == 1.0
    with pytest.raises(urllib.error.HTTPError) as e:
        cluster.request("GET", base + "?state=bogus")
    assert e.value.code == 400


def test_job_detail_has_progress_fields_and_hosts_show_load(cluster):
    path = make_file(cluster, "detail.bin", 1 * MiB)
    res = cluster.submit([path], ["d1", "d2"])
    detail = cluster.job(res["job"])
    for name, m in detail["machines"].items():
        assert m["chunks_done"] == m["chunks_total"] == 4
        assert m["bytes_done"] == m["bytes_total"] == MiB
        assert m["attempts"] == 0 and m["error"] is None and m["error_at"] is None, f"{name}: {m}"
        assert "rate" in m and "eta" in m
    hosts = cluster.request("GET", cluster.center.url + "/center/hosts")["hosts"]
    assert {h["name"] for h in hosts} == {"d0", "d1", "d2"}
    for h in hosts:
        assert h["alive"] is True and h["labels"] == ["w"]
        assert 0 <= h["heartbeat_age"] < 5
        assert set(h["load"]) >= {"cpu", "loadavg", "net_tx", "net_rx", "disk_busy",
                                  "uploads", "downloads", "bytes_served", "bytes_received"}
        assert h["version"]
    deadline = time.monotonic() + 10
    while True:  # bytes served show up with the next heartbeat
        hosts = {h["name"]: h for h in cluster.request(
            "GET", cluster.center.url + "/center/hosts")["hosts"]}
        if hosts["d0"]["load"]["bytes_served"] > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert hosts["d0"]["load"]["bytes_served"] > 0


def test_metrics_on_center_and_daemons(cluster):
    path = make_file(cluster, "metrics.bin", 512 * 1024)
    cluster.submit([path], ["d1"])
    with urllib.request.urlopen(cluster.center.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for name in ("fdship_jobs_total", "fdship_job_duration_seconds_bucket",
                 "fdship_redo_fsync_seconds_bucket", "fdship_chunks_acked_total",
                 "fdship_hosts_alive", "fdship_inflight_fetches", "fdship_jobs_running"):
        assert name in text, name
    assert 'fdship_jobs_total{state="done"}' in text
    with urllib.request.urlopen(cluster.daemons[1].url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for name in ("fdship_bytes_received_total", "fdship_chunks_fetched_total",
                 "fdship_hash_mismatches_total", "fdship_downloads_in_flight",
                 "fdship_rate_limit_waits_total", "fdship_heartbeat_age_seconds"):
        assert name in text, name


def test_submit_prints_plain_progress_lines_when_not_a_terminal(cluster):
    path = make_file(cluster, "progress.bin", 1 * MiB)
    r = subprocess.run([sys.executable, "-m", "fdship", "submit", "--daemon",
                        cluster.daemons[0].url, "--to", "@w", path],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("job ")]
    assert lines and "done" in lines[-1] and "\r" not in r.stderr
    assert "d2" in r.stdout


def test_logs_carry_the_job_id(cluster):
    path = make_file(cluster, "logs.bin", 256 * 1024)
    job = cluster.submit([path], ["d2"])["job"]
    time.sleep(0.3)
    center_log = cluster.center.log()
    assert f"job={job}" in center_log
    assert f"job={job}" in cluster.daemons[0].log()
    assert "level=INFO" in center_log
