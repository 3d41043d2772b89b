"""Peer choice: filter by hard rules, then rank by a weighted policy.

Given a chunk a target needs, the scheduler asks this module which holder to
fetch it from.  The shape follows Dragonfly2's evaluator: first the hard
rules (the peer holds the chunk, is alive, has a free upload slot, is not the
target itself, is not being avoided for serving bad data), then a score with
named weights so operators can reason about (and tests can pin down) why a
peer was picked.  The source is only a candidate of last resort once a chunk
has a copy elsewhere: that is what keeps the source's egress near one copy of
each file however many targets there are.

Pure: no I/O, no clock; randomness comes from the caller's seeded generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence


@dataclass(frozen=True)
class Weights:
    """Named weights of the ranking policy (all scores are 'higher is better')."""

    free_slots: float = 1.0  # fraction of upload slots still free
    cpu: float = 1.5  # penalty per unit of CPU busy (0..1): keep work off busy bidders
    loadavg: float = 0.5  # penalty per unit of load average per core (capped at 2)
    net_tx: float = 0.5  # penalty per unit of upload rate over the host's observed peak
    failures: float = 2.0  # penalty per recent failure serving this target
    source: float = 3.0  # penalty for the source host: spare its NIC
    jitter: float = 0.05  # random noise so equal peers share the work


DEFAULT_WEIGHTS = Weights()

# A host with this many recent failures towards one target is avoided outright.
AVOID_AFTER_FAILURES = 2
# Rank at most this many candidates: with thousands of holders, a random sample
# is as good as the full list and keeps a scheduling decision O(1).
SAMPLE = 24


class PeerView(Protocol):
    """What placement needs to know about a host (the scheduler's HostState)."""

    name: str
    alive: bool
    uploads: int
    max_uploads: int
    cpu: float
    loadavg: float
    net_tx: float
    net_tx_peak: float
    bad_serves: int


def filter_peers(holders: Iterable[PeerView], target: str, avoid: dict[str, int],
                 exclude: str = "") -> list[PeerView]:
    """Hard rules.  ``avoid`` maps peer name to failures serving this target."""
    out = []
    for h in holders:
        if (h.alive and h.name != target and h.name != exclude and h.uploads < h.max_uploads
                and avoid.get(h.name, 0) < AVOID_AFTER_FAILURES):
            out.append(h)
    return out


def score(h: PeerView, *, is_source: bool, failures: int, rng: random.Random,
          w: Weights = DEFAULT_WEIGHTS) -> float:
    free = (h.max_uploads - h.uploads) / max(1, h.max_uploads)
    tx = h.net_tx / h.net_tx_peak if h.net_tx_peak > 0 else 0.0
    return (w.free_slots * free
            - w.cpu * min(1.0, h.cpu / 100.0)
            - w.loadavg * min(2.0, h.loadavg)
            - w.net_tx * min(1.0, tx)
            - w.failures * failures
            - (w.source if is_source else 0.0)
            + w.jitter * rng.random())


def rank(candidates: Sequence[PeerView], *, source: str, avoid: dict[str, int],
         rng: random.Random, w: Weights = DEFAULT_WEIGHTS) -> PeerView | None:
    """The best candidate, or None."""
    if not candidates:
        return None
    if len(candidates) > SAMPLE:
        candidates = rng.sample(list(candidates), SAMPLE)
    best, best_score = None, float("-inf")
    for h in candidates:
        s = score(h, is_source=h.name == source, failures=avoid.get(h.name, 0), rng=rng, w=w)
        if s > best_score:
            best, best_score = h, s
    return best
