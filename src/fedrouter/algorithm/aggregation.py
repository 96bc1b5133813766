"""Per-global-cluster aggregation of adapters (NumPy only): the weighted mean, and the guards against clients
that send poisoned updates (weight caps, update-norm bounds, robust rules).

Norms and robust rules work on *updates*: an uploaded adapter minus the adapter the server sent that round, so a
norm bound measures how far one client moves the shared adapter. The rules taken from Flower (trimmed mean,
Krum) are bound in ``fedrouter.federated.robust``: this layer imports no Flower, a rule reaches it as a plain
function (``Rule``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from fedrouter.arrays import Arrays

Rule = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, list[int] | None]]
"""(a cluster's updates as rows (n, d) in float64, their weights (n,)) -> the combined update (d,) and the rows
it selected (None: all of them)."""

NORM_ACTIONS = ("clip", "reject")


class Update(NamedTuple):
    """One uploaded adapter: the shared adapter (global cluster) it trained, its arrays, its weight (the local
    cluster's sample count) and who sent it (a client's name, for the round's report)."""

    cluster: Hashable
    arrays: Mapping[str, np.ndarray]
    weight: float
    source: str = ""


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


def flatten(arrays: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    """``keys``' arrays as one float64 vector."""
    return np.concatenate([np.asarray(arrays[key], dtype=np.float64).ravel() for key in keys] or [np.zeros(0)])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> Arrays:
    """The inverse of ``flatten(like, list(like))``: arrays shaped as ``like``'s."""
    arrays, start = {}, 0
    for key, value in like.items():
        arrays[key] = vector[start : start + value.size].reshape(value.shape)
        start += value.size
    return arrays


def median_rule(updates: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, None]:
    """Coordinate-wise median, unweighted (as Flower's FedMedian): one outlier among three moves nothing."""
    return np.median(updates, axis=0), None


def screen_updates(
    adapters: Mapping[Hashable, Arrays],
    updates: Sequence[tuple],
    *,
    max_samples: int = 0,
    norm_bound: float = 0.0,
    norm_action: str = "clip",
) -> tuple[list[Update], dict]:
    """The per-update guards, before any combining: the updates to combine, and what the guards did.

    Weights are capped at ``max_samples`` (0: no cap). Per global cluster, update norms (``|upload - adapters
    [cluster]|``) above ``norm_bound`` x the cluster's median update norm this round (0: no bound) are clipped to
    it (``clip``: the upload becomes the sent adapter plus the shortened update) or drop every update of their
    source (``reject``: the whole reply). A bound needs a few updates per cluster: one update is its own median.

    The report: ``capped`` (source -> the weight it claimed), ``bounds`` (cluster -> norm bound), ``clipped``
    (source -> clusters), ``rejected`` (source -> why).
    """
    if norm_action not in NORM_ACTIONS:
        raise ValueError(f"norm_action must be one of {NORM_ACTIONS}, got {norm_action!r}")
    report: dict = {"capped": {}, "bounds": {}, "clipped": {}, "rejected": {}}
    screened = []
    for update in (Update(*u) for u in updates):
        if update.cluster not in adapters:
            raise KeyError(f"update for unknown global cluster {update.cluster}")
        if max_samples and update.weight > max_samples:
            report["capped"][update.source] = update.weight
            update = update._replace(weight=float(max_samples))
        screened.append(update)
    if norm_bound <= 0:
        return screened, report
    deltas = [flatten(u.arrays, list(u.arrays)) - flatten(adapters[u.cluster], list(u.arrays)) for u in screened]
    norms = np.array([np.linalg.norm(d) for d in deltas])
    clusters = [u.cluster for u in screened]
    bounds = {c: norm_bound * float(np.median(norms[[i for i, k in enumerate(clusters) if k == c]])) for c in clusters}
    report["bounds"] = {str(c): bound for c, bound in bounds.items()}
    kept = []
    for update, delta, norm in zip(screened, deltas, norms, strict=True):
        bound = bounds[update.cluster]
        if norm > bound and norm_action == "reject":
            report["rejected"].setdefault(
                update.source,
                f"{update.source}: update norm {norm:.4g} for adapter {update.cluster} is above the bound {bound:.4g} "
                f"('aggregate.norm_bound' = {norm_bound} x the round's median norm)",
            )
            continue
        if norm > bound:
            report["clipped"].setdefault(update.source, []).append(str(update.cluster))
            base = flatten(adapters[update.cluster], list(update.arrays))
            update = update._replace(arrays=unflatten(base + delta * (bound / norm), update.arrays))
        kept.append(update)
    return [u for u in kept if u.source not in report["rejected"]], report


def combine_clusters(
    adapters: Mapping[Hashable, Arrays], updates: Sequence[tuple], rule: Rule | None = None
) -> tuple[dict, dict, dict]:
    """New adapter per global cluster (or any named shared adapter) from ``(key, arrays, weight[, source])``.

    ``rule`` None: the weighted mean (weights: the sample counts of the *local clusters* that trained each update,
    not whole-client dataset sizes), taken over the uploads themselves, which is the sent adapter plus the mean
    update. Else the sent adapter plus ``rule`` of the updates. A cluster that received no update keeps its adapter.
    Every rule here gives, per weight, a value within the uploads' range, so finite float32 uploads give finite
    float32 adapters. Returns the adapters, the total weight each cluster received, and what the rule selected
    (cluster -> sources).
    """
    grouped: dict[Hashable, list[Update]] = defaultdict(list)
    for update in (Update(*u) for u in updates):
        if update.cluster not in adapters:
            raise KeyError(f"update for unknown global cluster {update.cluster}")
        grouped[update.cluster].append(update)
    result, selected = dict(adapters), {}
    for cluster, group in grouped.items():
        if rule is None:
            result[cluster] = weighted_average([(u.arrays, u.weight) for u in group])
            continue
        keys = list(group[0].arrays)
        base = flatten(adapters[cluster], keys)
        rows = np.stack([flatten(u.arrays, keys) - base for u in group])
        combined, chosen = rule(rows, np.array([u.weight for u in group], dtype=np.float64))
        if chosen is not None:
            selected[str(cluster)] = [group[i].source for i in chosen]
        result[cluster] = {k: v.astype(np.float32) for k, v in unflatten(base + combined, group[0].arrays).items()}
    return result, {cluster: float(sum(u.weight for u in group)) for cluster, group in grouped.items()}, selected


def aggregate_clusters(
    adapters: Mapping[Hashable, Arrays],
    updates: Sequence[tuple[Hashable, Mapping[str, np.ndarray], float]],
) -> tuple[dict, dict]:
    """The weighted mean per cluster (``combine_clusters`` without a rule): the adapters and each one's weight."""
    result, weights, _ = combine_clusters(adapters, updates)
    return result, weights
