"""Checkpoints of the parameter store: restore(tag) reproduces checkpoint `tag` bit for bit (also
after a SIGKILL in the middle of a later checkpoint), full snapshots compact the chain, the LMDB
map grows, and the layout writes a few large values per table, not one per row."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from paramserver.checkpoint import CheckpointMeta, CheckpointStore
from paramserver.optimizers import Adagrad, Adam, Ftrl, Sgd
from paramserver.store import ParameterStore
from paramserver.table import EmbeddingTable, SlotConfig

ROOT = Path(__file__).resolve().parents[2]

SLOTS = {
    "user_id": SlotConfig(dim=4, optimizer=Adagrad(), min_count=1, expire_s=40.0),
    "tag": SlotConfig(dim=3, optimizer=Ftrl(l1=0.001), min_count=2, expire_s=30.0),
    "item_id": SlotConfig(dim=5, optimizer=Adam(), min_count=1, admit_p=0.8, init="normal"),
    "hashed": SlotConfig(dim=2, optimizer=Sgd(), hash_bits=6),
}


def step(store: ParameterStore, k: int) -> None:
    """The k-th step of a deterministic workload: pulls, pushes with repeats, now and then expiry,
    dense weights and a new slot; ids get longer as it goes (the key width grows mid-chain)."""
    rng = np.random.default_rng(1000 + k)
    now = 100.0 + 10.0 * k
    for slot in [*SLOTS, *(["late"] if k >= 4 else [])]:
        n = int(rng.integers(5, 60))
        ids = [f"{slot[0]}{i}" for i in rng.integers(0, 80, n)]
        if k >= 4:  # and from the fourth step, some ids longer than 8 bytes
            ids[: n // 4] = [f"{slot}-long-{i}" for i in rng.integers(0, 20, n // 4)]
        store.pull(slot, ids, now=now)
        if rng.random() < 0.8:
            g = rng.standard_normal((n, store.config_for(slot).dim)).astype(np.float32)
            arr = now - rng.random(n)
            store.push(slot, ids, g, now=now + 1, arrival=arr)
    if k % 3 == 2:
        store.expire(now + 2)
    if k % 2 == 0:
        store.set_dense({"w1": rng.standard_normal((4, 3)), "b": np.arange(k + 1.0)}, now=now)
    store.take_touched(now=now + 3)


def dump(store: ParameterStore) -> dict:
    """Everything a table holds, row by row, as bytes (so NaNs and signed zeros compare exactly)."""
    out: dict = {"counts": {k: v for k, v in store.counts.items() if k not in ("restores",)}}
    blob = store.dense()
    out["dense"] = (blob.version, blob.updated_at, {k: v.tobytes() for k, v in blob.arrays.items()})
    for name, t in store.tables.items():
        hw = t.hw
        d = {"kind": t.kind, "config": t.config, "hw": hw, "counts": dict(t.counts),
             "values": t._values[:hw].tobytes(), "state": t._state[:hw].tobytes(),
             "version": t._version[:hw].tobytes(), "last": t._last[:hw].tobytes()}
        if isinstance(t, EmbeddingTable):
            ix = t._index
            d.update(keys=ix._keys[:hw].tobytes(), words=ix.words, free=ix.free_rows.tobytes(), live=ix.live)
            live_rows = np.flatnonzero(ix._keys[:hw].any(axis=1))
            d["ids"] = dict(zip(ix.ids(live_rows), live_rows.tolist(), strict=True))
            if t._pending is not None:
                p = t._pending
                d.update(pkeys=p._keys[: p.hw].tobytes(), phw=p.hw, pfree=p.free_rows.tobytes(),
                         pcount=t._pcount[: p.hw].tobytes(), pseen=t._pseen[: p.hw].tobytes())
        out[name] = d
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], f"{k} differs"


def pulls_agree(store: ParameterStore, d: dict) -> None:
    """The id -> row map behaves as dumped: each live id pulls its own row's values."""
    for name, t in store.tables.items():
        if isinstance(t, EmbeddingTable) and d[name]["ids"]:
            ids = list(d[name]["ids"])
            rows = np.array(list(d[name]["ids"].values()))
            assert np.array_equal(t.pull(ids, now=0.0), t._values[rows])


