"""Resources as settings (issue 23): what Ray gets per client, parallel clients, and the quantization and
gradient-checkpointing settings. CPU-only checks; the CUDA paths are exercised by benchmarks/gpu_check.py."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_settings

from fedrouter.config import Config
from fedrouter.errors import ConfigError, ModelError
from fedrouter.model import LoraSettings
from fedrouter.model.loading import load_base_model, quantization_config
from fedrouter.serving.artifact import RouterArtifact
from fedrouter.simulation import backend_config, run_experiment


def config(tmp_path, **extra) -> Config:
    return Config(tiny_settings(tmp_path, **extra))


@pytest.mark.parametrize(
    ("setting", "gpus", "per_client"),
    [("0", 8, 0.0), ("0.25", 8, 0.25), ("1", 8, 1.0), ("2", 8, 2.0), ("auto", 8, 1.0), ("auto", 0, 0.0)],
)
def test_each_client_holds_the_gpus_it_is_given(tmp_path, setting, gpus, per_client):
    backend = backend_config(config(tmp_path, **{"run.client_gpus": setting}), cores=16, gpus=gpus)
    assert backend["client_resources"] == {"num_cpus": 16, "num_gpus": per_client}
    assert backend["init_args"]["num_cpus"] == 16 and backend["init_args"]["num_gpus"] == gpus
    assert backend["init_args"]["address"] == "local"  # never a cluster some `ray start` left on the machine


def test_a_client_holds_every_core_unless_told_fewer(tmp_path):
    def cpus(**extra) -> float:
        return backend_config(config(tmp_path, **extra), cores=16, gpus=0)["client_resources"]["num_cpus"]

    assert cpus() == 16  # one client at a time, as on a small CPU box
    assert cpus(**{"model.threads": 4}) == 4
    assert cpus(**{"run.client_cpus": 0.5}) == 0.5  # 32 clients at once


@pytest.mark.parametrize(
    ("extra", "gpus", "message"),
    [
        ({"run.client_gpus": "1"}, 0, "this machine has no CUDA GPU"),
        ({"run.client_gpus": "1.5"}, 2, "a whole number above 1"),
        ({"run.client_gpus": "4"}, 2, "at most the machine's 2 GPUs"),
        ({"run.client_cpus": 32}, 0, "more than this machine's 16 cores"),
        ({"model.quantization": "4bit"}, 0, "needs clients on CUDA GPUs"),
    ],
)
def test_resources_the_machine_cannot_give_are_refused_by_name(tmp_path, extra, gpus, message):
    with pytest.raises(ConfigError, match=message):
        backend_config(config(tmp_path, **extra), cores=16, gpus=gpus)


def test_gpu_and_quantization_settings_are_checked_when_read(tmp_path):
    with pytest.raises(ConfigError, match="run.client_gpus"):
        config(tmp_path, **{"run.client_gpus": "many"})
    with pytest.raises(ConfigError, match="model.quantization"):
        config(tmp_path, **{"model.quantization": "2bit"})


def test_quantization_without_cuda_is_a_clear_error(tmp_path):
    assert quantization_config("none", torch.device("cpu"), torch.float32) is None
    with pytest.raises(ModelError, match="'4bit' needs a CUDA GPU"):
        quantization_config("4bit", torch.device("cpu"), torch.float32)
    with pytest.raises(ModelError, match="needs a CUDA GPU"):
        load_base_model("tiny-random", quantization="8bit", device="cpu")
    # The CLI refuses it before anything starts.
    command = [sys.executable, "-m", "fedrouter.cli", "run", "--quiet", "--output", str(tmp_path)]
    done = subprocess.run(
        [*command, "model.name=tiny-random", "model.quantization=4bit"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "'model.quantization' = '4bit' needs clients on CUDA GPUs" in done.stderr
    assert not list(tmp_path.iterdir())


def test_gradient_checkpointing_saves_activations_not_gradients():
    lora = LoraSettings(dropout=0.0)
    base = load_base_model("tiny-random", precision="fp32", lora=lora, gradient_checkpointing=True)
    inner = base.model.get_base_model()
    assert inner.is_gradient_checkpointing
    ids = torch.tensor([base.tokenizer("Sort these words: pear, fig, apple, kiwi")["input_ids"]])

    def loss_and_grads():
        base.model.train()
        base.model.zero_grad()
        loss = base.model(input_ids=ids, labels=ids).loss
        loss.backward()
        base.model.eval()
        return loss.item(), [p.grad.clone() for p in base.model.parameters() if p.requires_grad]

    checkpointed = loss_and_grads()
    inner.gradient_checkpointing_disable()
    kept = loss_and_grads()
    assert checkpointed[0] == pytest.approx(kept[0]) and len(kept[1]) > 0
    for a, b in zip(checkpointed[1], kept[1], strict=True):
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in kept[1])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to run two clients at once")
def test_clients_in_parallel_train_the_same_adapters_as_one_at_a_time(tmp_path):
    """Two clients at a time (one core each) against one at a time (every core), one torch thread each."""
    cores = os.cpu_count() or 1
    runs = {}
    for name, cpus in (("parallel", 1), ("sequential", cores)):
        cfg = config(tmp_path, **{"run.client_cpus": cpus, "model.threads": 1, "eval.sets": "personalized"})
        assert backend_config(cfg)["client_resources"]["num_cpus"] == cpus
        run_dir, metrics = run_experiment(cfg, tmp_path / name)
        runs[name] = (RouterArtifact.load(run_dir), metrics)
    (parallel, p_metrics), (sequential, s_metrics) = runs["parallel"], runs["sequential"]
    assert p_metrics["clustering"]["cluster_map"] == s_metrics["clustering"]["cluster_map"]
    assert sorted(parallel.adapters) == sorted(sequential.adapters)
    for g, arrays in sequential.adapters.items():
        for key, value in arrays.items():
            # Replies may arrive in another order: the averages agree up to float rounding.
            np.testing.assert_allclose(parallel.adapters[g][key], value, rtol=1e-5, atol=1e-7)


def test_the_papers_gpu_setting_loads_and_asks_one_gpu_per_client():
    from conftest import ROOT

    from fedrouter.config import load_config

    cfg = load_config(ROOT / "configs" / "paper-gpu.toml")
    assert (cfg["model.name"], cfg["model.quantization"], cfg["model.max_seq_len"]) == (
        "meta-llama/Llama-3.2-1B",
        "4bit",
        1024,
    )
    assert (cfg["run.rounds"], cfg["train.local_steps"], cfg["train.batch_size"], cfg["data.num_clients"]) == (
        25,
        10,
        16,
        8,
    )
    assert backend_config(cfg, cores=16, gpus=8)["client_resources"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    with pytest.raises(ConfigError, match="this machine has no CUDA GPU"):
        backend_config(cfg, cores=16, gpus=0)


def test_each_device_computes_in_bf16_where_it_has_it(monkeypatch):
    from fedrouter.model.loading import compute_dtype

    cpu = torch.device("cpu")
    native = torch.cpu._is_avx512_bf16_supported()
    assert compute_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert compute_dtype("fp32", cpu) == torch.float32 and compute_dtype("bf16", cpu) == torch.bfloat16
    # No GPU here: what the CUDA runtime would answer is played, the choice itself is real.
    for supported, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert compute_dtype("auto", torch.device("cuda")) == expected
