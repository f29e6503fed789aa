"""The model server's core: the numpy forward pass equals the TensorFlow graph, the item index
refreshed piece by piece equals one built from scratch, and recommendations follow the model,
exclude what the user just acted on and fall back to a cold-start list."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from flows.events import Example
from model import recommender as rec
from model.features import DenseNormalizer, FeatureSpec, make_batch
from model.graph import TwoTowerRanker
from model.recommender import ItemIndex, NumpyRanker, StoreRecommender, cold_start_scores
from model.trainer import OnlineTrainer, parameter_store
from paramserver.rows import DenseBlob, RowBatch
from paramserver.serving import LmdbServingStore, ServingWriter
from paramserver.sync import DeltaSync

T0 = 1764288000.0
SPEC = FeatureSpec(user_slots=("country",), item_slots=("author", "tags"), dense=("duration_s",), dim=8)


class Event:
    def __init__(self, user_id, item_id, sparse, dense):
        self.user_id, self.item_id, self.sparse, self.dense = user_id, item_id, sparse, dense


def dense_arrays(spec: FeatureSpec, seed: int) -> dict[str, np.ndarray]:
    """A TwoTowerRanker's weights with random (nonzero) biases, and normaliser statistics."""
    model = TwoTowerRanker(spec, seed=seed)
    rng = np.random.default_rng(seed)
    w = model.weights()
    for k, v in w.items():
        if k.endswith("_b") or k == "global_bias":
            w[k] = (rng.standard_normal(np.shape(v)) * 0.3).astype(np.float32)
    f = len(spec.dense)
    return {**w, "norm_count": np.array([40.0]), "norm_mean": rng.uniform(10, 50, f), "norm_m2": rng.uniform(100, 900, f)}


def random_events(rng, n: int) -> list[Event]:
    out = []
    for _ in range(n):
        tags = [f"t{int(t)}" for t in rng.integers(0, 9, int(rng.integers(0, 4)))]  # 0 to 3 tags, repeats too
        sparse = {"author": f"a{int(rng.integers(6))}", "tags": tags}
        if rng.random() < 0.7:
            sparse["country"] = [f"c{int(c)}" for c in rng.integers(0, 4, int(rng.integers(1, 3)))]
        out.append(Event(f"u{int(rng.integers(10))}", f"v{int(rng.integers(30))}", sparse,
                         {"duration_s": float(rng.uniform(0, 90))}))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_numpy_forward_pass_equals_the_tensorflow_graph(seed):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    arrays = dense_arrays(SPEC, seed)
    model = TwoTowerRanker(SPEC, seed=seed + 10)
    model.load_weights(arrays)
    batch = make_batch(random_events(rng, 64), SPEC)
    rows = {s: rng.standard_normal((len(batch.slots[s].ids), SPEC.width(s))).astype(np.float32) for s in SPEC.slots}
    norm = DenseNormalizer(1)
    norm.load(arrays)
    dense = norm.apply(batch.dense)
    r, idx, ex, d = model._inputs(batch, rows, dense)
    want = [t.numpy() for t in model._forward(r, idx, ex, d, tf.constant(batch.size))]
    ours = NumpyRanker(SPEC, arrays)
    np.testing.assert_allclose(ours.normalize(batch.dense), dense, atol=1e-6)
    got = ours.forward(rows, {s: batch.slots[s].index for s in SPEC.slots},
                       {s: batch.slots[s].example for s in SPEC.slots}, ours.normalize(batch.dense), batch.size)
    for name, g, w in zip(("rank", "dot", "u", "v"), got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=name)


def test_weights_of_another_feature_spec_are_refused_with_a_reason():
    arrays = dense_arrays(SPEC, 0)
    with pytest.raises(ValueError, match="other slots"):
        NumpyRanker(FeatureSpec(item_slots=("author",), dense=("duration_s",), dim=8), arrays)


# ------------------------------------------------------------------------------ a serving store


