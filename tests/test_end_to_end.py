"""A whole FedRouter run in Flower's simulation with the tiny random model, then its artifact and CLI."""

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from conftest import Server, tiny_settings

from fedrouter import Router
from fedrouter.config import Config
from fedrouter.data import all_clients
from fedrouter.federated.answering import answers_digest
from fedrouter.serving.artifact import RouterArtifact
from fedrouter.simulation import run_experiment


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    cfg = Config(tiny_settings(tmp, **{"eval.sets": "personalized,generalization"}))
    run_dir, metrics = run_experiment(cfg, tmp / "e2e")
    return cfg, run_dir, metrics


def test_run_writes_config_metrics_log_and_artifact(finished_run):
    cfg, run_dir, metrics = finished_run
    for name in ("config.toml", "metrics.json", "log.txt", "events.jsonl"):
        assert (run_dir / name).is_file(), name
    assert len(metrics["rounds"]) == cfg["run.rounds"]
    clustering = metrics["clustering"]
    assert clustering["global_k"] == 4
    assert set(clustering["cluster_map"]) == {"0", "1", "2"}
    assert 0 <= clustering["cluster_acc_local"] <= 1 and 0 <= clustering["cluster_acc_global"] <= 1
    for name in ("personalized/local", "personalized/global", "generalization/local", "generalization/global"):
        overall = metrics["evaluation"]["overall"][name]
        assert 0 <= overall["rouge1"] <= 100 and 0 <= overall["routing_acc"] <= 1
    # Every client of the run shares one simulation process: the base model was loaded there once.
    assert metrics["model_loads_per_process"] == 1 and metrics["eval_model_loads_per_process"] == 1
    # Bytes: LoRA weights only (the tiny model's adapter is 14 KB), counted both ways every round.
    assert metrics["bytes"]["adapter_bytes"] < 100_000
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in metrics["rounds"])
    # The total also counts the clustering upload (centroids, counts and the first adapter), once.
    rounds_up = sum(r["bytes_up"] for r in metrics["rounds"])
    assert rounds_up < metrics["bytes"]["up_total"] < rounds_up + metrics["rounds"][-1]["bytes_up"]
    # One refinement round: the server sent the global centroids (4 x 128 floats) to each of the 3 clients,
    # which uploaded their clusters again; the clustering phase's figures and the totals count both ways.
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["name"] for e in events if e["event"] == "phase"][:2] == ["clustering", "refinement"]
    assert metrics["clustering_bytes_down"] >= 3 * 4 * 128 * 4
    rounds_down = sum(r["bytes_down"] for r in metrics["rounds"])
    assert metrics["bytes"]["down_total"] == rounds_down + metrics["clustering_bytes_down"]
    assert set(clustering["local_k_before_refinement"]) == {"0", "1", "2"}


def test_artifact_reloads_and_routes_in_both_modes(finished_run):
    _cfg, run_dir, metrics = finished_run
    artifact = RouterArtifact.load(run_dir)
    assert artifact.num_global == 4 and artifact.model_name == "tiny-random"
    assert artifact.cluster_map == {int(k): v for k, v in metrics["clustering"]["cluster_map"].items()}
    router = Router.load(run_dir)
    prompts = ["What is 12 plus 30? Answer with a number.", "Sort these words in alphabetical order: pear, fig"]
    answers = router.generate(prompts, mode="global", max_new_tokens=3)
    assert [a.prompt for a in answers] == prompts
    assert all(0 <= a.adapter < 4 for a in answers)
    np.testing.assert_array_equal([a.adapter for a in answers], router.route(prompts, mode="global"))
    local = router.route(prompts, mode="local", client=0)
    assert set(local) <= set(artifact.cluster_map[0])  # local mode only reaches the client's own clusters
    with pytest.raises(ValueError, match="local routing needs client="):
        router.route(prompts, mode="local", client=99)


def test_the_runs_answers_are_router_generates_and_the_servers(finished_run, tmp_path):
    """One decoder: every client's evaluation answers (the checksum it reported) are the answers ``Router.generate``
    gives the same prompts from the run's artifact, routed by the client's local clusters or the global centroids,
    and ``fedrouter serve`` answers a client's prompts as ``Router.generate`` does."""
    cfg, run_dir, metrics = finished_run
    router = Router.load(run_dir)
    args = {"max_new_tokens": cfg["eval.max_new_tokens"], "batch_size": cfg["eval.batch_size"]}
    answered: dict[int, dict] = {}
    for client in all_clients(cfg):
        mine = answered[client.client_id] = {}
        for set_name, test in client.tests.items():
            for mode in ("local", "global"):
                got = router.generate([s.prompt for s in test], mode=mode, client=client.client_id, **args)
                mine[(set_name, mode)] = [(("shared", str(a.adapter)), a.text) for a in got]
        assert answers_digest(client.tests, mine) == metrics["answers_crc32"][str(client.client_id)]
    first = all_clients(cfg)[0]
    server = Server(run_dir, tmp_path / "serve.log")
    try:
        for mode, model in (("local", f"fedrouter-local:{first.client_id}"), ("global", "fedrouter")):
            rows = answered[first.client_id][("personalized", mode)]
            for sample, (key, text) in zip(first.tests["personalized"], rows, strict=True):
                response = httpx.post(
                    f"{server.url}/v1/chat/completions",
                    json={
                        "model": model,
                        "messages": [{"role": "user", "content": sample.prompt}],
                        "max_tokens": cfg["eval.max_new_tokens"],
                        "temperature": 0,
                    },
                    timeout=60,
                ).json()
                assert response["fedrouter"]["adapter"] == f"cluster_{key[1]}"
                assert response["choices"][0]["message"]["content"] == text
    finally:
        server.stop()


