"""parse.features: decoding and validating feature events from JSON Lines bytes, against
`json.loads` of the same lines (which validates nothing). parse.features_stamped: the same for
events stamped with `received_at`, as freshrec's own writers (the simulator, the model server,
the replays) write every event."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

from bench import Figure, benchmark, compared, interleaved
from flows.events import FeatureEvent, encode, parse_many


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


def _parse_features(name: str, quick: bool, stamped: bool) -> Iterator[Figure]:
    """Batch by batch as the source reads them; each side keeps nothing between batches."""
    n = 30_000 if quick else 300_000
    batches = source_batches(feature_lines(n, stamped=stamped))
    loads = json.loads

    def ours() -> None:
        for b in batches:
            parse_many("features", b, 1764288001.0)

    def base() -> None:
        for b in batches:
            [loads(x) for x in b]

    ours_rate, base_rate = interleaved(n, ours, base, repeats=3 if quick else 7)
    yield compared(name, "events/s", ours_rate, "json.loads", base_rate)
