"""Local and global clustering: K-Means with k fixed or chosen by silhouette score, and threshold agglomerative.

Estimator-like (``fit`` / ``predict``, fitted state ends in ``_``), NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.metrics import silhouette_score

from fedrouter.errors import ClusteringError


class FittedCentres:
    """What every fitted clustering here offers: its ``centers_``, their number, and the nearest one of a point."""

    centers_: np.ndarray

    @property
    def n_clusters_(self) -> int:
        return len(self.centers_)

    def predict(self, points: np.ndarray) -> np.ndarray:
        return nearest(points, self.centers_)


@dataclass
class SilhouetteKMeans(FittedCentres):
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
        points = checked_points(points, self.what)
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


def checked_points(points: np.ndarray, what: str) -> np.ndarray:
    """``points`` as a float64 array, or a `ClusteringError` naming ``what`` if it is not finite, 2-D, non-empty."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or len(points) == 0:
        raise ClusteringError(f"{what}: expected a non-empty 2-D array, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ClusteringError(f"{what}: contain NaN or infinite values")
    return points


def cluster_means(points: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The (weighted) mean of the points of each label ``0..labels.max()``, one row per label."""
    points = np.asarray(points, dtype=np.float64)
    groups = range(int(labels.max()) + 1)
    if weights is None:
        return np.stack([points[labels == g].mean(0) for g in groups])
    weights = np.asarray(weights, dtype=np.float64)
    return np.stack([np.average(points[labels == g], axis=0, weights=weights[labels == g]) for g in groups])


def squared_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(points, centers) squared Euclidean distances, in float64."""
    points = np.asarray(points, dtype=np.float64)
    centers = np.asarray(centers, dtype=np.float64)
    return ((points[:, None, :] - centers[None, :, :]) ** 2).sum(-1)


def nearest(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest center (Euclidean) for every point."""
    return squared_distances(points, centers).argmin(1)


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
    search.centers_ = cluster_means(points, search.labels_, weights)
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


def centred_directions(points: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Unit vectors from the points' (weighted) mean to each point; a point at the mean gets the zero vector.

    Language-model embeddings share a large common component: the angle between two raw embeddings says little
    about their difference, the angle seen from the group's mean says more (``benchmarks/task_discovery.py``).
    """
    points = np.asarray(points, dtype=np.float64)
    offsets = points - np.average(points, axis=0, weights=weights)
    norms = np.linalg.norm(offsets, axis=1, keepdims=True)
    return np.divide(offsets, norms, out=np.zeros_like(offsets), where=norms > 1e-12 * max(1.0, norms.max()))


def centred_local_clusters(
    embeddings: np.ndarray, *, k: int | str, k_max: int, threshold: float, seed: int, what: str = "samples"
) -> SilhouetteKMeans:
    """One client's clusters found on its centred directions; centroids and routing stay in the embedding space.

    The silhouette search (``SilhouetteKMeans``, k=1 reachable below ``threshold``) runs on
    `centred_directions` of the client's embeddings; ``centers_`` are then the mean embedding of each cluster,
    so what a client uploads and how a sample is routed are unchanged.
    """
    points = np.asarray(embeddings, dtype=np.float64)
    search = SilhouetteKMeans(k=k, k_max=k_max, threshold=threshold, random_state=seed, what=what)
    if points.ndim != 2 or len(points) == 0 or not np.isfinite(points).all():
        return search.fit(points)  # fit() names what is wrong with the input
    search.fit(centred_directions(points))
    search.centers_ = cluster_means(points, search.labels_)
    return search


@dataclass
class ThresholdAgglomerative(FittedCentres):
    """Average-linkage agglomerative clustering of local centroids, cut at a cosine distance (no k to choose).

    The centroids are compared by the angle between their `centred_directions` (centred on the count-weighted
    mean of all centroids); two groups merge while their mean pairwise cosine distance is below ``threshold``,
    so a task held by one client only stays its own cluster and a task held by many clients is one. Identical
    centroids always share a cluster. ``centers_`` are the count-weighted means of the members' centroids (in the
    embedding space, where routing compares them).

    Seen from their mean, centroids that all come from one distribution point in random directions and would
    never merge. With ``spreads`` (each local cluster's RMS distance of its samples to its centroid) the fit first
    asks whether the centroids differ more than sampling noise: if no centroid lies farther from the mean than
    ``noise_factor`` x its standard error (``spread / sqrt(count)``), every centroid is one cluster.
    """

    threshold: float = 0.4
    noise_factor: float = 2.0
    what: str = "local centroids"

    centers_: np.ndarray = field(init=False, repr=False)
    labels_: np.ndarray = field(init=False, repr=False)
    scores_: dict[int, float] = field(init=False, repr=False)  # no search: always empty (as SilhouetteKMeans')

    def fit(
        self, points: np.ndarray, sample_weight: np.ndarray | None = None, spreads: np.ndarray | None = None
    ) -> ThresholdAgglomerative:
        points = checked_points(points, self.what)
        if not 0 < self.threshold <= 2:
            raise ClusteringError(f"{self.what}: threshold {self.threshold} is not a cosine distance in (0, 2]")
        weights = np.ones(len(points)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != (len(points),) or not (weights > 0).all():
            raise ClusteringError(f"{self.what}: expected one positive weight per point, got shape {weights.shape}")
        self.scores_ = {}
        distinct, inverse = np.unique(points, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        if len(distinct) == 1 or (spreads is not None and self._within_noise(points, weights, spreads)):
            groups = np.zeros(len(distinct), dtype=np.int64)
        else:
            directions = centred_directions(distinct, np.bincount(inverse, weights=weights))
            distances = np.clip(1.0 - directions @ directions.T, 0.0, 2.0)
            np.fill_diagonal(distances, 0.0)
            model = AgglomerativeClustering(
                n_clusters=None, distance_threshold=self.threshold, metric="precomputed", linkage="average"
            )
            groups = model.fit_predict(distances).astype(np.int64)
        self.labels_ = groups[inverse]
        self.centers_ = cluster_means(points, self.labels_, weights)
        return self

    def _within_noise(self, points: np.ndarray, weights: np.ndarray, spreads: np.ndarray) -> bool:
        spreads = np.asarray(spreads, dtype=np.float64)
        if spreads.shape != (len(points),) or not (np.isfinite(spreads).all() and (spreads >= 0).all()):
            raise ClusteringError(f"{self.what}: expected one spread >= 0 per point, got shape {spreads.shape}")
        offsets = np.linalg.norm(points - np.average(points, axis=0, weights=weights), axis=1)
        errors = spreads / np.sqrt(weights)
        return bool((offsets <= self.noise_factor * errors).all())


def refine_local_clusters(
    embeddings: np.ndarray,
    labels: np.ndarray,
    centers: np.ndarray,
    *,
    share: float = 0.3,
    k_max: int | None = None,
    what: str = "samples",
) -> np.ndarray:
    """Split each local cluster whose samples the global centroids tell apart; new labels, one per sample.

    A client with two similar tasks may keep them in one local cluster (its silhouette search sees too few
    samples of each to call them two), while other clients, holding each task with a different partner, found
    both. Their global centroids then tell the two apart: each sample goes to its nearest global centroid, as
    routing sends it, and when two or more global centroids are each nearest to at least ``share`` of a local
    cluster's samples, the cluster is split by K-Means on its samples started from those centroids. A split is
    kept only if every part holds at least two samples and the client stays within ``k_max`` local clusters;
    an unsplit cluster keeps its samples. Clusters keep their order; a split cluster's parts take its place.
    """
    points = checked_points(embeddings, what)
    labels = np.asarray(labels, dtype=np.int64)
    centers = checked_points(centers, "global centroids")
    if labels.shape != (len(points),) or labels.min() < 0:
        raise ClusteringError(f"{what}: expected one label >= 0 per sample, got shape {labels.shape}")
    if centers.shape[1] != points.shape[1]:
        raise ClusteringError(f"global centroids have {centers.shape[1]} dimensions, {what} have {points.shape[1]}")
    if not 0 < share <= 0.5:
        raise ClusteringError(f"refinement share {share} is not in (0, 0.5]")
    num = int(labels.max()) + 1
    parts = []
    for j in range(num):
        members = np.flatnonzero(labels == j)
        parts.append(_split(points[members], centers, share) if len(members) else np.zeros(0, dtype=np.int64))
    extra = sum(int(p.max()) for p in parts if len(p))
    if k_max is not None and num + extra > k_max:  # keep the largest splits that fit
        for j in sorted(range(num), key=lambda j: len(parts[j])):
            if num + extra <= k_max:
                break
            if len(parts[j]) and parts[j].max() > 0:
                extra -= int(parts[j].max())
                parts[j] = np.zeros_like(parts[j])
    refined = np.zeros(len(points), dtype=np.int64)
    nxt = 0
    for j in range(num):
        members = np.flatnonzero(labels == j)
        refined[members] = parts[j] + nxt
        nxt += int(parts[j].max()) + 1 if len(parts[j]) else 0
    return refined


def _split(points: np.ndarray, centers: np.ndarray, share: float) -> np.ndarray:
    """One local cluster's parts (0..n-1) by the global centroids nearest to ``share`` of it; zeros if none."""
    counts = np.bincount(nearest(points, centers), minlength=len(centers))
    chosen = np.flatnonzero(counts >= max(share * len(points), 2))
    if len(chosen) < 2:
        return np.zeros(len(points), dtype=np.int64)
    model = KMeans(n_clusters=len(chosen), init=centers[chosen], n_init=1).fit(points)
    _, parts = np.unique(model.labels_, return_inverse=True)
    sizes = np.bincount(parts)
    if len(sizes) < 2 or sizes.min() < 2:
        return np.zeros(len(points), dtype=np.int64)
    return parts.reshape(-1).astype(np.int64)
