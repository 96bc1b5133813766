"""How a client answers its test samples: labels only score (every method), FedDPA's instance weighting."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import tiny_settings

from fedrouter import discovery
from fedrouter.config import Config
from fedrouter.data import all_clients
from fedrouter.federated.answering import answer_tests
from fedrouter.methods import Serving, make_method, methods
from fedrouter.methods.feddpa import instance_weights
from fedrouter.model import compute, decoding, lora
from fedrouter.model.prompts import prompt_ids


def _random_adapter(base, seed: int, scale: float = 0.5) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in lora.adapter_shapes(base).items()}


def _inputs(tiny_base, tmp_path, name: str):
    """A client's test sets, its method, and everything a serving rule reads, with distinct random adapters."""
    cfg = Config(tiny_settings(tmp_path, **{"run.method": name, "eval.sets": "personalized,generalization"}))
    method = make_method(cfg)
    client = all_clients(cfg)[0]
    rng = np.random.default_rng(1)
    hidden = discovery.embed(tiny_base, cfg, ["any text"]).shape[1]  # the width of the run's embeddings
    keys = method.shared_adapters(lora.fresh_adapter(tiny_base, 0), 2)  # the names of the method's adapters
    shared = {key: _random_adapter(tiny_base, 12 if key == "global" else 10 + i) for i, key in enumerate(keys)}
    extra = {
        "global_centroids": rng.normal(size=(2, hidden)).astype(np.float32),
        "local_to_global": np.array([1, 0]),
        "tasks": sorted({s.task for s in client.train})[:2],
    }
    serving = Serving(
        tiny_base,
        cfg,
        client.client_id,
        shared,
        _random_adapter(tiny_base, 13),
        {"centroids": rng.normal(size=(2, hidden)).astype(np.float32)},
        [s.instruction for s in client.train],
        extra,
        lambda: compute.encode_training(tiny_base, [(s.instruction, s.response) for s in client.train], 64),
    )
    return cfg, client, method, serving


def _relabelled(tests: dict) -> dict:
    """Every test sample given another task's label (a rotation of the label set): inputs unchanged."""
    labels = sorted({s.task for test in tests.values() for s in test})
    other = dict(zip(labels, labels[1:] + labels[:1], strict=True))
    return {name: [dataclasses.replace(s, task=other[s.task]) for s in test] for name, test in tests.items()}


@pytest.mark.parametrize("name", sorted(methods()))
def test_relabelling_the_test_samples_changes_no_answer(tiny_base, tmp_path, name):
    """Labels only score: the decoding budget, prompt, stop rule and adapter of a sample never read its task.

    The oracle is the exception by definition (it picks the adapter of the true task): relabelled, its adapter
    choice may change, but a sample that keeps its adapter keeps its answer (the budget does not move).
    """
    cfg, client, method, serving = _inputs(tiny_base, tmp_path, name)
    modes = method.modes(cfg)
    answers, _ = answer_tests(method, serving, client.tests, modes)
    relabelled, _ = answer_tests(method, serving, _relabelled(client.tests), modes)
    assert answers.keys() == relabelled.keys()
    assert sum(len(rows) for rows in answers.values()) == sum(len(t) for t in client.tests.values()) * len(modes)
    if name == "oracle":
        kept = [(a, b) for key in answers for a, b in zip(answers[key], relabelled[key], strict=True) if a[0] == b[0]]
        assert kept and all(a == b for a, b in kept)
        assert any(a[0] != b[0] for key in answers for a, b in zip(answers[key], relabelled[key], strict=True))
    else:
        assert answers == relabelled


def test_every_sample_gets_the_same_decoding_budget(tiny_base, tmp_path, monkeypatch):
    """One budget for all: the short-answer task (sentiment) is no longer cut to a budget of its own."""
    cfg, client, method, serving = _inputs(tiny_base, tmp_path, "fedit")
    calls = []
    decode = decoding.decode

    def recording(base, rows, **args):
        calls.append((list(rows), args))
        return decode(base, rows, **args)

    monkeypatch.setattr(decoding, "decode", recording)
    answers, generated = answer_tests(method, serving, client.tests, method.modes(cfg))
    budget = cfg["eval.max_new_tokens"]
    assert len(calls) == 1  # every sample, whatever its adapter, in one decoding loop
    rows, args = calls[0]
    assert all(row.sampling == decoding.Sampling(budget) for row in rows)  # greedy, one budget, no stop string
    assert args["max_rows"] == cfg["eval.batch_size"]
    samples = [s for test in client.tests.values() for s in test]
    asked = {tuple(row.ids) for row in rows}
    assert asked == {tuple(prompt_ids(tiny_base.tokenizer, s.prompt, cfg["model.max_seq_len"])) for s in samples}
    lengths: dict[str, list[int]] = {}
    for (set_name, _), answered in answers.items():
        for sample, (_, text) in zip(client.tests[set_name], answered, strict=True):
            tokens = tiny_base.tokenizer(text, add_special_tokens=False)["input_ids"]
            lengths.setdefault(sample.task, []).append(len(tokens))
    # The random tiny model rarely ends early: every task, sentiment too, reaches about the one budget.
    assert all(max(ns) >= budget - 1 for ns in lengths.values()), lengths
    assert generated == len(rows) * budget  # the decoded tokens of each (adapter, sample) answer, counted once


