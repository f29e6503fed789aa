import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from model.evaluation import ProgressiveValidation, log_loss, roc_auc


@given(st.lists(st.tuples(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]) | st.floats(0, 1), st.booleans()),
                min_size=2, max_size=300))
def test_auc_equals_scikit_learns_with_ties(pairs):
    scores = np.array([s for s, _ in pairs])
    labels = np.array([int(y) for _, y in pairs])
    ours = roc_auc(scores, labels)
    if labels.min() == labels.max():
        assert math.isnan(ours)
    else:
        assert abs(ours - roc_auc_score(labels, scores)) < 1e-12


def test_log_loss_equals_scikit_learns():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.99, 1000)
    y = rng.integers(0, 2, 1000)
    assert abs(log_loss(p, y) - sk_log_loss(y, p)) < 1e-9


def test_the_window_keeps_only_the_newest_pairs():
    pv = ProgressiveValidation(window=3)
    pv.update([0.1, 0.9], [1, 0])  # wrong, then pushed out
    pv.update([0.8, 0.2, 0.7], [1, 0, 1])
    assert pv.auc() == 1.0 and pv.seen == 5


@given(st.integers(1, 50), st.lists(st.lists(st.tuples(st.floats(0, 1), st.booleans()), max_size=80), max_size=12))
def test_the_window_holds_what_a_bounded_queue_of_the_same_pairs_would(window, batches):
    from collections import deque

    pv = ProgressiveValidation(window=window)
    queue: deque = deque(maxlen=window)
    for batch in batches:
        pv.update([s for s, _ in batch], [float(y) for _, y in batch])
        queue.extend((s, float(y)) for s, y in batch)
        assert list(pv.scores) == [s for s, _ in queue] and list(pv.labels) == [y for _, y in queue]
        held = pv.scores
        held[:] = -1.0  # a copy: the window is not changed through it
        assert list(pv.scores) == [s for s, _ in queue]
    assert pv.seen == sum(map(len, batches))
    scores, labels = np.array([s for s, _ in queue]), np.array([y for _, y in queue])
    want_auc, got_auc = roc_auc(scores, labels), pv.auc()
    assert (math.isnan(want_auc) and math.isnan(got_auc)) or abs(got_auc - want_auc) < 1e-12
    want_loss, got_loss = log_loss(scores, labels), pv.log_loss()
    assert (math.isnan(want_loss) and math.isnan(got_loss)) or abs(got_loss - want_loss) < 1e-12
