"""Faults in Flower's simulation: clients that crash or send invalid replies, a killed server, late clients.

The misbehaving clients are FedRouter's real ClientApp handlers whose replies a test app corrupts (or that
raise) for chosen clients and rounds; the server is the real one.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from conftest import tiny_settings
from flwr.app import Array, ArrayRecord
from flwr.clientapp import ClientApp

from fedrouter.algorithm.clustering import join_clusters, join_radius
from fedrouter.config import Config
from fedrouter.federated import client
from fedrouter.federated.checkpoint import load_checkpoint
from fedrouter.simulation import run_experiment

pytestmark = pytest.mark.slow

# (client, round) -> what goes wrong; round 0 is the clustering, "eval" the final evaluation.
FAULTS = {
    (3, 0): "negative counts",
    (1, 1): "nan adapter",
    (1, 2): "wrong shape",
    (2, 2): "crash",
    (2, 3): "missing key",
    (1, "eval"): "crash",
}


def _partition(context) -> int:
    return int(context.node_config["partition-id"])


def _corrupt(reply, record_name: str, fault: str):
    arrays = {key: array.numpy().copy() for key, array in reply.content.array_records[record_name].items()}
    first = sorted(arrays)[0]
    if fault == "negative counts":
        arrays["counts"] = -arrays["counts"]
    elif fault == "nan adapter":
        arrays[first][0, 0] = np.nan
    elif fault == "wrong shape":
        arrays[first] = arrays[first].T.copy()
    elif fault == "missing key":
        del arrays[first]
    reply.content.array_records[record_name] = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
    )
    return reply


faulty = ClientApp()


@faulty.query("cluster")
def _cluster(message, context):
    reply = client.cluster(message, context)
    fault = FAULTS.get((_partition(context), 0))
    return _corrupt(reply, "clusters", fault) if fault else reply


@faulty.query("initial")
def _initial(message, context):
    return client.initial(message, context)


@faulty.train()
def _train(message, context):
    fault = FAULTS.get((_partition(context), int(message.content["config"]["round"]) + 1))
    if fault == "crash":
        raise RuntimeError("this client crashed")
    reply = client.train(message, context)
    return _corrupt(reply, "adapter.global", fault) if fault else reply


@faulty.evaluate()
def _evaluate(message, context):
    if FAULTS.get((_partition(context), "eval")) == "crash" and "limit" not in message.content["config"]:
        raise RuntimeError("this client crashed")
    return client.evaluate(message, context)


def test_invalid_and_failed_replies_are_rejected_and_the_run_goes_on(tmp_path):
    settings = tiny_settings(
        tmp_path, **{"data.num_clients": 4, "run.rounds": 3, "run.method": "fedit", "run.min_replies": 2}
    )
    run_dir, metrics = run_experiment(Config(settings), tmp_path / "faults", client_app=faulty)

    # Client 3 sent NaN centroids: it is left out of the run; the other three take part.
    assert set(metrics["clustering"]["local_k"]) == {"0", "1", "2"}
    assert "at least one sample" in next(iter(metrics["clustering_rejected"].values()))
    rounds = metrics["rounds"]
    # Round 1: client 1's NaN adapter is rejected; two valid replies count (run.min_replies = 2).
    assert list(rounds[0]["rejected"]) == ["client 1"] and "NaN" in rounds[0]["rejected"]["client 1"]
    assert rounds[0]["counted"] and rounds[0]["accepted"] == 2
    # Round 2: a mis-shaped adapter and a crash leave one valid reply: the round does not count and the
    # shared adapter stays exactly as round 1 left it.
    assert set(rounds[1]["rejected"]) == {"client 1", "client 2"}
    assert "shape" in rounds[1]["rejected"]["client 1"] and "crashed" in rounds[1]["rejected"]["client 2"]
    assert not rounds[1]["counted"] and rounds[1]["updated_adapters"] == []
    assert rounds[1]["adapter_norms"] == rounds[0]["adapter_norms"]
    # Round 3: a reply missing a key is rejected, the other two count and change the adapter.
    assert "missing" in rounds[2]["rejected"]["client 2"] and rounds[2]["counted"]
    assert rounds[2]["adapter_norms"]["global"] != rounds[1]["adapter_norms"]["global"]
    # Evaluation: client 1 crashed; the others are scored, client 1 is reported missing.
    evaluation = metrics["evaluation"]
    assert set(evaluation["missing_clients"]) == {"client 1"}
    assert set(evaluation["by_set"]["personalized/fedit"]["per_client"]) == {"0", "2"}
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "rejected" for e in events) == 6  # every fault above, logged once
    assert events[-1]["event"] == "done"


def test_too_few_valid_replies_stop_the_run_with_the_reason(tmp_path):
    settings = tiny_settings(tmp_path, **{"data.num_clients": 4, "run.method": "fedit", "run.min_replies": 4})
    with pytest.raises(RuntimeError, match="clustering: 3 valid replies, 'run.min_replies' asks for 4"):
        run_experiment(Config(settings), tmp_path / "too-few", client_app=faulty)


def _children_then_kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (Ray's daemons and workers included)."""
    parent = psutil.Process(proc.pid)
    family = [parent, *parent.children(recursive=True)]
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=20)


