"""Scores: ROUGE (rouge-score), exact match, clustering accuracy and routing accuracy (NumPy only)."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linear_sum_assignment

if TYPE_CHECKING:
    from rouge_score import rouge_scorer

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
NO_TASK = "unknown"  # the task of every sample when the data has no task labels: nothing to score against


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    # Imported on first use: rouge-score pulls NLTK (1.7 s), which the command line's start need not pay.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


def rouge(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 (0-100) of one prediction, the best over its references."""
    best = dict.fromkeys(ROUGE_KEYS, 0.0)
    for reference in references:
        scores = _scorer().score(reference, prediction)
        for key in ROUGE_KEYS:
            best[key] = max(best[key], 100.0 * scores[key].fmeasure)
    return best


def _normalize(text: str) -> str:
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if the prediction equals a reference (case, punctuation and spacing ignored), else 0."""
    return 100.0 if _normalize(prediction) in {_normalize(r) for r in references} else 0.0


def matched_count(contingency: np.ndarray) -> int:
    """Samples on the best one-to-one matching of clusters (rows) to true labels (columns)."""
    contingency = np.asarray(contingency)
    if contingency.size == 0:
        return 0
    rows, cols = linear_sum_assignment(contingency, maximize=True)
    return int(contingency[rows, cols].sum())


def clustering_accuracy(contingency: np.ndarray) -> float:
    """Share of samples on the best one-to-one cluster-to-label matching (Hungarian). 0..1."""
    total = np.asarray(contingency).sum()
    return matched_count(contingency) / total if total else float("nan")


def contingency(clusters: Sequence[int], labels: Sequence[str], num_clusters: int, tasks: Sequence[str]) -> np.ndarray:
    """Counts matrix (cluster x task)."""
    index = {task: j for j, task in enumerate(tasks)}
    table = np.zeros((num_clusters, len(tasks)), dtype=np.int64)
    for cluster, label in zip(clusters, labels, strict=True):
        table[cluster, index[label]] += 1
    return table


def routing_accuracy(routed: np.ndarray, train_contingency: np.ndarray) -> float:
    """Share of test samples routed to a cluster whose majority training task is their own task.

    ``routed`` and ``train_contingency`` are (global cluster x task) count matrices over the same tasks.
    """
    routed = np.asarray(routed)
    total = routed.sum()
    if not total:
        return float("nan")
    majority = np.asarray(train_contingency).argmax(1)
    has_data = np.asarray(train_contingency).sum(1) > 0
    correct = sum(routed[g, majority[g]] for g in range(len(routed)) if has_data[g])
    return float(correct / total)
