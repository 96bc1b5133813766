"""FedSA: LoRA A matrices are shared (FedAvg), B matrices stay on the client.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning" (ICLR 2025): A learns
general knowledge and is aggregated; B captures client-specific knowledge and is never uploaded. A client
answers with the global A and its own B.
"""

from __future__ import annotations

from fedrouter.methods.base import ClientClusters, Job, Method
from fedrouter.methods.registry import register


@register
class FedSA(Method):
    name = "fedsa"
    title = "FedSA"
    paper = "Guo et al. 2025"
    order = 4
    client_personalized = True
    personal_state = True
    shared_part = "lora_A"

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        return [Job(name="global", shared="global", personal="local", part="lora_A")]

    def serve(self, serving, samples, modes: list[str]) -> dict[str, list[tuple]]:
        return {mode: [("overlay",)] * len(samples) for mode in modes}  # its own B under the global A