def test_a_prompt_longer_than_the_model_reads_is_cut_not_refused(tiny_base, tmp_path):
    """A test prompt over ``model.max_seq_len`` tokens is cut as training cuts it (``prompt_ids``) and answered."""
    cfg, client, method, serving = _inputs(tiny_base, tmp_path, "fedit")
    cfg = Config(tiny_settings(tmp_path, **{"run.method": "fedit", "model.max_seq_len": 32}))
    serving = dataclasses.replace(serving, cfg=cfg)
    sample = client.tests["personalized"][0]
    long = dataclasses.replace(sample, instruction="Summarize: " + "blah " * 200 + sample.instruction)
    assert len(prompt_ids(tiny_base.tokenizer, long.prompt, 10_000)) > 200
    answers, generated = answer_tests(method, serving, {"personalized": [long]}, method.modes(cfg))
    ((_, text),) = answers[("personalized", "fedit")]
    assert generated > 0 and text


def test_feddpa_weights_the_global_adapter_by_instance_similarity(tiny_base, tmp_path):
    """alpha * global + (1 - alpha) * local, alpha = 0.5 x mean cosine similarity (the authors' direction)."""
    cfg, client, method, serving = _inputs(tiny_base, tmp_path, "feddpa")
    samples = client.tests["generalization"]
    weights = instance_weights(serving, samples)
    assert weights.shape == (len(samples),) and ((weights >= -0.5) & (weights <= 0.5)).all()
    assert np.allclose(weights / 0.05, np.round(weights / 0.05))
    again = instance_weights(serving, samples)
    assert np.array_equal(weights, again)  # reproducible draws of the reference instances
    # The answer of one sample is the one its combined adapter decodes alone; the weight's direction shows in it.
    tests = {"generalization": samples}
    slots = set(tiny_base.model.peft_config)  # the session's shared model may hold other tests' slots
    answers, _ = answer_tests(method, serving, tests, method.modes(cfg))
    rows = next(iter(answers.values()))
    i = int(np.argmax(np.abs(weights - 0.5)))
    alpha = rows[i][0][1]
    assert alpha == pytest.approx(weights[i]) and abs(alpha - 0.5) >= 0.1
    ids = prompt_ids(tiny_base.tokenizer, samples[i].prompt, cfg["model.max_seq_len"])
    budget = decoding.Sampling(cfg["eval.max_new_tokens"])
    alone = {}
    for name, weight in (("ours", alpha), ("swapped", 1.0 - alpha)):
        combined = lora.combine([(weight, serving.shared["global"]), (1.0 - weight, serving.personal)])
        with lora.loaded(tiny_base, {name: combined}):
            alone[name] = decoding.decode(tiny_base, [decoding.Row(ids, name, budget)])[0].text
    assert rows[i][1] == alone["ours"]
    assert alone["ours"] != alone["swapped"]
    assert set(tiny_base.model.peft_config) <= slots | {lora.SLOT, lora.PARTNER}  # evaluation's slots are gone


def test_a_combined_adapter_is_the_weighted_mix_of_its_parts(tiny_base):
    """``lora.combine``: one adapter of twice the rank whose output is w * first + (1 - w) * second, as PEFT's
    per-adapter scales mix the two slots (``lora.mixed``, FedDPA's training)."""
    first, second = _random_adapter(tiny_base, 21), _random_adapter(tiny_base, 22)
    ids = torch.tensor([prompt_ids(tiny_base.tokenizer, "Sort these words: pear, fig", 64)])
    lora.set_adapter(tiny_base, first)
    lora.set_adapter(tiny_base, second, slot=lora.PARTNER)
    with torch.inference_mode(), lora.mixed(tiny_base, 0.3, 0.7):
        mixed = tiny_base.model(input_ids=ids).logits
    combined = lora.combine([(0.3, first), (0.7, second)])
    assert lora.rank(combined) == 2 * tiny_base.lora.r
    with torch.inference_mode(), lora.loaded(tiny_base, {"combined": combined}):
        one = tiny_base.model(input_ids=ids, adapter_names=["combined"]).logits
    torch.testing.assert_close(one, mixed, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        plain = tiny_base.model(input_ids=ids).logits
    assert not torch.allclose(plain, mixed, atol=1e-3)  # the adapters move the logits: the check has teeth


def test_feddpa_instance_embedding_uses_the_local_adapter(tiny_base):
    """The instance embedding is the last token's final hidden state with the adapter in the slot active."""
    texts = ["a short input", "a somewhat longer input to pad the batch against"]
    lora.set_adapter(tiny_base, _random_adapter(tiny_base, 3))
    batched = compute.last_token_states(tiny_base, texts, batch_size=2)
    one = np.stack([compute.last_token_states(tiny_base, [t], batch_size=1)[0] for t in texts])
    np.testing.assert_allclose(batched, one, rtol=1e-4, atol=1e-4)  # padding never reaches the last real token
    lora.set_adapter(tiny_base, _random_adapter(tiny_base, 4))
    assert not np.allclose(compute.last_token_states(tiny_base, texts), batched)
