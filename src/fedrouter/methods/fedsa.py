"""FedSA: LoRA A matrices are shared (FedAvg), B matrices stay on the client.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning" (ICLR 2025): A learns
general knowledge and is aggregated; B captures client-specific knowledge and is never uploaded. A client
answers with the global A and its own B.
"""

from __future__ import annotations

from fedrouter.methods.base import Arrays, ClientClusters, Job, Method, part_of


class FedSA(Method):
    name = "fedsa"
    serving = "overlay"
    paper = "Guo et al. 2025"
    personal_state = True

    def shared_adapters(self, initial: Arrays, num_global: int) -> dict[str, Arrays]:
        return {"global": part_of(initial, "lora_A")}

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        return [Job(name="global", shared="global", personal="local", part="lora_A")]
