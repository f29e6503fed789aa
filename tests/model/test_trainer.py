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


def _hashed_store(spec: FeatureSpec):
    from paramserver.store import ParameterStore
    from paramserver.table import SlotConfig

    ref = parameter_store(spec)
    return ParameterStore({s: SlotConfig(dim=spec.width(s), optimizer=ref.config_for(s).optimizer, hash_bits=3)
                           for s in spec.slots}, default=SlotConfig(dim=spec.dim))


@pytest.mark.parametrize("store", [parameter_store, _hashed_store], ids=["collisionless", "hashed"])
def test_many_steps_in_one_call_equal_the_steps_one_by_one(store):
    """`train_steps` runs the slices of a stream as `train` does one after another: the same scores
    (each taken before its slice is learned), rows, optimizer state, versions, admissions (author
    and tags ids need two sightings: some are admitted in the middle of a call), dense weights,
    normaliser, counts and touched rows with their earliest arrivals, to float rounding."""
    batch = 8
    stream = examples(700, seed=6, users=50, items=120)
    for i, e in enumerate(stream):
        e.sparse["author"] = f"a{i // 11}"  # authors first seen all along the stream
    a, b = (OnlineTrainer(SPEC, store(SPEC)) for _ in range(2))
    now = T0 + 10_000
    for t in (a, b):  # some ids seen once, or admitted, before
        for i in range(0, 40, batch):
            t.train(stream[i:i + batch], now)
        t.params.take_touched()
    scores_a = np.concatenate([a.train(stream[i:i + batch], now).scores for i in range(40, len(stream), batch)])
    # Calls of 37, 33 (padded to 37 steps) and 12.5 steps (a last step of 4 examples).
    cuts = [40, 336, 600, 700]
    parts = [b.train_steps(stream[lo:hi], batch, now) for lo, hi in zip(cuts, cuts[1:], strict=False)]
    scores_b = np.concatenate([p.scores for p in parts])
    np.testing.assert_allclose(scores_b, scores_a, rtol=1e-4, atol=1e-5)
    assert b.steps == a.steps and b.examples == a.examples
    for slot in SPEC.slots:
        ta, tb = a.params.tables[slot], b.params.tables[slot]
        assert tb.counts == ta.counts, slot
        assert len(tb) == len(ta) and getattr(tb, "pending", 0) == getattr(ta, "pending", 0)
        field = slot.split(".")[0]
        ids = sorted({getattr(e, field) if field in ("user_id", "item_id") else v
                      for e in stream for v in ([None] if field in ("user_id", "item_id") else
                                                np.atleast_1d(e.sparse[field]).tolist())})
        sa, sb = ta.row_state(ids), tb.row_state(ids)
        np.testing.assert_allclose(sb["values"], sa["values"], rtol=1e-4, atol=1e-5, err_msg=slot)
        np.testing.assert_allclose(sb["state"], sa["state"], rtol=1e-4, atol=1e-5, err_msg=slot)
        assert np.array_equal(sb["version"], sa["version"]), slot
    wa, wb = a.model.weights(), b.model.weights()
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], rtol=1e-4, atol=1e-5, err_msg=name)
    for ma, mb in zip(a.model.optimizer.m + a.model.optimizer.v, b.model.optimizer.m + b.model.optimizer.v,
                      strict=True):
        np.testing.assert_allclose(mb.numpy(), ma.numpy(), rtol=1e-4, atol=1e-7)
    assert int(b.model.optimizer.iterations.numpy()) == int(a.model.optimizer.iterations.numpy())
    for k, v in a.normalizer.state().items():
        np.testing.assert_allclose(b.normalizer.state()[k], v)
    touched_a = {r.slot: r for r in a.params.take_touched()}
    touched_b = {r.slot: r for r in b.params.take_touched()}
    assert touched_b.keys() == touched_a.keys()
    for slot, ra in touched_a.items():
        rb = touched_b[slot]
        got_a = dict(zip(ra.ids, zip(ra.versions.tolist(), ra.earliest_arrival.tolist(), strict=True), strict=True))
        got_b = dict(zip(rb.ids, zip(rb.versions.tolist(), rb.earliest_arrival.tolist(), strict=True), strict=True))
        assert got_b == got_a, slot
    assert list(b.validation.scores) == pytest.approx(list(a.validation.scores), rel=1e-4, abs=1e-5)


