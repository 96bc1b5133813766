"""Every row of a batch on its own LoRA adapter, in two matrix products per adapted layer.

PEFT's mixed-adapter inference (``adapter_names=``) runs, in every adapted layer, one product pair, one gather
and one scatter per adapter in the batch. With 4 adapters on the embedded model that is 480 small products per
decoded token, and measured (``benchmarks/decode_step.py``) it doubled a 16-row decode step over the base model
alone. ``Stack`` instead puts every slot's A matrices side by side (``[sum of ranks, in]``) and its B matrices
likewise (``[out, sum of ranks]``): a layer's adapter output for all rows is then ``((x @ A.T) * own) @ B.T *
scaling``, where ``own`` keeps only each row's own adapter's columns (exact zeros elsewhere, so the sum over
ranks adds nothing of another adapter). It is the stacked-weights idea of S-LoRA and Punica (vLLM's multi-LoRA
kernels), in plain PyTorch for the CPU and any device.

Each row computes what PEFT computes for it, in the same order and dtype: ``A`` then ``B`` (in the autocast
dtype when the model runs under autocast, as PEFT's slots are cast there), the scaling after ``B``, the sum
added to the base layer's output.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

from fedrouter.model.loading import BaseModel

BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch (``decoding.BASE``)


@dataclass
class _Layer:
    """One adapted layer's adapters, stacked: rows of ``a`` and columns of ``b`` in blocks, one per slot."""

    a: torch.Tensor  # [sum of ranks, in]
    b: torch.Tensor  # [out, sum of ranks]
    block: torch.Tensor  # [sum of ranks]: the slot index of each rank column
    scaling: torch.Tensor  # [slots + 1]: each slot's scaling, 0 for a row on no slot (the last index)


class Stack:
    """The LoRA weights of ``slots`` in every adapted layer of ``base``, read once (the slots must not change
    while a stack is in use: a ``decoding.Batch`` builds one for its life)."""

    def __init__(self, base: BaseModel, slots: Sequence[str]) -> None:
        self.slots = list(slots)
        self.index = {slot: i for i, slot in enumerate(self.slots)}
        dtype = base.dtype  # the autocast dtype (the model's own in fp32, where autocast is off)
        self.layers: dict[LoraLayer, _Layer] = {}
        for module in base.model.modules():
            if not isinstance(module, LoraLayer) or not any(s in module.lora_A for s in self.slots):
                continue
            held = [(i, s) for i, s in enumerate(self.slots) if s in module.lora_A]
            a = torch.cat([module.lora_A[s].weight for _, s in held]).to(dtype)
            b = torch.cat([module.lora_B[s].weight for _, s in held], dim=1).to(dtype)
            block = torch.cat(
                [torch.full((module.lora_A[s].weight.shape[0],), i, dtype=torch.long) for i, s in held]
            ).to(a.device)
            scaling = torch.zeros(len(self.slots) + 1, dtype=torch.float32)
            for i, s in held:
                scaling[i] = module.scaling[s]
            self.layers[module] = _Layer(a, b, block, scaling.to(a.device))

    @contextmanager
    def applied(self, adapters: Sequence[str]) -> Iterator[None]:
        """While the block runs, each adapted layer adds row i's adapter ``adapters[i]`` (a slot of this stack,
        or ``BASE`` for none) to its output; the model itself must run without its own adapters."""
        unknown = sorted(set(adapters) - set(self.index) - {BASE})
        if unknown:
            raise ValueError(f"no adapter slot named {unknown[0]!r} (slots: {', '.join(self.slots)})")
        device = next(iter(self.layers.values())).a.device if self.layers else torch.device("cpu")
        rows = torch.tensor([self.index.get(a, len(self.slots)) for a in adapters], device=device)
        handles = []
        try:
            for module, layer in self.layers.items() if any(a in self.index for a in adapters) else ():
                own = (layer.block[None, :] == rows[:, None]).to(layer.a.dtype)[:, None, :]  # [rows, 1, ranks]
                scaling = layer.scaling[rows][:, None, None]  # [rows, 1, 1]
                handles.append(module.register_forward_hook(_adds(layer, own, scaling)))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _adds(layer: _Layer, own: torch.Tensor, scaling: torch.Tensor):
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        hidden = torch.nn.functional.linear(x.to(layer.a.dtype), layer.a) * own
        delta = torch.nn.functional.linear(hidden, layer.b) * scaling
        return output + delta.to(output.dtype)

    return hook
