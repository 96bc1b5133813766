"""What a client accepts from the server: the real handlers, fed oversized, mis-shaped and non-finite payloads;
and what the server accepts from clients: exact metrics, and poisoned updates (``benchmarks/attacks.py``) that the
``aggregate.*`` guards keep out of the shared adapter.

(Crashes and malformed arrays from clients are exercised end to end in test_faults.py.)
"""

import sys

import numpy as np
import pytest
from conftest import ROOT, tiny_settings
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedrouter.config import Config
from fedrouter.errors import ReplyError
from fedrouter.federated import client
from fedrouter.federated.checkpoint import load_checkpoint
from fedrouter.federated.records import check_evaluation, check_metric_keys, config_record, from_record, to_record
from fedrouter.simulation import run_experiment

sys.path.insert(0, str(ROOT / "benchmarks"))

from attacks import INFLATED_CONSTANT, Attack, attack_app


@pytest.fixture
def clustered(in_a_flower_task, tmp_path):
    """A client (partition 0, tiny model) after the clustering query, and its common initial adapter."""
    cfg = Config(tiny_settings(tmp_path))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = client.cluster(Message(RecordDict({"config": config_record(cfg)}), 1, "query.cluster"), context)
    hidden = from_record(reply.content.array_records["clusters"])["centroids"].shape[1]
    initial = client.initial(Message(RecordDict({"config": config_record(cfg)}), 1, "query.initial"), context)
    return cfg, context, from_record(initial.content.array_records["initial_adapter"]), hidden


def _train(cfg, adapter) -> Message:
    jobs = {"names": ["a"], "shared": ["0"], "local_cluster": [0], "personal": [""], "part": ["all"], "partner": [""]}
    content = RecordDict(
        {"config": config_record(cfg, round=0, lr=1e-3), "jobs": ConfigRecord(jobs), "adapter.a": to_record(adapter)}
    )
    return Message(content, 1, "train")


def _bad_adapters(good: dict) -> dict:
    first = sorted(good)[0]
    nan = {k: v.copy() for k, v in good.items()}
    nan[first][0, 0] = np.nan
    inf = {k: v.copy() for k, v in good.items()}
    inf[first][-1, -1] = np.inf
    return {
        "expected shape": good | {first: good[first].T.copy()},
        "NaN or infinite": nan,
        "NaN or infinite ": inf,
        "unexpected": good | {"base_model.model.embed_tokens.weight": np.zeros((50_000, 64), np.float32)},
        "missing": {k: v for k, v in good.items() if k != first},
        "expected a float array": good | {first: good[first].astype(np.int64)},
    }


def test_client_refuses_bad_adapters_from_the_server(clustered):
    cfg, context, good, _ = clustered
    reply = client.train(_train(cfg, good), context)  # the valid adapter trains
    assert "adapter.a" in reply.content.array_records
    for pattern, adapter in _bad_adapters(good).items():
        with pytest.raises(ReplyError, match=pattern.strip()):
            client.train(_train(cfg, adapter), context)


def _evaluate(cfg, adapter, centroids, mapping) -> Message:
    content = RecordDict(
        {
            "config": config_record(cfg, adapter_keys=["0"]),
            "adapter.0": to_record(adapter),
            "routing": to_record({"global_centroids": centroids, "local_to_global": mapping}),
        }
    )
    return Message(content, 1, "evaluate")


def test_client_refuses_centroids_that_do_not_fit_its_embeddings(clustered):
    cfg, context, good, hidden = clustered
    local_k = len(from_record(context.state.array_records[client.STATE_KEY])["centroids"])
    mapping = np.zeros(local_k, dtype=np.int64)
    cases = {
        "global centroids: expected shape": (np.zeros((1, hidden + 1), np.float32), mapping),
        "global centroids: contains NaN": (np.full((1, hidden), np.nan, np.float32), mapping),
        "local-to-global map: expected shape": (np.zeros((1, hidden), np.float32), np.zeros(local_k + 3, np.int64)),
        "points outside": (np.zeros((1, hidden), np.float32), mapping + 5),
    }
    for pattern, (centroids, mapping_) in cases.items():
        with pytest.raises(ReplyError, match=pattern):
            client.evaluate(_evaluate(cfg, good, centroids, mapping_), context)


def test_client_refuses_a_config_it_does_not_know(clustered):
    cfg, context, _, _ = clustered
    record = config_record(cfg)
    record["run.rouds"] = 3  # a misspelt setting
    content = RecordDict({"config": record})
    with pytest.raises(ReplyError, match="unknown setting 'run.rouds'.*did you mean 'run.rounds'"):
        client.cluster(Message(content, 1, "query.cluster"), context)


def test_client_refuses_a_method_it_does_not_know(clustered):
    """A config names a method; the client runs only methods registered on its own machine (never code a peer
    names): an unknown one is refused, plugins included."""
    cfg, context, _, _ = clustered
    record = config_record(cfg)
    record["run.method"] = "fedrouter_v9"
    with pytest.raises(ReplyError, match="unknown method 'fedrouter_v9'.*FEDROUTER_PLUGINS"):
        client.cluster(Message(RecordDict({"config": record}), 1, "query.cluster"), context)


