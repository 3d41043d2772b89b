"""``fdship demo``: a whole cluster on 127.0.0.1, one file shipped to every daemon.

Starts a center and N daemons as real processes (each with its own --root),
generates a file, ships it from the first daemon to all of them with a
synchronous ``POST /daemon/api``, verifies every copy byte for byte, prints
what happened (timings, per-machine results, how many bytes the source
served, each process's peak memory) and cleans up.
"""

from __future__ import annotations

import os
import random
import sys
import time

from fdship.localcluster import LocalCluster

BLOCK = 1024 * 1024


def generate(path: str, size: int, seed: int = 7) -> None:
    """Pseudo-random bytes, one block at a time (bounded memory)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(BLOCK, left)
            f.write(rng.randbytes(n))
            left -= n


def same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(BLOCK), fb.read(BLOCK)
            if x != y:
                return False
            if not x:
                return True


def peak_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_demo(hosts: int = 4, size_mib: int = 64, keep: bool = False) -> int:
    if hosts < 1:
        print("fdship demo: --hosts must be at least 1", file=sys.stderr)
        return 2
    if size_mib < 0:
        print("fdship demo: --size must not be negative", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    cluster = LocalCluster(hosts, keep=keep)
    ok = False
    try:
        print(f"starting a center and {hosts} daemons under {cluster.tmp}")
        cluster.start()
        t_up = time.monotonic()
        src_dir = os.path.join(cluster.tmp, "source")
        os.makedirs(src_dir)
        src = os.path.join(src_dir, "payload.bin")
        generate(src, size_mib * 1024 * 1024)
        names = [d.name for d in cluster.daemons]
        print(f"cluster up in {t_up - t_start:.1f} s; shipping {size_mib} MiB from "
              f"{names[0]} to {', '.join(names)}")
        t0 = time.monotonic()
        res = cluster.submit([src], names, dest="/data")
        wall = time.monotonic() - t0
        print(f"job {res['job']}: {res['state']} in {wall:.2f} s "
              f"({size_mib * hosts / max(wall, 1e-9):.0f} MiB/s delivered in total)")
        all_ok = res["state"] == "done"
        for name in names:
            m = res["machines"][name]
            i = names.index(name)
            copy = os.path.join(cluster.root(i), "data", "payload.bin")
            identical = os.path.exists(copy) and same_bytes(src, copy)
            all_ok &= identical
            err = f" error: {m['error']}" if m.get("error") else ""
            print(f"  {name}: {m['state']:<6} {m.get('seconds') or 0:6.2f} s  "
                  f"copy {'byte-identical' if identical else 'DIFFERS OR MISSING'}{err}")
        served = cluster.request("GET", cluster.daemons[0].url + "/daemon/status")["bytes_served"]
        size = max(1, size_mib * 1024 * 1024)
        print(f"source {names[0]} served {served / 1048576:.1f} MiB "
              f"({served / size:.2f}x the file); peers served the rest")
        for p in [cluster.center] + cluster.daemons:
            if p.popen is not None:
                rss = peak_rss_mib(p.popen.pid)
                print(f"  peak RSS {p.name}: {rss:.0f} MiB" if rss else f"  {p.name}: -")
        ok = all_ok
        print("demo " + ("succeeded: every copy verified" if ok else "FAILED"))
    except Exception as e:
        print(f"demo failed: {e}", file=sys.stderr)
        for p in [cluster.center] + cluster.daemons:
            tail = p.log()[-1500:]
            if tail:
                print(f"--- {p.name} log tail ---\n{tail}", file=sys.stderr)
    finally:
        cluster.stop()
        print(f"cleaned up ({time.monotonic() - t_start:.1f} s in all)"
              + (f"; kept {cluster.tmp}" if keep else ""))
    return 0 if ok else 1
