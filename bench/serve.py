"""serve.*: the model server's core in-process, on a 100,000-item catalog (20,000 with --quick).

`build_catalog_store` writes a synthetic serving store (item, author, tag and user rows, a
TwoTowerRanker's initial dense weights, catalog entries and users' recent actions) through the
one writer, for this benchmark and the HTTP ones. Then, one request after another with k=100:
- serve.recommend_core_p99 / _rate: `StoreRecommender.recommend` (user rows and recent actions
  read from LMDB, V @ u over the catalog, 300 candidates re-ranked by the head, the response
  built), against a bare numpy top-k over the same vectors (V @ u, argpartition, sort of the k);
- serve.recommend_core_p99_refreshing: the same while a thread writes 1,000 item rows every
  200 ms and the index refreshes every 200 ms, against the quiet p99 of the same run;
- serve.index_build: items/s of a full index build from the store (absolute).
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import Figure, benchmark, compared
from model.features import FeatureSpec
from paramserver.rows import DenseBlob, RowBatch
from paramserver.serving import LmdbServingStore, ServingWriter

T0 = 1764288000.0
K = 100
SPEC = FeatureSpec(item_slots=("author", "tags"), dim=16)


@dataclass(frozen=True)
class Catalog:
    path: Path
    item_ids: list[str]
    user_ids: list[str]  # every one has rows (a known user) and recent actions


def _rows(slot: str, ids: list[str], values: np.ndarray) -> RowBatch:
    n = len(ids)
    return RowBatch(slot, values.shape[1], ids, values.astype(np.float32), np.ones(n, np.uint64),
                    np.full(n, np.nan), T0)


def build_catalog_store(path: str | Path, n_items: int, spec: FeatureSpec = SPEC, seed: int = 0, *,
                        n_users: int = 10_000, recent: int = 20, store: LmdbServingStore | None = None) -> Catalog:
    """A serving store at `path` holding `n_items` items (author of n_items / 20, 1 to 3 of 500
    tags, dense features uniform in [0, 100)), rows for every item, author, tag and user, a
    TwoTowerRanker's initial dense weights (normaliser statistics of the uniform features), and
    `recent` recent actions per user. Written through a ServingWriter on `store` if given, else on
    a writer opened and closed here (then open it read-only, in this process or another)."""
    from model.graph import TwoTowerRanker

    rng = np.random.default_rng(seed)
    d = spec.dim
    items = [f"v{i}" for i in range(n_items)]
    authors = [f"a{i}" for i in range(max(1, n_items // 20))]
    tags = [f"t{i}" for i in range(500)]
    users = [f"u{i}" for i in range(n_users)]
    author_of = rng.integers(len(authors), size=n_items)
    n_tags = rng.integers(1, 4, size=n_items)
    tag_of = rng.integers(len(tags), size=int(n_tags.sum()))
    ends = np.cumsum(n_tags)
    ts = T0 - rng.uniform(0, 7 * 86400, n_items)
    impressions = rng.integers(0, 1000, n_items)
    positives = rng.binomial(impressions, 0.05)
    dense_values = rng.uniform(0, 100, (n_items, len(spec.dense)))
    entries = {}
    for i, item in enumerate(items):
        sparse: dict = {"author": authors[author_of[i]], "tags": [tags[t] for t in tag_of[ends[i] - n_tags[i]:ends[i]]]}
        for s in spec.item_slots:
            sparse.setdefault(s, f"{s}{i % 97}")
        entries[item] = {"item_id": item, "ts": float(ts[i]), "sparse": sparse,
                         "dense": dict(zip(spec.dense, dense_values[i].tolist(), strict=True)),
                         "impressions": int(impressions[i]), "positives": int(positives[i])}
    rows = [_rows("item_id", items, rng.standard_normal((n_items, d)) * 0.3),
            _rows("item_id.bias", items, rng.standard_normal((n_items, 1)) * 0.1),
            _rows("user_id", users, rng.standard_normal((n_users, d)) * 0.3),
            _rows("user_id.bias", users, rng.standard_normal((n_users, 1)) * 0.1)]
    for s in spec.item_slots:
        values = sorted({v for e in entries.values() for v in _as_list(e["sparse"][s])})
        rows.append(_rows(s, values, rng.standard_normal((len(values), d)) * 0.3))
    f = len(spec.dense)
    arrays = {**TwoTowerRanker(spec, seed=seed + 1).weights(), "norm_count": np.array([1000.0]),
              "norm_mean": np.full(f, 50.0), "norm_m2": np.full(f, 999.0 * 100.0**2 / 12)}
    acted = rng.integers(n_items, size=(n_users, recent))
    user_actions = {u: [[items[j], "click", T0 + k] for k, j in enumerate(acted[i].tolist())]
                    for i, u in enumerate(users)}
    own = store is None
    if own:
        store = LmdbServingStore(path, writer=True, map_size=1 << 31)
    try:
        writer = ServingWriter(store)
        writer.write(rows, dense=DenseBlob(1, arrays, T0))
        writer.write(items=entries, users=user_actions)
    finally:
        if own:
            store.close()
    return Catalog(Path(path), items, users)


def write_rows(path: str, n_items: int, stop: Any, every_s: float = 0.2, rows: int = 1000) -> None:
    """In a process of its own, as the flow's sync: `rows` random item rows every `every_s`."""
    store = LmdbServingStore(path, writer=True)
    try:
        w = ServingWriter(store)
        g = np.random.default_rng(2)
        while not stop.wait(every_s):
            ids = list(dict.fromkeys(f"v{i}" for i in g.integers(n_items, size=rows)))
            w.write([_rows("item_id", ids, g.standard_normal((len(ids), SPEC.dim)) * 0.3)])
    finally:
        store.close()


