"""The on-disk join state of one join bucket: the RocksDB of the Flink job (DESIGN.md, Decisions).

The joiner's write-back cache flushes here once per epoch, in one LMDB transaction tagged with its
snapshot number; undo records let a resume roll back to that number. Plain LMDB, no Bytewax.
"""

from __future__ import annotations

import operator
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import lmdb

from paramserver.lmdb_limits import LmdbStoreFull, grown_size, initial_size

Entry = tuple[float, bytes]  # (due, payload)

_T = TypeVar("_T")
_D = struct.Struct(">d")
_Q = struct.Struct(">Q")
_SIGN = 1 << 63
_ALL = (1 << 64) - 1
_WAS_ABSENT = b"\x00"
_WAS = b"\x01"
_LAST_TAG = b"last_tag"
_DROPPED = b"dropped"  # the newest tag whose undo records were dropped: no rollback below it
_FORMAT = b"format"
_FORMAT_VERSION = b"1"  # bump when a layout below changes; an old directory is then refused, not misread
_DATA_FILE = "data.mdb"


class SpillStoreError(Exception):
    """The spill store cannot do what was asked; the message says what to do about it."""


class SpillStoreFull(SpillStoreError, LmdbStoreFull):
    """A flush needs more room than `max_map_size` allows; the store is as it was before it."""


class SpillStore(Protocol):
    """The join state of one bucket on disk: entries `key -> (due, payload)` with an index by due.

    Writes come only through `flush`, one call per epoch (or under memory pressure), tagged with
    a snapshot number that never decreases; `rollback` undoes the flushes newer than a tag.
    """

    def get(self, key: bytes) -> Entry | None:
        """The (due, payload) stored under `key`, or None."""
        ...

    def get_many(self, keys: Sequence[bytes]) -> list[Entry | None]:
        """`get` for each key, in order, in one read transaction."""
        ...

    def due(
        self, upto: float, start: tuple[float, bytes] | None = None, *, limit: int = 100_000
    ) -> list[tuple[float, bytes]]:
        """(due, key) of the entries with due <= `upto`, in (due, key) order, strictly after
        `start` when given, at most `limit` of them (page on by passing the last one as `start`)."""
        ...

    def flush(self, tag: int, writes: Mapping[bytes, Entry | None], *, durable: bool = True) -> None:
        """Put each (due, payload), delete each None, in one write transaction tagged `tag`.

        `durable=False` (a flush under memory pressure, between snapshots) may be undone by a
        system crash, as a whole; the next durable flush makes it durable too."""
        ...

    def last_tag(self) -> int:
        """The tag of the last flush (or the tag rolled back to); 0 for a new store."""
        ...

    def rollback(self, to_tag: int) -> int:
        """Undo every flush tagged above `to_tag`; return how many keys it restored."""
        ...

    def clear(self) -> None:
        """Remove every entry and undo record; `last_tag` goes back to 0."""
        ...

    def __len__(self) -> int:
        """The number of entries."""
        ...

    def disk_bytes(self) -> int:
        """Bytes the store takes on disk."""
        ...

    def close(self) -> None:
        """Release the environment; the data stays on disk."""
        ...


def _index_prefix(raw_due: bytes) -> bytes:
    """Map a big-endian double to 8 bytes that sort like the number (IEEE 754 bytes do not:
    negatives, -inf included, would sort after positives and in reverse)."""
    bits = int.from_bytes(raw_due, "big")
    bits ^= _ALL if bits & _SIGN else _SIGN
    return bits.to_bytes(8, "big")


def _due_of_prefix(prefix: bytes) -> float:
    bits = int.from_bytes(prefix, "big")
    bits ^= _SIGN if bits & _SIGN else _ALL
    return _D.unpack(bits.to_bytes(8, "big"))[0]


def _raw_due(due: float) -> bytes:
    if due != due:
        raise ValueError("due must not be NaN: an entry with a NaN due would never come due")
    return _D.pack(due + 0.0)  # + 0.0 turns -0.0 into 0.0: one index position per instant


def _decode(value: bytes | None) -> Entry | None:
    if value is None:
        return None
    return _D.unpack_from(value)[0], value[8:]


