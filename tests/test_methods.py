"""The methods: what each shares and keeps personal (client logic on the tiny model), and each run end to end."""

import numpy as np
import pytest
from conftest import tiny_settings

from fedrouter.algorithm.aggregation import aggregate_clusters
from fedrouter.config import SETTINGS, Config
from fedrouter.data import all_clients
from fedrouter.federated.client import train_jobs
from fedrouter.methods import METHODS, ClientClusters, make_method, part_of
from fedrouter.model import compute, lora
from fedrouter.simulation import run_experiment


def test_every_method_is_a_setting_choice():
    for name in METHODS:
        Config({"run.method": name})
    assert set(SETTINGS["run.method"].help.replace(",", " ").split()) >= set(METHODS)


def _federate(tiny_base, tmp_path, method_name: str, rounds: int = 2):
    """Two clients run ``rounds`` rounds of a method's jobs with real training; the server averages."""
    cfg = Config(tiny_settings(tmp_path, **{"run.method": method_name, "data.num_clients": 2}))
    method = make_method(cfg)
    data = all_clients(cfg)
    initial = lora.fresh_adapter(tiny_base, cfg["run.seed"])
    shared = method.shared_adapters(initial, 1)
    personal: list[dict] = [{}, {}]
    uploaded: list[list[dict]] = []
    for r in range(rounds):
        updates, round_uploads = [], []
        for c in range(2):
            n = len(data[c].train)
            client = ClientClusters(c, c, np.zeros((1, 0)), np.array([n]), [], np.zeros((1, 0)), {}, np.zeros(1, int))
            jobs = method.jobs(r, client)
            received = {j.name: part_of(shared[j.shared], j.part) for j in jobs if j.shared and j.part != "none"}
            examples = compute.encode_training(tiny_base, [(s.instruction, s.response) for s in data[c].train], 64)
            uploads, metrics = train_jobs(
                tiny_base, cfg, c, examples, np.zeros(n, int), jobs, received, personal[c], r, 1e-2
            )
            round_uploads.append(uploads)
            updates += [
                (j.shared, uploads[j.name], metrics[f"num_samples.{j.name}"]) for j in jobs if j.name in uploads
            ]
        shared, _ = aggregate_clusters(shared, updates)
        uploaded.append(round_uploads)
    return shared, personal, uploaded


def _differ(a: dict, b: dict, kind: str) -> bool:
    return any(not np.allclose(a[k], b[k]) for k in a if kind in k)


def test_fedsa_shares_a_and_keeps_b_personal(tiny_base, tmp_path):
    shared, personal, uploaded = _federate(tiny_base, tmp_path, "fedsa")
    for uploads in uploaded[-1]:
        assert uploads["global"] and all("lora_A" in key for key in uploads["global"])  # B never leaves
    serving = [p["local"] | shared["global"] for p in personal]  # what each client answers with
    assert not _differ(serving[0], serving[1], "lora_A")  # A: equal across clients after the round
    assert _differ(serving[0], serving[1], "lora_B")  # B: personal, trained on different data
    assert all(np.abs(p["local"][k]).sum() > 0 for p in personal for k in p["local"] if "lora_B" in k)


def test_fedit_shares_the_whole_adapter(tiny_base, tmp_path):
    shared, personal, uploaded = _federate(tiny_base, tmp_path, "fedit")
    assert personal == [{}, {}]
    first, second = (u["global"] for u in uploaded[-1])
    assert set(first) == set(shared["global"]) and _differ(first, second, "lora_")
    average = {k: (first[k] + second[k]) / 2 for k in first}  # equal sample counts: the plain mean
    assert not _differ(average, shared["global"], "lora_")


def test_local_shares_nothing(tiny_base, tmp_path):
    shared, personal, uploaded = _federate(tiny_base, tmp_path, "local")
    assert shared == {} and all(u == {} for round_uploads in uploaded for u in round_uploads)
    assert _differ(personal[0]["local"], personal[1]["local"], "lora_B")


def test_feddpa_uploads_the_global_adapter_and_keeps_the_local_one(tiny_base, tmp_path):
    shared, personal, uploaded = _federate(tiny_base, tmp_path, "feddpa")
    for uploads in uploaded[-1]:
        assert set(uploads) == {"global"} and set(uploads["global"]) == set(shared["global"])
    assert _differ(personal[0]["local"], personal[1]["local"], "lora_B")
    assert _differ(personal[0]["local"], shared["global"], "lora_B")


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    runs = {}
    for name in ("oracle", "local", "fedit", "feddpa", "fedsa"):
        cfg = Config(tiny_settings(tmp, **{"run.method": name, "run.rounds": 1, "eval.sets": "personalized"}))
        runs[name] = run_experiment(cfg, tmp / name)[1]
    return runs


def test_each_method_runs_on_flower_and_reports(method_runs):
    for name, metrics in method_runs.items():
        assert metrics["method"] == name
        overall = metrics["evaluation"]["overall"][f"personalized/{name}"]
        assert 0 <= overall["rouge1"] <= 100
        assert metrics["model_loads_per_process"] == 1


def test_bytes_show_what_each_method_shares(method_runs):
    up = {name: m["rounds"][0]["bytes_up"] for name, m in method_runs.items()}
    adapter = method_runs["fedit"]["bytes"]["adapter_bytes"]
    assert up["local"] == 0 and method_runs["local"]["rounds"][0]["bytes_down"] == 0
    assert up["fedit"] == up["feddpa"]  # one full adapter per client (plus each array's small header)
    assert 3 * adapter <= up["fedit"] < 3.5 * adapter
    assert 0 < up["fedsa"] < up["fedit"]  # A matrices only


def test_oracle_clusters_and_routes_by_task(method_runs):
    metrics = method_runs["oracle"]
    assert metrics["clustering"]["cluster_acc_local"] == metrics["clustering"]["cluster_acc_global"] == 1.0
    assert metrics["clustering"]["global_k"] == 4
    assert metrics["evaluation"]["overall"]["personalized/oracle"]["routing_acc"] == 1.0
    # Clients holding tasks (0, 1), (1, 2), (2, 3): the round-robin starting points give three global clusters an
    # update in the round (starting at the client id, clients 1 and 2 would both have trained task 2).
    assert len(metrics["rounds"][0]["updated_adapters"]) == 3
    for name in ("local", "fedit", "feddpa", "fedsa"):
        assert method_runs[name]["clustering"]["cluster_acc_global"] is None