def batch_of(slot: str, ids: list[str], values: np.ndarray, evicted=()) -> RowBatch:
    n = len(ids)
    return RowBatch(slot, values.shape[1], list(ids), values.astype(np.float32), np.ones(n, np.uint64),
                    np.full(n, np.nan), T0, list(evicted))


def item_entry(i: int, rng, author=None) -> dict:
    tags = [f"t{int(t)}" for t in rng.integers(0, 9, int(rng.integers(0, 4)))]
    return {"item_id": f"v{i}", "ts": T0 + float(rng.uniform(0, 3 * 86400)),
            "sparse": {"author": author or f"a{i % 6}", "tags": tags},
            "dense": {"duration_s": float(rng.uniform(0, 90)), "other": 1.5},
            "impressions": int(rng.integers(0, 200)), "positives": int(rng.integers(0, 20))}


def fill(writer: ServingWriter, rng, n_items: int = 40, users: int = 10, dense: bool = True) -> dict:
    items = {f"v{i}": item_entry(i, rng) for i in range(n_items)}
    d = SPEC.dim
    rows = [batch_of("item_id", list(items), rng.standard_normal((n_items, d))),
            batch_of("item_id.bias", list(items), rng.standard_normal((n_items, 1))),
            batch_of("author", [f"a{i}" for i in range(5)], rng.standard_normal((5, d))),  # a5 has no row
            batch_of("tags", [f"t{i}" for i in range(9)], rng.standard_normal((9, d))),
            batch_of("user_id", [f"u{i}" for i in range(users)], rng.standard_normal((users, d))),
            batch_of("user_id.bias", [f"u{i}" for i in range(users)], rng.standard_normal((users, 1)))]
    blob = DenseBlob(1, dense_arrays(SPEC, 3), T0) if dense else None
    writer.write(rows, dense=blob, items=items)
    return items


@pytest.fixture
def store(tmp_path):
    s = LmdbServingStore(tmp_path / "serving", writer=True)
    yield s
    s.close()


def tf_scores(store: LmdbServingStore, user_id: str, items: dict) -> dict[str, float]:
    """sigmoid(rank) of every item for the user, by the TensorFlow graph on the store's rows."""
    blob = store.read_dense()
    model = TwoTowerRanker(SPEC)
    model.load_weights(blob.arrays)
    norm = DenseNormalizer(len(SPEC.dense))
    norm.load(blob.arrays)
    events = [Event(user_id, i, e["sparse"], e["dense"]) for i, e in items.items()]
    batch = make_batch(events, SPEC)
    rows = {s: store.read_rows(s, batch.slots[s].ids, SPEC.width(s)).values for s in SPEC.slots}
    return dict(zip(items, model.score(batch, rows, norm.apply(batch.dense)).tolist(), strict=True))


def test_recommendations_are_the_graphs_scores_best_first_with_the_catalogs_features(store):
    rng = np.random.default_rng(5)
    items = fill(ServingWriter(store), rng)
    r = StoreRecommender(store, SPEC, candidates=7)
    want = tf_scores(store, "u3", items)
    got = r.recommend("u3", len(items))
    assert not got.cold_start
    assert sorted(s.item_id for s in got.items) == sorted(items)
    for s in got.items:
        assert s.score == pytest.approx(want[s.item_id], abs=1e-5)
        assert s.sparse == items[s.item_id]["sparse"] and s.dense == items[s.item_id]["dense"]
    scores = [s.score for s in got.items]
    assert scores == sorted(scores, reverse=True)
    assert got.model_version == f"1.{store.params_version()}"


def test_the_head_reranks_retrievals_best_candidates(store):
    rng = np.random.default_rng(6)
    items = fill(ServingWriter(store), rng, n_items=60)
    r = StoreRecommender(store, SPEC, candidates=5)
    snap = r.index.snapshot
    u_in, u, ub = r._user("u1", snap.model, {})
    retrieval = snap.vectors @ u[0] + snap.bias
    best5 = {snap.ids[p] for p in np.argsort(-retrieval)[:5]}
    got = r.recommend("u1", 3)
    assert {s.item_id for s in got.items} <= best5
    want = tf_scores(store, "u1", {i: items[i] for i in best5})
    assert [s.item_id for s in got.items] == sorted(best5, key=lambda i: -want[i])[:3]


