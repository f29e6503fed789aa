"""Embedding tables: a pulled row is its id's and only its id's (across growth, expiry and reuse of
row numbers), admission, expiry, optimizers against plain numpy, repeated ids, touched rows."""

from __future__ import annotations

import math
import random
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paramserver.idmap import IdIndex, decode, encode, key_hash
from paramserver.optimizers import Adagrad, Adam, Ftrl, Sgd
from paramserver.store import ParameterStore
from paramserver.table import EmbeddingTable, HashedEmbeddingTable, SlotConfig, stamp

SGD1 = Sgd(lr=1.0)  # w -= g exactly: rows hold sums of small integers, checked exactly


# --- the id map -------------------------------------------------------------------------------------

@given(st.lists(st.text(max_size=40), min_size=1, max_size=60))
def test_keys_round_trip_and_stay_distinct(ids):
    keys = encode(ids, 1)
    assert decode(keys) == ids
    distinct = {}
    for i, k in zip(ids, map(bytes, np.ascontiguousarray(keys)), strict=True):
        assert distinct.setdefault(k, i) == i  # one key per id, one id per key


def test_ids_that_differ_only_by_trailing_nul_or_padding_are_distinct():
    ids = ["a", "a\x00", "a\x00\x00", "\x00", "", "abcdefgh", "abcdefgh\x00", "é", "é\x00", "x" * 129]
    t = EmbeddingTable("s", SlotConfig(dim=1, optimizer=SGD1, init="zeros"))
    t.pull(ids, now=1.0)
    t.push(ids, -np.arange(1, len(ids) + 1, dtype=np.float32)[:, None], now=1.0)
    assert t.pull(ids, now=1.0)[:, 0].tolist() == list(range(1, len(ids) + 1))
    assert sorted(t.take_touched(2.0).ids) == sorted(ids)


def test_index_stash_holds_what_the_buckets_cannot(monkeypatch):
    from paramserver import idmap

    # Buckets filled to 97%: two choices of eight slots no longer place every key.
    monkeypatch.setattr(idmap, "MAX_LOAD", 1.0)
    monkeypatch.setattr(idmap, "GROW_LOAD", 0.97)
    idx = IdIndex(capacity=16)
    ids = [f"k{i}" for i in range(30_000)]
    k = encode(ids, 1)
    h = key_hash(k)
    rows = idx.insert(k, h)
    assert len(idx._stash_h) > 0
    assert len(np.unique(rows)) == len(ids)
    assert np.array_equal(idx.lookup(k, h), rows)
    gone = rows[::3]
    idx.remove(gone)
    got = idx.lookup(k, h)
    assert (got[::3] == -1).all()
    keep = np.ones(len(ids), bool)
    keep[::3] = False
    assert np.array_equal(got[keep], rows[keep])
    assert not np.isin(idx._stash_rows, gone).any()


def test_index_finds_stashed_keys_beside_keys_whose_two_buckets_are_one(monkeypatch):
    # Two buckets only: half the keys get the same bucket twice (their slot is a candidate twice),
    # and most keys overflow to the stash. Found once by a bug that counted candidates.
    from paramserver import idmap

    monkeypatch.setattr(idmap, "MAX_LOAD", 100.0)
    idx = IdIndex(capacity=16)
    assert idx._nb == 2
    k = encode([f"id{i}" for i in range(60)], 1)
    h = key_hash(k)
    rows = idx.insert(k, h)
    _, bb = idx._probe(h, idx._nb)
    stashed = np.isin(rows, idx._stash_rows)
    twice = np.flatnonzero((bb[:, 0] == bb[:, 1]) & ~stashed)
    alone = np.flatnonzero(stashed)
    j = min(len(twice), len(alone))
    assert j > 0
    q = np.concatenate([twice[:j], alone[:j]])  # as many bucket candidates as keys
    got, all_found = idx.find(k[q], h[q])
    assert all_found and np.array_equal(got, rows[q])
    got, all_found = idx.find(k, h)
    assert all_found and np.array_equal(got, rows)


def test_index_checks_the_key_behind_a_matching_fingerprint():
    idx = IdIndex(capacity=64)
    k = encode(["a", "b"], 1)
    h = key_hash(k)
    ra, rb = idx.insert(k, h).tolist()
    # Forge a slot in a's first bucket with a's fingerprint but b's row: only the key check
    # keeps "a" from reading b's row.
    fp, bb = idx._probe(h[:1], idx._nb)
    bucket = idx._tbl[bb[0, 0]]
    free = int(np.flatnonzero(bucket == 0)[0])
    bucket[free] = fp[0] | np.uint64(rb)
    assert idx.lookup(k, h).tolist() == [ra, rb]


# --- a reference model of the table, for the property test and the big run ------------------------------

