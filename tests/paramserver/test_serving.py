"""The LMDB serving store: one writer, readers in other processes, a version that only grows, a
change log readers refresh from, a map that grows, and rows that are never torn."""

from __future__ import annotations

import math
import multiprocessing
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from paramserver.records import Records, encode_item
from paramserver.rows import DenseBlob, RowBatch
from paramserver.serving import (
    LmdbServingStore,
    RowCache,
    ServingStore,
    ServingStoreError,
    ServingWriter,
    StoreNotReady,
)


def batch(slot, ids, version, *, dim=4, arrival=math.nan, updated_at=None, evicted=()):
    """Rows whose every value is their version, so a torn row would show."""
    n = len(ids)
    return RowBatch(slot, dim, list(ids), np.full((n, dim), float(version), np.float32),
                    np.full(n, version, np.uint64), np.full(n, arrival), updated_at or time.time(),
                    evicted=list(evicted))


@pytest.fixture
def store(tmp_path):
    s = LmdbServingStore(tmp_path / "serving", writer=True, map_size=1 << 20)
    yield s
    s.close()


def test_the_lmdb_store_is_a_serving_store(store):
    assert isinstance(store, ServingStore)


def test_rows_written_are_read_back_in_batches(store):
    w = ServingWriter(store)
    ids = [f"i{i}" for i in range(1000)]
    v = w.write([batch("s", ids, 3, dim=8), batch("t", ["a"], 9, dim=2)])
    assert v == 1 == store.params_version()
    got = store.read_rows("s", ids[::-1] + ["missing"])
    assert got.found.tolist() == [True] * 1000 + [False]
    assert (got.values[:-1] == 3.0).all() and (got.values[-1] == 0).all()
    assert got.values.shape == (1001, 8) and got.values.dtype == np.float32
    assert got.versions.tolist() == [3] * 1000 + [0]
    assert store.read_rows("t", ["a"]).values.tolist() == [[9.0, 9.0]]
    assert store.read_rows("s", []).values.shape == (0, 0)
    assert store.read_rows("s", ["nope"], dim=8).values.shape == (1, 8)


def test_evicted_rows_are_deleted_and_an_id_evicted_then_admitted_again_keeps_its_row(store):
    w = ServingWriter(store)
    w.write([batch("s", ["a", "b", "c"], 1)])
    w.write([batch("s", ["c"], 2, evicted=["a", "c"])])
    got = store.read_rows("s", ["a", "b", "c"])
    assert got.found.tolist() == [False, True, True]
    assert got.versions.tolist() == [0, 1, 2]


def test_dense_catalog_and_users_go_through_the_same_writer(store):
    w = ServingWriter(store, chunk_bytes=100)
    blob = DenseBlob(5, {"w": np.arange(200, dtype=np.float32).reshape(20, 10), "b": np.ones(3, np.float32)}, 10.0)
    w.write(dense=blob, items={"v1": {"item_id": "v1", "ts": 1.0, "popularity": {"like": 2}}},
            users={"u1": [("v1", "like", 2.0)]})
    assert store.dense_version() == 5
    got = store.read_dense()
    assert got.version == 5 and set(got.arrays) == {"w", "b"} and np.array_equal(got.arrays["w"], blob.arrays["w"])
    assert store.read_items(["v1", "v2"]) == [{"item_id": "v1", "ts": 1.0, "popularity": {"like": 2}}, None]
    assert store.read_users(["u1"]) == [[("v1", "like", 2.0)]]
    # A smaller blob without "b": the chunks it no longer has are gone.
    w.write(dense=DenseBlob(6, {"w": np.zeros(5, np.float32)}, 11.0), items={"v1": None}, users={"u1": []})
    assert [k for k, _ in store.scan(b"dense/")] == [b"dense/w/0"]
    got = store.read_dense()
    assert got.version == 6 and list(got.arrays) == ["w"] and got.arrays["w"].tolist() == [0.0] * 5
    assert store.read_items(["v1"]) == [None]
    assert store.read_users(["u1"]) == [[]]


@settings(max_examples=40, deadline=None)
@given(writes=st.lists(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.booleans()), max_size=4),
                       max_size=12))
