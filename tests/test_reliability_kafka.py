"""Reliability: the Kafka broker stopped in the middle of a run (10 s, and 75 s) and started again.

The flow (Kafka sources and sinks, follow mode) and the model server (Kafka event logs) run on a
broker of this test's own, which it stops and starts on the same port and data dir while clients
keep asking for recommendations and posting actions. Nothing acknowledged may be lost: every
feature event on the topic ends up in exactly one example, every action answered 202 in its
positive example; while the broker is down `POST /actions` answers 503 with Retry-After.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flows import kafka_local
from flows.config import Config
from flows.demo import wait_for_catalog
from flows.processes import FlowProcess
from flows.simulate import World
from model.recommender import build_recommender
from model.server import running_server
from tests.kafka_support import read_topic, started
from tests.model.serving_fakes import call

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

BEFORE_S = 8.0
AFTER_S = 10.0
# The join window is longer than the broker is unreachable (its stop and start-up included): an
# unreachable broker's partitions count as idle, and idle partitions let the watermark run on with
# the wall clock (CONTRACT.md, Time), which would expire impressions whose actions wait on the broker.
OUTAGES = [(10.0, 45), (75.0, 120)]  # (seconds stopped, join window): 75 s outlasts any 60 s limit


@pytest.fixture
def own_broker(tmp_path):
    """A local broker this test may stop: never the session's shared one."""
    with started(kafka_local.LocalKafka(kafka_local.free_port_pair(), data_dir=tmp_path / "kafka")) as broker:
        yield broker


@dataclass
class Clients:
    """Users in a loop: GET /recommend, then POST /actions for one item of the list (a like), and
    a skip of another. 503s must carry Retry-After; the client does not retry them (its action is
    refused, not lost: the server said so)."""

    url: str
    users: int = 50
    accepted: list = field(default_factory=list)  # (monotonic time, wall time, [action dicts])
    refused: list = field(default_factory=list)  # (monotonic time, Retry-After)
    errors: list = field(default_factory=list)
    requests: int = 0
    served: int = 0  # items recommended: one feature event each
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        rng = random.Random(5)
        while not self.stop.is_set():
            user = f"u{rng.randrange(self.users)}"
            status, _, body = call(self.url, "GET", f"/recommend?user_id={user}&k=5")
            self.requests += 1
            if status != 200:
                self.errors.append(("recommend", status, body))
                continue
            items = [it["item_id"] for it in body["items"]]
            self.served += len(items)
            if len(items) < 2:
                continue
            liked, skipped = rng.sample(items, 2)
            now = time.time()
            actions = [{"request_id": body["request_id"], "user_id": user, "item_id": liked, "ts": now,
                        "action": "like"},
                       {"request_id": body["request_id"], "user_id": user, "item_id": skipped, "ts": now,
                        "action": "skip"}]
            status, headers, answer = call(self.url, "POST", "/actions", body=json.dumps(actions))
            if status == 202:
                self.accepted.append((time.monotonic(), time.time(), actions))
            elif status == 503:
                self.refused.append((time.monotonic(), headers.get("retry-after")))
            else:
                self.errors.append(("actions", status, answer))
            self.stop.wait(0.05)


def fault_config(tmp_path: Path, bootstrap: str, prefix: str, join_window_s: float) -> Config:
    return Config.from_env({}, source="kafka", brokers=bootstrap, topic_prefix=prefix,
                           data_dir=str(tmp_path / "data"), state_dir=str(tmp_path / "state"), follow="1",
                           join_window_s=str(join_window_s), lateness_s="1", idle_s="1",
                           # An action delivered just before the broker stopped can have its feature
                           # event (sent in the server's next batch) delivered only after the outage;
                           # the watermark runs on with the wall clock meanwhile, so the action must be
                           # held longer than the outage or it is dead-lettered as an orphan.
                           orphan_hold_s=str(join_window_s),
                           metrics_port="off", train="1")