class Reference:
    """What a collisionless SGD(lr=1) table with zero-initialised rows must hold, in plain Python."""

    def __init__(self, dim: int, min_count: int, expire_s: float) -> None:
        self.dim, self.min_count, self.expire_s = dim, min_count, expire_s
        self.rows: dict[str, np.ndarray] = {}
        self.last: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self.seen: dict[str, int] = {}

    def pull(self, ids: list[str], now: float) -> np.ndarray:
        for i, c in Counter(ids).items():
            if i not in self.rows:
                n = self.pending.pop(i, 0) + c
                if n >= self.min_count:
                    self.rows[i] = np.zeros(self.dim, np.float32)
                    self.last[i] = stamp(now)
                    self.seen.pop(i, None)
                else:
                    self.pending[i] = n
                    self.seen[i] = stamp(now)
        return np.array([self.rows.get(i, np.zeros(self.dim, np.float32)) for i in ids], np.float32)

    def push(self, ids: list[str], grads: np.ndarray, now: float) -> None:
        sums: dict[str, np.ndarray] = {}
        for i, g in zip(ids, grads, strict=True):
            if i in self.rows:
                sums[i] = sums[i] + g if i in sums else g.copy()
        for i, g in sums.items():
            self.rows[i] = self.rows[i] - g
            self.last[i] = stamp(now)

    def expire(self, now: float) -> set[str]:
        cutoff = now - self.expire_s
        gone = {i for i, t in self.last.items() if t <= cutoff}
        for i in gone:
            del self.rows[i], self.last[i]
        for i in [i for i, t in self.seen.items() if t <= cutoff]:
            del self.seen[i], self.pending[i]
        return gone


id_text = st.text(alphabet=st.sampled_from(["a", "b", "é", "\x00", "z", "1", "日"]), min_size=1, max_size=11)
op = st.one_of(
    st.tuples(st.just("pull"), st.lists(id_text, min_size=1, max_size=12)),
    st.tuples(st.just("push"), st.lists(id_text, min_size=1, max_size=12)),
    st.tuples(st.just("expire"), st.integers(0, 6)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=40), min_count=st.integers(1, 3), capacity=st.sampled_from([2, 4, 64]))
def test_a_pulled_row_is_its_ids_row_only(ops, min_count, capacity):
    """Random ids (unicode, NULs, long), interleaved pulls, pushes and expiry, tiny initial capacity
    (so the table grows, and row numbers get reused): every pull matches the reference."""
    dim = 2
    t = EmbeddingTable("s", SlotConfig(dim=dim, optimizer=SGD1, init="zeros", min_count=min_count, expire_s=5.0),
                       capacity=capacity)
    ref = Reference(dim, min_count, 5.0)
    now = 100.0
    marker = 0
    evicted: set[str] = set()
    for kind, arg in ops:
        now += 1.0
        if kind == "pull":
            assert np.array_equal(t.pull(arg, now=now), ref.pull(arg, now))
        elif kind == "push":
            marker += 1
            g = np.array([[-marker, -(sum(map(ord, i)) % 7)] for i in arg], np.float32)
            t.push(arg, g, now=now)
            ref.push(arg, g, now)
        else:
            now += arg
            assert t.expire(now) == len(gone := ref.expire(now))
            evicted |= gone
        assert len(t) == len(ref.rows)
        assert t.pending == len(ref.pending)
    if ref.rows:
        ids = sorted(ref.rows)
        assert np.array_equal(t.pull(ids, now=now), np.array([ref.rows[i] for i in ids]))
    batch = t.take_touched(now)
    assert set(batch.ids) <= set(ref.rows)
    assert set(batch.evicted) <= evicted


