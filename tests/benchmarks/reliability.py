"""Reliability figures: center kills survived, chunks refetched, corrupt chunks
caught, time to detect a dead daemon.

Runs real clusters on 127.0.0.1 (``fdship.localcluster``: a center and daemons
as subprocesses, each with its own data dir and ``--root``) and measures:

* ``kills``: the center is SIGKILLed at random moments (0.1-3 s after it came
  back) while jobs run, and restarted at once; after the last kill every job
  must end ``done`` with byte-identical copies.  Refetched chunks = chunks the
  targets fetched (their ``fdship_chunks_fetched`` counters) minus the chunks
  they needed (targets x chunks per job).
* ``detect``: a daemon is SIGKILLed and ``GET /center/hosts`` polled until it
  shows ``alive: false``; then it is restarted, for the next round.
* ``corrupt``: one target serves with ``--fault-inject corrupt=P``; the other
  targets' ``fdship_hash_mismatches`` counters say how many bad chunks were
  caught, and every copy is compared with the source.

The tests in ``tests/integration`` assert the same properties; this prints
the figures for ``docs/reliability.md``.  Timings depend on the machine: they
are figures to read, not goals.

    python tests/benchmarks/reliability.py                    # all three, default sizes
    python tests/benchmarks/reliability.py --kills 50 --detect 10 --corrupt 3 --markdown
    python tests/benchmarks/reliability.py --only detect --heartbeat-timeout 2 --heartbeat-interval 0.5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fdship.localcluster import LocalCluster

MiB = 1024 * 1024
CHUNK = 256 * 1024


def write_random(path: str, size: int, rng: random.Random) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = rng.randbytes(min(MiB, left))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def wait_answering(url: str, timeout: float = 30) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=2):
                return time.monotonic() - t0
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"{url} not answering after {timeout:.0f} s")


def start(c: LocalCluster) -> LocalCluster:
    c.start_center()
    wait_answering(c.center.url)
    for i in range(c.n):
        c.start_daemon(i)
    c.wait_alive(30)
    return c


def nchunks(size: int) -> int:
    return max(1, -(-size // CHUNK))


# ---------------------------------------------------------------------- kills


def run_kills(kills: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    c = LocalCluster(4, center_args=["--chunk-size", "256K", "--heartbeat-timeout", "3",
                                     "--grace-period", "600", "--checkpoint-records", "150",
                                     "--checkpoint-interval", "1"],
                     daemon_args={i: ["--heartbeat-interval", "0.5", "--upload-rate", "1M"]
                                  for i in range(4)})
    try:
        start(c)
        src = os.path.join(c.tmp, "src")
        os.makedirs(src)
        want: dict[str, str] = {}
        jobs: dict[str, list[str]] = {}
        restarts: list[float] = []
        with_running = 0
        t0 = time.monotonic()
        for k in range(kills):
            files = []
            for part in ("a", "b") if k % 3 == 0 else ("a",):
                path = os.path.join(src, f"job{k}-{part}.bin")
                size = rng.randrange(CHUNK, 2 * MiB) if part == "a" else rng.randrange(1, 3 * CHUNK)
                want[path] = write_random(path, size, rng)
                files.append(path)
            res = c.request("POST", c.daemons[0].url + "/daemon/api",
                            {"files": files, "machines": ["d1", "d2", "d3"], "wait": False})
            jobs[res["job"]] = files
            time.sleep(rng.uniform(0.1, 3.0))
            running = c.request("GET", c.center.url + "/center/jobs?state=running")["jobs"]
            with_running += bool(running)
            c.center.kill(signal.SIGKILL)
            c.start_center()
            restarts.append(wait_answering(c.center.url))
        done = 0
        for jid in jobs:
            res = c.wait_job(jid, 600)
            done += res["state"] == "done"
        identical = all(sha256(os.path.join(c.root(i), p.lstrip("/"))) == want[p]
                        for files in jobs.values() for p in files for i in (1, 2, 3))
        needed = 3 * sum(nchunks(os.path.getsize(p)) for fs in jobs.values() for p in fs)
        fetched = int(sum(metric(c.daemons[i].url, "fdship_chunks_fetched_total")
                          for i in (1, 2, 3)))
        return {"kills": kills, "kills_with_jobs_running": with_running, "jobs": len(jobs),
                "jobs_done": done, "copies_identical": identical, "chunks_needed": needed,
                "chunks_fetched": fetched, "chunks_refetched": fetched - needed,
                "restart_to_answering_median_s": round(statistics.median(restarts), 2),
                "restart_to_answering_max_s": round(max(restarts), 2),
                "seconds": round(time.monotonic() - t0, 1)}
    finally:
        c.stop()


# ---------------------------------------------------------------------- detect


def run_detect(rounds: int, hb_timeout: float, hb_interval: float) -> dict[str, Any]:
    c = LocalCluster(2, center_args=["--heartbeat-timeout", str(hb_timeout)],
                     daemon_args={i: ["--heartbeat-interval", str(hb_interval)]
                                  for i in range(2)})
    times: list[float] = []
    try:
        start(c)
        for _ in range(rounds):
            time.sleep(random.uniform(0, hb_interval))  # kill at any phase of the beat
            c.daemons[1].kill(signal.SIGKILL)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 10 * hb_timeout + 30:
                if not c.hosts()["d1"]["alive"]:
                    times.append(time.monotonic() - t0)
                    break
                time.sleep(0.01)
            c.start_daemon(1)
            c.wait_alive(30)
        return {"rounds": rounds, "heartbeat_timeout_s": hb_timeout,
                "heartbeat_interval_s": hb_interval, "detected": len(times),
                "min_s": round(min(times), 2), "median_s": round(statistics.median(times), 2),
                "max_s": round(max(times), 2)}
    finally:
        c.stop()


# ---------------------------------------------------------------------- corrupt


def run_corrupt(rounds: int, prob: float, size_mib: int) -> dict[str, Any]:
    caught = served_bad = fetched = needed = 0
    identical = True
    rng = random.Random(1)
    for _ in range(rounds):
        hb = ["--heartbeat-interval", "0.5"]
        c = LocalCluster(4, center_args=["--chunk-size", "256K"],
                         daemon_args={0: hb, 1: hb + ["--fault-inject", f"corrupt={prob}",
                                                      "--allow-fault-injection"],
                                      2: hb, 3: hb})
        try:
            start(c)
            path = os.path.join(c.tmp, "f.bin")
            want = write_random(path, size_mib * MiB, rng)
            res = c.submit([path], ["d1", "d2", "d3"])
            identical &= res["state"] == "done" and all(
                sha256(os.path.join(c.root(i), path.lstrip("/"))) == want for i in (1, 2, 3))
            caught += int(sum(metric(c.daemons[i].url, "fdship_hash_mismatches_total")
                              for i in (2, 3)))
            served_bad += int(metric(c.daemons[1].url, "fdship_bytes_served_total")) // CHUNK
            fetched += int(sum(metric(c.daemons[i].url, "fdship_chunks_fetched_total")
                               for i in (1, 2, 3)))
            needed += 3 * nchunks(size_mib * MiB)
        finally:
            c.stop()
    return {"rounds": rounds, "corrupt_probability": prob, "file_mib": size_mib,
            "chunks_needed": needed, "corrupt_chunks_caught": caught,
            "chunks_served_by_corrupting_peer": served_bad,
            "chunks_fetched": fetched, "copies_identical": identical}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["kills", "detect", "corrupt"], action="append")
    ap.add_argument("--kills", type=int, default=30, help="center SIGKILLs (default 30)")
    ap.add_argument("--seed", type=int, default=20261122)
    ap.add_argument("--detect", type=int, default=10, help="daemon kill rounds (default 10)")
    ap.add_argument("--heartbeat-timeout", type=float, default=5.0)
    ap.add_argument("--heartbeat-interval", type=float, default=1.0)
    ap.add_argument("--corrupt", type=int, default=3, help="corruption rounds (default 3)")
    ap.add_argument("--corrupt-probability", type=float, default=0.3)
    ap.add_argument("--corrupt-size", type=int, default=32, help="MiB (default 32)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    todo = args.only or ["kills", "detect", "corrupt"]
    out: dict[str, Any] = {}
    try:
        if "kills" in todo:
            out["kills"] = run_kills(args.kills, args.seed)
        if "detect" in todo:
            out["detect"] = run_detect(args.detect, args.heartbeat_timeout,
                                       args.heartbeat_interval)
        if "corrupt" in todo:
            out["corrupt"] = run_corrupt(args.corrupt, args.corrupt_probability,
                                         args.corrupt_size)
    except (urllib.error.URLError, TimeoutError, RuntimeError) as e:
        print(f"reliability benchmark failed: {e}", file=sys.stderr)
        return 1
    if args.markdown:
        for name, figures in out.items():
            print(f"\n{name}:\n\n| figure | value |\n|---|---:|")
            for k, v in figures.items():
                print(f"| {k.replace('_', ' ')} | {v} |")
    else:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
