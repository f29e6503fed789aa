"""The graph's packed train step: per-slot gradients, Keras's Adam update, one trace."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from model.features import FeatureSpec, make_batch  # noqa: E402
from model.graph import TwoTowerRanker, _FusedAdam, padded_size  # noqa: E402
from tests.model.test_recommender import random_events  # noqa: E402

SPEC = FeatureSpec(user_slots=("country",), item_slots=("author", "tags"), dense=("duration_s",), dim=8)


def _batch(rng, n):
    batch = make_batch(random_events(rng, n), SPEC, labels=rng.integers(0, 2, n), weights=rng.uniform(0.5, 2, n))
    rows = {s: rng.standard_normal((len(batch.slots[s].ids), SPEC.width(s))).astype(np.float32) for s in SPEC.slots}
    return batch, rows


@pytest.mark.parametrize("seed", [0, 1])
def test_the_packed_step_gives_each_slot_the_gradient_of_its_own_rows(seed):
    rng = np.random.default_rng(seed)
    model = TwoTowerRanker(SPEC, seed=seed)
    batch, rows = _batch(rng, 24)
    dense = rng.standard_normal(batch.dense.shape).astype(np.float32)
    r, idx, ex, d = model._inputs(batch, rows, dense)
    labels, weights = tf.constant(batch.labels), tf.constant(batch.weights)
    with tf.GradientTape() as tape:  # the loss, written out over the per-slot inputs
        tape.watch(list(r.values()))
        rank, dot, _, _ = model._forward(r, idx, ex, d, tf.constant(batch.size))
        bce = tf.nn.sigmoid_cross_entropy_with_logits
        loss = tf.reduce_mean(weights * (bce(labels=labels, logits=rank) + bce(labels=labels, logits=dot)))
    want = dict(zip(r, tape.gradient(loss, list(r.values())), strict=True))
    got_loss, scores, got = model.train(batch, rows, dense)  # after the reference: it updates the weights
    assert got_loss == pytest.approx(float(loss), rel=1e-5)
    np.testing.assert_allclose(scores, tf.sigmoid(rank).numpy(), rtol=1e-5, atol=1e-6)
    assert set(got) == set(SPEC.slots)
    for s in SPEC.slots:
        assert got[s].shape == rows[s].shape, s
        np.testing.assert_allclose(got[s], tf.convert_to_tensor(want[s]).numpy(), rtol=1e-4, atol=1e-6, err_msg=s)


def test_the_fused_adam_updates_as_keras_adam():
    rng = np.random.default_rng(0)
    ours = [tf.Variable(rng.standard_normal(shape).astype(np.float32)) for shape in ((5, 3), (3,))]
    theirs = [tf.Variable(v) for v in ours]
    keras = tf.keras.optimizers.Adam(2e-3)
    keras.build(theirs)
    fused = _FusedAdam(ours, 2e-3)
    for _ in range(30):
        grads = [tf.constant(rng.standard_normal(v.shape).astype(np.float32)) for v in ours]
        fused.apply(grads, ours)
        keras.apply_gradients(zip(grads, theirs, strict=True))
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_the_step_is_traced_once_for_batches_of_any_shape():
    rng = np.random.default_rng(3)
    model = TwoTowerRanker(SPEC)
    for n in (1, 8, 5, 64):
        batch, rows = _batch(rng, n)
        model.train(batch, rows, batch.dense)
    assert model._step.experimental_get_tracing_count() == 1


def test_padded_sizes_are_few_and_never_smaller():
    sizes = [padded_size(n) for n in range(1, 5000)]
    assert all(p >= n for n, p in zip(range(1, 5000), sizes, strict=True))
    assert all(p <= max(16, 1.5 * n) for n, p in zip(range(1, 5000), sizes, strict=True))
    assert len(set(sizes)) <= 2 * (5000).bit_length()


def test_the_xla_step_on_padded_inputs_equals_the_plain_step():
    rng = np.random.default_rng(5)
    plain, xla = TwoTowerRanker(SPEC), TwoTowerRanker(SPEC, jit_compile=True)
    for n in (3, 8, 21):  # padded to other sizes each time
        batch, rows = _batch(rng, n)
        dense = rng.standard_normal(batch.dense.shape).astype(np.float32)
        np.testing.assert_allclose(xla.score(batch, rows, dense), plain.score(batch, rows, dense), rtol=1e-5, atol=1e-6)
        loss_p, scores_p, grads_p = plain.train(batch, rows, dense)
        loss_x, scores_x, grads_x = xla.train(batch, rows, dense)
        assert loss_x == pytest.approx(loss_p, rel=1e-5)
        assert scores_x.shape == (n,)
        np.testing.assert_allclose(scores_x, scores_p, rtol=1e-5, atol=1e-6)
        for s in SPEC.slots:
            assert grads_x[s].shape == rows[s].shape, s
            np.testing.assert_allclose(grads_x[s], grads_p[s], rtol=1e-4, atol=1e-6, err_msg=s)
    for a, b in zip(xla.trainable_variables, plain.trainable_variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
