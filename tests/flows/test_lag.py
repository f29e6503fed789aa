"""The flow's own Kafka lag on a real broker, read from the flow process's /metrics.

N messages wait on the topics before the flow starts (in follow mode, so it never ends): while it
has not read them, each partition's `freshrec_source_kafka_lag` shows about its backlog; once it
has caught up, every partition shows 0.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections import defaultdict

import pytest

from flows.dashboard import parse_metrics
from flows.events import encode
from flows.kafka_local import create_topics
from flows.processes import FlowProcess
from tests.flows.test_cluster import free_ports
from tests.flows.test_kafka_flow import STREAMS, T0, produce
from tests.helpers import action, config_for, feature

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

N = 20_000  # feature events; the Kafka source reads 1,000 a batch, so "before it reads" is N-ish


def partition_counts(bootstrap: str, topic: str) -> dict[str, int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}"})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return {str(p): c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    finally:
        c.close()


def lags(port: int) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return {(lab["topic"], lab["partition"]): v for n, lab, v in parse_metrics(text)
            if n == "freshrec_source_kafka_lag"}


def test_kafka_lag_shows_the_backlog_before_the_flow_reads_it_and_zero_once_caught_up(tmp_path, kafka_bootstrap):
    prefix = f"t{uuid.uuid4().hex[:8]}."
    create_topics(kafka_bootstrap, {prefix + s: 2 for s in STREAMS})
    produce(kafka_bootstrap, prefix + "features", [encode(feature(i, T0 + i * 0.01)) for i in range(N)], "request_id")
    produce(kafka_bootstrap, prefix + "actions", [encode(action(i, T0 + i * 0.01 + 1)) for i in range(0, N, 10)],
            "request_id")
    backlog = {(prefix + s, p): n for s in ("features", "actions", "items")
               for p, n in partition_counts(kafka_bootstrap, prefix + s).items()}
    assert sum(n for (t, _), n in backlog.items() if t.endswith("features")) == N

    (port,) = free_ports(1)
    config = config_for(tmp_path, buckets=2, source="kafka", brokers=kafka_bootstrap, topic_prefix=prefix,
                        follow="1", metrics_port=port, kafka_lag_s="0.5")
    first: dict[tuple[str, str], float] = {}
    seen = defaultdict(list)
    with FlowProcess(config, log_path=tmp_path / "flow.log") as flow:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert flow.running, flow.log_tail()
            try:
                now = lags(port)
            except OSError:  # its metrics server is not up yet
                now = {}
            for tp, v in now.items():
                first.setdefault(tp, v)
                seen[tp].append(v)
            if set(now) >= set(backlog) and not any(now.values()):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the lag never went to 0 on every partition: {dict(seen)}\n{flow.log_tail()}")

    # Each partition is listed, and is at 0 now that the flow has read everything.
    assert set(first) >= set(backlog)
    for tp, n in backlog.items():
        assert seen[tp][-1] == 0
        assert max(seen[tp]) <= n
        if n >= 2_000:  # a backlog of a few source batches or more: seen before it was read
            assert first[tp] >= 0.8 * n, (tp, first[tp], n)
    assert sum(max(seen[tp]) for tp in backlog if tp[0].endswith("features")) >= 0.8 * N