@pytest.mark.slow
def test_big_run_against_a_dict_of_rows():
    """About 1.5 M distinct random ids through pulls, pushes and expiry: every row checked, by the
    id it encodes, against a dict of expected rows."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(5)
    n_ids = 1_500_000
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789-_é"))
    lens = rng.integers(1, 20, n_ids)
    chars = alphabet[rng.integers(0, len(alphabet), lens.sum())]
    cuts = np.cumsum(lens)[:-1]
    ids = list(dict.fromkeys("".join(p) for p in np.split(chars, cuts)))  # distinct, random
    n_ids = len(ids)
    num = np.arange(n_ids)
    tag = np.stack([num % 4096 + 1, num // 4096 + 1, np.ones(n_ids, np.int64)], axis=1).astype(np.float32)

    t = EmbeddingTable("big", SlotConfig(dim=3, optimizer=SGD1, init="zeros", expire_s=50.0), capacity=16)
    count = np.zeros(n_ids, np.int64)  # the reference rows: count[i] * tag[i]
    alive = np.zeros(n_ids, bool)
    last = np.zeros(n_ids, np.int64)
    now = 1000
    batch = 60_000
    order = rng.permutation(n_ids)
    fresh = 0
    rounds = 0
    stashed = 0
    while fresh < n_ids:
        rounds += 1
        now += 3
        # half new ids, half drawn from those seen so far (pushed again, or back after eviction),
        # and some of those twice
        new = order[fresh : fresh + batch // 2]
        fresh += len(new)
        old = order[rng.integers(0, fresh, batch // 2)]
        k = np.concatenate([new, old, old[: batch // 8]])
        bid = [ids[i] for i in k]
        got = t.pull(bid, now=now)
        alive[k] = True
        assert np.array_equal(got, count[k, None] * tag[k]), "a pulled row is not its id's"
        t.push(bid, -tag[k], now=now)
        np.add.at(count, k, 1)
        last[k] = now
        if rounds % 4 == 0:
            now += 30
            gone = np.flatnonzero(alive & (last <= now - 50))
            assert t.expire(now) == len(gone)
            alive[gone] = False
            count[gone] = 0
        assert len(t) == alive.sum()
        stashed = max(stashed, len(t._index._stash_h))
    assert stashed > 0, "some ids overflowed both buckets into the stash"
    # every id, one last time
    for s in range(0, n_ids, 200_000):
        k = np.arange(s, min(n_ids, s + 200_000))
        k = k[alive[k]]
        got = t.pull([ids[i] for i in k], now=now)
        assert np.array_equal(got, count[k, None] * tag[k])
        back = np.rint(got[:, :2] / np.maximum(got[:, 2:], 1)).astype(np.int64)
        pushed = got[:, 2] > 0
        assert np.array_equal((back[pushed, 0] - 1) + 4096 * (back[pushed, 1] - 1), k[pushed])
    assert t.counts["evicted"] > 100_000 and t.hw < n_ids, "row numbers were reused"
    assert time.perf_counter() - t0 < 120, "the big run should stay well under a minute"


# --- hashed baseline ------------------------------------------------------------------------------------

def test_hashed_mode_collides_and_collisionless_does_not():
    cfg = dict(dim=2, optimizer=SGD1, init="zeros")
    hashed = HashedEmbeddingTable("h", SlotConfig(hash_bits=6, **cfg))
    ids = [f"user-{i}" for i in range(500)]
    rows = hashed._rows(ids)
    a, b = next((ids[i], ids[j]) for i in range(len(ids)) for j in range(i) if rows[i] == rows[j])
    hashed.pull([a, b], now=1.0)
    hashed.push([a], np.array([[-1.0, -2.0]], np.float32), now=1.0)
    assert hashed.pull([b], now=1.0).tolist() == [[1.0, 2.0]]  # b got a's update: a collision

    exact = EmbeddingTable("e", SlotConfig(min_count=1, **cfg))
    exact.pull(ids, now=1.0)
    exact.push([a], np.array([[-1.0, -2.0]], np.float32), now=1.0)
    assert exact.pull([b], now=1.0).tolist() == [[0.0, 0.0]]
    assert exact.pull([a], now=1.0).tolist() == [[1.0, 2.0]]
    assert len(exact) == len(ids) and len(hashed) <= 64


def test_hashed_table_reports_pushed_ids_with_their_shared_rows():
    t = HashedEmbeddingTable("h", SlotConfig(dim=2, optimizer=SGD1, init="zeros", hash_bits=8))
    t.pull(["x", "y"], now=1.0)
    t.push(["x", "y", "x"], np.ones((3, 2), np.float32), now=2.0, arrival=np.array([5.0, 4.0, 3.0]))
    b = t.take_touched(3.0)
    assert sorted(b.ids) == ["x", "y"]
    assert b.values.shape == (2, 2) and (b.versions == 1).all()
    assert dict(zip(b.ids, b.earliest_arrival.tolist(), strict=True))["x"] == 3.0


# --- admission ------------------------------------------------------------------------------------------

def test_admission_after_min_count_sightings():
    t = EmbeddingTable("tag", SlotConfig(dim=4, min_count=3, init="uniform"))
    g = np.ones((1, 4), np.float32)
    assert not t.pull(["dance"], now=1.0).any()
    t.push(["dance"], g, now=1.0)
    assert t.counts["ignored_pushes"] == 1 and t.pending == 1
    assert not t.pull(["dance"], now=2.0).any()  # seen twice
    first = t.pull(["dance"], now=3.0)  # the third sighting admits it
    assert first.any() and len(t) == 1 and t.pending == 0
    t.push(["dance"], g, now=4.0)
    assert not np.array_equal(t.pull(["dance"], now=5.0), first)
    # sightings within one batch count too
    assert t.pull(["cat", "cat", "cat"], now=6.0).any()
    assert t.counts["admitted"] == 2
    assert t.counts["unadmitted_pulls"] == 2


def test_user_and_item_slots_admit_at_first_sight_by_default():
    s = ParameterStore()
    assert s.config_for("user_id").min_count == 1 and s.config_for("item_id").min_count == 1
    assert s.config_for("author").min_count == 2
    assert s.pull("user_id", ["u1"], now=1.0).any()
    assert not s.pull("author", ["a1"], now=1.0).any()


def test_admission_probability_is_a_stable_fraction_of_ids():
    cfg = SlotConfig(dim=2, admit_p=0.3)
    ids = [f"id{i}" for i in range(20_000)]
    a, b = EmbeddingTable("tag", cfg), EmbeddingTable("tag", cfg)
    a.pull(ids, now=1.0)
    b.pull(ids[::-1], now=1.0)
    assert 0.28 < len(a) / len(ids) < 0.32
    assert set(a.take_touched(2.0).ids) == set()  # nothing pushed yet
    admitted = a.pull(ids, now=2.0).any(axis=1)
    assert np.array_equal(admitted, b.pull(ids, now=2.0).any(axis=1))  # the same ids, any order
    a.pull(ids, now=3.0)
    assert len(a) == admitted.sum()  # a refused id stays refused
    assert a.counts["refused_by_p"] == 3 * (len(ids) - admitted.sum())


def test_pending_sightings_expire():
    t = EmbeddingTable("tag", SlotConfig(dim=2, min_count=3, expire_s=10.0))
    t.pull(["x", "x"], now=100.0)
    assert t.pending == 1
    t.expire(105.0)
    assert t.pending == 1
    t.expire(111.0)
    assert t.pending == 0 and t.counts["pending_expired"] == 1
    assert not t.pull(["x"], now=112.0).any()  # counting starts again


# --- expiry --------------------------------------------------------------------------------------------

def test_expiry_evicts_rows_with_their_state_and_reuses_row_numbers():
    t = EmbeddingTable("item_id", SlotConfig(dim=3, optimizer=Adagrad(initial_accumulator=0.1), min_count=1,
                                             expire_s=60.0))
    old = [f"v{i}" for i in range(100)]
    t.pull(old, now=1000.0)
    t.push(old[:50], np.ones((50, 3), np.float32), now=1000.0)
    t.push(old[50:], np.ones((50, 3), np.float32), now=1030.0)
    hw = t.hw
    assert t.expire(1059.0) == 0
    assert t.expire(1060.0) == 50
    batch = t.take_touched(1060.0)
    assert sorted(batch.evicted) == sorted(old[:50])
    assert set(batch.ids) == set(old[50:])
    assert len(t) == 50
    new = [f"n{i}" for i in range(50)]
    fresh = t.pull(new, now=1061.0)
    assert t.hw == hw, "the new ids took the evicted rows"
    state = t.row_state(new)
    assert (state["version"] == 0).all() and np.allclose(state["state"], 0.1)
    again = t.pull(old[:50], now=1062.0)  # evicted ids come back as new rows with their first values
    assert np.array_equal(again, t._init_values(key_hash(encode(old[:50], 1))))
    assert not np.array_equal(fresh, again)
    assert t.counts["evicted"] == 50


def test_an_evicted_id_that_returns_and_is_pushed_is_a_row_not_a_tombstone():
    t = EmbeddingTable("item_id", SlotConfig(dim=2, min_count=1, expire_s=10.0))
    t.pull(["a", "b"], now=0.0)
    t.push(["a", "b"], np.ones((2, 2), np.float32), now=0.0)
    t.take_touched(0.0)
    t.expire(20.0)
    t.pull(["a"], now=21.0)
    t.push(["a"], np.ones((1, 2), np.float32), now=21.0)
    b = t.take_touched(22.0)
    assert b.ids == ["a"] and b.evicted == ["b"]


# --- optimizers ------------------------------------------------------------------------------------------

def ref_update(kind: str, hp: dict, w: np.ndarray, s: dict, g: np.ndarray, t: int) -> None:
    """One update of one row in float64, written from the papers' formulas."""
    if kind == "sgd":
        w -= hp["lr"] * g
    elif kind == "adagrad":
        s["acc"] += g * g
        w -= hp["lr"] * g / (np.sqrt(s["acc"]) + hp["eps"])
    elif kind == "ftrl":
        n_new = s["n"] + g * g
        sigma = (np.sqrt(n_new) - np.sqrt(s["n"])) / hp["alpha"]
        s["z"] += g - sigma * w
        s["n"] = n_new
        lr_inv = (hp["beta"] + np.sqrt(s["n"])) / hp["alpha"] + hp["l2"]
        w[:] = np.where(np.abs(s["z"]) <= hp["l1"], 0.0, -(s["z"] - np.sign(s["z"]) * hp["l1"]) / lr_inv)
    elif kind == "adam":
        s["m"] = hp["beta1"] * s["m"] + (1 - hp["beta1"]) * g
        s["v"] = hp["beta2"] * s["v"] + (1 - hp["beta2"]) * g * g
        mhat = s["m"] / (1 - hp["beta1"] ** t)
        vhat = s["v"] / (1 - hp["beta2"] ** t)
        w -= hp["lr"] * mhat / (np.sqrt(vhat) + hp["eps"])


