"""The join decision of one bucket: match, wait, spill, expire, sample (CONTRACT.md, Joining).

`JoinBucket` keeps the join keys of one bucket in a write-back cache over a `SpillStore` (LMDB),
flushed in one transaction per epoch (or sooner when the cache is full), and decides each key's
one outcome by the bucket's watermark. Plain logic: no Bytewax, testable alone.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional, Union

import msgspec

from flows.clock import join_key
from flows.events import (
    NEGATIVE_ACTIONS,
    POSITIVE_ACTIONS,
    ActionEvent,
    DeadLetter,
    Example,
    ExampleAction,
    FeatureEvent,
    encode,
)
from flows.spill import SpillStore

Key = str  # request_id + "\x00" + item_id (flows.clock.join_key)


@dataclass(frozen=True)
class JoinSettings:
    window_s: float = 3600.0
    orphan_hold_s: float = 60.0
    neg_sample_rate: float = 1.0
    watch_positive_s: Optional[float] = None  # a `watch` of at least this value is positive
    cache_size: int = 50_000  # join keys held in memory per bucket
    resolved_size: int = 200_000  # resolved keys remembered per bucket, to tell after-example actions


@dataclass
class JoinCounts:
    """What happened to every event that reached the bucket; each lands in exactly one count."""

    impressions: int = 0  # feature events accepted as a new impression
    positives: int = 0
    explicit_negatives: int = 0
    expired_kept: int = 0
    sampled_out: int = 0
    actions_joined: int = 0  # actions that made an example or wait with their impression
    actions_pending: int = 0  # actions that arrived before their impression (held)
    after_example: int = 0
    late: int = 0
    duplicates: int = 0
    duplicate_features: int = 0
    orphans: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    spill_writes: int = 0
    spill_reads: int = 0
    flushes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)  # the fields, in order: read once per batch, so no `fields()` walk


class _Waiting(msgspec.Struct, array_like=True, gc=False):
    """An impression waiting for its label, with the neutral actions seen so far."""

    feature: FeatureEvent
    actions: list[ActionEvent]
    due: float


class _Pending(msgspec.Struct, array_like=True, gc=False):
    """Actions whose impression has not come yet; orphans when the watermark passes `due`."""

    actions: list[ActionEvent]
    due: float


_Entry = Union[_Waiting, _Pending]


class _Stored(msgspec.Struct, array_like=True, gc=False):
    waiting: Optional[_Waiting] = None
    pending: Optional[_Pending] = None


_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE = msgspec.msgpack.Decoder(_Stored).decode


def _dump(e: _Entry) -> bytes:
    return _ENCODE(_Stored(waiting=e) if type(e) is _Waiting else _Stored(pending=e))


def _load(b: bytes) -> _Entry:
    s = _DECODE(b)
    return s.waiting if s.waiting is not None else s.pending  # type: ignore[return-value]


def positive_rule(watch_positive_s: Optional[float]) -> Callable[[ActionEvent], bool]:
    """Whether an action is positive (CONTRACT.md): the positive actions, and `watch` of at least
    `watch_positive_s` when that is set. The joiner and the catalog count by the same rule."""

    def is_positive(a: ActionEvent) -> bool:
        if a.action in POSITIVE_ACTIONS:
            return True
        return watch_positive_s is not None and a.action == "watch" and (a.value or 0.0) >= watch_positive_s

    return is_positive


def keep_fraction(key: Key) -> float:
    """A uniform number in [0, 1) fixed by the join key: the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0**64


def _action_id(a: ActionEvent) -> object:
    return a.event_id if a.event_id is not None else (a.action, a.ts, a.value)


