"""``llama_step.LlamaStep`` computes a decode step as transformers' forward does: the same next-token logits for
rows on different adapters and none, prompt lengths and positions, while rows join and leave (tiny model, fp32);
its packed bf16 weights change no bit; models of other types decode through transformers' forward."""

import pytest
import torch
from test_answering import _random_adapter
from test_batched_lora import _ids, _slots
from transformers import AutoModelForCausalLM, MistralConfig

from fedrouter.model import decoding, llama_step, lora
from fedrouter.model.loading import LoraSettings, load_base_model, wrap_base_model


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
