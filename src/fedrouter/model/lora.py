"""Adapter weights as NumPy arrays in PEFT's own key format, switched in and out of the model's slots.

The model has one trainable slot (``default``) and, created on first use, a ``partner`` slot with the same
LoRA config: methods that combine two adapters (FedDPA's global + local adapter) load the second one there
and mix the two with PEFT's per-adapter scales.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

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


def _ensure_slot(base: BaseModel, slot: str) -> None:
    if slot not in base.model.peft_config:
        training = base.model.training
        base.model.add_adapter(slot, base.lora)
        base.model.train(training)  # the new slot's dropout modules start in training mode
        base.model.set_adapter(SLOT)
        for name, parameter in base.model.named_parameters():
            if f".{slot}." in name:
                parameter.data = parameter.data.float()
                parameter.requires_grad_(False)


def set_adapter(base: BaseModel, arrays: Mapping[str, np.ndarray], slot: str = SLOT) -> None:
    """Load adapter weights into a slot (in place: the base model is never reloaded)."""
    _ensure_slot(base, slot)
    state = {key: torch.from_numpy(np.asarray(value, dtype=np.float32)) for key, value in arrays.items()}
    result = set_peft_model_state_dict(base.model, state, adapter_name=slot)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise ValueError(f"adapter has keys the model does not: {unexpected[:3]}")


def fresh_adapter(base: BaseModel, seed: int) -> Arrays:
    """A newly initialised adapter (PEFT's init: random A, zero B), reproducible from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in base.model.modules():
            if hasattr(module, "reset_lora_parameters") and SLOT in getattr(module, "lora_A", {}):
                module.reset_lora_parameters(SLOT, True)
    return get_adapter(base)


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
