"""The model server's core: the graph's forward pass in numpy, an in-memory item index kept fresh
from the serving store's change log, and the recommender that retrieves over the whole catalog
and re-ranks the candidates with the ranking head.

No TensorFlow here: a TF call costs milliseconds, the whole numpy request well under one. The
numbers are model/graph.py's `TwoTowerRanker._forward`, from the dense weights as the trainer
stores them (`OnlineTrainer.dense_state()`: `model.weights()` names plus the `norm_*` statistics).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from flows.events import POSITIVE_ACTIONS
from model.features import FeatureSpec
from model.recommend_types import Health, Recommendation, Served
from paramserver.records import LONG_ID_MARK, MAX_KEY_BYTES, RecordError, decode_item, long_id
from paramserver.serving import RowCache, ServingStore

__all__ = ["CATALOG_HALF_LIFE_S", "IndexSnapshot", "ItemIndex", "NumpyRanker", "StoreRecommender", "cold_start_scores",
           "limit_blas_threads"]

log = logging.getLogger(__name__)

ITEM_PREFIX = b"item/"
DENSE_PREFIX = b"dense/"
CATALOG_HALF_LIFE_S = 86_400.0  # the cold-start score halves per day an item is older than the newest
_LAYERS = ("user1", "user2", "item1", "item2", "cross", "head1", "head2")


# ------------------------------------------------------------------------------ the forward pass


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warning for large |x|


def segment_mean(values: np.ndarray, example: np.ndarray, n: int) -> np.ndarray:
    """Mean of the rows of `values` per example (`tf.math.unsorted_segment_mean`): zeros for an
    example with none."""
    out = np.zeros((n, values.shape[1]), np.float32)
    if not len(example):
        return out
    np.add.at(out, example, values)
    counts = np.bincount(example, minlength=n)
    return out / np.maximum(counts, 1)[:, None].astype(np.float32)


def _sorted_segment_mean(values: np.ndarray, example: np.ndarray, n: int) -> np.ndarray:
    """`segment_mean` for `example` sorted ascending (occurrences grouped by item): reduceat."""
    out = np.zeros((n, values.shape[1]), np.float32)
    if not len(example):
        return out
    starts = np.flatnonzero(np.r_[True, example[1:] != example[:-1]])
    owners = example[starts]
    counts = np.diff(np.r_[starts, len(example)])
    out[owners] = np.add.reduceat(values, starts, axis=0) / counts[:, None].astype(np.float32)
    return out


class NumpyRanker:
    """TwoTowerRanker's forward pass on numpy arrays, from its dense weights.

    `arrays` is what `OnlineTrainer.dense_state()` returns (and the serving store's DenseBlob
    holds): `user1_w` ... `head2_b`, `global_bias`, and the dense features' running statistics
    `norm_count`, `norm_mean`, `norm_m2`. Raises ValueError when they do not fit `spec`.
    """

    def __init__(self, spec: FeatureSpec, arrays: Mapping[str, np.ndarray]):
        self.spec = spec
        missing = [f"{n}_{p}" for n in _LAYERS for p in "wb" if f"{n}_{p}" not in arrays]
        if "global_bias" not in arrays:
            missing.append("global_bias")
        if missing:
            raise ValueError(f"the dense weights lack {missing}: they are not TwoTowerRanker's")
        w = {k: np.asarray(arrays[f"{k}"], np.float32) for n in _LAYERS for k in (f"{n}_w", f"{n}_b")}
        d, f = spec.dim, len(spec.dense)
        n_user, n_item = len(spec.user_side), len(spec.item_side)
        self.user_in, self.item_in = n_user * d, n_item * d + f
        if w["user1_w"].shape[0] != self.user_in or w["item1_w"].shape[0] != self.item_in:
            raise ValueError(
                f"the dense weights take {w['user1_w'].shape[0]} user and {w['item1_w'].shape[0]} item inputs; "
                f"the feature spec {spec.as_dict()} makes {self.user_in} and {self.item_in}: the serving "
                "store was trained with other slots, dense features or embedding dim")
        self.w = w
        self.tower_dim = w["user2_w"].shape[1]
        self.global_bias = float(np.asarray(arrays["global_bias"]).reshape(()))
        # The head's cross layer on x0 = [u_in, i_in, u, v, u*v]: split by block so the user's
        # part is computed once per request, not once per candidate.
        self._x0_user = self.user_in
        self.norm_count = float(np.asarray(arrays.get("norm_count", [0.0])).reshape(-1)[0])
        self.norm_mean = np.asarray(arrays.get("norm_mean", np.zeros(f)), np.float64)
        self.norm_m2 = np.asarray(arrays.get("norm_m2", np.zeros(f)), np.float64)

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """DenseNormalizer.apply with the stored statistics."""
        if not raw.shape[1]:
            return raw.astype(np.float32)
        if self.norm_count < 2:
            return np.zeros(raw.shape, np.float32)
        std = np.sqrt(self.norm_m2 / max(self.norm_count - 1.0, 1.0))
        return ((raw - self.norm_mean) / np.where(std > 1e-6, std, 1.0)).astype(np.float32)

    def user_tower(self, u_in: np.ndarray) -> np.ndarray:
        w = self.w
        return np.maximum(u_in @ w["user1_w"] + w["user1_b"], 0) @ w["user2_w"] + w["user2_b"]

    def item_tower(self, i_in: np.ndarray) -> np.ndarray:
        w = self.w
        return np.maximum(i_in @ w["item1_w"] + w["item1_b"], 0) @ w["item2_w"] + w["item2_b"]

    def head(self, u_in: np.ndarray, i_in: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """The cross-network head's logit (without the dot product); u_in and u may be one row
        (broadcast over the candidates)."""
        n = len(i_in)
        w = self.w
        x0 = np.concatenate([np.broadcast_to(u_in, (n, u_in.shape[1])), i_in,
                             np.broadcast_to(u, (n, u.shape[1])), v, u * v], axis=1)
        if len(u_in) == 1 and len(u) == 1:
            # One user: x0 @ cross_w by blocks of x0 = [u_in, i_in, u, v, u*v], the user's blocks
            # computed once, and (u*v) @ W_uv = v @ (u^T * W_uv) folded into v's block, so the
            # product runs over the item's columns only (half the multiply-adds of the full one).
            a, b, t = u_in.shape[1], i_in.shape[1], u.shape[1]
            cw = w["cross_w"]
            const = u_in[0] @ cw[:a] + u[0] @ cw[a + b:a + b + t] + w["cross_b"]
            item_w = np.concatenate([cw[a:a + b], cw[a + b + t:a + b + 2 * t] + u[0][:, None] * cw[a + b + 2 * t:]])
            xw = np.concatenate([i_in, v], axis=1) @ item_w
            xw += const
            xw += 1.0
            x1 = x0 * xw  # x0 * (x0 @ cross_w + cross_b) + x0
        else:
            x1 = x0 * (x0 @ w["cross_w"] + w["cross_b"]) + x0
        h = np.maximum(x1 @ w["head1_w"] + w["head1_b"], 0)
        return (h @ w["head2_w"] + w["head2_b"])[:, 0] + self.fm(u_in, i_in)

    def fm(self, u_in: np.ndarray, i_in: np.ndarray) -> np.ndarray:
        """The graph's factorization-machine term, the sum of <e_i, e_j> over every pair of
        fields' pooled rows, split as <U, I> + the user's own pairs + each item's own pairs (U, I:
        the sums of the user-side and item-side rows), so a request computes the user's part once."""
        d = self.spec.dim
        users = u_in.reshape(len(u_in), -1, d)
        items = i_in[:, :len(self.spec.item_side) * d].reshape(len(i_in), -1, d)
        big_u, big_i = users.sum(axis=1), items.sum(axis=1)
        own_u = 0.5 * ((big_u * big_u).sum(axis=1) - (users * users).sum(axis=(1, 2)))
        own_i = 0.5 * ((big_i * big_i).sum(axis=1) - (items * items).sum(axis=(1, 2)))
        return big_i @ big_u[0] + own_u[0] + own_i if len(u_in) == 1 else (big_u * big_i).sum(axis=1) + own_u + own_i

    def forward(self, rows: Mapping[str, np.ndarray], index: Mapping[str, np.ndarray],
                example: Mapping[str, np.ndarray], dense: np.ndarray, n: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(rank, dot, u, v) of a batch as `TwoTowerRanker._forward` takes it (`dense` already
        normalised)."""
        spec = self.spec
        pooled = {s: segment_mean(np.asarray(rows[s], np.float32)[index[s]], example[s], n)
                  for s in spec.embedding_slots}
        bias = (np.asarray(rows["user_id.bias"], np.float32)[index["user_id.bias"], 0]
                + np.asarray(rows["item_id.bias"], np.float32)[index["item_id.bias"], 0] + self.global_bias)
        u_in = np.concatenate([pooled[s] for s in spec.user_side], axis=1)
        i_in = np.concatenate([pooled[s] for s in spec.item_side] + [np.asarray(dense, np.float32)], axis=1)
        u, v = self.user_tower(u_in), self.item_tower(i_in)
        dot = (u * v).sum(axis=1) + bias
        return self.head(u_in, i_in, u, v) + dot, dot, u, v


# ------------------------------------------------------------------------------ the item index


def cold_start_scores(positives: np.ndarray, impressions: np.ndarray, ts: np.ndarray,
                      half_life_s: float = CATALOG_HALF_LIFE_S) -> np.ndarray:
    """Popular and fresh: (positives + 1) / (impressions + 10), a positive rate pulled towards
    1/10 while an item has few impressions (so new items get shown), halved for every
    `half_life_s` the item is older than the newest in the catalog (age from the catalog's newest
    item rather than the wall clock, so a replay of old data ranks the same way)."""
    if not len(ts):
        return np.zeros(0)
    age = np.maximum(ts.max() - ts, 0.0)
    return (positives + 1.0) / (impressions + 10.0) * np.exp2(-age / half_life_s)


def _values(x: Any) -> list[str]:
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    if isinstance(x, list):
        return [str(v) for v in x]
    return [str(x)]


def _number(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return 0.0
    return float(x)


@dataclass(frozen=True)
class _Entry:
    """A catalog entry as the index keeps it."""

    item_id: str
    sparse: dict
    dense: dict
    ts: float
    positives: float
    impressions: float
    values: dict  # item-side slot -> its values (item_id's is the item id)


def _parse_entry(item_id: str, raw: bytes, spec: FeatureSpec) -> Optional[_Entry]:
    try:
        e = decode_item(raw)
    except (RecordError, ValueError) as exc:
        log.warning("catalog entry item/%s is not a JSON object (%s); left out of the index", item_id, exc)
        return None
    if item_id.startswith(LONG_ID_MARK):  # a key too long for LMDB holds a digest: the id is in the value
        real = e.get("item_id")
        if not isinstance(real, str) or long_id(real) != item_id:
            log.warning("catalog entry item/%s does not name the id of its key; left out of the index", item_id)
            return None
        item_id = real
    sparse = e.get("sparse") if isinstance(e.get("sparse"), dict) else {}
    dense = e.get("dense") if isinstance(e.get("dense"), dict) else {}
    values = {"item_id": [item_id], **{s: _values(sparse.get(s)) for s in spec.item_slots}}
    return _Entry(item_id, sparse, dense, _number(e.get("ts")), _number(e.get("positives")),
                  _number(e.get("impressions")), values)


@dataclass(frozen=True)
class IndexSnapshot:
    """One consistent state of the index: readers take the whole object, never parts of two.

    Positions are stable while an item stays; a removed item's position is free (id None, not
    live, bias and cold score -inf) until a new item takes it.
    """

    params_version: int
    dense_version: int
    model: Optional[NumpyRanker]
    ids: list  # position -> item id, None where free
    pos: dict  # item id -> position
    entries: list  # position -> _Entry, None where free
    live: np.ndarray  # bool (cap,)
    emb: np.ndarray  # float32 (cap, n_item_side * dim): the pooled item-side rows
    raw_dense: np.ndarray  # float32 (cap, len(spec.dense)), as the catalog says
    vectors: np.ndarray  # float32 (cap, tower dim): V; (cap, 0) without a model
    bias: np.ndarray  # float32 (cap,): item_id.bias, -inf where free
    counts: np.ndarray  # float64 (cap, 3): ts, positives, impressions of the catalog entry
    cold: np.ndarray  # float64 (cap,): cold_start_scores, -inf where free

    @property
    def size(self) -> int:
        return len(self.pos)


class ItemIndex:
    """The catalog in memory: item ids, their item-tower vectors V and item biases, kept up to the
    serving store by `refresh()`, which recomputes only the items whose `item/` entry or any
    item-side row changed (all of them when the dense weights move) and then swaps in a new
    `IndexSnapshot` (copies, never arrays a reader may hold), so readers never see a half-updated
    index. Refreshes run one at a time.

    The item-side rows (and item biases) it pools are held in a `RowCache` kept up by the same
    reads of the change log: a refresh reads from LMDB only the rows that changed, and an item
    recomputed because one of its author's or tags' rows moved reads its other rows from memory.
    """

    def __init__(self, store: ServingStore, spec: FeatureSpec):
        self.store = store
        self.spec = spec
        self.full_rebuilds = 0
        self._lock = threading.Lock()
        # (slot, value) -> the items holding it: whom a changed author or tag row touches.
        self._holders: dict[str, dict[str, set[str]]] = {s: {} for s in spec.item_slots}
        self._free: list[int] = []  # free positions, reused by new items
        # The digest that stands for an id in a key too long for LMDB -> the id (item ids, slot values).
        self._long_ids: dict[str, str] = {}
        self._broken = False
        self.rows = RowCache(store, {**dict.fromkeys(spec.item_side, spec.dim), "item_id.bias": 1})
        self.snapshot = self._build(-1, 0, None, [])
        self.refresh()

    # -- refreshing ----------------------------------------------------------------------------

    def refresh(self) -> int:
        """Brings the index up to the store; returns the items recomputed."""
        with self._lock:
            snap = self.snapshot
            got = None
            if snap.params_version >= 0 and not self._broken:
                got = self.store.changes_since(snap.params_version)
            if got is None:
                self._broken = True  # until a rebuild succeeds
                n = self._rebuild()
                self._broken = False
                return n
            version, keys = got
            if version == snap.params_version:
                return 0
            try:
                self.rows.apply(snap.params_version, version, keys)
                return self._update(snap, version, keys)
            except BaseException:
                self._broken = True  # the holders may be half-updated: the next refresh rebuilds
                raise

    def _read_model(self) -> tuple[Optional[NumpyRanker], int]:
        blob = self.store.read_dense()
        if blob is None:
            return None, 0
        return NumpyRanker(self.spec, blob.arrays), blob.version

    def _rebuild(self) -> int:
        version = self.store.params_version()  # first: whatever changes after it, the next refresh re-reads
        if self.rows.version < version:
            self.rows.reload()  # at least as new as `version`: the next refresh's changes cover the rest
        entries: list[_Entry] = []
        for k, v in self.store.scan(ITEM_PREFIX):
            e = _parse_entry(k[len(ITEM_PREFIX):].decode(), v, self.spec)
            if e is not None:
                entries.append(e)
        model, dense_version = self._read_model()
        self._holders = {s: {} for s in self.spec.item_slots}
        self._free = []
        for e in entries:
            self._hold(e)
        self.snapshot = self._build(version, dense_version, model, entries)
        self.full_rebuilds += 1
        return len(entries)

    def _build(self, version: int, dense_version: int, model: Optional[NumpyRanker],
               entries: list[_Entry]) -> IndexSnapshot:
        n = len(entries)
        ids = [e.item_id for e in entries]
        emb, bias = self._pool(entries)
        raw_dense = self._raw_dense(entries)
        counts = self._counts(entries)
        live = np.ones(n, bool)
        return IndexSnapshot(version, dense_version, model, ids, dict(zip(ids, range(n), strict=True)), list(entries),
                             live, emb, raw_dense, self._vectors(model, emb, raw_dense), bias, counts,
                             _cold(live, counts))

    def _update(self, snap: IndexSnapshot, version: int, keys: list[bytes]) -> int:
        spec = self.spec
        changed_items: set[str] = set()
        # Items to recompute, by the item-side slot (or the bias) whose rows changed: only that
        # block of their pooled rows is read again (a sync that moves item_id rows reads no
        # author or tag rows).
        by_slot: dict[str, set[str]] = {s: set() for s in (*spec.item_side, "item_id.bias")}
        dense_moved = False
        for k in keys:
            if k.startswith(ITEM_PREFIX):
                changed_items.add(k[len(ITEM_PREFIX):].decode())
            elif k.startswith(DENSE_PREFIX):
                dense_moved = True
            else:
                slot, sep, id_ = k.decode().partition("/")
                if not sep or slot not in by_slot:
                    continue
                if id_.startswith(LONG_ID_MARK):
                    id_ = self._long_ids.get(id_, id_)
                if slot in ("item_id", "item_id.bias"):
                    by_slot[slot].add(id_)
                else:
                    by_slot[slot].update(self._holders[slot].get(id_, ()))
        model, dense_version = snap.model, snap.dense_version
        if dense_moved:
            model, dense_version = self._read_model()
            dense_moved = dense_version != snap.dense_version
        for slot, items in by_slot.items():
            by_slot[slot] = {i for i in items if i in snap.pos and i not in changed_items}
        touched = set().union(*by_slot.values())  # items to recompute (changed ones are added below)
        if not changed_items and not touched and not dense_moved:
            self.snapshot = dataclasses.replace(snap, params_version=version)
            return 0

        ids, pos, entries, live = snap.ids, snap.pos, snap.entries, snap.live
        removed: list[int] = []
        changed_ids: set[str] = set()  # the ids of changed_items (a key may hold a digest)
        if changed_items:
            ids, pos, entries = list(ids), dict(pos), list(entries)
            order = sorted(changed_items)
            for key_id, raw in zip(order, self.store.get([ITEM_PREFIX + i.encode() for i in order]), strict=True):
                e = _parse_entry(key_id, raw, spec) if raw is not None else None
                item_id = e.item_id if e is not None else self._long_ids.get(key_id, key_id)
                changed_ids.add(item_id)
                at = pos.get(item_id)
                if at is not None:
                    self._unhold(entries[at])
                if e is None:  # tombstoned (or unreadable): the item leaves
                    touched.discard(item_id)
                    if at is not None:
                        del pos[item_id]
                        ids[at] = entries[at] = None
                        self._free.append(at)
                        removed.append(at)
                    continue
                self._hold(e)
                if at is None:
                    at = self._free.pop() if self._free else len(ids)
                    if at == len(ids):
                        ids.append(None)
                        entries.append(None)
                    pos[item_id] = at
                ids[at], entries[at] = item_id, e
                touched.add(item_id)
        if any(i.startswith(LONG_ID_MARK) for i in touched):
            # Digests of ids too long for a key, met before the entry that names them: the ids now.
            touched = {self._long_ids.get(i, i) for i in touched}
            touched = {i for i in touched if i in pos}
        cap = len(ids)
        # Copies of what changes, never writes into arrays a reader may hold; with only rows
        # changed, the catalog's own arrays (live, dense features, counts, cold scores) are shared.
        emb, bias = _grown(snap.emb, cap), _grown(snap.bias, cap, -np.inf)
        live, raw_dense, counts, cold = snap.live, snap.raw_dense, snap.counts, snap.cold
        if changed_items:
            live, raw_dense, counts = _grown(live, cap, False), _grown(raw_dense, cap), _grown(counts, cap)
            live[removed] = False
            bias[removed] = -np.inf
        where = np.fromiter((pos[i] for i in sorted(touched)), np.int64, len(touched))
        fresh = sorted(touched & changed_ids)  # new or changed entries: every slot again
        if fresh:
            at = np.fromiter((pos[i] for i in fresh), np.int64, len(fresh))
            emb[at], bias[at] = self._pool([entries[p] for p in at])
        d = spec.dim
        for j, slot in enumerate((*spec.item_side, "item_id.bias")):
            items = sorted(by_slot[slot] - changed_ids)
            if not items:
                continue
            at = np.fromiter((pos[i] for i in items), np.int64, len(items))
            got = [entries[p] for p in at]
            if slot == "item_id.bias":
                bias[at] = self._bias(got)
            else:
                emb[at, j * d:(j + 1) * d] = self._pool_slot(slot, got)
        if changed_items:
            at = np.fromiter((pos[i] for i in sorted(changed_ids & pos.keys())), np.int64)
            got = [entries[p] for p in at]
            live[at] = True
            raw_dense[at] = self._raw_dense(got)
            counts[at] = self._counts(got)
            cold = _cold(live, counts)
        if model is None:
            vectors = np.zeros((cap, 0), np.float32)
        elif dense_moved or snap.model is None:
            vectors = self._vectors(model, emb, raw_dense)  # new weights: every item moves
            where = np.flatnonzero(live)
        else:
            vectors = _grown(snap.vectors, cap)
            if len(where):
                vectors[where] = self._vectors(model, emb[where], raw_dense[where])
        self.snapshot = IndexSnapshot(version, dense_version, model, ids, pos, entries, live, emb, raw_dense,
                                      vectors, bias, counts, cold)
        return len(where)

    # -- the numbers -----------------------------------------------------------------------------

    def _hold(self, e: _Entry) -> None:
        for s in self.spec.item_slots:
            for v in e.values[s]:
                self._holders[s].setdefault(v, set()).add(e.item_id)
                if len(v.encode()) > MAX_KEY_BYTES - len(s) - 1:
                    self._long_ids[long_id(v)] = v
        if len(e.item_id.encode()) > MAX_KEY_BYTES - len("item_id.bias/"):
            self._long_ids[long_id(e.item_id)] = e.item_id

    def _unhold(self, e: _Entry) -> None:
        for s in self.spec.item_slots:
            for v in e.values[s]:
                holders = self._holders[s].get(v)
                if holders is not None:
                    holders.discard(e.item_id)
                    if not holders:
                        del self._holders[s][v]

    def _pool(self, entries: Sequence[_Entry]) -> tuple[np.ndarray, np.ndarray]:
        """(pooled item-side rows (n, n_side * dim), item biases (n,)) read from the store: a
        missing row is zeros and still counts in its slot's mean, as in training."""
        emb = np.concatenate([self._pool_slot(s, entries) for s in self.spec.item_side], axis=1)
        return emb, self._bias(entries)

    def _pool_slot(self, slot: str, entries: Sequence[_Entry]) -> np.ndarray:
        """One item-side slot's block of `_pool`: (n, dim)."""
        n = len(entries)
        if slot == "item_id":  # one value per item, its own id: no pooling to do
            return self.rows.read_rows(slot, [e.item_id for e in entries]).values
        per = [e.values[slot] for e in entries]
        lengths = np.fromiter(map(len, per), np.int64, n)
        example = np.repeat(np.arange(n), lengths)
        uniq: dict[str, int] = {}
        index = np.fromiter((uniq.setdefault(v, len(uniq)) for vs in per for v in vs), np.int64, len(example))
        rows = self.rows.read_rows(slot, list(uniq)).values
        return _sorted_segment_mean(rows[index], example, n)

    def _bias(self, entries: Sequence[_Entry]) -> np.ndarray:
        return self.rows.read_rows("item_id.bias", [e.item_id for e in entries]).values[:, 0]

    def _raw_dense(self, entries: Sequence[_Entry]) -> np.ndarray:
        out = np.zeros((len(entries), len(self.spec.dense)), np.float32)
        for j, name in enumerate(self.spec.dense):
            out[:, j] = [_number(e.dense.get(name, 0.0)) for e in entries]
        return out

    @staticmethod
    def _counts(entries: Sequence[_Entry]) -> np.ndarray:
        return np.array([(e.ts, e.positives, e.impressions) for e in entries], np.float64).reshape(-1, 3)

    @staticmethod
    def _vectors(model: Optional[NumpyRanker], emb: np.ndarray, raw_dense: np.ndarray) -> np.ndarray:
        if model is None:
            return np.zeros((len(emb), 0), np.float32)
        v = model.item_tower(np.concatenate([emb, model.normalize(raw_dense)], axis=1))
        return np.ascontiguousarray(v, np.float32)


