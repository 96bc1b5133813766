"""The model computations besides decoding: sample embeddings, adapter losses and LoRA training steps.

All work on the process's one ``BaseModel``: the frozen backbone is shared, the adapter slot is switched.
Answers (evaluation, ``Router``, ``fedrouter serve``) come from one loop, ``fedrouter.model.decoding``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from fedrouter.model import llama_step, lora
from fedrouter.model.loading import BaseModel
from fedrouter.model.prompts import Prompt, chat_head, chat_tail, embedding_ids, prompt_ids, training_ids


def pad_rows(rows: Sequence[list[int]], value: int) -> torch.Tensor:
    """Token rows as one tensor, each padded on the right with ``value`` to the longest."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


PADDING = 1.25  # a batch of sequences is padded to at most this times their total length (``padded_groups``)


def padded_groups(
    lengths: Sequence[int], *, max_rows: int | None = None, max_positions: int | None = None
) -> list[list[int]]:
    """The indices of ``lengths`` in groups of similar length, shortest first: each group is padded to its longest,
    so a group grows only while that padding stays within ``PADDING`` times its sequences' own length, and within
    ``max_rows`` sequences and ``max_positions`` positions (rows x longest) where given. Embedding batches and
    ``decoding``'s prefill groups both use it: a few prompts of mixed length (a server's requests) padded to their
    longest had doubled the tokens embedded (16 paper4-raw prompts of 44-160 tokens: 2,560 positions for 1,329)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        group = groups[-1] if groups else None
        if group is not None:
            size, total = lengths[i] * (len(group) + 1), sum(lengths[j] for j in group) + lengths[i]
            fits = size <= PADDING * total
            fits = fits and (max_rows is None or len(group) < max_rows)
            if fits and (max_positions is None or size <= max_positions):
                group.append(i)
                continue
        groups.append([i])
    return groups


def _length_batches(
    base: BaseModel, encoded: Sequence[list[int]], batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Batches of similar-length sequences, shortest first: (their positions, right-padded ids, attention mask),
    at most ``batch_size`` sequences each and padded within ``PADDING`` (``padded_groups``)."""
    for index in padded_groups([len(e) for e in encoded], max_rows=batch_size):
        ids = pad_rows([encoded[i] for i in index], base.tokenizer.pad_token_id).to(base.device)
        mask = pad_rows([[1] * len(encoded[i]) for i in index], 0).to(base.device)
        yield index, ids, mask


def embedding_layer(base: BaseModel, depth: float) -> int:
    """The hidden-state index at ``depth`` (a fraction of the model's layers; 1.0 is the last, after its norm)."""
    layers = int(base.model.get_base_model().config.num_hidden_layers)
    return min(layers, max(1, round(depth * layers)))