def ref_state(kind: str, hp: dict, dim: int) -> dict:
    return {"sgd": {}, "adagrad": {"acc": np.full(dim, hp.get("initial_accumulator", 0.0))},
            "ftrl": {"z": np.zeros(dim), "n": np.full(dim, hp.get("initial_accumulator", 0.0))},
            "adam": {"m": np.zeros(dim), "v": np.zeros(dim)}}[kind]


@pytest.mark.parametrize("opt", [
    Sgd(lr=0.1),
    Adagrad(lr=0.05, initial_accumulator=0.1, eps=1e-7),
    Ftrl(alpha=0.1, beta=1.0, l1=0.001, l2=0.01, initial_accumulator=0.1),
    Ftrl(alpha=0.5, beta=0.5, l1=0.0, l2=0.0, initial_accumulator=0.0),
    Adam(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8),
])
def test_optimizer_matches_a_numpy_reference(opt):
    kind = type(opt).__name__.lower()
    hp = {f: getattr(opt, f) for f in opt.__struct_fields__}
    dim = 5
    rng = np.random.default_rng(3)
    ids = [f"i{k}" for k in range(30)]
    t = EmbeddingTable("s", SlotConfig(dim=dim, optimizer=opt, init="normal", init_scale=0.1))
    w = {i: v.astype(np.float64) for i, v in zip(ids, t.pull(ids, now=1.0), strict=True)}
    s = {i: ref_state(kind, hp, dim) for i in ids}
    steps = dict.fromkeys(ids, 0)
    for step in range(25):
        batch = [ids[k] for k in rng.integers(0, len(ids), 40)]  # with repeats
        g = rng.standard_normal((len(batch), dim)).astype(np.float32)
        t.pull(batch, now=2.0 + step)
        t.push(batch, g, now=2.0 + step)
        sums: dict[str, np.ndarray] = {}
        for i, gi in zip(batch, g.astype(np.float64), strict=True):
            sums[i] = sums[i] + gi if i in sums else gi
        for i, gi in sums.items():
            steps[i] += 1
            ref_update(kind, hp, w[i], s[i], gi, steps[i])
    got = t.pull(ids, now=100.0)
    want = np.array([w[i] for i in ids])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
    state = t.row_state(ids)
    assert state["version"].tolist() == [steps[i] for i in ids]
    if kind != "sgd":
        names = {"adagrad": ["acc"], "ftrl": ["z", "n"], "adam": ["m", "v"]}[kind]
        want_s = np.array([np.concatenate([s[i][k] for k in names]) for i in ids])
        np.testing.assert_allclose(state["state"], want_s, rtol=2e-4, atol=2e-6)


