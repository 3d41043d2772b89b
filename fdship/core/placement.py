"""Peer choice: filter by hard rules, then rank by a weighted policy.

Given a chunk a target needs, the scheduler asks this module which holder to
fetch it from, and, when a holder has an upload slot free, whether it should
volunteer at all.  The shape follows Dragonfly2's evaluator: first the hard
rules (the peer holds the chunk, is alive, has a free upload slot, is not the
target itself, is not being avoided for serving bad data), then a score with
named weights so operators can reason about (and tests can pin down) why a
peer was picked.

Load steers both steps.  A busy host gets fewer upload slots
(:func:`upload_slots`), never volunteers to serve (:func:`volunteers`), and
ranks below idle holders.  Busyness (:func:`busyness`, 0..1) is the larger of
two readings:

* the host's CPU, counted only beyond the fleet's: hosts that share one
  machine, or a fleet that is uniformly busy, have nowhere better to send
  the work.  It rises from 0 at max(60 %, fleet mean + 15 points) to 1 thirty
  points higher;
* the CPU of the app the host exists to run (``app_cpu``: the processes of
  the daemon's ``watch_pidfile``, the bidder, in percent of one core like
  ``top``), on its own scale: 1 from the daemon's ``watch_busy_cpu``
  (``app_cpu_busy``, 75 % of a core by default: raise it for an app built
  to use many cores), 0 up to a third of that, linear in between.  A multi-core
  host can look idle overall while its bidder pegs a core, which host CPU
  alone would miss.  The app's figure is not compared with the fleet's:
  each daemon measures its own app (co-located test hosts do not share it),
  and a bidder that is short of CPU is short whatever its neighbours do.  A
  fleet whose apps are all busy still ships: every host keeps one upload
  slot and serves when no idle holder has the chunk.

Spare
upload bandwidth counts too: the scheduler estimates every host's uplink from
the chunks it served (bytes over seconds, times the transfers it ran side by
side) and the rank prefers the peer that would give a new transfer the
largest share, so slow links serve the chunks nobody is waiting on.

The source is only a candidate of last resort once a chunk has a copy
elsewhere: that is what keeps the source's egress near one copy of each file
however many targets there are.

Pure: no I/O, no clock; randomness comes from the caller's seeded generator.
"""

from __future__ import annotations

import random
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


@dataclass(frozen=True)
class Weights:
    """Named weights of the ranking policy (all scores are 'higher is better')."""

    free_slots: float = 1.0  # fraction of upload slots still free
    cpu: float = 1.5  # penalty per unit of busyness (host CPU beyond the fleet's, or app CPU)
    loadavg: float = 0.5  # penalty per unit of load average per core beyond 1 (capped at 2)
    net_tx: float = 0.5  # penalty per unit of upload rate over the host's observed peak
    speed: float = 1.0  # bonus per unit of the upload share a new transfer would get,
    # relative to the best candidate's (spare upload bandwidth)
    failures: float = 2.0  # penalty per recent failure serving this target
    source: float = 3.0  # penalty for the source host: spare its NIC
    jitter: float = 0.05  # random noise so equal peers share the work


DEFAULT_WEIGHTS = Weights()

# A host with this many recent failures towards one target is avoided outright.
AVOID_AFTER_FAILURES = 2
# Rank at most this many candidates: with thousands of holders, a random sample
# is as good as the full list and keeps a scheduling decision O(1).
SAMPLE = 24
# CPU percent below which a host never counts as busy, how far above the
# fleet's mean it must be, and the span over which busyness rises from 0 to 1.
BUSY_CPU = 60.0
BUSY_MARGIN = 15.0
BUSY_SPAN = 30.0
# The watched app's CPU (percent of one core) from which a host is fully busy
# on its account, unless its daemon says otherwise (watch_busy_cpu, reported
# as ``app_cpu_busy``); below a third of that it is not busy at all.
APP_BUSY = 75.0
APP_IDLE_SHARE = 1.0 / 3.0
APP_IDLE = APP_BUSY * APP_IDLE_SHARE


class PeerView(Protocol):
    """What placement needs to know about a host (the scheduler's HostState)."""

    name: str
    alive: bool
    uploads: int
    max_uploads: int
    cpu: float
    app_cpu: float
    app_cpu_busy: float
    loadavg: float
    net_tx: float
    net_tx_peak: float
    up_rate: float
    up_load: float