@torch.inference_mode()
def embed(
    base: BaseModel,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_len: int = 256,
    layer: int | None = None,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """Mean of one hidden layer over non-padding tokens, one row per text (float32).

    ``layer`` is a hidden-state index (0 the token embeddings, ``num_hidden_layers`` or None the last layer after
    the final norm); each row is divided by ``scale`` (one positive number per dimension) when it is given.
    Runs the frozen backbone only (no adapter, no LM head), batched by similar length.
    """
    encoded = [embedding_ids(base.tokenizer, text, max_len) for text in texts]
    out = _pooled(base, encoded, batch_size, layer)
    if scale is not None:
        scale = np.asarray(scale, dtype=np.float32)
        if scale.shape != (base.hidden_size,) or not (np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"embedding scale: expected {base.hidden_size} positive numbers, got shape {scale.shape}")
        out /= scale
    return out


@torch.inference_mode()
def reference_scale(base: BaseModel, layer: int | None = None, *, sequences: int = 256, seed: int = 0) -> np.ndarray:
    """Per-dimension spread of ``embed`` over random token sequences: a scale that needs no data.

    A language model's hidden states have a few dimensions whose values are orders of magnitude larger than the
    rest; they dominate distances between embeddings although they vary little with the text. Dividing each
    dimension by its standard deviation over ``sequences`` sequences of uniformly random token ids (lengths
    16..128, fixed ``seed``) gives every direction a comparable say. It depends only on the model, so every client
    and the router compute the same scale without sharing anything. Zero spreads are replaced by the smallest
    positive one.
    """
    return _spread(_pooled(base, _random_ids(base, sequences, seed), 32, layer))


def _random_ids(base: BaseModel, sequences: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    vocabulary = len(base.tokenizer)
    return [torch.randint(0, vocabulary, (16 + 16 * (i % 8),), generator=generator).tolist() for i in range(sequences)]


def _spread(points: np.ndarray) -> np.ndarray:
    spread = points.astype(np.float64).std(0)
    positive = spread[spread > 0]
    floor = positive.min() if len(positive) else 1.0
    return np.maximum(spread, floor).astype(np.float32)


@torch.inference_mode()
def embed_prompts(
    base: BaseModel,
    texts: Sequence[str],
    parts: Sequence[tuple[int, int]],
    *,
    batch_size: int = 32,
    max_len: int = 256,
) -> list[np.ndarray]:
    """Each text read as the prompt the model answers, pooled once per part: one (texts x hidden) array per part.

    A text becomes its one-turn prompt (``prompt_ids``: the chat template; a long text cut in its middle, keeping
    its start and end, where instructions usually sit). A part ``(layer, edge)`` is the mean of hidden state
    ``layer`` over the text's own tokens (between the template's head and tail), or with ``edge`` > 0 over only the
    first and last ``edge`` of them. One forward pass of the frozen backbone, stopped at the deepest layer asked.
    """
    tokenizer = base.tokenizer
    encoded = [prompt_ids(tokenizer, text, max_len) for text in texts]
    head, tail = len(chat_head(tokenizer)), len(chat_tail(tokenizer))
    layers = sorted({layer for layer, _ in parts})
    out = [np.zeros((len(encoded), base.hidden_size), dtype=np.float32) for _ in parts]
    with base.autocast():
        for index, ids, mask in _length_batches(base, encoded, batch_size):
            hidden = _hidden_layers(base, ids, mask, layers)
            for p, (layer, edge) in enumerate(parts):
                weights = torch.zeros(mask.shape, device=mask.device)
                for row, i in enumerate(index):
                    begin, end = _content_span(len(encoded[i]), head, tail)
                    if edge and end - begin > 2 * edge:
                        weights[row, begin : begin + edge] = 1.0
                        weights[row, end - edge : end] = 1.0
                    else:
                        weights[row, begin:end] = 1.0
                weights = weights.unsqueeze(-1)
                pooled = (hidden[layer].float() * weights).sum(1) / weights.sum(1)
                out[p][index] = pooled.cpu().numpy()
    return out


def _content_span(length: int, head: int, tail: int) -> tuple[int, int]:
    """Where a prompt's own text lies between the template's head and tail (at least one token)."""
    begin = min(head, length - 1)
    return begin, max(length - tail, begin + 1)


@torch.inference_mode()
def prompt_reference_scales(
    base: BaseModel, parts: Sequence[tuple[int, int]], *, sequences: int = 256, seed: int = 0
) -> list[np.ndarray]:
    """``reference_scale`` for ``embed_prompts``: each part's per-dimension spread over random token texts read
    as prompts (the random ids of ``reference_scale``, decoded and put in the template)."""
    texts = [base.tokenizer.decode(ids) for ids in _random_ids(base, sequences, seed)]
    return [_spread(points) for points in embed_prompts(base, texts, parts)]


class _Reached(Exception):
    """Raised by a forward hook to stop the backbone once the wanted layer has run."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


def _hidden(base: BaseModel, ids: torch.Tensor, mask: torch.Tensor, layer: int | None) -> torch.Tensor:
    """Hidden states after decoder layer ``layer`` (``hidden_states[layer]``), without running the layers above it."""
    if layer is None:
        layer = int(base.model.get_base_model().config.num_hidden_layers)
    return _hidden_layers(base, ids, mask, [layer])[layer]


def _hidden_layers(
    base: BaseModel, ids: torch.Tensor, mask: torch.Tensor, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """``hidden_states[layer]`` for each of ``layers``, without running the decoder layers above the deepest.

    transformers has no "run the first n layers" call; ``output_hidden_states`` would run every layer and keep
    them all. Hooks keep the wanted layers' outputs and stop the forward pass after the deepest (at depth 0.2, a
    fifth of the decoder layers run). The last layer (after the final norm) needs the whole pass.
    """
    lean = llama_step.frozen(base)  # a Llama model: the same numbers without the forward's per-call machinery
    if lean is not None:
        return lean.hidden_states(ids, mask, layers)
    backbone = base.model.get_base_model().base_model
    last = int(backbone.config.num_hidden_layers)
    found: dict[int, torch.Tensor] = {}
    if 0 in layers:
        found[0] = backbone.get_input_embeddings()(ids)
    inner = sorted(layer for layer in set(layers) if 0 < layer < last)
    if not inner and last not in layers:
        return found
    deepest = None if last in layers else inner[-1]

    def keep(layer: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            found[layer] = hidden
            if layer == deepest:
                raise _Reached(hidden)

        return hook

    handles = [backbone.layers[layer - 1].register_forward_hook(keep(layer)) for layer in inner]
    try:
        with lora.switched_off(base):  # the frozen model: its LoRA layers compute their base layer alone
            if deepest is None:
                found[last] = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            else:
                backbone(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [layer for layer in layers if layer not in found]
    if missing:
        raise RuntimeError(f"the backbone never ran decoder layer(s) {missing}")
    return found


def _pooled(base: BaseModel, encoded: list[list[int]], batch_size: int, layer: int | None) -> np.ndarray:
    out = np.zeros((len(encoded), base.hidden_size), dtype=np.float32)
    with base.autocast():
        for index, ids, mask in _length_batches(base, encoded, batch_size):
            hidden = _hidden(base, ids, mask, layer).float()
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1)
            out[index] = pooled.cpu().numpy()
    return out


@torch.inference_mode()
def last_token_states(
    base: BaseModel, prompts: Sequence[Prompt], *, batch_size: int = 16, max_len: int = 256
) -> np.ndarray:
    """The last layer's hidden state (after the final norm) at the last token of each formatted prompt (float32).

    Unlike ``embed``, the adapter in the slot is active: this is FedDPA's instance embedding, which its authors
    compute with the client's local adapter loaded.
    """
    encoded = [prompt_ids(base.tokenizer, prompt, max_len) for prompt in prompts]
    out = np.zeros((len(encoded), base.hidden_size), dtype=np.float32)
    backbone = base.model.get_base_model().base_model
    with base.autocast():
        for index, ids, mask in _length_batches(base, encoded, batch_size):
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            last = mask.sum(1) - 1  # right padding: the causal mask keeps pads from reaching real tokens
            out[index] = hidden[torch.arange(len(index)), last].float().cpu().numpy()
    return out


def encode_training(
    base: BaseModel, pairs: Sequence[tuple[Prompt, str]], max_len: int
) -> list[tuple[list[int], list[int]]]:
    """Tokenize (prompt, response) pairs once; reused across rounds."""
    return [training_ids(base.tokenizer, prompt, response, max_len) for prompt, response in pairs]


def answer_loss(base: BaseModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens, projecting only those positions through the LM head.

    The LM head over the whole sequence (vocab 49k x every token) costs more than the rest of a small model's
    step; answer positions are a few percent of the tokens.
    """
    causal_lm = base.model.get_base_model()
    hidden = causal_lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


def _answer_batch(
    base: BaseModel, rows: Sequence[tuple[list[int], list[int]]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training examples as one right-padded batch: token ids, attention mask, labels (-100 where not scored)."""
    ids = pad_rows([r[0] for r in rows], base.tokenizer.pad_token_id).to(base.device)
    mask = pad_rows([[1] * len(r[0]) for r in rows], 0).to(base.device)
    return ids, mask, pad_rows([r[1] for r in rows], -100).to(base.device)


@torch.inference_mode()
def mean_loss(base: BaseModel, examples: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 16) -> float:
    """The adapter in the slot's mean next-token cross-entropy over every answer token of ``examples``."""
    if not examples:
        raise ValueError("no examples to score")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # similar lengths: little padding
    total, tokens = 0.0, 0
    for start in range(0, len(order), batch_size):
        ids, mask, labels = _answer_batch(base, [examples[i] for i in order[start : start + batch_size]])
        count = int((labels[:, 1:] != -100).sum())
        if count:
            with base.autocast():
                total += float(answer_loss(base, ids, mask, labels)) * count
            tokens += count
    return total / max(tokens, 1)


@contextmanager
def training_attention(base: BaseModel) -> Iterator[None]:
    """Eager attention while training on a CPU, the model's default (SDPA) otherwise.

    On this project's 2-core CPU, SDPA's flash-attention backward kernel dominated short-sequence steps: eager
    attention made a LoRA step (batch 8) 22% faster at ~110 tokens and 6% faster at 256, while SDPA stays faster
    for embedding and generation (measured with benchmarks/speed.py's samples).
    """
    model = base.model.get_base_model()
    previous = model.config._attn_implementation
    if base.device.type != "cpu" or previous == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless random batches of similar-length examples (the usual "group by length" sampler).

    Each pass shuffles all examples, cuts them into windows of ``4 * batch_size``, sorts each window by length
    and serves its batches in random order: every example is used once per pass, and padding shrinks.
    """
    n = len(lengths)
    size = min(batch_size, n)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        batches: list[list[int]] = []
        window = 4 * size
        for start in range(0, n, window):
            chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
            batches += [chunk[j : j + size] for j in range(0, len(chunk), size)]
        rng.shuffle(batches)
        yield from batches


def train_adapter(
    base: BaseModel,
    examples: Sequence[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> list[float]:
    """Train the adapter in the slot for ``steps`` AdamW steps on ``examples``; returns the step losses.

    Batches come from ``length_grouped_batches`` with a generator seeded by ``seed``.
    """
    if not examples:
        raise ValueError("no training examples")
    rng = random.Random(seed)
    torch.manual_seed(seed)  # LoRA dropout
    params = [p for p in base.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = length_grouped_batches([len(e[0]) for e in examples], batch_size, rng)
    losses: list[float] = []
    base.model.train()
    try:
        with training_attention(base):
            for _ in range(steps):
                ids, mask, labels = _answer_batch(base, [examples[i] for i in next(batches)])
                with base.autocast():
                    loss = answer_loss(base, ids, mask, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        base.model.eval()
    return losses
