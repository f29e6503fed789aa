"""The Kafka sink waits out a broker outage however long it lasts, and never drops a message
silently: a delivery the broker refuses stops the flow with the broker's error."""

from __future__ import annotations

import logging

import pytest

from flows.sinks import _KafkaPartition


class Err:
    def __init__(self, text: str):
        self.text = text

    def str(self) -> str:
        return self.text


class OutageProducer:
    """Acknowledges nothing for `down_flushes` flushes (a broker down), then everything; or
    reports `refuse` as the delivery error of every message."""

    def __init__(self, down_flushes: int = 0, refuse: str | None = None):
        self.down_flushes = down_flushes
        self.refuse = refuse
        self.queued: list = []
        self.delivered: list = []
        self.flushes = 0

    def produce(self, topic, value, key=None, on_delivery=None):
        self.queued.append((value, on_delivery))

    def poll(self, timeout=0):
        return 0

    def flush(self, timeout=None):
        self.flushes += 1
        if self.flushes <= self.down_flushes:
            return len(self.queued)
        for value, cb in self.queued:
            cb(Err(self.refuse) if self.refuse else None, None)
            if not self.refuse:
                self.delivered.append(value)
        self.queued.clear()
        return 0


def test_a_long_outage_holds_the_sink_and_loses_nothing(caplog):
    producer = OutageProducer(down_flushes=5)  # 5 x FLUSH_WARN_S: longer than any fixed limit
    sink = _KafkaPartition(producer, "examples", lambda item: item["request_id"])
    with caplog.at_level(logging.WARNING, "freshrec.sinks"):
        sink.write_batch([{"request_id": f"r{i}"} for i in range(3)])
    assert len(producer.delivered) == 3
    assert sum("has not acknowledged 3 messages" in r.message for r in caplog.records) == 5


def test_a_refused_delivery_stops_the_flow_with_the_brokers_error():
    sink = _KafkaPartition(OutageProducer(refuse="Broker: Message size too large"), "examples", lambda item: None)
    with pytest.raises(RuntimeError, match="Kafka refused 2 messages to 'examples': Broker: Message size too large"):
        sink.write_batch([{"a": 1}, {"a": 2}])
