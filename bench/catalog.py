"""catalog.user_actions: users' recent actions merged at the writer step and encoded for the
serving store's write, per action, as the loop flow does it (90,000 users whose lists are full,
one action each for 500 of them between writes). Against the same lists kept as lists of tuples,
merged, then encoded whole at each write (the catalog's way before it kept each list as its record).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

from bench import Figure, benchmark, compared, interleaved
from flows.catalog import Catalog, CatalogDelta, merge_user_actions
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
