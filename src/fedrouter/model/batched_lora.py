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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

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
        # Layers with the same slots, ranks and scalings share one ``block`` and one ``scaling`` tensor, so that
        # ``adders`` makes each row's selection once for all of them (usually once for the whole model).
        shared: dict[tuple, torch.Tensor] = {}
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
            block = shared.setdefault(("block", a.device, *block.tolist()), block)
            scaling = shared.setdefault(("scaling", a.device, *scaling.tolist()), scaling.to(a.device))
            self.layers[module] = _Layer(a, b, block, scaling)

    def adders(self, adapters: Sequence[str]) -> dict[LoraLayer, Callable[[torch.Tensor], torch.Tensor]]:
        """For each adapted layer, the function of its input ``x`` (``[rows, ..., in]``) that gives what row i's
        adapter ``adapters[i]`` (a slot of this stack, or ``BASE`` for none) adds to its output (in the stack's
        dtype); empty when no row has an adapter."""
        unknown = sorted(set(adapters) - set(self.index) - {BASE})
        if unknown:
            raise ValueError(f"no adapter slot named {unknown[0]!r} (slots: {', '.join(self.slots)})")
        if not self.layers or not any(a in self.index for a in adapters):
            return {}
        device = next(iter(self.layers.values())).a.device
        rows = torch.tensor([self.index.get(a, len(self.slots)) for a in adapters], device=device)
        adds, selections = {}, {}
        for module, layer in self.layers.items():
            key = (id(layer.block), id(layer.scaling))  # every layer's ``a`` has the stack's one dtype
            if key not in selections:
                own = (layer.block[None, :] == rows[:, None]).to(layer.a.dtype)[:, None, :]  # [rows, 1, ranks]
                selections[key] = own, layer.scaling[rows][:, None, None]  # and [rows, 1, 1]
            adds[module] = partial(_delta, layer, *selections[key])
        return adds

    @contextmanager
    def applied(self, adapters: Sequence[str]) -> Iterator[None]:
        """While the block runs, each adapted layer adds row i's adapter ``adapters[i]`` (a slot of this stack,
        or ``BASE`` for none) to its output; the model itself must run without its own adapters."""
        handles = [module.register_forward_hook(_adds(add)) for module, add in self.adders(adapters).items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _delta(layer: _Layer, own: torch.Tensor, scaling: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    hidden = torch.nn.functional.linear(x.to(layer.a.dtype), layer.a) * own
    return torch.nn.functional.linear(hidden, layer.b) * scaling


def _adds(add: Callable[[torch.Tensor], torch.Tensor]):
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + add(args[0]).to(output.dtype)

    return hook
