"""Task discovery as configured (`fedrouter.discovery`): embedding space, local and global clustering, artifact."""

import json

import numpy as np
import pytest
import torch

from fedrouter import discovery
from fedrouter.algorithm.clustering import SilhouetteKMeans, ThresholdAgglomerative
from fedrouter.config import Config
from fedrouter.model import LoraSettings, compute
from fedrouter.model.prompts import chat_head, chat_tail, prompt_ids
from fedrouter.serving.artifact import ArtifactError, RouterArtifact


def test_the_embedding_space_is_computed_once_per_model_and_setting(tiny_base):
    text = discovery.EmbeddingSettings("text", 0.2, "reference")
    space = discovery.embedding_space(tiny_base, text)
    assert space is discovery.embedding_space(tiny_base, text)
    assert space.parts == ((1, 0),) and space.scales[0].shape == (tiny_base.hidden_size,)
    np.testing.assert_array_equal(space.scales[0], compute.reference_scale(tiny_base, 1))
    raw = discovery.embedding_space(tiny_base, discovery.EmbeddingSettings("text", 1.0, "none"))
    assert raw.parts == ((2, 0),) and raw.scales == (None,)
    cfg = Config({"model.name": "tiny-random", "cluster.embedding": "text"})
    np.testing.assert_allclose(
        discovery.embed(tiny_base, cfg, ["route me"]), compute.embed(tiny_base, ["route me"], layer=1) / space.scales[0]
    )
    with pytest.raises(ValueError, match="embedding scale 'zscore'"):
        discovery.embedding_space(tiny_base, discovery.EmbeddingSettings(scale="zscore"))
    with pytest.raises(ValueError, match="embedding kind 'image'"):
        discovery.embedding_space(tiny_base, discovery.EmbeddingSettings(kind="image"))


def test_the_prompt_embedding_pools_the_text_inside_the_template(tiny_base):
    tokenizer = tiny_base.tokenizer
    settings = discovery.EmbeddingSettings(depth=0.5, edge_depth=1.0, edge_tokens=8)
    space = discovery.embedding_space(tiny_base, settings)
    assert space.kind == "prompt" and space.parts == ((1, 0), (2, 8))
    texts = ["a short one", " ".join(f"word{i}" for i in range(60))]  # the second has more than 2 x 8 tokens
    got = space.embed(tiny_base, texts)  # one batch: the short prompt is padded
    hidden = tiny_base.hidden_size
    assert got.shape == (2, 2 * hidden)
    np.testing.assert_allclose(np.linalg.norm(got[:, :hidden], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got[:, hidden:], axis=1), 1.0, rtol=1e-5)
    head, tail = len(chat_head(tokenizer)), len(chat_tail(tokenizer))
    backbone = tiny_base.model.get_base_model().base_model
    for row, text in enumerate(texts):
        ids = prompt_ids(tokenizer, text, 256)
        assert tokenizer.decode(ids[head : len(ids) - tail]).strip().startswith(text.split()[0])
        with torch.inference_mode(), tiny_base.model.disable_adapter():
            states = backbone(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        content = [states[layer][0, head : len(ids) - tail].numpy() for layer in (1, 2)]
        mean = content[0].mean(0) / space.scales[0]
        edges = content[1] if len(content[1]) <= 16 else np.concatenate([content[1][:8], content[1][-8:]])
        edges = edges.mean(0) / space.scales[1]
        expected = np.concatenate([mean / np.linalg.norm(mean), edges / np.linalg.norm(edges)])
        np.testing.assert_allclose(got[row], expected, rtol=1e-4, atol=1e-5)
    # Divided by its reference scales, random token texts read as prompts have unit spread in every part.
    random = [tokenizer.decode(ids) for ids in compute._random_ids(tiny_base, 256, 0)]
    for points, scale in zip(compute.embed_prompts(tiny_base, random, space.parts), space.scales, strict=True):
        np.testing.assert_allclose((points / scale).std(0), 1.0, rtol=1e-3)


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
        lora=LoraSettings(2, 4.0, 0.0, ("q_proj",)),
        global_centroids=np.zeros((1, 4), np.float32),
        local_centroids={0: np.zeros((1, 4), np.float32)},
        cluster_map={0: [0]},
        adapters={0: {"w": np.zeros(2, np.float32)}},
        **extra,
    )


def test_the_artifact_records_its_lora_settings_and_refuses_malformed_ones(tmp_path):
    _artifact().save(tmp_path)
    assert RouterArtifact.load(tmp_path).lora == LoraSettings(2, 4.0, 0.0, ("q_proj",))
    config = json.loads((tmp_path / "router" / "adapters" / "cluster_0" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (2, 4.0, ["q_proj"])
    meta_path = tmp_path / "router" / "router.json"
    meta = json.loads(meta_path.read_text())
    for bad in ({"r": 0}, {"r": "8"}, {"lora_dropout": 1.5}, {"target_modules": []}, {"lora_alpha": None}):
        meta_path.write_text(json.dumps(meta | {"lora": meta["lora"] | bad}))
        with pytest.raises(ArtifactError, match="unreadable router artifact: LoRA"):
            RouterArtifact.load(tmp_path)
    meta_path.write_text(json.dumps(meta | {"lora": {"r": 2}}))
    with pytest.raises(ArtifactError, match="expected r, lora_alpha"):
        RouterArtifact.load(tmp_path)


def test_lora_settings_map_the_run_settings_onto_peft():
    cfg = Config({"lora.r": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, "lora.target_modules": "q_proj,k_proj"})
    settings = LoraSettings.of(cfg)
    assert settings == LoraSettings(4, 8.0, 0.1, ("q_proj", "k_proj")) and hash(settings) == hash(LoraSettings.of(cfg))
    peft = settings.peft_config("some/model")
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, set(peft.target_modules)) == (4, 8.0, 0.1, {"q_proj", "k_proj"})
    assert peft.base_model_name_or_path == "some/model" and peft.task_type == "CAUSAL_LM"
    assert LoraSettings.from_peft_fields(settings.peft_fields()) == settings


def test_the_artifact_records_how_prompts_are_embedded(tmp_path):
    settings = discovery.EmbeddingSettings("prompt", 0.3, "reference", 0.7, 16)
    _artifact(embedding=settings).save(tmp_path)
    assert RouterArtifact.load(tmp_path).embedding == settings
    meta_path = tmp_path / "router" / "router.json"
    meta = json.loads(meta_path.read_text())
    meta["embedding"] = {"depth": 0.2, "scale": "reference"}  # written before prompt embeddings: the raw text
    meta_path.write_text(json.dumps(meta))
    assert RouterArtifact.load(tmp_path).embedding == discovery.EmbeddingSettings("text", 0.2, "reference")
    del meta["embedding"]  # written before the setting existed: the last layer, unscaled
    meta_path.write_text(json.dumps(meta))
    assert RouterArtifact.load(tmp_path).embedding == discovery.EmbeddingSettings("text", 1.0, "none")
    for bad in (
        {"depth": 0.2, "scale": "../../etc"},
        {"kind": "image", "depth": 0.2, "scale": "none"},
        {"kind": "prompt", "depth": 0.2, "scale": "none", "edge_tokens": 0},
        {"kind": "prompt", "depth": 0.2, "scale": "none", "edge_depth": "deep"},
        [0.2],
    ):
        meta["embedding"] = bad
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(ArtifactError, match="router.json: 'embedding' must be"):
            RouterArtifact.load(tmp_path)
