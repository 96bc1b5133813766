"""The embedding's reference scales are computed once per model and read back from disk by later processes."""

import logging

import numpy as np
import pytest

from fedrouter import discovery
from fedrouter.model import derived
from fedrouter.model.loading import load_base_model


@pytest.fixture
def saved_tiny(tmp_path, monkeypatch):
    """The tiny model saved as a model folder (so it has an identity), loaded from there; a fresh cache."""
    import torch

    from fedrouter.model.loading import tiny_random

    model, tokenizer = tiny_random(torch.float32)
    monkeypatch.setenv("FEDROUTER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _space(folder):
    base = load_base_model(str(folder), precision="fp32")
    return base, discovery.embedding_space(base, discovery.EmbeddingSettings())


def test_a_second_process_reads_the_scales_the_first_computed(saved_tiny, monkeypatch):
    _, first = _space(saved_tiny)
    assert len(list((saved_tiny.parent / "cache" / "derived").glob("*.npz"))) == 1

    def no_compute(*args, **kwargs):
        raise AssertionError("computed again")

    from fedrouter.model import compute

    monkeypatch.setattr(compute, "prompt_reference_scales", no_compute)
    _, second = _space(saved_tiny)  # a new load: nothing derived in memory
    assert all(np.array_equal(a, b) for a, b in zip(first.scales, second.scales, strict=True))


def test_other_weights_or_settings_are_not_served_from_the_cache(saved_tiny):
    base, first = _space(saved_tiny)
    text = discovery.embedding_space(base, discovery.EmbeddingSettings(kind="text"))
    assert len(list((saved_tiny.parent / "cache" / "derived").glob("*.npz"))) == 2  # another setting, another file
    assert text.scales[0].shape == first.scales[0].shape
    before = derived.model_identity(base)
    weights = saved_tiny / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten: a new time stamp names other weights
    assert derived.model_identity(base) == before  # what was loaded keeps its identity
    assert derived.model_identity(load_base_model(str(saved_tiny), precision="fp32")) != before


def test_a_damaged_cache_file_is_computed_again(saved_tiny, caplog):
    _, first = _space(saved_tiny)
    (path,) = (saved_tiny.parent / "cache" / "derived").glob("*.npz")
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="fedrouter"):
        _, again = _space(saved_tiny)
    assert "computing it again" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(first.scales, again.scales, strict=True))
    assert np.load(path)["parts"] == len(first.scales)  # replaced by a whole file


def test_a_model_built_in_memory_is_never_cached(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDROUTER_CACHE", str(tmp_path))
    assert derived.model_identity(tiny_base) is None
    assert derived.stored_arrays(tiny_base, "x", lambda: [np.ones(64, np.float32)])[0].shape == (64,)
    assert not (tmp_path / "derived").exists()
