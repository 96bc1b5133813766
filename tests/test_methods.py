"""The methods: what each shares and keeps personal (client logic on the tiny model), and each run end to end."""

import dataclasses
import zlib

import numpy as np
import pytest
from conftest import tiny_settings

from fedrouter.algorithm.aggregation import aggregate_clusters
from fedrouter.config import SETTINGS, Config
from fedrouter.data import all_clients
from fedrouter.federated.training import train_jobs
from fedrouter.methods import ClientClusters, derived_seed, make_method, methods, part_of
from fedrouter.model import compute, lora
from fedrouter.simulation import run_experiment


def test_every_method_is_a_setting_choice():
    built_in = [name for name, m in methods().items() if m.__module__.startswith("fedrouter.methods.")]
    for name in built_in:
        Config({"run.method": name})
    assert set(SETTINGS["run.method"].help.replace(",", " ").split()) >= set(built_in)


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
                method, tiny_base, cfg, c, examples, np.zeros(n, int), jobs, received, personal[c], r, 1e-2
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


def test_feddpa_trains_as_the_authors_code_does(tiny_base, tmp_path):
    """FedDPA-T: round 1 the global adapter only; then the local adapter with the received global one mixed in
    (frozen, 0.5 / 0.5), then the received global adapter alone (its update ignores the local adapter)."""
    cfg = Config(tiny_settings(tmp_path, **{"run.method": "feddpa"}))
    method = make_method(cfg)
    client = ClientClusters(0, 0, np.zeros((1, 0)), np.array([16]), [], np.zeros((1, 0)), {}, np.zeros(1, int))
    assert [(j.name, j.partner) for j in method.jobs(0, client)] == [("global", None)]
    jobs = method.jobs(1, client)
    assert [(j.name, j.shared, j.personal, j.partner) for j in jobs] == [
        ("local", None, "local", "global"),
        ("global", "global", None, None),
    ]
    data = all_clients(cfg)[0]
    examples = compute.encode_training(tiny_base, [(s.instruction, s.response) for s in data.train], 64)
    labels = np.zeros(len(examples), int)
    start = lora.fresh_adapter(tiny_base, 5)
    received = {"global": start | {k: np.full_like(v, 0.05) for k, v in start.items() if "lora_B" in k}}
    personal: dict = {}
    uploads, _ = train_jobs(method, tiny_base, cfg, 0, examples, labels, jobs, received, personal, 1, 1e-2)
    alone, _ = train_jobs(method, tiny_base, cfg, 0, examples, labels, jobs[1:], received, {}, 1, 1e-2)
    assert not _differ(uploads["global"], alone["global"], "lora_")  # the global adapter trains alone
    # The local adapter trained with the *received* global adapter as its frozen partner at half weight each.
    lora.set_adapter(tiny_base, lora.fresh_adapter(tiny_base, cfg["run.seed"]))
    lora.set_adapter(tiny_base, received["global"], slot=lora.PARTNER)
    seed = derived_seed(derived_seed(cfg["run.seed"], 1, 0, -1), zlib.crc32(b"local"))
    with lora.mixed(tiny_base, 0.5, 0.5):
        compute.train_adapter(tiny_base, examples, steps=cfg["train.local_steps"], batch_size=4, lr=1e-2, seed=seed)
    assert not _differ(personal["local"], lora.get_adapter(tiny_base), "lora_")
    mine: dict = {}
    local_only = [dataclasses.replace(jobs[0], partner=None)]
    nothing, _ = train_jobs(method, tiny_base, cfg, 0, examples, labels, local_only, received, mine, 1, 1e-2)
    assert nothing == {}  # a personal job uploads nothing
    assert _differ(personal["local"], mine["local"], "lora_")  # the frozen partner shaped the local training


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    runs = {}
    for name in ("oracle", "local", "fedit", "feddpa", "fedsa", "zeroshot"):
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
    zeroshot = method_runs["zeroshot"]
    assert zeroshot["rounds"] == [] and zeroshot["bytes"]["down_total"] == 0  # no adapter ever travels
    assert zeroshot["bytes"]["up_total"] == zeroshot["clustering_bytes_up"]  # sample counts only
    up = {name: m["rounds"][0]["bytes_up"] for name, m in method_runs.items() if name != "zeroshot"}
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
    for name in ("local", "fedit", "feddpa", "fedsa", "zeroshot"):
        assert method_runs[name]["clustering"]["cluster_acc_global"] is None
