"""DeltaSync: only touched rows, one transaction per sync, dense weights at their own interval."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from paramserver.rows import DenseBlob, RowBatch
from paramserver.serving import LmdbServingStore, ServingWriter
from paramserver.sync import DeltaSync


class FakeParams:
    """A training table in miniature: rows by id, a touched set, dense weights with a version."""

    def __init__(self, dim: int = 4):
        self.dim = dim
        self.rows: dict[str, tuple[np.ndarray, int]] = {}
        self.touched: dict[str, float] = {}
        self.evicted: list[str] = []
        self.dense_blob = DenseBlob(1, {"w": np.zeros(3, np.float32)}, 0.0)
        self.dense_calls = 0
        self.lock = threading.Lock()

    def push(self, ids, arrival=None):
        with self.lock:
            for i in ids:
                _, v = self.rows.get(i, (None, 0))
                self.rows[i] = (np.full(self.dim, v + 1, np.float32), v + 1)
                self.touched.setdefault(i, arrival if arrival is not None else time.time())

    def evict(self, ids):
        with self.lock:
            for i in ids:
                self.rows.pop(i, None)
                self.touched.pop(i, None)
                self.evicted.append(i)

    def take_touched(self, *, skip=()) -> list[RowBatch]:
        with self.lock:
            if "s" in skip:  # its one slot
                return []
            ids = list(self.touched)
            if not ids and not self.evicted:
                return []
            vals = np.array([self.rows[i][0] for i in ids], np.float32).reshape(len(ids), self.dim)
            b = RowBatch("s", self.dim, ids, vals, np.array([self.rows[i][1] for i in ids], np.uint64),
                         np.array([self.touched[i] for i in ids]), time.time(), evicted=self.evicted)
            self.touched, self.evicted = {}, []
            return [b]

    def dense(self) -> DenseBlob:
        self.dense_calls += 1
        return self.dense_blob


@pytest.fixture
def store(tmp_path):
    s = LmdbServingStore(tmp_path / "s", writer=True, name="sync-test")
    yield s
    s.close()


def test_maybe_sync_pushes_only_touched_rows_when_the_interval_passed(store):
    params = FakeParams()
    sync = DeltaSync(params, ServingWriter(store), interval_s=0.2, dense_interval_s=10.0)
    params.push(["a", "b", "c"])
    assert sync.maybe_sync(now=100.0) == 3
    v = store.params_version()
    params.push(["b"])
    assert sync.maybe_sync(now=100.1) == 0  # too soon
    assert store.params_version() == v
    assert sync.maybe_sync(now=100.2) == 1
    assert store.params_version() == v + 1  # one transaction
    assert store.changes_since(v) == (v + 1, [b"s/b"])
    got = store.read_rows("s", ["a", "b", "c"])
    assert got.versions.tolist() == [1, 2, 1]
    assert sync.maybe_sync(now=100.5) == 0  # nothing touched: no write
    assert store.params_version() == v + 1
    params.evict(["a"])
    assert sync.maybe_sync(now=101.0) == 1
    assert store.read_rows("s", ["a"]).found.tolist() == [False]


def test_dense_weights_go_at_their_own_interval_and_only_when_their_version_moved(store):
    params = FakeParams()
    sync = DeltaSync(params, ServingWriter(store), interval_s=0.2, dense_interval_s=10.0)
    sync.maybe_sync(now=0.0)
    assert store.dense_version() == 1  # the first sync writes them
    params.dense_blob = DenseBlob(2, {"w": np.ones(3, np.float32)}, 1.0)
    params.push(["x"])
    sync.maybe_sync(now=5.0)
    assert store.dense_version() == 1  # rows went, the dense weights wait for their interval
    assert sync.maybe_sync(now=10.0) == 0
    assert store.dense_version() == 2
    v = store.params_version()
    calls = params.dense_calls
    assert sync.maybe_sync(now=20.5) == 0
    assert params.dense_calls == calls + 1 and store.params_version() == v  # same version: nothing written
    assert store.read_dense().arrays["w"].tolist() == [1.0, 1.0, 1.0]


def test_rows_of_a_failed_sync_go_with_the_next(store):
    params = FakeParams()
    writer = ServingWriter(store)
    sync = DeltaSync(params, writer, interval_s=0.2)
    params.push(["a"])
    real = writer.write
    writer.write = lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone"))
    with pytest.raises(OSError):
        sync.maybe_sync(now=1.0)
    writer.write = real
    params.push(["b"])
    assert sync.maybe_sync(now=2.0) == 2
    assert store.read_rows("s", ["a", "b"]).found.all()


def test_metrics_count_rows_and_show_the_version(store):
    params = FakeParams()
    sync = DeltaSync(params, ServingWriter(store), interval_s=0.2)
    get = REGISTRY.get_sample_value
    before = get("freshrec_sync_rows_total", {"store": "sync-test"}) or 0
    n_before = get("freshrec_sync_seconds_count", {"store": "sync-test"}) or 0
    params.push([str(i) for i in range(50)], arrival=time.time() - 0.01)
    sync.maybe_sync()
    assert get("freshrec_sync_rows_total", {"store": "sync-test"}) == before + 50
    assert get("freshrec_sync_seconds_count", {"store": "sync-test"}) == n_before + 1
    assert get("freshrec_params_version", {"store": "sync-test"}) == store.params_version()
    assert get("freshrec_sync_freshness_seconds_count", {"store": "sync-test"}) >= 50
    assert store.stats().freshness_ms >= 10.0


def test_background_thread_keeps_the_store_fresh(store):
    params = FakeParams()
    sync = DeltaSync(params, ServingWriter(store), interval_s=0.02, dense_interval_s=0.1)
    sync.start()
    try:
        with pytest.raises(RuntimeError):
            sync.start()
        for round_ in range(20):
            params.push([f"r{round_}"])
            time.sleep(0.005)
        deadline = time.monotonic() + 5
        while store.read_rows("s", ["r19"]).found.tolist() != [True] and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sync.stop()
    got = store.read_rows("s", [f"r{i}" for i in range(20)])
    assert got.found.all()
    assert sync.syncs >= 2 and sync.rows_pushed == 20
    assert store.stats().staleness_ms < 5000


class FakeCatalog:
    """Hands out what changed since its last call, as the flow's catalog does."""

    def __init__(self):
        self.items: dict = {}
        self.users: dict = {}

    def take(self):
        items, users, self.items, self.users = self.items, self.users, {}, {}
        return items, users