def test_client_refines_with_the_servers_centroids_and_refuses_ones_that_do_not_fit(clustered):
    cfg, context, _, hidden = clustered

    def refine(centers) -> Message:
        content = RecordDict({"config": config_record(cfg), "global": to_record({"centroids": centers})})
        return client.refine(Message(content, 1, "query.refine"), context)

    own = from_record(context.state.array_records[client.STATE_KEY])["centroids"]
    clusters = from_record(refine(own).content.array_records["clusters"])
    assert clusters["centroids"].shape[1] == hidden and clusters["counts"].sum() == cfg["data.train_per_client"]
    cases = {
        "global centroids: expected shape": np.zeros((2, hidden + 1), np.float32),
        "global centroids: contains NaN": np.full((2, hidden), np.nan, np.float32),
        "global centroids: expected a float array": np.zeros((2, hidden), np.int64),
    }
    for pattern, centers in cases.items():
        with pytest.raises(ReplyError, match=pattern):
            refine(centers)


def test_server_rejects_metrics_that_are_missing_unexpected_or_out_of_range():
    check_metric_keys({"a": 1.0, "b": 2.0}, "client 1", ["a", "b"])
    for values, pattern in (({"a": 1.0}, r"missing \['b'\]"), ({"a": 1.0, "b": 2.0, "c": 0.0}, r"unexpected \['c'\]")):
        with pytest.raises(ReplyError, match=pattern):
            check_metric_keys(values, "client 1", ["a", "b"])
    # Scores are percentages per sample: two samples sum to at most 200.
    scores = {f"personalized.local.sorting.{s}": 150.0 for s in ("rouge1", "rouge2", "rougeL", "exact_match")}
    good = scores | {"personalized.local.sorting.n": 2.0, "personalized.local.sorting.route.0": 2.0}
    good |= {"answers_crc32": 7.0, "eval_s": 0.1, "model_loads": 1.0, "generated_tokens": 8.0}
    check_evaluation(good, "client 1", ["personalized"], ["local", "global"])
    bad = {
        "unexpected metric 'generalization": good | {"generalization.local.sorting.n": 2.0},
        "unexpected metric 'personalized.other": good | {"personalized.other.sorting.n": 2.0},
        "unexpected metric 'x'": good | {"x": 1.0},
        "needs a whole count": {k: v for k, v in good.items() if not k.endswith(".rouge2")},
        "score sum is outside": good | {"personalized.local.sorting.rouge1": 200.5},
        "score sum is outside ": good | {"personalized.local.sorting.rouge1": -0.5},
        "route counts add up to more": good | {"personalized.local.sorting.route.1": 1.0},
        "missing \\['eval_s'\\]": {k: v for k, v in good.items() if k != "eval_s"},
    }
    for pattern, values in bad.items():
        with pytest.raises(ReplyError, match=pattern.strip()):
            check_evaluation(values, "client 1", ["personalized"], ["local", "global"])


def _max_abs(run_dir) -> float:
    state, _ = load_checkpoint(run_dir)
    return max(float(np.abs(v).max()) for arrays in state.shared.values() for v in arrays.values())


@pytest.mark.slow
def test_a_reply_without_its_loss_is_rejected_and_a_poisoned_client_is_outvoted_by_the_median(tmp_path):
    """Client 3 leaves out ``loss.*`` in round 1; client 1 claims a million times its samples and uploads an adapter
    of 1000.0 every round (the weighted mean would end at about 1000 in every weight)."""
    settings = tiny_settings(tmp_path, **{"data.num_clients": 4, "run.method": "fedit", "aggregate.rule": "median"})
    app = attack_app({1: INFLATED_CONSTANT, 3: Attack(drop_loss=True, rounds=(1,))})
    run_dir, metrics = run_experiment(Config(settings), tmp_path / "poisoned", client_app=app)
    first, second = metrics["rounds"]
    assert list(first["rejected"]) == ["client 3"] and "missing ['loss.global']" in first["rejected"]["client 3"]
    assert second["rejected"] == {} and first["counted"] and second["robust"]["rule"] == "median"
    assert (run_dir / "metrics.json").is_file() and metrics["evaluation"]["missing_clients"] == {}
    assert _max_abs(run_dir) < 10


@pytest.mark.slow
def test_an_update_far_above_the_median_norm_is_rejected_by_name(tmp_path):
    settings = tiny_settings(
        tmp_path,
        **{
            "data.num_clients": 4,
            "run.method": "fedit",
            "run.rounds": 1,
            "eval.sets": "none",
            "aggregate.norm_bound": 3.0,
            "aggregate.norm_action": "reject",
        },
    )
    run_dir, metrics = run_experiment(
        Config(settings), tmp_path / "scaled", client_app=attack_app({2: Attack(scale=100.0)})
    )
    (record,) = metrics["rounds"]
    assert list(record["rejected"]) == ["client 2"] and "above the bound" in record["rejected"]["client 2"]
    assert list(record["robust"]["rejected"]) == ["client 2"] and record["counted"] and record["accepted"] == 3
    assert _max_abs(run_dir) < 10
