"""The LMDB log of the training tables' checkpoints: one write transaction per checkpoint.

One environment, three named databases:
  meta:  tag (8 bytes, big-endian) -> msgpack `CheckpointMeta`: full or increment, the full
         snapshot its chain starts from, per table its small facts and the dtype and shape of each
         part, and the dense weights when they changed.
  fulls: tag -> b"" for each full snapshot (so compaction finds them without decoding metas).
  blobs: tag (8) + table number (4) + part name + chunk (4) -> raw array bytes, at most 64 MiB a
         value: a table's rows of one checkpoint are a handful of large puts, never one per row.
A full snapshot holds every row; an increment the rows changed since the checkpoint before it.
Restoring tag t reads the last full snapshot <= t, then the increments after it in order. LMDB
commits a transaction whole or not at all, so a process killed while writing leaves the log as
the last commit left it. No pickle anywhere: numpy bytes, and msgspec for the metadata.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import lmdb
import msgspec
import numpy as np

from paramserver.lmdb_limits import disk_full, grown_size, initial_size
from paramserver.table import SlotConfig

CHUNK = 64 << 20
DENSE_TABLE = 0xFFFFFFFF


class PartMeta(msgspec.Struct, array_like=True):
    name: str
    dtype: str
    shape: list[int]

    @classmethod
    def of(cls, name: str, a: np.ndarray) -> PartMeta:
        return cls(name, a.dtype.str, list(a.shape))

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * np.prod(self.shape, dtype=np.int64))


class TableMeta(msgspec.Struct):
    name: str
    number: int
    kind: str
    config: SlotConfig
    facts: dict[str, int]
    counts: dict[str, int]
    parts: list[PartMeta]


class DenseMeta(msgspec.Struct):
    version: int
    updated_at: float
    names: list[str]
    parts: list[PartMeta]


class CheckpointMeta(msgspec.Struct):
    tag: int
    full: bool
    base: int
    created_at: float
    tables: list[TableMeta]
    dense: Optional[DenseMeta]
    counts: dict[str, int]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CheckpointMeta)


def _tag_key(tag: int) -> bytes:
    return struct.pack(">Q", tag)


def _blob_key(tag: int, table: int, part: str, chunk: int) -> bytes:
    return struct.pack(">QI", tag, table) + part.encode() + struct.pack(">I", chunk)


class CheckpointStore:
    """Checkpoints of the parameter store under growing integer tags, in LMDB at `path`."""

    def __init__(self, path: str | Path, *, map_size: int = 64 << 20, max_map_size: Optional[int] = None,
                 cap_name: str = "max_map_size") -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_map_size = max_map_size
        self.cap_name = cap_name
        self._env = lmdb.open(str(self.path), map_size=initial_size(map_size, max_map_size), max_dbs=3, subdir=True)
        self._meta = self._env.open_db(b"meta")
        self._fulls = self._env.open_db(b"fulls")
        self._blobs = self._env.open_db(b"blobs")
        # Tests set this to watch a checkpoint being written (called after each put of array data).
        self.on_progress = None

    def close(self) -> None:
        self._env.close()

    @contextmanager
    def _txn(self, write: bool = False, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        try:
            txn = self._env.begin(write=write, buffers=buffers)
        except lmdb.MapResizedError:  # another process grew the map
            self._env.set_mapsize(0)
            txn = self._env.begin(write=write, buffers=buffers)
        try:
            yield txn
        except BaseException:
            txn.abort()
            raise
        else:
            txn.commit()

    # --- reading -------------------------------------------------------------------------------------
    def tags(self) -> list[int]:
        with self._txn() as txn:
            return [struct.unpack(">Q", k)[0] for k in txn.cursor(self._meta).iternext(values=False)]

    def meta(self, tag: int) -> CheckpointMeta:
        with self._txn() as txn:
            raw = txn.get(_tag_key(tag), db=self._meta)
        if raw is None:
            raise KeyError(f"no checkpoint with tag {tag}; there are {self.tags()}")
        return _decoder.decode(raw)

    def chain(self, tag: int) -> list[CheckpointMeta]:
        """The checkpoints that restoring `tag` reads: its full snapshot, then each increment up to it."""
        last = self.meta(tag)
        with self._txn() as txn:
            cur = txn.cursor(self._meta)
            out = []
            if cur.set_range(_tag_key(last.base)):
                for k, v in cur:
                    if struct.unpack(">Q", k)[0] > tag:
                        break
                    out.append(_decoder.decode(v))
        if not out or not out[0].full or out[0].tag != last.base:
            raise KeyError(f"checkpoint {tag}: its full snapshot {last.base} is missing")
        return out

    @contextmanager
    def reader(self) -> Iterator[PartReader]:
        """A read transaction; the arrays it hands out are valid only inside the `with`."""
        with self._txn(buffers=True) as txn:
            yield PartReader(txn, self._blobs)

    # --- writing -------------------------------------------------------------------------------------
    def write(self, meta: CheckpointMeta, blobs: list[tuple[int, str, np.ndarray]], keep_full: int) -> None:
        """Write one checkpoint in one transaction. After a full snapshot, drop every checkpoint
        older than the `keep_full`-th newest full snapshot, in the same transaction."""
        need = sum(a.nbytes for _, _, a in blobs) + (1 << 20)
        self._make_room(need)
        for _ in range(64):
            try:
                with self._txn(write=True) as txn:
                    self._write(txn, meta, blobs, keep_full)
                return
            except lmdb.MapFullError:
                self._grow(grown_size(self._env.info()["map_size"], self.max_map_size, "checkpoint store",
                                      self.path, self.cap_name))
            except lmdb.DiskError as e:
                raise disk_full("checkpoint store", self.path, e) from e
        raise lmdb.MapFullError("checkpoint does not fit even after growing the map 64 times")

    def _write(self, txn: lmdb.Transaction, meta: CheckpointMeta, blobs: list[tuple[int, str, np.ndarray]],
               keep_full: int) -> None:
        tag = meta.tag
        for tab, part, a in blobs:
            raw = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
            for c, off in enumerate(range(0, max(len(raw), 1), CHUNK)):
                txn.put(_blob_key(tag, tab, part, c), raw[off : off + CHUNK], db=self._blobs)
                if self.on_progress is not None:
                    self.on_progress(tab, part, c)
        txn.put(_tag_key(tag), _encoder.encode(meta), db=self._meta)
        if meta.full:
            txn.put(_tag_key(tag), b"", db=self._fulls)
            fulls = [struct.unpack(">Q", k)[0] for k in txn.cursor(self._fulls).iternext(values=False)]
            if len(fulls) > keep_full:
                self._delete(txn, lambda t, floor=fulls[-keep_full]: t < floor)

    def discard_after(self, tag: int) -> None:
        """Forget every checkpoint newer than `tag`."""
        with self._txn(write=True) as txn:
            self._delete(txn, lambda t: t > tag)

    def _delete(self, txn: lmdb.Transaction, doomed) -> None:
        gone = [k for k in txn.cursor(self._meta).iternext(values=False) if doomed(struct.unpack(">Q", k)[0])]
        for k in gone:
            txn.delete(k, db=self._meta)
            txn.delete(k, db=self._fulls)
            cur = txn.cursor(self._blobs)
            if cur.set_range(k):
                while cur.key()[:8] == k and cur.delete():
                    pass

    def _make_room(self, need: int) -> None:
        info = self._env.info()
        used = (info["last_pgno"] + 1) * self._env.stat()["psize"]
        want = used + need + need // 4 + (16 << 20)
        if want > info["map_size"]:
            # At most the cap: whether the write fits under it, only the write itself can tell.
            self._grow(initial_size(max(want, 2 * info["map_size"]), self.max_map_size))

    def _grow(self, size: int) -> None:
        if size > self._env.info()["map_size"]:
            self._env.set_mapsize(size)


class PartReader:
    """Reads the arrays of one checkpoint's table (or dense weights) inside a read transaction."""

    def __init__(self, txn: lmdb.Transaction, db) -> None:
        self._txn = txn
        self._db = db

    def part(self, tag: int, table: int, meta: PartMeta) -> np.ndarray:
        n = meta.nbytes
        chunks = max(1, -(-n // CHUNK))
        if chunks == 1:
            raw = self._txn.get(_blob_key(tag, table, meta.name, 0), db=self._db)
            buf = np.frombuffer(raw, np.uint8)
        else:
            buf = np.empty(n, np.uint8)
            for c in range(chunks):
                raw = self._txn.get(_blob_key(tag, table, meta.name, c), db=self._db)
                buf[c * CHUNK : c * CHUNK + len(raw)] = np.frombuffer(raw, np.uint8)
        if len(buf) != n:
            raise ValueError(f"checkpoint {tag}: part {meta.name} of table {table} has {len(buf)} bytes, not {n}")
        return buf.view(np.dtype(meta.dtype)).reshape(meta.shape)

    def parts(self, tag: int, table: int, metas: list[PartMeta]) -> dict[str, np.ndarray]:
        return {m.name: self.part(tag, table, m) for m in metas}
