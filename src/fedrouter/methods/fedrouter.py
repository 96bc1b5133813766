"""FedRouter: one adapter per global task cluster, trained by the local clusters mapped to it, routed per sample.

Talasso et al., "Task-Centric Personalized Federated Fine-Tuning of Language Models" (2026); see
``docs/ALGORITHM.md`` of the benchmark for the behaviour and the fixes to the authors' code.
"""

from __future__ import annotations

from fedrouter.algorithm.scheduling import balanced_offsets, scheduled_clusters
from fedrouter.config import Config
from fedrouter.methods.base import Arrays, ClientClusters, Job, Method


class FedRouter(Method):
    name = "fedrouter"
    clustering = "kmeans"
    serving = "route"
    paper = "Talasso et al. 2026"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self._offsets: dict[int, int] = {}  # round-robin starting point per client id, set by ``schedule``

    def shared_adapters(self, initial: Arrays, num_global: int) -> dict[str, Arrays]:
        return {str(g): dict(initial) for g in range(num_global)}

    def schedule(self, clients: list[ClientClusters]) -> None:
        """Round-robin starting points that spread each round's updates over the global clusters.

        Clients scheduled before keep their offsets; only a newcomer (a late joiner) gets one chosen around them.
        """
        fixed = {i: self._offsets[c.client_id] for i, c in enumerate(clients) if c.client_id in self._offsets}
        offsets = balanced_offsets([c.assignment for c in clients], self.cfg["run.rounds"], fixed)
        self._offsets = {c.client_id: offset for c, offset in zip(clients, offsets, strict=True)}

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        offset = self._offsets.get(client.client_id, 0)  # 0: plain round-robin, for a client not yet scheduled
        scheduled = scheduled_clusters(self.cfg["train.schedule"], len(client.counts), round_index, offset)
        return [
            Job(name=str(local), shared=str(int(client.assignment[local])), local_cluster=local) for local in scheduled
        ]