# --- repeated ids, touched rows ------------------------------------------------------------------------------

def test_repeated_ids_in_a_batch_sum_their_gradients():
    cfg = SlotConfig(dim=4, optimizer=Adagrad(), min_count=1)
    a, b = EmbeddingTable("s", cfg), EmbeddingTable("s", cfg)
    rng = np.random.default_rng(0)
    ids = ["x", "y", "x", "z", "x", "y"]
    g = rng.standard_normal((6, 4)).astype(np.float32)
    a.pull(ids, now=1.0)
    b.pull(ids, now=1.0)
    a.push(ids, g, now=2.0)
    summed = np.stack([g[0] + g[2] + g[4], g[1] + g[5], g[3]])
    b.push(["x", "y", "z"], summed, now=2.0)
    assert np.array_equal(a.pull(["x", "y", "z"], now=3.0), b.pull(["x", "y", "z"], now=3.0))
    assert a.row_state(["x", "y", "z"])["version"].tolist() == [1, 1, 1]
    assert a.counts["updates"] == 3


def test_take_touched_keeps_the_earliest_arrival_and_clears():
    t = EmbeddingTable("user_id", SlotConfig(dim=2, min_count=1))
    ids = ["u1", "u2", "u3"]
    t.pull(ids, now=10.0)
    g = np.ones((3, 2), np.float32)
    t.push(ids, g, now=11.0, arrival=np.array([5.0, math.nan, 7.0]))
    t.push(["u1", "u2", "u1"], g, now=12.0, arrival=np.array([6.0, 4.0, 3.0]))
    t.push(["u3"], g[:1], now=13.0, arrival=9.0)
    t.push(["u3"], g[:1], now=13.5)  # unknown arrival changes nothing
    b = t.take_touched(20.0)
    got = dict(zip(b.ids, zip(b.earliest_arrival.tolist(), b.versions.tolist(), strict=True), strict=True))
    assert got == {"u1": (3.0, 2), "u2": (4.0, 2), "u3": (7.0, 3)}
    assert b.updated_at == 13.5 and b.values.dtype == np.float32
    assert np.array_equal(b.values, t.pull(b.ids, now=20.0))
    empty = t.take_touched(21.0)
    assert empty.ids == [] and empty.updated_at == 21.0
    t.push(["u2"], g[:1], now=22.0)
    again = t.take_touched(23.0)
    assert again.ids == ["u2"] and math.isnan(again.earliest_arrival[0]) and again.versions.tolist() == [3]


def test_a_push_between_pull_and_push_of_another_batch_uses_the_right_rows():
    # The table remembers the rows of the batch it pulled last; a caller that refills the same
    # list, or pushes another one, must not get them.
    t = EmbeddingTable("s", SlotConfig(dim=1, optimizer=SGD1, init="zeros", min_count=1))
    ids = ["a", "b"]
    t.pull(ids, now=1.0)
    ids[:] = ["b", "c"]
    t.pull(["c"], now=1.0)
    t.push(ids, np.array([[-1.0], [-2.0]], np.float32), now=1.0)
    assert t.pull(["a", "b", "c"], now=1.0)[:, 0].tolist() == [0.0, 1.0, 2.0]
    t.pull(ids, now=1.0)
    ids.reverse()
    t.push(ids, np.array([[-3.0], [-4.0]], np.float32), now=1.0)
    assert t.pull(["b", "c"], now=1.0)[:, 0].tolist() == [5.0, 5.0]
    t.expire(10**9)  # every row evicted: the remembered rows must go too
    t.push(["a", "b", "c"], np.ones((3, 1), np.float32), now=10**9)
    assert t.counts["ignored_pushes"] == 3