def _cold(live: np.ndarray, counts: np.ndarray) -> np.ndarray:
    cold = np.full(len(live), -np.inf)
    c = counts[live]
    cold[live] = cold_start_scores(c[:, 1], c[:, 2], c[:, 0])
    return cold


def _grown(a: np.ndarray, cap: int, fill: Any = 0.0) -> np.ndarray:
    """A copy of `a` with `cap` rows (new rows `fill`): the snapshot readers hold stays as it is."""
    if cap == len(a):
        return a.copy()  # the common case (only rows changed): no fill pass over the whole array
    out = np.empty((cap, *a.shape[1:]), a.dtype)
    n = min(cap, len(a))
    out[:n] = a[:n]
    out[n:] = fill
    return out


# ------------------------------------------------------------------------------ the recommender


class StoreRecommender:
    """model/recommend_types.Recommender over a serving store.

    `recommend`: the user's vector from their rows (read from the store at each request, so the
    user's own latest update counts at once), `V @ u + item bias` over the whole catalog, the top
    `max(k, candidates)` re-ranked by the ranking head, the best `k` with sigmoid(rank) as score.
    Items in the user's recent actions (`user/<id>`) are left out unless too few others remain.
    An unknown user (no `user_id` row), or a store without dense weights yet, gets the cold-start
    list (`cold_start_scores`). Thread-safe: requests read one snapshot of the index while
    `refresh()` (or the thread of `start()`) builds the next.

    User slots (`spec.user_slots`) get no values at serving time (a request carries only the user
    id), so they pool to zeros, as in training on a feature event without them. The `sparse` and
    `dense` dicts of each Served are the index's own (no copy per request): read them only.

    `blas_threads` (default 1) limits the BLAS library's threads for the whole process (None:
    leave them): a request's products are small, and on a busy machine BLAS threads that wait for
    a core made V @ u over 100,000 items about six times slower than one thread.
    """

    def __init__(self, store: ServingStore, spec: FeatureSpec, *, candidates: int = 300,
                 blas_threads: Optional[int] = 1, clock: Callable[[], float] = time.time):
        if candidates < 1:
            raise ValueError("candidates must be at least 1")
        if blas_threads is not None:
            limit_blas_threads(blas_threads)
        self.store = store
        self.spec = spec
        self.candidates = candidates
        self.clock = clock
        self.index = ItemIndex(store, spec)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.refresh_errors = 0

    # -- Recommender -------------------------------------------------------------------------------

    def refresh(self) -> int:
        return self.index.refresh()

    def health(self) -> Health:
        snap = self.index.snapshot
        st = self.store.stats()
        return Health(params_version=max(snap.params_version, 0), dense_version=snap.dense_version,
                      items=snap.size, freshness_ms=st.freshness_ms, staleness_ms=st.staleness_ms)

    def model_version(self, snap: Optional[IndexSnapshot] = None) -> str:
        snap = snap or self.index.snapshot
        return f"{snap.dense_version}.{max(snap.params_version, 0)}"

    def recommend(self, user_id: str, k: int) -> Recommendation:
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        snap = self.index.snapshot
        version = self.model_version(snap)
        if not snap.size:
            return Recommendation([], version, cold_start=True)
        acted = self.store.read_users([user_id])[0] or []
        exclude = np.fromiter({snap.pos[a[0]] for a in acted if a[0] in snap.pos}, np.int64)
        model = snap.model
        history = history_features(self.spec, acted, snap)
        user = self._user(user_id, model, history) if model is not None else None
        if user is None:
            order = _top(snap.cold, k, exclude)
            scores = np.minimum(snap.cold[order], 1.0)
            return Recommendation(self._served(snap, order, scores), version, cold_start=True)
        u_in, u, user_bias = user
        retrieval = snap.vectors @ u[0]
        retrieval += snap.bias
        candidates = _top(retrieval, max(k, self.candidates), exclude, ordered=False, owned=True)
        rank = self._rank(model, snap, u_in, u, user_bias, candidates)
        best = np.argsort(-rank, kind="stable")
        if len(exclude):
            # _top scored the excluded items -inf in `retrieval` (given it as its own), so a
            # candidate at -inf there is one it brought back because the catalog ran out: those
            # follow the rest, in their own order.
            is_ex = np.isneginf(retrieval[candidates[best]])
            if is_ex.any():
                best = np.concatenate([best[~is_ex], best[is_ex]])
        best = best[:k]
        return Recommendation(self._served(snap, candidates[best], _sigmoid(rank[best])), version,
                              user_sparse=history)

    # -- the parts ---------------------------------------------------------------------------------

    def _user(self, user_id: str, model: NumpyRanker, history: Optional[Mapping[str, list[str]]] = None
              ) -> Optional[tuple[np.ndarray, np.ndarray, float]]:
        """The user's tower input, vector and bias; None for a user the model knows nothing of (no
        `user_id` row and no recent positive actions): they get the cold-start list."""
        spec = self.spec
        history = history or {}
        ids = self.store.read_rows("user_id", [user_id], spec.dim)
        if not ids.found[0] and not any(history.values()):
            return None
        parts = [ids.values]
        for slot in spec.user_slots:
            values = history.get(slot) or []
            # Mean-pooled like make_batch pools a feature event's values; ids with no row are zeros.
            rows = self.store.read_rows(slot, values, spec.dim).values if values else None
            parts.append(rows.mean(axis=0, keepdims=True) if rows is not None else np.zeros((1, spec.dim), np.float32))
        u_in = np.concatenate(parts, axis=1).astype(np.float32, copy=False)
        bias = float(self.store.read_rows("user_id.bias", [user_id], 1).values[0, 0])
        return u_in, model.user_tower(u_in), bias

    @staticmethod
    def _rank(model: NumpyRanker, snap: IndexSnapshot, u_in: np.ndarray, u: np.ndarray, user_bias: float,
              at: np.ndarray) -> np.ndarray:
        v = snap.vectors[at]
        i_in = np.concatenate([snap.emb[at], model.normalize(snap.raw_dense[at])], axis=1)
        dot = v @ u[0] + snap.bias[at] + (user_bias + model.global_bias)
        return model.head(u_in, i_in, u, v) + dot

    @staticmethod
    def _served(snap: IndexSnapshot, at: np.ndarray, scores: np.ndarray) -> list[Served]:
        entries = snap.entries
        # the index's own dicts: read them only
        return [Served(e.item_id, s, e.sparse, e.dense)
                for e, s in zip(map(entries.__getitem__, at.tolist()), scores.tolist(), strict=True)]

    # -- background refresh ------------------------------------------------------------------------

    def start(self, interval_s: float = 0.2) -> None:
        """Refreshes from a daemon thread every `interval_s` until `stop()`."""
        if self._thread is not None:
            raise RuntimeError("the refresh thread is running already")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), name="freshrec-index-refresh",
                                        daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.refresh()
            except Exception:  # logged and counted; requests go on with the last good snapshot
                self.refresh_errors += 1
                log.exception("item index refresh failed; serving the previous snapshot")

    def stop(self, timeout: float = 10.0) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout)


