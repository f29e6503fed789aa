"""Training-side embedding tables: one per feature slot, pulled and pushed a batch at a time.

`EmbeddingTable` is collisionless (every distinct id its own row, through paramserver.idmap),
admits an id only after `min_count` sightings (and, optionally, for a stable fraction `admit_p` of
ids), evicts rows not updated for `expire_s` and reuses their row numbers, and keeps each row's
optimizer state beside it. Two change trackers ride along: the rows touched since the last sync
(with the earliest arrival behind them) and the rows changed since the last checkpoint.
`HashedEmbeddingTable` is the baseline Monolith measured against: 2**k rows shared by colliding ids.
No per-id Python loop runs on the pull/push path.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Sequence
from itertools import compress, repeat
from operator import itemgetter
from typing import Literal, Optional

import msgspec
import numpy as np

from paramserver.idmap import IdIndex, encode, key_hash, mix64, uniform01, zeros
from paramserver.optimizers import Adagrad, Adam, Ftrl, Optimizer, Sgd
from paramserver.rows import RowBatch, WorkingRows

__all__ = ["Adagrad", "Adam", "EmbeddingTable", "Ftrl", "HashedEmbeddingTable", "SlotConfig", "Sgd", "make_table"]

Ids = Sequence[str]
_NAN = float("nan")
_ZERO = np.zeros(1, np.int64)
# Ids per table whose rows a dict remembers (see EmbeddingTable._rows): about 110 bytes each (entry,
# key, row int), so at most ~28 MB per table. A table whose working set outgrows it (200k users did
# past 1 << 17) falls back to the numpy map for every batch, about 1.4x the dict's cost there.
HOT_IDS = 1 << 18
HOT_PROBE = 16


class SlotConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How one feature slot's table behaves.

    `min_count`: sightings (ids pulled in training) before an id gets a row; until then it pulls
    zeros and its pushes are ignored. `admit_p`: the fraction of ids ever admitted, chosen by a
    stable hash of the id (so every process agrees). `expire_s`: a row not updated for this long is
    evicted (None: never); pending sighting counts expire alike. `init`: "uniform" (in
    [-init_scale, init_scale]), "normal" (stddev init_scale) or "zeros", a function of the id, so an
    id's first row is the same in every run. `hash_bits`: a hashed table of 2**hash_bits shared rows
    instead (the collision baseline; no admission, no expiry).
    """

    dim: int = 16
    optimizer: Optimizer = Adagrad()
    min_count: int = 1
    admit_p: float = 1.0
    expire_s: Optional[float] = 30 * 86400.0
    init: Literal["uniform", "normal", "zeros"] = "uniform"
    init_scale: float = 0.05
    hash_bits: Optional[int] = None

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be at least 1, not {self.dim}")
        if self.min_count < 1:
            raise ValueError(f"min_count must be at least 1, not {self.min_count}")
        if not 0.0 <= self.admit_p <= 1.0:
            raise ValueError(f"admit_p must be in [0, 1], not {self.admit_p}")
        if self.expire_s is not None and not self.expire_s > 0:
            raise ValueError(f"expire_s must be positive or None, not {self.expire_s}")
        if self.hash_bits is not None and not 1 <= self.hash_bits <= 31:
            raise ValueError(f"hash_bits must be in [1, 31], not {self.hash_bits}")


def stamp(now: float) -> int:
    """Update time as stored per row: whole seconds, rounded up; 0 is kept for "no row"."""
    return min(max(1, math.ceil(now)), 0xFFFFFFFF)