def test_params_version_only_grows(tmp_path_factory, writes):
    path = tmp_path_factory.mktemp("v") / "s"
    seen = [0]
    for i, write in enumerate(writes):  # the store reopened for each write
        with LmdbServingStore(path, writer=True, map_size=1 << 20) as s:
            recs = [(f"item/{k}".encode(), encode_item({"i": i}) if put else None) for k, put in write]
            v = s.apply(recs)
            assert v == s.params_version()
            assert v > seen[-1] if recs else v == seen[-1]
            seen.append(v)
    assert seen == sorted(seen)


def test_change_log_gives_a_reader_only_the_keys_changed_since_its_version(store):
    w = ServingWriter(store)
    v1 = w.write([batch("s", ["a", "b", "c"], 1)])
    v2 = w.write([batch("s", ["b"], 2)], items={"v9": {"item_id": "v9"}})
    v3 = w.write([batch("s", ["c"], 3, evicted=["a"])])
    assert store.changes_since(v3) == (v3, [])
    assert store.changes_since(v2) == (v3, [b"s/a", b"s/c"])
    version, keys = store.changes_since(v1)
    assert version == v3 and sorted(keys) == [b"item/v9", b"s/a", b"s/b", b"s/c"]
    assert len(keys) == len(set(keys))
    assert store.changes_since(v3 + 1) is None  # from a store that was rebuilt: reload


def test_a_reader_too_far_behind_the_change_log_is_told_to_reload(tmp_path):
    now = [1000.0]
    s = LmdbServingStore(tmp_path / "s", writer=True, changelog_versions=3, changelog_seconds=60.0,
                         clock=lambda: now[0])
    w = ServingWriter(s)
    versions = [w.write(items={f"v{i}": {"i": i}}) for i in range(6)]
    assert s.changes_since(versions[-4]) == (versions[-1], [b"item/v3", b"item/v4", b"item/v5"])
    assert s.changes_since(versions[-5]) is None  # kept: the last 3 versions
    assert s.changes_since(0) is None
    now[0] += 30
    w.write(items={"x": {}})
    now[0] += 40  # the first six versions are more than 60 s old now, x's is not
    last = w.write(items={"y": {}})
    assert s.changes_since(last - 2) == (last, [b"item/x", b"item/y"])
    assert s.changes_since(last - 3) is None  # version 6 is among the last 3, but too old
    s.close()


def test_a_write_too_big_to_log_makes_readers_reload(tmp_path):
    s = LmdbServingStore(tmp_path / "s", writer=True, changelog_max_keys=10)
    w = ServingWriter(s)
    v = w.write([batch("s", [str(i) for i in range(5)], 1)])
    w.write([batch("s", [str(i) for i in range(11)], 2)])
    last = w.write([batch("s", ["0"], 3)])
    assert s.changes_since(v) is None
    assert s.changes_since(last - 1) == (last, [b"s/0"])
    s.close()


def test_the_map_grows_when_full(tmp_path):
    s = LmdbServingStore(tmp_path / "s", writer=True, map_size=64 * 1024)
    w = ServingWriter(s)
    ids = [str(i) for i in range(20_000)]
    w.write([batch("s", ids, 7, dim=16)])
    assert s.env.info()["map_size"] > 3_000_000
    assert (s.read_rows("s", ids).values == 7).all()
    assert REGISTRY.get_sample_value("freshrec_sync_store_map_growths_total", {"store": "primary"}) >= 1
    s.close()


def test_freshness_and_staleness(tmp_path):
    now = [5000.0]
    s = LmdbServingStore(tmp_path / "s", writer=True, name="fresh-test", clock=lambda: now[0])
    w = ServingWriter(s)
    before = REGISTRY.get_sample_value("freshrec_sync_freshness_seconds_count", {"store": "fresh-test"}) or 0
    w.write([RowBatch("s", 2, ["a", "b", "c"], np.zeros((3, 2), np.float32), np.ones(3),
                      np.array([4999.92, 4999.5, math.nan]), updated_at=4999.95)])
    st_ = s.stats()
    assert st_.params_version == 1
    assert st_.freshness_ms == pytest.approx(500.0)  # its oldest row's
    assert st_.staleness_ms == pytest.approx(50.0)
    now[0] += 2
    assert s.stats().staleness_ms == pytest.approx(2050.0)
    get = REGISTRY.get_sample_value
    assert get("freshrec_sync_freshness_seconds_count", {"store": "fresh-test"}) == before + 2
    assert get("freshrec_sync_freshness_seconds_bucket", {"store": "fresh-test", "le": "0.1"}) == before + 1
    assert get("freshrec_sync_freshness_seconds_bucket", {"store": "fresh-test", "le": "0.5"}) == before + 2
    assert get("freshrec_sync_freshness_seconds_sum", {"store": "fresh-test"}) == pytest.approx(0.58)
    assert set(s.stats().as_dict()) >= {"params_version", "freshness_ms", "staleness_ms"}
    s.close()


