"""Adapter weights as NumPy arrays in PEFT's own key format, switched in and out of the model's slots.

The model has one trainable slot (``default``) and, created on first use, a ``partner`` slot with the same
LoRA config: a method that trains one adapter with another mixed in (FedDPA's local adapter beside its global one)
loads the second one there and mixes the two with PEFT's per-adapter scales. More slots, frozen, hold adapters
for decoding (``loaded``); a weighted sum of adapters (``combine``) is one adapter of their summed rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from fedrouter.arrays import Arrays
from fedrouter.model.loading import BaseModel

SLOT = "default"
PARTNER = "partner"


def get_adapter(base: BaseModel, slot: str = SLOT) -> Arrays:
    """The slot's LoRA weights (only LoRA A/B matrices, float32), keyed as PEFT saves them."""
    state = get_peft_model_state_dict(base.model, adapter_name=slot)
    return {key: tensor.detach().float().cpu().numpy().copy() for key, tensor in state.items()}


def adapter_shapes(base: BaseModel) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in get_peft_model_state_dict(base.model).items()}


def _ensure_slot(base: BaseModel, slot: str, rank: int | None = None) -> None:
    """Create the slot (frozen, float32) unless it exists with this rank (None: the model's LoRA rank); a slot of
    another rank has the model's scaling (``lora_alpha / r``)."""
    rank = rank or base.lora.r
    existing = base.model.peft_config.get(slot)
    if existing is not None and existing.r == rank:
        return
    if existing is not None:
        if slot == SLOT:
            raise ValueError(f"slot {SLOT!r} holds rank-{existing.r} adapters, not rank {rank}")
        base.model.delete_adapter(slot)
    training = base.model.training
    config = dataclasses.replace(base.lora, r=rank, lora_alpha=base.lora.lora_alpha * rank / base.lora.r)
    base.model.add_adapter(slot, config)
    base.model.train(training)  # the new slot's dropout modules start in training mode
    base.model.set_adapter(SLOT)
    for name, parameter in base.model.named_parameters():
        if f".{slot}." in name:
            parameter.data = parameter.data.float()
            parameter.requires_grad_(False)


def set_adapter(base: BaseModel, arrays: Mapping[str, np.ndarray], slot: str = SLOT) -> None:
    """Load adapter weights into a slot (in place: the base model is never reloaded). A slot other than
    ``default`` takes the adapter's rank (``combine``'s sums are wider)."""
    _ensure_slot(base, slot, None if slot == SLOT else rank(arrays))
    state = {key: torch.from_numpy(np.asarray(value, dtype=np.float32)) for key, value in arrays.items()}
    result = set_peft_model_state_dict(base.model, state, adapter_name=slot)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise ValueError(f"adapter has keys the model does not: {unexpected[:3]}")


def rank(arrays: Mapping[str, np.ndarray]) -> int:
    """An adapter's LoRA rank: the rows of its A matrices."""
    ranks = {np.shape(value)[0] for key, value in arrays.items() if "lora_A" in key}
    if len(ranks) != 1:
        raise ValueError(f"adapter: expected LoRA A matrices of one rank, got ranks {sorted(ranks)}")
    return int(ranks.pop())


def combine(parts: Sequence[tuple[float, Mapping[str, np.ndarray]]]) -> Arrays:
    """One adapter whose output is the weighted sum of the parts' outputs (each ``scaling * B @ A`` at the
    model's scaling): the parts' ranks side by side, A matrices stacked, B matrices joined and scaled by their
    weights. It loads into a slot of the summed rank (``set_adapter``), so a batch mixes it like any adapter."""
    keys = set(parts[0][1])
    if any(set(arrays) != keys for _, arrays in parts) or any("lora_A" not in k and "lora_B" not in k for k in keys):
        raise ValueError("combine: expected adapters with the same LoRA A and B matrices")
    return {
        key: np.concatenate([arrays[key] for _, arrays in parts], axis=0)
        if "lora_A" in key
        else np.concatenate([np.float32(weight) * arrays[key] for weight, arrays in parts], axis=1)
        for key in sorted(keys)
    }


@contextmanager
def loaded(base: BaseModel, adapters: Mapping[str, Mapping[str, np.ndarray]]) -> Iterator[None]:
    """Each adapter in the slot of its name (none of them ``default``) while the block runs; the slots go on exit."""
    if SLOT in adapters:
        raise ValueError(f"loaded: slot {SLOT!r} is the trained one")
    try:
        for slot, arrays in adapters.items():
            set_adapter(base, arrays, slot=slot)
        yield
    finally:
        for slot in adapters:
            if slot in base.model.peft_config:
                base.model.delete_adapter(slot)


def fresh_adapter(base: BaseModel, seed: int) -> Arrays:
    """A newly initialised adapter (PEFT's init: random A, zero B), reproducible from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in base.model.modules():
            if hasattr(module, "reset_lora_parameters") and SLOT in getattr(module, "lora_A", {}):
                module.reset_lora_parameters(SLOT, True)
    return get_adapter(base)


_LORA_LAYERS = ("lora", "LoRA layers")  # ``BaseModel.derived``: the model's LoRA layers, found once


@contextmanager
def switched_off(base: BaseModel) -> Iterator[None]:
    """Every LoRA layer computes its frozen layer alone: PEFT's ``disable_adapter()`` for LoRA without the scan of
    every layer's status it begins with (28 ms a call on the embedded model, a quarter of embedding one prompt to
    route it) and without looking the layers up among every module at each switch (6 ms). The adapters are on
    again after it, as they always are outside it."""
    layers = base.derived.get(_LORA_LAYERS)
    if layers is None:
        layers = base.derived[_LORA_LAYERS] = [m for m in base.model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextmanager
def mixed(base: BaseModel, slot_weight: float, partner_weight: float) -> Iterator[None]:
    """Both slots active: output = base + slot_weight * slot adapter + partner_weight * partner adapter.

    Only the ``default`` slot trains; the partner stays frozen. Scales return to 1 and the partner is switched
    off on exit.
    """
    _ensure_slot(base, PARTNER)
    tuner = base.model.base_model
    layers = [m for m in base.model.modules() if isinstance(m, LoraLayer)]
    tuner.set_adapter([SLOT, PARTNER])
    for layer in layers:
        layer.set_scale(SLOT, slot_weight)
        layer.set_scale(PARTNER, partner_weight)
    for name, parameter in base.model.named_parameters():
        if f".{PARTNER}." in name:
            parameter.requires_grad_(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_scale(SLOT, 1.0)
            layer.set_scale(PARTNER, 1.0)
        tuner.set_adapter(SLOT)
        for name, parameter in base.model.named_parameters():
            if f".{PARTNER}." in name:
                parameter.requires_grad_(False)
