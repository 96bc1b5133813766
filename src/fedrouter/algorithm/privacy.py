"""Privacy options for what clients upload: noisy centroids (here), and differentially private adapter updates
(``fedrouter.federated.privacy``, a Flower mod).

What the server sees of a client's data: local centroids (the only numbers derived from its samples), per
cluster sample counts, optionally task-label counts (``eval.report_labels``), and trained adapters.

- Centroids (``privacy.centroid_clip`` C, ``privacy.centroid_noise`` sigma): every sample embedding is clipped
  to L2 norm C, each uploaded centroid is the mean of its cluster's clipped embeddings plus Gaussian noise of
  std ``sigma * C / n`` (n: the cluster's size), the Gaussian mechanism's calibration for a mean of n
  vectors bounded by C. It blurs what a centroid says about any one sample. It does not hide the cluster
  sizes, the number of clusters or the task-label counts (turn those off with ``eval.report_labels=false``),
  and no privacy budget is accounted over the run. The client keeps its exact centroids for local routing.
- Adapter updates (``privacy.update_clip``, ``privacy.update_epsilon``, ``privacy.update_delta``): Flower's
  ``LocalDpMod`` around the train handler clips each uploaded adapter's update (new minus received) to the
  norm and adds Gaussian noise for (epsilon, delta) local differential privacy per round. Composition over
  rounds is not accounted, and the noise is added to every coordinate of the adapter, so useful budgets are
  large (see ``benchmarks/results/privacy.md``).

The noise comes from the operating system's entropy, not from ``run.seed``: runs with noise do not repeat.
"""

from __future__ import annotations

import numpy as np


def private_centroids(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_clusters: int,
    clip: float,
    noise: float,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Per cluster: the mean of the embeddings clipped to L2 norm ``clip``, plus N(0, (noise x clip / n)^2)."""
    rng = rng or np.random.default_rng()
    embeddings = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    clipped = embeddings * np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    centroids = []
    for k in range(num_clusters):
        members = clipped[labels == k]
        center = members.mean(0)
        if noise > 0:
            center = center + rng.normal(0.0, noise * clip / len(members), size=center.shape)
        centroids.append(center)
    return np.stack(centroids).astype(np.float32)
