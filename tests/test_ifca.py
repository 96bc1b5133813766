"""IFCA: a client trains and uploads only the adapter of lowest loss on its own data, and answers with it."""

import numpy as np
import pytest
from conftest import tiny_settings

from fedrouter.config import Config
from fedrouter.data import all_clients
from fedrouter.federated.training import train_jobs
from fedrouter.methods import ClientClusters, Serving, make_method
from fedrouter.methods.ifca import adapter_losses, lowest
from fedrouter.model import compute, lora
from fedrouter.simulation import run_experiment


def _client_and_adapters(tiny_base, tmp_path):
    """Client 0's examples and three adapters: the fresh start, one fitted to the client's data, one noisy."""
    cfg = Config(tiny_settings(tmp_path, **{"run.method": "ifca", "ifca.k": 3}))
    data = all_clients(cfg)[0]
    examples = compute.encode_training(tiny_base, [(s.instruction, s.response) for s in data.train], 64)
    fresh = lora.fresh_adapter(tiny_base, cfg["run.seed"])
    lora.set_adapter(tiny_base, fresh)
    compute.train_adapter(tiny_base, examples, steps=8, batch_size=4, lr=5e-2, seed=0)
    fitted = lora.get_adapter(tiny_base)
    rng = np.random.default_rng(0)
    noisy = {k: v + rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in fitted.items()}
    return cfg, data, examples, {"0": fresh, "1": fitted, "2": noisy}


def test_a_client_trains_and_uploads_only_its_lowest_loss_adapter(tiny_base, tmp_path):
    cfg, data, examples, adapters = _client_and_adapters(tiny_base, tmp_path)
    method = make_method(cfg)
    losses = adapter_losses(tiny_base, [adapters[k] for k in "012"], examples, cfg)
    assert int(np.argmin(losses)) == 1 and losses[1] < losses[0]  # the fitted adapter fits best
    client = ClientClusters(0, 0, np.zeros((1, 0)), np.array([len(examples)]), [], np.zeros((1, 0)), {})
    jobs = method.jobs(1, client)
    assert [j.shared for j in jobs] == ["0", "1", "2"]  # every adapter is offered
    labels = np.zeros(len(examples), int)
    uploads, metrics = train_jobs(method, tiny_base, cfg, 0, examples, labels, jobs, adapters, {}, 1, 1e-2)
    assert list(uploads) == ["1"]  # only the chosen adapter goes up
    assert [k for k in metrics if k.startswith("num_samples.")] == ["num_samples.1"]
    assert method.accepts(jobs, [jobs[1]]) and not method.accepts(jobs, jobs)
    # It answers with the same choice: the adapter of lowest loss on its training samples.
    serving = Serving(tiny_base, cfg, 0, adapters, None, {}, [], {}, lambda: examples)
    chosen = method.serve(serving, data.tests["personalized"], ["ifca"])["ifca"]
    assert set(chosen) == {("shared", "1")}


def test_ifca_refuses_update_privacy_it_cannot_honour(tmp_path):
    from fedrouter.errors import ConfigError

    with pytest.raises(ConfigError, match="privacy.update_clip.*ifca.k"):
        Config({"run.method": "ifca", "privacy.update_clip": 1.0, "privacy.update_epsilon": 1.0})


def test_equal_losses_are_broken_by_the_seed(tiny_base):
    tied = np.array([2.0, 2.0, 2.0, 2.0])
    picks = {lowest(tied, seed) for seed in range(40)}
    assert picks == {0, 1, 2, 3}  # the start: a random partition of the clients
    assert lowest(tied, 7) == lowest(tied, 7)
    assert lowest(np.array([2.0, 1.0, 2.0]), 3) == 1


def test_identical_adapters_are_drawn_among_without_computing_losses(tiny_base, tmp_path):
    cfg, _, examples, adapters = _client_and_adapters(tiny_base, tmp_path)
    method = make_method(cfg)
    client = ClientClusters(0, 0, np.zeros((1, 0)), np.array([len(examples)]), [], np.zeros((1, 0)), {})
    jobs = method.jobs(1, client)
    start = {job.name: dict(adapters["0"]) for job in jobs}  # the first round: all from the common adapter
    # No model is passed: a loss computation would fail. The pick is the seeded draw among three ties.
    picks = [method.select_jobs(None, jobs, start, examples, seed)[0].name for seed in range(30)]
    assert picks == [str(lowest(np.zeros(3), seed)) for seed in range(30)] and set(picks) == {"0", "1", "2"}
    # Once one adapter differs, the losses decide again.
    start["2"] = adapters["1"]
    assert method.select_jobs(tiny_base, jobs, start, examples, 0) == [jobs[2]]


@pytest.fixture(scope="module")
def ifca_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ifca")
    cfg = Config(tiny_settings(tmp, **{"run.method": "ifca", "ifca.k": 2, "eval.sets": "personalized"}))
    return run_experiment(cfg, tmp / "run")[1]


def test_ifca_runs_end_to_end_and_sends_what_it_should(ifca_run):
    metrics = ifca_run
    assert metrics["method"] == "ifca"
    adapter = metrics["bytes"]["adapter_bytes"]
    for record in metrics["rounds"]:
        assert record["accepted"] == 3 and not record["rejected"]
        assert 2 * 3 * adapter <= record["bytes_down"] < 2.5 * 3 * adapter  # both adapters to each client
        assert 3 * adapter <= record["bytes_up"] < 3.5 * adapter  # one adapter from each client
        assert set(record["train_loss"]) <= {"0", "1"}
    assert 0 <= metrics["evaluation"]["overall"]["personalized/ifca"]["rouge1"] <= 100
