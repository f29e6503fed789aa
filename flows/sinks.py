"""The flow's sinks: a stream written to its folder of JSON Lines files, or to its Kafka topic.

Each worker appends to its own file (named when it starts, rotated by size). Bytewax's sinks are
at-least-once: after a crash the epoch in flight is written again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from flows.config import Config
from flows.events import encode
from flows.streams import StreamWriter

KeyOf = Callable[[Any], Optional[str]]

class _FilePartition(StatelessSinkPartition[Any]):
    def __init__(self, writer: StreamWriter):
        self.writer = writer

    def write_batch(self, items: list[Any]) -> None:
        self.writer.write(items)

    def close(self) -> None:
        self.writer.close()


class FileStreamSink(DynamicSink[Any]):
    """Writes each item (an event struct, a dead letter or a dict) as one line of the stream."""

    def __init__(self, stream: str, config: Config):
        self.directory = config.stream_dir(stream)
        self.rotate_bytes = config.rotate_bytes

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _FilePartition:
        return _FilePartition(StreamWriter(self.directory, f"w{worker_index}", self.rotate_bytes))


class _KafkaPartition(StatelessSinkPartition[Any]):
    def __init__(self, producer: Any, topic: str, key_of: KeyOf):
        self.producer = producer
        self.topic = topic
        self.key_of = key_of

    def write_batch(self, items: list[Any]) -> None:
        for item in items:
            key = self.key_of(item)
            while True:
                try:
                    self.producer.produce(self.topic, encode(item),
                                          key.encode() if key is not None else None)
                    break
                except BufferError:
                    self.producer.poll(0.1)  # local queue full: let deliveries drain
            self.producer.poll(0)
        # Bytewax commits the epoch after this returns: wait until the broker has it all.
        remaining = self.producer.flush(60)
        if remaining:
            raise RuntimeError(f"Kafka did not acknowledge {remaining} messages to {self.topic!r} in 60 s")

    def close(self) -> None:
        self.producer.flush(60)


class KafkaStreamSink(DynamicSink[Any]):
    """Produces each item as one JSON message, keyed by `key_of(item)`."""

    def __init__(self, stream: str, config: Config, key_of: KeyOf = lambda item: None):
        self.topic = config.topic(stream)
        self.config = config
        self.key_of = key_of

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _KafkaPartition:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.config.brokers, "linger.ms": 5,
                             "enable.idempotence": "true", **self.config.kafka_settings()})
        return _KafkaPartition(producer, self.topic, self.key_of)


def make_sink(stream: str, config: Config, key_of: KeyOf = lambda item: None) -> DynamicSink:
    if config.source == "kafka":
        return KafkaStreamSink(stream, config, key_of)
    return FileStreamSink(stream, config)