def test_a_push_keeps_no_reference_to_the_callers_ids():
    # Holding the pulled batch's ids until the next pull would keep a trainer's batch alive, and
    # free it inside that next pull.
    import sys

    t = EmbeddingTable("s", SlotConfig(dim=2, min_count=1))
    t.pull([f"x{i}" for i in range(50)], now=1.0)  # the hot-id dict keeps these first objects
    ids = ["".join(("x", str(i))) for i in range(50)]  # new objects, equal to those
    before = [sys.getrefcount(i) for i in ids]
    t.pull(ids, now=1.0)
    t.push(ids, np.ones((50, 2), np.float32), now=1.0)
    assert [sys.getrefcount(i) for i in ids] == before


# --- the store -------------------------------------------------------------------------------------------

def test_store_caps_slots_and_counts_the_excess():
    s = ParameterStore(default=SlotConfig(dim=3, min_count=1), max_slots=2)
    s.pull("a", ["1"], now=1.0)
    s.pull("b", ["1"], now=1.0)
    assert s.pull("c", ["1", "2"], now=1.0).tolist() == [[0.0] * 3] * 2
    s.push("c", ["1"], np.ones((1, 3)), now=1.0)
    st_ = s.stats()
    assert st_["slots"] == 2 and st_["slots_refused"] == 1
    assert st_["refused_pulls"] == 2 and st_["refused_pushes"] == 1
    assert set(st_["tables"]) == {"a", "b"}


def test_store_dense_weights_are_versioned_copies():
    s = ParameterStore()
    w = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert s.set_dense({"w": w}, now=5.0) == 1
    w[0, 0] = 99
    blob = s.dense()
    assert blob.version == 1 and blob.updated_at == 5.0
    assert blob.arrays["w"].dtype == np.float32 and blob.arrays["w"][0, 0] == 0
    assert s.set_dense({"w": w}) == 2


def test_store_take_touched_and_expire_span_slots():
    s = ParameterStore(default=SlotConfig(dim=2, min_count=1, expire_s=5.0))
    for slot in ("user_id", "tag"):
        s.pull(slot, ["x", "y"], now=0.0)
        s.push(slot, ["x"], np.ones((1, 2)), now=0.0, arrival=0.0)
    batches = s.take_touched(now=1.0)
    assert {(b.slot, tuple(b.ids)) for b in batches} == {("user_id", ("x",)), ("tag", ("x",))}
    assert s.take_touched(now=1.0) == []
    assert s.expire(now=10.0) == 4
    assert {b.slot: sorted(b.evicted) for b in s.take_touched(now=10.0)} == {"user_id": ["x", "y"],
                                                                           "tag": ["x", "y"]}


def test_store_take_touched_is_safe_beside_pushes():
    import threading

    s = ParameterStore(default=SlotConfig(dim=8, min_count=1, init="zeros", optimizer=SGD1))
    ids = [f"i{k}" for k in range(512)]
    s.pull("s", ids, now=0.0)
    stop = threading.Event()
    seen: dict[str, int] = {}

    def sync():
        while not stop.is_set():
            for b in s.take_touched(now=1.0):
                for i, v, row in zip(b.ids, b.versions.tolist(), b.values, strict=True):
                    assert v > seen.get(i, 0)
                    seen[i] = v
                    assert (row == row[0]).all(), "a torn row"

    th = threading.Thread(target=sync)
    th.start()
    for _ in range(300):
        g = np.full((len(ids), 8), random.random(), np.float32)
        s.push("s", ids, g, now=1.0)
    stop.set()
    th.join()
    for b in s.take_touched(now=2.0):
        for i, v in zip(b.ids, b.versions.tolist(), strict=True):
            seen[i] = v
    assert set(seen.values()) == {300}


def test_docstring_examples_run():
    import doctest

    import paramserver.table

    assert doctest.testmod(paramserver.table, raise_on_error=True).attempted > 0


def test_hot_id_dict_never_outlives_an_eviction():
    # The dict of recently used ids must forget evicted ids, whose rows go to other ids.
    t = EmbeddingTable("item_id", SlotConfig(dim=1, optimizer=SGD1, init="zeros", expire_s=10.0))
    ids = [f"v{i}" for i in range(1000)]
    for _ in range(3):  # from the second pull on, every id is in the dict
        t.pull(ids, now=0.0)
    assert len(t._hot) == 1000 and t._hot_mode == 0
    t.push(ids[10:], np.zeros((990, 1), np.float32), now=100.0)
    assert t.expire(105.0) == 10  # 10 of 1000: the dict loses just those
    assert len(t._hot) == 990 and not set(ids[:10]) & set(t._hot)
    new = [f"n{i}" for i in range(10)]
    t.pull(new, now=106.0)
    t.push(new, -np.arange(1, 11, dtype=np.float32)[:, None], now=106.0)
    assert t.pull(ids[:10], now=107.0)[:, 0].tolist() == [0.0] * 10  # back as new rows, not n*'s
    assert t.pull(new, now=107.0)[:, 0].tolist() == list(range(1, 11))


