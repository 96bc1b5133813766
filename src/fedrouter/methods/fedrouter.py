"""FedRouter: one adapter per global task cluster, trained by the local clusters mapped to it, routed per sample.

Talasso et al., "Task-Centric Personalized Federated Fine-Tuning of Language Models" (2026); see
``docs/ALGORITHM.md`` of the benchmark for the behaviour and the fixes to the authors' code.

A client embeds its samples and clusters them (``fedrouter.discovery``), the server clusters every client's
centroids into global clusters, each local cluster trains its global cluster's adapter, and a test sample is
answered by the adapter its embedding routes to: through the client's nearest local cluster (``local`` mode) or
the nearest global centroid (``global``).
"""

from __future__ import annotations

import time

import numpy as np

from fedrouter import discovery
from fedrouter.algorithm.clustering import join_clusters, join_radius
from fedrouter.algorithm.routing import fall_back, route
from fedrouter.algorithm.scheduling import balanced_offsets, scheduled_clusters
from fedrouter.arrays import Arrays
from fedrouter.config import Config, ConfigError
from fedrouter.federated.records import ReplyError, check_array, get_arrays, to_record
from fedrouter.methods.base import ClientClusters, Grouping, Job, Method, Serving, global_radii
from fedrouter.methods.registry import register


@register
class FedRouter(Method):
    name = "fedrouter"
    title = "FedRouter"
    paper = "Talasso et al. 2026"
    kind = "router"
    embeds = True
    routes = True

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self._offsets: dict[int, int] = {}  # round-robin starting point per client id, set by ``schedule``

    @classmethod
    def modes(cls, cfg: Config) -> list[str]:
        return ["local", "global"] if cfg["eval.routing"] == "both" else [cfg["eval.routing"]]

    @classmethod
    def routing_label(cls, mode: str) -> str | None:
        return mode

    @classmethod
    def table_rows(cls) -> list[tuple[str | None, str]]:
        return [("local", "FedRouter (local routing)"), ("global", "FedRouter (global routing)")]

    # --- grouping: embedding clusters, then global clusters of their centroids ---

    def group_samples(self, base, data) -> Grouping:
        started = time.perf_counter()
        embeddings = discovery.embed(base, self.cfg, [s.instruction for s in data.train])
        embed_s = time.perf_counter() - started
        started = time.perf_counter()
        labels, centroids, scores = self._cluster(embeddings, data)
        return Grouping(labels, embeddings, centroids, scores, embed_s, time.perf_counter() - started)

    def _cluster(self, embeddings: np.ndarray, data) -> tuple[np.ndarray, np.ndarray, dict]:
        what = f"client {data.client_id}'s {len(embeddings)} training samples"
        fitted = discovery.cluster_samples(self.cfg, embeddings, what)
        return fitted.labels_, fitted.centers_.astype(np.float32), fitted.scores_

    def refine_rounds(self) -> int:
        return discovery.refines(self.cfg)

    def refine_samples(self, local: Arrays, centers: np.ndarray, what: str) -> np.ndarray:
        return discovery.refine_samples(self.cfg, local["embeddings"], local["labels"], centers, what)

    def local_k_limit(self, num_tasks: int) -> int:
        cfg = self.cfg
        return cfg["cluster.local_k_max"] if cfg["cluster.local_k"] == "auto" else int(cfg["cluster.local_k"])

    def group_clusters(self, clients: list[ClientClusters]) -> tuple[np.ndarray, dict]:
        centroids = np.concatenate([c.centroids for c in clients])
        counts = np.concatenate([c.counts for c in clients]).astype(np.float64)
        spreads = [c.spreads for c in clients]
        all_spreads = None if any(s is None for s in spreads) else np.concatenate(spreads)
        fitted = discovery.cluster_centroids(self.cfg, centroids, counts, all_spreads)
        assign_global(clients, fitted.labels_)
        return fitted.centers_.astype(np.float32), fitted.scores_

    def join(self, clients: list[ClientClusters], centers: np.ndarray, client: ClientClusters) -> np.ndarray:
        """Each local centroid joins the nearest global cluster if it lies within ``cluster.join_factor`` x the
        widest cluster's radius of its centroid, else it opens a new global cluster."""
        members = [c for c in clients if len(c.assignment)]
        radius = join_radius(
            np.concatenate([c.centroids for c in members]), np.concatenate([c.assignment for c in members]), centers
        )
        client.assignment, centers = join_clusters(client.centroids, centers, radius, self.cfg["cluster.join_factor"])
        return centers.astype(np.float32)

    # --- rounds: each local cluster trains its global cluster's adapter ---

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

    # --- serving: route each sample by its embedding ---

    def serving_records(self, clients: list[ClientClusters], centers: np.ndarray, table: np.ndarray, tasks) -> dict:
        shared: dict[str, np.ndarray] = {"global_centroids": centers}
        fallback = self.cfg["routing.fallback"]
        if fallback != "none":
            if fallback.isdigit() and int(fallback) >= len(centers):
                raise ConfigError(
                    f"setting 'routing.fallback' = {fallback}: the run has {len(centers)} global clusters "
                    f"(0 to {len(centers) - 1})"
                )
            radii = global_radii(clients, centers)
            if radii is None:
                raise ConfigError(
                    "setting 'routing.fallback': the clusters' radii are unknown (a client sent no spreads, or the "
                    "run resumed from a checkpoint written before they were kept)"
                )
            shared["radii"] = radii
        return {
            c.client_id: {"routing": to_record(shared | {"local_to_global": c.assignment.astype(np.int64)})}
            for c in clients
        }

    def read_serving(self, content, keys: list[str], local: Arrays, who: str) -> dict:
        arrays = get_arrays(content, "routing", "server")
        width = local["centroids"].shape[1]
        centers = check_array(arrays.get("global_centroids"), "global centroids", shape=(len(keys), width))
        mapping = check_array(
            arrays.get("local_to_global"), "local-to-global map", shape=(len(local["centroids"]),), kind="i"
        )
        if ((mapping < 0) | (mapping >= len(keys))).any():
            raise ReplyError(f"{who}: local-to-global map points outside 0..{len(keys) - 1}")
        if sorted(keys) != sorted(str(g) for g in range(len(keys))):
            raise ReplyError(f"{who}: router adapters must be numbered 0..{len(keys) - 1}")
        found = {"global_centroids": centers, "local_to_global": mapping}
        if self.cfg["routing.fallback"] != "none":
            radii = check_array(arrays.get("radii"), "cluster radii", shape=(len(keys),))
            if (radii < 0).any():
                raise ReplyError(f"{who}: cluster radii must be >= 0")
            found["radii"] = radii
        return found

    def serve(self, serving: Serving, samples, modes: list[str]) -> dict[str, list[tuple]]:
        embedded = discovery.embed(serving.base, self.cfg, [s.instruction for s in samples])
        routing = serving.extra
        chosen = {}
        for mode in modes:
            routed = route(
                embedded,
                mode=mode,
                global_centroids=routing["global_centroids"],
                local_centroids=serving.local["centroids"],
                local_to_global=routing["local_to_global"],
            )
            keys = [("shared", str(int(g))) for g in routed]
            if "radii" in routing:  # routing.fallback: a sample far from its cluster goes to the fallback
                far = fall_back(
                    embedded, routed, routing["global_centroids"], routing["radii"], self.cfg["routing.fallback_factor"]
                )
                target = self.cfg["routing.fallback"]
                fallback = ("base", "base", "fallback") if target == "base" else ("shared", target, "fallback")
                keys = [fallback if f else key for key, f in zip(keys, far, strict=True)]
            chosen[mode] = keys
        return chosen


def assign_global(clients: list[ClientClusters], labels: np.ndarray) -> None:
    """Hand each client its slice of the global labels (clients' local clusters in order)."""
    offset = 0
    for client in clients:
        client.assignment = np.asarray(labels[offset : offset + len(client.centroids)], dtype=np.int64)
        offset += len(client.centroids)