# ------------------------------------------------------------------------------ refresh


def snapshot_by_id(index: ItemIndex) -> dict:
    s = index.snapshot
    return {i: (s.entries[p], s.emb[p], s.raw_dense[p], s.vectors[p], s.bias[p], s.cold[p]) for i, p in s.pos.items()}


def assert_same_index(a: ItemIndex, b: ItemIndex) -> None:
    x, y = snapshot_by_id(a), snapshot_by_id(b)
    assert x.keys() == y.keys()
    assert a.snapshot.dense_version == b.snapshot.dense_version
    assert a.snapshot.params_version == b.snapshot.params_version
    for i in x:
        assert x[i][0] == y[i][0], i
        for j in range(1, 6):
            np.testing.assert_allclose(x[i][j], y[i][j], rtol=1e-5, atol=1e-6, err_msg=f"{i} field {j}")


@pytest.mark.parametrize("seed", range(4))
def test_an_incremental_refresh_equals_a_full_rebuild_after_random_updates(store, seed):
    rng = np.random.default_rng(seed)
    writer = ServingWriter(store)
    items = fill(writer, rng, dense=seed % 2 == 0)
    index = ItemIndex(store, SPEC)
    d, next_id, dense_version = SPEC.dim, 40, 1
    for _ in range(12):
        rows, changed = [], {}
        for _ in range(int(rng.integers(1, 5))):
            op = int(rng.integers(8))
            live = sorted(items)
            if op == 0 and live:  # item rows move
                ids = list(rng.choice(live, min(len(live), 5), replace=False))
                rows += [batch_of("item_id", ids, rng.standard_normal((len(ids), d))),
                         batch_of("item_id.bias", ids[:2], rng.standard_normal((min(2, len(ids)), 1)))]
            elif op == 1:  # an author's or a tag's row moves (or appears: a5 and t9 had none)
                rows.append(batch_of("author", [f"a{int(rng.integers(7))}"], rng.standard_normal((1, d))))
                rows.append(batch_of("tags", [f"t{int(rng.integers(10))}"], rng.standard_normal((1, d))))
            elif op == 2 and live:  # an item changes its features
                i = str(rng.choice(live))
                changed[i] = item_entry(int(i[1:]), rng, author=f"a{int(rng.integers(7))}")
            elif op == 3:  # a new item
                changed[f"v{next_id}"] = item_entry(next_id, rng)
                rows.append(batch_of("item_id", [f"v{next_id}"], rng.standard_normal((1, d))))
                next_id += 1
            elif op == 4 and live:  # an item leaves
                changed[str(rng.choice(live))] = None
            elif op == 5:  # new dense weights
                dense_version += 1
                writer.write(dense=DenseBlob(dense_version, dense_arrays(SPEC, 100 + dense_version), T0))
            elif op == 6:  # an author's row is evicted; a user's row moves (no item is touched)
                rows.append(batch_of("author", [], np.zeros((0, d)), evicted=[f"a{int(rng.integers(6))}"]))
                rows.append(batch_of("user_id", ["u1"], rng.standard_normal((1, d))))
            elif op == 7 and live:  # an item's id row is evicted
                rows.append(batch_of("item_id", [], np.zeros((0, d)), evicted=[str(rng.choice(live))]))
        writer.write(rows, items=changed)
        for i, e in changed.items():
            if e is None:
                items.pop(i, None)
            else:
                items[i] = e
        index.refresh()
        assert index.snapshot.size == len(items)
        assert_same_index(index, ItemIndex(store, SPEC))
    assert index.full_rebuilds == 1