HISTORY_PREFIX = "recent_"
MAX_HISTORY = 20


def history_features(spec: FeatureSpec, acted: Sequence[Sequence[Any]], snap: IndexSnapshot) -> dict[str, list[str]]:
    """The user-side features a request fills from the user's recent actions (`user/<id>`): a user
    slot named `recent_<item slot>` (for example `recent_author`) holds that item slot's values
    over the items of the user's recent positive actions, newest first, each value once, at most
    MAX_HISTORY. So a like counts in the user's very next request, before any training, once the
    model has learnt what a `recent_author` means; the server logs these values in the request's
    feature events, so training sees exactly what serving used."""
    wanted = [(s, s[len(HISTORY_PREFIX):]) for s in spec.user_slots if s.startswith(HISTORY_PREFIX)]
    if not wanted or not acted:
        return {}
    out: dict[str, list[str]] = {s: [] for s, _ in wanted}
    seen: dict[str, set] = {s: set() for s, _ in wanted}
    for item_id, action, _ts in reversed(acted):
        if action not in POSITIVE_ACTIONS:
            continue
        p = snap.pos.get(item_id)
        if p is None:
            continue
        sparse = snap.entries[p].sparse
        for slot, field in wanted:
            for v in _values(sparse.get(field)):
                if v not in seen[slot] and len(out[slot]) < MAX_HISTORY:
                    seen[slot].add(v)
                    out[slot].append(v)
    return {s: vs for s, vs in out.items() if vs}


