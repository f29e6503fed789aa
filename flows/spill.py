# cython: annotation_typing=False
"""The on-disk join state of one join bucket: the RocksDB of the Flink job (DESIGN.md, Decisions).

The joiner's write-back cache flushes here once per epoch, in one LMDB transaction tagged with its
snapshot number; undo records let a resume roll back to that number. Plain LMDB, no Bytewax.

setup.py compiles this module with Cython as plain Python (no annotation typing: the same
semantics, a quarter less time a flush); uncompiled it runs the same. `COMPILED` says which.
"""

from __future__ import annotations

import bisect
import operator
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Optional, Protocol, TypeVar

import cython
import lmdb

from flows.compiled import check_built_from
from flows.dueindex import DueIndex, due_of_prefix, due_prefix, entry_keys, flush_plan, flush_settle
from paramserver.lmdb_limits import LmdbStoreFull, disk_full, grown_size, initial_size

Entry = tuple[float, bytes]  # (due, payload)

_T = TypeVar("_T")
_Q = struct.Struct(">Q")
_U16 = struct.Struct(">H")
_WAS_ABSENT = b"\x00"
_WAS = b"\x01"
_LAST_TAG = b"last_tag"
_DROPPED = b"dropped"  # the newest tag whose undo records were dropped: no rollback below it
_FORMAT = b"format"
_FORMAT_VERSION = b"2"  # bump when a layout below changes; an old directory is then refused, not misread
_DATA_FILE = "data.mdb"
COMPILED: bool = cython.compiled
_BUILT_FROM: Optional[str] = None  # when compiled: the sha256 of the source it was compiled from (setup.py)

if COMPILED:
    check_built_from(__file__, "spill.py", _BUILT_FROM)


class SpillStoreError(Exception):
    """The spill store cannot do what was asked; the message says what to do about it."""


class SpillStoreFull(SpillStoreError, LmdbStoreFull):
    """A flush needs more room than `max_map_size` allows; the store is as it was before it."""


class SpillStore(Protocol):
    """The join state of one bucket on disk: entries `key -> (due, payload)` with an index by due.

    Writes come only through `flush`, one call per epoch (or under memory pressure), tagged with
    a snapshot number that never decreases; `rollback` undoes the flushes newer than a tag.
    """

    def get(self, key: str) -> Entry | None:
        """The (due, payload) stored under `key`, or None."""
        ...

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        """`get` for each key, in order, in one read transaction."""
        ...

    def held(self, keys: list[str]) -> list[int]:
        """The positions in `keys` of those the store may hold, answered from memory: all that it
        holds, and perhaps a few that it does not (`get_many` tells)."""
        ...

    def due(
        self, upto: float, start: tuple[float, str] | None = None, *, limit: int = 100_000
    ) -> list[tuple[float, str]]:
        """(due, key) of the entries with due <= `upto`, in (due, key) order, strictly after
        `start` when given, at most `limit` of them (page on by passing the last one as `start`)."""
        ...

    def flush(self, tag: int, writes: Mapping[str, Entry | None], *, durable: bool = True) -> None:
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


def _undo_record(entry_key: bytes, old: bytes | None) -> bytes:
    """What the undo db holds for one entry key changed by a flush: whether it was absent, or its
    value then."""
    head = _U16.pack(len(entry_key)) + entry_key
    return _WAS_ABSENT + head if old is None else _WAS + head + old