def test_only_the_items_a_change_touches_are_recomputed(store):
    rng = np.random.default_rng(9)
    writer = ServingWriter(store)
    items = fill(writer, rng)
    index = ItemIndex(store, SPEC)
    by_a2 = [i for i, e in items.items() if e["sparse"]["author"] == "a2"]
    writer.write([batch_of("author", ["a2"], rng.standard_normal((1, SPEC.dim)))])
    assert index.refresh() == len(by_a2)
    writer.write([batch_of("user_id", ["u1"], rng.standard_normal((1, SPEC.dim)))])
    assert index.refresh() == 0
    writer.write(dense=DenseBlob(2, dense_arrays(SPEC, 7), T0))
    assert index.refresh() == len(items)


def test_a_refresh_reads_from_the_store_only_the_rows_that_changed(store, monkeypatch):
    rng = np.random.default_rng(10)
    writer = ServingWriter(store)
    items = fill(writer, rng)
    index = ItemIndex(store, SPEC)
    read: list[tuple[str, str]] = []
    real_rows, real_get = store.read_rows, store.get

    def counted_rows(slot, ids, dim=None):
        read.extend((slot, i) for i in ids)
        return real_rows(slot, ids, dim)

    def counted_get(keys):  # row keys only: catalog entries are read with it too
        read.extend(tuple(k.decode().split("/", 1)) for k in keys if not k.startswith(b"item/"))
        return real_get(keys)

    monkeypatch.setattr(store, "read_rows", counted_rows)
    monkeypatch.setattr(store, "get", counted_get)
    by_a2 = [i for i, e in items.items() if e["sparse"]["author"] == "a2"]
    assert len(by_a2) > 1
    popular = {i: {**items[i], "impressions": items[i]["impressions"] + 1} for i in by_a2}
    writer.write([batch_of("author", ["a2"], rng.standard_normal((1, SPEC.dim))),
                  batch_of("item_id", by_a2[:1], rng.standard_normal((1, SPEC.dim)))], items=popular)
    assert index.refresh() == len(by_a2)
    # Their entries changed (one more impression each): every row of theirs is pooled again, but
    # the tags' rows, the other item_id rows and the biases come from memory.
    assert sorted(read) == sorted([("author", "a2"), ("item_id", by_a2[0])])
    assert_same_index(index, ItemIndex(store, SPEC))


def test_readers_see_a_whole_snapshot_while_refreshes_run(store):
    rng = np.random.default_rng(11)
    writer = ServingWriter(store)
    items = fill(writer, rng)
    r = StoreRecommender(store, SPEC)
    errors, done = [], threading.Event()
    seen: set[str] = set()

    def serve():
        try:
            while not done.is_set():
                got = r.recommend(f"u{int(rng.integers(12))}", 10)
                ids = [s.item_id for s in got.items]
                assert len(ids) == 10 and len(set(ids)) == 10
                seen.update(ids)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=serve) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for k in range(40):
            writer.write([batch_of("item_id", list(items)[:20], rng.standard_normal((20, SPEC.dim)))],
                         items={f"n{k}": item_entry(100 + k, rng), f"n{k - 1}": None},
                         dense=DenseBlob(2 + k, dense_arrays(SPEC, 3), T0) if k % 10 == 0 else None)
            r.refresh()
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors
    assert seen <= set(items) | {f"n{k}" for k in range(40)}
    assert r.index.full_rebuilds == 1


# ------------------------------------------------------------------------------ cold start, exclusion


def test_an_unknown_user_gets_the_popular_and_fresh_items(store):
    rng = np.random.default_rng(12)
    items = fill(ServingWriter(store), rng)
    r = StoreRecommender(store, SPEC)
    got = r.recommend("nobody", 10)
    assert got.cold_start
    ids = list(items)
    c = cold_start_scores(np.array([items[i]["positives"] for i in ids], float),
                          np.array([items[i]["impressions"] for i in ids], float),
                          np.array([items[i]["ts"] for i in ids]))
    want = [ids[j] for j in np.argsort(-c, kind="stable")[:10]]
    assert [s.item_id for s in got.items] == want
    assert [s.score for s in got.items] == pytest.approx(np.minimum(np.sort(c)[::-1][:10], 1.0).tolist())
    assert not r.recommend("u1", 10).cold_start


