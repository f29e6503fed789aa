"""The Kafka sink waits out a broker outage however long it lasts, and never drops a message
silently: a delivery the broker refuses stops the flow with the broker's error. With recovery on
(`durable`) each batch waits for the broker; with it off, only a full queue and `close` do."""

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

    def __init__(self, down_flushes: int = 0, refuse: str | None = None, capacity: int = 1 << 30,
                 down_polls: int = 0):
        self.down_flushes = down_flushes
        self.refuse = refuse
        self.capacity = capacity  # a full local queue: produce raises BufferError
        self.down_polls = down_polls  # polls (with a timeout) that deliver nothing: the broker down
        self.queued: list = []
        self.delivered: list = []
        self.flushes = 0
        self.polls = 0

    on_delivery = None  # the producer's delivery callback (`_wired` sets it)

    def produce(self, topic, value, key=None):
        if len(self.queued) >= self.capacity:
            raise BufferError("Local: Queue full")
        self.queued.append(value)

    refuse_from_poll = 1  # the first poll(0) that serves a refusal (2: the broker answers a batch late)

    def poll(self, timeout=0):
        if timeout:
            self.polls += 1
            if self.polls > self.down_polls:
                self._deliver()
        elif self.refuse:  # a refusal the broker has reported is served at a poll
            self.zero_polls = getattr(self, "zero_polls", 0) + 1
            if self.zero_polls >= self.refuse_from_poll:
                self._deliver()
        return 0

    def __len__(self):
        return len(self.queued)

    def flush(self, timeout=None):
        self.flushes += 1
        if self.flushes <= self.down_flushes:
            return len(self.queued)
        self._deliver()
        return 0

    def _deliver(self) -> None:
        for value in self.queued:
            self.on_delivery(Err(self.refuse) if self.refuse else None, None)
            if not self.refuse:
                self.delivered.append(value)
        self.queued.clear()


def _wired(producer: OutageProducer, key_of, durable: bool = True) -> _KafkaPartition:
    sink = _KafkaPartition(producer, "examples", key_of, durable)
    producer.on_delivery = sink._delivered
    return sink


def test_a_long_outage_holds_the_sink_and_loses_nothing(caplog):
    producer = OutageProducer(down_flushes=5)  # 5 x FLUSH_WARN_S: longer than any fixed limit
    sink = _wired(producer, lambda item: item["request_id"])
    with caplog.at_level(logging.WARNING, "freshrec.sinks"):
        sink.write_batch([{"request_id": f"r{i}"} for i in range(3)])
    assert len(producer.delivered) == 3
    assert sum("has not acknowledged 3 messages" in r.message for r in caplog.records) == 5


def test_a_refused_delivery_stops_the_flow_with_the_brokers_error():
    sink = _wired(OutageProducer(refuse="Broker: Message size too large"), lambda item: None)
    with pytest.raises(RuntimeError, match="Kafka refused 2 messages to 'examples': Broker: Message size too large"):
        sink.write_batch([{"a": 1}, {"a": 2}])


def test_without_recovery_a_batch_does_not_wait_for_the_broker_and_close_delivers_everything(caplog):
    producer = OutageProducer(down_flushes=2)
    sink = _wired(producer, lambda item: item["request_id"], durable=False)
    sink.write_batch([{"request_id": f"r{i}"} for i in range(3)])
    sink.write_batch([[{"request_id": "r3"}, {"request_id": "r4"}]])  # a list stands for its items
    assert producer.flushes == 0 and len(producer.queued) == 5
    with caplog.at_level(logging.WARNING, "freshrec.sinks"):
        sink.close()  # the broker is down for two flushes: close waits it out
    assert producer.delivered == [f"r{i}".join(['{"request_id":"', '"}']).encode() for i in range(5)]
    assert sum("has not acknowledged 5 messages" in r.message for r in caplog.records) == 2


def test_without_recovery_a_full_queue_holds_the_sink_and_loses_nothing():
    producer = OutageProducer(capacity=2, down_polls=3)
    sink = _wired(producer, lambda item: None, durable=False)
    sink.write_batch([{"a": i} for i in range(5)])
    sink.close()
    assert producer.delivered == [f'{{"a":{i}}}'.encode() for i in range(5)]
    assert producer.polls >= 4  # it waited while the broker took nothing


def test_without_recovery_a_refused_delivery_stops_the_flow_at_the_next_batch():
    producer = OutageProducer(refuse="Broker: Message size too large")
    producer.refuse_from_poll = 2  # reported after the batch that wrote them has returned
    sink = _wired(producer, lambda item: None, durable=False)
    sink.write_batch([{"a": 1}, {"a": 2}])
    with pytest.raises(RuntimeError, match="Kafka refused 3 messages to 'examples': Broker: Message size too large"):
        sink.write_batch([{"a": 3}])


