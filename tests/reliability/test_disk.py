"""Disk faults on the three LMDB stores: the join spill store (flows/spill.py), the training
checkpoints (paramserver/checkpoint.py) and the serving store (paramserver/serving.py).

A store's map grows when it is full. A full disk is simulated by FRESHREC_LMDB_MAX_BYTES, the cap
on every store's map: a write past it fails whole with an error naming the store and the setting,
the store opens and reads as before the write, and the same write succeeds once the cap is raised.
For the flow, "recovers" means: it stops with that error (no store torn, no example lost), and a
restart with Bytewax recovery and room on disk resumes from its last snapshot and ends with the
examples of a run that never hit the cap.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import lmdb
import numpy as np
import pytest

from flows.config import LMDB_CAP
from flows.sample import write_sample
from flows.spill import LmdbSpillStore, SpillStoreFull
from paramserver.lmdb_limits import LmdbStoreFull
from paramserver.records import decode_item
from paramserver.serving import LmdbServingStore
from paramserver.store import ParameterStore
from paramserver.table import SlotConfig
from tests.flows.test_recovery import by_key, flow_env, read_stream

CHUNK = 200_000  # bytes of payload a write adds, about


class Spill:
    kind = "join spill store"

    def __init__(self, path: Path, map_size: int, cap: int | None):
        self.s = LmdbSpillStore(path, map_size=map_size, max_map_size=cap, cap_name=LMDB_CAP)
        self.map_size = lambda: self.s._env.info()["map_size"]

    def write(self, i: int) -> None:
        rng = np.random.default_rng(i)
        self.s.flush(i + 1, {f"k{i:04d}-{j:03d}": (float(i), rng.bytes(4000)) for j in range(CHUNK // 4000)})

    def read(self) -> tuple:
        entries = self.s.due(float("inf"), limit=1 << 30)
        values = self.s.get_many([k for _, k in entries])
        return self.s.last_tag(), len(self.s), hashlib.sha256(repr((entries, values)).encode()).hexdigest()

    def close(self) -> None:
        self.s.close()

    def inner(self) -> tuple[object, str]:
        """An object and its method that run inside a write's transaction (a full disk shows there)."""
        return self.s, "_flush_txn"


