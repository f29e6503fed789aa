"""The flow's sinks: a stream written to its folder of JSON Lines files, or to its Kafka topic.

Each worker appends to its own file (named when it starts, rotated by size). Bytewax's sinks are
at-least-once: after a crash the epoch in flight is written again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Optional

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from flows.config import Config
from flows.events import encode_each
from flows.streams import StreamWriter

log = logging.getLogger("freshrec.sinks")

KeyOf = Callable[[Any], Optional[str]]
FLUSH_WARN_S = 30.0


def each(items: list[Any]) -> list[Any]:
    """The items to write: an item that is a list (a step's batch, as the join's examples come)
    stands for its items."""
    if not any(type(x) is list for x in items):
        return items
    out: list[Any] = []
    for x in items:
        if type(x) is list:
            out += x
        else:
            out.append(x)
    return out


class _FilePartition(StatelessSinkPartition[Any]):
    def __init__(self, writer: StreamWriter):
        self.writer = writer

    def write_batch(self, items: list[Any]) -> None:
        self.writer.write(each(items))

    def close(self) -> None:
        self.writer.close()


class FileStreamSink(DynamicSink[Any]):
    """Writes each item (an event struct, a dead letter or a dict; a list stands for its items)
    as one line of the stream."""

    def __init__(self, stream: str, config: Config):
        self.directory = config.stream_dir(stream)
        self.rotate_bytes = config.rotate_bytes

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _FilePartition:
        return _FilePartition(StreamWriter(self.directory, f"w{worker_index}", self.rotate_bytes))


class _KafkaPartition(StatelessSinkPartition[Any]):
    """A producer with no delivery timeout (FLUSH_WARN_S between warnings while the broker is
    down): an outage holds the flow here, however long, and loses nothing. A delivery the broker
    refuses (not a timeout) stops the flow with its error: never a silent loss.

    `durable` (recovery on): each batch waits until the broker has all of it, since Bytewax
    commits the epoch once this returns. Recovery off, nothing is committed, so nothing waits for
    the broker but a full queue and `close` (with the same warnings): a wait per batch held the
    flow idle for a broker round trip many times a second. Delivery reports come for failures
    only (`delivery.report.only.error`): a Python call per message delivered was most of their cost."""

    def __init__(self, producer: Any, topic: str, key_of: KeyOf, durable: bool = True):
        """`producer` reports each failed delivery to `_delivered` (its `on_delivery`)."""
        self.producer = producer
        self.topic = topic
        self.key_of = key_of
        self.durable = durable
        self.failed: list[str] = []

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.failed.append(err.str())

    def write_batch(self, items: list[Any]) -> None:
        items = each(items)
        values = encode_each(items)
        produce, topic, key_of = self.producer.produce, self.topic, self.key_of
        full_since = warned = 0.0
        for item, value in zip(items, values, strict=True):
            key = key_of(item)
            while True:
                try:
                    # Positional, no callback of its own (the producer's `on_delivery` reports
                    # failures): keywords and a callback per message made each call 1.5x as long.
                    produce(topic, value, key.encode() if key is not None else None)
                    break
                except BufferError:
                    # The local queue is full (the broker slow or down): let deliveries drain, however
                    # long it takes, with a warning every FLUSH_WARN_S.
                    now = time.monotonic()
                    if not full_since:
                        full_since = warned = now
                    elif now - warned >= FLUSH_WARN_S:
                        warned = now
                        self._warn_waiting(len(self.producer), now - full_since)
                    self.producer.poll(0.1)
        if self.durable:
            self._flush()  # Bytewax commits the epoch after this returns: wait until the broker has it all
        else:
            self.producer.poll(0)  # delivery reports so far
            self._raise_failed()

    def _flush(self) -> None:
        waited = 0.0
        while (remaining := self.producer.flush(FLUSH_WARN_S)) > 0:
            waited += FLUSH_WARN_S
            self._warn_waiting(remaining, waited)
        self._raise_failed()

    def _warn_waiting(self, messages: int, seconds: float) -> None:
        log.warning("Kafka has not acknowledged %d messages to %r for %.0f s (broker down?); waiting",
                    messages, self.topic, seconds)

    def _raise_failed(self) -> None:
        if self.failed:
            failed, self.failed = self.failed, []
            raise RuntimeError(f"Kafka refused {len(failed)} messages to {self.topic!r}: {failed[0]}")

    def close(self) -> None:
        self._flush()


class KafkaStreamSink(DynamicSink[Any]):
    """Produces each item as one JSON message, keyed by `key_of(item)` (a list stands for its items).
    `durable`: each batch is acknowledged by the broker before the next (as recovery needs)."""

    def __init__(self, stream: str, config: Config, key_of: KeyOf = lambda item: None, durable: bool = True):
        self.topic = config.topic(stream)
        self.config = config
        self.key_of = key_of
        self.durable = durable

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _KafkaPartition:
        from confluent_kafka import Producer

        # message.timeout.ms 0: no delivery timeout (librdkafka's default drops a message after
        # 5 min); a broker outage holds the flow instead.
        part = _KafkaPartition(None, self.topic, self.key_of, self.durable)
        # The producer's own delivery callback, not one per message (1.5x each produce's time).
        part.producer = Producer({"bootstrap.servers": self.config.brokers, "linger.ms": 5,
                                  "enable.idempotence": "true", "message.timeout.ms": "0",
                                  "delivery.report.only.error": True, **self.config.kafka_settings(),
                                  "on_delivery": part._delivered})
        return part


def make_sink(stream: str, config: Config, key_of: KeyOf = lambda item: None, durable: bool = True) -> DynamicSink:
    """`durable` False (recovery off): a Kafka sink's batches do not each wait for the broker."""
    if config.source == "kafka":
        return KafkaStreamSink(stream, config, key_of, durable)
    return FileStreamSink(stream, config)