def limit_blas_threads(n: int) -> None:
    """At most `n` BLAS threads in this process from now on (threadpoolctl)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(n, user_api="blas")


def _top(scores: np.ndarray, c: int, exclude: np.ndarray, ordered: bool = True, owned: bool = False
         ) -> np.ndarray:
    """Positions of the best `c` finite scores (best first when `ordered`); those in `exclude`
    only when the others run out, after them. `owned`: `scores` is the caller's own, and may be
    overwritten (no copy of the whole catalog's scores)."""
    kept = None
    if len(exclude):
        if not owned:
            scores = scores.copy()
        kept = scores[exclude]
        scores[exclude] = -np.inf
    c = min(c, len(scores))
    at = _largest(scores, c)
    at = at[np.isfinite(scores[at])]
    if ordered:
        at = at[np.argsort(-scores[at], kind="stable")]
    if len(at) < c and kept is not None:
        ok = np.isfinite(kept)
        back, back_scores = exclude[ok], kept[ok]
        if ordered:
            back = back[np.argsort(-back_scores, kind="stable")]
        at = np.concatenate([at, back[: c - len(at)]])
    return at


_SAMPLE = 4096


def _largest(scores: np.ndarray, c: int) -> np.ndarray:
    """Positions of the `c` largest scores, in no order: exactly argpartition's, but first a
    threshold from a strided sample keeps about 2c candidates, so the selection runs on those
    rather than on the whole catalog (a comparison pass costs a fraction of a selection)."""
    n = len(scores)
    if c <= 0:
        return np.zeros(0, np.int64)
    if c >= n:
        return np.arange(n)
    step = n // _SAMPLE
    # Worth it while about 2c candidates are a small part of the catalog (k=100 over 100,000 items
    # keeps 300 candidates: the full selection was a third of a request).
    if step >= 4 and 16 * c < n:
        sample = scores[::step]
        r = min(len(sample) - 1, 2 * c * len(sample) // n + 8)  # rank from the top, about 2c of n above
        threshold = np.partition(sample, len(sample) - 1 - r)[len(sample) - 1 - r]
        if np.isfinite(threshold):
            above = np.flatnonzero(scores >= threshold)
            if len(above) >= c:
                return above[np.argpartition(scores[above], len(above) - c)[len(above) - c:]]
    return np.argpartition(scores, n - c)[n - c:]


def build_recommender(config: Any, store: Optional[ServingStore] = None) -> StoreRecommender:
    """The recommender `freshrec serve` runs: over `store` (a replica's), or the flow's serving
    store under `config.state_dir`, opened read-only (created empty first if the flow has not
    written it yet, so the server can start before the flow), with the flow's feature spec."""
    from paramserver.serving import LmdbServingStore, StoreNotReady

    if store is None:
        path = Path(config.state_dir) / "serving"
        if not (path / "data.mdb").exists():
            LmdbServingStore(path, writer=True).close()
        try:
            store = LmdbServingStore(path)
        except StoreNotReady:  # the flow is creating it this moment: finish creating it (LMDB serialises writers)
            LmdbServingStore(path, writer=True).close()
            store = LmdbServingStore(path)
    spec = FeatureSpec(tuple(config.user_slots), tuple(config.item_slots), tuple(config.dense_features),
                       int(config.embedding_dim))
    return StoreRecommender(store, spec)
