"""params.sync_rows and params.serving_reads: the LMDB serving store against raw LMDB.

sync_rows: ServingWriter writing RowBatches of 10k rows of dim 32 (random ids of a pre-filled pool,
one transaction per batch, change log and all), against `Cursor.putmulti` of the very same record
bytes, precomputed, one transaction per batch, in an LMDB opened as the store opens its own.

serving_reads: batched reads of 1024 random ids of the pool the way a serving reader makes them
(the model server's item index among them): from a `RowCache`, the reader's copy of the rows kept
fresh from the change log, while the writer syncs. Before every read the reader refreshes, and
before every fourth the writer commits 1024 changed rows (so a quarter as many rows as are read
are read again from LMDB); the refreshes count in the reader's time, the writes do not (they are
the flow's). serving_reads_lmdb: the same reads by `read_rows` on the store (one LMDB lookup a row,
keys made from str ids, rows decoded into one float32 array), no writer. The baseline beside
each: raw lookups of the same keys, precomputed, in one read transaction, `Cursor.getmulti` (and,
`_lmdb_vs_get`, a `Transaction.get` loop).

The pool holds 100k rows; the `_1m` figures (not with --quick) repeat them on a pool of 1M rows,
where every lookup, raw ones included, waits on memory far more.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import numpy as np

from bench import Figure, benchmark, compared, interleaved
from paramserver.records import Records
from paramserver.rows import RowBatch
from paramserver.serving import LmdbServingStore, RowCache, ServingWriter

DIM = 32
BATCH = 10_000
READ = 1024
SLOT = "item_id"


def _raw_env(path: Path) -> tuple[lmdb.Environment, object]:
    # The store's own settings: a writable map, no fsync at commit, no readahead.
    env = lmdb.open(str(path), map_size=1 << 31, max_dbs=4, sync=False, metasync=False, writemap=True,
                    readahead=False, meminit=False)
    return env, env.open_db(b"data")


def _figures(pool_n: int, n_batches: int, lookups: int, repeats: int, suffix: str) -> Iterator[Figure]:
    rng = np.random.default_rng(7)
    pool = [f"v{i}" for i in rng.permutation(pool_n * 10)[:pool_n]]
    tmp = Path(tempfile.mkdtemp(prefix="freshrec-bench-"))
    try:
        store = LmdbServingStore(tmp / "store", writer=True, map_size=1 << 31)
        writer = ServingWriter(store)
        env, db = _raw_env(tmp / "raw")
        now = time.time()
        for start in range(0, pool_n, 100_000):  # both start with every row of the pool
            ids = pool[start:start + 100_000]
            fill = RowBatch(SLOT, DIM, ids, np.zeros((len(ids), DIM), np.float32), np.zeros(len(ids), np.uint64),
                            np.full(len(ids), np.nan), now)
            writer.write([fill])
            recs = Records()
            recs.add_row_batch(fill)
            with env.begin(write=True, db=db) as txn:
                txn.cursor().putmulti(recs.pairs())

        batches, precomputed = [], []
        for b in range(n_batches):
            pick = rng.choice(pool_n, BATCH, replace=False)
            batch = RowBatch(SLOT, DIM, [pool[i] for i in pick], rng.standard_normal((BATCH, DIM), np.float32),
                             np.full(BATCH, b + 1, np.uint64), np.full(BATCH, now - 0.05), now)
            batches.append(batch)
            recs = Records()
            recs.add_row_batch(batch)
            precomputed.append(recs.pairs())

        def ours() -> None:
            for batch in batches:
                writer.write([batch])

        def base() -> None:
            for pairs in precomputed:
                with env.begin(write=True, db=db) as txn:
                    txn.cursor().putmulti(pairs)

        ours_rate, base_rate = interleaved(n_batches * BATCH, ours, base, repeats=repeats)
        yield compared("params.sync_rows" + suffix, "rows/s", ours_rate, "lmdb putmulti, same bytes", base_rate)

        reads = [[pool[i] for i in rng.choice(pool_n, READ, replace=False)] for _ in range(lookups)]
        read_keys = [[f"{SLOT}/{i}".encode() for i in ids] for ids in reads]

        def ours_read() -> None:
            for ids in reads:
                store.read_rows(SLOT, ids, dim=DIM)

        def base_getmulti() -> None:
            for keys in read_keys:
                with env.begin(db=db) as txn:
                    txn.cursor().getmulti(keys)

        def base_get() -> None:
            for keys in read_keys:
                with env.begin(db=db) as txn:
                    g = txn.get
                    [g(k) for k in keys]

        got = store.read_rows(SLOT, reads[0], dim=DIM)
        assert got.found.all() and got.values.shape == (READ, DIM)
        n = lookups * READ
        ours_rate, base_rate = interleaved(n, ours_read, base_getmulti, repeats=repeats + 2)
        yield compared("params.serving_reads_lmdb" + suffix, "rows/s", ours_rate, "lmdb getmulti, same keys",
                       base_rate)
        ours_rate, base_rate = interleaved(n, ours_read, base_get, repeats=repeats + 2)
        yield compared("params.serving_reads_lmdb_vs_get" + suffix, "rows/s", ours_rate,
                       "lmdb txn.get loop, same keys", base_rate)

        cache = RowCache(store, {SLOT: DIM})
        assert np.array_equal(cache.read_rows(SLOT, reads[0]).values, got.values)
        churn = [RowBatch(SLOT, DIM, [pool[i] for i in rng.choice(pool_n, READ, replace=False)],
                          rng.standard_normal((READ, DIM), np.float32), np.full(READ, n_batches + 1 + j, np.uint64),
                          np.full(READ, now - 0.05), now)
                 for j in range(-(-lookups // 4))]

        def cached_read() -> float:
            spent = 0.0
            for j, ids in enumerate(reads):
                if j % 4 == 0:
                    writer.write([churn[j // 4]])  # the flow's sync: not the reader's time
                t0 = time.perf_counter()
                cache.refresh()
                cache.read_rows(SLOT, ids)
                spent += time.perf_counter() - t0
            return spent

        ours_rate, base_rate = interleaved(n, cached_read, base_getmulti, repeats=repeats + 2, ours_spent=True)
        assert cache.reloads == 1, "the change log should reach back: the reader never reloads in full"
        assert np.array_equal(cache.read_rows(SLOT, churn[-1].ids).values, churn[-1].values)
        yield compared("params.serving_reads" + suffix, "rows/s", ours_rate, "lmdb getmulti, same keys", base_rate)
        store.close()
        env.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@benchmark("params.sync_rows", "params.serving_reads", "params.serving_reads_lmdb", "params.serving_reads_lmdb_vs_get")
def serving_store(quick: bool) -> Iterator[Figure]:
    if quick:
        yield from _figures(100_000, 3, 30, 3, "")
        return
    yield from _figures(100_000, 10, 200, 5, "")
    yield from _figures(1_000_000, 10, 200, 5, "_1m")
