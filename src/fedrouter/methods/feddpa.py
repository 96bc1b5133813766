"""FedDPA: a global adapter (FedAvg) plus a personal local adapter, mixed per test instance.

Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models" (NeurIPS 2024), the iterative
variant FedDPA-T as in the authors' code: each round a client trains the global adapter with its local adapter
mixed in (frozen, half weight), then the local adapter with the new global adapter mixed in (frozen, half
weight); only the global adapter is uploaded. At test time the instance-wise dynamic weight is
``alpha = 0.5 * mean cosine similarity`` between the test input's embedding and those of 5 random local
training inputs, and the answer uses ``(1 - alpha) * global + alpha * local`` (the client implements it).
"""

from __future__ import annotations

from fedrouter.methods.base import Arrays, ClientClusters, Job, Method


class FedDPA(Method):
    name = "feddpa"
    serving = "mix"
    paper = "Yang et al. 2024"
    personal_state = True

    def shared_adapters(self, initial: Arrays, num_global: int) -> dict[str, Arrays]:
        return {"global": dict(initial)}

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        return [
            Job(name="global", shared="global", partner="local"),
            Job(name="local", personal="local", part="none", partner="global"),
        ]


# Test-time weighting, as in the authors' code: 5 reference instances, weight capped at 0.5. Weights are rounded
# to WEIGHT_STEP so samples with equal weights share a generation batch.
INSTANCES = 5
MAX_WEIGHT = 0.5
WEIGHT_STEP = 0.05