def test_many_steps_keep_progressive_validation_on_logged_scores():
    t = OnlineTrainer(SPEC, parameter_store(SPEC), window=100_000)
    batch = examples(100, seed=22)
    for i, e in enumerate(batch[:50]):
        e.score = 0.25 + i * 1e-3
    arrival = np.full(100, np.nan)
    arrival[60:] = 0.75
    step = t.train_steps(batch, 8, arrival_scores=arrival)
    logged = list(t.validation.scores)
    assert logged[:50] == [e.score for e in batch[:50]]
    assert logged[50:60] == pytest.approx(step.scores[50:60].tolist())
    assert logged[60:] == [0.75] * 40
    assert step.size == 100 and t.steps == 13 and t.examples == 100


def test_compiling_the_steps_ahead_learns_nothing_and_the_calls_then_compile_no_more():
    """`compile_steps` compiles the program of calls shaped like its examples, learning nothing:
    later calls of that shape (and smaller) run the same program, with the results of a trainer
    that did not compile ahead."""
    batch = 8
    stream = examples(600, seed=9, users=40, items=90)
    a, b = (OnlineTrainer(SPEC, parameter_store(SPEC)) for _ in range(2))
    now = T0 + 10_000
    before = b.model.weights()
    assert b.compile_steps(stream[:200], batch) > 0
    assert b.model.steps_programs == 1
    assert b.steps == 0 and b.examples == 0 and not b.params.take_touched()
    for name, w in b.model.weights().items():
        assert np.array_equal(w, before[name]), name
    assert int(b.model.optimizer.iterations.numpy()) == 0
    parts_a = [a.train_steps(stream[i:i + 200], batch, now) for i in range(0, 600, 200)]
    parts_b = [b.train_steps(stream[i:i + 200], batch, now) for i in range(0, 600, 200)]
    assert b.model.steps_programs == 1 and b.model._steps.experimental_get_tracing_count() == 1
    for pa, pb in zip(parts_a, parts_b, strict=True):
        np.testing.assert_allclose(pb.scores, pa.scores, rtol=1e-5, atol=1e-6)
    wa, wb = a.model.weights(), b.model.weights()
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_compiling_ahead_runs_one_step_that_changes_no_variable_and_no_later_score(monkeypatch):
    """`compile_steps` runs its new program once, for one step (a program's first run is its
    slowest), and sets back what that step moved (Adam's count and slots, no longer zeros after
    training): every variable bitwise as it was, and the next call bitwise that of a trainer whose
    same program ran first in that call."""
    batch = 8
    stream = examples(600, seed=9, users=40, items=90)
    now = T0 + 10_000
    a, b = (OnlineTrainer(SPEC, parameter_store(SPEC)) for _ in range(2))
    for t in (a, b):
        t.train_steps(stream[:96], batch, now)
        t.params.take_touched()
    held = [v.numpy() for v in b.model.variables]
    adam = b.model.optimizer
    assert int(adam.iterations.numpy()) == 12 and all(np.abs(m.numpy()).max() > 0 for m in adam.m)
    sizes: list[tuple] = []
    steps_run: list[int] = []
    compile_model, concrete = b.model.compile_steps, b.model._concrete

    def counting(name):
        fn = concrete(name)
        return lambda *args: steps_run.append(int(args[-1].numpy())) or fn(*args)

    monkeypatch.setattr(b.model, "compile_steps", lambda *s: sizes.append(s) or compile_model(*s))
    monkeypatch.setattr(b.model, "_concrete", counting)
    b.compile_steps(stream[96:], batch)
    assert steps_run == [1] and b.model.steps_programs == 2
    for var, value in zip(b.model.variables, held, strict=True):
        assert np.array_equal(var.numpy(), value), var.name
    assert not b.params.take_touched()
    a.model._grow_steps_sizes(*sizes[0])  # the same program, run first by the call below
    got_a, got_b = a.train_steps(stream[96:], batch, now), b.train_steps(stream[96:], batch, now)
    assert np.array_equal(got_a.scores, got_b.scores)
    for va, vb in zip(a.model.variables, b.model.variables, strict=True):
        assert np.array_equal(va.numpy(), vb.numpy()), va.name


def test_beside_graph_runs_once_the_graphs_inputs_are_ready(monkeypatch):
    """`beside_graph` (the next call's preparation, in a thread) starts after the inputs are padded
    and converted, just before the graph: started earlier, its Python took the GIL from that
    padding and converting (5 ms switches), which the graph then waited for."""
    import model.graph

    trainer = OnlineTrainer(SPEC, parameter_store(SPEC))
    happened: list[str] = []
    tensors = model.graph._tensors

    def converting(*arrays):
        happened.append("inputs converted")
        return tensors(*arrays)

    monkeypatch.setattr(model.graph, "_tensors", converting)
    trainer.train_steps(examples(96, seed=5), 8, T0 + 10_000, beside_graph=lambda: happened.append("beside"))
    assert happened == ["inputs converted", "beside"]


