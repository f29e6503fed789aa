"""Delta sync: every `interval_s`, only the rows touched since the last sync go from the training
tables to the serving store, in one transaction (those of `slow_slots` at their own interval); the
dense weights at their own, slower interval.

Monolith's vocabulary: the training tables keep a touched-key set; a sync takes it (`take_touched`)
and pushes those rows. Called from the trainer's step (`maybe_sync`) or from a thread (`start`).
An optional `extra` provider adds catalog entries and users' recent actions to the same
transaction, so the one writer writes everything a serving store holds.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram

from paramserver.rows import DenseBlob, RowBatch
from paramserver.serving import ServingWriter

__all__ = ["PARAMS_VERSION", "SYNC_CATALOG_ITEMS", "SYNC_CATALOG_USERS", "SYNC_ROWS", "SYNC_SECONDS", "CatalogUpdates",
           "DeltaSync", "TouchedParams"]

log = logging.getLogger(__name__)

SYNC_ROWS = Counter("freshrec_sync_rows", "rows pushed to a serving store (updated and evicted)", ["store"])
SYNC_SECONDS = Histogram("freshrec_sync_seconds", "time of one sync: take the touched rows, encode, commit",
                         ["store"], buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0))
SYNC_ERRORS = Counter("freshrec_sync_errors", "syncs that failed (their rows are retried at the next)", ["store"])
SYNC_CATALOG_ITEMS = Counter("freshrec_sync_catalog_items", "catalog entries (item/<id>) written to a serving store",
                             ["store"])
SYNC_CATALOG_USERS = Counter("freshrec_sync_catalog_users", "users' recent actions (user/<id>) written to a serving "
                             "store", ["store"])
PARAMS_VERSION = Gauge("freshrec_params_version", "params_version of a serving store after its last write", ["store"])


class TouchedParams(Protocol):
    """What DeltaSync needs of the training tables."""

    def take_touched(self, *, skip: Collection[str] = ()) -> list[RowBatch]:
        """The rows touched (and ids evicted) since the last call, per slot but those in `skip`
        (kept for a later call); clears what it returns."""
        ...

    def dense(self) -> DenseBlob:
        """The current dense weights, with their version."""
        ...


# (catalog entries by item id, users' recent actions by user id); None deletes the key.
CatalogUpdates = tuple[Mapping[str, Mapping[str, Any] | None], Mapping[str, Any]]


class DeltaSync:
    """Pushes touched rows every `interval_s`, dense weights every `dense_interval_s` when their
    version moved. Rows taken but not written (the write failed) are kept and go with the next
    sync, so a failure delays rows, never loses them.

    `params=None` syncs no rows and no dense weights (a flow that does not train). `extra`, when
    given, is called at every sync for the catalog entries and users' recent actions changed since
    its last call; they go in the same transaction, and are kept for the next sync if it fails
    (a newer entry taken later wins over a kept one).

    `slow_slots` (with `slow_interval_s` longer than `interval_s`) go at most every
    `slow_interval_s` from `maybe_sync`: rows many users' actions touch (an item's, an author's),
    which a sync every `interval_s` wrote again and again, where a user's own row is what their
    next recommendation needs at once. A `sync` called directly takes every slot.

    With `start()`, a thread calls `maybe_sync` every `interval_s`; `params.take_touched` must
    then be safe to call beside the trainer (that is the training tables' business).
    """

    def __init__(self, params: TouchedParams | None, writer: ServingWriter, interval_s: float = 0.2,
                 dense_interval_s: float = 10.0, clock: Callable[[], float] = time.time, *,
                 extra: Callable[[], CatalogUpdates] | None = None,
                 slow_slots: Collection[str] = (), slow_interval_s: float | None = None) -> None:
        if interval_s <= 0 or dense_interval_s <= 0 or (slow_interval_s is not None and slow_interval_s <= 0):
            raise ValueError("sync intervals must be positive")
        self.params = params
        self.writer = writer
        self.interval_s = interval_s
        self.dense_interval_s = dense_interval_s
        slow = slow_interval_s is not None and slow_interval_s > interval_s
        self.slow_slots = frozenset(slow_slots) if slow else frozenset()
        self.slow_interval_s = slow_interval_s if slow else interval_s
        self.last_slow = -math.inf
        self.clock = clock
        self.extra = extra
        self.last_sync = -math.inf
        self.last_dense = -math.inf
        self.dense_version: int | None = None  # of the last dense weights written
        self.syncs = 0
        self.rows_pushed = 0
        self._pending: list[RowBatch] = []
        self._pending_items: dict[str, Any] = {}
        self._pending_users: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        label = writer.store.name
        self._m_rows = SYNC_ROWS.labels(label)
        self._m_seconds = SYNC_SECONDS.labels(label)
        self._m_errors = SYNC_ERRORS.labels(label)
        self._m_version = PARAMS_VERSION.labels(label)
        self._m_items = SYNC_CATALOG_ITEMS.labels(label)
        self._m_users = SYNC_CATALOG_USERS.labels(label)

    def maybe_sync(self, now: float | None = None, interval_s: float | None = None) -> int:
        """Syncs if `interval_s` (None: the sync's own) passed since the last sync; returns the rows
        pushed (0 if not)."""
        now = self.clock() if now is None else now
        if now - self.last_sync < (self.interval_s if interval_s is None else interval_s):
            return 0
        return self.sync(now, slow=now - self.last_slow >= self.slow_interval_s)

    def sync(self, now: float | None = None, *, dense: bool | None = None, slow: bool = True) -> int:
        """Pushes the touched rows now (those of `slow_slots` too unless `slow` is False; the
        dense weights if their interval passed and their version moved, or if `dense` is True),
        with the `extra` catalog updates, in one transaction; returns the rows pushed."""
        with self._lock:
            now = self.clock() if now is None else now
            t0 = time.perf_counter()
            self.last_sync = now
            params = self.params
            if params is None:
                touched = []
            elif slow or not self.slow_slots:
                touched = params.take_touched()
                self.last_slow = now
            else:
                touched = params.take_touched(skip=self.slow_slots)
            batches = self._pending + touched
            self._pending = []
            items, users = self._pending_items, self._pending_users
            self._pending_items, self._pending_users = {}, {}
            if self.extra is not None:
                new_items, new_users = self.extra()
                if new_items:
                    items = {**items, **new_items} if items else dict(new_items)
                if new_users:
                    users = {**users, **new_users} if users else dict(new_users)
            blob = None
            if params is not None and (dense or (dense is None and now - self.last_dense >= self.dense_interval_s)):
                blob = params.dense()
                if blob.version == self.dense_version and not dense:
                    blob = None
                    self.last_dense = now
            rows = sum(len(b.ids) + len(b.evicted) for b in batches)
            if not rows and blob is None and not items and not users:
                return 0
            try:
                version = self.writer.write(batches, dense=blob, items=items or None, users=users or None)
            except Exception:
                self._pending = batches
                self._pending_items, self._pending_users = items, users
                self._m_errors.inc()
                raise
            if blob is not None:
                self.dense_version = blob.version
                self.last_dense = now
            self.syncs += 1
            self.rows_pushed += rows
            self._m_rows.inc(rows)
            if items:
                self._m_items.inc(len(items))
            if users:
                self._m_users.inc(len(users))
            self._m_version.set(version)
            self._m_seconds.observe(time.perf_counter() - t0)
            return rows

    # ------------------------------------------------------------------------ background mode

    def start(self) -> None:
        """Syncs from a daemon thread every `interval_s` until `stop()`."""
        if self._thread is not None:
            raise RuntimeError("DeltaSync is running already")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="freshrec-delta-sync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.maybe_sync()
            except Exception:  # counted and logged; the rows wait for the next round
                log.exception("delta sync failed; its rows go with the next sync")

    def stop(self, timeout: float = 10.0, *, final_sync: bool = True) -> None:
        """Stops the thread; with `final_sync`, pushes what is still touched."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout)
        if final_sync:
            self.sync()

    def __enter__(self) -> DeltaSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
