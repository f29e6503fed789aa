"""The train step: it learns, it touches exactly the rows it pulled, and it scores before learning."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from flows.events import Example
from model.features import FeatureSpec
from model.trainer import OnlineTrainer, parameter_store

T0 = 1764288000.0
SPEC = FeatureSpec(item_slots=("author", "tags"), dense=("duration_s",), dim=8)


def examples(n: int, seed: int = 0, users: int = 30, items: int = 60) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        u, v = int(rng.integers(users)), int(rng.integers(items))
        label = int((u % 3) == (v % 3))  # a taste the towers can learn
        out.append(Example(request_id=f"r{seed}-{i}", user_id=f"u{u}", item_id=f"v{v}", ts=T0 + i,
                           label_ts=T0 + i + 1, label=label, actions=[], weight=1.0, position=0, score=None,
                           model_version=None, sparse={"author": f"a{v % 7}", "tags": [f"t{v % 5}", "all"]},
                           dense={"duration_s": float(v)}, label_received_at=T0 + i + 2))
    return out


@pytest.fixture(scope="module")
def trainer():
    return OnlineTrainer(SPEC, parameter_store(SPEC))


def test_the_step_lowers_the_loss_on_a_fixed_set_and_changes_exactly_the_pulled_rows():
    params = parameter_store(SPEC)
    t = OnlineTrainer(SPEC, params)
    batch = examples(256)
    bystanders = ["u-never", "u-other"]
    before_out = params.pull("user_id", bystanders).copy()
    in_batch = sorted({e.user_id for e in batch})
    before_in = params.pull("user_id", in_batch).copy()
    first = t.train(batch).loss
    for _ in range(60):
        last = t.train(batch).loss
    assert last < first * 0.85
    assert np.array_equal(params.pull("user_id", bystanders), before_out)
    after_in = params.pull("user_id", in_batch)
    assert (np.abs(after_in - before_in).max(axis=1) > 0).all()


def test_each_example_is_scored_before_any_gradient_from_it(trainer):
    # Ids seen twice before are admitted (scoring admits none), so both calls read the same rows.
    trainer.train(examples(2000, seed=2))
    trainer.train(examples(2000, seed=2))
    batch = examples(128, seed=3)
    expected = trainer.score(batch)
    step = trainer.train(batch)
    np.testing.assert_allclose(step.scores, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(trainer.score(batch), expected)  # and then it learned


def test_progressive_auc_equals_scikit_learns_on_the_logged_pairs():
    t = OnlineTrainer(SPEC, parameter_store(SPEC), window=100_000)
    scores, labels = [], []
    for k in range(8):
        step = t.train(examples(128, seed=10 + k))
        scores += list(step.scores)
        labels += list(step.labels)
    assert t.validation.auc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_a_logged_serving_score_is_what_progressive_validation_uses(trainer):
    batch = examples(64, seed=21)
    for i, e in enumerate(batch):
        e.score = 0.9 if e.label else 0.1 + i * 1e-4
    pv_before = trainer.validation.seen
    trainer.train(batch)
    assert list(trainer.validation.scores)[-64:] == [e.score for e in batch]
    assert trainer.validation.seen == pv_before + 64


def test_pushes_carry_the_earliest_arrival_behind_each_row():
    params = parameter_store(SPEC)
    t = OnlineTrainer(SPEC, params)
    batch = examples(50, seed=4)
    t.train(batch)
    touched = {b.slot: b for b in params.take_touched()}
    users = touched["user_id"]
    for uid, arrival in zip(users.ids, users.earliest_arrival, strict=True):
        assert arrival == min(e.label_received_at for e in batch if e.user_id == uid)


def test_the_dense_graph_exports_as_a_saved_model_that_scores_alike(tmp_path):
    import tensorflow as tf

    from model.features import make_batch

    t = OnlineTrainer(SPEC, parameter_store(SPEC))
    for k in range(3):
        t.train(examples(256, seed=30 + k))
    batch_events = examples(64, seed=40)
    expected = t.score(batch_events)
    t.model.export(tmp_path / "graph")
    loaded = tf.saved_model.load(str(tmp_path / "graph"))
    batch = make_batch(batch_events, SPEC)
    rows = {s: t.params.pull(s, batch.slots[s].ids, admit=False) for s in SPEC.slots}
    r, idx, ex, d = t.model._inputs(batch, rows, t.normalizer.apply(batch.dense))
    assert "score" in loaded.signatures
    rank, _dot, _u, _v = loaded._score(r, idx, ex, d, tf.constant(batch.size))
    np.testing.assert_allclose(tf.sigmoid(rank).numpy(), expected, rtol=1e-5, atol=1e-6)
