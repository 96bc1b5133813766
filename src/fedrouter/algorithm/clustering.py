"""Local and global clustering: K-Means with the number of clusters fixed or chosen by silhouette score.

Estimator-like (``fit`` / ``predict``, fitted state ends in ``_``), NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from fedrouter.errors import ClusteringError


@dataclass
class SilhouetteKMeans:
    """K-Means whose k is fixed (``k=int``) or chosen by the best silhouette over ``2..k_max``.

    With ``k="auto"``, k=1 is chosen when no k>1 reaches ``threshold``: the points are
    then treated as one group (a single-task client). ``scores_`` keeps every k's silhouette for plots.
    """

    k: int | str = "auto"
    k_max: int = 6
    threshold: float = 0.1
    random_state: int = 0
    n_init: int = 10
    what: str = "points"  # named in error messages: "client 3's samples", "local centroids"

    centers_: np.ndarray = field(init=False, repr=False)
    labels_: np.ndarray = field(init=False, repr=False)
    scores_: dict[int, float] = field(init=False, repr=False)

    def fit(self, points: np.ndarray, sample_weight: np.ndarray | None = None) -> SilhouetteKMeans:
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 2 or len(points) == 0:
            raise ClusteringError(f"{self.what}: expected a non-empty 2-D array, got shape {points.shape}")
        if not np.isfinite(points).all():
            raise ClusteringError(f"{self.what}: contain NaN or infinite values")
        n = len(points)
        distinct = len(np.unique(points, axis=0))
        self.scores_ = {}
        if self.k != "auto":
            k = int(self.k)
            if k > n:
                raise ClusteringError(
                    f"{self.what}: {n} point(s) cannot form {k} clusters (fewer samples than clusters)"
                )
            self._fit_k(points, min(k, distinct), sample_weight)
            return self
        best_k, best_score = 1, -np.inf
        for k in range(2, min(self.k_max, n - 1, distinct) + 1):
            labels = self._fit_k(points, k, sample_weight).labels_
            score = float(silhouette_score(points, labels))
            self.scores_[k] = score
            if score > best_score:
                best_k, best_score = k, score
        if best_score < self.threshold:
            best_k = 1
        self._fit_k(points, best_k, sample_weight)
        return self

    def _fit_k(self, points: np.ndarray, k: int, sample_weight: np.ndarray | None) -> SilhouetteKMeans:
        if k <= 1:
            weights = np.ones(len(points)) if sample_weight is None else np.asarray(sample_weight, float)
            self.centers_ = (weights[:, None] * points).sum(0, keepdims=True) / weights.sum()
            self.labels_ = np.zeros(len(points), dtype=np.int64)
            return self
        model = KMeans(n_clusters=k, n_init=self.n_init, random_state=self.random_state)
        model.fit(points, sample_weight=sample_weight)
        self.centers_ = model.cluster_centers_
        self.labels_ = model.labels_.astype(np.int64)
        return self

    @property
    def n_clusters_(self) -> int:
        return len(self.centers_)

    def predict(self, points: np.ndarray) -> np.ndarray:
        return nearest(points, self.centers_)


def nearest(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest center (Euclidean) for every point."""
    points = np.asarray(points, dtype=np.float64)
    centers = np.asarray(centers, dtype=np.float64)
    distances = ((points[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    return distances.argmin(1)


def local_clusters(
    embeddings: np.ndarray,
    *,
    k: int | str,
    k_max: int,
    threshold: float,
    seed: int,
    what: str = "samples",
) -> SilhouetteKMeans:
    """Cluster one client's sample embeddings (k=1 reachable)."""
    return SilhouetteKMeans(k=k, k_max=k_max, threshold=threshold, random_state=seed, what=what).fit(embeddings)


def global_clusters(
    centroids: np.ndarray,
    counts: np.ndarray,
    *,
    k: int | str,
    k_max: int,
    threshold: float,
    seed: int,
    metric: str = "cosine",
) -> SilhouetteKMeans:
    """Cluster all clients' local centroids on the server (weighted by their sample counts).

    With ``k="auto"`` a single global cluster is chosen when no k>1 reaches ``threshold`` (every client
    holds the same task).

    ``metric="cosine"`` (the default) clusters the centroids' directions (unit-length copies: K-Means and
    silhouette then follow the angle between them, not their length) and keeps each global centroid the
    count-weighted mean of its members, so routing compares embeddings with centroids of the same kind as
    Euclidean K-Means gives. ``metric="euclidean"`` is the paper's. With many tasks, one task lying far from
    the rest can make the Euclidean silhouette prefer k=2 (that task against all others): on flan16-dual it
    found 2 global clusters for 16 tasks (clustering accuracy 11%), the cosine search 9 and 15 (54%, 81%), and
    on the paper4 splits the cosine search was as good or better (``benchmarks/clustering_embeddings.py``).
    """
    weights = np.asarray(counts, dtype=np.float64)
    search = SilhouetteKMeans(k=k, k_max=k_max, threshold=threshold, random_state=seed, what="local centroids")
    if metric == "euclidean":
        return search.fit(centroids, sample_weight=weights)
    if metric != "cosine":
        raise ClusteringError(f"unknown metric {metric!r} (expected 'euclidean' or 'cosine')")
    points = np.asarray(centroids, dtype=np.float64)
    directions = points  # not a finite 2-D array: fit() names what is wrong with it
    if points.ndim == 2 and np.isfinite(points).all():
        norms = np.linalg.norm(points, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ClusteringError("local centroids: a zero vector has no direction (cluster.global_metric='cosine')")
        directions = points / norms
    search.fit(directions, sample_weight=weights)
    members = [search.labels_ == g for g in range(search.n_clusters_)]
    search.centers_ = np.stack([np.average(points[m], axis=0, weights=weights[m]) for m in members])
    return search


def join_radius(members: np.ndarray, assignment: np.ndarray, centers: np.ndarray) -> float:
    """How far a member may lie from its global centroid: the widest global cluster's radius.

    The radius of a cluster is the largest distance from one of its local centroids to its global centroid.
    When every cluster has a single member (all radii 0), half the smallest distance between two global
    centroids stands in; with one global cluster and no spread, any point belongs to it (infinite radius).
    """
    members = np.asarray(members, dtype=np.float64)
    centers = np.asarray(centers, dtype=np.float64)
    spread = np.linalg.norm(members - centers[np.asarray(assignment)], axis=1)
    radius = float(spread.max()) if len(spread) else 0.0
    if radius > 0:
        return radius
    if len(centers) < 2:
        return float("inf")
    gaps = np.linalg.norm(centers[:, None, :] - centers[None, :, :], axis=-1)
    return float(gaps[np.triu_indices(len(centers), 1)].min()) / 2


def join_clusters(
    centroids: np.ndarray, centers: np.ndarray, radius: float, factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Place a late client's local centroids among the existing global clusters.

    A centroid joins its nearest global cluster when it lies within ``factor x radius`` of that cluster's
    centroid; otherwise it opens a new global cluster centred on itself (which later centroids of the same
    client may join by the same rule). Existing global centroids do not move, so every other client's
    routing stays as it was. Returns the global cluster of each centroid and the (possibly longer) centers.
    """
    centers = np.asarray(centers, dtype=np.float64)
    assignment = []
    for point in np.asarray(centroids, dtype=np.float64):
        distances = np.linalg.norm(centers - point, axis=1)
        g = int(distances.argmin())
        if distances[g] > factor * radius:
            centers = np.vstack([centers, point])
            g = len(centers) - 1
        assignment.append(g)
    return np.asarray(assignment, dtype=np.int64), centers
