"""Data sets replayed in event-time order: MovieLens-100K as training examples.

MovieLens-100K ships inside the `recbole` 1.2.1 wheel (`dataset_example/ml-100k/`). It is read
from an installed `recbole` package's folder without importing it, or straight from the wheel
(fetched once with `pip download --no-deps`, cached outside the repository). The data is
GroupLens's: see https://grouplens.org/datasets/movielens/ for its terms of use (research use,
acknowledge the source, no redistribution).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from flows.events import Example

RECBOLE = "recbole==1.2.1"
INNER = "recbole/dataset_example/ml-100k/ml-100k.{}"
MOVIELENS_SPEC = {"user_slots": ("age", "gender", "occupation", "zip"), "item_slots": ("genre", "year")}


def _cache_dir() -> Path:
    return Path(os.environ.get("FRESHREC_DATASETS", Path.home() / ".cache" / "freshrec" / "datasets"))


def _reader() -> Callable[[str], str]:
    """A function from a file kind ('inter', 'item', 'user') to its text."""
    spec = importlib.util.find_spec("recbole")  # finds the folder, imports nothing
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
        if folder.is_dir():
            return lambda kind: (folder / f"ml-100k.{kind}").read_text(encoding="latin-1")
    cache = _cache_dir()
    wheels = sorted(cache.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", RECBOLE, "-d", str(cache)],
                           capture_output=True, text=True)
        wheels = sorted(cache.glob("recbole-1.2.1-*.whl"))
        if r.returncode or not wheels:
            raise RuntimeError(f"MovieLens-100K needs the {RECBOLE} wheel: pip download failed: {r.stderr[-500:]}")
    wheel = zipfile.ZipFile(wheels[-1])
    return lambda kind: wheel.read(INNER.format(kind)).decode("latin-1")


def _table(text: str) -> list[list[str]]:
    lines = text.splitlines()
    return [line.split("\t") for line in lines[1:] if line.strip()]


def movielens_100k_tables() -> tuple[dict[str, list[str]], dict[str, list[str]], list[list[str]]]:
    """The raw tables: users by id (id, age, gender, occupation, zip code), movies by id (id,
    title, release year, genres separated by spaces), and the ratings (user, movie, rating,
    timestamp in seconds) in timestamp order."""
    read = _reader()
    users = {r[0]: r for r in _table(read("user"))}
    items = {r[0]: r for r in _table(read("item"))}
    rows = sorted(_table(read("inter")), key=lambda r: (float(r[3]), r[0], r[1]))
    return users, items, rows


def movielens_100k(positive_rating: float = 4.0) -> list[Example]:
    """The 100,000 ratings as examples in timestamp order; rating >= 4 is the positive label."""
    users, items, rows = movielens_100k_tables()
    out = []
    for n, (user, item, rating, ts) in enumerate(rows):
        u = users.get(user, [user, "", "", "", ""])
        it = items.get(item, [item, "", "", ""])
        sparse: dict = {"age": f"age{u[1]}", "gender": u[2], "occupation": u[3], "zip": u[4][:2],
                        "genre": it[3].split() if len(it) > 3 else [], "year": it[2] if len(it) > 2 else ""}
        t = float(ts)
        label = int(float(rating) >= positive_rating)
        out.append(Example(request_id=f"ml{n}", user_id=f"u{user}", item_id=f"m{item}", ts=t, label_ts=t,
                           label=label, actions=[], weight=1.0, position=None, score=None, model_version=None,
                           sparse={k: v for k, v in sparse.items() if v}, dense={}, label_received_at=None))
    return out


def drifting_stream(n: int = 60_000, users: int = 300, items: int = 400, seed: int = 7) -> list[Example]:
    """A simple generator until the simulator comes: users with hidden tastes over item genres
    that drift over time, new items arriving, labels drawn from the tastes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    genres = 8
    taste = rng.normal(0, 1, (users, genres))
    item_genre = rng.integers(0, genres, items)
    quality = rng.normal(0, 0.5, items)
    out = []
    t = 1764288000.0
    for k in range(n):
        if k % 2000 == 0:
            taste += rng.normal(0, 0.6, taste.shape)  # tastes drift
        u = int(rng.integers(users))
        # Newer items are shown more: the catalog moves on.
        horizon = max(20, int(items * min(1.0, (k + 1) / n + 0.1)))
        v = int(rng.integers(max(0, horizon - 150), horizon))
        g = int(item_genre[v])
        p = 1 / (1 + np.exp(-(1.5 * taste[u, g] + quality[v])))
        label = int(rng.random() < p)
        t += float(rng.exponential(1.0))
        out.append(Example(request_id=f"s{k}", user_id=f"u{u}", item_id=f"v{v}", ts=t, label_ts=t, label=label,
                           actions=[], weight=1.0, position=None, score=None, model_version=None,
                           sparse={"genre": f"g{g}"}, dense={}, label_received_at=None))
    return out


DRIFTING_SPEC = {"user_slots": (), "item_slots": ("genre",)}