def test_an_empty_store_reports_no_freshness(store):
    st_ = store.stats()
    assert (st_.params_version, st_.freshness_ms, st_.staleness_ms) == (0, None, None)


def test_only_the_writer_writes_and_one_object_per_directory_per_process(tmp_path):
    with pytest.raises(ServingStoreError, match="writer creates it"):
        LmdbServingStore(tmp_path / "none")
    s = LmdbServingStore(tmp_path / "s", writer=True)
    with pytest.raises(ServingStoreError, match="already open"):
        LmdbServingStore(tmp_path / "s")
    s.close()
    r = LmdbServingStore(tmp_path / "s")  # read-only, once the writer's object is closed
    with pytest.raises(ServingStoreError, match="read-only"):
        r.apply([(b"item/x", b"{}")])
    with pytest.raises(ServingStoreError):
        ServingWriter(r)
    r.close()


def _open_fds(path) -> int:
    """How many of this process's file descriptors point at `path`."""
    import os

    fds = os.listdir("/proc/self/fd")
    return sum(os.path.realpath(f"/proc/self/fd/{fd}") == str(path.resolve()) for fd in fds)


@pytest.mark.parametrize("made", ["empty file", "file only", "meta, no format yet"])
def test_a_reader_that_opens_a_store_its_writer_is_still_creating_is_told_to_try_again(tmp_path, made):
    # The moments between the writer's lmdb.open and its format record: the model server (or any
    # reader) starting beside the flow can open the store then.
    import lmdb

    path = tmp_path / "s"
    path.mkdir()
    if made == "empty file":
        (path / "data.mdb").write_bytes(b"")
    else:
        env = lmdb.open(str(path), max_dbs=4)
        if made != "file only":
            env.open_db(b"data")
            env.open_db(b"meta")
        env.close()
    with pytest.raises(StoreNotReady, match="still being created"):
        LmdbServingStore(path)
    assert _open_fds(path / "data.mdb") == 0  # the failed open left no handle
    LmdbServingStore(path, writer=True).close()  # the writer finishes
    with LmdbServingStore(path) as r:
        assert r.stats().params_version == 0


def test_a_store_that_records_its_format_but_lacks_a_database_is_damaged_not_early(tmp_path):
    import lmdb

    LmdbServingStore(tmp_path / "s", writer=True).close()
    env = lmdb.open(str(tmp_path / "s"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"changes", txn=txn), delete=True)
    env.close()
    with pytest.raises(ServingStoreError, match="damaged") as e:
        LmdbServingStore(tmp_path / "s")
    assert not isinstance(e.value, StoreNotReady)
    assert _open_fds(tmp_path / "s" / "data.mdb") == 0


def test_build_recommender_finishes_creating_a_store_its_writer_has_begun(tmp_path):
    import lmdb

    from flows.config import Config
    from model.recommender import build_recommender

    path = tmp_path / "serving"
    path.mkdir()
    lmdb.open(str(path), max_dbs=4).close()
    rec = build_recommender(Config.from_env({}, state_dir=tmp_path))
    assert rec.health().items == 0
    rec.store.close()


def test_raw_records_take_the_same_path(store):
    recs = Records.from_pairs([(b"item/a", b"{}"), (b"item/b", b"{}"), (b"item/a", None), (b"item/b", b'{"x":1}')])
    v = ServingWriter(store).apply(recs)
    assert store.get([b"item/a", b"item/b"]) == [None, b'{"x":1}']
    assert store.changes_since(v - 1) == (v, [b"item/a", b"item/b"])


# ------------------------------------------------------------------------- a reader process

DIM, N_IDS = 64, 1500


