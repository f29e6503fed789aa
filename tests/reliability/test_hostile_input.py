"""Hostile input through the real flow (`python -m bytewax.run flows.pipeline:flow`, files source,
trainer on): 100,000 generated hostile messages mixed with valid events into all three input
streams. The flow must end by itself with exit code 0; every hostile message must be in the
dead-letter stream once, with its reason; every valid event must be processed; and no timestamp
from the future may drag the watermark forward.
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from flows.config import Config
from flows.events import MAX_MESSAGE_BYTES
from flows.sources import FileStreamSource
from paramserver.records import decode_item, item_key
from paramserver.serving import LmdbServingStore
from tests.reliability.hostile import DAY, HostileGenerator, Injected, expected_label, valid_events

ROOT = Path(__file__).resolve().parents[2]
STREAMS = ("features", "actions", "items")
HOSTILE = {"features": 40_000, "actions": 40_000, "items": 20_000}  # 100,000 in all
VALID_FEATURES, VALID_ITEMS = 20_000, 3_000
SEED = 8


def build_input(data: Path, now: float) -> dict[str, Injected]:
    """One file per stream: its valid events in ts order, hostile messages at random places among them."""
    rng = random.Random(SEED)
    gen = HostileGenerator(SEED, now, past=now - 3 * DAY)
    valid = valid_events(VALID_FEATURES, VALID_ITEMS, now - 3 * DAY, rng)
    injected = {}
    for stream in STREAMS:
        inj = injected[stream] = Injected(valid=valid[stream])
        lines = [msgspec.json.encode(e) for e in valid[stream]]
        hostile = []
        for _ in range(HOSTILE[stream]):
            msg, kind, reason = gen.message(stream)
            assert msg[:MAX_MESSAGE_BYTES] not in inj.hostile
            inj.hostile[msg[:MAX_MESSAGE_BYTES]] = (kind, reason)
            hostile.append(msg)
        # Hostile messages go between valid ones; the valid ones keep their order.
        slots = sorted(rng.randrange(len(lines) + 1) for _ in hostile)
        out: list[bytes] = []
        v = 0
        for slot, msg in zip(slots, hostile, strict=True):
            out += lines[v:slot]
            v = max(v, slot)
            out.append(msg)
        out += lines[v:]
        (data / stream).mkdir(parents=True)
        (data / stream / "input.jsonl").write_bytes(b"\n".join(out) + b"\n")
    return injected


def flow_env(base: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRESHREC_", "BYTEWAX_"))}
    env.update({
        "PYTHONPATH": str(ROOT),
        "FRESHREC_DATA_DIR": str(base / "data"),
        "FRESHREC_STATE_DIR": str(base / "state"),
        "FRESHREC_METRICS_PORT": "off",
        "FRESHREC_TRAIN": "1",
        "FRESHREC_BUCKETS": "4",
        # A small cache: most waiting impressions, long join keys among them, go through LMDB.
        "FRESHREC_JOIN_CACHE": "500",
        "FRESHREC_SOURCE_BATCH_BYTES": "262144",
    })
    return env


def read_jsonl(directory: Path) -> list[dict]:
    out = []
    for p in sorted(directory.glob("*.jsonl")):
        out += [json.loads(x) for x in p.read_bytes().splitlines() if x.strip()]
    return out


def raw_of(dead: dict) -> bytes:
    return dead["raw"].encode() if dead["raw"] is not None else base64.b64decode(dead["raw_b64"])


@pytest.mark.slow
def test_hostile_input_is_dead_lettered_with_its_reason_and_valid_input_is_all_processed(tmp_path):
    t_start = time.monotonic()
    now = time.time()
    injected = build_input(tmp_path / "data", now)
    env = flow_env(tmp_path)
    t_flow = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bytewax.run", "flows.pipeline:flow"], env=env, cwd=tmp_path,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1500)
    flow_s = time.monotonic() - t_flow
    # The flow never dies: it ends by itself at the end of its input.
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]

    # Every hostile message is in the dead-letter stream once, with its reason; nothing else is.
    dead = read_jsonl(tmp_path / "data" / "dead-letter")
    per_reason: Counter = Counter()
    unmatched = []
    left = {s: dict(injected[s].hostile) for s in STREAMS}
    for d in dead:
        raw = raw_of(d)
        found = left[d["stream"]].pop(raw, None)
        if found is None:
            unmatched.append((d["stream"], d["reason"], raw[:120]))
            continue
        kind, reason = found
        assert d["reason"].startswith(reason), (kind, reason, d["reason"], raw[:200])
        assert d["truncated"] == (kind == "oversize")
        per_reason[(d["stream"], kind)] += 1
    assert unmatched == []
    assert {s: len(v) for s, v in left.items()} == {s: 0 for s in STREAMS}
    assert len(dead) == sum(HOSTILE.values())

    # Every valid feature event has its one example, labelled by its action: positives and explicit
    # negatives decided at their action, neutral ones expired at the end. A watermark dragged
    # forward by a future ts would have expired impressions before their likes were read.
    examples = read_jsonl(tmp_path / "data" / "examples")
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
    with LmdbServingStore(tmp_path / "state" / "serving") as store:
        items = injected["items"].valid
        raws = store.get([item_key(it["item_id"]) for it in items])
        for it, raw in zip(items, raws, strict=True):
            assert raw is not None, it["item_id"]
            entry = decode_item(raw)
            assert (entry["item_id"], entry["source"], entry["sparse"]) == (it["item_id"], "items", it["sparse"])

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

    total_s = time.monotonic() - t_start
    report = {
        "flow_s": round(flow_s, 1), "test_s": round(total_s, 1), "hostile": sum(HOSTILE.values()),
        "valid": {s: len(injected[s].valid) for s in STREAMS},
        "dead_letters_by_kind": {f"{s}/{k}": n for (s, k), n in sorted(per_reason.items())},
        "by_kind": dict(sorted(sum((Counter({k: n}) for (_, k), n in per_reason.items()), Counter()).items())),
        "by_reason": dict(sorted(Counter(d["reason"].split(":")[0].split(" (")[0] for d in dead).items())),
        "examples": len(examples),
    }
    print("\nHOSTILE-INPUT REPORT " + json.dumps(report))