class LmdbSpillStore:
    """`SpillStore` in one LMDB environment (one directory per bucket).

    Named databases: `entries` (key -> 8-byte big-endian double due + payload), `due` (sortable
    due prefix + key -> b"", so a cursor walks in due order), `undo` (8-byte big-endian tag + key
    -> b"\\x00" if the key was absent before that tag, or b"\\x01" + its stored value), and `meta`.
    Keys are non-empty bytes of at most 503 bytes (LMDB's 511 less the 8-byte prefixes).
    `durable=False` syncs nothing to disk and keeps no undo records, for a store no resume will
    read (recovery off): each flush then drops the rollback below itself, so `rollback` refuses
    any earlier tag, with the reason.
    One process, one open store per directory: LMDB forbids opening an environment twice in a process.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        undo_keep: int = 8,
        map_size: int = 64 << 20,
        max_map_size: int | None = None,
        cap_name: str = "max_map_size",
        durable: bool = True,
    ) -> None:
        if undo_keep < 1:
            raise ValueError(f"undo_keep must be at least 1 (the undo of the last flush), got {undo_keep}")
        map_size = initial_size(map_size, max_map_size)
        self.path = Path(path)
        self.undo_keep = undo_keep
        self.max_map_size = max_map_size
        self.cap_name = cap_name  # what the error of a full store tells the operator to raise
        # False: nothing is synced to disk (a store no resume will read: recovery is off). A
        # process crash still loses nothing committed; a system crash can lose or tear the store.
        self.durable = durable
        self.path.mkdir(parents=True, exist_ok=True)
        data_file = self.path / _DATA_FILE
        if data_file.exists():
            # Start at the size the data already has, so the first flush after a reopen does not
            # pay for a failed transaction and a growth step.
            map_size = max(map_size, os.path.getsize(data_file))
        self._env = lmdb.open(
            str(self.path),
            map_size=map_size,
            subdir=True,
            max_dbs=4,
            writemap=False,  # a stray write through the map could corrupt the file; LMDB copies instead
            # Every commit syncs its data pages, so a system crash can at worst undo the last
            # commits whole (ACI kept); a durable flush also syncs the meta page (`flush`). The
            # undo records are what makes a resume correct.
            sync=durable,
            metasync=False,
            lock=True,
            readahead=False,  # reads are random lookups by join key
        )
        try:
            with self._env.begin(write=True) as txn:
                self._entries = self._env.open_db(b"entries", txn=txn)
                self._due = self._env.open_db(b"due", txn=txn)
                self._undo = self._env.open_db(b"undo", txn=txn)
                self._meta = self._env.open_db(b"meta", txn=txn)
                version = txn.get(_FORMAT, db=self._meta)
                if version is None:
                    txn.put(_FORMAT, _FORMAT_VERSION, db=self._meta)
                elif version != _FORMAT_VERSION:
                    raise SpillStoreError(
                        f"spill store {self.path} has format {version!r}, this code reads {_FORMAT_VERSION!r}: "
                        f"remove the state directory {self.path} to start afresh"
                    )
                self._last_tag = self._meta_int(txn, _LAST_TAG)
                self._dropped = self._meta_int(txn, _DROPPED)
        except BaseException:
            self._env.close()
            raise

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: bytes) -> Entry | None:
        with self._env.begin(db=self._entries) as txn:
            return _decode(txn.get(key))

    def get_many(self, keys: Sequence[bytes]) -> list[Entry | None]:
        unpack = _D.unpack_from
        with self._env.begin(db=self._entries) as txn:
            get = txn.cursor().get
            # Inline decoding: twice as fast as getmulti plus a dict (it skips missing keys).
            return [None if (value := get(key)) is None else (unpack(value)[0], value[8:]) for key in keys]

    def due(
        self, upto: float, start: tuple[float, bytes] | None = None, *, limit: int = 100_000
    ) -> list[tuple[float, bytes]]:
        if upto != upto or limit <= 0:
            return []
        bound = _index_prefix(_D.pack(upto + 0.0))
        out: list[tuple[float, bytes]] = []
        with self._env.begin(db=self._due) as txn:
            cursor = txn.cursor()
            if start is None:
                positioned = cursor.first()
            else:
                after = _index_prefix(_raw_due(start[0])) + start[1]
                positioned = cursor.set_range(after)
                if positioned and cursor.key() == after:
                    positioned = cursor.next()
            if not positioned:
                return out
            for index_key in cursor.iternext(keys=True, values=False):
                prefix = index_key[:8]
                if prefix > bound:
                    break
                out.append((_due_of_prefix(prefix), index_key[8:]))
                if len(out) >= limit:
                    break
        return out

    def last_tag(self) -> int:
        return self._last_tag

    def __len__(self) -> int:
        with self._env.begin() as txn:
            return txn.stat(self._entries)["entries"]

    def disk_bytes(self) -> int:
        # Pages up to the high-water mark, free ones included: what the data file holds.
        return (self._env.info()["last_pgno"] + 1) * self._env.stat()["psize"]

    # -- writes --------------------------------------------------------------------------------

    def flush(self, tag: int, writes: Mapping[bytes, Entry | None], *, durable: bool = True) -> None:
        tag = operator.index(tag)
        if tag < 0 or tag >= 1 << 64:
            raise ValueError(f"tag must be in [0, 2**64), got {tag}")
        if tag < self._last_tag:
            raise ValueError(
                f"flush tag {tag} is below the last flushed tag {self._last_tag} of {self.path}: tags only grow"
            )
        # Sorted keys make the puts walk each B-tree left to right. Values and index records are
        # encoded once, outside the transaction, which a full map makes run again.
        items: list[tuple[bytes, bytes | None, bytes]] = []
        for key in sorted(writes):
            entry = writes[key]
            if entry is None:
                items.append((key, None, b""))
            else:
                raw_due = _raw_due(entry[0])
                items.append((key, raw_due + entry[1], _index_prefix(raw_due) + key))
        dropped = self._write(lambda txn: self._flush_txn(txn, tag, items))
        if durable and self.durable:
            self._env.sync(True)  # the meta page too: this flush survives a system crash
        self._last_tag = tag
        self._dropped = dropped

    def _flush_txn(self, txn: lmdb.Transaction, tag: int, items: list[tuple[bytes, bytes | None, bytes]]) -> int:
        keys = [item[0] for item in items]
        old = dict(txn.cursor(self._entries).getmulti(keys))

        # Undo first, from the values as they are now. overwrite=False keeps the record of an
        # earlier flush with the same tag: it holds the value from before the tag. A store no
        # resume reads keeps none: `join.spill` runs in 0.88x the time (in one process).
        if self.durable:
            tag_prefix = _Q.pack(tag)
            txn.cursor(self._undo).putmulti(
                [(tag_prefix + key, _WAS + old[key] if key in old else _WAS_ABSENT) for key in keys],
                overwrite=False,
            )

        index_puts: list[tuple[bytes, bytes]] = []
        entry_puts: list[tuple[bytes, bytes]] = []
        for key, value, index_key in items:
            before = old.get(key)
            if value is None:
                if before is not None:
                    txn.delete(key, db=self._entries)
                    txn.delete(_index_prefix(before[:8]) + key, db=self._due)
                continue
            entry_puts.append((key, value))
            if before is not None:
                if before[:8] == value[:8]:
                    continue  # same due: the index record stays
                txn.delete(_index_prefix(before[:8]) + key, db=self._due)
            index_puts.append((index_key, b""))
        txn.cursor(self._entries).putmulti(entry_puts)
        index_puts.sort()  # key order is not due order
        txn.cursor(self._due).putmulti(index_puts)

        # Without undo records, no rollback goes below this flush.
        dropped = self._drop_undo(txn, tag - self.undo_keep) if self.durable else tag
        txn.put(_LAST_TAG, _Q.pack(tag), db=self._meta)
        txn.put(_DROPPED, _Q.pack(dropped), db=self._meta)
        return dropped

    def _drop_undo(self, txn: lmdb.Transaction, upto_tag: int) -> int:
        """Delete the undo records of tags <= `upto_tag`; return the newest tag dropped so far."""
        dropped = self._dropped
        if upto_tag < 0:
            return dropped
        bound = _Q.pack(upto_tag)
        cursor = txn.cursor(self._undo)
        if not cursor.first():
            return dropped
        while True:
            undo_key = cursor.key()
            if not undo_key or undo_key[:8] > bound:
                break
            dropped = max(dropped, _Q.unpack_from(undo_key)[0])
            cursor.delete()  # moves to the next record
        return dropped

    def rollback(self, to_tag: int) -> int:
        to_tag = operator.index(to_tag)
        if to_tag < 0:
            raise ValueError(f"to_tag must not be negative, got {to_tag}")
        if to_tag >= self._last_tag:
            return 0
        if to_tag < self._dropped:
            raise SpillStoreError(
                f"cannot roll the spill store {self.path} back to tag {to_tag}: the undo records of tag "
                f"{self._dropped} and older were dropped (undo_keep={self.undo_keep}; a store written with "
                f"recovery off, durable=False, keeps none), so recovery from "
                f"that snapshot is impossible. To reset, stop the flow, remove the state directory "
                f"({self.path} with the rest of the flow's state, its recovery store included) and start afresh; "
                f"to avoid it, raise undo_keep above the number of snapshots between recovery backups."
            )
        restored = self._write(lambda txn: self._rollback_txn(txn, to_tag))
        self._env.sync(True)
        self._last_tag = to_tag
        return restored

    def _rollback_txn(self, txn: lmdb.Transaction, to_tag: int) -> int:
        undo_cursor = txn.cursor(self._undo)
        start = _Q.pack(to_tag + 1)
        # Undoing newest tag first ends, for each key, at the record of the oldest tag above
        # `to_tag` (the value before it): apply only that one.
        before: dict[bytes, bytes] = {}
        if undo_cursor.set_range(start):
            for undo_key, record in undo_cursor.iternext():
                before.setdefault(undo_key[8:], record)
            undo_cursor.set_range(start)
            while undo_cursor.delete():
                pass
        keys = sorted(before)
        now = dict(txn.cursor(self._entries).getmulti(keys))
        for key in keys:
            record = before[key]
            target = None if record == _WAS_ABSENT else record[1:]
            current = now.get(key)
            if current == target:
                continue
            if current is not None and (target is None or current[:8] != target[:8]):
                txn.delete(_index_prefix(current[:8]) + key, db=self._due)
            if target is None:
                txn.delete(key, db=self._entries)
                continue
            if current is None or current[:8] != target[:8]:
                txn.put(_index_prefix(target[:8]) + key, b"", db=self._due)
            txn.put(key, target, db=self._entries)
        txn.put(_LAST_TAG, _Q.pack(to_tag), db=self._meta)
        return len(keys)

    def clear(self) -> None:
        if self._last_tag == 0 and self._dropped == 0 and self._empty():
            return  # nothing to remove: a fresh start pays for no write transaction (and its fsync)

        def work(txn: lmdb.Transaction) -> None:
            for db in (self._entries, self._due, self._undo, self._meta):
                txn.drop(db, delete=False)
            txn.put(_FORMAT, _FORMAT_VERSION, db=self._meta)

        self._write(work)
        self._last_tag = 0
        self._dropped = 0

    def _empty(self) -> bool:
        with self._env.begin() as txn:
            return all(txn.stat(db)["entries"] == 0 for db in (self._entries, self._due, self._undo))

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> LmdbSpillStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LmdbSpillStore({str(self.path)!r}, last_tag={self._last_tag})"

    # -- helpers -------------------------------------------------------------------------------

    def _write(self, work: Callable[[lmdb.Transaction], _T]) -> _T:
        """Run `work` in one write transaction; when the map is full, abort, grow and rerun it
        whole, so a write is never split across transactions."""
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    return work(txn)  # the context manager aborts on any exception
            except lmdb.MapFullError:
                self._grow()

    def _grow(self) -> None:
        try:
            size = grown_size(self._env.info()["map_size"], self.max_map_size, "join spill store", self.path,
                              self.cap_name)
        except LmdbStoreFull as e:
            raise SpillStoreFull(f"{e} (Or add join buckets, or shorten the join window.)") from None
        self._env.set_mapsize(size)

    def _meta_int(self, txn: lmdb.Transaction, name: bytes) -> int:
        raw = txn.get(name, db=self._meta)
        return 0 if raw is None else _Q.unpack(raw)[0]
