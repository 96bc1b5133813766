"""The ``aggregate.*`` settings as aggregation guards and rules, with Flower's robust-aggregation helpers.

Why this module: ``fedrouter.algorithm`` imports no Flower (the layering rule), so the pure-NumPy parts (weight
caps, update-norm bounds, the coordinate-wise median, the per-cluster loop) live in ``algorithm.aggregation``
and are tested alone, while this thin layer wraps Flower's ``trim_mean`` (FedTrimmedAvg) and
``select_multikrum`` (Krum / Multi-Krum) as plain ``Rule`` functions instead of copying them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedrouter.algorithm.aggregation import Rule, Update, combine_clusters, median_rule, screen_updates
from fedrouter.arrays import Arrays
from fedrouter.config import Config


def trimmed_mean_rule(trim: float) -> Rule:
    """Flower's trimmed mean: per coordinate, drop the ``trim`` fraction of largest and of smallest values."""
    return lambda updates, weights: (trim_mean(updates, trim), None)


def krum_rule(byzantine: int, select: int) -> Rule:
    """Flower's (Multi-)Krum choice of ``select`` updates (0: all but ``byzantine``), assuming ``byzantine``
    malicious clients; the chosen ones are averaged by weight, as Flower's MultiKrum does."""

    def rule(updates: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, list[int]]:
        contents = [RecordDict({"update": ArrayRecord({"update": Array(row)})}) for row in updates]
        count = min(select or len(updates) - byzantine, len(updates))
        chosen = sorted(
            next(i for i, c in enumerate(contents) if c is picked)
            for picked in select_multikrum(contents, byzantine, max(count, 1))
        )
        share = weights[chosen] / weights[chosen].sum()
        return (updates[chosen] * share[:, None]).sum(axis=0), chosen

    return rule


RULES: dict[str, Callable[[Config], Rule | None]] = {
    "mean": lambda cfg: None,  # the weighted mean, as before robust rules existed
    "median": lambda cfg: median_rule,
    "trimmed-mean": lambda cfg: trimmed_mean_rule(cfg["aggregate.trim"]),
    "krum": lambda cfg: krum_rule(cfg["aggregate.byzantine"], 1),
    "multi-krum": lambda cfg: krum_rule(cfg["aggregate.byzantine"], cfg["aggregate.krum_select"]),
}


def screen(cfg: Config, shared: Mapping[Hashable, Arrays], updates: Sequence[tuple]) -> tuple[list[Update], dict]:
    """A round's updates after the weight cap and norm bound; the report starts the round's ``robust`` record
    (``selected``: filled by ``combine`` for the Krum rules)."""
    kept, report = screen_updates(
        shared,
        updates,
        max_samples=cfg["aggregate.max_samples"],
        norm_bound=cfg["aggregate.norm_bound"],
        norm_action=cfg["aggregate.norm_action"],
    )
    return kept, {"rule": cfg["aggregate.rule"]} | report | {"selected": {}}


def combine(cfg: Config, shared: Mapping[Hashable, Arrays], updates: Sequence[Update]) -> tuple[dict, dict, dict]:
    """New shared adapters by the configured rule; their weights; what the rule selected."""
    return combine_clusters(shared, updates, RULES[cfg["aggregate.rule"]](cfg))