def test_cold_start_scores_prefer_positive_rates_and_fresh_items():
    s = cold_start_scores(np.array([0.0, 50.0, 50.0, 0.0]), np.array([1000.0, 100.0, 100.0, 0.0]),
                          np.array([T0, T0, T0 - 86400.0, T0]))
    assert s[1] > s[3] > s[0]  # a liked item beats a new one, which beats a shown-and-ignored one
    assert s[2] == pytest.approx(s[1] / 2)  # a day older: half


def test_a_store_without_dense_weights_gets_a_cold_start_list_and_then_the_model(store):
    rng = np.random.default_rng(13)
    writer = ServingWriter(store)
    fill(writer, rng, dense=False)
    r = StoreRecommender(store, SPEC)
    got = r.recommend("u1", 5)
    assert got.cold_start and len(got.items) == 5 and got.model_version == f"0.{store.params_version()}"
    writer.write(dense=DenseBlob(4, dense_arrays(SPEC, 1), T0))
    assert r.refresh() == 40
    got = r.recommend("u1", 5)
    assert not got.cold_start and got.model_version == f"4.{store.params_version()}"


def test_an_empty_catalog_gives_an_empty_cold_start_list(store):
    r = StoreRecommender(store, SPEC)
    got = r.recommend("u1", 10)
    assert got.items == [] and got.cold_start
    assert r.health().items == 0


@pytest.mark.parametrize("known", [True, False])
def test_recently_acted_items_are_left_out_unless_the_catalog_runs_out(store, known):
    rng = np.random.default_rng(14)
    writer = ServingWriter(store)
    items = fill(writer, rng, n_items=12)
    user = "u2" if known else "stranger"
    r = StoreRecommender(store, SPEC, candidates=100)  # retrieval keeps the whole catalog: one order
    everything = [s.item_id for s in r.recommend(user, 12).items]
    acted = everything[:3] + ["gone-item"]
    writer.write(users={user: [[i, "like", T0 + j] for j, i in enumerate(acted)]})
    got = [s.item_id for s in r.recommend(user, 5).items]
    assert len(got) == 5 and not set(got) & set(acted)
    assert got == [i for i in everything if i not in acted][:5]
    every = [s.item_id for s in r.recommend(user, 20).items]  # more than the catalog holds
    assert every == [i for i in everything if i not in acted] + everything[:3]
    assert sorted(every) == sorted(items)


def test_health_reports_the_applied_versions_and_the_index_size(store):
    rng = np.random.default_rng(15)
    writer = ServingWriter(store)
    fill(writer, rng)
    r = StoreRecommender(store, SPEC)
    h = r.health()
    assert (h.params_version, h.dense_version, h.items) == (store.params_version(), 1, 40)
    assert h.staleness_ms is not None
    writer.write(items={"v0": None})
    assert r.health().params_version == h.params_version  # not applied yet
    r.refresh()
    h2 = r.health()
    assert h2.params_version == store.params_version() > h.params_version and h2.items == 39


# ------------------------------------------------------------------------------ behaviour


