"""The flow on a real Kafka broker reads what it reads from files, with the same dead letters."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from bytewax.testing import TestingSink, run_main

from flows.events import encode
from flows.kafka_local import create_topics
from flows.pipeline import build_flow
from tests.flows.test_pipeline import BAD_ACTION, BAD_LINES, T0, read_dead, write
from tests.helpers import action, config_for, feature
from tests.kafka_support import read_topic

pytestmark = pytest.mark.kafka

STREAMS = ("features", "actions", "items", "dead-letter", "examples")


def inputs():
    features = [encode(feature(i, T0 + i)) for i in range(200)]
    features[10:10] = list(BAD_LINES)
    actions = [encode(action(i, T0 + i + 2)) for i in range(0, 200, 3)] + [BAD_ACTION]
    items = [b'{"item_id": "v1", "ts": 1764288000}', b"[]", b"\xc3\x28"]
    return {"features": features, "actions": actions, "items": items}


def produce(bootstrap, topic, lines, key_field):
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap})
    for line in lines:
        try:
            key = json.loads(line).get(key_field, "").encode()
        except Exception:  # a malformed message has no key; Kafka takes it all the same
            key = None
        p.produce(topic, line, key)
    assert p.flush(30) == 0



def same(reason: str) -> str:
    """A reason without the figures that depend on when it was read."""
    return re.sub(r"\d+ s ahead", "N s ahead", reason)


def summary(examples):
    return sorted((e.request_id, e.item_id, e.ts, e.label, e.label_ts) for e in examples)


def test_the_flow_reads_the_same_events_from_kafka_as_from_files(tmp_path, kafka_bootstrap):
    data = inputs()
    # Files.
    fconfig = config_for(tmp_path / "f", buckets=4)
    for stream, lines in data.items():
        write(fconfig.stream_dir(stream) / "x.jsonl", lines)
    from_files = []
    run_main(build_flow(fconfig, tap=TestingSink(from_files)))
    file_dead = sorted((d["stream"], same(d["reason"])) for d in read_dead(fconfig))

    # Kafka: the same lines on topics of their own.
    prefix = f"t{uuid.uuid4().hex[:8]}."
    create_topics(kafka_bootstrap, {prefix + s: 2 for s in STREAMS})
    for stream, lines in data.items():
        produce(kafka_bootstrap, prefix + stream, lines, "item_id" if stream == "items" else "request_id")
    kconfig = config_for(tmp_path / "k", buckets=4, source="kafka", brokers=kafka_bootstrap,
                         topic_prefix=prefix)
    from_kafka = []
    run_main(build_flow(kconfig, tap=TestingSink(from_kafka)))

    assert summary(from_kafka) == summary(from_files)
    assert len(summary(from_files)) == 200
    assert sum(e.label for e in from_files) == len(range(0, 200, 3))
    msgs = read_topic(kafka_bootstrap, prefix + "dead-letter")
    kafka_dead = sorted((json.loads(m.value())["stream"], same(json.loads(m.value())["reason"])) for m in msgs)
    assert kafka_dead == file_dead
    assert len(kafka_dead) == len(BAD_LINES) + 1 + 2
    # Arrival times on Kafka are the broker's log-append times.
    assert all(e.label_received_at > T0 for e in from_kafka if e.label)
    examples = read_topic(kafka_bootstrap, prefix + "examples")
    assert sorted(json.loads(m.value())["request_id"] for m in examples) == sorted(e.request_id for e in from_files)
    assert all(m.key() == json.loads(m.value())["request_id"].encode() for m in examples)


def test_without_follow_the_kafka_source_ends_at_the_offsets_of_its_start(tmp_path, kafka_bootstrap):
    prefix = f"t{uuid.uuid4().hex[:8]}."
    create_topics(kafka_bootstrap, {prefix + s: 1 for s in STREAMS})
    produce(kafka_bootstrap, prefix + "features", [encode(feature(i, T0 + i)) for i in range(20)], "request_id")
    config = config_for(tmp_path, buckets=2, source="kafka", brokers=kafka_bootstrap, topic_prefix=prefix)
    out = []
    run_main(build_flow(config, tap=TestingSink(out)))  # empty actions and items topics end at once
    assert len(summary(out)) == 20
