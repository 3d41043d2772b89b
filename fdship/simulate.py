"""``fdship simulate``: the real scheduler core against a simulated fleet.

Where it sits: a command-line front end to :class:`fdship.testing.SimCluster`,
which drives the very ``Scheduler`` the center runs with simulated daemons
(discrete events, no sockets, no clock).  One source ships one file to every
other host; the hosts' links have the given bandwidth in both directions,
except a fraction of them that get a quarter of it.

What it reports, per job:

* the completion time over the lower bound ``S/B`` (file size over one fast
  link's rate: no target can receive the file faster, and the source cannot
  send one copy faster), for the whole job and for the fast and slow targets
  separately (a slow target's own bound is ``S`` over its slower link, so the
  job's bound is the slowest target's);
* the source's egress over the file size (how many copies it sent);
* the center's CPU time for the job: ``time.process_time`` summed around every
  ``Scheduler.handle`` call, i.e. the scheduling work alone, not the
  simulator's bookkeeping;
* how long targets waited between finishing a chunk and starting the next.

The simulated daemons behave like the real ones, including the notice a
fetch sends ``--lead`` seconds before its last byte (the daemon's
``fetch_lead``), which lets the center give both ends their next transfer
while the last bytes arrive; ``--lead 0`` shows the cost of the round trip
between chunks without it.

Runs with the same arguments and seed give the same numbers within one
process; across processes, Python's string-hash randomisation changes the
order in which the scheduler meets tied hosts and moves the figures by a few
hundredths.  Run with ``PYTHONHASHSEED=0`` for runs that repeat exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from fdship.config import parse_size
from fdship.core.scheduler import Tunables
from fdship.errors import ConfigError
from fdship.protocol import chunk_count
from fdship.testing import SimCluster, fake_file

# One hop between center and daemon or between daemons, in seconds.  A chunk
# costs three (ack, pull, GET): 15 ms, about the 16-19 ms per chunk measured
# between one source and one target on the namespace network of
# docs/benchmarks.md (ack batching, the center's fsync, two HTTP requests).
DEFAULT_LATENCY = 0.005
# How long before its last byte a fetch tells the center it is about to finish
# (``FetchDraining``): the daemon's ``fetch_lead`` default.
DEFAULT_LEAD = 0.05
SLOW_FACTOR = 0.25
MAX_HOSTS = 100_000


def simulate(hosts: int, size: int, bandwidth: float, chunk_size: int = 4 * 1024 * 1024,
             slow_fraction: float = 0.0, seed: int = 1, latency: float = DEFAULT_LATENCY,
             tunables: Tunables | None = None, lead: float = DEFAULT_LEAD,
             stream_depth: int | None = None, slow_capped: bool = False) -> dict[str, Any]:
    """Ship one ``size``-byte file from host 0 to all others; return the figures.

    ``slow_capped``: the slow hosts are slow by their daemons' rate caps, which
    they report in their heartbeats (else the center learns their speed only
    by timing their transfers)."""
    wall0 = time.perf_counter()
    sim = SimCluster(hosts, bandwidth, slow_fraction=slow_fraction, slow_factor=SLOW_FACTOR,
                     seed=seed, latency=latency, jitter=0.5, drain_lead=lead,
                     slow_capped=slow_capped,
                     tunables=tunables or Tunables(
                         heartbeat_timeout=1e9, chunk_size=chunk_size,
                         **({} if stream_depth is None else {"stream_depth": stream_depth})))
    cpu_setup = sim.cpu_seconds  # registering the hosts is not part of the job
    targets = [n for n in sim.hosts if n != "h00000"]
    job = sim.submit([fake_file("/sim/file.bin", size, chunk_size)], targets,
                     chunk_size=chunk_size)
    bound = size / bandwidth
    # Generous: even a bad schedule ends long before this; a stuck one must not spin.
    sim.run(max_time=max(600.0, 100.0 * bound / SLOW_FACTOR))
    finish = sim.finish_times(job)
    state = sim.ended.get(job, "running")
    fast = sorted(v for n, v in finish.items() if n not in sim.slow)
    slow = sorted(v for n, v in finish.items() if n in sim.slow)
    completion = max(finish.values(), default=0.0)
    job_bound = bound / SLOW_FACTOR if slow else bound
    summ = sim.summary()
    src = sim.hosts["h00000"]

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0

    return {
        "hosts": hosts, "targets": len(targets), "size": size, "bandwidth": bandwidth,
        "chunk_size": chunk_size, "chunks": chunk_count(size, chunk_size),
        "slow_fraction": slow_fraction, "slow_hosts": len(sim.slow), "seed": seed,
        "slow_capped": slow_capped,
        "latency": latency, "lead": lead, "state": state, "done": len(finish),
        "lower_bound_s": bound, "job_bound_s": job_bound,
        "completion_s": completion, "ratio": completion / bound if bound else 0.0,
        "ratio_to_job_bound": completion / job_bound if job_bound else 0.0,
        "fast_p50_ratio": pct(fast, 0.5) / bound if bound else 0.0,
        "fast_max_ratio": (fast[-1] / bound) if fast and bound else 0.0,
        "slow_max_ratio": (slow[-1] / (bound / SLOW_FACTOR)) if slow and bound else 0.0,
        "source_egress_ratio": src.bytes_up / size if size else 0.0,
        "max_source_sends": summ["max_source_sends"],
        "center_cpu_s": summ["cpu_seconds"] - cpu_setup,
        "events": summ["events"], "transfers": summ["transfers"],
        "mean_slot_gap_s": summ["mean_slot_gap"], "mean_idle_s": summ["mean_idle_seconds"],
        "violations": len(summ["violations"]),
        "stream_depth": sim.sched.t.stream_depth, "relayed": sim.relayed,
        "wall_s": time.perf_counter() - wall0,
    }


def _check(args: argparse.Namespace) -> tuple[int, int, float, int, float]:
    hosts = int(args.hosts)
    if not 2 <= hosts <= MAX_HOSTS:
        raise ConfigError(f"--hosts {hosts}: give between 2 and {MAX_HOSTS} hosts (one source "
                          "and at least one target)")
    size = parse_size(args.size, "--size")
    if size <= 0:
        raise ConfigError("--size must be positive, e.g. 200M")
    bandwidth = float(parse_size(args.bandwidth, "--bandwidth"))
    if bandwidth <= 0:
        raise ConfigError("--bandwidth must be positive bytes/s, e.g. 10M")
    chunk = parse_size(args.chunk_size, "--chunk-size")
    if not 4096 <= chunk <= 1024**3:
        raise ConfigError("--chunk-size must be between 4K and 1G, e.g. 4M")
    if chunk_count(size, chunk) * (hosts - 1) > 50_000_000:
        raise ConfigError(f"{hosts - 1} targets x {chunk_count(size, chunk)} chunks is too many "
                          "transfers to simulate; use a larger --chunk-size or fewer --hosts")
    slow = float(args.slow_fraction)
    if not 0.0 <= slow < 1.0:
        raise ConfigError("--slow-fraction must be at least 0 and below 1, e.g. 0.1")
    return hosts, size, bandwidth, chunk, slow


def _mib(n: float) -> str:
    return f"{n / 1048576:.0f} MiB"


def run_simulation(args: argparse.Namespace) -> int:
    """The ``fdship simulate`` command; prints a summary (or JSON) and returns 0."""
    hosts, size, bandwidth, chunk, slow = _check(args)
    latency = float(getattr(args, "latency", None) or DEFAULT_LATENCY)
    lead = getattr(args, "lead", None)
    lead = DEFAULT_LEAD if lead is None else float(lead)
    if lead < 0:
        raise ConfigError("--lead must be at least 0 seconds (0: fetches never announce "
                          "their end), e.g. 0.05")
    depth = getattr(args, "stream_depth", None)
    if depth is not None and not 0 <= int(depth) <= 64:
        raise ConfigError("--stream-depth must be between 0 (no cut-through) and 64, e.g. 16")
    r = simulate(hosts, size, bandwidth, chunk, slow, int(args.seed), latency, lead=lead,
                 stream_depth=None if depth is None else int(depth),
                 slow_capped=bool(getattr(args, "slow_capped", False)))
    if getattr(args, "json", False):
        json.dump(r, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    how = ", by rate caps they report" if r["slow_capped"] and r["slow_hosts"] else ""
    print(f"{r['targets']} targets ({r['slow_hosts']} at a quarter of the bandwidth{how}), "
          f"{_mib(size)} in {r['chunks']} chunks of {_mib(chunk)}, "
          f"{bandwidth / 1048576:.1f} MiB/s links, seed {r['seed']}, "
          f"{r['latency'] * 1000:g} ms per hop, fetch lead {r['lead'] * 1000:g} ms, "
          f"relay chains up to {r['stream_depth']} hosts")
    print(f"  job {r['state']}: {r['done']}/{r['targets']} targets in {r['completion_s']:.1f} s; "
          f"lower bound S/B {r['lower_bound_s']:.1f} s")
    print(f"  completion / (S/B)     {r['ratio']:.3f}   (job bound {r['job_bound_s']:.1f} s: "
          f"{r['ratio_to_job_bound']:.3f})")
    print(f"  fast targets           p50 {r['fast_p50_ratio']:.3f}  max {r['fast_max_ratio']:.3f}"
          " x S/B")
    if r["slow_hosts"]:
        print(f"  slow targets           max {r['slow_max_ratio']:.3f} x their own bound")
    print(f"  source egress          {r['source_egress_ratio']:.3f} x file size "
          f"(at most {r['max_source_sends']} of any chunk)")
    print(f"  center CPU for the job {r['center_cpu_s']:.3f} s over {r['events']} events "
          f"({r['transfers']} transfers, {r['relayed']} from a relay still receiving "
          "the chunk)")
    print(f"  target wait per chunk  {r['mean_slot_gap_s'] * 1000:.1f} ms mean; "
          f"simulated in {r['wall_s']:.1f} s wall")
    if r["violations"]:
        print(f"  VIOLATIONS: {r['violations']} (a fetch from a peer lacking the chunk or a cap "
              "exceeded): this is a scheduler bug")
    return 0
