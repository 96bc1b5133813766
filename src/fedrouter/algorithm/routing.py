"""The evaluation router: which global cluster's adapter serves each test sample, and the fallback for a sample
far from every cluster (NumPy only).

The fallback (``routing.fallback``): each global cluster g has a radius R_g, the root mean square distance of its
training samples to its centroid C_g, computed on the server from what clients already send (``cluster_radii``).
A sample routed to g whose distance to C_g exceeds ``routing.fallback_factor`` x R_g is "unlike anything g was
trained on" and goes to the fallback instead (the base model or a chosen adapter). The same rule runs in a run's
evaluation, in ``Router`` and in ``fedrouter serve``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedrouter.algorithm.clustering import nearest

MODES = ("local", "global")
FALLBACKS = ("none", "base")  # or a global cluster's index


def route(
    embeddings: np.ndarray,
    *,
    mode: str,
    global_centroids: np.ndarray,
    local_centroids: np.ndarray | None = None,
    local_to_global: Mapping[int, int] | np.ndarray | None = None,
) -> np.ndarray:
    """Global cluster index for every embedding.

    - ``local`` (personalized): nearest of the client's own local centroids, then that local cluster's
      global cluster;
    - ``global`` (generalized): nearest of all global centroids, so a client can use adapters trained by
      others on tasks it never held.
    """
    if mode == "global":
        return nearest(embeddings, global_centroids)
    if mode == "local":
        if local_centroids is None or local_to_global is None:
            raise ValueError("local routing needs the client's local centroids and its local-to-global map")
        mapping = np.asarray([local_to_global[i] for i in range(len(local_centroids))], dtype=np.int64)
        return mapping[nearest(embeddings, local_centroids)]
    raise ValueError(f"unknown routing mode {mode!r} (expected one of {MODES})")


def cluster_radii(
    global_centroids: np.ndarray,
    local_centroids: list[np.ndarray],
    counts: list[np.ndarray],
    spreads: list[np.ndarray],
    assignment: list[np.ndarray],
) -> np.ndarray:
    """Each global cluster's radius: the RMS distance of its training samples to its centroid.

    Per client: its local clusters' centroids c_l, sample counts n_l, RMS spreads s_l (each sample's distance to
    c_l) and global clusters. A local cluster's samples lie on average |c_l - C_g|^2 + s_l^2 (squared) from C_g
    (the parallel-axis rule), so R_g^2 = sum_l n_l (|c_l - C_g|^2 + s_l^2) / sum_l n_l over the local clusters
    in g: exact, from figures the server already holds. A global cluster no local cluster belongs to gets the
    largest radius of the others (it has no samples to measure).
    """
    num_global = len(global_centroids)
    sums, weights = np.zeros(num_global), np.zeros(num_global)
    for centroids, n, spread, groups in zip(local_centroids, counts, spreads, assignment, strict=True):
        groups = np.asarray(groups, dtype=np.int64)
        offsets = ((np.asarray(centroids, np.float64) - global_centroids[groups]) ** 2).sum(1)
        np.add.at(sums, groups, np.asarray(n, np.float64) * (offsets + np.asarray(spread, np.float64) ** 2))
        np.add.at(weights, groups, np.asarray(n, np.float64))
    radii = np.sqrt(sums / np.maximum(weights, 1e-12))
    empty = weights == 0
    if empty.all():
        raise ValueError("no local cluster belongs to any global cluster: nothing to measure radii on")
    radii[empty] = radii[~empty].max()
    return radii


def fall_back(
    embeddings: np.ndarray, routed: np.ndarray, global_centroids: np.ndarray, radii: np.ndarray, factor: float
) -> np.ndarray:
    """Whether each embedding, routed to global cluster ``routed[i]``, lies beyond ``factor`` x that cluster's
    radius from its centroid (``cluster_radii``): the samples the fallback answers."""
    offsets = np.asarray(embeddings, np.float64) - np.asarray(global_centroids, np.float64)[routed]
    distances = np.sqrt((offsets**2).sum(1))
    return distances > factor * radii[routed]