class Checkpoints:
    kind = "checkpoint store"

    def __init__(self, path: Path, map_size: int, cap: int | None):
        self.p = ParameterStore({"s": SlotConfig(dim=32, min_count=1)}, checkpoint_dir=path,
                                checkpoint_max_bytes=cap, cap_name=LMDB_CAP)
        self.p._ckpt._env.set_mapsize(map_size)
        self.map_size = lambda: self.p._ckpt._env.info()["map_size"]
        tags = self.p.tags()
        self.next = tags[-1] + 1 if tags else 1
        if tags:
            self.p.restore(tags[-1])

    def write(self, i: int) -> None:
        rng = np.random.default_rng(i)
        self.p.pull("s", [f"id{i}-{j}" for j in range(1000)])
        self.p.set_dense({"w": rng.standard_normal(CHUNK // 4, dtype=np.float32)})
        self.p.checkpoint(self.next)
        self.next += 1

    def read(self) -> tuple:
        tags = self.p.tags()
        if not tags:
            return (), None
        self.p.restore(tags[-1])
        rows = self.p.pull("s", [f"id{i}-{j}" for i in range(40) for j in range(0, 1000, 50)], admit=False)
        w = self.p.dense().arrays.get("w")
        return tuple(tags), hashlib.sha256(rows.tobytes() + (w.tobytes() if w is not None else b"")).hexdigest()

    def close(self) -> None:
        self.p.close()

    def inner(self) -> tuple[object, str]:
        return self.p._ckpt, "_write"


class Serving:
    kind = "serving store"

    def __init__(self, path: Path, map_size: int, cap: int | None):
        self.s = LmdbServingStore(path, writer=True, map_size=map_size, max_map_size=cap, cap_name=LMDB_CAP)
        self.map_size = lambda: self.s.env.info()["map_size"]

    def write(self, i: int) -> None:
        rng = np.random.default_rng(i)
        self.s.apply([(b"item/%04d-%03d" % (i, j), rng.bytes(4000)) for j in range(CHUNK // 4000)])

    def read(self) -> tuple:
        keys = [b"item/%04d-%03d" % (i, j) for i in range(60) for j in range(CHUNK // 4000)]
        return self.s.params_version(), len(self.s), hashlib.sha256(repr(self.s.get(keys)).encode()).hexdigest()

    def close(self) -> None:
        self.s.close()

    def inner(self) -> tuple[object, str]:
        return self.s, "_prune"  # run inside `_commit`'s transaction, before its commit


STORES = [Spill, Checkpoints, Serving]


@pytest.mark.parametrize("kind", STORES, ids=lambda k: k.kind.split()[0])
def test_a_store_grows_its_map_from_a_tiny_one(tmp_path, kind):
    t0 = time.monotonic()
    store = kind(tmp_path / "s", 64 << 10, None)
    for i in range(30):  # about 6 MB into a 64 KiB map
        store.write(i)
    assert store.map_size() > 6_000_000
    before = store.read()
    store.close()
    again = kind(tmp_path / "s", 64 << 10, None)  # reopened with the tiny map: LMDB takes the file's size
    assert again.read() == before
    again.close()
    print(f"\nDISK grow {kind.kind}: {time.monotonic() - t0:.2f} s")


@pytest.mark.parametrize("kind", STORES, ids=lambda k: k.kind.split()[0])
def test_a_full_store_names_itself_and_the_setting_keeps_its_data_and_recovers_when_raised(tmp_path, kind):
    t0 = time.monotonic()
    cap = 2 << 20
    store = kind(tmp_path / "s", 64 << 10, cap)
    written = 0
    with pytest.raises(LmdbStoreFull) as err:
        for i in range(100):
            before = store.read()
            store.write(i)
            written += 1
    assert 1 <= written < 20
    message = str(err.value)
    assert kind.kind in message and str(tmp_path / "s") in message and f"{LMDB_CAP}={cap}" in message
    if kind is Spill:
        assert isinstance(err.value, SpillStoreFull)
    # Nothing of the failed write is in the store, in this process or after a reopen.
    assert store.map_size() == cap
    assert store.read() == before
    store.close()
    reopened = kind(tmp_path / "s", 64 << 10, cap)
    assert reopened.read() == before
    with pytest.raises(LmdbStoreFull):
        reopened.write(written)
    assert reopened.read() == before
    reopened.close()
    # Space returns (the cap is raised): the same write goes through, and the store carries on.
    roomy = kind(tmp_path / "s", 64 << 10, 64 << 20)
    for i in range(written, written + 10):
        roomy.write(i)
    after = roomy.read()
    roomy.close()
    final = kind(tmp_path / "s", 64 << 10, None)
    assert final.read() == after
    final.close()
    print(f"\nDISK full {kind.kind}: {written} writes fit under {cap} bytes; {time.monotonic() - t0:.2f} s")


@pytest.mark.parametrize("kind", STORES, ids=lambda k: k.kind.split()[0])
def test_a_full_disk_names_the_store_keeps_its_data_and_the_store_carries_on(tmp_path, monkeypatch, kind):
    """LMDB's DiskError (ENOSPC, which a test cannot make without filling a real disk) raised where
    the store's write transaction runs: the write fails whole, with an error naming the store."""
    store = kind(tmp_path / "s", 64 << 10, None)
    store.write(0)
    before = store.read()
    target, method = store.inner()
    real = getattr(target, method)

    def no_space(*args, **kwargs):
        real(*args, **kwargs)  # the transaction's work done, as far as a commit that then fails
        raise lmdb.DiskError("mdb_txn_commit: No space left on device")

    monkeypatch.setattr(target, method, no_space)
    with pytest.raises(LmdbStoreFull) as err:
        store.write(1)
    message = str(err.value)
    assert f"the disk under the {kind.kind} {tmp_path / 's'} is full" in message and "No space" in message
    assert store.read() == before
    monkeypatch.setattr(target, method, real)
    store.write(1)  # room again: the store carries on
    assert store.read() != before
    store.close()


def recovery_dir(path: Path) -> Path:
    path.mkdir()
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(path), "1"], check=True)
    return path


def run_flow(env: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bytewax.run", "flows.pipeline:flow", *args], env=env,
                          cwd=env["FRESHREC_STATE_DIR"].rsplit("/", 1)[0], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("train, buckets, cap, fills", [("0", "1", 4 << 20, "join spill store"),
                                                        ("1", "4", 1 << 20, "serving store")],
                         ids=["spill", "serving"])
def test_the_flow_stops_at_a_full_store_and_a_restart_with_room_resumes_without_loss(tmp_path, train, buckets,
                                                                                    cap, fills):
    # Without training, all the join state in one bucket is the largest store; with training, the
    # serving store's rows are.
    straight, capped = tmp_path / "straight", tmp_path / "capped"
    write_sample(straight / "data", requests=4000, per_request=5, seed=5)
    shutil.copytree(straight / "data", capped / "data")
    extra = {"FRESHREC_TRAIN": train, "FRESHREC_BUCKETS": buckets, "FRESHREC_METRICS_PORT": "off"}

    t0 = time.monotonic()
    done = run_flow(flow_env(straight, **extra))
    straight_s = time.monotonic() - t0
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    expected = by_key(read_stream(straight, "examples"))
    assert len(expected) == 20000

    # A disk too small for the join state: the flow stops with the error, naming store and setting.
    recovery = recovery_dir(capped / "recovery")
    args = ("-r", str(recovery), "-s", "1", "-b", "0")
    t1 = time.monotonic()
    full = run_flow(flow_env(capped, FRESHREC_LMDB_MAX_BYTES=str(cap), **extra), *args)
    stop_s = time.monotonic() - t1
    err = full.stderr.decode(errors="replace")
    assert full.returncode != 0
    assert "is full" in err and f"{LMDB_CAP}={cap}" in err, err[-3000:]
    store = next(k for k in ("join spill store", "checkpoint store", "serving store") if k in err)
    assert store == fills, err[-3000:]
    written_before = len(read_stream(capped, "examples"))
    assert written_before < 20000

    # Every store opens and reads consistently after the stop.
    for bucket in sorted((capped / "state" / "join").iterdir()):
        with LmdbSpillStore(bucket) as s:
            due = s.due(float("inf"), limit=1 << 30)
            assert len(due) == len(s) and None not in s.get_many([k for _, k in due])
    with LmdbServingStore(capped / "state" / "serving") as s:
        items = list(s.scan(b"item/"))
        assert items and all(decode_item(v)["item_id"] for _, v in items)
    if (capped / "state" / "params").exists():
        p = ParameterStore(checkpoint_dir=capped / "state" / "params")
        for tag in p.tags()[-1:]:
            p.restore(tag)
        p.close()

    # Space returns: the same command without the cap resumes from the last snapshot.
    t2 = time.monotonic()
    resumed = run_flow(flow_env(capped, **extra), *args)
    resume_s = time.monotonic() - t2
    assert resumed.returncode == 0, resumed.stderr.decode(errors="replace")[-3000:]
    got = by_key(read_stream(capped, "examples"))
    assert set(got) == set(expected), "an impression was lost or invented"
    repeats = 0
    for key, outcomes in got.items():
        assert set(outcomes) == set(expected[key]), key
        repeats += len(outcomes) - 1
    # Dead letters too: none lost; one replayed from the interrupted epoch is written again.
    dead = Counter((d["stream"], d["reason"], d["raw"], d["raw_b64"]) for d in read_stream(capped, "dead-letter"))
    assert set(dead) == {(d["stream"], d["reason"], d["raw"], d["raw_b64"]) for d in read_stream(straight, "dead-letter")}
    print(f"\nDISK flow: {store} full after {stop_s:.1f} s ({written_before} examples written); resumed run "
          f"{resume_s:.1f} s; straight run {straight_s:.1f} s; 0 lost, {repeats} repeated examples, "
          f"{sum(dead.values()) - len(dead)} repeated dead letters")
