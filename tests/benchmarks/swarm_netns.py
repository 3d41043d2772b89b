"""fdship against a parallel-rsync push, side by side, on shaped network-namespace hosts.

Usage (as root, from the repository root)::

    python tests/benchmarks/swarm_netns.py                       # the full table
    python tests/benchmarks/swarm_netns.py --cases 10x64 --repeat 1 --baseline 10

Each case ``TxS`` ships S MiB from host 0 to T target hosts, every host's link
shaped to ``--rate`` Mbit/s in both directions (tbf on both ends of its veth,
see ``tests/netns.py``).  One cluster per case runs the real center and one
daemon per host (``tests/cluster/swarm.py``); fdship ships the file
``--repeat`` times, then, for the cases listed in ``--baseline``,
``parallel-rsync`` (Debian package pssh) pushes the same file from host 0 to
every target at once over ssh (sshd per host, throwaway keys).

``--chunk-sizes 4M,1M`` runs fdship once per chunk size (the center's
``--chunk-size``), each in a cluster of its own; ``--variants`` compares daemon
and center settings side by side in the same way (e.g. ``--variants "lead on=;lead
off=--fetch-lead 0"``, or ``"relays=;no relays=@--stream-depth 0"``: what follows
``@`` goes to the center).  Each row also gives the issue's target for it: 1.15 x
S/B plus one chunk time per doubling of hosts, i.e. ``1.15 + log2(T) x
chunk / size`` in units of S/B.

Reported per run: wall time (for fdship, from the POST to the source daemon to
the job result, snapshot included), the lower bound S/B (file size over one
link's rate), their ratio, the source host's egress (bytes its link carried,
headers and control traffic included) over the file size, how long target
downlinks sat idle mid-transfer (sampled every 50 ms from the link
counters), the CPU cores the tool's own processes used (fdship: center and
daemons; the baseline: the pushing side, ssh and rsync clients) and how busy
the machine's CPUs were in all (``/proc/stat``): many daemons on few cores
can be CPU-bound rather than network-bound, and the figures say so.  Medians over the repeats go in the table; ``--json`` keeps
every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from fdship.config import parse_size
from tests.cluster.swarm import (
    LinkSampler,
    NetnsSwarm,
    generate,
    parallel_rsync,
    same_bytes,
    start_sshd,
)
from tests.netns import netns_unavailable_reason

MiB = 1024 * 1024


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs."""
    with open("/proc/stat", encoding="ascii") as f:
        vals = [float(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)
    return sum(vals) - idle, sum(vals)


def cpu_busy(before: tuple[float, float], after: tuple[float, float]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def own_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def swarm_pids(sw: NetnsSwarm) -> list[int]:
    return [p.pid for p in sw.daemons] + ([sw.center.pid] if sw.center is not None else [])


def target_ratio(targets: int, size: int, chunk: int) -> float:
    """The issue's goal in units of S/B: 1.15 plus one chunk time per doubling of hosts."""
    return 1.15 + math.log2(max(1, targets)) * chunk / size


def fdship_run(sw: NetnsSwarm, src: str, size: int, targets: int, rate: float,
               run: int, chunk: int = 4 * MiB, variant: str = "",
               capped: int = 0) -> dict[str, Any]:
    """One job to ``targets`` targets; the last ``capped`` of them run with rate caps."""
    dest = f"/bench{run}"
    e0, c0, own0 = sw.egress(0), cpu_times(), own_cpu(swarm_pids(sw))
    served0 = sw.status(0)["bytes_served"]
    wake0 = _wakeups(sw, targets)
    sampler = LinkSampler(sw.hosts[1:]).start()
    # The source's uplink: when has it sent one whole copy?  Until then it is
    # the swarm's only supply of the newest chunks; what comes after is the
    # tail, which the targets' own uplinks carry.
    src_up = LinkSampler(sw.hosts[:1], interval=0.02, direction="rx").start()
    t0 = time.monotonic()
    res, wall = sw.ship(src, range(1, targets + 1), dest=dest)
    sampler.stop()
    src_up.stop()
    copied = src_up.reached(0, size)  # wire bytes: headers make it a little early
    egress, busy = sw.egress(0) - e0, cpu_busy(c0, cpu_times())
    own = own_cpu(swarm_pids(sw)) - own0
    if res["state"] != "done":
        raise RuntimeError(f"fdship job ended {res['state']}: {json.dumps(res)[:2000]}")
    for i in range(1, targets + 1):
        landed = sw.landed(i, src, dest)
        if not same_bytes(src, landed):
            raise RuntimeError(f"h{i} got different bytes")
        os.unlink(landed)  # keep the disk use of a long benchmark bounded
    idle = [sampler.idle_seconds(k, rate) for k in range(targets)]
    # Each target's own time (job start to its file installed), by kind.
    took = {i: res["machines"][sw.hosts[i].name]["seconds"] for i in range(1, targets + 1)}
    uncapped = [took[i] for i in range(1, targets + 1 - capped)]
    rx, tx = (a - b for a, b in zip(_wakeups(sw, targets), wake0))
    bound = size / rate
    return {"tool": "fdship", "variant": variant, "chunk": chunk,
            "target_ratio": target_ratio(targets, size, chunk),
            "targets": targets, "size": size, "wall_s": wall,
            "job_s": max(m["seconds"] for m in res["machines"].values()),
            "bound_s": bound, "ratio": wall / bound, "egress_ratio": egress / size,
            "served_ratio": (sw.status(0)["bytes_served"] - served0) / size,
            "idle_mean_s": statistics.mean(idle), "idle_max_s": max(idle), "cpu_busy": busy,
            # Source's one copy sent, in units of S/B, and the seconds after it.
            "source_copy_ratio": (copied - t0) / bound if copied else 0.0,
            "tail_s": t0 + wall - copied if copied else 0.0,
            "own_cores": own / wall,
            "capped": capped,
            "uncapped_max_ratio": max(uncapped) / bound if uncapped else 0.0,
            "uncapped_p50_ratio": statistics.median(uncapped) / bound if uncapped else 0.0,
            # Event-loop wake-ups per MiB delivered to the targets, all hosts summed.
            "rx_wakeups_per_mib": rx / (targets * size / MiB),
            "tx_wakeups_per_mib": tx / (targets * size / MiB)}


def _wakeups(sw: NetnsSwarm, targets: int) -> tuple[int, int]:
    """(receive, send) data wake-ups summed over the source and the targets."""
    rx = tx = 0
    for i in range(targets + 1):
        w = sw.status(i).get("data_wakeups", {})
        rx += w.get("receive", 0)
        tx += w.get("send", 0)
    return rx, tx


def rsync_run(sw: NetnsSwarm, ssh: Any, src: str, size: int, targets: int,
              rate: float) -> dict[str, Any]:
    e0, c0 = sw.egress(0), cpu_times()
    cpu0 = os.times()
    wall = parallel_rsync(sw, ssh, src, range(1, targets + 1), dest="rsync/")
    egress, busy = sw.egress(0) - e0, cpu_busy(c0, cpu_times())
    cpu1 = os.times()  # ssh, sshd and rsync are children of the harness: waited for, counted
    own = (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)
    for i in range(1, targets + 1):
        landed = os.path.join(sw.root(i), "rsync", os.path.basename(src))
        if not same_bytes(src, landed):
            raise RuntimeError(f"rsync to h{i} got different bytes")
        os.unlink(landed)
    bound = size / rate
    return {"tool": "parallel-rsync", "targets": targets, "size": size, "wall_s": wall,
            "bound_s": bound, "ratio": wall / bound, "egress_ratio": egress / size,
            "cpu_busy": busy, "own_cores": own / wall}


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    row = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, float):
            row[k] = statistics.median(r[k] for r in runs)
    row["runs"] = len(runs)
    return row


def fmt(row: dict[str, Any]) -> str:
    idle = f"{row['idle_mean_s']:.1f} / {row['idle_max_s']:.1f}" if "idle_mean_s" in row else "-"
    tool = row["tool"] + (f" ({row['variant']})" if row.get("variant") else "")
    chunk = f"{row['chunk'] // MiB} MiB" if "chunk" in row else "-"
    goal = f"{row['target_ratio']:.2f}" if "target_ratio" in row else "-"
    return (f"| {tool} | {row['targets']} | {row['size'] // MiB} MiB | {chunk} | "
            f"{row['wall_s']:.1f} | {row['bound_s']:.1f} | {row['ratio']:.2f} | {goal} | "
            f"{row['egress_ratio']:.2f} | {idle} | {row['own_cores']:.2f} | "
            f"{100 * row['cpu_busy']:.0f}% | {row['runs']} |")


HEADER = ("| tool | targets | file | chunk | wall s (median) | S/B s | wall / (S/B) | target "
          "| source egress / file | target idle s mean / max | cores used by the tool "
          "| machine CPU busy | runs |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="10x64,20x64,40x64,20x200",
                   help="TARGETSxMIB,... (default %(default)s)")
    p.add_argument("--rate", type=float, default=80.0, help="Mbit/s per host, both directions")
    p.add_argument("--repeat", type=int, default=3, help="fdship runs per case (median)")
    p.add_argument("--baseline", default="10x64,20x64",
                   help="cases (TxS) or target counts (T) to run parallel-rsync for "
                        "(default %(default)s; 'none' for none)")
    p.add_argument("--baseline-repeat", type=int, default=1)
    p.add_argument("--chunk-sizes", default="4M",
                   help="the center's --chunk-size for fdship, one cluster each "
                        "(default %(default)s; e.g. 4M,1M)")
    p.add_argument("--variants", default="",
                   help="NAME=DAEMON ARGS[@CENTER ARGS];... settings to compare, one "
                        "cluster each (e.g. 'lead on=;lead off=--fetch-lead 0' or "
                        "'relays=;no relays=@--stream-depth 0')")
    p.add_argument("--capped", default="",
                   help="K:RATE: the last K targets of each case run with --upload-rate and "
                        "--download-rate RATE (e.g. 2:2M); their own times are reported "
                        "apart from the others'")
    p.add_argument("--json", default="", help="write every run to this file")
    args = p.parse_args(argv)
    reason = netns_unavailable_reason()
    if reason:
        print(f"swarm_netns: {reason}", file=sys.stderr)
        return 2
    cases = []
    for c in args.cases.split(","):
        t, _, s = c.partition("x")
        cases.append((int(t), int(s) * MiB))
    baseline = set() if args.baseline == "none" else set(args.baseline.split(","))
    rate = args.rate * 1e6 / 8  # bytes/s
    rows: list[str] = []
    every: list[dict[str, Any]] = []
    chunks = [parse_size(c, "--chunk-sizes") for c in args.chunk_sizes.split(",") if c]
    variants: list[tuple[str, list[str], list[str]]] = [("", [], [])]
    if args.variants:
        variants = []
        for v in args.variants.split(";"):
            if v.strip():
                name, _, rest = v.partition("=")
                daemon, _, center = rest.partition("@")
                variants.append((name.strip(), shlex.split(daemon), shlex.split(center)))
    capped, cap_rate = 0, ""
    if args.capped:
        k, _, cap_rate = args.capped.partition(":")
        capped = int(k)
        parse_size(cap_rate, "--capped")
    for targets, size in cases:
        host_args = {i: ["--upload-rate", cap_rate, "--download-rate", cap_rate]
                     for i in range(targets + 1 - capped, targets + 1)} if capped else {}
        settings = [(c, v) for c in chunks for v in variants]
        for k, (chunk, (vname, vargs, cargs)) in enumerate(settings):
            print(f"== {targets} targets, {size // MiB} MiB, {args.rate:g} Mbit/s, chunks of "
                  f"{chunk // 1024} KiB{', ' + vname if vname else ''}", flush=True)
            with NetnsSwarm(targets + 1, args.rate, prefix="fbn",
                            center_args=["--chunk-size", str(chunk), *cargs],
                            daemon_args=vargs, host_args=host_args) as sw:
                src = os.path.join(sw.base, f"payload-{size // MiB}.bin")
                generate(src, size, seed=targets)
                runs = []
                for r in range(args.repeat):
                    res = fdship_run(sw, src, size, targets, rate, r, chunk, vname, capped)
                    print(f"   fdship run {r + 1}: {res['wall_s']:.1f} s = {res['ratio']:.2f} x "
                          f"S/B (target {res['target_ratio']:.2f}), egress "
                          f"{res['egress_ratio']:.2f} x, source's copy out at "
                          f"{res['source_copy_ratio']:.2f} x S/B then {res['tail_s']:.1f} s of "
                          f"tail, idle mean {res['idle_mean_s']:.1f} s, "
                          f"{res['own_cores']:.2f} cores, machine CPU "
                          f"{100 * res['cpu_busy']:.0f}%, wake-ups per MiB "
                          f"{res['rx_wakeups_per_mib']:.1f} rx / {res['tx_wakeups_per_mib']:.1f} tx"
                          + (f"; uncapped targets p50 {res['uncapped_p50_ratio']:.2f} max "
                             f"{res['uncapped_max_ratio']:.2f} x S/B" if capped else ""),
                          flush=True)
                    runs.append(res)
                    time.sleep(3)  # let the daemons drop the finished job's staging
                every += runs
                rows.append(fmt(median_row(runs)))
                last = k == len(settings) - 1
                if last and (str(targets) in baseline or f"{targets}x{size // MiB}" in baseline):
                    baseline_runs(sw, src, size, targets, rate, args.baseline_repeat,
                                  every, rows)
    print()
    print(HEADER)
    for line in rows:
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(every, f, indent=1)
    return 0


def baseline_runs(sw: NetnsSwarm, src: str, size: int, targets: int, rate: float,
                  repeat: int, every: list[dict[str, Any]], rows: list[str]) -> None:
    """parallel-rsync from host 0 to every target, in the cluster fdship just used."""
    ssh = start_sshd(sw)
    bruns = []
    for r in range(repeat):
        res = rsync_run(sw, ssh, src, size, targets, rate)
        print(f"   parallel-rsync run {r + 1}: {res['wall_s']:.1f} s = "
              f"{res['ratio']:.2f} x S/B, egress {res['egress_ratio']:.2f} x, "
              f"{res['own_cores']:.2f} cores, machine CPU "
              f"{100 * res['cpu_busy']:.0f}%", flush=True)
        bruns.append(res)
    every += bruns
    rows.append(fmt(median_row(bruns)))


if __name__ == "__main__":
    sys.exit(main())