def slot_seed(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _pick(a: np.ndarray, rows: np.ndarray, full: bool) -> np.ndarray:
    """`a[rows]`; for a full export (rows 0..n-1) a view, not a copy: the checkpoint is written
    under the store's lock, and a full one of a big table would otherwise double its memory."""
    return a[: len(rows)] if full else a[rows]


def _void(a: np.ndarray) -> np.ndarray:
    """A (rows,) view of a 2-D array whose items are whole rows: numpy gathers and scatters those
    several times faster than rows of floats."""
    return a.view(np.dtype((np.void, a.shape[1] * a.itemsize))).reshape(a.shape[0])


class _RowTable:
    """Row storage shared by both table kinds: values, optimizer state, versions, update times, and
    the two change trackers. Row 0 is never handed out: it stays zero and stands for "no row"."""

    kind = "base"

    def __init__(self, name: str, config: SlotConfig, capacity: int) -> None:
        self.name = name
        self.config = config
        self.dim = config.dim
        self._opt = config.optimizer
        self._sw = self._opt.state_width * self.dim
        self._seed = slot_seed(name)
        self.counts: dict[str, int] = dict.fromkeys(
            ("pulls", "pushes", "updates", "admitted", "evicted", "unadmitted_pulls", "refused_by_p",
             "ignored_pushes", "pending_expired"), 0)
        self._cap = 0
        self._alloc(max(2, capacity))
        self._reset_trackers()
        self._ckpt_hw = 0
        self._generation = 0  # grows when rows are evicted: a `WorkingRows`' row numbers may be stale

    # --- storage ------------------------------------------------------------------------------------
    def _alloc(self, cap: int) -> None:
        old = (self._cap, getattr(self, "_values", None), getattr(self, "_state", None),
               getattr(self, "_version", None), getattr(self, "_last", None))
        self._values = zeros((cap, self.dim), np.float32)
        self._state = zeros((cap, max(self._sw, 1)), np.float32)
        self._version = zeros(cap, np.uint64)
        self._last = zeros(cap, np.uint32)
        n = old[0]
        if n:
            self._values[:n] = old[1][:n]
            self._state[:n] = old[2][:n]
            self._version[:n] = old[3][:n]
            self._last[:n] = old[4][:n]
        self._cap = cap
        self._vv = _void(self._values)
        self._svv = _void(self._state)

    def _ensure(self, need: int) -> None:
        if need > self._cap:
            self._alloc(max(need, 2 * self._cap))

    def _reset_trackers(self) -> None:
        self._touched_rows: list[np.ndarray] = []
        self._touched_arr: list[np.ndarray] = []
        self._touched_n = 0
        self._touched_at = _NAN
        self._dirty: list[np.ndarray] = []
        self._dirty_n = 0
        self._cache_ids: Optional[list[str]] = None
        self._cache_rows: Optional[np.ndarray] = None

    @property
    def hw(self) -> int:
        raise NotImplementedError

    def _init_values(self, h: np.ndarray) -> np.ndarray:
        """First values of new rows, a function of each id's hash and the slot."""
        m, dim, cfg = len(h), self.dim, self.config
        if cfg.init == "zeros" or m == 0:
            return np.zeros((m, dim), np.float32)
        cols = np.arange(1, 2 * dim + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x = mix64((h ^ np.uint64(self._seed))[:, None] + cols[None, :])
        u = ((x >> np.uint64(40)).astype(np.float64) + 0.5) * (1.0 / (1 << 24))
        if cfg.init == "uniform":
            out = (2.0 * u[:, :dim] - 1.0) * cfg.init_scale
        else:
            out = np.sqrt(-2.0 * np.log(u[:, :dim])) * np.cos(2.0 * np.pi * u[:, dim:]) * cfg.init_scale
        return out.astype(np.float32)

    def _start_rows(self, rows: np.ndarray, h: np.ndarray, now: float) -> None:
        self._values[rows] = self._init_values(h)
        if self._sw:
            self._state[rows] = self._opt.init_state(len(rows), self.dim)
        self._version[rows] = 0
        self._last[rows] = stamp(now)
        self._mark_dirty(rows)

    def _clear_rows(self, rows: np.ndarray) -> None:
        self._values[rows] = 0
        self._state[rows] = 0
        self._version[rows] = 0
        self._last[rows] = 0
        self._mark_dirty(rows)

    def _mark_dirty(self, rows: np.ndarray) -> None:
        # Rows at or past the high-water mark of the last checkpoint go into the next one anyway.
        old = rows[rows < self._ckpt_hw]
        if len(old):
            self._dirty.append(old)
            self._dirty_n += len(old)
            if self._dirty_n > max(1 << 16, self.hw):
                self._dirty = [np.unique(np.concatenate(self._dirty))]
                self._dirty_n = len(self._dirty[0])

    # --- the hot path -------------------------------------------------------------------------------
    def _gather(self, rows: np.ndarray) -> np.ndarray:
        return self._vv.take(rows).view(np.float32).reshape(len(rows), self.dim)

    def _rows_for_push(self, ids: list[str]) -> np.ndarray:
        raise NotImplementedError

    def push(self, ids: Ids, grads: np.ndarray, *, now: float,
             arrival: float | np.ndarray | None = None) -> None:
        """Apply the optimizer to the rows of `ids` with `grads` (n, dim); the gradients of an id
        that appears several times are summed into one update. Ids without a row are ignored
        (counted). `arrival`: the arrival time of the action behind each example (an array, one
        number for all, or None for unknown), kept per row as the earliest since the last sync."""
        ids = ids if type(ids) is list else list(ids)
        n = len(ids)
        g = grads if type(grads) is np.ndarray and grads.dtype == np.float32 else np.asarray(grads, np.float32)
        if g.shape != (n, self.dim):
            raise ValueError(f"slot {self.name!r}: grads must be ({n}, {self.dim}), not {g.shape}")
        if arrival is not None and type(arrival) is not float:
            arrival = np.asarray(arrival, np.float64)
            if arrival.ndim == 0:
                arrival = float(arrival)
            elif arrival.shape != (n,):
                raise ValueError(f"slot {self.name!r}: {arrival.shape} arrival times for {n} ids")
        if n == 0:
            return
        self.counts["pushes"] += n
        cached, self._cache_ids = self._cache_ids, None  # one push per pull: keep no caller's ids alive
        if cached is not None and ids == cached:
            rows = self._cache_rows
        else:
            rows = self._rows_for_push(ids)
        del cached
        # Sorted, so that ids without a row (0 and -1) come first and repeats sit together.
        order = rows.argsort(kind="stable")
        srt = rows.take(order)
        k = 0
        if srt[0] <= 0:
            k = int(np.searchsorted(srt, 1))
            self.counts["ignored_pushes"] += k
            if k == n:
                return
            order, srt = order[k:], srt[k:]
        new = srt[1:] != srt[:-1]
        if new.all():
            if k:
                rows, g = srt, g.take(order, axis=0)
                if type(arrival) is np.ndarray:
                    arrival = arrival.take(order)
        else:
            # Repeated ids: one update per row, with the sum of their gradients.
            starts = new.nonzero()[0]
            starts += 1
            starts = np.concatenate((_ZERO, starts))
            rows = srt.take(starts)
            g = np.add.reduceat(g.take(order, axis=0), starts, axis=0)
            if type(arrival) is np.ndarray:
                arrival = np.fmin.reduceat(arrival.take(order), starts)
        self._update(rows, g, now)
        self._touched_rows.append(rows)
        self._touched_arr.append(_NAN if arrival is None else arrival)
        self._touched_n += len(rows)
        if not now <= self._touched_at:  # (also when it is NaN: nothing touched yet)
            self._touched_at = now
        if self._touched_n > max(1 << 16, self.hw):
            self._consolidate_touched()

    def _update(self, rows: np.ndarray, g: np.ndarray, now: float) -> None:
        u = len(rows)
        w = self._vv.take(rows).view(np.float32).reshape(u, self.dim)
        steps = self._version.take(rows)
        steps += np.uint64(1)
        if self._sw:
            s = self._svv.take(rows).view(np.float32).reshape(u, self._sw)
            self._opt.apply(w, s, g, steps)
            self._svv[rows] = s.view(self._svv.dtype).reshape(u)
        else:
            self._opt.apply(w, None, g, steps)
        self._vv[rows] = w.view(self._vv.dtype).reshape(u)
        self._version[rows] = steps
        self._last[rows] = stamp(now)
        self.counts["updates"] += u
        if self._ckpt_hw:
            self._mark_dirty(rows)

    def _consolidate_touched(self) -> tuple[np.ndarray, np.ndarray]:
        """The touched rows, distinct and sorted, with the earliest known arrival of each."""
        if not self._touched_rows:
            return np.zeros(0, np.int64), np.zeros(0)
        r = np.concatenate(self._touched_rows)
        a = np.concatenate([x if type(x) is np.ndarray else np.full(len(rr), x)
                            for rr, x in zip(self._touched_rows, self._touched_arr, strict=True)])
        if len(self._touched_rows) > 1:
            order = np.argsort(r, kind="stable")
            r = r[order]
            starts = np.flatnonzero(np.concatenate(([True], r[1:] != r[:-1])))
            a = np.fmin.reduceat(a[order], starts)
            r = r[starts]
        else:
            order = np.argsort(r, kind="stable")
            r, a = r[order], a[order]
        self._touched_rows, self._touched_arr, self._touched_n = [r], [a], len(r)
        return r, a

    def _forget_touched(self, rows: np.ndarray) -> None:
        r, a = self._consolidate_touched()
        if len(r):
            keep = ~np.isin(r, rows)
            self._touched_rows, self._touched_arr = [r[keep]], [a[keep]]
            self._touched_n = int(keep.sum())

    # --- many steps at once -----------------------------------------------------------------------
    def pull_working(self, ids: Ids, sightings: np.ndarray, *, now: float) -> WorkingRows:
        """The rows of distinct `ids` for a run of sequential steps in which each id appears in
        `sightings[i]` of them: the same admissions (and counts) as that many training pulls, one
        per step, made now; `ready` says at which sighting each id's row starts to count."""
        ids = ids if type(ids) is list else list(ids)
        sightings = np.asarray(sightings, np.int64)
        if sightings.shape != (len(ids),) or (len(ids) and sightings.min() < 1):
            raise ValueError(f"slot {self.name!r}: one count of at least 1 sightings per id, "
                             f"not {sightings.shape} for {len(ids)} ids")
        self._cache_ids = None
        rows, ready = self._working_rows(ids, sightings, now)
        self.counts["pulls"] += int(sightings.sum())
        unadmitted = int(ready.sum())
        self.counts["unadmitted_pulls"] += unadmitted
        local, index = np.unique(rows, return_inverse=True) if self.kind == "hashed" else (rows, np.arange(len(ids)))
        state = self._state[local, : self._sw] if self._sw else np.zeros((len(local), 0), np.float32)
        return WorkingRows(slot=self.name, ids=ids, index=index.reshape(-1), values=self._gather(local),
                           state=state, sightings=sightings, ready=ready, optimizer=self._opt,
                           unadmitted=unadmitted, rows=local, owner=self, epoch=self._generation)

    def _working_rows(self, ids: list[str], sightings: np.ndarray, now: float) -> tuple[np.ndarray, np.ndarray]:
        """Row of each id (0: none) and the sightings before it has one, admitting as due."""
        raise NotImplementedError

    def write_working(self, w: WorkingRows, values: np.ndarray, state: np.ndarray, updates: np.ndarray, *,
                      now: float, arrival: Optional[np.ndarray] = None) -> None:
        """Set the rows of `w` (taken by `pull_working`) to `values` and `state` after `updates[r]`
        optimizer steps of row r (0: untouched, left as it is), as that many pushes would have:
        versions, update times, the sync's touched rows with the earliest `arrival` behind each
        (NaN: unknown), the checkpoint's changed rows and the counts. Rows evicted meanwhile are
        not written (their ids' rows are looked up again)."""
        m = len(w.rows)
        if values.shape != (m, self.dim) or state.shape != (m, self._sw) or updates.shape != (m,):
            raise ValueError(f"slot {self.name!r}: {m} rows of {self.dim} values and {self._sw} state, "
                             f"not {values.shape}, {state.shape}, {updates.shape} updates")
        if arrival is not None and arrival.shape != (m,):
            raise ValueError(f"slot {self.name!r}: {arrival.shape} arrival times for {m} rows")
        self.counts["pushes"] += int(w.sightings.sum())
        self.counts["ignored_pushes"] += w.unadmitted
        rows = w.rows
        if w.owner is not self or w.epoch != self._generation:
            rows = np.zeros(m, np.int64)
            rows[w.index] = self._rows_for_push(w.ids)
            rows[rows < 0] = 0
        sel = np.flatnonzero((updates > 0) & (rows > 0))
        if not len(sel):
            return
        r = rows[sel]
        self._values[r] = values[sel]
        if self._sw:
            self._state[r, : self._sw] = state[sel]
        self._version[r] += updates[sel].astype(np.uint64)
        self._last[r] = stamp(now)
        self.counts["updates"] += int(updates[sel].sum())
        if self._ckpt_hw:
            self._mark_dirty(r)
        self._touched_rows.append(r)
        self._touched_arr.append(_NAN if arrival is None else arrival[sel].astype(np.float64))
        self._touched_n += len(r)
        if not now <= self._touched_at:
            self._touched_at = now
        self._wrote_working(w, sel)
        if self._touched_n > max(1 << 16, self.hw):
            self._consolidate_touched()

    def _wrote_working(self, w: WorkingRows, written: np.ndarray) -> None:
        pass

    def _ids_of(self, rows: np.ndarray) -> list[str]:
        raise NotImplementedError

    def take_touched(self, now: float) -> RowBatch:
        """The rows updated since the last call (current values, versions, earliest arrivals) and
        the ids evicted meanwhile; clears both. `updated_at` is the newest update's time (`now`
        when there was none)."""
        rows, arr = self._consolidate_touched()
        ids = self._ids_of(rows)
        evicted = self._take_evicted(ids)
        batch = RowBatch(slot=self.name, dim=self.dim, ids=ids, values=self._gather(rows),
                         versions=self._version[rows], earliest_arrival=arr,
                         updated_at=now if math.isnan(self._touched_at) else self._touched_at,
                         evicted=evicted)
        self._touched_rows, self._touched_arr, self._touched_n = [], [], 0
        self._touched_at = _NAN
        return batch

    def _take_evicted(self, touched_ids: list[str]) -> list[str]:
        return []

    @property
    def has_touched(self) -> bool:
        return self._touched_n > 0

    # --- checkpoints ---------------------------------------------------------------------------------
    def _dirty_rows(self, full: bool) -> np.ndarray:
        hw = self.hw
        if full:
            return np.arange(hw, dtype=np.int64)
        fresh = np.arange(self._ckpt_hw, hw, dtype=np.int64)
        if not self._dirty:
            return fresh
        return np.union1d(np.concatenate(self._dirty), fresh)

    def export(self, full: bool) -> tuple[dict, dict[str, np.ndarray]]:
        """What a checkpoint needs: small facts, and the arrays of every row changed since the last
        one (all rows when `full`). Apply it to an empty table with `import_parts`."""
        rows = self._dirty_rows(full)
        parts = {"rows": rows, "values": _pick(self._values, rows, full), "version": _pick(self._version, rows, full),
                 "last": _pick(self._last, rows, full)}
        if self._sw:
            parts["state"] = _pick(self._state, rows, full)
        return {"hw": self.hw}, parts

    def checkpointed(self) -> None:
        """The last export is safely written: start tracking changes afresh."""
        self._dirty, self._dirty_n = [], 0
        self._ckpt_hw = self.hw

    def import_parts(self, facts: dict, parts: dict[str, np.ndarray]) -> None:
        rows = parts["rows"]
        self._ensure(max(int(facts["hw"]), 2))
        self._values[rows] = parts["values"]
        self._version[rows] = parts["version"]
        self._last[rows] = parts["last"]
        if self._sw:
            self._state[rows] = parts["state"]

    def finish_import(self, facts: dict, counts: dict[str, int]) -> None:
        self.counts.update(counts)
        self._reset_trackers()
        self._ckpt_hw = self.hw

    # --- figures ------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self._values.nbytes + self._state.nbytes + self._version.nbytes + self._last.nbytes

    def row_state(self, ids: Ids) -> dict[str, np.ndarray]:
        """Values, optimizer state and version of the rows of `ids` (zeros where none), for tests
        and tools; not on any hot path."""
        rows = np.maximum(self._rows_for_push(list(ids)), 0)
        return {"values": self._values[rows].copy(), "state": self._state[rows, : self._sw].copy(),
                "version": self._version[rows].copy(), "last": self._last[rows].copy()}


class EmbeddingTable(_RowTable):
    """A collisionless table: every admitted id its own row, for as long as it keeps being updated.

    >>> t = EmbeddingTable("item_id", SlotConfig(dim=2, min_count=2, optimizer=Sgd(lr=0.5), init="zeros"))
    >>> t.pull(["v1", "v2", "v1"], now=100.0).tolist()  # v1 seen twice: admitted; v2 not yet
    [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    >>> t.push(["v1", "v2", "v1"], np.ones((3, 2)), now=101.0)  # v1's two gradients summed
    >>> t.pull(["v1", "v2"], now=102.0).tolist()
    [[-1.0, -1.0], [0.0, 0.0]]
    >>> t.counts["admitted"], t.counts["ignored_pushes"], len(t), t.pending
    (2, 1, 2, 0)
    """

    kind = "collisionless"

    def __init__(self, name: str, config: SlotConfig = SlotConfig(), *, capacity: int = 1024,
                 hot_ids: int = HOT_IDS) -> None:
        self._index = IdIndex(first_row=1, capacity=capacity)
        self._pending = IdIndex(first_row=1, capacity=16) if config.min_count > 1 else None
        self._pcount = np.zeros(16, np.uint32)
        self._pseen = np.zeros(16, np.uint32)
        self._evicted: list[str] = []
        self._pdirty: list[np.ndarray] = []
        self._pckpt_hw = 0
        self._hot: dict[str, int] = {}
        self._hot_cap = hot_ids
        self._hot_mode = 1  # 0: the last batch found all its ids in the dict; 1: most; 2: many not
        self._hot_wait = 0  # in mode 2: batches to look up in the map before trying the dict again
        self._hot_wait_last = 0
        super().__init__(name, config, capacity)

    @property
    def hw(self) -> int:
        return self._index.hw

    def __len__(self) -> int:
        """Rows in use."""
        return self._index.live

    def _encode(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        words = self._index.words if self._pending is None else max(self._index.words, self._pending.words)
        keys = encode(ids, words)
        return keys, key_hash(keys)

    def _rows(self, ids: list[str], now: float = 0.0, admit: bool = False) -> np.ndarray:
        """Row of each id, from the hot-id dict or from the id map; ids without one are admitted
        now if `admit` and they qualify, else get 0.

        The dict remembers the rows of recently used ids (at most `hot_ids`; emptied when full).
        Looking a batch up there costs a third of encoding, hashing and probing it, when every id
        is there; when many are not, the dict only adds work. So each table keeps a mode, from
        the share of ids its last dict lookup missed: all there (one itemgetter call), a few
        missing (a get per id, the map for the rest), many missing (the map for all, now and then
        the dict again to see whether it has caught up). The dict is a cache of the map, never
        the map: evictions take ids out of it."""
        n = len(ids)
        mode = self._hot_mode
        if mode == 2 and self._hot_wait > 0:
            self._hot_wait -= 1
            keys, h = self._encode(ids)
            rows, all_found = self._index.find(keys, h)
            if not all_found:
                self._fill(keys, h, rows, now, admit)
            return rows
        hot = self._hot
        if mode == 0 and n > 1:
            try:
                return np.fromiter(itemgetter(*ids)(hot), np.int64, n)
            except KeyError:
                pass
        rows = np.fromiter(map(hot.get, ids, repeat(0)), np.int64, n)
        miss = (rows == 0).nonzero()[0]
        self._hot_mode = 0 if not len(miss) else 1 if len(miss) * 32 <= n else 2
        if self._hot_mode == 2:
            # Look at the dict again at once (this batch's ids are now in it), then after 1, 2,
            # 4, ... batches while it keeps missing, at most HOT_PROBE.
            self._hot_wait = min(max(1, 2 * self._hot_wait_last), HOT_PROBE) if mode == 2 else 0
            self._hot_wait_last = self._hot_wait
        if not len(miss):
            return rows
        mids = list(map(ids.__getitem__, miss.tolist())) if len(miss) < n else ids
        keys, h = self._encode(mids)
        mrows, all_found = self._index.find(keys, h)
        if not all_found:
            self._fill(keys, h, mrows, now, admit)
        rows[miss] = mrows
        if len(hot) + len(mids) > self._hot_cap:
            hot.clear()
            if len(mids) > self._hot_cap:
                return rows
        if all_found:
            hot.update(zip(mids, mrows.tolist(), strict=True))
        else:
            got = (mrows > 0).tolist()
            hot.update(zip(compress(mids, got), compress(mrows.tolist(), got), strict=True))
        return rows

    def _fill(self, keys: np.ndarray, h: np.ndarray, rows: np.ndarray, now: float, admit: bool) -> None:
        if admit:
            self._admit(keys, h, rows, now)
        else:
            rows[rows < 0] = 0

    def _rows_for_push(self, ids: list[str]) -> np.ndarray:
        return self._rows(ids)

    def _ids_of(self, rows: np.ndarray) -> list[str]:
        return self._index.ids(rows)

    def pull(self, ids: Ids, *, now: float, admit: bool = True) -> np.ndarray:
        """The rows of `ids` as a new (n, dim) float32 array; ids may repeat. Counts a sighting of
        each id not yet admitted, admitting those that reach `min_count`; the others pull zeros.
        With `admit=False` (a look, say to score, not a training pull) nothing is counted."""
        if not admit:
            ids = ids if type(ids) is list else list(ids)
            return self._gather(self._rows(ids)) if ids else np.zeros((0, self.dim), np.float32)
        # Copy a caller's list: the trainer may refill it before pushing (see the cache below).
        cached = ids.copy() if type(ids) is list else list(ids)
        ids = cached if type(ids) is not list else ids
        n = len(ids)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        rows = self._rows(ids, now, admit=True)
        self.counts["pulls"] += n
        # The trainer pushes the batch it pulled: remember its rows. Rows of live ids change only by
        # eviction (or a restore), which clears this.
        self._cache_ids, self._cache_rows = cached, rows
        return self._gather(rows)

    def _admit(self, keys: np.ndarray, h: np.ndarray, rows: np.ndarray, now: float) -> None:
        """Fill in `rows` (in place) for the ids that have none: a new row if admitted now, else 0."""
        cfg = self.config
        miss = np.flatnonzero(rows < 0)
        mk = np.ascontiguousarray(keys[miss])
        _, first, inv, cnt = np.unique(mk.view(np.dtype((np.void, mk.shape[1] * 8))).ravel(),
                                       return_index=True, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        uk, uh = mk[first], h[miss][first]
        admit = np.ones(len(first), bool)
        if cfg.admit_p < 1.0:
            admit = uniform01(uh, self._seed) < cfg.admit_p
            self.counts["refused_by_p"] += int(cnt[~admit].sum())
        if self._pending is not None:
            cand = np.flatnonzero(admit)
            ready = self._count_sightings(uk[cand], uh[cand], cnt[cand], now)
            admit[cand[~ready]] = False
        got = self._insert_admitted(uk, uh, admit, now)[inv]
        rows[miss] = got
        self.counts["unadmitted_pulls"] += int((got == 0).sum())

    def _count_sightings(self, keys: np.ndarray, h: np.ndarray, cnt: np.ndarray, now: float) -> np.ndarray:
        """Add `cnt` sightings to each (distinct) id; True for those that reach min_count, which
        leave the pending set."""
        return self._count_sightings_before(keys, h, cnt, now)[0]

    def _count_sightings_before(self, keys: np.ndarray, h: np.ndarray, cnt: np.ndarray,
                                now: float) -> tuple[np.ndarray, np.ndarray]:
        """`_count_sightings`, and the sightings each id had before these."""
        p = self._pending
        pr = p.lookup(keys, h)
        fresh = np.flatnonzero(pr < 0)
        if len(fresh):
            pr[fresh] = p.insert(keys[fresh], h[fresh])
            if p.capacity > len(self._pcount):
                grow = p.capacity - len(self._pcount)
                self._pcount = np.concatenate((self._pcount, np.zeros(grow, np.uint32)))
                self._pseen = np.concatenate((self._pseen, np.zeros(grow, np.uint32)))
        before = self._pcount[pr].astype(np.int64)
        total = before + cnt
        ready = total >= self.config.min_count
        done = pr[ready]
        if len(done):
            p.remove(done)
            self._pcount[done] = 0
            self._pseen[done] = 0
        wait = pr[~ready]
        self._pcount[wait] = np.minimum(total[~ready], 0xFFFFFFFF)
        self._pseen[wait] = stamp(now)
        old = pr[pr < self._pckpt_hw]
        if len(old):
            self._pdirty.append(old)
            if len(self._pdirty) > 64:
                self._pdirty = [np.unique(np.concatenate(self._pdirty))]
        return ready, before

    def _working_rows(self, ids: list[str], sightings: np.ndarray, now: float) -> tuple[np.ndarray, np.ndarray]:
        if len(set(ids)) != len(ids):
            raise ValueError(f"slot {self.name!r}: pull_working takes distinct ids")
        rows = self._rows(ids)  # admits none
        ready = np.zeros(len(ids), np.int64)
        miss = np.flatnonzero(rows == 0)
        if len(miss):
            mids = list(map(ids.__getitem__, miss.tolist())) if len(miss) < len(ids) else ids
            keys, h = self._encode(mids)
            rows[miss], ready[miss] = self._admit_counted(keys, h, sightings[miss], now)
        return rows, ready

    def _admit_counted(self, keys: np.ndarray, h: np.ndarray, cnt: np.ndarray,
                       now: float) -> tuple[np.ndarray, np.ndarray]:
        """`_admit` for distinct ids without rows, each seen in `cnt` pulls to come: the rows of
        those admitted now (else 0) and how many of their sightings come before (all, if none)."""
        cfg = self.config
        admit = np.ones(len(keys), bool)
        wait = cnt.copy()
        if cfg.admit_p < 1.0:
            admit = uniform01(h, self._seed) < cfg.admit_p
            self.counts["refused_by_p"] += int(cnt[~admit].sum())
        if self._pending is not None:
            cand = np.flatnonzero(admit)
            ready, before = self._count_sightings_before(keys[cand], h[cand], cnt[cand], now)
            admit[cand[~ready]] = False
            # Admitted at the sighting that brings the count to min_count.
            wait[cand[ready]] = np.maximum(0, cfg.min_count - 1 - before[ready])
        else:
            wait[admit] = 0
        return self._insert_admitted(keys, h, admit, now), wait

    def _insert_admitted(self, keys: np.ndarray, h: np.ndarray, admit: np.ndarray, now: float) -> np.ndarray:
        """New rows for the (distinct, rowless) ids where `admit` holds; the row of each id, 0 where not admitted."""
        new = np.zeros(len(keys), np.int64)
        take = np.flatnonzero(admit)
        if len(take):
            r = self._index.insert(keys[take], h[take])
            self._ensure(self._index.capacity)
            self._start_rows(r, h[take], now)
            new[take] = r
            self.counts["admitted"] += len(take)
        return new

    def expire(self, now: float) -> int:
        """Evict the rows not updated for `expire_s` (with their optimizer state; their row numbers
        are reused) and forget pending sighting counts as old. Returns the number of rows evicted."""
        if self.config.expire_s is None:
            return 0
        cutoff = now - self.config.expire_s
        hw = self.hw
        last = self._last[:hw]
        rows = np.flatnonzero((last > 0) & (last <= cutoff))
        if len(rows):
            gone = self._index.ids(rows)
            self._evicted.extend(gone)
            if len(gone) * 4 > len(self._hot):
                self._hot = {}
            else:
                deque(map(self._hot.pop, gone, repeat(None)), maxlen=0)
            self._index.remove(rows)
            self._clear_rows(rows)
            self._forget_touched(rows)
            self._cache_ids = None
            self._generation += 1
            self.counts["evicted"] += len(rows)
        if self._pending is not None:
            seen = self._pseen[: self._pending.hw]
            stale = np.flatnonzero((seen > 0) & (seen <= cutoff))
            if len(stale):
                self._pending.remove(stale)
                self._pcount[stale] = 0
                self._pseen[stale] = 0
                old = stale[stale < self._pckpt_hw]
                if len(old):
                    self._pdirty.append(old)
                self.counts["pending_expired"] += len(stale)
        return len(rows)

    def _take_evicted(self, touched_ids: list[str]) -> list[str]:
        ev, self._evicted = self._evicted, []
        if ev and touched_ids:
            back = set(touched_ids)  # evicted, then admitted and updated again: the row wins
            ev = [i for i in ev if i not in back]
        return list(dict.fromkeys(ev))

    @property
    def pending(self) -> int:
        """Ids seen but not yet admitted."""
        return 0 if self._pending is None else self._pending.live

    @property
    def nbytes(self) -> int:
        n = super().nbytes + self._index.nbytes
        if self._pending is not None:
            n += self._pending.nbytes + self._pcount.nbytes + self._pseen.nbytes
        return n

    # --- checkpoints ---------------------------------------------------------------------------------
    def export(self, full: bool) -> tuple[dict, dict[str, np.ndarray]]:
        facts, parts = super().export(full)
        parts["keys"] = _pick(self._index._keys, parts["rows"], full)
        facts["words"] = self._index.words
        if self._pending is not None:
            p = self._pending
            if full:
                prow = np.arange(p.hw, dtype=np.int64)
            else:
                prow = np.arange(self._pckpt_hw, p.hw, dtype=np.int64)
                if self._pdirty:
                    prow = np.union1d(np.concatenate(self._pdirty), prow)
            parts.update(p_rows=prow, p_keys=_pick(p._keys, prow, full), p_count=_pick(self._pcount, prow, full),
                         p_seen=_pick(self._pseen, prow, full))
            facts.update(p_hw=p.hw, p_words=p.words)
        return facts, parts

    def checkpointed(self) -> None:
        super().checkpointed()
        self._pdirty = []
        self._pckpt_hw = self._pending.hw if self._pending is not None else 0

    def import_parts(self, facts: dict, parts: dict[str, np.ndarray]) -> None:
        super().import_parts(facts, parts)
        rows = parts["rows"]
        keys = parts["keys"]
        acc = self._restore_keys
        if acc is None or acc.shape[0] < facts["hw"] or acc.shape[1] < keys.shape[1]:
            grown = np.zeros((max(facts["hw"], 0 if acc is None else acc.shape[0]),
                              max(keys.shape[1], 0 if acc is None else acc.shape[1])), np.uint64)
            if acc is not None:
                grown[: acc.shape[0], : acc.shape[1]] = acc
            acc = self._restore_keys = grown
        acc[rows] = 0
        acc[rows, : keys.shape[1]] = keys
        if "p_rows" in parts:
            prow, pk = parts["p_rows"], parts["p_keys"]
            pacc = self._restore_pkeys
            php = int(facts["p_hw"])
            if pacc is None or pacc.shape[0] < php or pacc.shape[1] < pk.shape[1]:
                grown = np.zeros((max(php, 0 if pacc is None else pacc.shape[0]),
                                  max(pk.shape[1], 0 if pacc is None else pacc.shape[1])), np.uint64)
                if pacc is not None:
                    grown[: pacc.shape[0], : pacc.shape[1]] = pacc
                pacc = self._restore_pkeys = grown
            pacc[prow] = 0
            pacc[prow, : pk.shape[1]] = pk
            if len(self._pcount) < php:
                self._pcount = np.concatenate((self._pcount, np.zeros(php - len(self._pcount), np.uint32)))
                self._pseen = np.concatenate((self._pseen, np.zeros(php - len(self._pseen), np.uint32)))
            self._pcount[prow] = parts["p_count"]
            self._pseen[prow] = parts["p_seen"]

    _restore_keys: Optional[np.ndarray] = None
    _restore_pkeys: Optional[np.ndarray] = None

    def finish_import(self, facts: dict, counts: dict[str, int]) -> None:
        hw = int(facts["hw"])
        keys = self._restore_keys if self._restore_keys is not None else np.zeros((hw, 1), np.uint64)
        self._index.load(keys[:hw], hw)
        self._ensure(self._index.capacity)
        if self._pending is not None:
            php = int(facts.get("p_hw", 1))
            pk = self._restore_pkeys if self._restore_pkeys is not None else np.zeros((php, 1), np.uint64)
            self._pending.load(pk[:php], php)
            if self._pending.capacity > len(self._pcount):
                grow = self._pending.capacity - len(self._pcount)
                self._pcount = np.concatenate((self._pcount, np.zeros(grow, np.uint32)))
                self._pseen = np.concatenate((self._pseen, np.zeros(grow, np.uint32)))
        self._restore_keys = self._restore_pkeys = None
        self._evicted = []
        self._pdirty = []
        super().finish_import(facts, counts)
        self._pckpt_hw = self._pending.hw if self._pending is not None else 0


class HashedEmbeddingTable(_RowTable):
    """The collision baseline: ids hashed into 2**hash_bits rows that colliding ids share.

    Every id has a row at once (no admission) and rows are never evicted. `take_touched` reports
    each pushed id with its (shared) row.
    """

    kind = "hashed"

    def __init__(self, name: str, config: SlotConfig = SlotConfig(hash_bits=20)) -> None:
        if config.hash_bits is None:
            raise ValueError("a hashed table needs SlotConfig.hash_bits")
        self.bits = config.hash_bits
        self._touched_id_lists: list[list[str]] = []
        super().__init__(name, config, (1 << self.bits) + 1)

    @property
    def hw(self) -> int:
        return self._cap

    def __len__(self) -> int:
        return int(np.count_nonzero(self._last))

    def _rows(self, ids: list[str]) -> np.ndarray:
        keys = encode(ids, 1)
        return (key_hash(keys) >> np.uint64(64 - self.bits)).astype(np.int64) + 1

    def _rows_for_push(self, ids: list[str]) -> np.ndarray:
        return self._rows(ids)

    def pull(self, ids: Ids, *, now: float, admit: bool = True) -> np.ndarray:
        ids = ids if type(ids) is list else list(ids)
        if not ids:
            return np.zeros((0, self.dim), np.float32)
        rows = self._rows(ids)
        if not admit:
            return self._gather(np.where(self._last[rows] == 0, 0, rows))
        cold = rows[self._last[rows] == 0]
        if len(cold):
            cold = np.unique(cold)
            self._start_rows(cold, mix64(cold.astype(np.uint64)), now)
            self.counts["admitted"] += len(cold)
        self.counts["pulls"] += len(ids)
        self._cache_ids, self._cache_rows = list(ids), rows
        return self._gather(rows)

    def push(self, ids: Ids, grads: np.ndarray, *, now: float,
             arrival: float | np.ndarray | None = None) -> None:
        ids = ids if type(ids) is list else list(ids)
        super().push(ids, grads, now=now, arrival=arrival)
        self._touched_id_lists.append(ids)

    def expire(self, now: float) -> int:
        return 0

    def _working_rows(self, ids: list[str], sightings: np.ndarray, now: float) -> tuple[np.ndarray, np.ndarray]:
        rows = self._rows(ids) if ids else np.zeros(0, np.int64)
        cold = rows[self._last[rows] == 0]
        if len(cold):
            cold = np.unique(cold)
            self._start_rows(cold, mix64(cold.astype(np.uint64)), now)
            self.counts["admitted"] += len(cold)
        return rows, np.zeros(len(ids), np.int64)

    def _wrote_working(self, w: WorkingRows, written: np.ndarray) -> None:
        self._touched_id_lists.append(list(compress(w.ids, np.isin(w.index, written).tolist())))

    def take_touched(self, now: float) -> RowBatch:
        rows, arr = self._consolidate_touched()
        by_id = dict(zip((i for lst in self._touched_id_lists for i in lst),
                         np.concatenate([self._rows(lst) for lst in self._touched_id_lists]).tolist()
                         if self._touched_id_lists else [], strict=True))
        self._touched_id_lists = []
        ids = list(by_id)
        idrows = np.fromiter(by_id.values(), np.int64, len(by_id))
        pos = np.searchsorted(rows, idrows)
        batch = RowBatch(slot=self.name, dim=self.dim, ids=ids, values=self._gather(idrows),
                         versions=self._version[idrows], earliest_arrival=arr[pos] if len(rows) else np.zeros(0),
                         updated_at=now if math.isnan(self._touched_at) else self._touched_at)
        self._touched_rows, self._touched_arr, self._touched_n = [], [], 0
        self._touched_at = _NAN
        return batch

    def _ids_of(self, rows: np.ndarray) -> list[str]:
        raise TypeError("a hashed table cannot name the id of a row")

    def finish_import(self, facts: dict, counts: dict[str, int]) -> None:
        self._touched_id_lists = []
        super().finish_import(facts, counts)


def make_table(name: str, config: SlotConfig) -> _RowTable:
    return EmbeddingTable(name, config) if config.hash_bits is None else HashedEmbeddingTable(name, config)