def test_restore_reproduces_every_kept_checkpoint_bit_for_bit(tmp_path):
    store = ParameterStore(SLOTS, checkpoint_dir=tmp_path, full_every=3, keep_full=2)
    dumps = {}
    for k in range(1, 11):
        step(store, k)
        store.checkpoint(k)
        dumps[k] = dump(store)
    # fulls at 1, 4, 7, 10; the last two full chains are kept
    assert store.tags() == [7, 8, 9, 10]
    assert store.stats()["tables"]["tag"]["pending"] > 0 and store.stats()["tables"]["user_id"]["evicted"] > 0
    store.close()

    # Newest first: restore(k) forgets k+1..., then the same step k+1 must write the same state.
    for k in (10, 9, 8, 7):
        s = ParameterStore(SLOTS, checkpoint_dir=tmp_path, full_every=3, keep_full=2)
        s.restore(k)
        assert s.tags() == list(range(7, k + 1))
        assert_same(dump(s), dumps[k])
        if k < 10:
            step(s, k + 1)
            s.checkpoint(k + 1)
            assert_same(dump(s), dumps[k + 1])
            s.restore(k)
            assert_same(dump(s), dumps[k])
        pulls_agree(s, dumps[k])
        s.close()


def test_restore_in_the_same_store_discards_later_tags_and_tags_must_grow(tmp_path):
    store = ParameterStore(SLOTS, checkpoint_dir=tmp_path, full_every=4)
    for k in range(1, 6):
        step(store, k)
        store.checkpoint(k)
    with pytest.raises(ValueError):
        store.checkpoint(5)
    saved = None
    store.restore(3)
    saved = dump(store)
    assert store.tags() == [1, 2, 3]
    with pytest.raises(ValueError):
        store.checkpoint(3)
    step(store, 4)
    store.checkpoint(4)
    store.restore(3)
    assert_same(dump(store), saved)
    with pytest.raises(KeyError):
        store.restore(99)
    with pytest.raises(RuntimeError):
        ParameterStore().checkpoint(1)


def test_full_snapshots_compact_the_chain(tmp_path):
    store = ParameterStore(SLOTS, checkpoint_dir=tmp_path, full_every=2, keep_full=1)
    for k in range(1, 8):
        step(store, k)
        store.checkpoint(k)
    log = store._ckpt
    assert log.tags() == [7]  # 7 is full; with keep_full=1 everything before it went
    assert [m.tag for m in log.chain(7)] == [7]
    store.checkpoint(8)
    assert [m.tag for m in log.chain(8)] == [7, 8] and not log.meta(8).full
    with log._txn() as txn:
        tags_with_blobs = {struct.unpack(">Q", k[:8])[0] for k in txn.cursor(log._blobs).iternext(values=False)}
    assert tags_with_blobs == {7, 8}
    with pytest.raises(KeyError):
        store.restore(5)


def test_a_checkpoint_is_a_few_large_values_per_table(tmp_path):
    store = ParameterStore(checkpoint_dir=tmp_path, default=SlotConfig(dim=16, min_count=1))
    ids = [f"i{k}" for k in range(200_000)]
    store.pull("item_id", ids, now=1.0)
    store.push("item_id", ids, np.ones((len(ids), 16), np.float32), now=2.0)
    store.checkpoint(1)
    store.push("item_id", ids[:1000], np.ones((1000, 16), np.float32), now=3.0)
    store.checkpoint(2)
    log = store._ckpt
    with log._txn() as txn:
        keys = list(txn.cursor(log._blobs).iternext(values=False))
    per_tag = {t: sum(1 for k in keys if struct.unpack(">Q", k[:8])[0] == t) for t in (1, 2)}
    assert per_tag[1] <= 8 and per_tag[2] <= 8  # rows, keys, values, state, version, last
    meta = log.meta(2)
    (tm,) = meta.tables
    assert {p.name: p.shape[0] for p in tm.parts}["rows"] == 1000  # only the rows that changed