P = TypeVar("P", bound=PeerView)


def busyness(h: PeerView, fleet_cpu: float = 0.0) -> float:
    """0 (idle) .. 1 (busy): the host's CPU beyond the fleet's, or its app's CPU.

    See the module docstring for the rule; ``fleet_cpu`` is the fleet's mean
    host CPU.
    """
    floor = max(BUSY_CPU, fleet_cpu + BUSY_MARGIN)
    host = (h.cpu - floor) / BUSY_SPAN
    busy_at = h.app_cpu_busy if h.app_cpu_busy > 0 else APP_BUSY
    idle_at = busy_at * APP_IDLE_SHARE
    app = (h.app_cpu - idle_at) / (busy_at - idle_at)
    return min(1.0, max(0.0, host, app))


def upload_slots(h: PeerView, policy: int, fleet_cpu: float = 0.0) -> int:
    """How many uploads the scheduler may keep on ``h`` at once.

    ``policy`` (the host's own cap, or fewer) while the host is not busy,
    fewer as it gets busy, but at least one: a busy host that alone holds a
    chunk must still be able to hand it on.
    """
    base = max(1, min(h.max_uploads, policy))
    b = busyness(h, fleet_cpu)
    if b <= 0.0:
        return base
    return max(1, int(base * (1.0 - b) + 0.5))


def volunteers(h: PeerView, fleet_cpu: float = 0.0) -> bool:
    """Whether a free upload slot of ``h`` should be offered to waiting targets.

    A busy host still serves when a target picks it (it ranks last), but it
    is never pushed work on its own initiative.
    """
    return busyness(h, fleet_cpu) < 0.5


def filter_peers(holders: Iterable[P], target: str, avoid: dict[str, int],
                 exclude: str = "", free: Container[str] | None = None) -> list[P]:
    """Hard rules.  ``avoid`` maps peer name to failures serving this target;
    ``free`` holds the names of hosts with room for one more upload (None:
    those below their own cap on concurrent uploads)."""
    out = []
    for h in holders:
        room = h.uploads < h.max_uploads if free is None else h.name in free
        if (room and h.alive and h.name != target and h.name != exclude
                and avoid.get(h.name, 0) < AVOID_AFTER_FAILURES):
            out.append(h)
    return out


def share(h: PeerView) -> float:
    """The upload rate a new transfer from ``h`` could get (0 when unknown)."""
    if h.up_rate <= 0:
        return 0.0
    return h.up_rate * max(1.0 - h.up_load, 1.0 / (h.uploads + 1))


def score(h: PeerView, *, is_source: bool, failures: int, rng: random.Random,
          w: Weights = DEFAULT_WEIGHTS, fleet_cpu: float = 0.0, best_share: float = 0.0) -> float:
    free = (h.max_uploads - h.uploads) / max(1, h.max_uploads)
    tx = h.net_tx / h.net_tx_peak if h.net_tx_peak > 0 else 0.0
    s = share(h)
    # Unknown speed counts as the best: a host that never served is not penalised.
    speed = min(1.0, s / best_share) if s > 0 and best_share > 0 else 1.0
    return (w.free_slots * free
            - w.cpu * busyness(h, fleet_cpu)
            - w.loadavg * min(2.0, max(0.0, h.loadavg - 1.0))
            - w.net_tx * min(1.0, tx)
            + w.speed * speed
            - w.failures * failures
            - (w.source if is_source else 0.0)
            + w.jitter * rng.random())


def rank(candidates: Sequence[P], *, source: str, avoid: dict[str, int],
         rng: random.Random, w: Weights = DEFAULT_WEIGHTS,
         fleet_cpu: float = 0.0) -> P | None:
    """The best candidate, or None."""
    if not candidates:
        return None
    if len(candidates) > SAMPLE:
        candidates = rng.sample(list(candidates), SAMPLE)
    if len(candidates) == 1:
        return candidates[0]
    best_share = max(share(h) for h in candidates)
    best, best_score = None, float("-inf")
    for h in candidates:
        s = score(h, is_source=h.name == source, failures=avoid.get(h.name, 0), rng=rng, w=w,
                  fleet_cpu=fleet_cpu, best_share=best_share)
        if s > best_score:
            best, best_score = h, s
    return best
