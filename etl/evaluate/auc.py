"""Binary ROC AUC from ranks, shared by slide-level evaluation and the trainer's validation.

The AUC is the Mann-Whitney U statistic over (positive, negative) pairs: ties count one half,
so it equals scikit-learn's ``roc_auc_score`` on any scores. NaN when a class is missing.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["binary_auc"]


def binary_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC from ranks (Mann-Whitney U), ties averaged; NaN when one class is missing."""
    positive = np.asarray(labels).reshape(-1) >= 0.5
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(
        np.asarray(scores, np.float64).reshape(-1), return_inverse=True, return_counts=True
    )
    ends = np.cumsum(counts)
    mean_rank = (ends - counts + 1 + ends) / 2.0  # 1-based average rank of each tie group
    rank_sum = mean_rank[inverse.reshape(-1)][positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
