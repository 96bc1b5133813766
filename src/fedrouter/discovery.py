"""Task discovery as a run is configured: how samples are embedded and how clients and server cluster them.

The client, the server, the router and the benchmarks all go through these functions, so every one of them
embeds and clusters the same way for the same ``cluster.*`` settings. The defaults and what they were chosen on:
``benchmarks/task_discovery.py`` (results in ``benchmarks/results/task-discovery.md``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

from fedrouter.algorithm.clustering import (
    SilhouetteKMeans,
    ThresholdAgglomerative,
    centred_local_clusters,
    cluster_means,
    global_clusters,
    local_clusters,
    refine_local_clusters,
)
from fedrouter.config import Config

if TYPE_CHECKING:  # the server clusters centroids without importing torch
    from fedrouter.model.loading import BaseModel


KINDS = ("prompt", "text")


@dataclass(frozen=True)
class EmbeddingSpace:
    """How a run embeds a sample's input, from its ``cluster.embed_*`` settings.

    ``kind="prompt"`` (the default): the input read as the prompt the model answers, pooled over its own tokens
    in two parts, ``(layer, edge)`` each (``compute.embed_prompts``): the mean of an early layer over every token
    (what the input is about and how it is laid out), and the mean of a middle layer over its first and last
    ``edge`` tokens (where an instruction usually sits, and where a middle layer has read the rest). Each part is
    divided by its ``scale`` and made unit length; the embedding is their concatenation.

    ``kind="text"``: the raw input text, no template, one part: the mean of one layer over every token, divided by
    its scale (the embedding before issue 19's second round of work; the paper's with depth 1.0 and no scale).
    """

    kind: str
    parts: tuple[tuple[int, int], ...]  # (hidden-state index, edge tokens; 0: every token)
    scales: tuple[np.ndarray | None, ...]  # one positive number per dimension for each part, or None

    def width(self, base: BaseModel) -> int:
        """How many numbers an embedding has: the model's hidden size per part."""
        return base.hidden_size * len(self.parts)

    def embed(self, base: BaseModel, texts: list[str], *, batch_size: int = 32, max_len: int = 256) -> np.ndarray:
        from fedrouter.model import compute

        if self.kind == "text":
            (layer, _), scale = self.parts[0], self.scales[0]
            return compute.embed(base, texts, batch_size=batch_size, max_len=max_len, layer=layer, scale=scale)
        pooled = compute.embed_prompts(base, texts, self.parts, batch_size=batch_size, max_len=max_len)
        units = []
        for points, scale in zip(pooled, self.scales, strict=True):
            if scale is not None:
                points = points / scale
            units.append(points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12))
        return np.concatenate(units, axis=1).astype(np.float32)


@dataclass(frozen=True)
class EmbeddingSettings:
    """The ``cluster.embed_*`` settings a run (and its router artifact) embeds with."""

    kind: str = "prompt"
    depth: float = 0.2
    scale: str = "reference"
    edge_depth: float = 0.6
    edge_tokens: int = 32

    @property
    def num_parts(self) -> int:
        """How many pooled parts an embedding concatenates (each the model's hidden size wide)."""
        return 2 if self.kind == "prompt" else 1

    @classmethod
    def of(cls, cfg: Config) -> EmbeddingSettings:
        return cls(
            cfg["cluster.embedding"],
            cfg["cluster.embed_depth"],
            cfg["cluster.embed_scale"],
            cfg["cluster.edge_depth"],
            cfg["cluster.edge_tokens"],
        )


_LOCK = threading.Lock()  # simulated clients share one model across threads


