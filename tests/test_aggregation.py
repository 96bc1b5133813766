"""Robust aggregation per global cluster (``aggregate.*``): each rule, the weight cap and the update-norm bound on
hand-made updates, with one poisoned upload (every weight 1000.0, a million times the samples) among honest ones."""

import numpy as np
import pytest

from fedrouter.algorithm.aggregation import (
    Update,
    aggregate_clusters,
    combine_clusters,
    median_rule,
    screen_updates,
)
from fedrouter.config import Config
from fedrouter.federated import robust

SHAPES = {"a.lora_A": (2, 3), "a.lora_B": (3, 2)}
BASE = {key: np.full(shape, 0.5, np.float32) for key, shape in SHAPES.items()}  # what the server sent
BOUND = 0.6  # honest uploads move each weight by at most 0.05 from 0.5


def _round(honest: int = 4, seed: int = 0) -> list[Update]:
    rng = np.random.default_rng(seed)
    updates = [
        Update(
            "0", {k: (v + rng.uniform(-0.05, 0.05, v.shape)).astype(np.float32) for k, v in BASE.items()}, 8.0, f"c{i}"
        )
        for i in range(honest)
    ]
    poisoned = {k: np.full_like(v, 1000.0) for k, v in BASE.items()}
    return [*updates, Update("0", poisoned, 8e6, "attacker")]


def _max_abs(adapter) -> float:
    return max(float(np.abs(v).max()) for v in adapter.values())


def _rule(**settings):
    return robust.RULES[settings.get("aggregate.rule", "mean")](Config(settings))


def test_the_weighted_mean_is_poisoned_by_one_inflated_client():
    new, weights = aggregate_clusters({"0": BASE}, [u[:3] for u in _round()])
    assert _max_abs(new["0"]) > 999 and weights == {"0": 8e6 + 32}


@pytest.mark.parametrize(
    "settings",
    [
        {"aggregate.rule": "median"},
        {"aggregate.rule": "trimmed-mean", "aggregate.trim": 0.2},
        {"aggregate.rule": "krum", "aggregate.byzantine": 1},
        {"aggregate.rule": "multi-krum", "aggregate.byzantine": 1},
    ],
)
def test_robust_rules_keep_the_adapter_within_the_honest_range(settings):
    new, _, selected = combine_clusters({"0": BASE}, _round(), _rule(**settings))
    assert _max_abs(new["0"]) < BOUND
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in new["0"].values())
    if "krum" in settings["aggregate.rule"]:
        chosen = selected["0"]
        assert "attacker" not in chosen and len(chosen) == (1 if settings["aggregate.rule"] == "krum" else 4)


def test_rules_work_on_updates_from_the_sent_adapter():
    """The median of the uploads is the sent adapter plus the median update, whatever the sent adapter."""
    updates = [Update("0", {"w": np.array([1.0, 5.0], np.float32)}, 1.0), Update("0", {"w": np.array([3.0, 1.0])}, 1.0)]
    updates.append(Update("0", {"w": np.array([2.0, 2.0], np.float32)}, 1.0))
    for base in (0.0, 100.0):
        new, _, _ = combine_clusters({"0": {"w": np.full(2, base, np.float32)}}, updates, median_rule)
        np.testing.assert_allclose(new["0"]["w"], [2.0, 2.0])
    trimmed = _rule(**{"aggregate.rule": "trimmed-mean", "aggregate.trim": 0.34})  # cuts one of three per side
    new, _, _ = combine_clusters({"0": {"w": np.zeros(2, np.float32)}}, updates, trimmed)
    np.testing.assert_allclose(new["0"]["w"], [2.0, 2.0])


def test_mean_rule_is_the_weighted_mean_as_before():
    updates = _round()[:4]
    before, _ = aggregate_clusters({"0": BASE}, [u[:3] for u in updates])
    new, _, selected = combine_clusters({"0": BASE}, updates, _rule(**{"aggregate.rule": "mean"}))
    for key in BASE:
        np.testing.assert_array_equal(new["0"][key], before["0"][key])  # bit for bit: runs keep their numbers
    assert selected == {}


def test_norm_clipping_bounds_the_poisoned_update():
    updates, report = screen_updates({"0": BASE}, _round(), norm_bound=2.0, norm_action="clip")
    assert report["clipped"] == {"attacker": ["0"]} and report["rejected"] == {}
    new, _, _ = combine_clusters({"0": BASE}, updates)  # still the weighted mean, the attacker weighing 8e6
    norms = [np.linalg.norm([np.linalg.norm(u.arrays[k] - BASE[k]) for k in BASE]) for u in _round()]
    assert report["bounds"]["0"] == pytest.approx(2.0 * np.median(norms))  # the attacker's norm counts, once
    moved = np.linalg.norm([np.linalg.norm(new["0"][k] - BASE[k]) for k in BASE])
    assert moved <= report["bounds"]["0"] * (1 + 1e-5)
    assert _max_abs(new["0"]) < BOUND + 0.2


def test_norm_rejection_drops_every_update_of_the_rejected_client():
    extra = Update("1", {k: v + 0.01 for k, v in BASE.items()}, 8.0, "attacker")  # its other update is harmless
    adapters = {"0": BASE, "1": BASE}
    updates, report = screen_updates(adapters, [*_round(), extra], norm_bound=3.0, norm_action="reject")
    assert list(report["rejected"]) == ["attacker"] and "norm" in report["rejected"]["attacker"]
    assert {u.source for u in updates} == {"c0", "c1", "c2", "c3"}
    new, weights, _ = combine_clusters(adapters, updates)
    assert _max_abs(new["0"]) < BOUND and new["1"] is BASE and weights == {"0": 32.0}


def test_weights_are_capped_at_max_samples():
    updates, report = screen_updates({"0": BASE}, _round(), max_samples=10)
    assert report["capped"] == {"attacker": 8e6} and [u.weight for u in updates] == [8.0] * 4 + [10.0]
    _, weights, _ = combine_clusters({"0": BASE}, updates)
    assert weights == {"0": 42.0}


def test_guards_are_off_by_default():
    cfg = Config()
    assert (cfg["aggregate.rule"], cfg["aggregate.max_samples"], cfg["aggregate.norm_bound"]) == ("mean", 0, 0.0)
    updates, report = robust.screen(cfg, {"0": BASE}, _round())
    assert [(u.source, u.weight) for u in updates] == [(u.source, u.weight) for u in _round()]
    assert report == {"rule": "mean", "capped": {}, "bounds": {}, "clipped": {}, "rejected": {}, "selected": {}}
