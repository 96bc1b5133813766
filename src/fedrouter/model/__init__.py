"""Model code (loading, LoRA adapters, embeddings, training, generation): torch, transformers and PEFT.

Importing this package alone does not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peft import LoraConfig

    from fedrouter.config import Config

EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def base_model_id(model_name: str) -> str:
    """The model a ``model.name`` setting means: the embedded default's Hugging Face id, or the name itself."""
    return EMBEDDED_NAME if model_name == "smollm2" else model_name


@dataclass(frozen=True)
class LoraSettings:
    """A run's LoRA adapters: the one mapping from the ``lora.*`` settings (or a router artifact's record of them)
    to PEFT's ``LoraConfig``. Frozen and hashable: the process-wide base model is keyed by it."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"LoRA rank r = {self.r!r}: expected a positive integer")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"LoRA alpha = {self.alpha!r}: expected a number >= 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout = {self.dropout!r}: expected a number in [0, 1)")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"LoRA target modules {self.target_modules!r}: expected module names")

    @classmethod
    def of(cls, cfg: Config) -> LoraSettings:
        return cls(cfg["lora.r"], float(cfg["lora.alpha"]), cfg["lora.dropout"], tuple(cfg.list("lora.target_modules")))

    @classmethod
    def from_peft_fields(cls, fields: dict) -> LoraSettings:
        """Read back `peft_fields` (a router artifact's ``lora``); a missing or malformed field is a ValueError."""
        try:
            return cls(
                fields["r"],
                float(fields["lora_alpha"]),
                float(fields["lora_dropout"]),
                tuple(fields["target_modules"]),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"LoRA settings {fields!r}: expected r, lora_alpha, lora_dropout, target_modules") from err

    def peft_fields(self) -> dict:
        """The settings under PEFT's own names (what a router artifact records)."""
        return {
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(self.target_modules),
        }

    def peft_config(self, base_model: str) -> LoraConfig:
        """PEFT's config of these adapters on ``base_model`` (its Hugging Face id or folder)."""
        from peft import LoraConfig

        return LoraConfig(**self.peft_fields(), task_type="CAUSAL_LM", base_model_name_or_path=base_model)
