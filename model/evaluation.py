"""Progressive validation: score each example with the model as it was before it learned from it,
then learn; report AUC and log loss over a sliding window of the stream (River's way).

No TensorFlow: scores and labels in, figures out.

>>> pv = ProgressiveValidation(window=4)
>>> pv.update([0.9, 0.2, 0.7, 0.4], [1, 0, 1, 0])
>>> pv.auc()
1.0
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

EPS = 1e-7


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, ties counted half (as scikit-learn's `roc_auc_score`); NaN when
    only one class is present."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels) > 0.5
    pos = int(labels.sum())
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), np.float64)
    # Average rank over each run of equal scores.
    bounds = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(s)]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def log_loss(scores: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(np.asarray(scores, np.float64), EPS, 1 - EPS)
    y = np.asarray(labels, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else float("nan")


class ProgressiveValidation:
    """The last `window` (score, label) pairs, each scored before its example was learned."""

    def __init__(self, window: int = 10_000):
        self.window = window
        self.scores: deque[float] = deque(maxlen=window)
        self.labels: deque[float] = deque(maxlen=window)
        self.seen = 0

    def update(self, scores: Sequence[float], labels: Sequence[float]) -> None:
        self.scores.extend(float(s) for s in scores)
        self.labels.extend(float(y) for y in labels)
        self.seen += len(scores)

    def auc(self) -> float:
        return roc_auc(np.fromiter(self.scores, np.float64), np.fromiter(self.labels, np.float64))

    def log_loss(self) -> float:
        return log_loss(np.fromiter(self.scores, np.float64), np.fromiter(self.labels, np.float64))
