"""Writing events to the input streams from outside the dataflow: the simulator and the replays.

One `EventOutput` per process, on files (each stream its own writer, its own file named at start)
or Kafka (one producer, keyed as the contract says). Every call writes a whole batch: one
`write(2)` per stream for files, one `poll` per batch for Kafka. Imports no Bytewax.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from flows.config import Config, ConfigError
from flows.events import ActionEvent, FeatureEvent, ItemEvent, encode_each
from flows.streams import StreamWriter

INPUT_STREAMS = ("items", "features", "actions")


def message_key(event: Any) -> bytes:
    """The contract's message key: item_id for items, request_id for features and actions."""
    return (event.item_id if isinstance(event, ItemEvent) else event.request_id).encode()


class EventOutput(Protocol):
    def write(self, stream: str, events: Sequence[ItemEvent | FeatureEvent | ActionEvent]) -> None:
        """Write a batch of events to `stream` (one of items, features, actions)."""

    def close(self) -> None:
        """Flush everything and release the files or the producer."""


def stamp(events: Sequence[Any], now: float | None = None) -> None:
    """Set `received_at` as freshrec's own writers do (CONTRACT.md, Streams)."""
    now = time.time() if now is None else now
    for e in events:
        e.received_at = now


class FileEventOutput:
    """The stream folders under FRESHREC_DATA_DIR; one writer (one file) per stream."""

    def __init__(self, config: Config, tag: str):
        self.config = config
        self.tag = tag
        self._writers: dict[str, StreamWriter] = {}

    def write(self, stream: str, events: Sequence[Any]) -> None:
        if not events:
            return
        writer = self._writers.get(stream)
        if writer is None:
            if stream not in INPUT_STREAMS:
                raise ValueError(f"not an input stream: {stream!r}")
            writer = StreamWriter(self.config.stream_dir(stream), self.tag, self.config.rotate_bytes)
            self._writers[stream] = writer
        writer.write(events)

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()


class KafkaEventOutput:
    """The streams' Kafka topics (FRESHREC_BROKERS, FRESHREC_TOPIC_PREFIX, FRESHREC_KAFKA_CONFIG)."""

    def __init__(self, config: Config, producer: Any = None):
        """`producer` (tests): one that reports each failed delivery to this output's `_delivered`."""
        self.config = config
        self.errors = 0
        self._topics = {s: config.topic(s) for s in INPUT_STREAMS}
        if producer is None:
            from confluent_kafka import Producer

            # Delivery reports of failures only: a Python call per message delivered was a large
            # part of what writing 30,000 events a second cost the open-loop simulator. The
            # producer's own callback, not one per message: produce's keywords and callback
            # object made each call 1.5x as long.
            producer = Producer({"bootstrap.servers": config.brokers, "linger.ms": 20,
                                 "enable.idempotence": "true", "queue.buffering.max.messages": 1_000_000,
                                 "delivery.report.only.error": True, **config.kafka_settings(),
                                 "on_delivery": self._delivered})
        self.producer = producer

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors += 1

    def write(self, stream: str, events: Sequence[Any]) -> None:
        if not events:
            return
        topic = self._topics[stream]
        produce = self.producer.produce
        values = encode_each(list(events))
        for e, value in zip(events, values, strict=True):
            while True:
                try:
                    produce(topic, value, message_key(e))
                    break
                except BufferError:
                    self.producer.poll(0.05)  # the local queue is full: let deliveries drain
        self.producer.poll(0)

    def close(self) -> None:
        remaining = self.producer.flush(60)
        if remaining:
            raise RuntimeError(f"Kafka ({self.config.brokers}) did not acknowledge {remaining} messages in 60 s")
        if self.errors:
            raise RuntimeError(f"Kafka ({self.config.brokers}) refused {self.errors} messages")


def open_output(config: Config, tag: str) -> EventOutput:
    """Files or Kafka, as FRESHREC_SOURCE says."""
    if config.source == "files":
        return FileEventOutput(config, tag)
    if config.source == "kafka":
        return KafkaEventOutput(config)
    raise ConfigError(f"FRESHREC_SOURCE={config.source!r}: expected files or kafka")
