"""Privacy options: clipped, noisy centroids; Flower's LocalDpMod on uploaded adapters; a whole run with both."""

import numpy as np
import pytest
from conftest import tiny_settings
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedrouter.algorithm.privacy import private_centroids
from fedrouter.config import Config, ConfigError
from fedrouter.federated.privacy import update_privacy_mod
from fedrouter.federated.records import config_record
from fedrouter.simulation import run_experiment


def test_centroids_without_noise_are_means_of_clipped_embeddings():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(30, 5)) * 10
    labels = np.arange(30) % 3
    plain = private_centroids(points, labels, 3, clip=1e9, noise=0.0)
    np.testing.assert_allclose(plain, np.stack([points[labels == k].mean(0) for k in range(3)]), rtol=1e-5)
    clipped = private_centroids(points, labels, 3, clip=2.0, noise=0.0)
    assert (np.linalg.norm(clipped, axis=1) <= 2.0 + 1e-5).all()


def test_centroid_noise_has_the_calibrated_spread():
    points = np.ones((8, 4000))  # one cluster of 8 samples, every norm far above the clip
    labels = np.zeros(8, dtype=np.int64)
    exact = private_centroids(points, labels, 1, clip=3.0, noise=0.0)
    noisy = private_centroids(points, labels, 1, clip=3.0, noise=0.5, rng=np.random.default_rng(1))
    spread = float(np.std(noisy - exact))
    assert spread == pytest.approx(0.5 * 3.0 / 8, rel=0.05)  # sigma x C / n


def _train_message(sent: dict, clip: float) -> Message:
    cfg = Config({"privacy.update_clip": clip, "privacy.update_epsilon": 10.0})
    content = RecordDict(
        {
            "config": config_record(cfg, round=0, lr=1e-3),
            "jobs": ConfigRecord({"names": ["global"]}),
            "adapter.global": ArrayRecord({k: Array(v) for k, v in sent.items()}),
        }
    )
    return Message(content, 1, "train")


def _fake_client(update: float):
    def call_next(message: Message, context: Context) -> Message:
        arrays = {k: a.numpy() + update for k, a in message.content.array_records["adapter.global"].items()}
        return Message(
            RecordDict({"adapter.global": ArrayRecord({k: Array(v) for k, v in arrays.items()})}), reply_to=message
        )

    return call_next


def test_flower_local_dp_mod_clips_and_noises_the_uploaded_update(in_a_flower_task):
    sent = {"lora_A": np.zeros((4, 50), np.float32), "lora_B": np.zeros((50, 4), np.float32)}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    off = update_privacy_mod(_train_message(sent, 0.0), context, _fake_client(1.0))
    assert all((a.numpy() == 1.0).all() for a in off.content.array_records["adapter.global"].values())
    on = update_privacy_mod(_train_message(sent, 0.5), context, _fake_client(1.0))
    update = np.concatenate([a.numpy().ravel() for a in on.content.array_records["adapter.global"].values()])
    clipped = np.full(400, 0.5 / np.sqrt(400))  # the update (norm 20) scaled down to norm 0.5
    std = 0.5 * np.sqrt(2 * np.log(1.25 / 1e-5)) / 10.0  # LocalDpMod's Gaussian noise for (10, 1e-5)
    assert np.std(update - clipped) == pytest.approx(std, rel=0.2)
    assert abs(np.mean(update - clipped)) < 0.2 * std


@pytest.mark.parametrize(
    "settings, pattern",
    [
        ({"privacy.centroid_noise": 1.0}, "needs 'privacy.centroid_clip'"),
        ({"privacy.update_clip": 1.0}, "needs 'privacy.update_epsilon'"),
        (
            {"privacy.update_clip": 1.0, "privacy.update_epsilon": 5.0, "train.schedule": "all"},
            "one uploaded adapter per round",
        ),
    ],
)
def test_privacy_settings_that_cannot_work_are_errors(settings, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config(settings)


@pytest.mark.slow
def test_a_run_with_noisy_centroids_and_private_updates_completes(tmp_path):
    privacy = {
        "privacy.centroid_clip": 20.0,
        "privacy.centroid_noise": 0.1,
        "privacy.update_clip": 1.0,
        "privacy.update_epsilon": 1000.0,
        "eval.sets": "personalized",
    }
    _, metrics = run_experiment(Config(tiny_settings(tmp_path, **privacy)), tmp_path / "private")
    assert all(r["counted"] and r["accepted"] == 3 and not r["rejected"] for r in metrics["rounds"])
    assert metrics["evaluation"]["overall"]["personalized/global"]["rouge1"] >= 0
