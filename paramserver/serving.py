"""The serving parameter store: what the model server reads, written by one writer only.

`ServingStore` is the protocol; `LmdbServingStore` its LMDB backend (one writer process, any number
of reader processes, each read a committed snapshot, so no reader ever sees a torn row).
`ServingWriter` turns RowBatches, dense blobs, catalog and user updates into the `param-deltas`
records (paramserver/records.py), writes them through the store's one `apply`, and can produce
the same records to Kafka for replicas.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import compress, repeat
from operator import is_not
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import lmdb
import numpy as np
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from paramserver.idmap import IdIndex, encode, key_hash, zeros
from paramserver.lmdb_limits import disk_full, grown_size, initial_size
from paramserver.records import (
    DENSE_CHUNK_BYTES,
    MAX_KEY_BYTES,
    Records,
    decode_dense,
    decode_item,
    decode_row_values,
    decode_rows,
    decode_user_actions,
    encode_item,
    encode_user_actions,
    item_key,
    key_ids,
    row_keys,
    user_key,
)
from paramserver.rows import DenseBlob, RowBatch

__all__ = [
    "FRESHNESS_BUCKETS",
    "KafkaDeltaProducer",
    "LmdbServingStore",
    "RowCache",
    "RowsRead",
    "ServingStore",
    "ServingStoreError",
    "ServingWriter",
    "StoreNotReady",
    "StoreStats",
    "TXN_END_HEADER",
]

log = logging.getLogger(__name__)

STORE_FORMAT = b"1"  # bump when the layout below changes: an old directory is then refused, not misread
TXN_END_HEADER = "freshrec-txn-end"  # on the last Kafka record of each write: the primary's params_version
FRESHNESS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)

_DATA, _META, _CHANGES = b"data", b"meta", b"changes"
_M_FORMAT = b"format"
_M_VERSION = b"params_version"
_M_NEWEST = b"newest_update"
_M_DENSE_VERSION = b"dense_version"
_M_FRESHNESS = b"freshness"  # seconds, of the newest commit that carried arrival times
_M_SOURCE_VERSION = b"source_version"
_M_OFFSET = b"offset/"
_Q = struct.Struct(">Q")  # big-endian, so keys of the change log sort by version
_D = struct.Struct("<d")
_CHANGE_HEAD = struct.Struct("<dI")  # commit time, key count
_OVERFLOW = 0xFFFFFFFF  # key count of a change too large to log: readers crossing it reload in full


class ServingStoreError(Exception):
    """The serving store cannot do what was asked; the message says what to do about it."""


class StoreNotReady(ServingStoreError):
    """A reader opened the serving store while its writer was still creating it: open it again."""


class RowsRead(NamedTuple):
    values: np.ndarray  # float32 (n, dim); zeros where not found
    found: np.ndarray  # bool (n,)
    versions: np.ndarray  # uint64 (n,); 0 where not found


@dataclass(frozen=True)
class StoreStats:
    params_version: int
    freshness_ms: float | None  # of the newest commit that carried arrival times (its oldest row)
    staleness_ms: float | None  # now minus the newest update time held
    newest_update: float | None
    dense_version: int
    source_version: int | None  # a replica's: the primary's params_version it has caught up with
    entries: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class ServingStore(Protocol):
    """Parameters, dense weights, catalog and users' recent actions, as the model server reads them.

    All writes come through `apply`, one transaction per call, which bumps `params_version` (an
    integer that only grows) and logs the keys it changed, so a reader refreshes only those.
    """

    def apply(self, records: Records | Iterable[tuple[bytes, bytes | None]], *,
              offsets: Mapping[str, int] | None = None, source_version: int | None = None) -> int:
        """Write `records` (an empty value deletes the key) in one transaction, with the source
        offsets a replica consumed to get them; return the new params_version."""
        ...

    def params_version(self) -> int:
        ...

    def changes_since(self, version: int) -> tuple[int, list[bytes]] | None:
        """(current version, the keys changed after `version`), or None when the change log no
        longer reaches back that far: then read `params_version()` and reload in full."""
        ...

    def read_rows(self, slot: str, ids: Sequence[str], dim: int | None = None) -> RowsRead:
        """The rows of `ids` in `slot`, in one read transaction."""
        ...

    def read_dense(self) -> DenseBlob | None:
        ...

    def dense_version(self) -> int:
        ...

    def read_items(self, item_ids: Sequence[str]) -> list[dict | None]:
        ...

    def read_users(self, user_ids: Sequence[str]) -> list[list[tuple[str, str, float]] | None]:
        ...

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Raw record values (None where absent), in one read transaction."""
        ...

    def scan(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) whose key starts with `prefix`, in key order, from one snapshot."""
        ...

    def keys(self, prefix: bytes = b"") -> list[bytes]:
        """Every key that starts with `prefix`, in order, from one snapshot."""
        ...

    def stats(self) -> StoreStats:
        ...

    def close(self) -> None:
        ...


# ------------------------------------------------------------------------------------ metrics


class _FreshnessHistogram:
    """`freshrec_sync_freshness_seconds`, observed a whole commit at a time (numpy bucket counts:
    a Histogram.observe per row would cost more than the commit)."""

    name = "freshrec_sync_freshness_seconds"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._edges = np.array(FRESHNESS_BUCKETS)
        self._series: dict[str, list] = {}  # store -> [bucket counts (len+1), sum]

    def observe_many(self, store: str, seconds: np.ndarray) -> None:
        if not len(seconds):
            return
        counts = np.bincount(np.searchsorted(self._edges, seconds, side="left"), minlength=len(self._edges) + 1)
        with self._lock:
            s = self._series.setdefault(store, [np.zeros(len(self._edges) + 1, np.int64), 0.0])
            s[0] += counts
            s[1] += float(seconds.sum())

    def describe(self) -> list:
        return [HistogramMetricFamily(self.name, "", labels=["store"])]

    def collect(self) -> Iterator:
        fam = HistogramMetricFamily(
            self.name, "time from an update's earliest action arrival to the serving commit holding it",
            labels=["store"])
        with self._lock:
            for store, (counts, total) in self._series.items():
                cum = np.cumsum(counts)
                buckets = [(floatToGoString(e), int(c)) for e, c in zip(FRESHNESS_BUCKETS, cum[:-1], strict=True)]
                buckets.append(("+Inf", int(cum[-1])))
                fam.add_metric([store], buckets, total)
        yield fam


class _Counts:
    """`freshrec_sync_store_commits` and `_records`, kept as plain ints (one commit, one add)."""

    def __init__(self) -> None:
        self.commits: dict[str, int] = {}
        self.records: dict[str, int] = {}
        self.growths: dict[str, int] = {}

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        for attr, name, doc in (("commits", "freshrec_sync_store_commits", "write transactions of a serving store"),
                                ("records", "freshrec_sync_store_records", "records written to a serving store"),
                                ("growths", "freshrec_sync_store_map_growths", "times a serving store's map doubled")):
            fam = CounterMetricFamily(name, doc, labels=["store"])
            for store, n in getattr(self, attr).copy().items():
                fam.add_metric([store], n)
            yield fam


FRESHNESS = _FreshnessHistogram()
COUNTS = _Counts()
for _collector in (FRESHNESS, COUNTS):
    with contextlib.suppress(ValueError):  # registered already (the module imported twice)
        REGISTRY.register(_collector)


# -------------------------------------------------------------------------------- the LMDB store


class _Gate:
    """Many in-process readers, or one map resize: LMDB resizes only with no transaction open."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._resizing = False

    def enter(self) -> None:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._readers += 1

    def leave(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


_OPEN: dict[str, int] = {}  # path -> pid: LMDB forbids opening one environment twice in a process
_OPEN_LOCK = threading.Lock()


class LmdbServingStore:
    """The serving store in an LMDB directory: `writer=True` in the one process that writes (it
    may read too), `writer=False` (read-only) in any number of others. One object per directory
    per process: in the writer's process, readers share the writer's object.

    Layout: DB `data` holds the records under their keys; `meta` the params_version, newest update
    time, dense version, last freshness and a replica's source offsets; `changes` the change log,
    params_version (u64 big-endian) -> (commit time, the keys changed). The log keeps the last
    `changelog_versions` versions younger than `changelog_seconds`; a write of more than
    `changelog_max_keys` keys is logged as "reload everything".

    `durable=False` (the default) writes through a writable map (LMDB's MDB_WRITEMAP, about 1.7x
    the commit rate on big random batches) and skips fsync at commit. A process crash loses
    nothing and tears nothing; a machine crash may lose the last commits or damage the store, which
    is derived data: delete it and rebuild it (a replica from the topic, the primary by a full
    sync). `durable=True` fsyncs every commit, without the writable map.

    A full map grows (doubling) up to `max_map_size` bytes; a write past it fails whole with
    `LmdbStoreFull`, which names `cap_name` (the setting an operator raises).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        writer: bool = False,
        map_size: int = 1 << 30,
        durable: bool = False,
        changelog_versions: int = 10_000,
        changelog_seconds: float = 3600.0,
        changelog_max_keys: int = 1_000_000,
        name: str = "primary",
        clock: Callable[[], float] = time.time,
        max_map_size: int | None = None,
        cap_name: str = "max_map_size",
    ) -> None:
        self.path = Path(path)
        self.writer = writer
        self.max_map_size = max_map_size
        self.cap_name = cap_name
        self.name = name
        self.clock = clock
        self.changelog_versions = changelog_versions
        self.changelog_seconds = changelog_seconds
        self.changelog_max_keys = changelog_max_keys
        self._gate = _Gate()
        self._write_lock = threading.Lock()
        self._real = os.path.realpath(self.path)
        with _OPEN_LOCK:
            if _OPEN.get(self._real) == os.getpid():
                raise ServingStoreError(f"{self.path} is already open in this process: LMDB allows one "
                                        "environment per directory per process, so share that store object")
            _OPEN[self._real] = os.getpid()
        self._forget = weakref.finalize(self, _forget_path, self._real, os.getpid())
        try:
            if writer:
                self.path.mkdir(parents=True, exist_ok=True)
                self.env = lmdb.open(str(self.path), map_size=initial_size(map_size, max_map_size), max_dbs=4,
                                     sync=durable,
                                     metasync=durable, writemap=not durable, readahead=False, meminit=False)
                self._data = self.env.open_db(_DATA)
                self._meta = self.env.open_db(_META)
                self._changes = self.env.open_db(_CHANGES)
                with self.env.begin(write=True, db=self._meta) as txn:
                    fmt = txn.get(_M_FORMAT)
                    if fmt is None:
                        txn.put(_M_FORMAT, STORE_FORMAT)
                    elif fmt != STORE_FORMAT:
                        raise ServingStoreError(self._format_message(fmt))
            else:
                data_file = self.path / "data.mdb"
                if not data_file.exists():
                    raise ServingStoreError(f"no serving store at {self.path}: its writer creates it; start that first")
                not_ready = StoreNotReady(f"the serving store at {self.path} is still being created by its writer; "
                                          "open it again once the writer has started")
                if data_file.stat().st_size < 2 * 4096:  # not even LMDB's two meta pages written yet
                    raise not_ready
                self.env = lmdb.open(str(self.path), readonly=True, lock=True, max_dbs=4, readahead=False)
                # Handles opened in a transaction that is aborted die with it: py-lmdb's own
                # (committed) transaction keeps them.
                try:
                    self._meta = self.env.open_db(_META, create=False)
                except lmdb.NotFoundError:
                    raise not_ready from None  # the writer has made the file, not yet its databases
                with self.env.begin(db=self._meta) as txn:  # just opened: the map is the file's own
                    fmt = txn.get(_M_FORMAT)
                if fmt is None:  # the writer records the format last, once the databases are made
                    raise not_ready
                if fmt != STORE_FORMAT:
                    raise ServingStoreError(self._format_message(fmt))
                try:
                    self._data = self.env.open_db(_DATA, create=False)
                    self._changes = self.env.open_db(_CHANGES, create=False)
                except lmdb.NotFoundError:
                    raise ServingStoreError(f"the serving store at {self.path} records its format but lacks a "
                                            "database: it is damaged; delete the directory and let sync (or the "
                                            "replica) rebuild it") from None
        except BaseException:
            if getattr(self, "env", None) is not None:
                self.env.close()
                self.env = None
            self._forget()
            raise

    def _format_message(self, fmt: bytes | None) -> str:
        return (f"{self.path} holds a serving store of format {fmt!r}, not {STORE_FORMAT!r}; "
                "delete the directory and let sync (or the replica) rebuild it")

    def close(self) -> None:
        env = getattr(self, "env", None)
        if env is not None:
            env.close()
            self.env = None
            self._forget()

    def __enter__(self) -> LmdbServingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------- reading

    @contextlib.contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        """A read transaction on a fresh snapshot; a reader adopts a map the writer grew."""
        self._gate.enter()
        try:
            for _ in range(100):
                try:
                    txn = self.env.begin(db=self._data)
                    break
                except lmdb.MapResizedError:
                    self._gate.leave()
                    try:
                        with self._gate.exclusive():
                            self.env.set_mapsize(0)  # adopt the size the writer set
                    finally:
                        self._gate.enter()
            else:
                raise ServingStoreError(f"{self.path}: the map grew 100 times while opening one read")
            try:
                yield txn
            finally:
                txn.abort()
        finally:
            self._gate.leave()

    def params_version(self) -> int:
        with self._read() as txn:
            return _u64(txn.get(_M_VERSION, db=self._meta))

    def dense_version(self) -> int:
        with self._read() as txn:
            return _u64(txn.get(_M_DENSE_VERSION, db=self._meta))

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._read() as txn:
            g = txn.get
            return [g(k) for k in keys]

    def read_rows(self, slot: str, ids: Sequence[str], dim: int | None = None) -> RowsRead:
        keys = row_keys(slot, ids)
        with self._read() as txn:
            vals = list(map(txn.get, keys))  # LMDB's own B-tree lookups are most of a read's cost
        return _rows_read(vals, dim)

    def read_dense(self) -> DenseBlob | None:
        return decode_dense(self.scan(b"dense/"))

    def read_items(self, item_ids: Sequence[str]) -> list[dict | None]:
        return [None if v is None else decode_item(v) for v in self.get([item_key(i) for i in item_ids])]

    def read_users(self, user_ids: Sequence[str]) -> list[list[tuple[str, str, float]] | None]:
        return [None if v is None else decode_user_actions(v) for v in self.get([user_key(u) for u in user_ids])]

    def scan(self, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        # Collected in one transaction and then handed out, so a slow consumer holds no snapshot
        # (and no map growth) back.
        with self._read() as txn:
            c = txn.cursor()
            if not c.set_range(prefix):
                return iter(())
            out = []
            for k, v in c:
                if not k.startswith(prefix):
                    break
                out.append((k, v))
        return iter(out)

    def keys(self, prefix: bytes = b"") -> list[bytes]:
        with self._read() as txn:
            c = txn.cursor()
            out = []
            if c.set_range(prefix):
                for k in c.iternext(keys=True, values=False):
                    if not k.startswith(prefix):
                        break
                    out.append(k)
            return out

    def changes_since(self, version: int) -> tuple[int, list[bytes]] | None:
        with self._read() as txn:
            current = _u64(txn.get(_M_VERSION, db=self._meta))
            if version == current:
                return current, []
            if version > current or version < 0:
                return None  # a store rebuilt, or a version from elsewhere
            c = txn.cursor(db=self._changes)
            if not c.set_key(_Q.pack(version + 1)):
                return None  # pruned
            keys: dict[bytes, None] = {}
            for _, entry in c:
                got = _decode_change(entry)
                if got is None:
                    return None
                keys.update(dict.fromkeys(got))
            return current, list(keys)

    def offsets(self, topic: str) -> dict[int, int]:
        """A replica's next offset per partition of `topic`, as its last apply stored them."""
        prefix = _M_OFFSET + topic.encode() + b"/"
        with self._read() as txn:
            c = txn.cursor(db=self._meta)
            out = {}
            if c.set_range(prefix):
                for k, v in c:
                    if not k.startswith(prefix):
                        break
                    out[int(k[len(prefix):])] = _u64(v)
            return out

    def stats(self) -> StoreStats:
        now = self.clock()
        with self._read() as txn:
            m = self._meta
            version = _u64(txn.get(_M_VERSION, db=m))
            newest = txn.get(_M_NEWEST, db=m)
            fresh = txn.get(_M_FRESHNESS, db=m)
            dense = _u64(txn.get(_M_DENSE_VERSION, db=m))
            source = txn.get(_M_SOURCE_VERSION, db=m)
            entries = txn.stat(self._data)["entries"]
        newest_t = _D.unpack(newest)[0] if newest else None
        return StoreStats(
            params_version=version,
            freshness_ms=_D.unpack(fresh)[0] * 1000.0 if fresh else None,
            staleness_ms=max(0.0, now - newest_t) * 1000.0 if newest_t is not None else None,
            newest_update=newest_t,
            dense_version=dense,
            source_version=_u64(source) if source else None,
            entries=entries,
        )

    def __len__(self) -> int:
        with self._read() as txn:
            return txn.stat(self._data)["entries"]

    # ------------------------------------------------------------------------------- writing

    def apply(self, records: Records | Iterable[tuple[bytes, bytes | None]], *,
              offsets: Mapping[str, int] | None = None, source_version: int | None = None) -> int:
        if not self.writer:
            raise ServingStoreError(f"{self.path} is open read-only; only its writer (writer=True) applies records")
        recs = records if isinstance(records, Records) else Records.from_pairs(records)
        if not recs.keys and not offsets:
            return self.params_version()
        with self._write_lock:
            while True:
                try:
                    version, committed, arrivals = self._commit(recs, offsets, source_version)
                    break
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.DiskError as e:
                    raise disk_full("serving store", self.path, e) from e
        if len(arrivals):
            FRESHNESS.observe_many(self.name, np.maximum(committed - arrivals, 0.0))
        COUNTS.commits[self.name] = COUNTS.commits.get(self.name, 0) + 1
        COUNTS.records[self.name] = COUNTS.records.get(self.name, 0) + len(recs)
        return version

    def _commit(self, recs: Records, offsets: Mapping[str, int] | None, source_version: int | None
                ) -> tuple[int, float, np.ndarray]:
        txn = self.env.begin(write=True, db=self._data)
        try:
            meta = self._meta
            version = _u64(txn.get(_M_VERSION, db=meta)) + 1
            keys, values = recs.keys, recs.values
            c = txn.cursor()
            if not recs.tombstones:
                c.putmulti(list(zip(keys, values, strict=True)))
            else:
                _write_in_order(txn, c, keys, values)
            now = self.clock()
            txn.put(_Q.pack(version), _encode_change(now, keys, self.changelog_max_keys), db=self._changes)
            self._prune(txn, version, now)
            m = [(_M_VERSION, _Q.pack(version))]
            if recs.newest_update > -math.inf:
                old = txn.get(_M_NEWEST, db=meta)
                if old is None or _D.unpack(old)[0] < recs.newest_update:
                    m.append((_M_NEWEST, _D.pack(recs.newest_update)))
            if recs.dense_version is not None:
                m.append((_M_DENSE_VERSION, _Q.pack(recs.dense_version)))
            if source_version is not None:
                m.append((_M_SOURCE_VERSION, _Q.pack(source_version)))
            for name, off in (offsets or {}).items():
                m.append((_M_OFFSET + name.encode(), _Q.pack(off)))
            arrivals = recs.arrival_times()
            arrivals = arrivals[np.isfinite(arrivals)]
            committed = self.clock()
            if len(arrivals):
                m.append((_M_FRESHNESS, _D.pack(max(0.0, committed - float(arrivals.min())))))
            txn.cursor(db=meta).putmulti(m)
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        return version, self.clock(), arrivals

    def _prune(self, txn: lmdb.Transaction, version: int, now: float) -> None:
        c = txn.cursor(db=self._changes)
        if not c.first():
            return
        floor_version = version - self.changelog_versions
        floor_time = now - self.changelog_seconds
        while True:
            v = _Q.unpack(c.key())[0]
            if v == version or (v > floor_version and _CHANGE_HEAD.unpack_from(c.value())[0] >= floor_time):
                return
            if not c.delete():
                return

    def _grow(self) -> None:
        with self._gate.exclusive():
            size = grown_size(self.env.info()["map_size"], self.max_map_size, f"serving store ({self.name})",
                              self.path, self.cap_name)
            log.info("serving store %s: map full, growing it to %d MiB", self.path, size >> 20)
            self.env.set_mapsize(size)
        COUNTS.growths[self.name] = COUNTS.growths.get(self.name, 0) + 1


def _forget_path(path: str, pid: int) -> None:
    with _OPEN_LOCK:
        if _OPEN.get(path) == pid:
            del _OPEN[path]


def _write_in_order(txn: lmdb.Transaction, c: lmdb.Cursor, keys: list[bytes], values: list[bytes]) -> None:
    """Puts and deletes in record order: runs of puts go in one putmulti each."""
    run: list[tuple[bytes, bytes]] = []
    for k, v in zip(keys, values, strict=True):
        if v:
            run.append((k, v))
            continue
        if run:
            c.putmulti(run)
            run = []
        txn.delete(k)
    if run:
        c.putmulti(run)


def _encode_change(now: float, keys: list[bytes], max_keys: int) -> bytes:
    if len(keys) > max_keys:
        return _CHANGE_HEAD.pack(now, _OVERFLOW)
    lengths = np.fromiter(map(len, keys), np.uint32, len(keys))
    return _CHANGE_HEAD.pack(now, len(keys)) + lengths.tobytes() + b"".join(keys)


def _decode_change(entry: bytes) -> list[bytes] | None:
    _, n = _CHANGE_HEAD.unpack_from(entry)
    if n == _OVERFLOW:
        return None
    at = _CHANGE_HEAD.size
    ends = np.cumsum(np.frombuffer(entry, np.uint32, n, at), dtype=np.int64).tolist()
    body = entry[at + 4 * n:]
    out, start = [], 0
    for end in ends:
        out.append(body[start:end])
        start = end
    return out


def _rows_read(vals: list[bytes | None], dim: int | None) -> RowsRead:
    """Row records as read (None where absent) as one RowsRead: absent rows zeros, version 0."""
    n = len(vals)
    if None not in vals:
        values, versions = decode_row_values(vals, dim)
        return RowsRead(values, np.ones(n, bool), versions)
    found = np.fromiter(map(is_not, vals, repeat(None)), bool, n)
    got, got_versions = decode_row_values(list(compress(vals, found)), dim)
    values = np.zeros((n, got.shape[1] if dim is None else dim), np.float32)
    versions = np.zeros(n, np.uint64)
    values[found] = got
    versions[found] = got_versions
    return RowsRead(values, found, versions)


def _u64(v: bytes | None) -> int:
    return _Q.unpack(v)[0] if v else 0


# --------------------------------------------------------------------------- a reader's cache


def _key_suffixes(keys: list[bytes], slot: str) -> list[str]:
    """The ids in row keys of `slot` ("slot/id"), decoded in one go."""
    joined = b"\0".join(keys)
    if joined.count(b"\0") == len(keys) - 1:
        cut = len(slot) + 1
        return [k[cut:] for k in joined.decode().split("\0")]
    cut = len(slot.encode()) + 1
    return [k[cut:].decode() for k in keys]  # some id holds a NUL


class RowCache:
    """A reader's in-memory copy of the rows of some slots, kept fresh from the store's change log:
    `refresh()` re-reads only the rows changed since the version it holds (all of them when the
    log no longer reaches back). Reads then cost no LMDB lookup, the way Monolith's serving
    parameter servers hold their embeddings in memory. Thread-safe: a read sees each row whole.

    Ids map to rows through paramserver.idmap's `IdIndex` (as in the training tables), so a batch
    of ids is encoded, hashed and looked up in numpy, with no Python work per id. Row 0 of each
    slot stays zero: it is what an id without a row reads.
    """

    def __init__(self, store: ServingStore, slots: Mapping[str, int]) -> None:
        self.store = store
        self.dims = dict(slots)
        self.version = -1
        self.reloads = 0
        self._lock = threading.Lock()
        self._index = {s: IdIndex(first_row=1, capacity=16) for s in self.dims}
        self._values = {s: np.zeros((self._index[s].capacity, d), np.float32) for s, d in self.dims.items()}
        self._versions = {s: np.zeros(self._index[s].capacity, np.uint64) for s in self.dims}
        self.refresh()

    def refresh(self) -> int:
        """Brings the cache up to the store's current version; returns the rows re-read."""
        got = self.store.changes_since(self.version) if self.version >= 0 else None
        if got is None:
            return self.reload()
        return self.apply(self.version, *got)

    def apply(self, since: int, version: int, keys: Sequence[bytes]) -> int:
        """`refresh` with the change log already read: `version` and `keys` are what
        `changes_since(since)` gave (a reader that reads the log for more than this cache, as the
        model server's item index does, reads it once). Changes that miss some of the cache's
        (`since` newer than its version) make it reload. Returns the rows re-read."""
        if self.version < 0 or since > self.version:
            return self.reload()
        n = 0
        for slot, dim in self.dims.items():
            prefix = slot.encode() + b"/"
            mine = [k for k in keys if k.startswith(prefix)]  # distinct: the log's keys come deduplicated
            if not mine:
                continue
            # Read by the very keys (no ids made into keys again), from a snapshot as new or newer.
            rows = _rows_read(self.store.get(mine), dim)
            with self._lock:
                self._put(slot, _key_suffixes(mine, slot), rows)
            n += len(mine)
        self.version = version
        return n

    def reload(self) -> int:
        """Reads every row of the slots again (what `refresh` does when the log no longer
        reaches back to the cache's version); returns the rows read."""
        version = self.store.params_version()  # first: what changes after it, the next refresh re-reads
        n = 0
        for slot, dim in self.dims.items():
            pairs = list(self.store.scan(slot.encode() + b"/"))
            cut = len(slot) + 1
            ids = [k[cut:].decode() for k, _ in pairs]
            rows = decode_rows([v for _, v in pairs], dim)
            index = IdIndex(first_row=1, capacity=len(ids) + 1)
            keys = encode(ids, 1)
            at = index.insert(keys, key_hash(keys))
            values = zeros((index.capacity, dim), np.float32)
            versions = zeros(index.capacity, np.uint64)
            values[at] = rows.values
            versions[at] = rows.versions
            with self._lock:
                self._index[slot], self._values[slot], self._versions[slot] = index, values, versions
            n += len(ids)
        self.version = version
        self.reloads += 1
        return n

    def _put(self, slot: str, ids: list[str], rows: RowsRead) -> None:
        """Store the rows read for `ids` (distinct); ids the store no longer holds leave."""
        index = self._index[slot]
        keys = encode(ids, index.words)
        h = key_hash(keys)
        where = index.lookup(keys, h)
        found = rows.found
        gone = where[~found & (where >= 0)]
        if len(gone):
            index.remove(gone)
            self._values[slot][gone] = 0
            self._versions[slot][gone] = 0
        new = np.flatnonzero(found & (where < 0))
        if len(new):
            where[new] = index.insert(keys[new], h[new])
        values, versions = self._values[slot], self._versions[slot]
        if index.capacity > len(values):
            grown = zeros((index.capacity, values.shape[1]), np.float32)
            grown[: len(values)] = values
            grown_v = zeros(index.capacity, np.uint64)
            grown_v[: len(versions)] = versions
            self._values[slot], self._versions[slot] = values, versions = grown, grown_v
        sel = np.flatnonzero(found)
        values[where[sel]] = rows.values[sel]
        versions[where[sel]] = rows.versions[sel]

    def read_rows(self, slot: str, ids: Sequence[str]) -> RowsRead:
        ids = ids if type(ids) is list else list(ids)
        if ids and max(map(len, ids)) * 4 > MAX_KEY_BYTES - len(slot) - 1:
            ids = key_ids(slot, ids)  # some id may be too long for a key: the store holds it by its digest
        with self._lock:
            index = self._index[slot]
            keys = encode(ids, index.words)
            where = index.lookup(keys, key_hash(keys))
            found = where >= 0
            np.maximum(where, 0, out=where)  # row 0: zeros
            v = self._values[slot]
            # Whole rows as single items: numpy gathers those several times faster.
            values = v.view(np.dtype((np.void, v.shape[1] * 4))).reshape(len(v)).take(where)
            versions = self._versions[slot].take(where)
        return RowsRead(values.view(np.float32).reshape(len(where), v.shape[1]), found, versions)

    def __len__(self) -> int:
        return sum(i.live for i in self._index.values())


# ---------------------------------------------------------------------------------- the writer


class KafkaDeltaProducer:
    """Produces a write's records to the `param-deltas` topic: key = record key, value = record
    (None for a tombstone, so compaction drops the key), in commit order; the last record of each
    write carries the header `freshrec-txn-end` = the primary's params_version (u64 big-endian),
    so a replica applies the primary's writes whole. Idempotent producer: no reordering, no
    duplicates on retry. Delivery errors are logged and counted, never raised into the sync."""

    def __init__(self, brokers: str, topic: str = "param-deltas", config: Mapping[str, Any] | None = None) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.failed = 0
        conf: dict[str, Any] = {
            "bootstrap.servers": brokers,
            "enable.idempotence": True,
            "linger.ms": 5,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 2_000_000,
            # No delivery timeout: librdkafka's default drops a record after 5 minutes of a broker
            # outage, and a replica would miss it for good; the queue holds them meanwhile.
            "message.timeout.ms": 0,
            "delivery.report.only.error": True,
            "on_delivery": self._on_delivery,
        }
        conf.update(config or {})
        self._producer = Producer(conf)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
            log.error("param-deltas: a record for %r was not delivered: %s", msg.key(), err)

    def send(self, records: Records, version: int) -> None:
        produce = self._producer.produce
        topic = self.topic
        keys, values = records.keys, records.values
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys for {len(values)} values")
        last = len(keys) - 1
        for i, k in enumerate(keys):
            v = values[i] or None
            while True:
                try:
                    if i < last:  # positional only: keywords cost the call their parsing
                        produce(topic, v, k)
                    else:
                        produce(topic, v, k, headers=[(TXN_END_HEADER, _Q.pack(version))])
                    break
                except BufferError:  # the local queue is full: let librdkafka send some
                    self._producer.poll(0.1)
        self._producer.poll(0)

    def flush(self, timeout: float = 30.0) -> int:
        """Waits for every record to be delivered; returns how many are still queued."""
        return self._producer.flush(timeout)

    def close(self, timeout: float = 30.0) -> None:
        left = self.flush(timeout)
        if left:
            log.error("param-deltas: %d records undelivered at close", left)


class ServingWriter:
    """The one writer: turns updates into `param-deltas` records, writes them to the store in one
    transaction per call, then (optionally) produces the same records to Kafka."""

    def __init__(self, store: LmdbServingStore, deltas: KafkaDeltaProducer | None = None, *,
                 chunk_bytes: int = DENSE_CHUNK_BYTES) -> None:
        if not store.writer:
            raise ServingStoreError("ServingWriter needs a store opened with writer=True")
        self.store = store
        self.deltas = deltas
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()

    def write(
        self,
        rows: Iterable[RowBatch] = (),
        *,
        dense: DenseBlob | None = None,
        items: Mapping[str, Mapping[str, Any] | None] | None = None,
        users: Mapping[str, Sequence[Sequence[Any]] | bytes | None] | None = None,
    ) -> int:
        """Writes rows (and evictions), the dense weights, catalog entries (None: the item leaves)
        and users' recent actions (None: forget the user) in one transaction; returns the new
        params_version (the current one when there was nothing to write)."""
        recs = Records()
        for batch in rows:
            recs.add_row_batch(batch)
        if dense is not None:
            stale = self.store.keys(b"dense/")
            recs.add_dense(dense, stale, self.chunk_bytes)
        for mapping, key_of, enc in ((items, item_key, encode_item), (users, user_key, encode_user_actions)):
            for id_, value in (mapping or {}).items():
                if value is None:
                    recs.delete([key_of(id_)])
                else:
                    recs.add([key_of(id_)], [enc(value)])
        return self.apply(recs)

    def write_rows(self, batches: Iterable[RowBatch]) -> int:
        return self.write(batches)

    def write_dense(self, blob: DenseBlob) -> int:
        return self.write(dense=blob)

    def write_items(self, items: Mapping[str, Mapping[str, Any] | None]) -> int:
        return self.write(items=items)

    def write_users(self, users: Mapping[str, Sequence[Sequence[Any]] | bytes | None]) -> int:
        return self.write(users=users)

    def apply(self, records: Records | Iterable[tuple[bytes, bytes | None]]) -> int:
        """Raw records, through the same path (for tools and tests)."""
        recs = records if isinstance(records, Records) else Records.from_pairs(records)
        if not recs.keys:
            return self.store.params_version()
        with self._lock:  # Kafka gets the writes in commit order
            version = self.store.apply(recs)
            if self.deltas is not None:
                self.deltas.send(recs, version)
        return version

    def close(self) -> None:
        if self.deltas is not None:
            self.deltas.close()

