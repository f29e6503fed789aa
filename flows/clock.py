"""The flow's clock, carried in band (CONTRACT.md, Time; DESIGN.md, Decisions).

Each source partition stamps its batches with its progress (largest `ts` so far) and status
(active, idle, ended); `route` fans every batch out to all buckets before the key exchange, so a
marker never overtakes the events it summarises; each bucket keeps its own `BucketClock`. Plain
logic: no Bytewax here.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from flows.events import DeadLetter, Event, encode

ACTIVE, IDLE, ENDED = 0, 1, 2
STATUS_NAMES = {ACTIVE: "active", IDLE: "idle", ENDED: "ended"}
NO_TS = -math.inf


@dataclass(slots=True)
class SourceBatch:
    """What one source partition read in one go: its events, dead letters, and its clock."""

    stream: str
    partition: str
    events: list[Event]
    dead: list[DeadLetter]
    progress: float  # the largest ts this partition has read, ever (NO_TS before any)
    status: int
    arrival: float  # wall time of the read


@dataclass(slots=True)
class BucketBatch:
    """The part of a `SourceBatch` for one bucket: maybe no events, always the marker."""

    bucket: str
    partition: str
    events: list[Event]
    progress: float
    status: int
    keys: list[str] | None = None  # the events' join keys, made once by `route` to hash them


class PartitionClock:
    """A source partition's side of the clock: progress, and when it went idle or ended.

    `stamp` is called on every poll, with or without new events; it says whether a batch must be
    emitted even when it is empty (the partition's status changed).
    """

    def __init__(self, idle_s: float, now: float, progress: float = NO_TS):
        self.idle_s = idle_s
        self.progress = progress
        self.status = ACTIVE
        self.last_data = now

    def observe(self, events: Iterable[Event], now: float) -> bool:
        """Take a poll's events into account; True when a marker must go out even with no events."""
        had = False
        for e in events:
            had = True
            if e.ts > self.progress:
                self.progress = e.ts
        if had:
            self.last_data = now
            if self.status != ACTIVE:
                self.status = ACTIVE
                return True
            return False
        if self.status == ACTIVE and now - self.last_data >= self.idle_s:
            self.status = IDLE
            return True
        return False

    def end(self) -> None:
        self.status = ENDED

    def idle_deadline(self) -> float | None:
        """Wall time at which an active partition with no new data turns idle."""
        return self.last_data + self.idle_s if self.status == ACTIVE else None


def stable_hash(data: bytes) -> int:
    """A hash equal in every process (Python's `hash()` is salted per process)."""
    return zlib.crc32(data)


# LmdbSpillStore's limit on a key. Ids are up to 128 characters, so a join key may be 1,025 bytes.
MAX_JOIN_KEY_BYTES = 503
LONG_KEY_MARK = "\x1f#"


def join_key(request_id: str, item_id: str) -> str:
    """The join key: `request_id NUL item_id`, or, when that is too long for the spill store or
    ambiguous (an id holding a NUL), a digest of the two ids that is both."""
    k = f"{request_id}\x00{item_id}"
    if len(k) * 4 > MAX_JOIN_KEY_BYTES or k.count("\x00") != 1:
        kb = k.encode()
        if len(kb) > MAX_JOIN_KEY_BYTES or kb.count(0) != 1:
            return _long_key(request_id, item_id)
    return k


def _long_key(request_id: str, item_id: str) -> str:
    ids = encode([request_id, item_id])  # JSON: unambiguous, whatever the ids hold
    return LONG_KEY_MARK + hashlib.blake2b(ids, digest_size=20).hexdigest()


def bucket_of(request_id: str, item_id: str, buckets: int) -> int:
    """The join bucket of a join key: stable across processes and runs."""
    return zlib.crc32(join_key(request_id, item_id).encode()) % buckets


def bucket_key(bucket: int) -> str:
    return f"b{bucket:04d}"


def route(batch: SourceBatch, buckets: int) -> Iterator[tuple[str, BucketBatch]]:
    """Split a batch's events by join bucket and give every bucket the batch's marker.

    Every bucket gets an item, even without events, so that each bucket sees every partition's
    progress in order with its events.
    """
    parts: list[list[Event]] = [[] for _ in range(buckets)]
    key_parts: list[list[str]] = [[] for _ in range(buckets)]
    crc32 = zlib.crc32
    # The join key is made here once and goes along with its event, so the bucket need not make it again.
    for e in batch.events:
        k = f"{e.request_id}\x00{e.item_id}"
        kb = k.encode()
        if len(kb) > MAX_JOIN_KEY_BYTES or kb.count(0) != 1:  # rare: see join_key
            k = _long_key(e.request_id, e.item_id)
            kb = k.encode()
        b = crc32(kb) % buckets
        parts[b].append(e)
        key_parts[b].append(k)
    for b, events in enumerate(parts):
        key = bucket_key(b)
        yield key, BucketBatch(key, batch.partition, events, batch.progress, batch.status, key_parts[b])


@dataclass
class BucketClock:
    """A bucket's watermark: the smallest progress over the partition set, minus the lateness.

    Partitions that are idle or ended do not hold it back. When none holds it (and not all have
    ended) it advances from its last value at the rate of the wall clock. When all have ended it
    is +inf: everything is resolved. It never goes back.
    """

    partitions: tuple[str, ...]
    lateness_s: float
    progress: dict[str, float] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)
    watermark: float = NO_TS
    _free_since: float | None = None  # wall time since which no partition holds the watermark
    _free_base: float = NO_TS

    def __post_init__(self) -> None:
        for p in self.partitions:
            self.progress.setdefault(p, NO_TS)
            self.status.setdefault(p, ACTIVE)

    def observe(self, partition: str, progress: float, status: int, now: float) -> float:
        """Take a partition's marker; returns the watermark."""
        if partition not in self.status:
            raise KeyError(f"partition {partition!r} is not in this flow's partition set")
        if progress > self.progress[partition]:
            self.progress[partition] = progress
        self.status[partition] = status
        return self.advance(now)

    def advance(self, now: float) -> float:
        """The watermark at wall time `now`."""
        holders = [self.progress[p] for p in self.partitions if self.status[p] == ACTIVE]
        if holders:
            self._free_since = None
            wm = min(holders) - self.lateness_s
        elif all(s == ENDED for s in self.status.values()):
            wm = math.inf
        else:
            if self._free_since is None:
                self._free_since = now
                seen = [p for p in self.progress.values() if p > NO_TS]
                self._free_base = self.watermark
                if self._free_base == NO_TS and seen:
                    self._free_base = max(seen) - self.lateness_s
            wm = self._free_base + (now - self._free_since)
        if wm > self.watermark:
            self.watermark = wm
        return self.watermark

    def free_running(self) -> bool:
        """True while the watermark follows the wall clock (a bucket then wakes itself to expire)."""
        return self._free_since is not None and self.watermark < math.inf

    def ended(self) -> bool:
        return self.watermark == math.inf

    def state(self) -> dict:
        """A small, picklable snapshot."""
        return {"progress": dict(self.progress), "status": dict(self.status), "watermark": self.watermark}

    @classmethod
    def resume(cls, partitions: Iterable[str], lateness_s: float, state: dict | None) -> BucketClock:
        clock = cls(tuple(partitions), lateness_s)
        if state:
            for p, v in state["progress"].items():
                if p in clock.progress:
                    clock.progress[p] = v
            # A resumed partition re-reads from its snapshot: it is active until it says otherwise.
            clock.watermark = state["watermark"] if state["watermark"] < math.inf else NO_TS
        return clock