def test_saved_adapters_load_with_plain_peft(finished_run):
    import torch
    from peft import PeftModel

    from fedrouter.model.loading import tiny_random

    _, run_dir, _ = finished_run
    artifact = RouterArtifact.load(run_dir)
    model, _ = tiny_random(torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(artifact.adapter_path(run_dir, 1)))
    state = {k: v for k, v in peft_model.state_dict().items() if "lora_B" in k}
    key = next(iter(state))
    saved_key = key.replace(".default", "")
    np.testing.assert_allclose(state[key].numpy(), artifact.adapters[1][saved_key])


def test_metrics_follow_their_schema(finished_run, tmp_path):
    from fedrouter.errors import ArtifactError
    from fedrouter.run_metrics import RunMetrics, checked, missing_keys

    _, _, metrics = finished_run
    assert missing_keys(metrics, RunMetrics) == []
    assert {"evaluation", "answers_crc32", "eval_tokens"} <= set(metrics)
    broken = json.loads(json.dumps(metrics))
    del broken["rounds"][0]["bytes_up"], broken["clustering"]["global_k"]
    with pytest.raises(ArtifactError, match=r"missing rounds\[0\]\.bytes_up, clustering\.global_k|missing clustering"):
        checked(broken, tmp_path / "metrics.json")


def test_same_seed_same_result(finished_run, tmp_path):
    cfg, _, metrics = finished_run
    _, again = run_experiment(cfg, tmp_path / "again")
    assert again["clustering"]["cluster_map"] == metrics["clustering"]["cluster_map"]
    assert again["rounds"][-1]["train_loss"] == metrics["rounds"][-1]["train_loss"]
    assert again["evaluation"]["overall"] == metrics["evaluation"]["overall"]


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fedrouter.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_cli_run_and_generate(tmp_path):
    settings = tiny_settings(tmp_path, **{"run.rounds": 1})
    overrides = [f"{k}={v}" for k, v in settings.items() if k not in ("run.output_dir",)]
    done = _cli("run", "--quiet", "--output", str(tmp_path), "--name", "cli", *overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Run summary" in done.stdout and "clustering accuracy" in done.stdout
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["config"]["run.rounds"] == 1
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 3 plus 4?\n\nSort: b, a\n")
    gen = _cli(
        "generate", "--run", str(tmp_path / "cli"), "--prompts-file", str(prompts), "--max-new-tokens", "2", "--json"
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    lines = [json.loads(line) for line in gen.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["What is 3 plus 4?", "Sort: b, a"]
    assert all(isinstance(line["adapter"], int) for line in lines)


def test_cli_reports_bad_input_by_name(tmp_path):
    unknown = _cli("run", "--quiet", "trian.lr=0.1")
    assert (
        unknown.returncode == 2
        and "unknown setting 'trian.lr'" in unknown.stderr
        and "did you mean 'train.lr'" in unknown.stderr
    )
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "response": "b", "task": "t"}\n{"instruction": "a"\n')
    bad = _cli("run", "--quiet", "--data", str(data), "--model", "tiny-random", "--output", str(tmp_path))
    assert bad.returncode != 0 and "bad.jsonl:2: invalid JSON" in bad.stderr
    missing_run = _cli("generate", "--run", str(tmp_path / "nope"), "--prompt", "x")
    assert missing_run.returncode == 2 and "no router artifact" in missing_run.stderr


def test_fewer_samples_than_clusters_fails_with_a_clear_error(tmp_path):
    cfg = Config(
        tiny_settings(tmp_path, **{"cluster.local_k": "20", "cluster.local_k_max": 20, "data.train_per_client": 8})
    )
    with pytest.raises(RuntimeError, match="fewer samples than clusters"):
        run_experiment(cfg, tmp_path / "k20")


def test_clustering_only_run_without_label_reports(tmp_path):
    # rounds=0 and eval.sets=none: clustering only; report_labels=false: clients send centroids and counts only.
    cfg = Config(tiny_settings(tmp_path, **{"run.rounds": 0, "eval.sets": "none", "eval.report_labels": False}))
    run_dir, metrics = run_experiment(cfg, tmp_path / "only")
    assert metrics["rounds"] == [] and "evaluation" not in metrics
    assert metrics["clustering"]["cluster_acc_local"] is None and metrics["clustering"]["global_cluster_tasks"] == {
        str(g): {} for g in range(4)
    }
    assert (run_dir / "router" / "router.json").is_file()
