"""Per-global-cluster weighted averaging of adapters (NumPy only)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from fedrouter.arrays import Arrays


def weighted_average(updates: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> Arrays:
    """Average same-keyed arrays by weight, in float64, returned as float32."""
    if not updates:
        raise ValueError("no updates to average")
    total = float(sum(weight for _, weight in updates))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    keys = list(updates[0][0])
    averaged: Arrays = {}
    for key in keys:
        acc = np.zeros(np.shape(updates[0][0][key]), dtype=np.float64)
        for arrays, weight in updates:
            acc += np.asarray(arrays[key], dtype=np.float64) * (weight / total)
        averaged[key] = acc.astype(np.float32)
    return averaged


def aggregate_clusters(
    adapters: Mapping[Hashable, Arrays],
    updates: Sequence[tuple[Hashable, Mapping[str, np.ndarray], float]],
) -> tuple[dict, dict]:
    """New adapter per global cluster (or any named shared adapter) from ``(key, arrays, num_samples)`` updates.

    Weights are the sample counts of the *local clusters* that trained each update (not whole-client dataset
    sizes). A cluster that received no update keeps its adapter. Returns the adapters and the total weight
    each cluster received.
    """
    grouped: dict[Hashable, list[tuple[Mapping[str, np.ndarray], float]]] = defaultdict(list)
    for cluster, arrays, weight in updates:
        if cluster not in adapters:
            raise KeyError(f"update for unknown global cluster {cluster}")
        grouped[cluster].append((arrays, weight))
    result = dict(adapters)
    for cluster, group in grouped.items():
        result[cluster] = weighted_average(group)
    return result, {cluster: float(sum(w for _, w in group)) for cluster, group in grouped.items()}