def test_training_on_a_users_likes_moves_that_authors_items_up_for_them(tmp_path):
    spec = FeatureSpec(item_slots=("author", "tags"), dim=8)
    store = LmdbServingStore(tmp_path / "serving", writer=True)
    writer = ServingWriter(store)
    params = parameter_store(spec)
    trainer = OnlineTrainer(spec, params)
    sync = DeltaSync(params, writer)
    rng = np.random.default_rng(21)
    n_items = 50
    items = {f"v{i}": {"item_id": f"v{i}", "ts": T0, "sparse": {"author": f"a{i % 5}", "tags": [f"t{i % 3}"]},
                       "dense": {}, "impressions": 0, "positives": 0} for i in range(n_items)}
    writer.write(items=items)
    seq = iter(range(10**6))

    def ex(user: str, item: str, label: int) -> Example:
        k = next(seq)
        return Example(request_id=f"r{k}", user_id=user, item_id=item, ts=T0 + k, label_ts=T0 + k + 1, label=label,
                       actions=[], weight=1.0, position=0, score=None, model_version=None,
                       sparse=items[item]["sparse"], dense={}, label_received_at=None)

    def background(n: int) -> list[Example]:  # other users, tastes unrelated to author a1
        return [ex(f"o{int(rng.integers(20))}", f"v{int(rng.integers(n_items))}", int(rng.random() < 0.3))
                for _ in range(n)]

    def publish() -> None:
        params.set_dense(trainer.dense_state())
        sync.sync(dense=True)

    for _ in range(5):  # the fan is known, with no taste yet
        trainer.train(background(120) + [ex("fan", f"v{int(rng.integers(n_items))}", int(rng.random() < 0.3))
                                          for _ in range(8)])
    r = StoreRecommender(store, spec)
    publish()
    r.refresh()

    def a1_positions() -> float:
        got = r.recommend("fan", n_items)
        assert not got.cold_start
        return float(np.mean([p for p, s in enumerate(got.items) if s.sparse["author"] == "a1"]))

    before = a1_positions()
    version_before = r.recommend("fan", 1).model_version
    for _ in range(30):
        fan = [ex("fan", f"v{i}", int(i % 5 == 1)) for i in rng.choice(n_items, 16, replace=False)]
        trainer.train(background(64) + fan)
    publish()
    assert r.refresh() == n_items  # new dense weights: every item recomputed
    after = a1_positions()
    assert after < before - 5 and after < 10  # a1's ten items: from the middle towards the top
    top = r.recommend("fan", 5)
    assert all(s.sparse["author"] == "a1" for s in top.items)
    assert top.model_version != version_before
    store.close()


