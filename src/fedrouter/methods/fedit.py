"""FedIT: one LoRA adapter shared by all clients, trained on all their samples, FedAvg-weighted by sample count.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning" (ICASSP 2024).
"""

from __future__ import annotations

from fedrouter.methods.base import Arrays, ClientClusters, Job, Method


class FedIT(Method):
    name = "fedit"
    serving = "shared"
    paper = "Zhang et al. 2024"

    def shared_adapters(self, initial: Arrays, num_global: int) -> dict[str, Arrays]:
        return {"global": dict(initial)}

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        return [Job(name="global", shared="global")]
