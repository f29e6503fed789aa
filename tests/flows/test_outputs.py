"""Event outputs for the simulator and the replays: files or Kafka, keyed as the contract says."""

from __future__ import annotations

import pytest

from flows.events import ActionEvent, FeatureEvent, ItemEvent, parse
from flows.outputs import FileEventOutput, KafkaEventOutput, message_key, open_output, stamp
from flows.streams import stream_files
from tests.helpers import config_for

T0 = 1764288000.0


def test_message_keys_follow_the_contract():
    assert message_key(ItemEvent(item_id="v1", ts=T0)) == b"v1"
    assert message_key(FeatureEvent(request_id="r1", user_id="u", item_id="v1", ts=T0)) == b"r1"
    assert message_key(ActionEvent(request_id="r2", user_id="u", item_id="v1", ts=T0, action="like")) == b"r2"


def test_files_one_writer_per_stream_and_received_at_kept(tmp_path):
    config = config_for(tmp_path)
    out = open_output(config, "t")
    assert isinstance(out, FileEventOutput)
    actions = [ActionEvent(request_id=f"r{i}", user_id="u", item_id="v", ts=T0 + i, action="skip") for i in range(3)]
    stamp(actions, T0 + 10)
    out.write("actions", actions[:2])
    out.write("actions", actions[2:])
    out.write("features", [])  # nothing to write: no file either
    with pytest.raises(ValueError, match="not an input stream"):
        out.write("examples", actions)
    out.close()
    files = stream_files(config.stream_dir("actions"))
    assert len(files) == 1 and not config.stream_dir("features").exists()
    parsed = [parse("actions", line, T0 + 99) for line in files[0].read_bytes().splitlines()]
    assert [(a.request_id, a.received_at) for a in parsed] == [(f"r{i}", T0 + 10) for i in range(3)]


def test_kafka_output_produces_keyed_json_and_reports_refusals(tmp_path):
    class FakeProducer:
        def __init__(self):
            self.sent, self.full_once = [], True

        def produce(self, topic, value, key):
            if self.full_once:  # the local queue is full once: the output must wait and retry
                self.full_once = False
                raise BufferError
            self.sent.append((topic, value, key))
            if key == b"bad":  # reports of failures only (delivery.report.only.error)
                self.on_delivery("refused", None)

        def poll(self, timeout):
            return 0

        def flush(self, timeout):
            return 0

    config = config_for(tmp_path, source="kafka", topic_prefix="p.")
    producer = FakeProducer()
    out = KafkaEventOutput(config, producer=producer)
    producer.on_delivery = out._delivered
    out.write("items", [ItemEvent(item_id="v1", ts=T0), ItemEvent(item_id="v2", ts=T0)])
    assert [(t, k) for t, _, k in producer.sent] == [("p.items", b"v1"), ("p.items", b"v2")]
    assert isinstance(parse("items", producer.sent[0][1], T0), ItemEvent)
    out.close()
    out.write("items", [ItemEvent(item_id="bad", ts=T0)])
    with pytest.raises(RuntimeError, match="refused 1 messages"):
        out.close()
