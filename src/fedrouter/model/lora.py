"""Adapter weights as NumPy arrays in PEFT's own key format, switched in and out of the model's slot."""

from __future__ import annotations

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fedrouter.model.loading import BaseModel

Arrays = dict[str, np.ndarray]


def get_adapter(base: BaseModel) -> Arrays:
    """The slot's LoRA weights (only LoRA A/B matrices, float32), keyed as PEFT saves them."""
    state = get_peft_model_state_dict(base.model)
    return {key: tensor.detach().float().cpu().numpy().copy() for key, tensor in state.items()}


def adapter_shapes(base: BaseModel) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in get_peft_model_state_dict(base.model).items()}


def set_adapter(base: BaseModel, arrays: Arrays) -> None:
    """Load adapter weights into the slot (in place: the base model is never reloaded)."""
    state = {key: torch.from_numpy(np.asarray(value, dtype=np.float32)) for key, value in arrays.items()}
    result = set_peft_model_state_dict(base.model, state)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise ValueError(f"adapter has keys the model does not: {unexpected[:3]}")


def fresh_adapter(base: BaseModel, seed: int) -> Arrays:
    """A newly initialised adapter (PEFT's init: random A, zero B), reproducible from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in base.model.modules():
            if hasattr(module, "reset_lora_parameters") and "default" in getattr(module, "lora_A", {}):
                module.reset_lora_parameters("default", True)
    return get_adapter(base)
