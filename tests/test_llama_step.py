"""``llama_step.LlamaStep`` computes a decode step as transformers' forward does: the same next-token logits for
rows on different adapters and none, prompt lengths and positions, while rows join and leave (tiny model, fp32);
its packed bf16 weights change no bit; its prefill and the hidden states embeddings read are transformers' forward
bit for bit; models of other types decode through transformers' forward."""

import numpy as np
import pytest
import torch
from test_answering import _random_adapter
from test_batched_lora import _ids, _slots
from transformers import AutoModelForCausalLM, MistralConfig

from fedrouter.model import compute, decoding, llama_step, lora
from fedrouter.model.loading import LoraSettings, load_base_model, wrap_base_model
from fedrouter.model.prompts import chat_head


def _recording(batch: decoding.Batch) -> list[torch.Tensor]:
    """The logits of every step the batch takes (its prefills' included), in order."""
    seen: list[torch.Tensor] = []
    advance = batch._advance

    def recorded(lives, logits):
        seen.append(logits.clone())
        return advance(lives, logits)

    batch._advance = recorded
    return seen


def test_step_logits_equal_transformers_forward(tiny_base):
    assert llama_step.supports(tiny_base)
    adapters = ["one", decoding.BASE, "pair", "two", "one", decoding.BASE, "two"]
    ids = _ids(tiny_base, len(adapters))
    # Budgets of 3 to 9 tokens: rows leave the batch at different steps and the last row takes their place.
    rows = [
        decoding.Row(r, a, decoding.Sampling(max_new_tokens=3 + i % 7))
        for i, (r, a) in enumerate(zip(ids, adapters, strict=True))
    ]
    with lora.loaded(tiny_base, _slots(tiny_base)):
        lean, forward = decoding.Batch(tiny_base), decoding.Batch(tiny_base, lean=False)
        assert lean._lean is not None and forward._lean is None
        logits = {"lean": _recording(lean), "forward": _recording(forward)}
        done: dict[str, list] = {"lean": [], "forward": []}
        for name, batch in (("lean", lean), ("forward", forward)):
            done[name] += batch.add(rows[:4])
            for _ in range(2):
                done[name] += batch.step()
            done[name] += batch.add(rows[4:])  # rows join a batch that has decoded already
            while len(batch):
                done[name] += batch.step()
    assert len(logits["lean"]) == len(logits["forward"]) > 8
    for ours, theirs in zip(logits["lean"], logits["forward"], strict=True):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() < 1e-5, (ours - theirs).abs().max()
    answers = {name: {id(row): c.text for row, c in finished} for name, finished in done.items()}
    assert answers["lean"] == answers["forward"] and len(answers["lean"]) == len(rows)


def test_other_model_types_decode_through_transformers(tiny_base):
    config = MistralConfig(
        vocab_size=len(tiny_base.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=None,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base = wrap_base_model(
        "tiny-mistral",
        model,
        tiny_base.tokenizer,
        torch.float32,
        LoraSettings().peft_config("tiny-mistral"),
        torch.device("cpu"),
    )
    assert not llama_step.supports(base)
    assert decoding.Batch(base)._lean is None
    sampling = decoding.Sampling(max_new_tokens=5)
    with lora.loaded(base, {"one": _random_adapter(base, 1)}):
        rows = [decoding.Row(r, a, sampling) for r, a in zip(_ids(base, 2), ["one", decoding.BASE], strict=True)]
        ours, peft = decoding.decode(base, rows), decoding.decode(base, rows, stacked=False)
    assert [c.text for c in ours] == [c.text for c in peft]
    assert all(c.completion_tokens > 0 for c in ours)


def test_packed_weights_give_bitwise_the_same_step():
    """In bf16 on a CPU the step reads oneDNN's packed copies of the weights: the logits must not move a bit."""
    base = load_base_model("tiny-random", precision="bf16")
    packed = llama_step.packed_weights(base)
    if not packed:
        pytest.skip("this build of torch packs no bf16 weights on this CPU (the step uses F.linear)")
    layers = base.model.get_base_model().config.num_hidden_layers
    assert len(packed) == 7 * layers + 1  # every projection and the LM head
    adapters = ["one", decoding.BASE, "pair", "two"]
    rows = [
        decoding.Row(r, a, decoding.Sampling(max_new_tokens=6))
        for r, a in zip(_ids(base, len(adapters)), adapters, strict=True)
    ]
    logits = {}
    with lora.loaded(base, _slots(base)):
        for name in ("packed", "plain"):
            batch = decoding.Batch(base)
            if name == "plain":
                batch._lean.packed = {}
            logits[name] = _recording(batch)
            batch.add(rows)
            while len(batch):
                batch.step()
    assert len(logits["packed"]) == len(logits["plain"]) > 4
    assert all(torch.equal(a, b) for a, b in zip(logits["packed"], logits["plain"], strict=True))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_prefill_is_transformers_forward_bit_for_bit(tiny_base, precision):
    """The prefill uses transformers' own mask builder and attention function: the same logits and the same keys and
    values in the cache, bit for bit, with the chat template's head cached as a prefix or not."""
    base = tiny_base if precision == "fp32" else load_base_model("tiny-random", precision="bf16")
    adapters = ["one", decoding.BASE, "pair", "two", "one"]
    head = tuple(chat_head(base.tokenizer))
    ids = [[*head, *r] for r in _ids(base, len(adapters))]
    rows = [decoding.Row(r, a, decoding.Sampling(max_new_tokens=3)) for r, a in zip(ids, adapters, strict=True)]
    with lora.loaded(base, _slots(base)):
        for prefix in ((), head):
            batches = {lean: decoding.Batch(base, prefix, lean=lean) for lean in (True, False)}
            logits = {lean: _recording(batch) for lean, batch in batches.items()}
            for batch in batches.values():
                batch.add(rows)
            assert len(logits[True]) == len(logits[False]) >= 1  # prompts of several lengths: left padding
            assert all(torch.equal(a, b) for a, b in zip(logits[True], logits[False], strict=True))
            for ours, theirs in zip(batches[True].cache.layers, batches[False].cache.layers, strict=True):
                assert all(torch.equal(a, b) for a, b in zip(ours.whole(), theirs.whole(), strict=True))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_hidden_states_are_the_forwards_bit_for_bit(tiny_base, precision):
    """Embeddings (routing and clustering) read hidden states through ``LlamaStep.hidden_states``: the same numbers
    as the model's forward, for the token embeddings, an inner layer and the last (after the final norm)."""
    base = tiny_base if precision == "fp32" else load_base_model("tiny-random", precision="bf16")
    texts = ["Summarize: the cat sat on the mat.", "Translate to German: good morning", "Is this review positive? Yes"]
    parts = ((0, 0), (1, 0), (2, 3))
    lean = compute.embed_prompts(base, texts, parts)
    base.derived[llama_step._FROZEN] = None  # transformers' forward, as for a model of another type
    try:
        forward = compute.embed_prompts(base, texts, parts)
    finally:
        base.derived.pop(llama_step._FROZEN)
    assert all(np.array_equal(a, b) for a, b in zip(lean, forward, strict=True))
    assert llama_step.frozen(base) is not None
