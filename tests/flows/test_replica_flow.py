"""On Kafka, the flow's writer step publishes to `param-deltas` (rows, dense weights, the catalog and
users' recent actions), and `freshrec replica` rebuilds from it a serving store that holds what the
primary holds, with training on or off."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from bytewax.testing import run_main

from flows.cli import main
from flows.events import ItemEvent, encode
from flows.kafka_local import create_topics
from flows.pipeline import build_flow
from tests.flows.test_kafka_flow import STREAMS, produce
from tests.helpers import action, config_for, feature

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
T0 = 1764288000.0


@pytest.mark.parametrize("train", [1, 0])
def test_a_replica_fed_by_param_deltas_serves_like_the_primary(tmp_path, kafka_bootstrap, train):
    prefix = f"t{uuid.uuid4().hex[:8]}."
    create_topics(kafka_bootstrap, {prefix + s: 1 for s in (*STREAMS, "param-deltas")},
                  compacted=[prefix + "param-deltas"])
    produce(kafka_bootstrap, prefix + "features", [encode(feature(i, T0 + i)) for i in range(600)], "request_id")
    produce(kafka_bootstrap, prefix + "actions", [encode(action(i, T0 + i + 1)) for i in range(0, 600, 2)],
            "request_id")
    produce(kafka_bootstrap, prefix + "items",
            [encode(ItemEvent(item_id=f"v{i}", ts=T0 - 100 + i, sparse={"author": f"a{i % 3}"})) for i in range(10)],
            "item_id")
    config = config_for(tmp_path, source="kafka", brokers=kafka_bootstrap, topic_prefix=prefix, train=train,
                        train_batch=64)
    run_main(build_flow(config))

    replica_dir = tmp_path / "replica"
    assert main(["replica", "--once", "--store", str(replica_dir), "--brokers", kafka_bootstrap,
                 "--topic-prefix", prefix, "--data-dir", str(tmp_path / "data"),
                 "--state-dir", str(tmp_path / "state")]) == 0

    from paramserver.serving import LmdbServingStore

    with LmdbServingStore(tmp_path / "state" / "serving") as primary, LmdbServingStore(replica_dir) as replica:
        keys = primary.keys()
        assert replica.keys() == keys and replica.get(keys) == primary.get(keys)
        # The catalog: the items stream's ten items and the three only impressions describe; and
        # every user's recent actions.
        items = [f"v{i}" for i in range(13)]
        catalog = replica.read_items(items)
        assert [e["source"] for e in catalog] == ["items"] * 10 + ["features"] * 3
        assert sum(e["impressions"] for e in catalog) == 600 and sum(e["positives"] for e in catalog) == 300
        assert catalog[4]["sparse"] == {"author": "a1"}
        users = [f"u{i}" for i in range(7)]
        assert all(replica.read_users(users)) and replica.read_users(users) == primary.read_users(users)
        rows = [k for k in keys if k.startswith((b"user_id", b"item_id"))]
        if not train:
            assert rows == [] and replica.read_dense() is None
            return
        assert len(rows) == 2 * (7 + 13)  # ids and their biases
        users = [f"u{i}" for i in range(7)]
        a, b = primary.read_rows("user_id", users), replica.read_rows("user_id", users)
        assert a.found.all() and np.array_equal(a.values, b.values)
        assert replica.read_dense().version == primary.read_dense().version
