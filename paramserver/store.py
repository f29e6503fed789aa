"""`ParameterStore`: the training side's parameters, the sparse tables by slot and the dense weights.

The trainer pulls the rows of a batch and pushes their gradients back; the sync takes the rows
touched since its last call; the flow's snapshots call `checkpoint(tag)`, and a resume calls
`restore(tag)` with the tag Bytewax hands back. A lock serialises the calls, so a sync thread
can take touched rows while the trainer pushes (it never sees half an update).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Optional

import msgspec
import numpy as np

from paramserver.checkpoint import DENSE_TABLE, CheckpointMeta, CheckpointStore, DenseMeta, PartMeta, TableMeta
from paramserver.rows import DenseBlob, RowBatch, WorkingRows
from paramserver.table import Ids, SlotConfig, _RowTable, make_table

DEFAULT_SLOT = SlotConfig(min_count=2)
FIRST_SIGHT = ("user_id", "item_id")


class ParameterStore:
    """Embedding tables by slot name, created on first sight (at most `max_slots`), and the dense
    weights with a version.

    `slots` configures named slots; any other slot gets `default`, except those in `first_sight`
    (user and item ids), which get `default` with min_count=1 so a new user's actions count at once.
    With `checkpoint_dir`, `checkpoint(tag)` writes the changes since the last checkpoint to LMDB
    there and `restore(tag)` brings every table back to checkpoint `tag`; every `full_every`-th
    checkpoint is a full snapshot, and the log keeps the chains of the last `keep_full` of them.
    """

    def __init__(self, slots: Optional[Mapping[str, SlotConfig]] = None, *, default: SlotConfig = DEFAULT_SLOT,
                 first_sight: Iterable[str] = FIRST_SIGHT, max_slots: int = 256,
                 checkpoint_dir: Optional[str | Path] = None, full_every: int = 10, keep_full: int = 2,
                 clock: Callable[[], float] = time.time, checkpoint_max_bytes: Optional[int] = None,
                 cap_name: str = "max_map_size") -> None:
        if full_every < 1 or keep_full < 1:
            raise ValueError("full_every and keep_full must be at least 1")
        self._configs = dict(slots or {})
        self.default = default
        self._first_sight = frozenset(first_sight)
        self.max_slots = max_slots
        self.full_every = full_every
        self.keep_full = keep_full
        self._clock = clock
        self._ckpt = (CheckpointStore(checkpoint_dir, max_map_size=checkpoint_max_bytes, cap_name=cap_name)
                      if checkpoint_dir is not None else None)
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._tables: dict[str, _RowTable] = {}
        self._numbers: dict[str, int] = {}
        self._refused: set[str] = set()
        self.counts: dict[str, int] = dict.fromkeys(
            ("slots_refused", "refused_pulls", "refused_pushes", "evicted", "checkpoints", "restores"), 0)
        self._dense: dict[str, np.ndarray] = {}
        self._dense_version = 0
        self._dense_at = 0.0
        self._dense_dirty = False
        self._last_tag: Optional[int] = None
        self._base = -1
        self._since_full = 0

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()

    # --- slots --------------------------------------------------------------------------------------
    def config_for(self, slot: str) -> SlotConfig:
        cfg = self._configs.get(slot)
        if cfg is not None:
            return cfg
        if slot in self._first_sight and self.default.min_count != 1:
            return msgspec.structs.replace(self.default, min_count=1)
        return self.default

    def table(self, slot: str) -> Optional[_RowTable]:
        """The table of `slot`, created now if there is room; None past `max_slots`."""
        t = self._tables.get(slot)
        if t is None:
            if len(self._tables) >= self.max_slots:
                if slot not in self._refused:
                    if len(self._refused) < 10_000:
                        self._refused.add(slot)
                    self.counts["slots_refused"] += 1
                return None
            t = self._tables[slot] = make_table(slot, self.config_for(slot))
            self._numbers[slot] = max(self._numbers.values(), default=-1) + 1
        return t

    @property
    def tables(self) -> dict[str, _RowTable]:
        return dict(self._tables)

    # --- the trainer's calls ------------------------------------------------------------------------
    def pull(self, slot: str, ids: Ids, *, now: Optional[float] = None, admit: bool = True) -> np.ndarray:
        """Rows of `ids` in `slot` as (n, dim) float32: zeros for ids not (yet) admitted. A
        training pull counts sightings towards admission; `admit=False` only looks (to score
        before training, say): it counts nothing and creates no slot."""
        with self._lock:
            t = self._tables.get(slot) or (self.table(slot) if admit else None)
            if t is None:
                if admit:
                    self.counts["refused_pulls"] += len(ids)
                return np.zeros((len(ids), self.config_for(slot).dim), np.float32)
            return t.pull(ids, now=self._clock() if now is None else now, admit=admit)

    def push(self, slot: str, ids: Ids, grads: np.ndarray, *, arrival: float | np.ndarray | None = None,
             now: Optional[float] = None) -> None:
        """Apply `grads` (n, dim) to the rows of `ids`; `arrival` as in `EmbeddingTable.push`."""
        with self._lock:
            t = self._tables.get(slot)
            if t is None:
                self.counts["refused_pushes"] += len(ids)
                return
            t.push(ids, grads, now=self._clock() if now is None else now, arrival=arrival)

    def pull_working(self, slot: str, ids: Ids, sightings: np.ndarray, *, now: Optional[float] = None) -> WorkingRows:
        """The rows (values and optimizer state) of distinct `ids` in `slot` for a run of sequential
        steps, each id appearing in `sightings[i]` of them: admissions and counts as that many
        training pulls, one per step (see `WorkingRows.ready`). A trainer runs the steps on the
        copies and hands them back with `write_working`; the store stays the owner of the rows."""
        with self._lock:
            t = self._tables.get(slot) or self.table(slot)
            if t is not None:
                return t.pull_working(ids, sightings, now=self._clock() if now is None else now)
            ids = list(ids)
            sightings = np.asarray(sightings, np.int64)
            self.counts["refused_pulls"] += int(sightings.sum())
            cfg = self.config_for(slot)
            n, width = len(ids), cfg.optimizer.state_width * cfg.dim
            return WorkingRows(slot=slot, ids=ids, index=np.arange(n), values=np.zeros((n, cfg.dim), np.float32),
                               state=cfg.optimizer.init_state(n, cfg.dim).reshape(n, width), sightings=sightings,
                               ready=sightings.copy(), optimizer=cfg.optimizer, unadmitted=int(sightings.sum()),
                               rows=np.zeros(n, np.int64))

    def write_working(self, rows: WorkingRows, values: np.ndarray, state: np.ndarray, updates: np.ndarray, *,
                      arrival: Optional[np.ndarray] = None, now: Optional[float] = None) -> None:
        """Hand back the rows of `pull_working` after the steps: their values and optimizer state
        after `updates[r]` steps of row r, with the earliest `arrival` behind each (NaN: unknown).
        The sync, checkpoints and expiry see them as if each step had been pushed."""
        with self._lock:
            t = self._tables.get(rows.slot)
            if t is None:
                self.counts["refused_pushes"] += int(rows.sightings.sum())
                return
            t.write_working(rows, np.asarray(values, np.float32), np.asarray(state, np.float32),
                            np.asarray(updates, np.int64), now=self._clock() if now is None else now,
                            arrival=None if arrival is None else np.asarray(arrival, np.float64))

    def set_dense(self, arrays: Mapping[str, np.ndarray], now: Optional[float] = None) -> int:
        """Replace the dense weights (kept as float32 copies); returns the new version."""
        dense = {}
        for k, v in arrays.items():
            a = np.array(v, dtype=np.float32, copy=True)
            a.flags.writeable = False
            dense[k] = a
        with self._lock:
            self._dense = dense
            self._dense_version += 1
            self._dense_at = self._clock() if now is None else now
            self._dense_dirty = True
            return self._dense_version

    def dense(self) -> DenseBlob:
        with self._lock:
            return DenseBlob(version=self._dense_version, arrays=dict(self._dense), updated_at=self._dense_at)

    # --- the sync's and the housekeeping's calls ----------------------------------------------------------
    def take_touched(self, now: Optional[float] = None, *, skip: Collection[str] = ()) -> list[RowBatch]:
        """Per slot with changes (but those in `skip`, which keep theirs for a later call): the
        rows updated since the last call and the ids evicted."""
        now = self._clock() if now is None else now
        with self._lock:
            return [t.take_touched(now) for name, t in self._tables.items()
                    if (t.has_touched or getattr(t, "_evicted", None)) and name not in skip]

    def expire(self, now: Optional[float] = None) -> int:
        """Evict rows not updated for their slot's `expire_s`; returns how many."""
        now = self._clock() if now is None else now
        with self._lock:
            n = sum(t.expire(now) for t in self._tables.values())
            self.counts["evicted"] += n
            return n

    def stats(self) -> dict:
        """Figures for metrics: store-wide counts, and per slot its rows, pending ids, bytes and counts."""
        with self._lock:
            return self._stats()

    def _stats(self) -> dict:
        return {
            **self.counts,
            "slots": len(self._tables),
            "dense_version": self._dense_version,
            "last_checkpoint": -1 if self._last_tag is None else self._last_tag,
            "tables": {name: {"rows": len(t), "pending": getattr(t, "pending", 0), "bytes": t.nbytes, **t.counts}
                       for name, t in self._tables.items()},
        }

    # --- checkpoints ----------------------------------------------------------------------------------
    def _log(self) -> CheckpointStore:
        if self._ckpt is None:
            raise RuntimeError("this ParameterStore has no checkpoint_dir")
        return self._ckpt

    def tags(self) -> list[int]:
        """Tags of the checkpoints that can be restored."""
        return self._log().tags()

    def checkpoint(self, tag: int) -> None:
        """Write everything changed since the last checkpoint under `tag` (larger than the last),
        in one LMDB transaction: rows with optimizer state, id map entries, evictions, admission
        counts, counters and (if changed) the dense weights. Every `full_every`-th is full."""
        with self._lock:
            self._checkpoint(tag)

    def _checkpoint(self, tag: int) -> None:
        log = self._log()
        tag = int(tag)
        if self._last_tag is not None and tag <= self._last_tag:
            raise ValueError(f"checkpoint tags must grow: {tag} after {self._last_tag}")
        full = self._last_tag is None or self._since_full + 1 >= self.full_every
        metas, blobs = [], []
        for name, t in self._tables.items():
            facts, parts = t.export(full)
            num = self._numbers[name]
            metas.append(TableMeta(name=name, number=num, kind=t.kind, config=t.config, facts=facts,
                                   counts=dict(t.counts), parts=[PartMeta.of(k, a) for k, a in parts.items()]))
            blobs += [(num, k, a) for k, a in parts.items()]
        dense = None
        if full or self._dense_dirty:
            names = list(self._dense)
            dense = DenseMeta(version=self._dense_version, updated_at=self._dense_at, names=names,
                              parts=[PartMeta.of(f"d{i}", self._dense[k]) for i, k in enumerate(names)])
            blobs += [(DENSE_TABLE, f"d{i}", self._dense[k]) for i, k in enumerate(names)]
        meta = CheckpointMeta(tag=tag, full=full, base=tag if full else self._base, created_at=self._clock(),
                              tables=metas, dense=dense,
                              counts=dict(self.counts, checkpoints=self.counts["checkpoints"] + 1))
        log.write(meta, blobs, self.keep_full)
        for t in self._tables.values():
            t.checkpointed()
        self._dense_dirty = False
        self._last_tag = tag
        self._base = meta.base
        self._since_full = 0 if full else self._since_full + 1
        self.counts["checkpoints"] += 1

    def restore(self, tag: int) -> None:
        """Bring every table and the dense weights back to checkpoint `tag`, exactly, and forget
        the checkpoints after it. The touched rows and evictions not yet taken are dropped."""
        with self._lock:
            self._restore(tag)

    def _restore(self, tag: int) -> None:
        log = self._log()
        chain = log.chain(int(tag))
        last = chain[-1]
        tables: dict[str, _RowTable] = {}
        dense: dict[str, np.ndarray] = {}
        with log.reader() as rd:
            for m in chain:
                for tm in m.tables:
                    t = tables.get(tm.name)
                    if t is None:
                        t = tables[tm.name] = make_table(tm.name, tm.config)
                    t.import_parts(tm.facts, rd.parts(m.tag, tm.number, tm.parts))
            dm = next((m for m in reversed(chain) if m.dense is not None), None)
            if dm is not None:
                for name, pm in zip(dm.dense.names, dm.dense.parts, strict=True):
                    a = rd.part(dm.tag, DENSE_TABLE, pm).copy()
                    a.flags.writeable = False
                    dense[name] = a
        for tm in last.tables:
            tables[tm.name].finish_import(tm.facts, tm.counts)
        log.discard_after(last.tag)
        restores = self.counts["restores"]
        self._reset()
        self._tables = {tm.name: tables[tm.name] for tm in last.tables}
        self._numbers = {tm.name: tm.number for tm in last.tables}
        self.counts.update(last.counts)
        self.counts["restores"] = restores + 1
        self._dense = dense
        if dm is not None:
            self._dense_version, self._dense_at = dm.dense.version, dm.dense.updated_at
        self._last_tag = last.tag
        self._base = last.base
        self._since_full = len(chain) - 1