def test_lookup_modes_agree():
    # All ids in the dict, most, or few (then the map for all): the same rows either way.
    t = EmbeddingTable("user_id", SlotConfig(dim=1, optimizer=SGD1, init="zeros"), hot_ids=1000)
    ids = [f"u{i}" for i in range(20_000)]
    t.pull(ids, now=0.0)
    t.push(ids, -np.arange(len(ids), dtype=np.float32)[:, None], now=0.0)
    rng = np.random.default_rng(0)
    modes = []
    for phase, (high, batches) in enumerate([(100, 20), (20_000, 30), (100, 30), (150, 10)]):
        for _ in range(batches):
            pick = rng.integers(0, high, 256)
            got = t.pull([ids[i] for i in pick], now=1.0)
            modes.append((phase, t._hot_mode))
            assert got[:, 0].tolist() == pick.astype(float).tolist()
    assert {m for _, m in modes} == {0, 1, 2}
    assert modes[19] == (0, 0) and {m for p, m in modes if p == 1} == {2}
    assert modes[79] == (2, 0) and modes[-1] == (3, 0)  # back to the dict once it holds them again


def test_a_look_without_admission_counts_nothing():
    s = ParameterStore(default=SlotConfig(dim=2, min_count=2, init="uniform"))
    assert not s.pull("tag", ["x", "x"], now=1.0, admit=False).any()
    assert "tag" not in s.tables  # a look creates no slot
    s.pull("tag", ["x"], now=1.0)
    assert s.stats()["tables"]["tag"]["pending"] == 1
    assert not s.pull("tag", ["x"], now=1.0, admit=False).any()
    assert s.stats()["tables"]["tag"]["pending"] == 1 and s.stats()["tables"]["tag"]["pulls"] == 1
    row = s.pull("tag", ["x"], now=2.0)  # the second training sighting admits it
    assert row.any() and np.array_equal(s.pull("tag", ["x", "y"], now=3.0, admit=False)[0], row[0])
    h = HashedEmbeddingTable("h", SlotConfig(dim=2, hash_bits=4))
    assert not h.pull(["a"], now=1.0, admit=False).any() and len(h) == 0
    assert h.pull(["a"], now=1.0).any() and len(h) == 1


# --- many steps at once (pull_working / write_working) ---------------------------------------------

def _steps_one_by_one(store: ParameterStore, slot: str, steps: list[list[str]], grads: list[np.ndarray],
                      arrivals: list[np.ndarray], now: float) -> None:
    for ids, g, arr in zip(steps, grads, arrivals, strict=True):
        store.pull(slot, ids, now=now)
        store.push(slot, ids, g, now=now, arrival=arr)


def _steps_working(store: ParameterStore, slot: str, steps: list[list[str]], grads: list[np.ndarray],
                   arrivals: list[np.ndarray], now: float) -> None:
    """The same steps on a working set: a trainer's loop, here in numpy with the slot's optimizer."""
    distinct = list(dict.fromkeys(i for ids in steps for i in ids))
    place = {v: k for k, v in enumerate(distinct)}
    sightings = np.zeros(len(distinct), np.int64)
    for ids in steps:
        for i in set(ids):
            sightings[place[i]] += 1
    w = store.pull_working(slot, distinct, sightings, now=now)
    values, state = w.values.copy(), w.state.copy()
    updates = np.zeros(len(values), np.int64)
    arrival = np.full(len(values), np.inf)
    seen = np.zeros(len(distinct), np.int64)
    for ids, g, arr in zip(steps, grads, arrivals, strict=True):
        live_rows: dict[int, np.ndarray] = {}
        for i in dict.fromkeys(ids):
            if seen[place[i]] >= w.ready[place[i]]:
                live_rows.setdefault(int(w.index[place[i]]), np.zeros(values.shape[1], np.float32))
            seen[place[i]] += 1
        for j, i in enumerate(ids):  # repeated ids (and ids sharing a row) sum their gradients
            r = int(w.index[place[i]])
            if r in live_rows:
                live_rows[r] += g[j]
                arrival[r] = np.fmin(arrival[r], arr[j])
        if live_rows:
            rows = np.array(sorted(live_rows))
            v, s = values[rows], state[rows]
            updates[rows] += 1
            w.optimizer.apply(v, s, np.stack([live_rows[r] for r in rows.tolist()]), updates[rows].astype(np.uint64))
            values[rows], state[rows] = v, s
    arrival[np.isinf(arrival)] = np.nan
    store.write_working(w, values, state, updates, arrival=arrival, now=now)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.integers(0, 14), min_size=0, max_size=6), min_size=1, max_size=12),
       st.integers(1, 3), st.sampled_from([1.0, 0.6]), st.booleans(), st.integers(0, 2**31))
