"""params.pull_push and params.bytes_per_row: the training parameter store's hot path and memory.

pull_push: a trainer's batch (1024 examples x 8 sparse slots, dim 32, Adagrad; ids drawn Zipf-like,
so they repeat within a batch) pulled and pushed through the `ParameterStore` (string ids in: id
map, admission check, versions, update times, touched rows), against the same gather, Adagrad
update and scatter on preallocated numpy arrays indexed by row numbers computed beforehand. Both
sum the gradients of repeated rows the same way (a stable argsort, then np.add.reduceat), so both
compute the same update; the baseline uses the fastest numpy for the rest too (whole-row gathers
and scatters through a void view). Ids reach the store as the trainer hands them over: new str
objects, just gathered through a dict (so hashed, and in cache); only the calls are timed.
bytes_per_row: resident memory per row (RssAnon, in a fresh process) of a table filled with
10 M rows of dim 16 under Adagrad (1 M with --quick; ids of up to 8 bytes, "i0" to "i9999999"),
pulled, pushed once and synced batch by batch, against the raw bytes of values and state.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from time import perf_counter

import numpy as np

from bench import Figure, benchmark, compared
from paramserver.optimizers import Adagrad
from paramserver.store import ParameterStore
from paramserver.table import SlotConfig

SLOTS = {"user_id": 200_000, "item_id": 100_000, "author": 20_000, "tag": 2_000, "country": 50,
         "hour": 24, "device": 500, "city": 5_000}
BATCH = 1024
DIM = 32
LR, EPS = 0.05, 1e-7
ZERO = np.zeros(1, np.int64)
ZIPF = 1.3


def _admit_pools(store: ParameterStore) -> dict[str, list[str]]:
    pools = {s: [f"{s[0]}{i}" for i in range(n)] for s, n in SLOTS.items()}
    for s, pool in pools.items():
        store.pull(s, pool, now=1.0)  # every id has its row up front
    return pools


def _batches(store: ParameterStore, pools: dict[str, list[str]], n_batches: int, seed: int) -> list[list[tuple]]:
    """Per batch and slot: (slot, pool indices, grads, rows in that slot's table). Ids are drawn
    Zipf-like from each slot's pool, so they repeat within a batch as real ones do."""
    rng = np.random.default_rng(seed)
    grads = [(rng.standard_normal((BATCH, DIM)) * 0.01).astype(np.float32) for _ in range(4)]
    out = []
    for k in range(n_batches):
        b = []
        for s, pool in pools.items():
            idx = ((rng.zipf(ZIPF, BATCH) - 1) % len(pool)).tolist()
            t = store.table(s)
            rows = t._index.lookup(*t._encode([pool[i] for i in idx]))  # not through the hot-id dict
            b.append((s, idx, grads[k % 4], rows))
        out.append(b)
    return out


def _trainer_ids(pool: list[str], idx: list[int]) -> list[str]:
    """A batch's ids as the trainer hands them over: new str objects (decoded from the stream),
    just gathered through a dict (model/features.py dedupes them so), hence hashed and in cache."""
    ids = [pool[i].encode().decode() for i in idx]
    dict.fromkeys(ids)
    return ids


@benchmark("params.pull_push")
def pull_push(quick: bool) -> Iterator[Figure]:
    """Only the calls are timed: building each batch's ids (the trainer's work) is not. Every run
    draws new batches alike, so no run replays ids that an earlier one looked up."""
    store = ParameterStore(default=SlotConfig(dim=DIM, optimizer=Adagrad(lr=LR, eps=EPS), min_count=1))
    pools = _admit_pools(store)
    repeats = 3 if quick else 7
    sets = [_batches(store, pools, 10 if quick else 30, seed) for seed in range(repeats + 1)]
    # The baseline's own arrays, as large as the tables.
    base = {s: (np.random.default_rng(1).standard_normal((store.table(s).hw + 1, DIM)).astype(np.float32),
                np.full((store.table(s).hw + 1, DIM), 0.1, np.float32)) for s in SLOTS}
    n = len(sets[0]) * len(SLOTS) * BATCH
    clock = perf_counter

    def ours(batches: list[list[tuple]], now: float) -> float:
        spent = 0.0
        for b in batches:
            for s, idx, g, _ in b:
                ids = _trainer_ids(pools[s], idx)
                t0 = clock()
                store.pull(s, ids, now=now)
                store.push(s, ids, g, now=now, arrival=now)
                spent += clock() - t0
        t0 = clock()
        store.take_touched(now=now)  # as the sync would, every so often
        return spent + clock() - t0

    def baseline(batches: list[list[tuple]]) -> float:
        spent = 0.0
        for b in batches:
            for s, idx, g, rows in b:
                _trainer_ids(pools[s], idx)  # the same untimed work, so both see the same caches
                t0 = clock()
                v, a = base[s]
                v.take(rows, axis=0)  # the pull
                order = rows.argsort(kind="stable")
                srt = rows.take(order)
                new = srt[1:] != srt[:-1]
                if not new.all():  # repeated rows: one update each, with the sum of their gradients
                    starts = new.nonzero()[0]
                    starts += 1
                    starts = np.concatenate((ZERO, starts))
                    rows = srt.take(starts)
                    g = np.add.reduceat(g.take(order, axis=0), starts, axis=0)
                u = len(rows)
                w = _rows(v).take(rows).view(np.float32).reshape(u, DIM)
                acc = _rows(a).take(rows).view(np.float32).reshape(u, DIM)
                d = np.multiply(g, g)
                acc += d
                np.sqrt(acc, out=d)
                d += np.float32(EPS)
                np.divide(g, d, out=d)
                d *= np.float32(LR)
                w -= d
                _rows(a)[rows] = _rows(acc)
                _rows(v)[rows] = _rows(w)
                spent += clock() - t0
        return spent

    ours(sets[0], 1000.0), baseline(sets[0])  # warm-up: the hot-id dicts fill, numpy's caches too
    a, b = [], []
    for k in range(1, repeats + 1):  # alternately, so that machine noise hits both alike
        b.append(baseline(sets[k]))
        a.append(ours(sets[k], 1000.0 + k))
    yield compared("params.pull_push", "ids/s", n / statistics.median(a), "numpy gather+adagrad+scatter by row",
                   n / statistics.median(b))


def _rows(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype((np.void, a.shape[1] * a.itemsize))).reshape(a.shape[0])


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def fill_and_measure(n_rows: int, dim: int = 16, batch: int = 8192) -> dict:
    """In this process: RssAnon growth while one table takes `n_rows` ids (pulled to admit them,
    pushed once so the optimizer state is written, touched rows taken as the sync would)."""
    store = ParameterStore(default=SlotConfig(dim=dim, optimizer=Adagrad(), min_count=1, expire_s=None))
    store.pull("item_id", ["warm-up"], now=1.0)
    before = rss_anon()
    g = np.full((batch, dim), 0.01, np.float32)
    for start in range(0, n_rows, batch):
        ids = [f"i{i}" for i in range(start, min(n_rows, start + batch))]
        store.pull("item_id", ids, now=2.0)
        store.push("item_id", ids, g[: len(ids)], now=3.0)
        store.take_touched(now=3.0)
        del ids
    after = rss_anon()
    t = store.table("item_id")
    return {"rows": len(t), "delta": after - before, "raw": (dim + dim) * 4 * n_rows, "table_bytes": t.nbytes}


@benchmark("params.bytes_per_row")
def bytes_per_row(quick: bool) -> Iterator[Figure]:
    n = 1_000_000 if quick else 10_000_000
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", f"import json; from bench.params import fill_and_measure; "
                          f"print(json.dumps(fill_and_measure({n})))"],
                         cwd=root, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    yield compared("params.bytes_per_row", "bytes/row", r["delta"] / r["rows"],
                   "raw values+adagrad state (dim 16)", r["raw"] / r["rows"])
