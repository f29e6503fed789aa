"""Hostile input through the real flow (`python -m bytewax.run flows.pipeline:flow`, files source,
trainer on): 100,000 generated hostile messages mixed with valid events into all three input
streams. The flow must end by itself with exit code 0; every hostile message must be in the
dead-letter stream once, with its reason; every valid event must be processed; and no timestamp
from the future may drag the watermark forward.
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from flows.config import Config
from flows.events import MAX_MESSAGE_BYTES
from flows.sources import FileStreamSource
from paramserver.records import decode_item, item_key
from paramserver.serving import LmdbServingStore
from tests.flows.test_recovery import flow_env as recovery_flow_env
from tests.reliability.hostile import (
    DAY,
    FILE_BLANKS,
    KAFKA_FRAMING,
    HostileGenerator,
    Injected,
    expected_label,
    valid_events,
)

STREAMS = ("features", "actions", "items")
HOSTILE = {"features": 40_000, "actions": 40_000, "items": 20_000}  # 100,000 in all
VALID_FEATURES, VALID_ITEMS = 20_000, 3_000
SEED = 8


def build_input(now: float, kafka: bool = False) -> tuple[dict[str, Injected], dict[str, list[bytes]]]:
    """Per stream: its valid events in ts order, hostile messages at random places among them, and
    300 lines of whitespace only (on Kafka, values no file line can be: empty, newlines)."""
    rng = random.Random(SEED)
    gen = HostileGenerator(SEED, now, past=now - 3 * DAY)
    valid = valid_events(VALID_FEATURES, VALID_ITEMS, now - 3 * DAY, rng)
    injected, messages = {}, {}
    for stream in STREAMS:
        inj = injected[stream] = Injected(valid=valid[stream])
        lines = [msgspec.json.encode(e) for e in valid[stream]]
        hostile = []
        for _ in range(HOSTILE[stream]):
            msg, kind, reason = gen.message(stream)
            assert msg[:MAX_MESSAGE_BYTES] not in inj.hostile
            inj.add(msg, kind, reason)
            hostile.append(msg)
        framing = KAFKA_FRAMING if kafka else FILE_BLANKS
        for i in range(300):
            msg = framing[i % len(framing)]
            inj.add(msg, "kafka_framing" if kafka else "whitespace_only", "not JSON")
            hostile.insert(rng.randrange(len(hostile) + 1), msg)
        # Hostile messages go between valid ones; the valid ones keep their order.
        slots = sorted(rng.randrange(len(lines) + 1) for _ in hostile)
        out: list[bytes] = []
        v = 0
        for slot, msg in zip(slots, hostile, strict=True):
            out += lines[v:slot]
            v = max(v, slot)
            out.append(msg)
        out += lines[v:]
        messages[stream] = out
    return injected, messages


def flow_env(base: Path) -> dict[str, str]:
    # A small cache: most waiting impressions, long join keys among them, go through LMDB.
    return recovery_flow_env(base, FRESHREC_METRICS_PORT="off", FRESHREC_TRAIN="1", FRESHREC_JOIN_CACHE="500",
                             FRESHREC_SOURCE_BATCH_BYTES="262144")


def read_jsonl(directory: Path) -> list[dict]:
    out = []
    for p in sorted(directory.glob("*.jsonl")):
        out += [json.loads(x) for x in p.read_bytes().splitlines() if x.strip()]
    return out


def raw_of(dead: dict) -> bytes:
    return dead["raw"].encode() if dead["raw"] is not None else base64.b64decode(dead["raw_b64"])


def run_flow(env: dict[str, str], cwd: Path) -> float:
    """Runs the flow to its end; returns its time. The flow never dies: it ends by itself, exit 0."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bytewax.run", "flows.pipeline:flow"], env=env, cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1500)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    return time.monotonic() - t0