def test_the_map_grows_when_a_checkpoint_does_not_fit(tmp_path, monkeypatch):
    log = CheckpointStore(tmp_path / "small", map_size=1 << 20)
    monkeypatch.setattr(log, "_make_room", lambda need: None)  # so the write hits MapFullError
    big = np.arange(3 << 20, dtype=np.float32)  # 12 MiB
    meta = CheckpointMeta(tag=1, full=True, base=1, created_at=0.0, tables=[], dense=None, counts={})
    log.write(meta, [(0, "x", big)], keep_full=2)
    assert log._env.info()["map_size"] > 12 << 20
    with log.reader() as rd:
        from paramserver.checkpoint import PartMeta

        assert np.array_equal(rd.part(1, 0, PartMeta.of("x", big)), big)
    # and through the store: 80 MB of rows in a map that starts at 64 MiB
    store = ParameterStore(checkpoint_dir=tmp_path / "store", default=SlotConfig(dim=32, min_count=1))
    ids = [f"i{k}" for k in range(300_000)]
    store.pull("item_id", ids, now=1.0)
    store.checkpoint(1)
    store.restore(1)
    assert len(store.table("item_id")) == len(ids)


CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from paramserver.store import ParameterStore
    from paramserver.table import SlotConfig
    from tests.paramserver.test_checkpoint import SLOTS

    path, tag, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    s = ParameterStore(SLOTS, default=SlotConfig(dim=64, min_count=1), checkpoint_dir=path)
    s.restore(tag)
    ids = [f"big{i}" for i in range(400_000)]
    s.pull("item_id", ids, now=5000.0)
    s.pull("wide", ids, now=5000.0)
    s.push("wide", ids, np.ones((len(ids), 64), np.float32), now=5001.0)
    started = []

    def progress(table, part, chunk):
        if not started:
            started.append(1)
            print("writing", flush=True)
            if mode == "hold":
                time.sleep(120)

    s._ckpt.on_progress = progress
    s.checkpoint(tag + 1)
    print("committed", flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hold", "race"])
def test_a_sigkill_during_a_later_checkpoint_leaves_the_earlier_one_restorable(tmp_path, mode):
    """A child restores tag 3, grows the tables by hundreds of MB and starts checkpoint 4; it is
    killed (SIGKILL) in the middle ("hold": while the transaction is open; "race": 20 ms into a
    write that takes far longer). Tag 3 must restore bit for bit, and the log must take new
    checkpoints."""
    store = ParameterStore(SLOTS, default=SlotConfig(dim=64, min_count=1), checkpoint_dir=tmp_path)
    for k in range(1, 4):
        step(store, k)
        store.checkpoint(k)
    before = dump(store)
    store.close()

    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), "3", mode], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = child.stdout.readline()
        assert line.strip() == "writing", child.stderr.read()
        time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert "committed" not in child.stdout.read()

    s = ParameterStore(SLOTS, default=SlotConfig(dim=64, min_count=1), checkpoint_dir=tmp_path)
    assert s.tags() == [1, 2, 3]
    s.restore(3)
    assert_same(dump(s), before)
    step(s, 4)
    s.checkpoint(4)
    after = dump(s)
    s.close()
    s = ParameterStore(SLOTS, default=SlotConfig(dim=64, min_count=1), checkpoint_dir=tmp_path)
    s.restore(4)
    assert_same(dump(s), after)


def test_lmdb_layout_is_numpy_bytes_and_msgpack(tmp_path):
    store = ParameterStore(SLOTS, checkpoint_dir=tmp_path)
    step(store, 1)
    store.checkpoint(1)
    store.close()
    env = lmdb.open(str(tmp_path), max_dbs=3, readonly=True, lock=False)
    meta_db = env.open_db(b"meta", create=False)
    with env.begin() as txn:
        raw = txn.get(struct.pack(">Q", 1), db=meta_db)
    import msgspec

    meta = msgspec.msgpack.decode(raw)
    assert meta["full"] is True and {t["name"] for t in meta["tables"]} == set(SLOTS)
    env.close()