class JoinBucket:
    """The join state and decisions of one bucket.

    Events go in through `on_features` / `on_actions` (in arrival order) and the watermark through
    `advance`; examples and dead letters come out. `flush(tag)` writes what changed to the store
    in one transaction; `resume(tag)` rolls the store back to a flush and starts from it.
    """

    def __init__(self, settings: JoinSettings, store: SpillStore):
        self.s = settings
        self.store = store
        self.counts = JoinCounts()
        self.watermark = -math.inf
        self._cache: dict[Key, Optional[_Entry]] = {}  # None: deleted, not yet flushed
        self._on_disk: set[Key] = set()  # keys of cached entries that the store holds too
        # Keys in `_on_disk` whose entry changed since the last flush. A cached entry not on disk is
        # unflushed by definition, so it needs no mark: that spares a set insert and a removal per
        # impression that lives and dies between two flushes.
        self._dirty: set[Key] = set()
        # Due times of entries not flushed yet. Input comes nearly in ts order, so most dues come in
        # order too: those go to a FIFO (O(1)), the rest to a heap; expiry drains both.
        self._heap: list[tuple[float, Key]] = []
        self._fifo: deque[tuple[float, Key]] = deque()
        self._scan_from: Optional[tuple[float, bytes]] = None  # store's due index read up to here
        # key -> ids of its actions, with the keys in the order they were resolved so that the oldest
        # is forgotten first: a dict and a deque cost half an OrderedDict's insert, and popping the
        # oldest stays O(1) (a dict's next(iter()) walks every deleted slot at its front). A key is
        # resolved again only after it was forgotten, so it is in the deque once.
        self._resolved: dict[Key, tuple] = {}
        self._resolved_order: deque[Key] = deque()
        self._stored = len(store)
        self._tag = store.last_tag()
        self._is_positive = positive_rule(settings.watch_positive_s)

    # -- state access: cache first, then the store -------------------------------------------

    def _prefetch(self, keys: Iterable[Key]) -> None:
        """Bring the stored entries of `keys` into the cache with one read transaction."""
        cache = self._cache
        if not self._stored:
            return
        missing = [k for k in keys if k not in cache and k not in self._resolved]
        if not missing:
            return
        missing = list(dict.fromkeys(missing))
        got = self.store.get_many([k.encode() for k in missing])
        self.counts.spill_reads += len(missing)
        for k, v in zip(missing, got, strict=True):
            if v is not None:
                cache[k] = _load(v[1])
                self._on_disk.add(k)

    def _put(self, key: Key, entry: _Entry) -> None:
        self._cache[key] = entry
        if key in self._on_disk:
            self._dirty.add(key)
        fifo = self._fifo
        if not fifo or entry.due >= fifo[-1][0]:
            fifo.append((entry.due, key))
        else:
            heapq.heappush(self._heap, (entry.due, key))

    def _drop(self, key: Key) -> None:
        if key in self._on_disk:
            self._cache[key] = None
            self._dirty.add(key)
        else:
            self._cache.pop(key, None)

    # -- events ------------------------------------------------------------------------------

    def on_features(self, events: list[FeatureEvent], keys: Optional[list[Key]] = None) -> list[Example]:
        """A batch of feature events in arrival order; `keys` are their join keys if known (route
        makes them to hash the events to their bucket)."""
        if keys is None:
            keys = [join_key(e.request_id, e.item_id) for e in events]
        if self._stored:
            self._prefetch(keys)
        out: list[Example] = []
        cache, resolved, fifo = self._cache, self._resolved, self._fifo
        cache_get, fifo_append = cache.get, fifo.append
        window, watermark = self.s.window_s, self.watermark
        # The hot path (a new impression) is inlined: counts are kept in locals and added once, and
        # the FIFO's last due is tracked here instead of read back.
        last_due = fifo[-1][0] if fifo else -math.inf
        hits = misses = duplicates = 0
        for key, f in zip(keys, events, strict=True):
            entry = cache_get(key)
            if entry is None:
                if key in resolved:
                    duplicates += 1
                    continue
                misses += 1
                due = f.ts + window
                waiting = _Waiting(f, [], due)
                cache[key] = waiting  # not cached, so not on disk: unflushed, no dirty mark
                if due >= last_due:
                    fifo_append((due, key))
                    last_due = due
                else:
                    heapq.heappush(self._heap, (due, key))
                if due <= watermark:
                    self._expire(key, waiting, out, [])  # came after its window closed
                continue
            hits += 1
            if type(entry) is _Waiting:
                duplicates += 1
                continue
            # Its actions came first: replay them in arrival order now that the impression is here.
            self.counts.impressions += 1
            waiting = _Waiting(f, [], f.ts + window)
            pending = entry.actions
            self.counts.actions_pending -= len(pending)
            self._put(key, waiting)
            last_due = fifo[-1][0] if fifo else -math.inf
            for i, a in enumerate(pending):
                ex = self._apply(key, waiting, a)
                if ex is not None:
                    out.append(ex)
                    # Actions that came after the deciding one find their key resolved.
                    self.counts.after_example += len(pending) - i - 1
                    break
            else:
                if waiting.due <= watermark:
                    self._expire(key, waiting, out, [])
        counts = self.counts
        counts.cache_hits += hits
        counts.cache_misses += misses
        counts.impressions += misses
        counts.duplicate_features += duplicates
        return out

    def on_actions(self, events: list[ActionEvent], keys: Optional[list[Key]] = None) -> list[Example]:
        """A batch of action events in arrival order; `keys` as in `on_features`."""
        if keys is None:
            keys = [join_key(e.request_id, e.item_id) for e in events]
        if self._stored:
            self._prefetch(keys)
        out: list[Example] = []
        cache, counts, resolved, on_disk, dirty = self._cache, self.counts, self._resolved, self._on_disk, self._dirty
        cache_get, dirty_add = cache.get, dirty.add
        hold, watermark = self.s.orphan_hold_s, self.watermark
        resolved_size = self.s.resolved_size
        order_append, order_popleft = self._resolved_order.append, self._resolved_order.popleft
        positive, watch_s = POSITIVE_ACTIONS, self.s.watch_positive_s
        hits = misses = duplicates = after = late = pending_n = joined = positives = negatives = 0
        for key, a in zip(keys, events, strict=True):
            entry = cache_get(key)
            if entry is None:
                ids = resolved.get(key)
                if ids is not None:
                    if _action_id(a) in ids:
                        duplicates += 1
                    else:
                        after += 1
                    continue
                misses += 1
                if a.ts + hold <= watermark:
                    late += 1  # its impression, if any, was resolved and forgotten
                    continue
                pending_n += 1
                self._put(key, _Pending([a], a.ts + hold))
                continue
            hits += 1
            actions = entry.actions
            if actions:
                aid = _action_id(a)
                if any(_action_id(b) == aid for b in actions):
                    duplicates += 1
                    continue
            if type(entry) is _Pending:
                pending_n += 1
                actions.append(a)
                if key in on_disk:
                    dirty_add(key)
                continue
            # `_apply` and `_resolve`, inlined for the common case: one action decides the label.
            joined += 1
            actions.append(a)
            action = a.action
            if action in positive or (watch_s is not None and action == "watch" and (a.value or 0.0) >= watch_s):
                positives += 1
                label = 1
            elif action in NEGATIVE_ACTIONS:
                negatives += 1
                label = 0
            else:
                if key in on_disk:
                    dirty_add(key)  # a neutral action waits with its impression
                continue
            if key in on_disk:
                cache[key] = None
                dirty_add(key)
            else:
                del cache[key]
            if len(actions) == 1:
                eid = a.event_id
                resolved[key] = (eid,) if eid is not None else ((action, a.ts, a.value),)
            else:
                resolved[key] = tuple(map(_action_id, actions))
            order_append(key)
            while len(resolved) > resolved_size:
                resolved.pop(order_popleft(), None)  # the oldest; its late actions count as late
            out.append(_example(entry, label, a.ts, 1.0, a.received_at))
        counts.cache_hits += hits
        counts.cache_misses += misses
        counts.duplicates += duplicates
        counts.after_example += after
        counts.late += late
        counts.actions_pending += pending_n
        counts.actions_joined += joined
        counts.positives += positives
        counts.explicit_negatives += negatives
        return out

    def _apply(self, key: Key, w: _Waiting, a: ActionEvent) -> Optional[Example]:
        """One more action for a waiting impression; an example if it decides the label."""
        self.counts.actions_joined += 1
        w.actions.append(a)
        if self._is_positive(a):
            self.counts.positives += 1
            return self._resolve(key, w, 1, a.ts, 1.0, a.received_at)
        if a.action in NEGATIVE_ACTIONS:
            self.counts.explicit_negatives += 1
            return self._resolve(key, w, 0, a.ts, 1.0, a.received_at)
        if key in self._on_disk:
            self._dirty.add(key)  # a neutral action waits with its impression
        return None

    def _resolve(self, key: Key, w: _Waiting, label: int, label_ts: float, weight: float,
                 received_at: Optional[float]) -> Example:
        self._drop(key)
        resolved, order = self._resolved, self._resolved_order
        resolved[key] = tuple(map(_action_id, w.actions))
        order.append(key)
        while len(resolved) > self.s.resolved_size:
            resolved.pop(order.popleft(), None)  # the oldest; its late actions count as late
        return _example(w, label, label_ts, weight, received_at)

    # -- the clock ---------------------------------------------------------------------------

    def advance(self, watermark: float) -> tuple[list[Example], list[DeadLetter]]:
        """Move the watermark; expire impressions and release orphans that are now due.

        Called after every batch, even when the watermark stands still: a late impression may
        already be due, and nothing due may be left unflushed behind the store's index scan.
        """
        if watermark > self.watermark:
            self.watermark = watermark
        watermark = self.watermark
        examples: list[Example] = []
        dead: list[DeadLetter] = []
        heap, fifo, cache = self._heap, self._fifo, self._cache
        # Every impression passes the FIFO once (most already resolved): bound methods, no lookups.
        cache_get, fifo_popleft, expire = cache.get, fifo.popleft, self._expire
        while fifo and fifo[0][0] <= watermark:
            due, key = fifo_popleft()
            entry = cache_get(key)
            if entry is not None and entry.due == due:
                expire(key, entry, examples, dead)
        while heap and heap[0][0] <= watermark:
            due, key = heapq.heappop(heap)
            entry = cache_get(key)
            if entry is not None and entry.due == due:
                expire(key, entry, examples, dead)
        if self._stored:
            while True:
                due_keys = self.store.due(watermark, self._scan_from)
                if not due_keys:
                    break
                self._scan_from = due_keys[-1]
                keys = [k.decode() for _, k in due_keys]
                self._prefetch(keys)
                for (due, _), key in zip(due_keys, keys, strict=True):
                    entry = cache.get(key)
                    if entry is not None and entry.due == due:
                        self._expire(key, entry, examples, dead)
        return examples, dead

    def _expire(self, key: Key, entry: _Entry, examples: list[Example], dead: list[DeadLetter]) -> None:
        if type(entry) is _Pending:
            self._drop(key)
            self.counts.actions_pending -= len(entry.actions)
            self.counts.orphans += len(entry.actions)
            for a in entry.actions:
                dead.append(DeadLetter(
                    "actions", f"orphan: no feature event for this (request_id, item_id) by "
                               f"watermark {self.watermark:.3f} (action ts + {self.s.orphan_hold_s:g} s hold)",
                    encode(a).decode(), None, False, a.received_at or 0.0))
            return
        rate = self.s.neg_sample_rate
        if rate >= 1.0 or keep_fraction(key) < rate:
            self.counts.expired_kept += 1
            examples.append(self._resolve(key, entry, 0, entry.due, 1.0 / rate, None))
        else:
            self.counts.sampled_out += 1
            self._resolve(key, entry, 0, entry.due, 1.0 / rate, None)

    # -- persistence -------------------------------------------------------------------------

    def over_capacity(self) -> bool:
        return len(self._cache) > self.s.cache_size

    def flush(self, tag: int) -> int:
        """Write what changed since the last flush in one transaction tagged `tag`; returns writes."""
        writes: dict[bytes, Optional[tuple[float, bytes]]] = {}
        cache, on_disk = self._cache, self._on_disk
        for key in self._dirty:  # all on disk
            entry = cache.get(key)
            if entry is None:
                writes[key.encode()] = None
                on_disk.discard(key)
                cache.pop(key, None)
            else:
                writes[key.encode()] = (entry.due, _dump(entry))
        # Entries never flushed (a None entry is always on disk).
        new = [key for key in cache if key not in on_disk]
        for key in new:
            entry = cache[key]
            writes[key.encode()] = (entry.due, _dump(entry))  # type: ignore[union-attr]
        on_disk.update(new)
        if writes or tag > self._tag:
            self.store.flush(tag, writes)
            self._tag = tag
        self._dirty.clear()
        self._heap.clear()  # everything unflushed is now in the store's due index
        self._fifo.clear()
        self.counts.spill_writes += len(writes)
        self.counts.flushes += 1
        self._stored = len(self.store)
        return len(writes)

    def evict(self, keep: int) -> int:
        """Drop clean cached entries, oldest first, until at most `keep` remain."""
        cache, dirty, on_disk = self._cache, self._dirty, self._on_disk
        dropped = 0
        for key in list(cache):
            if len(cache) <= keep:
                break
            if key not in dirty and key in on_disk:
                del cache[key]
                on_disk.discard(key)
                dropped += 1
        return dropped

    def resume(self, tag: int) -> None:
        """Start from the store as it was at flush `tag` (0: empty), forgetting everything cached."""
        if tag == 0:
            self.store.clear()
        else:
            self.store.rollback(tag)
        self._cache.clear()
        self._dirty.clear()
        self._on_disk.clear()
        self._heap.clear()
        self._fifo.clear()
        self._resolved.clear()
        self._resolved_order.clear()
        self._scan_from = None
        self._stored = len(self.store)
        self._tag = tag

    def waiting(self) -> tuple[int, int]:
        """Join keys waiting (impressions and held actions): in memory, and in the store."""
        return sum(1 for e in self._cache.values() if e is not None), self._stored


def _example(w: _Waiting, label: int, label_ts: float, weight: float,
             received_at: Optional[float]) -> Example:
    f = w.feature
    # Positional (in Example's field order): a quarter faster than by keyword, once per example.
    acts = w.actions
    if len(acts) == 1:  # the common case, without a comprehension's frame
        a = acts[0]
        actions = [ExampleAction(a.action, a.ts, a.value)]
    else:
        actions = [ExampleAction(a.action, a.ts, a.value) for a in acts]
    return Example(f.request_id, f.user_id, f.item_id, f.ts, label_ts, label, actions, weight, f.position,
                   f.score, f.model_version, f.sparse, f.dense, received_at)