def _reader(path: str, ready, stop, out) -> None:
    """Reads every row in a loop; every row must be whole (all values = its version), and every
    read one snapshot (all rows of one version: each write writes them all)."""
    from paramserver.serving import LmdbServingStore

    try:
        store = LmdbServingStore(path)
    except Exception as exc:
        out.put({"error": repr(exc)})
        return
    ids = [str(i) for i in range(N_IDS)]
    reads = torn = mixed = backwards = 0
    seen: set[int] = set()
    last = 0
    try:
        while not stop.is_set():
            got = store.read_rows("emb", ids, dim=DIM)
            if not got.found.any():
                continue
            reads += 1
            ready.set()
            v = got.versions[got.found]
            rows = got.values[got.found]
            torn += int((rows != v[:, None].astype(np.float32)).any(axis=1).sum())
            mixed += int(len(np.unique(v)) != 1 or not got.found.all())
            backwards += int(int(v.min()) < last)
            last = int(v.max())
            seen.update(np.unique(v).tolist())
        out.put({"reads": reads, "torn": torn, "mixed": mixed, "backwards": backwards, "versions": len(seen),
                 "map_size": store.env.info()["map_size"]})
    except Exception as exc:  # reported, so the test fails with it
        out.put({"error": repr(exc)})
    finally:
        store.close()


@pytest.mark.slow
def test_a_reader_process_never_sees_a_torn_row_while_the_writer_syncs(tmp_path):
    path = tmp_path / "s"
    s = LmdbServingStore(path, writer=True, map_size=128 * 1024)  # grows several times meanwhile
    w = ServingWriter(s)
    ids = [str(i) for i in range(N_IDS)]
    w.write([batch("emb", ids, 1, dim=DIM)])
    ctx = multiprocessing.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_reader, args=(str(path), ready, stop, out))
    proc.start()
    try:
        if not ready.wait(60):
            pytest.fail(f"the reader process never read: {out.get(timeout=1) if not out.empty() else 'no word'}")
        version, until = 1, time.monotonic() + 3
        while version < 300 or time.monotonic() < until:
            version += 1
            w.write([batch("emb", ids, version, dim=DIM)])
        stop.set()
        res = out.get(timeout=60)
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert "error" not in res, res
    assert res["reads"] > 10 and res["versions"] > 5, res
    assert res["torn"] == 0 and res["mixed"] == 0 and res["backwards"] == 0, res
    assert s.env.info()["map_size"] > 128 * 1024 and res["map_size"] > 128 * 1024  # both adopted growth
    s.close()


# ------------------------------------------------------------------------------ the row cache


@settings(max_examples=30, deadline=None)
@given(ops=st.lists(st.tuples(st.sets(st.integers(0, 30), max_size=8), st.sets(st.integers(0, 30), max_size=3),
                              st.booleans()), min_size=1, max_size=15))
def test_a_row_cache_refreshed_from_the_change_log_reads_what_the_store_holds(tmp_path_factory, ops):
    s = LmdbServingStore(tmp_path_factory.mktemp("c") / "s", writer=True, changelog_versions=4)
    w = ServingWriter(s)
    w.write([batch("s", ["0"], 1)])
    cache = RowCache(s, {"s": 4})
    ids = [str(i) for i in range(31)]
    for version, (put, evict, refresh) in enumerate(ops, start=2):
        w.write([batch("s", [str(i) for i in sorted(put)], version, evicted=[str(i) for i in sorted(evict - put)]),
                 batch("other", ["x"], version)])
        if refresh:
            cache.refresh()
            want, got = s.read_rows("s", ids, dim=4), cache.read_rows("s", ids)
            assert np.array_equal(want.found, got.found) and np.array_equal(want.versions, got.versions)
            assert np.array_equal(want.values, got.values)
    s.close()


def test_a_row_cache_rereads_only_changed_rows_and_reloads_when_too_far_behind(tmp_path):
    s = LmdbServingStore(tmp_path / "s", writer=True, changelog_versions=2)
    w = ServingWriter(s)
    w.write([batch("s", [str(i) for i in range(100)], 1)])
    cache = RowCache(s, {"s": 4})
    assert len(cache) == 100 and cache.reloads == 1
    w.write([batch("s", ["5", "6"], 2)], items={"v": {}})
    assert cache.refresh() == 2 and cache.reloads == 1
    assert cache.read_rows("s", ["5", "7"]).versions.tolist() == [2, 1]
    for v in range(3, 7):
        w.write([batch("s", ["9"], v)])
    assert cache.refresh() == 100 and cache.reloads == 2  # the log kept 2 versions: a full reload
    assert cache.read_rows("s", ["9", "nope"]).versions.tolist() == [6, 0]
    s.close()