def test_working_rows_equal_the_same_steps_pulled_and_pushed_one_by_one(steps, min_count, admit_p, hashed, seed):
    """Admissions (an id admitted at its n-th step reads zeros and takes no update before), values,
    optimizer state, versions, counts, pending sightings and the sync's touched rows with their
    earliest arrivals all come out as if each step had been pulled and pushed."""
    rng = np.random.default_rng(seed)
    cfg = SlotConfig(dim=3, min_count=min_count, admit_p=admit_p, optimizer=Adagrad(lr=0.3),
                     hash_bits=2 if hashed else None)
    # A trainer pulls each step's distinct ids (a step's occurrences of an id add up to one gradient).
    steps = [list(dict.fromkeys(f"t{i}" for i in s)) for s in steps]
    grads = [rng.normal(size=(len(s), 3)).astype(np.float32) for s in steps]
    arrivals = [np.where(rng.random(len(s)) < 0.3, np.nan, rng.uniform(0, 100, len(s))) for s in steps]
    prefix = [[f"t{i}" for i in range(0, 15, 3)]]  # some ids seen (or admitted) before the run
    a, b = (ParameterStore({"tag": cfg}) for _ in range(2))
    for s in (a, b):
        _steps_one_by_one(s, "tag", prefix, [np.ones((5, 3), np.float32)], [np.full(5, 1.0)], now=50.0)
        s.take_touched()
    _steps_one_by_one(a, "tag", steps, grads, arrivals, now=100.0)
    _steps_working(b, "tag", [list(x) for x in steps], grads, arrivals, now=100.0)
    ta, tb = a.tables["tag"], b.tables["tag"]
    every = [f"t{i}" for i in range(15)]
    sa, sb = ta.row_state(every), tb.row_state(every)
    np.testing.assert_allclose(sb["values"], sa["values"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sb["state"], sa["state"], rtol=1e-6, atol=1e-7)
    assert np.array_equal(sb["version"], sa["version"]) and np.array_equal(sb["last"], sa["last"])
    assert tb.counts == ta.counts
    assert getattr(tb, "pending", 0) == getattr(ta, "pending", 0) and len(tb) == len(ta)
    ta_, tb_ = a.take_touched(200.0), b.take_touched(200.0)
    assert len(tb_) == len(ta_)
    for ka, kb in zip(ta_, tb_, strict=True):
        got_a = dict(zip(ka.ids, zip(ka.versions.tolist(), ka.earliest_arrival.tolist(), strict=True), strict=True))
        got_b = dict(zip(kb.ids, zip(kb.versions.tolist(), kb.earliest_arrival.tolist(), strict=True), strict=True))
        assert got_b.keys() == got_a.keys()
        for k, (version, arrival) in got_a.items():
            assert got_b[k][0] == version
            assert got_b[k][1] == arrival or (math.isnan(arrival) and math.isnan(got_b[k][1]))


def test_working_rows_evicted_meanwhile_are_not_written_back():
    s = ParameterStore({"tag": SlotConfig(dim=2, min_count=1, expire_s=10.0)})
    s.pull("tag", ["old"], now=100.0)
    w = s.pull_working("tag", ["old", "new"], np.array([1, 1]), now=120.0)
    assert w.ready.tolist() == [0, 0]
    s.expire(now=115.0)  # "old" was last updated at 100: evicted; its row number is free again
    s.pull("tag", ["other"], now=121.0)  # and may be reused
    other = s.pull("tag", ["other"], now=121.0).copy()
    s.write_working(w, np.full((2, 2), 7.0, np.float32), w.state + 1, np.array([1, 1]), now=122.0)
    assert not s.pull("tag", ["old"], now=123.0, admit=False).any()
    assert np.array_equal(s.pull("tag", ["other"], now=123.0, admit=False), other)
    assert s.pull("tag", ["new"], now=123.0, admit=False).tolist() == [[7.0, 7.0]]
    assert [b.ids for b in s.take_touched()] == [["new"]]


def test_working_rows_of_a_refused_slot_are_zeros_and_counted():
    s = ParameterStore(default=SlotConfig(dim=3, min_count=1), max_slots=1)
    s.pull("a", ["1"], now=1.0)
    w = s.pull_working("b", ["1", "2"], np.array([2, 1]), now=1.0)
    assert not w.values.any() and w.ready.tolist() == [2, 1]
    s.write_working(w, w.values + 1, w.state, np.array([1, 1]), now=1.0)
    st_ = s.stats()
    assert st_["refused_pulls"] == 3 and st_["refused_pushes"] == 3 and set(st_["tables"]) == {"a"}


def test_pull_working_takes_distinct_ids_and_a_count_for_each():
    s = ParameterStore({"tag": SlotConfig(dim=2)})
    with pytest.raises(ValueError, match="distinct"):
        s.pull_working("tag", ["a", "a"], np.array([1, 1]), now=1.0)
    with pytest.raises(ValueError, match="sightings"):
        s.pull_working("tag", ["a", "b"], np.array([1]), now=1.0)
    with pytest.raises(ValueError, match="sightings"):
        s.pull_working("tag", ["a"], np.array([0]), now=1.0)
