"""FedIT: one LoRA adapter shared by all clients, trained on all their samples, FedAvg-weighted by sample count.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (ICASSP 2024). Every hook
keeps the default of ``Method``, which is this method.
"""

from __future__ import annotations

from fedrouter.methods.base import Method
from fedrouter.methods.registry import register


@register
class FedIT(Method):
    name = "fedit"
    title = "FedIT"
    paper = "Zhang et al. 2024"
    order = 2