@pytest.mark.parametrize("store", [parameter_store, _hashed_store], ids=["collisionless", "hashed"])
def test_the_steps_layout_is_made_beside_the_graph_where_the_pulls_agree(store, monkeypatch):
    """`prepare_steps` lays out the steps for a row per distinct id (what collisionless tables pull),
    so that `train_steps` does not between its pulls and its graph; a hashed table's pulls share
    rows, and `train_steps` lays them out again. Either way the steps are the steps one by one
    (`test_many_steps_in_one_call_equal_the_steps_one_by_one`)."""
    trainer = OnlineTrainer(SPEC, parameter_store(SPEC) if store is parameter_store else store(SPEC))
    laid_out: list[str] = []
    layout = trainer._layout
    monkeypatch.setattr(trainer, "_layout", lambda *a: laid_out.append("layout") or layout(*a))
    stream = examples(96, seed=8)
    prepared = trainer.prepare_steps(stream, 8)
    assert laid_out == ["layout"]
    trainer.train_steps(stream, 8, T0 + 10_000, prepared=prepared)
    assert laid_out == (["layout"] if store is parameter_store else ["layout", "layout"])


def test_steps_prepared_ahead_are_the_steps():
    """Calls prepared ahead (`prepare_steps`, the next while one trains) give the results of calls
    that prepare their own inputs, as long as they train in the order they were prepared."""
    batch = 8
    stream = examples(400, seed=12, users=40, items=90)
    a, b = (OnlineTrainer(SPEC, parameter_store(SPEC)) for _ in range(2))
    now = T0 + 10_000
    runs = [stream[i:i + 96] for i in range(0, 400, 96)]
    got_a = [a.train_steps(r, batch, now) for r in runs]
    prepared = [b.prepare_steps(r, batch) for r in runs]  # all ahead: the normaliser learns them in order
    got_b = [b.train_steps(r, batch, now, prepared=p) for r, p in zip(runs, prepared, strict=True)]
    for ra, rb in zip(got_a, got_b, strict=True):
        assert np.array_equal(ra.scores, rb.scores)
    for name, w in a.model.weights().items():
        assert np.array_equal(b.model.weights()[name], w), name
    with pytest.raises(ValueError):
        b.train_steps(runs[0], batch, now, prepared=b.prepare_steps(runs[1], batch))


def test_steps_whose_graph_runs_on_another_thread_are_the_steps():
    """`start_train` with the graph on an executor's thread gives `train`'s results, step after
    step, rows and dense weights included; a step's result is taken once, and a failed graph's
    error reaches the one who takes it."""
    from concurrent.futures import ThreadPoolExecutor

    stream = examples(600, seed=14, users=40, items=90)
    a, b = (OnlineTrainer(SPEC, parameter_store(SPEC)) for _ in range(2))
    now = T0 + 10_000
    runs = [stream[i:i + 64] for i in range(0, 600, 64)]
    with ThreadPoolExecutor(1) as pool:
        for r in runs:
            want = a.train(r, now)
            pending = b.start_train(r, now, run=pool.submit)
            if r is runs[0]:  # until its result is taken, nothing else may use the model or the rows
                for use, args in ((b.score, (r,)), (b.dense_state, ()), (b.start_train, (r, now)),
                                  (b.train_steps, (r, 32, now))):
                    with pytest.raises(RuntimeError, match="while a train step is in flight"):
                        use(*args)
            got = pending.result()
            assert pending.done() and pending.result() is got
            assert np.array_equal(got.scores, want.scores) and got.loss == want.loss
        for name, w in a.model.weights().items():
            assert np.array_equal(b.model.weights()[name], w), name
        users = sorted({e.user_id for e in stream})
        assert np.array_equal(a.params.pull("user_id", users, now=now), b.params.pull("user_id", users, now=now))
        assert (a.steps, a.examples) == (b.steps, b.examples)

        def broken(fn, *args):
            return pool.submit(lambda: (_ for _ in ()).throw(RuntimeError("graph failed")))

        failing = b.start_train(runs[0], now, run=broken)
        with pytest.raises(RuntimeError, match="graph failed"):
            failing.result()
        with pytest.raises(RuntimeError, match="failed already"):
            failing.result()
        assert b.steps == a.steps  # no step counted for it
        b.score(runs[0])  # and none in flight: the trainer can be used again
