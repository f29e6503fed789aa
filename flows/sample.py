"""A small, seeded sample of the three input streams, for the README's first run and for tests.

Users with tastes over item authors see items and act with delays (most within seconds, some
after an hour of event time); a few lines are malformed on purpose, to show the dead-letter stream.
Imports no Bytewax.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from flows.events import ActionEvent, FeatureEvent, ItemEvent
from flows.streams import StreamWriter

BAD_LINES = {
    "features": [b"{not json", b'{"request_id": "r-x", "user_id": "u1", "ts": 1764288000}'],
    "actions": [b"\xff\xfe not utf-8", b'{"request_id": "r-y", "user_id": "u1", "item_id": "v1", '
                b'"ts": 1764288000, "action": "poke"}'],
    "items": [b'["an", "array"]'],
}


@dataclass
class SampleCounts:
    items: int = 0
    features: int = 0
    actions: int = 0
    malformed: int = 0


def write_sample(data_dir: Path | str, *, users: int = 200, items: int = 500, requests: int = 2000,
                 per_request: int = 5, start_ts: float = 1764288000.0, seed: int = 7,
                 malformed: bool = True) -> SampleCounts:
    """Write items, feature events (impressions) and action events under `data_dir`."""
    rng = random.Random(seed)
    data_dir = Path(data_dir)
    writers = {s: StreamWriter(data_dir / s, "sample") for s in ("items", "features", "actions")}
    counts = SampleCounts()
    authors = [f"a{i}" for i in range(max(1, items // 10))]
    tags = ["dance", "cat", "food", "travel", "music", "sport", "diy", "comedy"]
    catalog = []
    for i in range(items):
        item = ItemEvent(item_id=f"v{i}", ts=start_ts - 86400 + i,
                         sparse={"author": rng.choice(authors), "tags": rng.sample(tags, 2)},
                         dense={"duration_s": round(rng.uniform(5, 180), 1)})
        catalog.append(item)
    writers["items"].write(catalog)
    counts.items = len(catalog)
    taste = {f"u{u}": set(rng.sample(tags, 3)) for u in range(users)}
    features, actions = [], []
    ts = start_ts
    for r in range(requests):
        ts += rng.expovariate(2.0)
        user = f"u{rng.randrange(users)}"
        for pos, item in enumerate(rng.sample(catalog, per_request)):
            rid = f"r{r}"
            features.append(FeatureEvent(request_id=rid, user_id=user, item_id=item.item_id, ts=ts,
                                         position=pos, sparse=item.sparse, dense=item.dense,
                                         model_version="sample", event_id=f"f{r}-{pos}"))
            liked = len(taste[user] & set(item.sparse["tags"])) / 2
            u = rng.random()
            # Label delays are heavy-tailed: seconds mostly, now and then an hour of event time.
            delay = rng.expovariate(0.3) if rng.random() < 0.95 else rng.uniform(600, 4000)
            if u < 0.45 * liked:
                act = rng.choice(["like", "finish", "share", "click"])
            elif u > 0.9:
                act = "skip"
            else:
                continue
            actions.append(ActionEvent(request_id=rid, user_id=user, item_id=item.item_id,
                                       ts=ts + delay, action=act, event_id=f"a{r}-{pos}"))
    actions.sort(key=lambda a: a.ts)
    writers["features"].write(features)
    writers["actions"].write(actions)
    counts.features, counts.actions = len(features), len(actions)
    if malformed:
        for stream, lines in BAD_LINES.items():
            writers[stream].write_raw(b"".join(line + b"\n" for line in lines))
            counts.malformed += len(lines)
    for w in writers.values():
        w.close()
    return counts