@pytest.mark.parametrize("n,c", [(50_000, 300), (50_000, 1), (200_000, 1000), (20_000, 5000), (30_000, 100)])
def test_the_sampled_threshold_selects_exactly_argpartitions_top(n, c):
    rng = np.random.default_rng(n + c)
    scores = rng.standard_normal(n).astype(np.float32)
    scores[rng.integers(n, size=n // 10)] = -np.inf  # excluded and free positions
    scores[rng.integers(n, size=50)] = 3.0  # ties
    scores[: n // 7] = np.sort(scores[: n // 7])  # a sorted stretch: no luck from the stride
    got = rec._largest(scores, c)
    assert len(got) == c and len(set(got.tolist())) == c
    want = np.argpartition(scores, n - c)[n - c:]
    np.testing.assert_array_equal(np.sort(scores[got]), np.sort(scores[want]))
    top = rec._top(scores, c, np.zeros(0, np.int64))
    np.testing.assert_array_equal(scores[top], np.sort(scores[want])[::-1])


# ------------------------------------------------------------------- user features from history

HSPEC = FeatureSpec(user_slots=("recent_author", "recent_tags"), item_slots=("author", "tags"),
                    dense=("duration_s",), dim=8)


def test_recent_slots_hold_the_users_recent_positive_items_fields_newest_first(tmp_path):
    store = LmdbServingStore(tmp_path / "s", writer=True)
    try:
        writer = ServingWriter(store)
        items = {"v1": {"item_id": "v1", "ts": T0, "sparse": {"author": "a1", "tags": ["x", "y"]}, "dense": {}},
                 "v2": {"item_id": "v2", "ts": T0, "sparse": {"author": "a2", "tags": ["y"]}, "dense": {}},
                 "v3": {"item_id": "v3", "ts": T0, "sparse": {"author": "a3", "tags": ["z"]}, "dense": {}}}
        writer.write(items=items)
        r = StoreRecommender(store, HSPEC)
        acted = [("v1", "like", T0), ("v3", "skip", T0 + 1), ("v2", "share", T0 + 2), ("gone", "like", T0 + 3)]
        got = rec.history_features(HSPEC, acted, r.index.snapshot)
        # skips are not interests; items no longer in the catalog say nothing; each value once
        assert got == {"recent_author": ["a2", "a1"], "recent_tags": ["y", "x"]}
        assert rec.history_features(SPEC, acted, r.index.snapshot) == {}  # no recent_ slots: nothing
    finally:
        store.close()


def test_a_users_history_features_score_as_the_graph_scores_them_and_are_returned(store):
    rng = np.random.default_rng(21)
    writer = ServingWriter(store)
    items = {f"v{i}": item_entry(i, rng) for i in range(30)}
    d = HSPEC.dim
    rows = [batch_of("item_id", list(items), rng.standard_normal((30, d))),
            batch_of("item_id.bias", list(items), rng.standard_normal((30, 1))),
            batch_of("author", [f"a{i}" for i in range(6)], rng.standard_normal((6, d))),
            batch_of("tags", [f"t{i}" for i in range(9)], rng.standard_normal((9, d))),
            batch_of("recent_author", [f"a{i}" for i in range(4)], rng.standard_normal((4, d))),  # a4, a5: none
            batch_of("recent_tags", [f"t{i}" for i in range(9)], rng.standard_normal((9, d)))]
    writer.write(rows, dense=DenseBlob(1, dense_arrays(HSPEC, 4), T0), items=items)
    r = StoreRecommender(store, HSPEC, candidates=30)
    assert r.recommend("newcomer", 5).cold_start  # no row, no history: the cold-start list
    writer.write(users={"newcomer": [["v1", "like", T0], ["v4", "finish", T0 + 1], ["v2", "skip", T0 + 2]]})
    got = r.recommend("newcomer", 30)
    assert not got.cold_start  # no user_id row yet, but their likes already say something
    history = rec.history_features(HSPEC, [("v1", "like", T0), ("v4", "finish", T0 + 1)], r.index.snapshot)
    assert got.user_sparse == history and history["recent_author"] == [items["v4"]["sparse"]["author"],
                                                                       items["v1"]["sparse"]["author"]]
    # The graph, given the feature events the server logs (item features + the user's), agrees.
    blob = store.read_dense()
    model = TwoTowerRanker(HSPEC)
    model.load_weights(blob.arrays)
    norm = DenseNormalizer(1)
    norm.load(blob.arrays)
    shown = [s.item_id for s in got.items]
    events = [Event("newcomer", i, {**items[i]["sparse"], **got.user_sparse}, items[i]["dense"]) for i in shown]
    batch = make_batch(events, HSPEC)
    rows_in = {s: store.read_rows(s, batch.slots[s].ids, HSPEC.width(s)).values for s in HSPEC.slots}
    want = model.score(batch, rows_in, norm.apply(batch.dense))
    np.testing.assert_allclose([s.score for s in got.items], want, atol=1e-5)


def test_items_and_values_too_long_for_an_lmdb_key_are_indexed_under_their_own_ids(store):
    # A valid item id of 128 characters takes up to 512 bytes and a tag any length: their serving
    # keys hold digests (paramserver/records.py), and the index maps them back to the ids.
    rng = np.random.default_rng(4)
    writer = ServingWriter(store)
    fill(writer, rng)
    long_item, long_tag, d = "\U0001F600" * 127 + "x", "é" * 300, SPEC.dim
    entry = {**item_entry(99, rng), "item_id": long_item}
    entry["sparse"] = {"author": "a1", "tags": [long_tag]}
    index = ItemIndex(store, SPEC)
    writer.write([batch_of("item_id", [long_item], rng.standard_normal((1, d))),
                  batch_of("tags", [long_tag], rng.standard_normal((1, d)))], items={long_item: entry})
    assert index.refresh() == 1 and long_item in index.snapshot.pos  # incremental: a new item
    assert_same_index(index, ItemIndex(store, SPEC))  # and as a full rebuild reads it
    writer.write([batch_of("tags", [long_tag], rng.standard_normal((1, d)))])
    assert index.refresh() == 1  # its long tag's row moved: it alone is recomputed
    writer.write([batch_of("item_id", [long_item], rng.standard_normal((1, d)))])
    assert index.refresh() == 1
    assert_same_index(index, ItemIndex(store, SPEC))
    writer.write(items={long_item: None})
    index.refresh()
    assert long_item not in index.snapshot.pos
    assert_same_index(index, ItemIndex(store, SPEC))