def test_a_store_dropped_without_close_can_be_opened_again(tmp_path):
    import gc

    s = LmdbServingStore(tmp_path / "s", writer=True)
    ServingWriter(s).write(items={"a": {}})
    del s
    gc.collect()
    with LmdbServingStore(tmp_path / "s", writer=True) as s:
        assert s.read_items(["a"]) == [{}]


def test_an_empty_value_deletes_however_the_records_were_built(store):
    w = ServingWriter(store)
    w.write(items={"a": {}, "b": {}})
    recs = Records()
    recs.add([b"item/a", b"item/c"], [b"", b"{}"])
    w.apply(recs)
    assert store.get([b"item/a", b"item/b", b"item/c"]) == [None, b"{}", b"{}"]
    assert store.keys(b"item/") == [b"item/b", b"item/c"]


def test_a_row_cache_keys_any_id_and_grows_past_its_first_size(tmp_path):
    s = LmdbServingStore(tmp_path / "s", writer=True)
    w = ServingWriter(s)
    odd = ["", "a\x00", "a", "é/ü", "x" * 100, "\x00", "日本"]
    w.write([batch("s", odd, 1)])
    cache = RowCache(s, {"s": 4})
    many = [f"id{i}" for i in range(5000)]
    w.write([batch("s", many, 2, evicted=["a"])])
    assert cache.refresh() == 5001 and cache.reloads == 1 and len(cache) == 5006
    ids = [*odd, *many[::7], "missing"]
    want, got = s.read_rows("s", ids, dim=4), cache.read_rows("s", ids)
    assert np.array_equal(want.found, got.found) and np.array_equal(want.versions, got.versions)
    assert np.array_equal(want.values, got.values) and not got.found[2] and not got.found[-1]
    w.write([batch("s", odd, 3)])  # the odd ids again, through a refresh (one of them holds a NUL)
    w.write([batch("s", ["é/ü", "x" * 100], 4)])  # and with none
    assert cache.refresh() == len(odd) and cache.reloads == 1
    want, got = s.read_rows("s", ids, dim=4), cache.read_rows("s", ids)
    assert np.array_equal(want.found, got.found) and np.array_equal(want.versions, got.versions)
    assert np.array_equal(want.values, got.values) and got.versions[:len(odd)].tolist() == [3, 3, 3, 4, 4, 3, 3]
    s.close()


def test_a_row_cache_reads_an_id_too_long_for_a_key_as_the_store_does(tmp_path):
    s = LmdbServingStore(tmp_path / "s", writer=True)
    w = ServingWriter(s)
    long_ = ["L" * 600, "é" * 300]  # over 511 bytes: the store keys them by a digest
    w.write([batch("s", [*long_, "short"], 1)])
    cache = RowCache(s, {"s": 4})
    w.write([batch("s", long_[:1], 2)])
    cache.refresh()
    want, got = s.read_rows("s", [*long_, "short"], dim=4), cache.read_rows("s", [*long_, "short"])
    assert got.found.all() and got.versions.tolist() == [2, 1, 1]
    assert np.array_equal(want.values, got.values)
    s.close()


def test_a_row_cache_applies_changes_read_once_for_it_and_reloads_when_they_miss_some(tmp_path):
    s = LmdbServingStore(tmp_path / "s", writer=True)
    w = ServingWriter(s)
    w.write([batch("s", ["a", "b"], 1)])
    cache = RowCache(s, {"s": 4})
    held = cache.version
    w.write([batch("s", ["a"], 2)])
    version, keys = s.changes_since(held)
    assert cache.apply(held, version, keys) == 1 and cache.version == version and cache.reloads == 1
    assert cache.read_rows("s", ["a", "b"]).versions.tolist() == [2, 1]
    w.write([batch("s", ["b"], 3)])
    w.write([batch("s", ["a"], 4)])
    later = s.changes_since(version + 1)  # the changes after the version it holds, less the first
    assert later is not None
    assert cache.apply(version + 1, *later) == 2 and cache.reloads == 2  # it would miss b: reload
    assert cache.read_rows("s", ["a", "b"]).versions.tolist() == [4, 3]
    s.close()
