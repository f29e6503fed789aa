"""The catalog at the writer step.

catalog.user_actions: users' recent actions merged at the writer step and encoded for the
serving store's write, per action, as the loop flow does it (90,000 users whose lists are full,
one action each for 500 of them between writes). Against the same lists kept as lists of tuples,
merged, then encoded whole at each write (the catalog's way before it kept each list as its record).

catalog.features: feature events (the model server's, an item's features with every impression)
made into deltas and merged, per event, as the loop flow does it (batches of 500 over 50,000 items,
every item known, each run's events newer than the last's, a snapshot per run). Against the least
any catalog must do with them: per batch, a count and the latest features per item, added to a
dict of [count, ts, sparse, dense] per item.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterator
from typing import Optional

from bench import Figure, benchmark, compared, interleaved
from flows.catalog import Catalog, CatalogDelta, catalog_delta, merge_user_actions
from flows.clock import SourceBatch
from flows.events import FeatureEvent
from paramserver.records import UserActions, encode_user_actions

ACTIONS = ("like", "skip", "click", "finish")
CAP = 50


@benchmark("catalog.user_actions")
def user_actions(quick: bool) -> Iterator[Figure]:
    n_users, per_write, writes = (20_000, 500, 20) if quick else (90_000, 500, 100)
    rng = random.Random(3)
    users = [f"u{i}" for i in range(n_users)]
    t0 = 1764288000.0
    # Strings made one by one, as parsing makes them: each its own object, as in the flow.
    history = {u: [(f"v{rng.randrange(20_000)}", rng.choice(ACTIONS), t0 + k) for k in range(CAP)] for u in users}
    cat = Catalog(lambda ids: [None] * len(ids), lambda ids: [history[u] for u in ids], CAP, run="bench")
    cat.merge([CatalogDelta(actions={u: [] for u in users})])  # every user loaded
    cat.take_dirty()
    plain = {u: list(h) for u, h in history.items()}
    clock = itertools.count()
    repeats = 3 if quick else 5

    def next_writes() -> list[dict[str, list[tuple[str, str, float]]]]:
        out = []
        for _ in range(writes):
            now = t0 + CAP + next(clock)
            out.append({u: [(f"v{rng.randrange(20_000)}", rng.choice(ACTIONS), now)]
                        for u in rng.sample(users, per_write)})
        return out

    # Made before the timing, in the order the runs take them (base first): each run's actions are
    # newer than all before them, as a flow's are.
    made = [next_writes() for _ in range(2 * repeats)]
    ours_writes, base_writes = iter(made[1::2]), iter(made[0::2])

    def ours() -> None:
        for actions in next(ours_writes):
            cat.merge([CatalogDelta(actions=actions)])
            for record in cat.take_dirty()[1].values():
                encode_user_actions(record)

    def base() -> None:
        for actions in next(base_writes):
            for u, new in actions.items():
                plain[u] = merge_user_actions(plain[u], new, CAP)
            for u in actions:
                encode_user_actions(UserActions(plain[u]))

    ours_rate, base_rate = interleaved(per_write * writes, ours, base, repeats=repeats)
    yield compared("catalog.user_actions", "actions/s", ours_rate, "lists of tuples, encoded at each write",
                   base_rate)


@benchmark("catalog.features")
def features(quick: bool) -> Iterator[Figure]:
    n_items, per_batch, batches, repeats = (10_000, 500, 20, 3) if quick else (50_000, 500, 100, 5)
    rng = random.Random(5)
    described = {f"v{i}": ({"author": f"a{i % 3000}", "tags": [f"t{i % 50}", f"t{i % 77}"]}, {"duration_s": float(i % 60)})
                 for i in range(n_items)}
    t0 = 1764288000.0

    def batch(k: int) -> SourceBatch:
        events = []
        for j in range(per_batch):
            i = f"v{rng.randrange(n_items)}"  # made one by one, as parsing makes them
            sparse, dense = described[i]
            events.append(FeatureEvent(request_id=f"r{k}-{j // 10}", user_id=f"u{rng.randrange(50_000)}", item_id=i,
                                       ts=t0 + k + j * 1e-4, position=j % 10, sparse=dict(sparse), dense=dict(dense),
                                       received_at=t0 + k))
        return SourceBatch("features", "features-0", events, [], t0 + k, 0, t0 + k)

    # A set of batches for the warm-up (every item known to both, as in a flow that has run a
    # while), then one per run, in the order the runs take them (base first): each newer than all
    # before it, as a flow's events are, so every item's features are compared and its times move.
    made = [[batch(s * batches + k) for k in range(batches)] for s in range(1 + 2 * repeats)]
    ours_sets, base_sets = iter(made[2::2]), iter(made[1::2])
    rule = lambda e: False  # noqa: E731 (no actions here)
    cat = Catalog(lambda ids: [None] * len(ids), lambda ids: [None] * len(ids), 50, run="bench")
    bare: dict[str, list] = {}
    snapshots = itertools.count(1)

    def ours(batches: Optional[list[SourceBatch]] = None) -> None:
        # A snapshot per run: each item's first count after it records the counts (the flow
        # snapshots every 10 s, some 200,000 feature events apart at 5,000 actions/s).
        cat.snapshot(next(snapshots))
        for b in batches or next(ours_sets):
            cat.merge(catalog_delta(b, rule))
        cat.take_dirty()

    def base(batches: Optional[list[SourceBatch]] = None) -> None:
        for b in batches or next(base_sets):
            counts = Counter(e.item_id for e in b.events)
            latest = {e.item_id: e for e in b.events}
            for i, n in counts.items():
                e = latest[i]
                got = bare.get(i)
                if got is None:
                    bare[i] = [n, e.ts, e.sparse, e.dense]
                else:
                    got[0] += n
                    if e.ts >= got[1]:
                        got[1:] = [e.ts, e.sparse, e.dense]

    ours(made[0])
    base(made[0])
    ours_rate, base_rate = interleaved(per_batch * batches, ours, base, repeats=repeats)
    yield compared("catalog.features", "events/s", ours_rate, "a count and the latest features per item", base_rate)