def test_catalog_updates_go_in_the_same_transaction_as_the_rows(store):
    params, catalog = FakeParams(), FakeCatalog()
    sync = DeltaSync(params, ServingWriter(store), interval_s=0.2, extra=catalog.take)
    sync.maybe_sync(now=0.0)
    v = store.params_version()
    params.push(["a"])
    catalog.items["v1"] = {"item_id": "v1", "impressions": 3}
    catalog.users["u1"] = [["v1", "like", 5.0]]
    assert sync.maybe_sync(now=1.0) == 1
    assert store.params_version() == v + 1  # one transaction for all three
    assert sorted(store.changes_since(v)[1]) == [b"item/v1", b"s/a", b"user/u1"]
    assert store.read_items(["v1"]) == [{"item_id": "v1", "impressions": 3}]
    assert store.read_users(["u1"]) == [[("v1", "like", 5.0)]]
    get = REGISTRY.get_sample_value
    assert get("freshrec_sync_catalog_items_total", {"store": "sync-test"}) >= 1
    catalog.items["v2"] = {"item_id": "v2"}  # the catalog alone makes a write
    assert sync.maybe_sync(now=2.0) == 0 and store.params_version() == v + 2


def test_catalog_updates_of_a_failed_sync_go_with_the_next_and_newer_ones_win(store):
    catalog = FakeCatalog()
    writer = ServingWriter(store)
    sync = DeltaSync(None, writer, interval_s=0.2, extra=catalog.take)  # no training tables
    catalog.items.update(v1={"n": 1}, v2={"n": 1})
    catalog.users["u1"] = [["v1", "click", 1.0]]
    real = writer.write
    writer.write = lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone"))
    with pytest.raises(OSError):
        sync.maybe_sync(now=1.0)
    writer.write = real
    catalog.items["v2"] = {"n": 2}
    sync.maybe_sync(now=2.0)
    assert store.read_items(["v1", "v2"]) == [{"n": 1}, {"n": 2}]
    assert store.read_users(["u1"]) == [[("v1", "click", 1.0)]]
    assert store.dense_version() == 0 and store.keys(b"dense/") == []  # no params: no dense weights