def _cli(*args: str, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedrouter.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def test_a_killed_server_resumes_to_the_same_adapters(tmp_path):
    settings = tiny_settings(tmp_path, **{"run.rounds": 3, "eval.sets": "personalized"})
    _, reference = run_experiment(Config(settings | {"run.name": "whole"}))
    whole, _ = load_checkpoint(tmp_path / "whole")

    overrides = [f"{k}={v}" for k, v in (settings | {"run.name": "killed"}).items()]
    proc = _cli("run", "--quiet", *overrides, cwd=tmp_path)
    events = tmp_path / "killed" / "events.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if events.exists() and any(json.loads(x)["event"] == "round" for x in events.read_text().splitlines()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        _children_then_kill(proc)
    first = load_checkpoint(tmp_path / "killed")[0]
    assert 1 <= first.rounds_done < 3, "killed after round 1 and before the end"
    kept = json.loads((tmp_path / "killed" / "metrics.json").read_text())["rounds"]

    done = subprocess.run(
        [sys.executable, "-m", "fedrouter.cli", "run", "--quiet", "--resume", str(tmp_path / "killed")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    resumed, _ = load_checkpoint(tmp_path / "killed")
    assert resumed.rounds_done == 3
    for key, arrays in whole.shared.items():
        for name, value in arrays.items():
            np.testing.assert_allclose(resumed.shared[key][name], value, rtol=1e-5, atol=1e-6)
    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert metrics["rounds"][: len(kept)] == kept  # no completed round's results lost
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert metrics["resumed"] == [{"after_round": first.rounds_done}]
    assert metrics["evaluation"]["overall"] == reference["evaluation"]["overall"]

    again = subprocess.run(
        [sys.executable, "-m", "fedrouter.cli", "run", "--quiet", "--resume", str(tmp_path / "killed")],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 2 and "already finished" in again.stderr


def test_a_late_client_joins_the_existing_clusters(tmp_path):
    # Four nodes, the run starts with three: the fourth joins before round 1.
    settings = tiny_settings(tmp_path, **{"data.num_clients": 4, "run.min_clients": 3, "eval.sets": "personalized"})
    run_dir, metrics = run_experiment(Config(settings), tmp_path / "late")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    joined = [e for e in events if e["event"] == "joined"]
    assert len(joined) == 1
    late = joined[0]["client"]
    clustering = metrics["clustering"]
    assert str(late) in clustering["cluster_map"] and len(clustering["local_k"]) == 4
    assert clustering["global_k"] == 4 + len(joined[0]["new_clusters"])
    assert all(r["accepted"] == 4 for r in metrics["rounds"])  # it trained in every round
    assert len(metrics["evaluation"]["by_set"]["personalized/global"]["per_client"]) == 4


def test_join_rule_keeps_near_centroids_and_opens_clusters_for_far_ones():
    centers = np.array([[0.0, 0.0], [10.0, 0.0]])
    members = np.array([[1.0, 0.0], [-1.0, 0.0], [10.0, 2.0]])
    radius = join_radius(members, np.array([0, 0, 1]), centers)
    assert radius == 2.0  # the widest cluster's radius
    assignment, grown = join_clusters(np.array([[0.5, 2.0], [30.0, 0.0], [31.0, 0.0]]), centers, radius, 1.5)
    # Near cluster 0: joins it; far from all: opens cluster 2, which the next far centroid joins.
    assert assignment.tolist() == [0, 2, 2]
    np.testing.assert_array_equal(grown[:2], centers)  # existing centroids never move
    np.testing.assert_array_equal(grown[2], [30.0, 0.0])
    # Single-member clusters have no spread: half the smallest gap between global centroids stands in.
    assert join_radius(centers, np.array([0, 1]), centers) == 5.0
    assert join_radius(centers[:1], np.array([0]), centers[:1]) == float("inf")
