"""Task discovery as a run is configured: how samples are embedded and how clients and server cluster them.

The client, the server, the router and the benchmarks all go through these functions, so every one of them
embeds and clusters the same way for the same ``cluster.*`` settings. The defaults and what they were chosen on:
``benchmarks/task_discovery.py`` (results in ``benchmarks/results/task-discovery.md``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedrouter.algorithm.clustering import (
    SilhouetteKMeans,
    ThresholdAgglomerative,
    centred_local_clusters,
    global_clusters,
    local_clusters,
)
from fedrouter.config import Config

if TYPE_CHECKING:  # the server clusters centroids without importing torch
    from fedrouter.model.loading import BaseModel


@dataclass(frozen=True)
class EmbeddingSpace:
    """Where a run's embeddings live: one hidden layer, mean-pooled, optionally divided by a per-dimension scale."""

    layer: int  # hidden-state index (the model's layer count: the last layer, after its final norm)
    scale: np.ndarray | None  # one positive number per dimension, or None

    def embed(self, base: BaseModel, texts: list[str], *, batch_size: int = 32, max_len: int = 256) -> np.ndarray:
        from fedrouter.model import compute

        return compute.embed(base, texts, batch_size=batch_size, max_len=max_len, layer=self.layer, scale=self.scale)


_LOCK = threading.Lock()  # simulated clients share one model across threads


def embedding_space(base: BaseModel, depth: float, scale: str) -> EmbeddingSpace:
    """The space of settings ``cluster.embed_depth`` and ``cluster.embed_scale``, computed once per loaded model.

    The reference scale depends only on the model (``compute.reference_scale``), so every client and the router
    find the same one without exchanging anything.
    """
    from fedrouter.model import compute

    if scale not in ("reference", "none"):
        raise ValueError(f"embedding scale {scale!r}: expected 'reference' or 'none'")
    layer = compute.embedding_layer(base, depth)
    key = ("embedding space", layer, scale)
    with _LOCK:
        if key not in base.derived:
            base.derived[key] = EmbeddingSpace(
                layer, compute.reference_scale(base, layer) if scale == "reference" else None
            )
        return base.derived[key]


def embed(base: BaseModel, cfg: Config, texts: list[str]) -> np.ndarray:
    """``texts`` embedded in the run's space, with the run's batch size and length limit."""
    space = embedding_space(base, cfg["cluster.embed_depth"], cfg["cluster.embed_scale"])
    return space.embed(base, texts, batch_size=cfg["model.embed_batch_size"], max_len=cfg["model.max_seq_len"])


def cluster_samples(cfg: Config, embeddings: np.ndarray, what: str = "samples") -> SilhouetteKMeans:
    """One client's local clusters (``cluster.local_*``); ``centers_`` are mean embeddings in either space."""
    settings = {
        "k": cfg.cluster_k("cluster.local_k"),
        "k_max": cfg["cluster.local_k_max"],
        "threshold": cfg["cluster.local_threshold"],
        "seed": cfg["run.seed"],
        "what": what,
    }
    if cfg["cluster.local_space"] == "centred":
        return centred_local_clusters(embeddings, **settings)
    return local_clusters(embeddings, **settings)


def cluster_spreads(embeddings: np.ndarray, labels: np.ndarray, num: int) -> np.ndarray:
    """Each local cluster's RMS distance of its samples to their mean (what the server's noise check needs)."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    spreads = np.zeros(num, dtype=np.float64)
    for j in range(num):
        members = embeddings[labels == j]
        if len(members):
            spreads[j] = np.sqrt(((members - members.mean(0)) ** 2).sum(1).mean())
    return spreads


def cluster_centroids(
    cfg: Config, centroids: np.ndarray, counts: np.ndarray, spreads: np.ndarray | None = None
) -> SilhouetteKMeans | ThresholdAgglomerative:
    """The server's global clusters of all local centroids (``cluster.global_*``), weighted by their counts.

    A number in ``cluster.global_k`` always means K-Means with that k; ``cluster.global_method`` says how k is
    found otherwise.
    """
    weights = np.asarray(counts, dtype=np.float64)
    if cfg["cluster.global_method"] == "agglomerative" and cfg["cluster.global_k"] == "auto":
        fitted = ThresholdAgglomerative(threshold=cfg["cluster.global_threshold"])
        return fitted.fit(centroids, sample_weight=weights, spreads=spreads)
    return global_clusters(
        centroids,
        weights,
        k=cfg.cluster_k("cluster.global_k"),
        k_max=cfg["cluster.global_k_max"],
        threshold=cfg["cluster.silhouette_threshold"],
        seed=cfg["run.seed"],
        metric=cfg["cluster.global_metric"],
    )
