"""The join decision of one bucket: match, wait, spill, expire, sample (CONTRACT.md, Joining).

`JoinBucket` keeps the join keys of one bucket in a write-back cache over a `SpillStore` (LMDB),
flushed in one transaction per epoch (or sooner when the cache is full), and decides each key's
one outcome by the bucket's watermark. Plain logic: no Bytewax, testable alone.

This module is the join's hot loop: setup.py compiles it with Cython (pure-Python mode: the
`cython` annotations type it, and the same source runs as plain Python when it is not compiled).
`COMPILED` says which one was imported.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional

import cython
import msgspec

from flows.clock import join_key
from flows.compiled import check_built_from
from flows.events import (
    NEGATIVE_ACTIONS,
    POSITIVE_ACTIONS,
    ActionEvent,
    DeadLetter,
    Dense,
    Example,
    ExampleAction,
    Sparse,
    encode,
)
from flows.spill import SpillStore
from flows.untrack import untrack_sparse

Key = str  # request_id + "\x00" + item_id (flows.clock.join_key)
COMPILED: bool = cython.compiled
_BUILT_FROM: Optional[str] = None  # when compiled: the sha256 of the source it was compiled from (setup.py)


def _check_built_from_source() -> None:
    """A compiled module built from another version of this file must not run in its place."""
    check_built_from(__file__, "joiner.py", _BUILT_FROM)


if COMPILED:
    _check_built_from_source()
if cython.compiled:
    from cython.cimports.cpython.ref import Py_DECREF, Py_INCREF
    from cython.cimports.flows._capi import freshrec_prefetch
    from cython.cimports.libc.stdlib import calloc, free


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


@cython.final
@cython.no_gc  # it holds events and a list of them, never itself: no cycle to collect
@cython.freelist(256)
@cython.cclass
class _Entry:
    """A join key's state: an impression waiting for its label (`example` set: its training
    example, made when the impression came, waiting for its label) with the neutral actions seen
    so far, or actions whose impression has not come yet (`example` None; orphans when the
    watermark passes `due`). `actions` is None until there is one: most impressions get their
    label from their first action, so most never need a list. An entry that has left the cache
    (its key resolved, its held actions now an impression's, or spilled) has both None, and
    leaves its FIFO slot None (`JoinBucket._unlink`: an entry knows its `lane` and `slot`).
    Before, the FIFO kept every entry until its due: about 120 bytes an impression (the entry
    and its key) held for the whole join window once it was resolved."""

    key = cython.declare(object)
    example = cython.declare(object)
    actions = cython.declare(object)
    due = cython.declare(cython.double)
    lane = cython.declare(cython.Py_ssize_t)  # the number of its FIFO's `_Lane`, or -1: in none
    slot = cython.declare(cython.Py_ssize_t)  # its place in that FIFO, counted from the lane's first entry ever


@cython.final
@cython.cclass
class _Lane:
    """Entries not flushed yet that came in due order from one source partition: a FIFO, read
    from `head` (O(1), no allocation). An entry that leaves the cache before its due leaves its
    slot None. `base` counts the entries ever removed from the front of `fifo`."""

    fifo = cython.declare(list)
    head = cython.declare(cython.Py_ssize_t)
    base = cython.declare(cython.Py_ssize_t)
    last_due = cython.declare(cython.double)  # the due of the last entry appended
    no = cython.declare(cython.Py_ssize_t)  # its number in `JoinBucket._lane_list`

    def __init__(self, no: cython.Py_ssize_t) -> None:
        self.fifo = []
        self.head = 0
        self.base = 0
        self.last_due = -math.inf
        self.no = no

    @cython.cfunc
    @cython.inline
    def append(self, e: _Entry) -> cython.void:
        e.lane = self.no
        e.slot = self.base + len(self.fifo)
        self.fifo.append(e)
        self.last_due = e.due

    @cython.cfunc
    @cython.inline
    def takes(self, due: cython.double) -> cython.bint:
        """Whether an entry due at `due` keeps the FIFO in due order."""
        return due >= self.last_due or len(self.fifo) == self.head

    @cython.cfunc
    def clear(self) -> cython.void:
        self.base += len(self.fifo)
        self.fifo.clear()
        self.head = 0


@cython.cfunc
@cython.inline
def _entry(key: object, example: object, actions: object, due: cython.double) -> _Entry:
    e: _Entry = _Entry.__new__(_Entry)  # no __init__: a freelist slot filled in place when compiled
    e.key = key
    e.example = example
    e.actions = actions
    e.due = due
    e.lane = -1
    return e


@cython.cfunc
@cython.inline
def _prepare(t: tuple) -> object:
    """The training example of an impression (`t`, its fields as `_astuple` gives them), all but
    its label: label 0, weight 1, no actions yet (`_label` fills them when the label is decided).
    Made when the impression comes, in arrival order and while its fields are still in the CPU's
    cache from parsing; a label seconds later then touches this one object, not the impression's
    nine scattered fields (the joiner's largest cost when it copied them at label time: a cache
    miss per field). Its `sparse` is left as it is: the parser took it out of the cyclic
    collector's sight (flows.untrack) while it was at hand; here it would be a cache miss."""
    # Positional, in Example's field order.
    return Example(t[0], t[1], t[2], t[3], 0.0, 0, None, 1.0, t[4], t[8], t[7], t[5], t[6], None)


# The store's record of an entry (its format): a msgpack array, the impression's fields (those
# its example keeps) in line, where a nested map-encoded FeatureEvent cost twice the encoding time
# and a third more bytes. `request_id` None: held actions only, no impression yet.
class _Record(msgspec.Struct, array_like=True, gc=False):
    due: float
    actions: Optional[list[ActionEvent]] = None
    request_id: Optional[str] = None
    user_id: str = ""
    item_id: str = ""
    ts: float = 0.0
    position: Optional[int] = None
    score: Optional[float] = None
    model_version: Optional[str] = None
    sparse: Sparse = {}
    dense: Dense = {}


# An event's fields in one call, as a tuple: its tight loop over them lets the CPU fetch the cold
# ones at once, where an attribute read per field waits for each in turn (each first touch of a
# field is a cache miss when the event was parsed long before: the joiner's largest cost).
_astuple = msgspec.structs.astuple
_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE = msgspec.msgpack.Decoder(_Record).decode


@cython.cfunc
def _record(e: _Entry) -> tuple:
    """What the store holds for `e`: (due, payload), as `SpillStore.flush` takes it."""
    x = e.example
    if x is None:
        return e.due, _ENCODE(_Record(e.due, e.actions))
    # `_Record`'s array, from the example's fields in one call (an attribute read each, through
    # Cython's generic lookup, cost more than the encoding): the same bytes as encoding the struct.
    t: tuple = _astuple(x)
    return e.due, _ENCODE((e.due, e.actions, t[0], t[1], t[2], t[3], t[8], t[9], t[10], t[11], t[12]))


@cython.cfunc
def _load(key: object, b: bytes) -> _Entry:
    r = _DECODE(b)
    if r.request_id is None:
        return _entry(key, None, r.actions, r.due)
    # As `_prepare` makes it, and `sparse` as the parser leaves it.
    untrack_sparse(r.sparse)
    return _entry(key, Example(r.request_id, r.user_id, r.item_id, r.ts, 0.0, 0, None, 1.0, r.position, r.score,
                               r.model_version, r.sparse, r.dense, None), r.actions, r.due)


def positive_rule(watch_positive_s: Optional[float]) -> Callable[[ActionEvent], bool]:
    """Whether an action is positive (CONTRACT.md): the positive actions, and `watch` of at least
    `watch_positive_s` when that is set. The joiner and the catalog count by the same rule."""

    def is_positive(a: ActionEvent) -> bool:
        if a.action in POSITIVE_ACTIONS:
            return True
        return watch_positive_s is not None and a.action == "watch" and (a.value or 0.0) >= watch_positive_s

    return is_positive


# FNV-1a (64-bit) and murmur3's 64-bit finalizer, as C constants when compiled.
_FNV_OFFSET = cython.declare(cython.ulonglong, 0xCBF29CE484222325)
_FNV_PRIME = cython.declare(cython.ulonglong, 0x100000001B3)
_MIX1 = cython.declare(cython.ulonglong, 0xFF51AFD7ED558CCD)
_MIX2 = cython.declare(cython.ulonglong, 0xC4CEB9FE1A85EC53)
_MASK64 = (1 << 64) - 1


@cython.ccall
@cython.locals(h=cython.ulonglong, ch=cython.Py_UCS4)
def keep_fraction(key: str) -> cython.double:
    """A uniform number in [0, 1) fixed by the join key: the same in every process and run, and
    compiled or not. FNV-1a over the key's code points, then murmur3's finalizer (so that keys
    differing in their last characters spread over [0, 1)); its top 53 bits make the fraction.
    A negative that expires pays for this once (blake2b, as before, cost 0.8 us a key through
    hashlib: half the expiry of a sampled negative; this is about 0.05 us compiled)."""
    if cython.compiled:
        h = _FNV_OFFSET
        for ch in key:
            h = (h ^ ord(ch)) * _FNV_PRIME
        h ^= h >> 33
        h *= _MIX1
        h ^= h >> 33
        h *= _MIX2
        h ^= h >> 33
        return cython.cast(cython.double, h >> 11) * (1.0 / 9007199254740992.0)
    else:
        g = _FNV_OFFSET
        for c in key:
            g = ((g ^ ord(c)) * _FNV_PRIME) & _MASK64
        g ^= g >> 33
        g = (g * _MIX1) & _MASK64
        g ^= g >> 33
        g = (g * _MIX2) & _MASK64
        g ^= g >> 33
        return (g >> 11) / 9007199254740992.0


def in_key_sample(key: Key, rate: float) -> bool:
    """Whether `key` is in the sample of join keys at `rate` (all of them at 1): those whose expiry
    makes a kept negative. Progressive validation takes this sample, or one at a lower rate (a
    subset: `keep_fraction` below the lower rate is below the higher), where the model server
    logged no score (flows/trainer_step.py), so it scores on arrival no impression whose expiry
    would be sampled out."""
    return rate >= 1.0 or keep_fraction(key) < rate


def _action_id(a: ActionEvent) -> object:
    return a.event_id if a.event_id is not None else (a.action, a.ts, a.value)


_HASHED = object()  # the one key of a `_hashed_dict` that is not a str (never a join key)


def _hashed_dict() -> dict:
    """An empty dict (but for one key, `_HASHED`) that keeps each key's hash beside it.

    CPython (3.11, 3.12) keeps a dict whose keys are all str without their hashes, so each probe
    of a used slot reads the key object to compare hashes: in a large dict of old keys, a cache
    miss per probe (a fifth of the join's time in a profile). One key that is not a str switches
    the dict to a table that holds the hashes, for good (until `clear()`): a probe then reads a
    key object only when the hashes match. Its length is one more than its join keys.
    """
    return {_HASHED: None}


_Slot = cython.struct(h=cython.ulonglong, key=cython.p_void, ids=cython.p_void)
_RESOLVED_MIN = 1024
AHEAD = cython.declare(cython.Py_ssize_t, 8)  # events ahead whose resolved-key slot the loops fetch


@cython.cfunc
@cython.inline
def _hash64(key: object) -> cython.ulonglong:
    """`key`'s hash (a str keeps it) as 64 unsigned bits, never 0 (an empty slot)."""
    h: cython.ulonglong = cython.cast(cython.ulonglong, cython.cast(cython.longlong, hash(key)))
    return h if h != 0 else 1


@cython.final
@cython.cclass
class _ResolvedKeys:
    """Resolved join keys -> the ids of the actions that decided them (`_action_id`s: one, or a
    tuple). An open-addressing table of 24-byte slots (the key's hash, the key, its ids; linear
    probing, deletes by backward shift), so that the loops can fetch the slot of a key `AHEAD`
    events before they need it (`prefetch`): in a dict at a few hundred thousand keys a bucket,
    each label's insert and each impression's probe waited for main memory. A slot holds its key,
    compared when the hashes match: the table is exact. Uncompiled, a dict (and no prefetch)."""

    _slots = cython.declare(cython.pointer(_Slot))
    _mask = cython.declare(cython.Py_ssize_t)
    _n = cython.declare(cython.Py_ssize_t)
    _dict = cython.declare(dict)

    def __cinit__(self) -> None:
        self._n = 0
        if cython.compiled:
            self._slots = cython.cast(cython.pointer(_Slot), calloc(_RESOLVED_MIN, cython.sizeof(_Slot)))
            if not self._slots:
                raise MemoryError()
            self._mask = _RESOLVED_MIN - 1

    def __init__(self) -> None:
        if not cython.compiled:  # plain Python calls no `__cinit__`
            self._n = 0
            self._dict = {}

    def __dealloc__(self) -> None:
        i: cython.Py_ssize_t
        if cython.compiled and self._slots:
            for i in range(self._mask + 1):
                if self._slots[i].h != 0:
                    Py_DECREF(cython.cast(object, self._slots[i].key))
                    Py_DECREF(cython.cast(object, self._slots[i].ids))
            free(self._slots)
            self._slots = cython.NULL

    def __len__(self) -> int:
        return self._n if cython.compiled else len(self._dict)

    @cython.cfunc
    @cython.inline
    def _find(self, key: object, h: cython.ulonglong) -> cython.Py_ssize_t:
        """The slot that holds `key` (hash `h`), or the empty slot where it would go."""
        i: cython.Py_ssize_t = cython.cast(cython.Py_ssize_t, h & self._mask)
        s: cython.pointer(_Slot)
        while True:
            s = cython.address(self._slots[i])
            if s.h == 0:
                return i
            if s.h == h and (s.key == cython.cast(cython.p_void, key) or cython.cast(object, s.key) == key):
                return i
            i = (i + 1) & self._mask

    @cython.cfunc
    @cython.inline
    def prefetch(self, keys: list, i: cython.Py_ssize_t) -> cython.void:
        """Fetch the slot of `keys[i]` (if there is one) into the CPU's cache, ahead of its use."""
        if cython.compiled:
            if i < len(keys):
                freshrec_prefetch(cython.address(self._slots[_hash64(keys[i]) & self._mask]))

    @cython.ccall
    def has(self, key: object) -> cython.bint:
        return self.get(key) is not None  # ids are never None

    @cython.ccall
    def get(self, key: object) -> object:
        """The ids of `key`, or None if it is not resolved (or was forgotten)."""
        if not cython.compiled:
            return self._dict.get(key)
        if self._n == 0:
            return None
        s: cython.pointer(_Slot) = cython.address(self._slots[self._find(key, _hash64(key))])
        if s.h == 0:
            return None
        return cython.cast(object, s.ids)

    @cython.ccall
    def put(self, key: object, ids: object) -> cython.void:
        if not cython.compiled:
            self._dict[key] = ids
            return
        h: cython.ulonglong = _hash64(key)
        s: cython.pointer(_Slot) = cython.address(self._slots[self._find(key, h)])
        Py_INCREF(ids)
        if s.h != 0:
            Py_DECREF(cython.cast(object, s.ids))
            s.ids = cython.cast(cython.p_void, ids)
            return
        Py_INCREF(key)
        s.h = h
        s.key = cython.cast(cython.p_void, key)
        s.ids = cython.cast(cython.p_void, ids)
        self._n += 1
        if self._n * 10 > (self._mask + 1) * 7:
            self._resize((self._mask + 1) * 2)

    @cython.ccall
    def pop(self, key: object) -> cython.void:
        if not cython.compiled:
            self._dict.pop(key, None)
            return
        if self._n == 0:
            return
        slots: cython.pointer(_Slot) = self._slots
        mask: cython.Py_ssize_t = self._mask
        i: cython.Py_ssize_t = self._find(key, _hash64(key))
        j: cython.Py_ssize_t = i
        home: cython.Py_ssize_t
        if slots[i].h == 0:
            return
        Py_DECREF(cython.cast(object, slots[i].key))
        Py_DECREF(cython.cast(object, slots[i].ids))
        # Backward shift: move up each later slot of the run whose home is not in (i, j].
        while True:
            j = (j + 1) & mask
            if slots[j].h == 0:
                break
            home = cython.cast(cython.Py_ssize_t, slots[j].h & mask)
            if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                slots[i] = slots[j]
                i = j
        slots[i].h = 0
        slots[i].key = cython.NULL
        slots[i].ids = cython.NULL
        self._n -= 1

    @cython.cfunc
    def _resize(self, capacity: cython.Py_ssize_t) -> cython.void:
        old: cython.pointer(_Slot) = self._slots
        old_capacity: cython.Py_ssize_t = self._mask + 1
        new: cython.pointer(_Slot) = cython.cast(cython.pointer(_Slot), calloc(capacity, cython.sizeof(_Slot)))
        if not new:
            raise MemoryError()
        mask: cython.Py_ssize_t = capacity - 1
        s: cython.Py_ssize_t
        i: cython.Py_ssize_t
        for s in range(old_capacity):
            if old[s].h != 0:
                i = cython.cast(cython.Py_ssize_t, old[s].h & mask)
                while new[i].h != 0:
                    i = (i + 1) & mask
                new[i] = old[s]  # the references move with their slot
        self._slots = new
        self._mask = mask
        free(old)


_ORDER_COMPACT = 1 << 16  # forgotten slots at the front of the resolved-order list before it is compacted


@cython.cclass
class JoinBucket:
    """The join state and decisions of one bucket.

    Events go in through `on_features` / `on_actions` (in arrival order) and the watermark through
    `advance`; examples and dead letters come out. `flush(tag)` writes what changed to the store
    in one transaction; `resume(tag)` rolls the store back to a flush and starts from it.
    `behind` counts the events that came behind the watermark (the caller reads and resets it).
    """

    s = cython.declare(object, visibility="public")
    store = cython.declare(object, visibility="public")
    counts = cython.declare(object, visibility="public")
    watermark = cython.declare(cython.double, visibility="public")
    behind = cython.declare(cython.Py_ssize_t, visibility="public")
    _cache = cython.declare(dict)
    _on_disk = cython.declare(set)
    _taken = cython.declare(set)
    _dirty = cython.declare(set)
    _heap = cython.declare(list)
    _lanes = cython.declare(dict)
    _lane_list = cython.declare(list)
    _lane = cython.declare(_Lane)
    _scan_from = cython.declare(object)
    _resolved = cython.declare(_ResolvedKeys)
    _order = cython.declare(list)
    _order_head = cython.declare(cython.Py_ssize_t)
    _stored = cython.declare(cython.Py_ssize_t)
    _tag = cython.declare(object)
    _is_positive = cython.declare(object)
    _positive = cython.declare(frozenset)
    _negative = cython.declare(frozenset)

    def __init__(self, settings: JoinSettings, store: SpillStore):
        self.s = settings
        self.store = store
        self.counts = JoinCounts()
        self.watermark = -math.inf
        self.behind = 0
        self._cache = _hashed_dict()  # key -> _Entry; None: deleted, not yet flushed (and `_HASHED`)
        self._on_disk = set()  # keys of cached entries that the store holds too
        # Keys whose entries were read back from the store (`_prefetch`): the store still holds their
        # records, which the next write (`flush` or `spill`) deletes. A taken entry is the cache's
        # as a new one is (not on disk: a label drops it with one dict delete, and the write puts it
        # again if it is still waiting). Before, it was kept on disk, and its key left the cache
        # as a None placeholder held until the next write: in a spilling run 45% of the cache's
        # bound went to such placeholders, and each cost three more set and dict operations.
        self._taken = set()
        # Keys in `_on_disk` whose entry changed since the last flush. A cached entry not on disk is
        # unflushed by definition, so it needs no mark: that spares a set insert and a removal per
        # impression that lives and dies between two flushes.
        self._dirty = set()
        # Entries not flushed yet, by due. Each source partition's input comes nearly in ts order,
        # so most dues come in order too: those go to the FIFO of their partition (`_Lane`), the
        # rest to a heap of (due, key); expiry drains both. A FIFO entry whose key has since been
        # resolved or replaced is no longer the cache's, and is skipped. (With one FIFO for all,
        # two partitions read in turn sent about half of the entries to the heap: 5% of a flow.)
        self._heap = []
        self._lanes = {}
        self._lane_list = []
        self._lane = self._lane_of(None)
        self._scan_from = None  # store's due index read up to here
        # key -> ids of its actions (one action's event_id alone, else a tuple of ids), and the
        # keys in the order they were resolved (read from `_order_head`) so that the oldest is
        # forgotten first. A key is resolved again only after it was forgotten, so it is listed once.
        self._resolved = _ResolvedKeys()
        self._order = []
        self._order_head = 0
        self._stored = len(store)
        self._tag = store.last_tag()
        self._is_positive = positive_rule(settings.watch_positive_s)
        self._positive = POSITIVE_ACTIONS
        self._negative = NEGATIVE_ACTIONS

    # -- state access: cache first, then the store -------------------------------------------

    def _prefetch(self, keys: Iterable[Key]) -> None:
        """Bring the stored entries of `keys` into the cache with one read transaction."""
        if not self._stored:
            return
        cache = self._cache
        resolved: _ResolvedKeys = self._resolved
        if type(keys) is not list:
            keys = list(keys)
        # The store's index (in memory) first: most keys of a batch are not stored (all but a few
        # of a batch of impressions), and it answers each without the two dict probes, which
        # read a key cold when it is found (7% of a spilling run's time).
        taken: set = self._taken
        missing = []
        for i in self.store.held(keys):
            k = keys[i]
            # Not read again once taken: its entry is in the cache, or resolved, or (its resolved
            # key forgotten since) its record is stale, and goes at the next write.
            if k not in cache and k not in taken and not resolved.has(k):
                missing.append(k)
        if not missing:
            return
        missing = list(dict.fromkeys(missing))
        got = self.store.get_many(missing)
        self.counts.spill_reads += len(missing)
        for k, v in zip(missing, got, strict=True):
            if v is not None:
                cache[k] = _load(k, v[1])
                taken.add(k)

    @cython.cfunc
    def _put(self, e: _Entry) -> cython.void:
        """A new entry for its key: cached, and queued by its due."""
        key = e.key
        self._cache[key] = e
        if self._on_disk and key in self._on_disk:
            self._dirty.add(key)
        if self._lane.takes(e.due):
            self._lane.append(e)
        else:
            heapq.heappush(self._heap, (e.due, key))

    @cython.cfunc
    @cython.inline
    def _unlink(self, e: _Entry) -> cython.void:
        """`e` leaves the cache before its due: its FIFO slot lets go of it, so it is freed now,
        while it is in the CPU's cache (its memory then made the next entry), and expiry passes a
        None by instead of reading it cold when it is due."""
        if e.lane < 0:
            return
        ln: _Lane = self._lane_list[e.lane]
        i: cython.Py_ssize_t = e.slot - ln.base
        e.lane = -1
        if ln.head <= i < len(ln.fifo) and ln.fifo[i] is e:
            ln.fifo[i] = None

    @cython.cfunc
    def _drop(self, key: object) -> cython.void:
        if self._on_disk and key in self._on_disk:
            self._cache[key] = None
            self._dirty.add(key)
        else:
            self._cache.pop(key, None)

    @cython.cfunc
    def _mark(self, key: object) -> cython.void:
        """The entry of `key` changed in place: flush it if the store holds it."""
        if self._on_disk and key in self._on_disk:
            self._dirty.add(key)

    # -- events ------------------------------------------------------------------------------

    @cython.cfunc
    def _batch_keys(self, events: list, keys: object) -> list:
        """The join keys of a batch (made here when the caller has none; route makes them to hash
        the events to their bucket), with the batch's stored entries brought into the cache."""
        if keys is None:
            keys = [join_key(x.request_id, x.item_id) for x in events]
        elif len(keys) != len(events):
            raise ValueError(f"{len(events)} events but {len(keys)} keys")
        if self._stored:
            self._prefetch(keys)
        return keys

    @cython.cfunc
    def _clear_lanes(self) -> cython.void:
        lane: _Lane
        for lane in self._lane_list:
            lane.clear()

    @cython.cfunc
    def _lane_of(self, partition: object) -> _Lane:
        ln = self._lanes.get(partition)
        if ln is None:
            ln = self._lanes[partition] = _Lane(len(self._lane_list))
            self._lane_list.append(ln)
        return ln

    def on_features(self, events: list, keys: Optional[list] = None, partition: Optional[str] = None) -> list:
        """A batch of feature events in arrival order; `keys` are their join keys if known,
        `partition` the source partition they come from (each keeps its own FIFO of dues)."""
        keys = self._batch_keys(events, keys)
        out: list = []
        cache: dict = self._cache
        resolved: _ResolvedKeys = self._resolved
        lane: _Lane = self._lane_of(partition)
        self._lane = lane
        window: cython.double = self.s.window_s
        watermark: cython.double = self.watermark
        due: cython.double
        i: cython.Py_ssize_t
        n: cython.Py_ssize_t = len(events)
        hits: cython.Py_ssize_t = 0
        misses: cython.Py_ssize_t = 0
        duplicates: cython.Py_ssize_t = 0
        behind: cython.Py_ssize_t = 0
        e: _Entry
        for i in range(n):
            resolved.prefetch(keys, i + AHEAD)
            key = keys[i]
            f: tuple = _astuple(events[i])
            ts: cython.double = f[3]
            if ts < watermark:
                behind += 1
            entry = cache.get(key)
            if entry is None:
                if resolved.has(key):
                    duplicates += 1
                    continue
                misses += 1
                due = ts + window
                e = _entry(key, _prepare(f), None, due)
                cache[key] = e  # not cached, so not on disk: unflushed, no dirty mark
                if lane.takes(due):
                    lane.append(e)
                else:
                    heapq.heappush(self._heap, (due, key))
                if due <= watermark:
                    self._expire(e, out, None)  # came after its window closed
                continue
            hits += 1
            e = entry  # a typed assignment: checked when compiled, free when not
            if e.example is not None:
                duplicates += 1
                continue
            # Its actions came first: replay them in arrival order now that the impression is here.
            self.counts.impressions += 1
            pending = e.actions
            e.actions = None  # no longer the cache's (see `_Entry`)
            self.counts.actions_pending -= len(pending)
            w = _entry(key, _prepare(f), None, ts + window)
            self._unlink(e)
            self._put(w)
            decided = False
            for j, a in enumerate(pending):
                ex = self._apply(w, a)
                if ex is not None:
                    out.append(ex)
                    # Actions that came after the deciding one find their key resolved.
                    self.counts.after_example += len(pending) - j - 1
                    decided = True
                    break
            if not decided and w.due <= watermark:
                self._expire(w, out, None)
        counts = self.counts
        counts.cache_hits += hits
        counts.cache_misses += misses
        counts.impressions += misses
        counts.duplicate_features += duplicates
        self.behind += behind
        return out

    def on_actions(self, events: list, keys: Optional[list] = None, partition: Optional[str] = None) -> list:
        """A batch of action events in arrival order; `keys` and `partition` as in `on_features`."""
        keys = self._batch_keys(events, keys)
        self._lane = self._lane_of(partition)
        out: list = []
        cache: dict = self._cache
        resolved: _ResolvedKeys = self._resolved
        on_disk: set = self._on_disk
        positive: frozenset = self._positive
        negative: frozenset = self._negative
        order: list = self._order
        hold: cython.double = self.s.orphan_hold_s
        watermark: cython.double = self.watermark
        resolved_size: cython.Py_ssize_t = self.s.resolved_size
        watch_s = self.s.watch_positive_s
        i: cython.Py_ssize_t
        n: cython.Py_ssize_t = len(events)
        hits: cython.Py_ssize_t = 0
        misses: cython.Py_ssize_t = 0
        duplicates: cython.Py_ssize_t = 0
        after: cython.Py_ssize_t = 0
        late: cython.Py_ssize_t = 0
        pending_n: cython.Py_ssize_t = 0
        joined: cython.Py_ssize_t = 0
        positives: cython.Py_ssize_t = 0
        negatives: cython.Py_ssize_t = 0
        behind: cython.Py_ssize_t = 0
        positive_label: cython.bint
        e: _Entry
        for i in range(n):
            resolved.prefetch(keys, i + AHEAD)
            key = keys[i]
            a = events[i]
            t: tuple = _astuple(a)  # (request_id, user_id, item_id, ts, action, value, event_id, received_at)
            a_ts = t[3]
            ts: cython.double = a_ts
            if ts < watermark:
                behind += 1
            entry = cache.get(key)
            if entry is None:
                ids = resolved.get(key)
                if ids is not None:
                    if _seen(ids, a):
                        duplicates += 1
                    else:
                        after += 1
                    continue
                misses += 1
                if ts + hold <= watermark:
                    late += 1  # its impression, if any, was resolved and forgotten
                    continue
                pending_n += 1
                self._put(_entry(key, None, [a], ts + hold))
                continue
            hits += 1
            e = entry
            actions = e.actions
            if actions is not None and _seen(tuple(map(_action_id, actions)), a):
                duplicates += 1
                continue
            if e.example is None:
                pending_n += 1
                actions.append(a)
                if on_disk and key in on_disk:
                    self._dirty.add(key)
                continue
            # `_apply` and `_resolve`, inlined for the common case.
            joined += 1
            action = t[4]
            if action in positive or (watch_s is not None and action == "watch" and (t[5] or 0.0) >= watch_s):
                positives += 1
                positive_label = True
            elif action in negative:
                negatives += 1
                positive_label = False
            else:
                if actions is None:
                    e.actions = [a]
                else:
                    actions.append(a)
                if on_disk and key in on_disk:
                    self._dirty.add(key)  # a neutral action waits with its impression
                continue
            if on_disk and key in on_disk:
                cache[key] = None
                self._dirty.add(key)
            else:
                del cache[key]
            if actions is None:
                eid = t[6]
                value = t[5]
                resolved.put(key, eid if eid is not None else ((action, a_ts, value),))
                ex_actions = [ExampleAction(action, a_ts, value)]
            else:
                actions.append(a)
                resolved.put(key, tuple(map(_action_id, actions)))
                ex_actions = [ExampleAction(b.action, b.ts, b.value) for b in actions]
            order.append(key)
            if len(resolved) > resolved_size:
                self._forget(resolved_size)
            ex = e.example
            e.example = None  # no longer the cache's, see `_label`
            e.actions = None
            self._unlink(e)
            if positive_label:
                ex.label = 1  # prepared as 0
            ex.label_ts = a_ts
            ex.actions = ex_actions
            ex.label_received_at = t[7]
            out.append(ex)
        counts = self.counts
        counts.cache_hits += hits
        counts.cache_misses += misses
        counts.duplicates += duplicates
        counts.after_example += after
        counts.late += late
        counts.actions_pending += pending_n
        counts.actions_joined += joined
        counts.positives += positives
        counts.explicit_negatives += negatives
        self.behind += behind
        return out

    @cython.cfunc
    def _forget(self, keep: cython.Py_ssize_t) -> cython.void:
        """Forget the oldest resolved keys until `keep` remain; their late actions count as late."""
        resolved: _ResolvedKeys = self._resolved
        order = self._order
        while len(resolved) > keep and self._order_head < len(order):
            resolved.pop(order[self._order_head])
            order[self._order_head] = None
            self._order_head += 1
        if self._order_head >= _ORDER_COMPACT and self._order_head * 2 >= len(order):
            del order[:self._order_head]
            self._order_head = 0

    @cython.cfunc
    def _apply(self, w: _Entry, a: object) -> object:
        """One more action for a waiting impression; an example if it decides the label."""
        self.counts.actions_joined += 1
        if w.actions is None:
            w.actions = [a]
        else:
            w.actions.append(a)
        if self._is_positive(a):
            self.counts.positives += 1
            self._resolve(w)
            return _label(w, 1, a.ts, 1.0, a.received_at)
        if a.action in self._negative:
            self.counts.explicit_negatives += 1
            self._resolve(w)
            return _label(w, 0, a.ts, 1.0, a.received_at)
        self._mark(w.key)  # a neutral action waits with its impression
        return None

    @cython.cfunc
    def _resolve(self, w: _Entry) -> cython.void:
        """The key of `w` has its outcome: its state goes, and the key is remembered as resolved."""
        key = w.key
        self._drop(key)
        self._unlink(w)
        resolved: _ResolvedKeys = self._resolved
        resolved.put(key, tuple(map(_action_id, w.actions)) if w.actions is not None else ())
        self._order.append(key)
        if len(resolved) > self.s.resolved_size:
            self._forget(self.s.resolved_size)

    # -- the clock ---------------------------------------------------------------------------

    def advance(self, watermark: float) -> tuple:
        """Move the watermark; expire impressions and release orphans that are now due.

        Called after every batch, even when the watermark stands still: a late impression may
        already be due, and nothing due may be left unflushed behind the store's index scan.
        """
        if watermark > self.watermark:
            self.watermark = watermark
        wm: cython.double = self.watermark
        examples: list = []
        dead: list = []
        heap: list = self._heap
        cache: dict = self._cache
        head: cython.Py_ssize_t
        n: cython.Py_ssize_t
        e: _Entry
        lane: _Lane
        for lane in self._lane_list:
            fifo: list = lane.fifo
            head = lane.head
            n = len(fifo)
            # Every impression passes its FIFO once: most left it when they were resolved (None),
            # the rest are read when due. A look in the cache would read its key, not touched since
            # it came (a cache miss per impression).
            while head < n:
                x = fifo[head]
                if x is None:
                    head += 1
                    continue
                e = x
                if e.due > wm:
                    break
                head += 1
                if e.example is not None or e.actions is not None:
                    self._expire(e, examples, dead)
            if head == n:
                lane.clear()
                head = 0
            elif head >= 4096 and head * 2 >= n:
                del fifo[:head]
                lane.base += head
                head = 0
            lane.head = head
        while heap and heap[0][0] <= wm:
            due, key = heapq.heappop(heap)
            entry = cache.get(key)
            if entry is not None and cython.cast(_Entry, entry).due == due:
                self._expire(cython.cast(_Entry, entry), examples, dead)
        if self._stored:
            while True:
                due_keys = self.store.due(wm, self._scan_from)
                if not due_keys:
                    break
                self._scan_from = due_keys[-1]
                keys = [k for _, k in due_keys]
                self._prefetch(keys)
                for (due, _), key in zip(due_keys, keys, strict=True):
                    entry = cache.get(key)
                    if entry is not None and cython.cast(_Entry, entry).due == due:
                        self._expire(cython.cast(_Entry, entry), examples, dead)
        return examples, dead

    @cython.cfunc
    def _expire(self, e: _Entry, examples: list, dead: Optional[list]) -> cython.void:
        if e.example is None:
            self._drop(e.key)
            n = len(e.actions)
            self.counts.actions_pending -= n
            self.counts.orphans += n
            for a in e.actions:
                dead.append(DeadLetter(
                    "actions", f"orphan: no feature event for this (request_id, item_id) by "
                               f"watermark {self.watermark:.3f} (action ts + {self.s.orphan_hold_s:g} s hold)",
                    encode(a).decode(), None, False, a.received_at or 0.0))
            e.actions = None  # no longer the cache's (see `_Entry`)
            return
        rate = self.s.neg_sample_rate
        self._resolve(e)
        if in_key_sample(e.key, rate):
            self.counts.expired_kept += 1
            examples.append(_label(e, 0, e.due, 1.0 / rate, None))
        else:
            self.counts.sampled_out += 1
            e.example = None  # no longer the cache's (see `_Entry`)
            e.actions = None

    # -- persistence -------------------------------------------------------------------------

    def over_capacity(self) -> bool:
        # Taken keys count: the memory of a key held until its record is deleted.
        return len(self._cache) - 1 + len(self._taken) > self.s.cache_size  # less `_HASHED`

    def flush(self, tag: int, durable: bool = True) -> int:
        """Write what changed since the last flush in one transaction tagged `tag`; returns writes.
        `durable=False` for a flush under memory pressure (see `SpillStore.flush`)."""
        # The records of taken entries go; an entry still waiting is written again below.
        writes: dict = dict.fromkeys(self._taken)
        self._taken.clear()
        cache = self._cache
        on_disk = self._on_disk
        for key in self._dirty:  # all on disk
            entry = cache.get(key)
            if entry is None:
                writes[key] = None
                on_disk.discard(key)
                cache.pop(key, None)
            else:
                writes[key] = _record(entry)
        # Entries never flushed (a None entry is always on disk).
        new = [key for key in cache if key not in on_disk and key is not _HASHED]
        for key in new:
            entry = cache[key]
            writes[key] = _record(entry)
        on_disk.update(new)
        if writes or tag > self._tag:
            self.store.flush(tag, writes, durable=durable)
            self._tag = tag
        self._dirty.clear()
        self._heap.clear()  # everything unflushed is now in the store's due index
        self._clear_lanes()
        self.counts.spill_writes += len(writes)
        self.counts.flushes += 1
        self._stored = len(self.store)
        return len(writes)

    def spill(self, tag: int, keep: int) -> int:
        """Under memory pressure: the oldest cached entries beyond `keep` leave memory, each one
        the store does not hold as it is written first, in one transaction tagged `tag` (not
        durable, as `flush(durable=False)`). Newer entries stay as they are, unwritten if they
        were: a label that comes while its impression is in memory then costs no write (`flush`
        wrote every entry; under pressure at every batch, nearly every impression went to disk
        and back). The records of entries taken back since the last write are deleted in the same
        transaction. Returns the writes."""
        cache = self._cache
        on_disk = self._on_disk
        dirty = self._dirty
        taken: set = self._taken
        over: cython.Py_ssize_t = len(cache) - 1 - keep  # less `_HASHED`
        if over <= 0 and not taken:
            return 0
        # The records of taken entries go (the keys count against the bound until then); one of
        # those leaving below is written again.
        writes: dict = dict.fromkeys(taken) if taken else {}
        leaving: list = []
        any_on_disk: cython.bint = len(on_disk) > 0  # else no key below is on disk, or dirty
        for key, entry in cache.items():  # oldest first
            if over <= 0:
                break
            if key is _HASHED:
                continue
            over -= 1
            leaving.append(key)
            if entry is None:  # resolved, its record still stored
                writes[key] = None
            elif not any_on_disk or key not in on_disk or key in dirty:
                writes[key] = _record(entry)
        e: _Entry
        if taken:
            # A taken entry that stays in memory loses its record, which the store's due index
            # found it by: it waits on the heap.
            for key in taken:
                if writes[key] is None:
                    entry = cache.get(key)
                    if entry is not None:
                        e = entry
                        heapq.heappush(self._heap, (e.due, key))
            taken.clear()
        if writes or tag > self._tag:
            self.store.flush(tag, writes, durable=False)
            self._tag = tag
        for key in leaving:
            entry = cache.pop(key)
            if any_on_disk:
                on_disk.discard(key)
                dirty.discard(key)
            if entry is not None:
                # No longer the cache's (see `_Entry`): the store's due index brings it back
                # when it is due.
                e = entry
                e.example = None
                e.actions = None
                self._unlink(e)
        self.counts.spill_writes += len(writes)
        self.counts.flushes += 1
        self._stored = len(self.store)
        return len(writes)

    def evict(self, keep: int) -> int:
        """Drop clean cached entries, oldest first, until at most `keep` remain."""
        cache = self._cache
        dirty = self._dirty
        on_disk = self._on_disk
        dropped = 0
        for key in list(cache):
            if len(cache) - 1 <= keep:  # less `_HASHED`
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
        self._cache = _hashed_dict()
        self._dirty.clear()
        self._on_disk.clear()
        self._taken.clear()
        self._heap.clear()
        self._clear_lanes()
        self._resolved = _ResolvedKeys()
        self._order.clear()
        self._order_head = 0
        self._scan_from = None
        self._stored = len(self.store)
        self._tag = tag

    def queued(self) -> int:
        """Entries the FIFOs hold (those that left the cache before their due do not stay)."""
        lane: _Lane
        n: cython.Py_ssize_t = 0
        for lane in self._lane_list:
            for x in lane.fifo[lane.head:]:
                if x is not None:
                    n += 1
        return n

    def waiting(self) -> tuple:
        """Join keys waiting (impressions and held actions): in memory, and in the store."""
        return sum(1 for e in self._cache.values() if e is not None), self._stored


@cython.cfunc
def _seen(ids: object, a: object) -> cython.bint:
    """Whether action `a` is among the action ids `ids` (one event_id, or a tuple of ids)."""
    aid = _action_id(a)
    if type(ids) is tuple:
        return aid in ids
    return aid == ids


@cython.cfunc
def _label(w: _Entry, label: cython.int, label_ts: object, weight: cython.double, received_at: object) -> object:
    """The prepared example of `w`, now with its label (what `_prepare` left open)."""
    ex = w.example
    acts = w.actions
    # No longer the cache's (see `_Entry`). The entry may live on in the FIFO until its due (or the
    # next flush): it lets go of what went into the example, which should die downstream.
    w.example = None
    w.actions = None
    if label:
        ex.label = 1
    ex.label_ts = label_ts
    ex.actions = [ExampleAction(a.action, a.ts, a.value) for a in acts] if acts is not None else []
    if weight != 1.0:
        ex.weight = weight
    ex.label_received_at = received_at
    return ex
