"""A real Flower deployment on loopback: a SuperLink and 3 SuperNodes as separate processes, `flwr run`.

Each test checks the run by what the server wrote (``flwr run`` can exit 0 for a failed run) and that every
process it started, children included, is gone afterwards.
"""

import json
import subprocess
import sys
import time

import psutil
import pytest
from conftest import tiny_settings

from fedrouter.config import Config
from fedrouter.data import all_clients
from fedrouter.deploy import LocalDeployment, make_node_keys, wait_for_run
from fedrouter.federated.checkpoint import load_checkpoint
from fedrouter.serving.artifact import RouterArtifact
from fedrouter.simulation import finished_metrics

pytestmark = pytest.mark.slow


def _write_node_data(cfg: Config, folder) -> list:
    """Each node's own files: its partition's training samples (12 of them) and its test samples."""
    paths = []
    for client in all_clients(cfg):
        node = folder / f"node-{client.client_id}"
        node.mkdir(parents=True)
        tests = {s.id: s for test in client.tests.values() for s in test}.values()
        for name, samples in (("train", client.train[:12]), ("test", tests)):
            lines = [
                json.dumps({"id": s.id, "task": s.task, "instruction": s.instruction, "response": s.response})
                for s in samples
            ]
            (node / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        paths.append(node)
    return paths


def _events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_superlink_and_three_supernodes_each_with_its_own_data(tmp_path):
    cfg = Config(tiny_settings(tmp_path, **{"run.name": "deployed", "eval.sets": "personalized"}))
    paths = _write_node_data(cfg, tmp_path / "data")
    with LocalDeployment(tmp_path / "deployment", 3, data_paths=paths) as deployment:
        run_dir, metrics = deployment.run(cfg, timeout=600)
        started = deployment.family()
        names = {p.name() for p in started}
    assert {"flower-superlin", "flower-supernod"} <= {name[:15] for name in names}
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "a process outlived"

    assert _events(run_dir)[-1]["event"] == "done"
    assert [r["round"] for r in metrics["rounds"]] == [1, 2] and all(r["accepted"] == 3 for r in metrics["rounds"])
    # Every node trained on its own 12 samples (its partition of data.source would hold 16).
    state, _ = load_checkpoint(run_dir)
    assert sorted(c.client_id for c in state.clients) == [0, 1, 2]
    assert all(c.num_samples == 12 for c in state.clients)
    # The router artifact is complete: one adapter per global cluster, every client's centroids and map.
    artifact = RouterArtifact.load(run_dir)
    assert len(artifact.adapters) == artifact.num_global == metrics["clustering"]["global_k"]
    assert sorted(artifact.cluster_map) == [0, 1, 2] and sorted(artifact.local_centroids) == [0, 1, 2]
    assert len(metrics["evaluation"]["by_set"]["personalized/global"]["per_client"]) == 3


def test_tls_deployment_with_node_auth_survives_a_supernode_killed_mid_round(tmp_path):
    settings = {"run.name": "tls", "eval.sets": "personalized", "run.min_replies": 2, "run.reply_timeout_s": 300}
    cfg = Config(tiny_settings(tmp_path, **settings))
    with LocalDeployment(tmp_path / "deployment", 3, tls=True, auth=True) as deployment:
        # SuperNode authentication: a node whose public key was never registered is turned away.
        ((stranger_key, _),) = make_node_keys(tmp_path / "stranger", 1)
        stranger = deployment.start_node(0, private_key=stranger_key, name="stranger")
        assert stranger.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (deployment.folder / "stranger.log").read_text()
        proc, run_dir = deployment.submit(cfg)
        deadline = time.time() + 300
        while time.time() < deadline and not (run_dir / "events.jsonl").exists():
            time.sleep(0.2)
        while time.time() < deadline and not any(
            e["event"] == "phase" and e.get("name") == "training" for e in _events(run_dir)
        ):
            time.sleep(0.2)
        deployment.kill_node(2)  # round 1 has started: node 2 (client 2) dies with its ClientApp
        wait_for_run(run_dir, 600, proc)
        started = deployment.family()
        superlink_log = (deployment.folder / "superlink.log").read_text()
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "a process outlived"
    assert "--insecure" not in superlink_log and "insecure" not in superlink_log.lower()

    metrics = finished_metrics(run_dir)  # the run finished without the dead node
    rounds = metrics["rounds"]
    assert all("client 2" in r["rejected"] and r["counted"] and r["accepted"] == 2 for r in rounds[1:])
    assert "client 2" in rounds[0]["rejected"] or rounds[0]["accepted"] == 3  # it may have replied in time
    assert "client 2" in metrics["evaluation"]["missing_clients"]
    assert sorted(metrics["evaluation"]["by_set"]["personalized/global"]["per_client"]) == ["0", "1"]
    assert RouterArtifact.load(run_dir).num_global == metrics["clustering"]["global_k"]


def test_deploy_local_command_runs_and_stops_everything(tmp_path):
    settings = tiny_settings(tmp_path, **{"run.rounds": 1, "eval.sets": "personalized", "run.name": "cli"})
    overrides = [f"{k}={v}" for k, v in settings.items() if k != "data.num_clients"]
    done = subprocess.run(
        [sys.executable, "-m", "fedrouter.cli", "deploy-local", "--nodes", "2", "--quiet", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every SuperLink and SuperNode process has been stopped" in done.stdout
    assert _events(tmp_path / "cli")[-1]["event"] == "done"
    logs = tmp_path / "cli-deployment"
    assert (logs / "superlink.log").is_file() and (logs / "supernode-1.log").is_file()
    assert not _processes_of(logs / "flwr-home")


def _processes_of(flwr_home) -> list[psutil.Process]:
    """Processes started for a deployment (they all carry its FLWR_HOME)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FLWR_HOME") == str(flwr_home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found