def check(injected: dict[str, Injected], dead: list[dict], examples: list[dict], state: Path) -> dict:
    """The verdicts shared by the files and Kafka runs; returns the counts for the report."""
    # Every hostile message is in the dead-letter stream once, with its reason; nothing else is.
    per_kind: Counter = Counter()
    unmatched = []
    left = {s: Counter(injected[s].copies) for s in STREAMS}
    for d in dead:
        raw = raw_of(d)
        if left[d["stream"]][raw] <= 0:
            unmatched.append((d["stream"], d["reason"], raw[:120]))
            continue
        left[d["stream"]][raw] -= 1
        kind, reason = injected[d["stream"]].hostile[raw]
        assert d["reason"].startswith(reason), (kind, reason, d["reason"], raw[:200])
        assert d["truncated"] == (kind == "oversize")
        per_kind[(d["stream"], kind)] += 1
    assert unmatched == [], (len(unmatched), unmatched[:5])
    assert {s: sum(c.values()) for s, c in left.items()} == {s: 0 for s in STREAMS}
    assert len(dead) == sum(sum(injected[s].copies.values()) for s in STREAMS)

    # Every valid feature event has its one example, labelled by its action: positives and explicit
    # negatives decided at their action, neutral ones expired at the end. A watermark dragged
    # forward by a future ts would have expired impressions before their likes were read.
    got = Counter((e["request_id"], e["item_id"], e["label"]) for e in examples)
    want = Counter((f["request_id"], f["item_id"], expected_label(i))
                   for i, f in enumerate(injected["features"].valid))
    assert got == want
    by_key = {(e["request_id"], e["item_id"]): e for e in examples}
    for i, f in enumerate(injected["features"].valid):
        e = by_key[(f["request_id"], f["item_id"])]
        assert e["sparse"] == f["sparse"] and e["position"] == f["position"]
        assert [a["action"] for a in e["actions"]] == [("like", "click", "skip", "watch")[i % 4]]

    # Every valid item is in the catalog (the serving store), described by its item event.
    with LmdbServingStore(state / "serving") as store:
        items = injected["items"].valid
        raws = store.get([item_key(it["item_id"]) for it in items])
        for it, raw in zip(items, raws, strict=True):
            assert raw is not None, it["item_id"]
            entry = decode_item(raw)
            assert (entry["item_id"], entry["source"], entry["sparse"]) == (it["item_id"], "items", it["sparse"])
    return {
        "dead_letters": len(dead),
        "valid": {s: len(injected[s].valid) for s in STREAMS},
        "by_kind": dict(sorted(sum((Counter({k: n}) for (_, k), n in per_kind.items()), Counter()).items())),
        "by_stream_and_kind": {f"{s}/{k}": n for (s, k), n in sorted(per_kind.items())},
        "by_reason": dict(sorted(Counter(d["reason"].split(":")[0].split(" (")[0] for d in dead).items())),
        "examples": len(examples),
    }


@pytest.mark.slow
def test_hostile_input_from_files_is_dead_lettered_with_its_reason_and_valid_input_is_all_processed(tmp_path):
    t_start = time.monotonic()
    now = time.time()
    injected, messages = build_input(now)
    for stream, lines in messages.items():
        (tmp_path / "data" / stream).mkdir(parents=True)
        (tmp_path / "data" / stream / "input.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    flow_s = run_flow(flow_env(tmp_path), tmp_path)
    report = check(injected, read_jsonl(tmp_path / "data" / "dead-letter"),
                   read_jsonl(tmp_path / "data" / "examples"), tmp_path / "state")

    # The sources' clock: each partition's progress is the largest valid ts it read, never a
    # hostile message's.
    config = Config.from_env({}, data_dir=str(tmp_path / "data"), state_dir=str(tmp_path / "state2"))
    for stream in STREAMS:
        newest = max(e["ts"] for e in injected[stream].valid)
        progress = []
        for name in FileStreamSource(stream, config).list_parts():
            part = FileStreamSource(stream, config).build_part("in", name, None)
            try:
                while True:
                    part.next_batch()
            except StopIteration:
                pass
            progress.append(part.clock.progress)
        assert max(progress) == newest < now
    report.update(flow_s=round(flow_s, 1), test_s=round(time.monotonic() - t_start, 1))
    print("\nHOSTILE-INPUT files " + json.dumps(report))


@pytest.mark.slow
@pytest.mark.kafka
def test_hostile_input_from_kafka_is_dead_lettered_with_its_reason_and_valid_input_is_all_processed(
        tmp_path, kafka_bootstrap):
    from flows.kafka_local import create_topics
    from tests.kafka_support import read_topic

    t_start = time.monotonic()
    now = time.time()
    injected, messages = build_input(now, kafka=True)
    prefix = f"h{uuid.uuid4().hex[:8]}."
    create_topics(kafka_bootstrap, {prefix + s: 2 for s in (*STREAMS, "examples", "dead-letter", "param-deltas")},
                  compacted=[prefix + "param-deltas"])
    produce(kafka_bootstrap, prefix, messages)
    env = flow_env(tmp_path)
    env.update(FRESHREC_SOURCE="kafka", FRESHREC_BROKERS=kafka_bootstrap, FRESHREC_TOPIC_PREFIX=prefix)
    flow_s = run_flow(env, tmp_path)
    dead = [json.loads(m.value()) for m in read_topic(kafka_bootstrap, prefix + "dead-letter")]
    examples = [json.loads(m.value()) for m in read_topic(kafka_bootstrap, prefix + "examples")]
    report = check(injected, dead, examples, tmp_path / "state")
    report.update(flow_s=round(flow_s, 1), test_s=round(time.monotonic() - t_start, 1))
    print("\nHOSTILE-INPUT kafka " + json.dumps(report))


def produce(bootstrap: str, prefix: str, messages: dict[str, list[bytes]]) -> None:
    """Each stream's messages in order, keyed as the contract keys them (valid ones) or not at all;
    a message of the same key stays in order on its partition."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 4 << 20, "linger.ms": 20,
                  "enable.idempotence": True})  # no retry may write a message twice
    for stream, lines in messages.items():
        field = "item_id" if stream == "items" else "request_id"
        for line in lines:
            try:
                key = msgspec.json.decode(line)[field].encode()
            except Exception:  # a hostile message has no key: Kafka takes it all the same
                key = None
            while True:
                try:
                    p.produce(prefix + stream, line, key)
                    break
                except BufferError:  # the local queue is full: let it drain
                    p.poll(0.5)
            p.poll(0)
    assert p.flush(120) == 0
