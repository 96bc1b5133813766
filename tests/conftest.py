"""Shared fixtures: paths, the tiny random model, small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def tiny_base():
    """The two-layer random Llama with the SmolLM2 tokenizer (built from a config, no download)."""
    from fedrouter.model.loading import load_base_model

    return load_base_model("tiny-random", precision="fp32")


def tiny_settings(tmp_path: Path, **extra) -> dict:
    settings = {
        "model.name": "tiny-random",
        "data.num_clients": 3,
        "data.scenario": "dual",
        "data.train_per_client": 16,
        "data.test_per_task": 2,
        "run.rounds": 2,
        "run.output_dir": str(tmp_path),
        "train.local_steps": 2,
        "train.batch_size": 4,
        "eval.max_new_tokens": 4,
        "cluster.global_k": "4",
    }
    settings.update(extra)
    return settings


@pytest.fixture
def in_a_flower_task(monkeypatch):
    """Flower builds messages only inside a run: give this process the identity a ClientApp would have."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)
