"""A Kafka broker for the tests: `$KAFKA_BOOTSTRAP`, else a container where Docker runs, else a
real local broker from Kafka's jars (flows.kafka_local). Without any, tests skip (fail under CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import pytest

from flows import kafka_local

__all__ = ["kafka_bootstrap", "kafka_topics", "kafka_unavailable", "read_topic", "started"]


def kafka_unavailable(reason: str) -> NoReturn:
    """Skips the test for want of Kafka; under CI (CI=true) fails it: CI must never skip Kafka."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Kafka is required under CI: {reason}", pytrace=False)
    pytest.skip(f"no Kafka broker: {reason}")


@contextmanager
def started(broker: kafka_local.LocalKafka, what: str = "the local broker", *, topics: bool = False
            ) -> Iterator[kafka_local.LocalKafka]:
    """`broker` started (with the contract's unprefixed topics if `topics`), and stopped after;
    Kafka is unavailable (a skip; a failure under CI) if it will not start."""
    try:
        broker.start(topics=topics)
    except kafka_local.KafkaLocalError as exc:
        broker.stop()
        kafka_unavailable(f"{what} did not start: {exc}")
    try:
        yield broker
    finally:
        broker.stop()


def _docker_answers() -> bool:
    # Docker's Python client leaks a socket when nothing listens, so it is asked only where an
    # engine may be; the CLI (which knows contexts such as rootless ones) gets a second say.
    if os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists():
        try:
            import docker

            client = docker.from_env(timeout=5)
            try:
                if client.ping():
                    return True
            finally:
                client.close()
        except Exception:  # any failure means "no usable engine" to this client
            pass
    if shutil.which("docker") is None:
        return False
    try:
        probe = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a broker that lives for the whole test session."""
    env = os.environ.get("KAFKA_BOOTSTRAP")
    if env:
        yield env
        return
    if _docker_answers():
        from testcontainers.community.kafka import KafkaContainer

        image = os.environ.get("FRESHREC_KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.0")
        with KafkaContainer(image).with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    broker = kafka_local.LocalKafka(kafka_local.free_port_pair(), data_dir=tmp_path_factory.mktemp("kafka"))
    with started(broker, "no Docker engine, and the local broker", topics=True):
        yield broker.bootstrap


def kafka_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    *,
    compacted: Iterable[str] = (),
) -> dict[str, str]:
    """Creates a fresh, uniquely named topic for each name (LogAppendTime timestamps, as the
    contract's are); returns {name: actual topic name}. Names in `compacted` get
    cleanup.policy=compact.
    """
    suffix = uuid.uuid4().hex[:10]
    names = list(names)
    actual = {name: f"{name}-{suffix}" for name in names}
    kafka_local.create_topics(
        bootstrap,
        {topic: partitions for topic in actual.values()},
        compacted=[actual[name] for name in compacted],
    )
    return actual


def read_topic(bootstrap: str, topic: str) -> list:
    """Every message on `topic` now, partition by partition (a consumer of its own, no commits)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": "false"})
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        out = []
        for p in meta.partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high <= low:
                continue
            c.assign([TopicPartition(topic, p, low)])
            got = 0
            while got < high - low:
                m = c.poll(10)
                assert m is not None, f"timed out reading {topic}"
                if m.error():
                    continue
                out.append(m)
                got += 1
        return out
    finally:
        c.close()
