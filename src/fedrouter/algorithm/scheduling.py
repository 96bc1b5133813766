"""Which local clusters a client trains in a round and at what learning rate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def scheduled_clusters(schedule: str, num_local: int, round_index: int, offset: int = 0) -> list[int]:
    """Local cluster indices a client trains in round ``round_index`` (0-based).

    ``round-robin``: one local cluster per round, cycling through the client's *own* clusters (a per-client
    index, so a client with 2 clusters alternates even when another client has 3), starting at ``offset``
    (see ``balanced_offsets``). ``all``: every cluster.
    """
    if num_local < 1:
        raise ValueError("a client has at least one local cluster")
    if schedule == "all":
        return list(range(num_local))
    if schedule == "round-robin":
        return [(round_index + offset) % num_local]
    raise ValueError(f"unknown schedule {schedule!r} (expected 'round-robin' or 'all')")


def balanced_offsets(
    assignments: Sequence[Sequence[int]], rounds: int, fixed: Mapping[int, int] | None = None
) -> list[int]:
    """A round-robin starting point per client that spreads the updates over the global clusters.

    ``assignments[i]`` maps client i's local clusters to global clusters; client i trains local cluster
    ``(r + offset_i) % len(assignments[i])`` in round r. The offsets minimise the sum of squared update counts,
    per (round, global cluster) and per global cluster over the run, so that every global cluster gets updates
    in every round its holders allow and about the same number over the run. Each client still cycles through
    its own clusters, at the same cost. Found by coordinate descent from all-zero offsets (``fixed`` ones aside): each client in turn
    takes its best offset given the others (ties to the smallest), until a pass changes nothing.

    ``fixed`` maps client indices to offsets that must stay (clients already training when another joins
    late): only the other clients' offsets are chosen, so nobody's cycle jumps part-way through a run.

    Why not the client id: local clusters tend to come out in the order of the client's tasks, and in ``dual``
    client c holds tasks c and c+1; offset c then makes every client train an even-numbered task in even rounds,
    so in each round half the global adapters get no update and over 3 rounds two tasks train twice as much as
    the other two (seen in the paper4-cpu benchmark, dual seeds 0 and 1).
    """
    if rounds < 1 or not assignments:
        return [0] * len(assignments)
    num_global = 1 + max((int(g) for clusters in assignments for g in clusters), default=0)
    steps = np.arange(rounds)

    def updates(clusters: Sequence[int], offset: int) -> np.ndarray:
        counts = np.zeros((rounds, num_global))
        counts[steps, np.asarray(clusters)[(steps + offset) % len(clusters)]] = 1
        return counts

    def cost(counts: np.ndarray) -> float:
        return float((counts**2).sum() + (counts.sum(axis=0) ** 2).sum())

    fixed = dict(fixed or {})
    offsets = [fixed.get(i, 0) % max(len(clusters), 1) for i, clusters in enumerate(assignments)]
    total = sum(
        (updates(clusters, offsets[i]) for i, clusters in enumerate(assignments) if len(clusters)),
        np.zeros((rounds, num_global)),
    )
    for _ in range(10):  # converges in two or three passes; the cap only bounds a pathological input
        changed = False
        for i, clusters in enumerate(assignments):
            if len(clusters) == 0 or i in fixed:  # no clusters: trains nothing; fixed: keeps its offset
                continue
            rest = total - updates(clusters, offsets[i])
            best = min(range(len(clusters)), key=lambda offset: (cost(rest + updates(clusters, offset)), offset))
            changed |= best != offsets[i]
            offsets[i] = best
            total = rest + updates(clusters, best)
        if not changed:
            break
    return offsets


def learning_rate(base: float, round_index: int, rounds: int, schedule: str, min_ratio: float) -> float:
    """Learning rate of round ``round_index`` (0-based): constant, or cosine from ``base`` to ``base*min_ratio``."""
    if schedule == "constant" or rounds <= 1:
        return base
    progress = round_index / (rounds - 1)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