class LmdbSpillStore:
    """`SpillStore` in one LMDB environment (one directory per bucket).

    Named databases: `entries` (`due_prefix(due)` + key -> payload: a cursor walks them in due
    order, and a flush's puts and expiry's deletes walk the B-tree in order, where a key of its own
    would cost each a page copy and write somewhere: 5-7 µs against 1-2), `undo` (8-byte
    big-endian tag + 8-byte sequence number -> whether an entry key was absent before that tag, or
    its value then), and `meta`. In memory, a `DueIndex` (16 bytes a slot) finds the due of a key;
    the rare key whose hash another one holds has its due in a dict. Both are rebuilt from
    `entries` when the store opens and after a rollback.
    Keys are str (join keys) of at most 503 bytes in UTF-8 (LMDB's 511 less the due prefix); the
    index hashes them as str, whose hash Python keeps with the string: a lookup hashes nothing.
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
        hash_bits: int = 64,
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
        self._hash_bits = hash_bits  # below 64 only in tests: keys then share hashes
        self._index = DueIndex(hash_bits=hash_bits)
        self._shared: dict[str, float] = {}  # key -> due, for keys whose hash the index gives another
        # (entry key a `due` scan started after, the first entry key past it or None): see `due`.
        self._ahead: tuple[bytes, bytes | None] | None = None
        self.path.mkdir(parents=True, exist_ok=True)
        self._map_size = map_size
        self._lmdb: lmdb.Environment | None = None
        self._closed = False
        self._last_tag = 0
        self._dropped = 0
        # A store with no data file holds nothing: it opens its environment at its first write (a
        # bucket whose join state never leaves memory, recovery off, never creates one: opening
        # eight took a tenth of `join.in_memory`'s run). One with data opens now, to read it.
        if (self.path / _DATA_FILE).exists():
            self._open_env()

    @property
    def _env(self) -> lmdb.Environment:
        """The LMDB environment, opened at its first use."""
        env = self._lmdb
        return env if env is not None else self._open_env()

    def _open_env(self) -> lmdb.Environment:
        if self._closed:
            raise SpillStoreError(f"spill store {self.path} is closed")
        map_size = self._map_size
        data_file = self.path / _DATA_FILE
        if data_file.exists():
            # Start at the size the data already has, so the first flush after a reopen does not
            # pay for a failed transaction and a growth step.
            map_size = max(map_size, os.path.getsize(data_file))
        env = lmdb.open(
            str(self.path),
            map_size=map_size,
            subdir=True,
            max_dbs=3,
            # LMDB copies its pages with write(), not through a writable map: a stray write through
            # the map could corrupt the file, and LMDB's writable map is a sparse file, so a full
            # disk would kill the flow with SIGBUS where write() fails the commit (`_write` names
            # the store).
            # (For a store no resume reads, the map took 4-6% off `join.spill`'s run: not worth it.)
            writemap=False,
            # Every commit syncs its data pages, so a system crash can at worst undo the last
            # commits whole (ACI kept); a durable flush also syncs the meta page (`flush`). The
            # undo records are what makes a resume correct.
            sync=self.durable,
            metasync=False,
            lock=True,
            readahead=False,  # reads are random lookups by join key
        )
        try:
            with env.begin(write=True) as txn:
                self._entries = env.open_db(b"entries", txn=txn)
                self._undo = env.open_db(b"undo", txn=txn)
                self._meta = env.open_db(b"meta", txn=txn)
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
            self._lmdb = env
            self._rebuild_index()
        except BaseException:
            self._lmdb = None
            env.close()
            raise
        return env

    # -- reads ---------------------------------------------------------------------------------

    def _due_of(self, key: str) -> float:
        """The due `key` is stored under, if it is stored (NaN if not); when the index answers,
        the key may be another one with the same hash: its entry key then is not in `entries`."""
        if self._shared:
            due = self._shared.get(key)
            if due is not None:
                return due
        return self._index.get(key)

    def get(self, key: str) -> Entry | None:
        return self.get_many([key])[0]

    def held(self, keys: list[str]) -> list[int]:
        # Those whose hash the index holds, and those in `_shared`.
        found = self._index.hits(keys)
        shared = self._shared
        if shared:
            found = sorted(set(found).union(i for i, key in enumerate(keys) if key in shared))
        return found

    def get_many(self, keys: Sequence[str]) -> list[Entry | None]:
        if type(keys) is not list:
            keys = list(keys)
        out: list[Entry | None] = [None] * len(keys)
        # Only keys the index knows need LMDB: a batch of new keys opens no transaction.
        found = entry_keys(self._index, self._shared, keys)
        if not found:
            return out
        with self._env.begin(db=self._entries) as txn:
            get = txn.get
            for entry_key, i, due in found:
                value = get(entry_key)
                if value is not None:  # None: another key with the same hash
                    out[i] = (due, value)
        return out

    def due(
        self, upto: float, start: tuple[float, str] | None = None, *, limit: int = 100_000
    ) -> list[tuple[float, str]]:
        if upto != upto or limit <= 0 or self._lmdb is None:  # no environment yet: nothing stored
            return []
        bound = due_prefix(upto)
        after = b"" if start is None else due_prefix(start[0]) + start[1].encode()
        # The joiner asks after every batch, mostly to find nothing due: the first entry key past
        # `after` seen by the last scan (kept up by flushes) answers that without a transaction.
        ahead = self._ahead
        if ahead is not None and ahead[0] == after and (ahead[1] is None or ahead[1][:8] > bound):
            return []
        out: list[tuple[float, str]] = []
        self._ahead = None
        with self._env.begin(db=self._entries) as txn:
            cursor = txn.cursor()
            positioned = cursor.set_range(after) if after else cursor.first()
            if positioned and cursor.key() == after:
                positioned = cursor.next()
            if not positioned:
                self._ahead = (after, None)
                return out
            for entry_key in cursor.iternext(keys=True, values=False):
                prefix = entry_key[:8]
                if prefix > bound:
                    self._ahead = (after if not out else due_prefix(out[-1][0]) + out[-1][1].encode(), entry_key)
                    break
                out.append((due_of_prefix(prefix), entry_key[8:].decode()))
                if len(out) >= limit:
                    break
            else:
                self._ahead = (after if not out else due_prefix(out[-1][0]) + out[-1][1].encode(), None)
        return out

    def last_tag(self) -> int:
        return self._last_tag

    def __len__(self) -> int:
        return len(self._index) + len(self._shared)

    def disk_bytes(self) -> int:
        # Pages up to the high-water mark, free ones included: what the data file holds.
        if self._lmdb is None:
            return 0
        return (self._env.info()["last_pgno"] + 1) * self._env.stat()["psize"]

    # -- writes --------------------------------------------------------------------------------

    def flush(self, tag: int, writes: Mapping[str, Entry | None], *, durable: bool = True) -> None:
        tag = operator.index(tag)
        if tag < 0 or tag >= 1 << 64:
            raise ValueError(f"tag must be in [0, 2**64), got {tag}")
        if tag < self._last_tag:
            raise ValueError(
                f"flush tag {tag} is below the last flushed tag {self._last_tag} of {self.path}: tags only grow"
            )
        if not self.durable:
            self._flush_undoless(tag, writes)
            return
        # Entry keys, old (where the index says the key is) and new, are made once, outside the
        # transaction, which a full map makes run again.
        # Each item leads with the entry key it sorts by (the old one, else the new), so a plain
        # sort puts them in entry-key order (entry keys are unique: a join key each).
        items: list[tuple[bytes, str, bytes | None, bytes | None, bytes]] = []
        due_of = self._due_of
        for key, entry in writes.items():
            due = due_of(key)
            raw = key.encode()
            if due != due:
                if entry is not None:
                    new_key = due_prefix(entry[0]) + raw
                    items.append((new_key, key, None, new_key, entry[1]))
            else:
                old_key = due_prefix(due) + raw
                items.append((old_key, key, old_key, None if entry is None else due_prefix(entry[0]) + raw,
                              b"" if entry is None else entry[1]))
        items.sort()
        dropped, moved = self._write(lambda txn: self._flush_txn(txn, tag, items))
        self._last_tag = tag
        self._dropped = dropped
        self._settle([key for key, old_key, _ in moved if old_key is not None],
                     [(key, due_of_prefix(new_key)) for key, _, new_key in moved if new_key is not None],
                     sorted(new_key for _, _, new_key in moved if new_key is not None))
        # Last: the memory above follows what is committed even if the sync fails.
        if durable and self.durable:
            self._env.sync(True)  # the meta page too: this flush survives a system crash

    def _flush_undoless(self, tag: int, writes: Mapping[str, Entry | None]) -> None:
        """`flush` for a store that keeps no undo records: every delete, then every put, each in
        entry-key order (a key whose entry key stays is deleted and put again)."""
        if type(writes) is not dict:
            writes = dict(writes)
        deletes, puts, placed = flush_plan(self._index, self._shared, writes)

        def work(txn: lmdb.Transaction) -> list[str]:
            delete = txn.delete
            db = self._entries
            gone = [key for entry_key, key in deletes if delete(entry_key, db=db)]
            if puts:
                txn.cursor(db).putmulti(puts)
            txn.put(_LAST_TAG, _Q.pack(tag), db=self._meta)
            txn.put(_DROPPED, _Q.pack(tag), db=self._meta)
            return gone

        gone = self._write(work)
        self._last_tag = tag
        self._dropped = tag  # no undo records: no rollback below this flush
        self._settle(gone, placed, [entry_key for entry_key, _ in puts])

    def _settle(self, gone: list[str], placed: list[tuple[str, float]], new_keys: list[bytes]) -> None:
        """The memory after a committed flush: the index loses the keys whose entries were deleted
        (`gone`; a delete that found no entry was of a key that shares its hash with a stored one,
        which keeps it), then gains the keys put (`placed`, their entry keys `new_keys`, sorted);
        the due scan's look-ahead takes the first entry key put past where it started, if that is
        below the one it kept (a deleted one leaves it a lower bound: still right)."""
        flush_settle(self._index, self._shared, gone, placed)
        ahead = self._ahead
        if ahead is not None and new_keys:
            i = bisect.bisect_right(new_keys, ahead[0])
            if i < len(new_keys) and (ahead[1] is None or new_keys[i] < ahead[1]):
                self._ahead = (ahead[0], new_keys[i])

    def _locate(self, key: str, due: float) -> None:
        """Index a key newly stored under `due` (its hash free, else in `_shared`)."""
        if not self._index.add(key, due):
            self._shared[key] = due

    def _flush_txn(
        self, txn: lmdb.Transaction, tag: int, items: list[tuple[bytes, str, bytes | None, bytes | None, bytes]]
    ) -> tuple[int, list[tuple[str, bytes | None, bytes | None]]]:
        """Apply `items` (in entry-key order: the entry key it sorts by, key, its entry key now or
        None, its entry key after or None, payload); return the tags dropped and, for the index,
        each key whose entry key changed: (key, the one it left or None, the one it has now or None)."""
        entries = self._entries
        keep_undo = self.durable
        pop = txn.pop
        delete = txn.delete
        replace = txn.replace
        undo: list[tuple[bytes, bytes | None]] = []  # (entry key, its value before or None)
        moved: list[tuple[str, bytes | None, bytes | None]] = []
        puts: list[tuple[bytes, bytes]] = []
        # In entry-key order, so the changes walk the B-tree from left to right.
        for _, key, old_key, new_key, payload in items:
            if old_key is not None and old_key == new_key:
                old = replace(old_key, payload, db=entries)
                if keep_undo:
                    undo.append((old_key, old))
                if old is not None:
                    continue  # same entry key: the index stays
                # Absent: the index's due was another key's, with the same hash.
                moved.append((key, None, new_key))
                continue
            if old_key is not None:
                if keep_undo:
                    old = pop(old_key, db=entries)
                    if old is not None:
                        undo.append((old_key, old))
                    existed = old is not None
                else:  # no undo record: nothing needs the old value copied out
                    existed = delete(old_key, db=entries)
                if not existed:
                    old_key = None  # as above
            if new_key is not None:
                puts.append((new_key, payload))
                if keep_undo:
                    undo.append((new_key, None))
            if old_key is not None or new_key is not None:
                moved.append((key, old_key, new_key))
        if puts:
            puts.sort()
            txn.cursor(entries).putmulti(puts)

        # Undo records, from the values as they were. A later record for the same entry key and
        # tag (a second flush with the tag) changes nothing: a rollback applies the first.
        if undo:
            seq = self._undo_next(txn)
            tag_prefix = _Q.pack(tag)
            txn.cursor(self._undo).putmulti(
                [(tag_prefix + _Q.pack(seq + i), _undo_record(k, v)) for i, (k, v) in enumerate(undo)])

        # Without undo records, no rollback goes below this flush.
        dropped = self._drop_undo(txn, tag - self.undo_keep) if self.durable else tag
        txn.put(_LAST_TAG, _Q.pack(tag), db=self._meta)
        txn.put(_DROPPED, _Q.pack(dropped), db=self._meta)
        return dropped, moved

    def _undo_next(self, txn: lmdb.Transaction) -> int:
        """The next undo sequence number: above every record's, so records of one tag keep their order."""
        cursor = txn.cursor(self._undo)
        return _Q.unpack_from(cursor.key(), 8)[0] + 1 if cursor.last() else 0

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
        self._last_tag = to_tag
        self._rebuild_index()
        self._env.sync(True)  # last, as in `flush`
        return restored

    def _rollback_txn(self, txn: lmdb.Transaction, to_tag: int) -> int:
        undo_cursor = txn.cursor(self._undo)
        start = _Q.pack(to_tag + 1)
        # The first record of each entry key above `to_tag` holds its value before: apply only that.
        before: dict[bytes, bytes | None] = {}
        if undo_cursor.set_range(start):
            for record in undo_cursor.iternext(keys=False, values=True):
                n = _U16.unpack_from(record, 1)[0]
                entry_key = record[3:3 + n]
                if entry_key not in before:
                    before[entry_key] = None if record[:1] == _WAS_ABSENT else record[3 + n:]
            undo_cursor.set_range(start)
            while undo_cursor.delete():
                pass
        entries = self._entries
        for entry_key in sorted(before):
            old = before[entry_key]
            if old is None:
                txn.delete(entry_key, db=entries)
            else:
                txn.put(entry_key, old, db=entries)
        txn.put(_LAST_TAG, _Q.pack(to_tag), db=self._meta)
        return len({entry_key[8:] for entry_key in before})

    def _rebuild_index(self) -> None:
        """The in-memory index from `entries`: one pass over its keys, in due order."""
        self._index = DueIndex(hash_bits=self._hash_bits)
        self._shared = {}
        self._ahead = None
        locate = self._locate
        with self._env.begin(db=self._entries) as txn:
            for entry_key in txn.cursor().iternext(keys=True, values=False):
                locate(entry_key[8:].decode(), due_of_prefix(entry_key))

    def clear(self) -> None:
        if self._last_tag == 0 and self._dropped == 0 and self._empty():
            return  # nothing to remove: a fresh start pays for no write transaction (and its fsync)

        def work(txn: lmdb.Transaction) -> None:
            for db in (self._entries, self._undo, self._meta):
                txn.drop(db, delete=False)
            txn.put(_FORMAT, _FORMAT_VERSION, db=self._meta)

        self._write(work)
        self._last_tag = 0
        self._dropped = 0
        self._index = DueIndex(hash_bits=self._hash_bits)
        self._shared = {}
        self._ahead = None

    def _empty(self) -> bool:
        if self._lmdb is None:
            return True
        with self._env.begin() as txn:
            return all(txn.stat(db)["entries"] == 0 for db in (self._entries, self._undo))

    def close(self) -> None:
        self._closed = True
        if self._lmdb is not None:
            self._lmdb.close()

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
            except lmdb.DiskError as e:  # ENOSPC from a write() of the commit: nothing of it is kept
                raise SpillStoreFull(str(disk_full("join spill store", self.path, e))) from e

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
