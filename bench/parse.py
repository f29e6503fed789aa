"""parse.features: decoding and validating feature events from JSON Lines bytes, against
`json.loads` of the same lines (which validates nothing). parse.features_stamped: the same for
events stamped with `received_at`, as freshrec's own writers (the simulator, the model server,
the replays) write every event. parse.features_per_item: stamped events whose `sparse` and
`dense` are their item's, of 20,000 items with a heavy-tailed popularity, as a model server logs
them (the parser then parses each item's features once: flows/events.py); in the other two every
event's features are its own, the parser's worst case."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

from bench import Figure, benchmark, compared, interleaved
from flows.events import FeatureEvent, encode, parse_many


def per_item_lines(n: int, items: int = 20_000, seed: int = 2) -> list[bytes]:
    """Stamped feature events of `items` items (popularity Pareto, shape 1.2), each item's features
    the same in all of its events."""
    rng = random.Random(seed)
    tags = ["dance", "cat", "food", "travel", "music", "sport"]
    features = [({"author": f"a{rng.randrange(10**5)}", "tags": rng.sample(tags, 2),
                  "country": rng.choice(["de", "fr", "us", "br"])},
                 {"item_ctr_7d": rng.random(), "age_h": rng.uniform(0, 500)}) for _ in range(items)]
    out = []
    for i in range(n):
        item = min(int(rng.paretovariate(1.2)) - 1, items - 1)
        sparse, dense = features[item]
        out.append(encode(FeatureEvent(
            request_id=f"r-{rng.getrandbits(48):012x}", user_id=f"u{rng.randrange(10**6)}", item_id=f"v{item}",
            ts=1764288000.0 + i * 0.001, position=i % 20, sparse=sparse, dense=dense, model_version="17",
            event_id=f"e-{i}", received_at=1764288000.5 + i * 0.001)))
    return out


def feature_lines(n: int, seed: int = 1, stamped: bool = False) -> list[bytes]:
    rng = random.Random(seed)
    tags = ["dance", "cat", "food", "travel", "music", "sport"]
    out = []
    for i in range(n):
        e = FeatureEvent(
            request_id=f"r-{rng.getrandbits(48):012x}", user_id=f"u{rng.randrange(10**6)}",
            item_id=f"v{rng.randrange(10**7)}", ts=1764288000.0 + i * 0.001, position=i % 20,
            sparse={"author": f"a{rng.randrange(10**5)}", "tags": rng.sample(tags, 2),
                    "country": rng.choice(["de", "fr", "us", "br"])},
            dense={"item_ctr_7d": rng.random(), "age_h": rng.uniform(0, 500)},
            model_version="17", score=rng.random(), event_id=f"e-{i}",
            received_at=1764288000.5 + i * 0.001 if stamped else None)
        out.append(encode(e))
    return out


def source_batches(lines: list[bytes], batch_bytes: int = 1 << 20) -> list[list[bytes]]:
    """The lines cut as the files source cuts them: about `batch_bytes` per batch."""
    out, cur, size = [], [], 0
    for x in lines:
        cur.append(x)
        size += len(x) + 1
        if size >= batch_bytes:
            out.append(cur)
            cur, size = [], 0
    return out + ([cur] if cur else [])


@benchmark("parse.features")
def parse_features(quick: bool) -> Iterator[Figure]:
    yield from _parse_features("parse.features", quick, stamped=False)


@benchmark("parse.features_stamped")
def parse_features_stamped(quick: bool) -> Iterator[Figure]:
    yield from _parse_features("parse.features_stamped", quick, stamped=True)


@benchmark("parse.features_per_item")
def parse_features_per_item(quick: bool) -> Iterator[Figure]:
    yield from _parse_features("parse.features_per_item", quick, stamped=True, per_item=True)


def _parse_features(name: str, quick: bool, stamped: bool, per_item: bool = False) -> Iterator[Figure]:
    """Batch by batch as the source reads them; each side keeps nothing between batches (but the
    parser's features parsed by text, which it keeps for good)."""
    n = 30_000 if quick else 300_000
    batches = source_batches(per_item_lines(n) if per_item else feature_lines(n, stamped=stamped))
    loads = json.loads

    def ours() -> None:
        for b in batches:
            parse_many("features", b, 1764288001.0)

    def base() -> None:
        for b in batches:
            [loads(x) for x in b]

    ours_rate, base_rate = interleaved(n, ours, base, repeats=3 if quick else 7)
    yield compared(name, "events/s", ours_rate, "json.loads", base_rate)