@pytest.mark.parametrize("outage_s, join_window_s", OUTAGES)
def test_a_broker_outage_loses_nothing_and_the_flow_resumes(tmp_path, own_broker, outage_s, join_window_s):
    bootstrap = own_broker.bootstrap
    prefix = f"fault{uuid.uuid4().hex[:6]}."
    kafka_local.create_contract_topics(bootstrap, prefix)
    config = fault_config(tmp_path, bootstrap, prefix, join_window_s)
    flow = FlowProcess(config, ["-w", "1"], log_path=tmp_path / "flow.log").start()
    recommender = build_recommender(config)
    try:
        with running_server(recommender, config) as server:
            wait_for_catalog(config, World(seed=3, n_users=50, n_items=60, n_authors=6), server.url, flow,
                             lambda _msg: None)
            clients = Clients(server.url)
            thread = threading.Thread(target=clients.run, name="clients", daemon=True)
            thread.start()
            try:
                time.sleep(BEFORE_S)
                before_outage = len(clients.accepted)
                down_at = time.monotonic()
                own_broker.stop()
                time.sleep(outage_s)
                assert flow.running, "the flow died while the broker was down:\n" + flow.log_tail()
                restart_at = time.monotonic()
                own_broker.start(topics=False)
                back_at, back_wall = time.monotonic(), time.time()
                time.sleep(AFTER_S)
            finally:
                clients.stop.set()
                thread.join(60)
            metrics = server.server.metrics
            # The server writes feature events in batches: wait for the last one's deliveries.
            deadline = time.monotonic() + 30
            while (metrics.features_written._value.get() + metrics.features_failed._value.get() < clients.served
                   and time.monotonic() < deadline):
                time.sleep(0.1)
            features_written = metrics.features_written._value.get()
            features_failed = metrics.features_failed._value.get()
        assert flow.running, "the flow died:\n" + flow.log_tail()

        # What the clients saw.
        assert not clients.errors, clients.errors[:5]
        assert before_outage > 0
        refused_down = [r for r in clients.refused if r[0] >= down_at]
        assert refused_down, "no POST /actions was answered 503 while the broker was down"
        assert all(r[1] is not None and int(r[1]) >= 1 for r in clients.refused), "a 503 without Retry-After"
        accepted_after = [a for a in clients.accepted if a[0] > back_at]
        assert accepted_after, "no action was accepted after the broker came back"

        # Everything acknowledged is on the topics; wait for the flow to join it all.
        features = {}
        for m in read_topic(bootstrap, prefix + "features"):
            e = json.loads(m.value())
            features[(e["request_id"], e["item_id"])] = e
        actions_on_topic = {(e["request_id"], e["item_id"], e["action"])
                            for e in (json.loads(m.value()) for m in read_topic(bootstrap, prefix + "actions"))}
        accepted = [a for _, _, batch in clients.accepted for a in batch]
        assert {(a["request_id"], a["item_id"], a["action"]) for a in accepted} <= actions_on_topic
        # The server kept the feature events made while the broker was down and wrote them after.
        assert features_failed == 0
        assert len(features) == clients.served == features_written

        accepted_keys = {(a["request_id"], a["item_id"]) for a in accepted}

        def settled():
            """(examples, orphans) once every feature event is joined and every accepted action is
            in an example or dead-lettered as an orphan (its feature event refused in the outage)."""
            msgs = read_topic(bootstrap, prefix + "examples")
            keys = {(json.loads(m.value())["request_id"], json.loads(m.value())["item_id"]) for m in msgs}
            dead = [json.loads(m.value()) for m in read_topic(bootstrap, prefix + "dead-letter")]
            orphans = {(json.loads(d["raw"])["request_id"], json.loads(d["raw"])["item_id"])
                       for d in dead if d["reason"].startswith("orphan")}
            return (msgs, orphans) if keys >= set(features) and accepted_keys <= keys | orphans else None

        deadline = time.monotonic() + join_window_s + 120
        while (done := settled()) is None:
            assert flow.running, "the flow died:\n" + flow.log_tail()
            assert time.monotonic() < deadline, "the flow did not join every feature event:\n" + flow.log_tail()
            time.sleep(1)
        msgs, orphans = done
        examples = {}
        repeats = 0
        for m in msgs:
            e = json.loads(m.value())
            key = (e["request_id"], e["item_id"])
            repeats += key in examples
            examples[key] = (e, m.timestamp()[1] / 1000)
        lost = set(features) - set(examples)
        assert not lost
        assert repeats == 0
        assert set(examples) <= set(features)
        # Each accepted action decided its key's label: like -> 1, skip -> 0 (its feature written),
        # or, had the feature event been refused while the broker went down, an orphan dead letter.
        unjoined = 0
        for a in accepted:
            key = (a["request_id"], a["item_id"])
            if key in examples:
                assert examples[key][0]["label"] == (1 if a["action"] == "like" else 0), (a, examples[key][0])
            else:
                assert key in orphans, f"accepted action {a} neither joined nor dead-lettered"
                unjoined += 1
        # Recovery: the broker back -> the first example from an action accepted after that.
        new_keys = {(a["request_id"], a["item_id"]) for _, _, batch in accepted_after for a in batch}
        first_new = min(examples[k][1] for k in new_keys if k in examples)
        first_202 = min(a[0] for a in accepted_after) - back_at
        print(f"\nbroker unreachable {back_at - down_at:.1f} s (stopped {outage_s:.0f} s, its start-up "
              f"{back_at - restart_at:.1f} s): {len(features)} feature events and {len(accepted)} accepted "
              f"actions, {len(examples)} examples, lost {len(lost)}, repeats {repeats}; "
              f"{len(refused_down)} POST /actions answered 503; feature events the server could not write "
              f"{features_failed:.0f} (acknowledged {features_written:.0f}); actions orphaned by them {unjoined}; "
              f"first 202 {first_202:.2f} s and first new example {first_new - back_wall:.2f} s after the "
              f"broker was back")
    finally:
        flow.stop()
        recommender.store.close()
