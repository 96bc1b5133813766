"""Which local clusters a client trains in a round and at what learning rate."""

from __future__ import annotations

import math


def scheduled_clusters(schedule: str, num_local: int, round_index: int, offset: int = 0) -> list[int]:
    """Local cluster indices a client trains in round ``round_index`` (0-based).

    ``round-robin``: one local cluster per round, cycling through the client's *own* clusters (a per-client
    index, so a client with 2 clusters alternates even when another client has 3), starting at ``offset`` (the
    client id): clients holding the same tasks in the same order then train different ones in a round, so every
    global cluster gets updates every round instead of some waiting until all clients reach them together.
    ``all``: every cluster.
    """
    if num_local < 1:
        raise ValueError("a client has at least one local cluster")
    if schedule == "all":
        return list(range(num_local))
    if schedule == "round-robin":
        return [(round_index + offset) % num_local]
    raise ValueError(f"unknown schedule {schedule!r} (expected 'round-robin' or 'all')")


def learning_rate(base: float, round_index: int, rounds: int, schedule: str, min_ratio: float) -> float:
    """Learning rate of round ``round_index`` (0-based): constant, or cosine from ``base`` to ``base*min_ratio``."""
    if schedule == "constant" or rounds <= 1:
        return base
    progress = round_index / (rounds - 1)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
