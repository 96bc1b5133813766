"""Oracle router: FedRouter with perfect clusters (the true task labels) and routing by the true label.

An upper bound for FedRouter's clustering and routing: what the task-centric adapters reach when no sample is
mis-clustered or mis-routed. It uses labels a real deployment does not have.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord

from fedrouter.algorithm.clustering import cluster_means
from fedrouter.algorithm.routing import route
from fedrouter.config import Config
from fedrouter.federated.records import ReplyError, check_name
from fedrouter.methods.base import ClientClusters, Method, Serving
from fedrouter.methods.fedrouter import FedRouter, assign_global
from fedrouter.methods.registry import register


@register
class Oracle(FedRouter):
    name = "oracle"
    title = "Oracle router (true task)"
    paper = "upper bound (not in a paper)"
    kind = "upper bound"

    @classmethod
    def check(cls, cfg: Config) -> str | None:
        if not cfg["eval.report_labels"]:
            return "setting 'run.method' = 'oracle' routes by the true task labels, so it needs 'eval.report_labels' = true"
        return None

    modes = Method.__dict__["modes"]  # one mode, named after the method: FedRouter's local/global do not apply

    @classmethod
    def routing_label(cls, mode: str) -> str | None:
        return "task"

    @classmethod
    def table_rows(cls) -> list[tuple[str | None, str]]:
        return [("task", cls.title)]

    def _cluster(self, embeddings: np.ndarray, data) -> tuple[np.ndarray, np.ndarray, dict]:
        """The local clusters are the true tasks; their centroids are the tasks' mean embeddings."""
        held = sorted({s.task for s in data.train})
        labels = np.array([held.index(s.task) for s in data.train], dtype=np.int64)
        centroids = np.stack([embeddings[labels == i].mean(0) for i in range(len(held))]).astype(np.float32)
        return labels, centroids, {}

    def refine_rounds(self) -> int:
        return 0

    def local_k_limit(self, num_tasks: int) -> int:
        return num_tasks

    def group_clusters(self, clients: list[ClientClusters]) -> tuple[np.ndarray, dict]:
        """One global cluster per task, centred on the mean of its local centroids."""
        tasks = sorted({t for c in clients for t in c.tasks})
        labels = np.concatenate([[tasks.index(t) for t in c.tasks] for c in clients]).astype(np.int64)
        centroids = np.concatenate([c.centroids for c in clients])
        counts = np.concatenate([c.counts for c in clients]).astype(np.float64)
        assign_global(clients, labels)
        return cluster_means(centroids, labels, counts).astype(np.float32), {}

    def serving_records(self, clients: list[ClientClusters], centers: np.ndarray, table: np.ndarray, tasks) -> dict:
        """Besides the routing, each global cluster's majority task: the adapter of a sample's true task."""
        records = super().serving_records(clients, centers, table, tasks)
        majority = [tasks[int(row.argmax())] for row in table]
        for content in records.values():
            content["adapter_tasks"] = ConfigRecord({"tasks": majority})
        return records

    def read_serving(self, content, keys: list[str], local, who: str) -> dict:
        extra = super().read_serving(content, keys, local, who)
        tasks = [check_name(t, f"{who} task") for t in content.config_records["adapter_tasks"]["tasks"]]
        if len(tasks) != len(keys):
            raise ReplyError(f"{who}: {len(tasks)} task names for {len(keys)} adapters")
        return extra | {"tasks": tasks}

    def serve(self, serving: Serving, samples, modes: list[str]) -> dict[str, list[tuple]]:
        """The adapter of the sample's true task (the oracle's definition: the only rule that reads a label);
        a task no global cluster holds goes to the nearest global centroid."""
        from fedrouter import discovery

        tasks = serving.extra["tasks"]
        embedded = discovery.embed(serving.base, self.cfg, [s.instruction for s in samples])
        nearest = route(embedded, mode="global", global_centroids=serving.extra["global_centroids"])
        keys = [
            ("shared", str(tasks.index(s.task) if s.task in tasks else int(g)))
            for s, g in zip(samples, nearest, strict=True)
        ]
        return {mode: keys for mode in modes}
