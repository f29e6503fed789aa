"""A serving replica fed by the param-deltas topic on a real Kafka broker serves like the primary:
after a full copy (bootstrap), while tailing, and after a restart that resumes from its own store."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
from prometheus_client import REGISTRY

from flows.kafka_local import create_topics
from paramserver.replica import ParamDeltaReplica, ReplicaError
from paramserver.rows import DenseBlob
from paramserver.serving import KafkaDeltaProducer, LmdbServingStore, ServingWriter, _decode_change
from paramserver.sync import DeltaSync
from tests.paramserver.test_sync import FakeParams

pytestmark = pytest.mark.kafka


def contents(store):
    return dict(store.scan())


def writes_of(store):
    """The keys of each write, oldest first, from the store's change log."""
    with store.env.begin(db=store._changes) as txn:
        return [_decode_change(v) for _, v in txn.cursor()]


def wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def assert_same(primary, replica, params):
    assert contents(replica) == contents(primary)
    ids = sorted(params.rows)
    a, b = primary.read_rows("s", ids), replica.read_rows("s", ids)
    assert a.found.all() and np.array_equal(a.values, b.values) and np.array_equal(a.versions, b.versions)
    da, db = primary.read_dense(), replica.read_dense()
    assert da.version == db.version and all(np.array_equal(da.arrays[k], db.arrays[k]) for k in da.arrays)
    assert replica.dense_version() == primary.dense_version()


def test_replica_bootstraps_tails_and_resumes_like_the_primary(tmp_path, kafka_bootstrap):
    topic = f"t{uuid.uuid4().hex[:8]}.param-deltas"
    create_topics(kafka_bootstrap, {topic: 1}, compacted=[topic])
    primary = LmdbServingStore(tmp_path / "primary", writer=True, name="primary-r")
    producer = KafkaDeltaProducer(kafka_bootstrap, topic)
    writer = ServingWriter(primary, producer, chunk_bytes=256)
    params = FakeParams(dim=8)
    sync = DeltaSync(params, writer, interval_s=0.2, dense_interval_s=1.0)

    now = 1000.0
    for round_ in range(6):
        params.push([f"id{i}" for i in range(round_ * 7, round_ * 7 + 40)])
        if round_ == 3:
            params.evict(["id0", "id1"])
        params.dense_blob = DenseBlob(round_ + 1, {"w": np.full((10, 10), round_, np.float32),
                                                   **({"b": np.ones(3, np.float32)} if round_ < 4 else {})}, now)
        now += 1.0
        sync.maybe_sync(now=now)
    writer.write(items={f"v{i}": {"item_id": f"v{i}", "ts": 1.0 + i, "popularity": {"like": i}} for i in range(20)},
                 users={"u1": [("v1", "like", 2.0)], "u2": [("v3", "click", 3.0)]})
    writer.write(items={"v0": None}, users={"u2": None})
    assert producer.flush() == 0

    # A new replica: a full copy, in small batches that must still apply the primary's writes whole.
    rstore = LmdbServingStore(tmp_path / "replica", writer=True, name="replica-r")
    replica = ParamDeltaReplica(rstore, kafka_bootstrap, topic, batch_records=7)
    assert replica.bootstrap(timeout_s=60) == sum(len(w) for w in writes_of(primary))
    assert replica.caught_up
    assert_same(primary, rstore, params)
    assert rstore.stats().source_version == primary.params_version()
    assert rstore.read_items(["v0", "v5"]) == [None, {"item_id": "v5", "ts": 6.0, "popularity": {"like": 5}}]
    assert rstore.read_users(["u1", "u2"]) == [[("v1", "like", 2.0)], None]
    # Each of the replica's writes is one or more whole writes of the primary.
    flat = [k for w in writes_of(primary) for k in w]
    assert [k for w in writes_of(rstore) for k in w] == flat
    bounds = set(np.cumsum([len(w) for w in writes_of(primary)]).tolist())
    assert set(np.cumsum([len(w) for w in writes_of(rstore)]).tolist()) <= bounds
    # Freshness is measured at the replica too, from the arrival times the rows carry.
    assert REGISTRY.get_sample_value("freshrec_sync_freshness_seconds_count", {"store": "replica-r"}) > 0
    assert rstore.stats().freshness_ms is not None

    # Tailing.
    stop = threading.Event()
    runner = threading.Thread(target=replica.run, args=(stop,))
    runner.start()
    try:
        params.push(["new1", "id5"])
        params.evict(["id9"])
        params.dense_blob = DenseBlob(50, {"w": np.full(7, 9, np.float32)}, now)
        sync.maybe_sync(now=now + 5)
        assert producer.flush() == 0
        wait_for(lambda: rstore.stats().source_version == primary.params_version())
    finally:
        stop.set()
        runner.join(30)
    assert_same(primary, rstore, params)
    assert rstore.read_rows("s", ["id9"]).found.tolist() == [False]
    replica.close()
    rstore.close()

    # A restart resumes from the offsets kept in the replica's own store: nothing applied twice.
    writer.write(items={"late": {"item_id": "late"}})
    assert producer.flush() == 0
    rstore = LmdbServingStore(tmp_path / "replica", writer=True, name="replica-r")
    version = rstore.params_version()
    with ParamDeltaReplica(rstore, kafka_bootstrap, topic) as replica:
        assert replica.bootstrap(timeout_s=60) == 1
    assert rstore.params_version() == version + 1
    assert contents(rstore) == contents(primary)
    rstore.close()

    # And a replica started now, from the compacted topic, holds the same.
    fresh = LmdbServingStore(tmp_path / "fresh", writer=True, name="replica-r2")
    with ParamDeltaReplica(fresh, kafka_bootstrap, topic, batch_records=1000) as replica:
        replica.bootstrap(timeout_s=60)
    assert_same(primary, fresh, params)
    fresh.close()
    writer.close()
    primary.close()


def test_a_replica_of_an_empty_topic_is_caught_up_at_once(tmp_path, kafka_bootstrap):
    topic = f"t{uuid.uuid4().hex[:8]}.param-deltas"
    create_topics(kafka_bootstrap, {topic: 1}, compacted=[topic])
    store = LmdbServingStore(tmp_path / "r", writer=True)
    with ParamDeltaReplica(store, kafka_bootstrap, topic) as replica:
        assert replica.bootstrap(timeout_s=30) == 0 and replica.caught_up
        assert replica.lag() == 0
    store.close()


def test_a_replica_refuses_a_missing_topic(tmp_path, kafka_bootstrap):
    store = LmdbServingStore(tmp_path / "r", writer=True)
    with pytest.raises(ReplicaError, match="not there"):
        ParamDeltaReplica(store, kafka_bootstrap, f"missing-{uuid.uuid4().hex}",
                          consumer_config={"allow.auto.create.topics": False})
    store.close()
