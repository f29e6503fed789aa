"""simulate.open_loop: the open-loop simulator's rate on one core, on a virtual clock that moves
only when it would sleep, so it generates and writes as fast as it can (to files, in a temporary
folder). An absolute figure: actions decided per second, with ~5 feature events each."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator

from bench import Figure, benchmark
from flows.config import Config
from flows.outputs import FileEventOutput
from flows.simulate import OpenLoop, World


class VirtualClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


@benchmark("simulate.open_loop")
def open_loop(quick: bool) -> Iterator[Figure]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Config.from_env({}, data_dir=tmp, state_dir=tmp)
        out = FileEventOutput(config, "bench")
        clock = VirtualClock()
        loop = OpenLoop(World(seed=1), out, rate=20_000, clock=clock, sleep=clock.sleep)
        t0 = time.perf_counter()
        stats = loop.run(2.0 if quick else 10.0)
        elapsed = time.perf_counter() - t0
        out.close()
    yield Figure("simulate.open_loop", stats.decided / elapsed, "actions/s")
    yield Figure("simulate.open_loop_features", stats.features / elapsed, "events/s")


@benchmark("simulate.kafka_output")
def kafka_output(quick: bool) -> Iterator[Figure]:
    """`KafkaEventOutput.write` (the open-loop simulator's and the replays' Kafka writer) to a
    broker, in CPU seconds of this process (librdkafka's threads included: what it takes from the
    machine the flow runs on), beside a bare produce loop of the same messages already encoded,
    with the same producer and failure-only delivery reports: the least any writer could spend."""
    from bench.loop import _broker
    from flows import kafka_local
    from flows.events import FeatureEvent, encode
    from flows.outputs import KafkaEventOutput, message_key

    brokers, broker = _broker()
    if brokers is None:
        return
    try:
        n = 50_000 if quick else 300_000
        t0 = time.time()
        events = [FeatureEvent(request_id=f"r{i // 5}", user_id=f"u{i % 997}", item_id=f"v{i % 5003}", ts=t0,
                               position=i % 5, score=0.5, model_version="1.2",
                               sparse={"author": [f"a{i % 101}"], "tags": [f"t{i % 37}", f"t{i % 41}"]},
                               received_at=t0) for i in range(n)]
        encoded = [(encode(e), message_key(e)) for e in events]
        prefix = f"bench{int(t0)}."
        kafka_local.create_contract_topics(brokers, prefix)
        config = Config.from_env({"FRESHREC_SOURCE": "kafka", "FRESHREC_BROKERS": brokers,
                                  "FRESHREC_TOPIC_PREFIX": prefix})

        def ours() -> float:
            out = KafkaEventOutput(config)
            c0 = time.process_time()
            for i in range(0, n, 500):
                out.write("features", events[i:i + 500])
            out.close()
            return time.process_time() - c0

        def bare() -> float:
            from confluent_kafka import Producer

            p = Producer({"bootstrap.servers": brokers, "linger.ms": 20, "enable.idempotence": "true",
                          "queue.buffering.max.messages": 1_000_000, "delivery.report.only.error": True,
                          "on_delivery": lambda err, msg: None, **config.kafka_settings()})
            topic = config.topic("features")
            c0 = time.process_time()
            for i in range(0, n, 500):
                for value, key in encoded[i:i + 500]:
                    p.produce(topic, value, key)
                p.poll(0)
            p.flush(60)
            return time.process_time() - c0

        a, b = [], []
        for _ in range(3):
            b.append(bare())
            a.append(ours())
        yield Figure("simulate.kafka_output", n / sorted(a)[1], "events/CPU-s", "bare produce of pre-encoded messages",
                     n / sorted(b)[1], sorted(b)[1] / sorted(a)[1])
    finally:
        if broker is not None:
            broker.stop()
