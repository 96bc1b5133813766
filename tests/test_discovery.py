"""Task discovery as configured (`fedrouter.discovery`): embedding space, local and global clustering, artifact."""

import json

import numpy as np
import pytest

from fedrouter import discovery
from fedrouter.algorithm.clustering import SilhouetteKMeans, ThresholdAgglomerative
from fedrouter.artifact import ArtifactError, RouterArtifact
from fedrouter.config import Config
from fedrouter.model import compute


def test_the_embedding_space_is_computed_once_per_model_and_setting(tiny_base):
    space = discovery.embedding_space(tiny_base, 0.2, "reference")
    assert space is discovery.embedding_space(tiny_base, 0.2, "reference")
    assert space.layer == 1 and space.scale.shape == (tiny_base.hidden_size,)
    np.testing.assert_array_equal(space.scale, compute.reference_scale(tiny_base, 1))
    raw = discovery.embedding_space(tiny_base, 1.0, "none")
    assert raw.layer == 2 and raw.scale is None
    cfg = Config({"model.name": "tiny-random"})
    np.testing.assert_allclose(
        discovery.embed(tiny_base, cfg, ["route me"]), compute.embed(tiny_base, ["route me"], layer=1) / space.scale
    )
    with pytest.raises(ValueError, match="embedding scale 'zscore'"):
        discovery.embedding_space(tiny_base, 0.2, "zscore")


def test_settings_choose_the_local_and_global_rules():
    rng = np.random.default_rng(0)
    tasks = rng.normal(size=(3, 16)) * 3
    centroids = np.concatenate([t + 0.05 * rng.normal(size=(2, 16)) for t in tasks])
    counts = np.full(6, 24.0)
    spreads = np.full(6, 1.0)
    default = discovery.cluster_centroids(Config(), centroids, counts, spreads)
    assert isinstance(default, ThresholdAgglomerative) and default.n_clusters_ == 3
    silhouette = discovery.cluster_centroids(Config({"cluster.global_method": "silhouette"}), centroids, counts)
    assert isinstance(silhouette, SilhouetteKMeans) and silhouette.n_clusters_ == 3
    fixed = discovery.cluster_centroids(Config({"cluster.global_k": "2"}), centroids, counts, spreads)
    assert isinstance(fixed, SilhouetteKMeans) and fixed.n_clusters_ == 2  # a number is always K-Means
    samples = np.concatenate([t + rng.normal(size=(20, 16)) for t in tasks[:2]])
    for space in ("centred", "raw"):
        local = discovery.cluster_samples(Config({"cluster.local_space": space}), samples)
        assert local.n_clusters_ == 2 and len(set(local.labels_[:20])) == 1
    labels = np.repeat([0, 1], 20)
    spread = discovery.cluster_spreads(samples, labels, 2)
    np.testing.assert_allclose(spread[0], np.sqrt(((samples[:20] - samples[:20].mean(0)) ** 2).sum(1).mean()))


def _artifact(**extra) -> RouterArtifact:
    return RouterArtifact(
        base_model="b",
        model_name="tiny-random",
        lora={"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj"]},
        global_centroids=np.zeros((1, 4), np.float32),
        local_centroids={0: np.zeros((1, 4), np.float32)},
        cluster_map={0: [0]},
        adapters={0: {"w": np.zeros(2, np.float32)}},
        **extra,
    )


def test_the_artifact_records_how_prompts_are_embedded(tmp_path):
    _artifact(embed_depth=0.2, embed_scale="reference").save(tmp_path)
    loaded = RouterArtifact.load(tmp_path)
    assert (loaded.embed_depth, loaded.embed_scale) == (0.2, "reference")
    meta_path = tmp_path / "router" / "router.json"
    meta = json.loads(meta_path.read_text())
    del meta["embedding"]  # written before the setting existed: the last layer, unscaled
    meta_path.write_text(json.dumps(meta))
    loaded = RouterArtifact.load(tmp_path)
    assert (loaded.embed_depth, loaded.embed_scale) == (1.0, "none")
    meta["embedding"] = {"depth": 0.2, "scale": "../../etc"}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="router.json: 'embedding' must be"):
        RouterArtifact.load(tmp_path)