def test_slow_slots_go_at_their_own_interval_and_a_direct_sync_takes_every_slot(store):
    from paramserver.store import ParameterStore
    from paramserver.table import SlotConfig

    params = ParameterStore({s: SlotConfig(dim=2, min_count=1) for s in ("user_id", "item_id", "author")})
    sync = DeltaSync(params, ServingWriter(store), interval_s=0.125, dense_interval_s=1e9,
                     slow_slots=("item_id", "author"), slow_interval_s=0.5)

    def touch(now: float) -> None:
        for slot, ids in (("user_id", ["u1"]), ("item_id", ["v1", "v2"]), ("author", ["a1"])):
            params.pull(slot, ids, now=now)
            params.push(slot, ids, np.ones((len(ids), 2), np.float32), now=now)

    def versions(slot: str, ids: list[str]) -> list[int]:
        return store.read_rows(slot, ids).versions.tolist()

    touch(10.0)
    assert sync.maybe_sync(now=10.0) == 4  # the first sync takes every slot
    touch(10.0625)
    assert sync.maybe_sync(now=10.125) == 1  # the user's row at once; the items' and author's wait
    assert versions("user_id", ["u1"]) == [2] and versions("item_id", ["v1", "v2"]) == [1, 1]
    touch(10.25)
    assert sync.maybe_sync(now=10.25) == 1
    assert versions("item_id", ["v1", "v2"]) == [1, 1] and versions("author", ["a1"]) == [1]
    assert sync.maybe_sync(now=10.5) == 3  # their interval passed: the rows touched meanwhile, once each
    assert versions("item_id", ["v1", "v2"]) == [3, 3] and versions("author", ["a1"]) == [3]
    touch(10.625)
    assert sync.sync(now=10.625) == 4  # a direct sync (a snapshot's, the last) takes every slot
    assert versions("item_id", ["v1", "v2"]) == [4, 4] and versions("user_id", ["u1"]) == [4]


def test_slow_slots_need_a_longer_interval_to_wait(store):
    params = FakeParams()
    sync = DeltaSync(params, ServingWriter(store), interval_s=0.25, slow_slots=("s",), slow_interval_s=0.125)
    assert sync.slow_slots == frozenset()  # never less often than the sync itself: every sync takes them
    with pytest.raises(ValueError, match="positive"):
        DeltaSync(params, ServingWriter(store), slow_slots=("s",), slow_interval_s=0.0)


def _tables(**config):
    from paramserver.store import ParameterStore
    from paramserver.table import SlotConfig

    return ParameterStore({s: SlotConfig(dim=2, min_count=1, **config) for s in ("user_id", "item_id")})


def _touch(params, now: float, items=("v1",)) -> None:
    for slot, ids in (("user_id", ["u1"]), ("item_id", list(items))):
        params.pull(slot, ids, now=now)
        params.push(slot, ids, np.ones((len(ids), 2), np.float32), now=now)


def test_slow_rows_of_a_failed_sync_wait_in_it_and_evictions_of_slow_slots_go_at_their_interval(store):
    params = _tables(expire_s=1.0)
    writer = ServingWriter(store)
    sync = DeltaSync(params, writer, interval_s=0.125, dense_interval_s=1e9, slow_slots=("item_id",),
                     slow_interval_s=0.5)
    _touch(params, 10.0)
    real = writer.write
    writer.write = lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone"))
    with pytest.raises(OSError):
        sync.maybe_sync(now=10.0)  # a slow one: it took the item's row too
    writer.write = real
    assert sync.maybe_sync(now=10.125) == 2  # the next, fast, writes what the failed one took
    assert store.read_rows("item_id", ["v1"]).found.all()
    _touch(params, 11.5, items=())  # the user stays; the item's row expires
    assert params.expire(now=12.0) == 1
    assert sync.maybe_sync(now=12.0) == 2  # slow: the user's row and the item's tombstone
    assert not store.read_rows("item_id", ["v1"]).found.any()
    _touch(params, 12.0, items=("v2",))
    assert sync.maybe_sync(now=12.125) == 1  # the user's row; v2's waits
    assert params.expire(now=13.25) == 2  # both idle past expire_s, v2 before its row was written
    assert sync.maybe_sync(now=13.25) == 2  # slow again: the user's tombstone, and v2's
    assert not store.read_rows("user_id", ["u1"]).found.any()
    assert not store.read_rows("item_id", ["v1", "v2"]).found.any()


def test_stop_takes_every_slot(store):
    params = _tables()
    sync = DeltaSync(params, ServingWriter(store), interval_s=0.125, dense_interval_s=1e9, slow_slots=("item_id",),
                     slow_interval_s=100.0)
    _touch(params, 10.0)
    assert sync.maybe_sync(now=10.0) == 2
    _touch(params, 10.125)
    assert sync.maybe_sync(now=10.25) == 1  # the item waits for its interval
    assert store.read_rows("item_id", ["v1"]).versions.tolist() == [1]
    sync.stop()  # its final sync takes it
    assert store.read_rows("item_id", ["v1"]).versions.tolist() == [2]