def embedding_space(base: BaseModel, settings: EmbeddingSettings) -> EmbeddingSpace:
    """The space of these settings for this model, computed once per loaded model.

    The reference scales depend only on the model (``compute.reference_scale``), so every client and the router
    find the same ones without exchanging anything; they are computed once per model and kept on disk
    (``model.derived``), not once per process.
    """
    from fedrouter.model import compute
    from fedrouter.model.derived import stored_arrays

    if settings.kind not in KINDS:
        raise ValueError(f"embedding kind {settings.kind!r}: expected one of {KINDS}")
    if settings.scale not in ("reference", "none"):
        raise ValueError(f"embedding scale {settings.scale!r}: expected 'reference' or 'none'")
    parts = ((compute.embedding_layer(base, settings.depth), 0),)
    if settings.kind == "prompt":
        parts += ((compute.embedding_layer(base, settings.edge_depth), settings.edge_tokens),)
    key = ("embedding space", settings.kind, parts, settings.scale)
    with _LOCK:
        if key not in base.derived:
            if settings.scale == "none":
                scales: tuple = (None,) * len(parts)
            elif settings.kind == "text":
                scales = tuple(stored_arrays(base, repr(key), lambda: [compute.reference_scale(base, parts[0][0])]))
            else:
                scales = tuple(stored_arrays(base, repr(key), lambda: compute.prompt_reference_scales(base, parts)))
            base.derived[key] = EmbeddingSpace(settings.kind, parts, scales)
        return base.derived[key]


def embed(base: BaseModel, cfg: Config, texts: list[str]) -> np.ndarray:
    """``texts`` embedded in the run's space, with the run's batch size and length limit."""
    space = embedding_space(base, EmbeddingSettings.of(cfg))
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


def refines(cfg: Config) -> int:
    """How many refinement rounds a run has: ``cluster.refine_rounds`` when k is searched, else none (a k the
    user fixed stays fixed)."""
    return cfg["cluster.refine_rounds"] if cfg["cluster.local_k"] == "auto" else 0


def refine_samples(
    cfg: Config, embeddings: np.ndarray, labels: np.ndarray, centers: np.ndarray, what: str = "samples"
) -> np.ndarray:
    """One client's local clusters split where the global centroids tell its samples apart
    (``cluster.refine_share``, at most ``cluster.local_k_max`` clusters)."""
    return refine_local_clusters(
        embeddings, labels, centers, share=cfg["cluster.refine_share"], k_max=cfg["cluster.local_k_max"], what=what
    )


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


@dataclass
class Discovery:
    """The outcome of the two-level clustering over every client: what a run's clients and server compute."""

    local_labels: list[np.ndarray]  # each client's local cluster of each of its samples
    local_centroids: list[np.ndarray]  # each client's local centroids (mean embeddings)
    assignment: list[np.ndarray]  # each client's global cluster of each of its local clusters
    global_fit: SilhouetteKMeans | ThresholdAgglomerative
    local_k_first: list[int]  # local k before refinement

    def sample_clusters(self, client: int) -> np.ndarray:
        """The global cluster of each of ``client``'s samples."""
        return self.assignment[client][self.local_labels[client]]


def discover(cfg: Config, embeddings: list[np.ndarray]) -> Discovery:
    """The run's task discovery offline, from every client's sample embeddings: local clusters, the global
    clustering of their centroids, then ``cluster.refine_rounds`` refinements, each step through the functions a
    federated run calls (clients: `cluster_samples`, `refine_samples`; server: `cluster_centroids`)."""
    labels = [cluster_samples(cfg, x).labels_ for x in embeddings]
    first = [int(lab.max()) + 1 for lab in labels]
    fitted, assignment = _global_step(cfg, embeddings, labels)
    for _ in range(refines(cfg)):
        labels = [refine_samples(cfg, x, lab, fitted.centers_) for x, lab in zip(embeddings, labels, strict=True)]
        fitted, assignment = _global_step(cfg, embeddings, labels)
    centroids = [cluster_means(x, lab) for x, lab in zip(embeddings, labels, strict=True)]
    return Discovery(labels, centroids, assignment, fitted, first)


def _global_step(cfg: Config, embeddings: list[np.ndarray], labels: list[np.ndarray]):
    centroids, counts, spreads, sizes = [], [], [], []
    for x, lab in zip(embeddings, labels, strict=True):
        k = int(lab.max()) + 1
        centroids.append(cluster_means(x, lab))
        counts.append(np.bincount(lab, minlength=k))
        spreads.append(cluster_spreads(x, lab, k))
        sizes.append(k)
    fitted = cluster_centroids(
        cfg, np.concatenate(centroids), np.concatenate(counts).astype(np.float64), np.concatenate(spreads)
    )
    bounds = np.cumsum([0, *sizes])
    return fitted, [fitted.labels_[a:b] for a, b in pairwise(bounds)]
