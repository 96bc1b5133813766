"""FedRouter: one adapter per global task cluster, trained by the local clusters mapped to it, routed per sample.

Talasso et al., "Task-Centric Personalized Federated Fine-Tuning of Language Models" (2026); see
``docs/ALGORITHM.md`` of the benchmark for the behaviour and the fixes to the authors' code.
"""

from __future__ import annotations

from fedrouter.algorithm.scheduling import scheduled_clusters
from fedrouter.methods.base import Arrays, ClientClusters, Job, Method


class FedRouter(Method):
    name = "fedrouter"
    clustering = "kmeans"
    serving = "route"
    paper = "Talasso et al. 2026"

    def shared_adapters(self, initial: Arrays, num_global: int) -> dict[str, Arrays]:
        return {str(g): dict(initial) for g in range(num_global)}

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        scheduled = scheduled_clusters(self.cfg["train.schedule"], len(client.counts), round_index, client.client_id)
        return [
            Job(name=str(local), shared=str(int(client.assignment[local])), local_cluster=local) for local in scheduled
        ]