def _as_list(v) -> list[str]:
    return [v] if isinstance(v, str) else list(v)


def _p99(times: list[float]) -> float:
    return float(np.percentile(np.array(times) * 1000.0, 99))


@benchmark("serve.recommend_core_p99", "serve.recommend_core_rate", "serve.recommend_core_p99_refreshing",
           "serve.index_build")
def recommend_core(quick: bool) -> Iterator[Figure]:
    from model.recommender import StoreRecommender

    n_items = 20_000 if quick else 100_000
    n_requests = 300 if quick else 3_000
    with tempfile.TemporaryDirectory(prefix="freshrec-bench-serve-") as tmp:
        cat = build_catalog_store(Path(tmp) / "serving", n_items, SPEC, seed=0)
        store = LmdbServingStore(cat.path)  # read-only, as the model server opens it
        try:
            t0 = time.perf_counter()
            r = StoreRecommender(store, SPEC)
            build_s = time.perf_counter() - t0
            snap = r.index.snapshot
            rng = np.random.default_rng(1)
            users = [cat.user_ids[i] for i in rng.integers(len(cat.user_ids), size=n_requests)]
            # The baseline's user vectors: the same users' rows through the same tower, computed first.
            us = {u: r._user(u, snap.model)[1][0] for u in set(users)}
            vectors = snap.vectors

            def bare(u: str) -> np.ndarray:
                s = vectors @ us[u] + snap.bias
                top = np.argpartition(-s, K - 1)[:K]
                return top[np.argsort(-s[top])]

            def timed(fn, who: list[str]) -> list[float]:
                out = []
                for u in who:
                    t = time.perf_counter()
                    fn(u)
                    out.append(time.perf_counter() - t)
                return out

            def ours(u: str) -> object:
                return r.recommend(u, K)

            timed(ours, users[:50]), timed(bare, users[:50])  # warm-up
            a, b = [], []
            for part in np.array_split(np.arange(n_requests), 5):  # alternately: noise hits both alike
                who = [users[i] for i in part]
                b += timed(bare, who)
                a += timed(ours, who)
            yield compared("serve.recommend_core_p99", "ms", _p99(a), "numpy V@u+argpartition p99", _p99(b))
            yield compared("serve.recommend_core_rate", "req/s", len(a) / sum(a), "numpy V@u+argpartition",
                           len(b) / sum(b))

            # The flow writes from its own process, as in production: no GIL shared with it.
            ctx = multiprocessing.get_context("spawn")
            stop = ctx.Event()
            writer = ctx.Process(target=write_rows, args=(str(cat.path), n_items, stop), daemon=True)
            writer.start()
            r.start(0.2)
            try:
                busy = timed(ours, users)
            finally:
                stop.set()
                r.stop()
                writer.join(30)
            yield compared("serve.recommend_core_p99_refreshing", "ms", _p99(busy), "recommend_core_p99 quiet",
                           _p99(a))
            yield Figure("serve.index_build", n_items / build_s, "items/s")
        finally:
            store.close()