def test_without_recovery_a_refusal_reported_at_the_end_stops_the_flow_at_close():
    producer = OutageProducer(refuse="Broker: Message size too large")
    producer.refuse_from_poll = 2
    sink = _wired(producer, lambda item: None, durable=False)
    sink.write_batch([{"a": 1}])
    with pytest.raises(RuntimeError, match="Kafka refused 1 messages"):
        sink.close()


def test_without_recovery_a_long_full_queue_warns_while_it_waits(caplog, monkeypatch):
    from flows import sinks

    clock = iter(range(0, 10_000, 10))  # each look at the clock: 10 s later
    monkeypatch.setattr(sinks.time, "monotonic", lambda: float(next(clock)))
    producer = OutageProducer(capacity=1, down_polls=7)
    sink = _wired(producer, lambda item: None, durable=False)
    with caplog.at_level(logging.WARNING, "freshrec.sinks"):
        sink.write_batch([{"a": 1}, {"a": 2}])
    assert sum("has not acknowledged 1 messages" in r.message for r in caplog.records) >= 2
    sink.close()
    assert producer.delivered == [b'{"a":1}', b'{"a":2}']


@pytest.mark.parametrize("durable", [True, False])
def test_a_real_producer_reports_what_the_broker_never_took(durable, tmp_path):
    # A real confluent-kafka producer and no broker (nothing listens on port 1): each message
    # times out after 300 ms, and the sink must say so, whether it waits per batch or at close.
    from flows.sinks import KafkaStreamSink
    from tests.helpers import config_for

    config = config_for(tmp_path, source="kafka", brokers="127.0.0.1:1",
                        kafka_config='{"message.timeout.ms": "300"}')
    sink = KafkaStreamSink("examples", config, durable=durable).build("out", 0, 1)
    if durable:
        with pytest.raises(RuntimeError, match="Kafka refused 2 messages .*timed out"):
            sink.write_batch([{"a": 1}, {"a": 2}])
    else:
        sink.write_batch([{"a": 1}, {"a": 2}])
        with pytest.raises(RuntimeError, match="Kafka refused 2 messages .*timed out"):
            sink.close()


def test_the_flow_waits_for_the_broker_at_each_batch_only_with_recovery_on(monkeypatch, tmp_path):
    from flows import pipeline
    from flows.config import Config

    # Files: the flow is built the same, and building it asks no broker.
    config = Config.from_env({}, data_dir=tmp_path / "data", state_dir=tmp_path / "state", train=False)
    for argv, durable in ((["/x/bytewax/run.py", "flows.pipeline:flow"], False),
                          (["/x/bytewax/run.py", "flows.pipeline:flow", "-r", "/tmp/rec"], True)):
        monkeypatch.setattr(pipeline.sys, "argv", argv)
        monkeypatch.delenv("BYTEWAX_RECOVERY_DIRECTORY", raising=False)
        made = []
        real = pipeline.make_sink

        def recorded(stream, config, key_of=lambda item: None, durable=True, made=made, real=real):
            made.append((stream, durable))
            return real(stream, config, key_of, durable)

        monkeypatch.setattr(pipeline, "make_sink", recorded)
        pipeline.build_flow(config)  # built, not run: nothing connects to a broker
        assert ("examples", durable) in made and ("dead-letter", durable) in made, (argv, made)


@pytest.mark.kafka
def test_a_real_brokers_refusal_reaches_the_sink_and_the_simulators_output(kafka_bootstrap, tmp_path):
    """The producers' own delivery callback (no callback per message) gets a real broker's refusal:
    a message under the client's size limit and over the broker's."""
    import uuid

    from flows import kafka_local
    from flows.events import ItemEvent
    from flows.outputs import KafkaEventOutput
    from flows.sinks import KafkaStreamSink
    from tests.helpers import config_for

    prefix = f"t{uuid.uuid4().hex[:10]}."
    kafka_local.create_topics(kafka_bootstrap, {prefix + "examples": 1, prefix + "items": 1})
    config = config_for(tmp_path, source="kafka", brokers=kafka_bootstrap, topic_prefix=prefix,
                        kafka_config='{"message.max.bytes": 5000000}')
    sink = KafkaStreamSink("examples", config, key_of=lambda item: None).build("examples", 0, 1)
    sink.write_batch([{"a": 1}])  # delivered
    with pytest.raises(RuntimeError, match="Kafka refused 1 messages to .*Message size too large"):
        sink.write_batch([{"a": "x" * 1_500_000}])
    out = KafkaEventOutput(config)
    out.write("items", [ItemEvent(item_id="v1", ts=1764288000.0, sparse={"a": "x" * 1_500_000})])
    with pytest.raises(RuntimeError, match="refused 1 messages"):
        out.close()
