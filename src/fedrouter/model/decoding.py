"""Decoding for serving: one batched ``generate`` call whose rows differ in adapter, sampling, budget and stop rule.

``compute.generate`` answers a benchmark's test samples (greedy, one budget, one adapter per call). Serving needs
more, per row of one batch:

- its own adapter: every adapter is loaded once into its own PEFT slot and the batch runs with PEFT's
  mixed-adapter inference (``adapter_names=``, one name per row; ``BASE`` for no adapter);
- its own sampling: greedy, or temperature / top-p with its own seed. The row's next token is drawn by
  ``_RowSampler`` from a generator seeded for that row alone, so a seeded request gets the same answer whatever
  else shares its batch (up to the last bits of the logits that padding can change);
- its own token budget and stop strings, and cancellation (a client that went away): ``_RowStopper`` finishes
  those rows while the others go on;
- streaming: the stopper sees every new token and reports each row's new text as it grows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from fedrouter.model import lora
from fedrouter.model.loading import BaseModel

BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class Sampling:
    """How one answer is decoded. ``temperature`` 0 is greedy (``top_p`` and ``seed`` then do nothing)."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected at least 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature: expected a number from 0 to 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a number above 0 and at most 1, got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must not be empty")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: expected a whole number from 0 to 2**63 - 1, got {self.seed}")


@dataclass
class Row:
    """One answer to decode: its prompt token ids, adapter slot name and sampling."""

    ids: list[int]
    adapter: str
    sampling: Sampling = field(default_factory=Sampling)
    on_text: Callable[[str], None] | None = None  # called with each new piece of the answer (streaming)
    cancelled: Callable[[], bool] | None = None  # polled every step: True finishes the row early


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end token or stop string), "length" (budget) or "cancelled"
    prompt_tokens: int
    completion_tokens: int


def adapter_slot(cluster: int) -> str:
    return f"cluster_{cluster}"


def load_adapters(base: BaseModel, adapters: dict[int, dict[str, np.ndarray]]) -> list[str]:
    """Load every adapter into its own slot, once; returns the slot names."""
    for g, arrays in sorted(adapters.items()):
        lora.set_adapter(base, arrays, slot=adapter_slot(g))
    return [adapter_slot(g) for g in sorted(adapters)]


class _RowState:
    """Tokens and text of one row so far; what of its text is safe to hand out."""

    def __init__(self, row: Row, decode: Callable[[list[int]], str]) -> None:
        self.row = row
        self.decode = decode
        self.tokens: list[int] = []
        self.text = ""  # the answer so far (stop string and what follows it removed)
        self.sent = ""  # the part of the text already handed to on_text
        self.finish: str | None = None

    def add(self, token: int, eos: set[int]) -> None:
        if token in eos:
            self.finish = "stop"
            return
        self.tokens.append(token)
        text = self.decode(self.tokens).lstrip()
        for stop in self.row.sampling.stop:
            at = text.find(stop)
            if at >= 0:
                text, self.finish = text[:at], "stop"
        self.text = text
        if self.finish is None and len(self.tokens) >= self.row.sampling.max_new_tokens:
            self.finish = "length"
        if self.finish is None and self.row.cancelled is not None and self.row.cancelled():
            self.finish = "cancelled"

    def safe_text(self) -> str:
        """The part of the text no later token can change: final text, or text short of a partial character,
        trailing whitespace (it may end the answer, which is stripped) or a possible start of a stop string."""
        if self.finish is not None:
            return self.text.rstrip()
        text = self.text.rstrip()
        if text.endswith("\ufffd"):  # a character split across tokens
            text = text.rstrip("\ufffd")
        held = 0
        for stop in self.row.sampling.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    held = max(held, n)
                    break
        return text[: len(text) - held]

    def flush(self) -> None:
        safe = self.safe_text()
        if self.row.on_text is not None and len(safe) > len(self.sent) and safe.startswith(self.sent):
            self.row.on_text(safe[len(self.sent) :])
            self.sent = safe


class _RowStopper(StoppingCriteria):
    """Reads each new token of every row: its text, its stop strings, its budget, its cancellation."""

    def __init__(self, states: list[_RowState], eos: set[int]) -> None:
        self.states = states
        self.eos = eos

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(len(self.states), dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].tolist()
        for i, state in enumerate(self.states):
            if state.finish is None:
                state.add(last[i], self.eos)
                state.flush()
            done[i] = state.finish is not None
        return done


class _RowSampler(LogitsProcessor):
    """Draw the next token of each sampled row with its own generator; greedy rows are left alone.

    ``generate`` itself decodes greedily: a sampled row's scores come back with only the drawn token finite,
    so the arg-max picks it. Temperature and top-p are transformers' own warpers, applied row by row.
    """

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = []
        for i, row in enumerate(rows):
            s = row.sampling
            if s.temperature > 0:
                generator = torch.Generator()
                generator.manual_seed(s.seed if s.seed is not None else int(torch.randint(0, 2**62, ()).item()))
                warpers = [TemperatureLogitsWarper(s.temperature)]
                if s.top_p < 1.0:
                    warpers.append(TopPLogitsWarper(s.top_p))
                self.rows.append((i, generator, warpers))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.rows:
            return scores
        scores = scores.clone()
        for i, generator, warpers in self.rows:
            row = scores[i : i + 1].float()
            for warper in warpers:
                row = warper(input_ids[i : i + 1], row)
            probs = torch.softmax(row, dim=-1).cpu()
            token = int(torch.multinomial(probs[0], 1, generator=generator))
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores


@torch.inference_mode()
def decode(base: BaseModel, rows: Sequence[Row]) -> list[Completion]:
    """Decode every row in one batched ``generate`` call (left-padded, KV cache)."""
    if not rows:
        return []
    tokenizer = base.tokenizer
    eos = {tokenizer.eos_token_id}
    generation_eos = base.model.get_base_model().generation_config.eos_token_id
    eos |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos]) - {None}
    width = max(len(r.ids) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in rows], dtype=torch.long, device=base.device)
    mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], device=base.device)
    states = [_RowState(r, lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True)) for r in rows]
    with base.autocast():
        base.model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=[r.adapter for r in rows],
            max_new_tokens=max(r.sampling.max_new_tokens for r in rows),
            do_sample=False,
            logits_processor=LogitsProcessorList([_RowSampler(rows)]),
            stopping_criteria=StoppingCriteriaList([_RowStopper(states, eos)]),
            pad_token_id=pad,
            eos_token_id=sorted(eos),
            use_cache=True,
        )
    for state in states:
        if state.finish is None:  # generate ended on its overall budget before the stopper saw the last token
            state.finish = "length"
        state.flush()
    return [Completion(s.text.rstrip(), s.finish or "length", len(s.row.ids), len(s.tokens)) for s in states]
