"""The stacked adapters (``model.batched_lora``) compute what PEFT's mixed-adapter inference computes, row by row:
the same logits and the same greedy answers for rows on different adapters, ranks and none (tiny model, fp32)."""

import pytest
import torch
from test_answering import _random_adapter

from fedrouter.model import decoding, lora
from fedrouter.model.batched_lora import Stack


def _slots(base):
    """Three adapters loaded: two of the model's rank and a combined one of twice it (FedDPA's weighted pair)."""
    first, second = _random_adapter(base, 1), _random_adapter(base, 2)
    return {
        "one": first,
        "two": second,
        "pair": lora.combine([(0.7, first), (0.3, second)]),
    }


def _ids(base, count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    vocabulary = base.tokenizer.vocab_size
    return [torch.randint(10, vocabulary, (5 + 3 * i,), generator=generator).tolist() for i in range(count)]


def test_stacked_logits_equal_peft_mixed_batch(tiny_base):
    adapters = ["one", decoding.BASE, "pair", "two", "one", decoding.BASE]
    ids = _ids(tiny_base, len(adapters))
    width = max(len(r) for r in ids)
    tokens = torch.tensor([[0] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    with lora.loaded(tiny_base, _slots(tiny_base)), torch.inference_mode():
        peft = tiny_base.model(input_ids=tokens, attention_mask=mask, adapter_names=adapters).logits
        stack = Stack(tiny_base, list(tiny_base.model.peft_config))
        with stack.applied(adapters):
            ours = tiny_base.model(
                input_ids=tokens, attention_mask=mask, adapter_names=[decoding.BASE] * len(adapters)
            ).logits
        alone = tiny_base.model(input_ids=tokens, attention_mask=mask, adapter_names=[decoding.BASE] * 6).logits
    assert (ours - peft).abs().max() < 1e-5, (ours - peft).abs().max()
    assert not torch.equal(ours[0], alone[0])  # the adapters do change the logits
    assert torch.equal(ours[1], alone[1]) and torch.equal(ours[5], alone[5])  # no adapter: the base model's own
    # The hooks are gone after the block: the model is the base model again.
    with torch.inference_mode():
        after = tiny_base.model(input_ids=tokens, attention_mask=mask, adapter_names=[decoding.BASE] * 6).logits
    assert torch.equal(after, alone)
    with pytest.raises(ValueError, match="no adapter slot named 'not-loaded'"), stack.applied(["one", "not-loaded"]):
        pass


def test_stacked_decoding_gives_peft_mixed_batch_answers(tiny_base):
    adapters = ["one", "two", "pair", decoding.BASE] * 3
    sampling = decoding.Sampling(max_new_tokens=12)
    rows = [decoding.Row(ids, a, sampling) for ids, a in zip(_ids(tiny_base, len(adapters)), adapters, strict=True)]
    with lora.loaded(tiny_base, _slots(tiny_base)):
        ours = decoding.decode(tiny_base, rows, max_rows=5)
        peft = decoding.decode(tiny_base, rows, max_rows=5, stacked=False)
    assert [c.text for c in ours] == [c.text for c in peft]
    assert len({c.text for c in ours}) > 1


def test_a_vanishing_temperature_is_greedy_not_a_failed_batch(tiny_base):
    """A temperature of 1e-40 would overflow the logits it divides (fuzzing found it failing a whole batch)."""
    ids = _ids(tiny_base, 2)
    greedy = decoding.Sampling(max_new_tokens=6)
    rows = [
        decoding.Row(ids[0], decoding.BASE, decoding.Sampling(max_new_tokens=6, temperature=1e-40)),
        decoding.Row(ids[1], decoding.BASE, greedy),
    ]
    tiny, other = decoding.decode(tiny_base, rows)
    assert tiny.text == decoding.decode(tiny_base, [decoding.Row(ids[0], decoding.BASE, greedy)])[0].text
    assert other.completion_tokens > 0
