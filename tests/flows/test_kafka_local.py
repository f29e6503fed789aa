"""The local Kafka broker (flows.kafka_local) driven through its CLI, and the tests' broker fixture."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pytest

from flows import kafka_local
from tests.kafka_support import kafka_topics, kafka_unavailable

pytestmark = pytest.mark.kafka


def _need_local_broker() -> None:
    if shutil.which("java") is None:
        kafka_unavailable("java is not installed")
    jars_cached = (kafka_local.default_home() / "libs" / ".complete").exists()
    if not jars_cached and shutil.which("mvn") is None:
        kafka_unavailable("Kafka's jars are not cached and mvn is not installed to fetch them")


def _produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    errors = []
    for key, value in messages:
        producer.produce(topic, value=value, key=key, on_delivery=lambda err, _msg: errors.append(err))
    assert producer.flush(30) == 0
    assert errors == [None] * len(messages)


def _consume_all(bootstrap: str, topic: str, count: int) -> list:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}", "enable.auto.commit": False}
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        got = []
        deadline = time.monotonic() + 30
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None:
                assert msg.error() is None, msg.error()
                got.append(msg)
        return got
    finally:
        consumer.close()


def _topic_configs(bootstrap: str, topics: list[str]) -> dict[str, dict[str, str]]:
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": bootstrap})
    resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
    return {
        resource.name: {k: entry.value for k, entry in future.result(timeout=30).items()}
        for resource, future in admin.describe_configs(resources).items()
    }


def test_cli_start_produce_consume_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME

    _need_local_broker()
    port = kafka_local.free_port_pair()
    args = ["--port", str(port), "--data-dir", str(tmp_path / "kafka")]
    bootstrap = f"127.0.0.1:{port}"
    try:
        assert kafka_local.main(["start", *args]) == 0
        assert capsys.readouterr().out.strip() == bootstrap
        assert kafka_local.main(["status", *args]) == 0
        status = capsys.readouterr().out
        assert status.startswith("running pid=")
        pid = int(status.split()[1].removeprefix("pid="))
        if Path(f"/proc/{pid}/cmdline").exists():  # the broker's JVM compiles with C1 only
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert all(option.encode() in command for option in kafka_local.JIT_OPTIONS)
        # A second start finds the broker running and changes nothing.
        assert kafka_local.main(["start", *args]) == 0
        assert capsys.readouterr().out.strip() == bootstrap

        from confluent_kafka.admin import AdminClient

        metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
        expected = kafka_local.contract_topics()
        assert {t: len(metadata.topics[t].partitions) for t in expected} == expected
        configs = _topic_configs(bootstrap, list(expected))
        assert {t: c["message.timestamp.type"] for t, c in configs.items()} == dict.fromkeys(expected, "LogAppendTime")
        assert configs["param-deltas"]["cleanup.policy"] == "compact"
        assert configs["features"]["cleanup.policy"] == "delete"

        sent = [(f"r-{i}".encode(), f'{{"request_id": "r-{i}"}}'.encode()) for i in range(5)]
        before_ms = time.time() * 1000
        _produce(bootstrap, "features", sent)
        got = _consume_all(bootstrap, "features", len(sent))
        assert sorted((m.key(), m.value()) for m in got) == sorted(sent)
        for msg in got:
            kind, ts_ms = msg.timestamp()
            assert kind == TIMESTAMP_LOG_APPEND_TIME
            assert before_ms - 5_000 <= ts_ms <= time.time() * 1000 + 5_000
    finally:
        assert kafka_local.main(["stop", *args]) == 0
    assert capsys.readouterr().out.strip() == "stopped"
    assert kafka_local.main(["status", *args]) == kafka_local.EXIT_NOT_RUNNING
    assert capsys.readouterr().out.startswith("stopped")
    assert kafka_local.main(["stop", *args]) == 0  # stopping a stopped broker is fine
    assert capsys.readouterr().out.strip() == "not running"

    # The data dir survives a restart: same topics, same messages.
    try:
        assert kafka_local.main(["start", *args]) == 0
        assert len(_consume_all(bootstrap, "features", len(sent))) == len(sent)
    finally:
        assert kafka_local.main(["stop", *args]) == 0


def test_fixture_gives_a_broker_and_unique_topics(kafka_bootstrap: str) -> None:
    topics = kafka_topics(kafka_bootstrap, ["actions", "param-deltas"], 2, compacted=["param-deltas"])
    assert topics["actions"] != "actions" and topics["actions"].startswith("actions-")
    assert kafka_topics(kafka_bootstrap, ["actions"])["actions"] != topics["actions"]
    configs = _topic_configs(kafka_bootstrap, list(topics.values()))
    assert configs[topics["actions"]]["message.timestamp.type"] == "LogAppendTime"
    assert configs[topics["param-deltas"]]["cleanup.policy"] == "compact"
    _produce(kafka_bootstrap, topics["actions"], [(b"k", b"{}")])
    assert [m.value() for m in _consume_all(kafka_bootstrap, topics["actions"], 1)] == [b"{}"]
