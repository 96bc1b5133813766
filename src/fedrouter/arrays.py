"""The one array-bundle type: named numpy arrays (an adapter's weights, a client's centroids and counts)."""

from __future__ import annotations

import numpy as np

Arrays = dict[str, np.ndarray]
