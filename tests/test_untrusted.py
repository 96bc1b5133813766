"""What a client accepts from the server: the real handlers, fed oversized, mis-shaped and non-finite payloads.

(The server's side, replies from misbehaving clients, is exercised end to end in test_faults.py.)
"""

import numpy as np
import pytest
from conftest import tiny_settings
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedrouter.config import Config
from fedrouter.errors import ReplyError
from fedrouter.federated import client
from fedrouter.federated.records import config_record, from_record, to_record


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
