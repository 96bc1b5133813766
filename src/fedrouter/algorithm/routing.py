"""The evaluation router: which global cluster's adapter serves each test sample (NumPy only)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedrouter.algorithm.clustering import nearest

MODES = ("local", "global")


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
