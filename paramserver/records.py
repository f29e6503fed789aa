"""The records of the `param-deltas` stream: everything a serving store holds, as (key, value) bytes.

Every write to a serving store (the primary's and every replica's) is a list of these records, and
the primary produces the very same records to Kafka, so a replica fed by the topic serves like the
primary. Encoding and decoding work on many records at once (numpy structured arrays); no pickle.

Keys (UTF-8) and values:

- `<slot>/<id>`: an embedding row, the row record below (little-endian, packed, no padding)::

      offset size  field
      0      1     u8   format version (ROW_FORMAT = 1)
      1      8     u64  row version (grows by one per update of the row)
      9      8     f64  update time (seconds since the epoch, the training store's wall clock)
      17     8     f64  earliest arrival time of the actions behind the update (NaN: unknown)
      25     4     u32  dim
      29     4*dim f32  the values

  (29 + 4*dim bytes: 157 for dim 32.) `slot` is never `dense`, `item` or `user` and holds no `/`;
  `id` is anything (the key splits at its first `/`).
- `dense/<name>/<chunk>`: chunk number `chunk` (decimal) of the dense array `name`, whose raw
  bytes (C order, little-endian) are cut into chunks of at most `DENSE_CHUNK_BYTES`::

      offset size  field
      0      1     u8   format version (DENSE_FORMAT = 1)
      1      8     u64  version of the dense weights (DenseBlob.version)
      9      8     f64  update time (DenseBlob.updated_at)
      17     4     u32  chunk index
      21     4     u32  chunk count of this array (at least 1, also for an empty array)
      25     4     u32  number of arrays in the blob of this version
      29     1     u8   length L of the dtype string
      30     L     the numpy dtype string, ASCII (for example `<f4`)
      30+L   1     u8   ndim
      31+L   8*nd  u64  the shape
      then   the chunk's bytes

  Every chunk carries the whole header, so any one of them says which blob it belongs to and how
  many chunks make it whole.
- `item/<id>`: the catalog entry of an item, a JSON object. The flow's catalog (flows/catalog.py)
  writes these fields; a reader ignores fields it does not know::

      item_id      the item's id
      ts           event time it entered the catalog: its first item event's ts, else (an item
                   only feature events describe) its first feature event's
      updated_ts   event time of the event whose features the entry holds
      sparse       string -> string or list of strings, as in the events
      dense        string -> number
      impressions  feature events seen for the item (served impressions), ever
      positives    positive actions on the item (CONTRACT.md; `watch` per FRESHREC_WATCH_POSITIVE_S)
      source       `items` (the items stream described it: its latest item event's features win)
                   or `features` (only feature events have: the latest one carrying features)
      counts_at    the flow's own bookkeeping, for exact counts through a crash: {"run", "at":
                   [[snapshot, impressions, positives, attempt], ...], "cut"}; not for readers

- `user/<id>`: a user's recent actions (any action, negatives included), a msgpack array of
  `[item_id (str), action (str), ts (float)]` in ts order, oldest first, at most
  FRESHREC_USER_RECENT of the newest; an action already in the list (same item, action and ts) is
  not repeated. (Stores written before it was msgpack hold the same array as JSON: readers read
  both, told apart by the first byte, `[` for JSON. msgpack: the flow writes a user's whole list
  at every sync that touches it, and JSON spent 6x as long formatting the floats.)

A key longer than `MAX_KEY_BYTES` (511, LMDB's limit: ids are up to 128 characters, so up to 512
bytes of UTF-8, and sparse values any length) holds, in place of its id, `LONG_ID_MARK` (`\x1f#`)
and the 40 hex digits of the id's BLAKE2b-160: `item/\x1f#<hex>`. Readers make keys with the same
functions; one that needs the id back takes it from the value (`item_id` of a catalog entry).

An empty value (on Kafka, a null value, so that compaction removes the key) is a tombstone: the
key is deleted (an evicted row, an array chunk no longer used, an item leaving the catalog).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import numpy as np

from paramserver.rows import DenseBlob, RowBatch

__all__ = [
    "DENSE_CHUNK_BYTES",
    "DENSE_FORMAT",
    "LONG_ID_MARK",
    "MAX_KEY_BYTES",
    "RESERVED_PREFIXES",
    "ROW_FORMAT",
    "ROW_HEADER_BYTES",
    "DecodedRows",
    "DenseChunk",
    "RecordError",
    "Records",
    "UserActions",
    "check_slot",
    "decode_dense",
    "decode_dense_chunk",
    "decode_item",
    "decode_row_values",
    "decode_rows",
    "decode_user_actions",
    "dense_key",
    "encode_dense",
    "encode_item",
    "encode_row_batch",
    "encode_rows",
    "encode_user_actions",
    "item_key",
    "key_ids",
    "key_kind",
    "long_id",
    "row_dtype",
    "row_key",
    "row_keys",
    "split_bytes",
    "split_row_key",
    "user_key",
]

ROW_FORMAT = 1
DENSE_FORMAT = 1
ROW_HEADER_BYTES = 29
DENSE_CHUNK_BYTES = 512 * 1024
RESERVED_PREFIXES = ("dense", "item", "user")

_DENSE_PREFIX = b"dense/"
_ITEM_PREFIX = b"item/"
_USER_PREFIX = b"user/"
_DENSE_HEAD = struct.Struct("<BQdIIIB")  # format .. array count, dtype string length
_U64 = struct.Struct("<Q")
_ROW_VERSION_AT = 1
_ROW_DIM = struct.Struct("<I")
_ROW_DIM_AT = 25

_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


class RecordError(ValueError):
    """A record (or a key) is not what the format above says; the message says which and why."""


# ---------------------------------------------------------------------------------------- keys


MAX_KEY_BYTES = 511  # LMDB's compile-time limit on a key's size
LONG_ID_MARK = "\x1f#"


def long_id(id: str) -> str:
    """What stands for an id in a key that would be longer than LMDB takes."""
    return LONG_ID_MARK + hashlib.blake2b(id.encode(), digest_size=20).hexdigest()


def _key(prefix: str, id: str) -> bytes:
    key = (prefix + id).encode()
    return key if len(key) <= MAX_KEY_BYTES else (prefix + long_id(id)).encode()


def check_slot(slot: str) -> str:
    if not slot or "/" in slot or slot in RESERVED_PREFIXES:
        raise RecordError(f"slot name {slot!r} cannot make row keys: it must be non-empty, hold no '/' "
                          f"and be none of {RESERVED_PREFIXES}")
    return slot


def row_key(slot: str, id: str) -> bytes:
    return _key(check_slot(slot) + "/", id)


def row_keys(slot: str, ids: Sequence[str]) -> list[bytes]:
    """`row_key(slot, id)` for each id, in one go (a join and a split rather than n formats)."""
    prefix = check_slot(slot) + "/"
    if not ids:
        return []
    joined = prefix + ("\0" + prefix).join(ids)
    if joined.count("\0") == len(ids) - 1:
        keys = joined.encode().split(b"\0")
        if max(map(len, keys)) <= MAX_KEY_BYTES:
            return keys
    return [_key(prefix, i) for i in ids]  # some id holds a NUL, or is too long for a key: the slow way


def key_ids(slot: str, ids: Sequence[str]) -> list[str]:
    """The ids as `row_keys(slot, ids)` holds them: each id, or `long_id(id)` where the key would
    be too long."""
    limit = MAX_KEY_BYTES - len(check_slot(slot).encode()) - 1
    return [i if len(i.encode()) <= limit else long_id(i) for i in ids]


def split_row_key(key: bytes) -> tuple[str, str]:
    slot, sep, id_ = key.decode().partition("/")
    if not sep:
        raise RecordError(f"key {key!r} is not <slot>/<id>")
    return slot, id_


def dense_key(name: str, chunk: int) -> bytes:
    if not name or "/" in name:
        raise RecordError(f"dense array name {name!r} must be non-empty and hold no '/'")
    return f"dense/{name}/{chunk}".encode()


def item_key(item_id: str) -> bytes:
    return _key("item/", item_id)


def user_key(user_id: str) -> bytes:
    return _key("user/", user_id)


def key_kind(key: bytes) -> str:
    """`row`, `dense`, `item` or `user`."""
    if key.startswith(_ITEM_PREFIX):
        return "item"
    if key.startswith(_USER_PREFIX):
        return "user"
    if key.startswith(_DENSE_PREFIX):
        return "dense"
    return "row"


# ---------------------------------------------------------------------------------------- rows


_ROW_DTYPES: dict[int, np.dtype] = {}


def row_dtype(dim: int) -> np.dtype:
    """The packed structured dtype of a row record of `dim` values."""
    dt = _ROW_DTYPES.get(dim)
    if dt is None:
        dt = np.dtype([("format", "u1"), ("version", "<u8"), ("updated_at", "<f8"),
                       ("arrival", "<f8"), ("dim", "<u4"), ("values", "<f4", (dim,))])
        assert dt.itemsize == ROW_HEADER_BYTES + 4 * dim
        _ROW_DTYPES[dim] = dt
    return dt


def encode_rows(values: np.ndarray, versions: Any, updated_at: Any, arrivals: Any) -> list[bytes]:
    """Row records of `values` (n, dim) with their versions, update times and earliest arrivals
    (each an array of n or a scalar)."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise RecordError(f"row values must be 2-d (n, dim), not of shape {values.shape}")
    n, dim = values.shape
    rec = np.empty(n, row_dtype(dim))
    rec["format"] = ROW_FORMAT
    rec["version"] = versions
    rec["updated_at"] = updated_at
    rec["arrival"] = arrivals
    rec["dim"] = dim
    rec["values"] = values
    return split_bytes(rec.tobytes(), rec.itemsize)


_SPLIT_ROWS = 8192


def split_bytes(buf: bytes, size: int) -> list[bytes]:
    """`buf` cut into pieces of `size` bytes: one struct unpack per 8192 pieces, about twice as
    fast as slicing them one by one."""
    n = len(buf) // size
    out: list[bytes] = []
    whole = n - n % _SPLIT_ROWS
    if whole:
        cut = struct.Struct(f"{size}s" * _SPLIT_ROWS)
        for at in range(0, whole * size, _SPLIT_ROWS * size):
            out += cut.unpack_from(buf, at)
    if n > whole:
        out += struct.unpack_from(f"{size}s" * (n - whole), buf, whole * size)
    return out


class DecodedRows(NamedTuple):
    values: np.ndarray  # float32 (n, dim)
    versions: np.ndarray  # uint64 (n,)
    updated_at: np.ndarray  # float64 (n,)
    arrivals: np.ndarray  # float64 (n,), NaN where unknown


def decode_rows(values: Sequence[bytes], dim: int | None = None) -> DecodedRows:
    """The rows of many row records at once; `dim` is checked when given, else read from them.

    Raises RecordError when a record is not a row record of format 1 or the dims differ.
    """
    if not values:
        d = dim or 0
        return DecodedRows(np.zeros((0, d), np.float32), np.zeros(0, np.uint64), np.zeros(0), np.zeros(0))
    rec = _row_records(values, dim)
    return DecodedRows(rec["values"].copy(), rec["version"].copy(), rec["updated_at"].copy(), rec["arrival"].copy())


def decode_row_values(values: Sequence[bytes], dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values (n, dim) float32, versions (n,) uint64) of row records, checked as `decode_rows`
    checks them: what a reader needs, without copying the times out too."""
    if not values:
        return np.zeros((0, dim or 0), np.float32), np.zeros(0, np.uint64)
    rec = _row_records(values, dim)
    return rec["values"].copy(), rec["version"].copy()


def _row_records(values: Sequence[bytes], dim: int | None) -> np.ndarray:
    """Row records (at least one) as one structured array over their joined bytes, checked."""
    n = len(values)
    first = values[0]
    if len(first) < ROW_HEADER_BYTES:
        raise RecordError(f"a row record of {len(first)} bytes is shorter than its {ROW_HEADER_BYTES}-byte header")
    d = _ROW_DIM.unpack_from(first, _ROW_DIM_AT)[0]
    if dim is not None and d != dim:
        raise RecordError(f"row records hold dim {d}, not the {dim} asked for")
    dt = row_dtype(d)
    joined = b"".join(values)
    if len(joined) != n * dt.itemsize or len(set(map(len, values))) != 1:
        raise RecordError(f"row records of different sizes (expected {dt.itemsize} bytes each, for dim {d})")
    rec = np.frombuffer(joined, dt)
    if (rec["format"] != ROW_FORMAT).any() or (rec["dim"] != d).any():
        bad = int(np.flatnonzero((rec["format"] != ROW_FORMAT) | (rec["dim"] != d))[0])
        raise RecordError(f"row record {bad} has format {rec['format'][bad]} and dim {rec['dim'][bad]}; "
                          f"expected format {ROW_FORMAT} and dim {d}")
    return rec


def encode_row_batch(batch: RowBatch) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(tombstone keys of the evicted ids, keys, row records) of a RowBatch."""
    keys = row_keys(batch.slot, batch.ids)
    tombs = row_keys(batch.slot, batch.evicted)
    vals = encode_rows(batch.values, batch.versions, batch.updated_at, batch.earliest_arrival)
    return tombs, keys, vals


# --------------------------------------------------------------------------------------- dense


@dataclass(frozen=True)
class DenseChunk:
    name: str
    version: int
    updated_at: float
    index: int
    count: int
    arrays: int
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def encode_dense(blob: DenseBlob, chunk_bytes: int = DENSE_CHUNK_BYTES) -> list[tuple[bytes, bytes]]:
    """The records of a dense blob: each array's bytes in chunks of at most `chunk_bytes`."""
    if chunk_bytes <= 0:
        raise RecordError("chunk_bytes must be positive")
    out = []
    for name, arr in blob.arrays.items():
        a = np.asarray(arr)
        if a.dtype.kind not in "biuf":
            raise RecordError(f"dense array {name!r} has dtype {a.dtype}; only numbers travel")
        a = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")  # (ascontiguousarray makes 0-d 1-d)
        raw = a.tobytes()
        count = max(1, math.ceil(len(raw) / chunk_bytes))
        dts = a.dtype.str.encode()
        head = (_DENSE_HEAD.pack(DENSE_FORMAT, blob.version, blob.updated_at, 0, count, len(blob.arrays), len(dts))
                + dts + bytes([a.ndim]) + b"".join(_U64.pack(s) for s in a.shape))
        for i in range(count):
            h = bytearray(head)
            struct.pack_into("<I", h, 17, i)
            out.append((dense_key(name, i), bytes(h) + raw[i * chunk_bytes:(i + 1) * chunk_bytes]))
    return out


def decode_dense_chunk(key: bytes, value: bytes) -> DenseChunk:
    parts = key.split(b"/")
    if len(parts) != 3 or parts[0] != b"dense" or not parts[2].isdigit():
        raise RecordError(f"key {key!r} is not dense/<name>/<chunk>")
    try:
        fmt, version, updated_at, index, count, arrays, ldt = _DENSE_HEAD.unpack_from(value, 0)
        at = _DENSE_HEAD.size
        dts = value[at:at + ldt].decode("ascii")
        ndim = value[at + ldt]
        at += ldt + 1
        shape = tuple(_U64.unpack_from(value, at + 8 * k)[0] for k in range(ndim))
        at += 8 * ndim
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise RecordError(f"dense chunk {key!r}: truncated or malformed header ({exc})") from None
    if fmt != DENSE_FORMAT:
        raise RecordError(f"dense chunk {key!r} has format {fmt}, not {DENSE_FORMAT}")
    if int(parts[2]) != index:
        raise RecordError(f"dense chunk {key!r} says it is chunk {index}")
    return DenseChunk(parts[1].decode(), version, updated_at, index, count, arrays, dts, shape, value[at:])


def decode_dense(records: Iterable[tuple[bytes, bytes]]) -> DenseBlob | None:
    """The blob the chunk records make (None for no records). Raises RecordError unless they make
    exactly one whole blob: one version, every array with all its chunks."""
    by_name: dict[str, list[DenseChunk]] = {}
    for k, v in records:
        c = decode_dense_chunk(k, v)
        by_name.setdefault(c.name, []).append(c)
    if not by_name:
        return None
    chunks = [c for cs in by_name.values() for c in cs]
    versions = {c.version for c in chunks}
    if len(versions) != 1:
        raise RecordError(f"dense chunks of several versions {sorted(versions)}")
    if any(c.arrays != len(by_name) for c in chunks):
        raise RecordError(f"dense blob of {chunks[0].arrays} arrays has chunks of {len(by_name)}")
    arrays = {}
    for name, cs in by_name.items():
        cs.sort(key=lambda c: c.index)
        head = cs[0]
        if [c.index for c in cs] != list(range(head.count)) or any(
                (c.count, c.dtype, c.shape) != (head.count, head.dtype, head.shape) for c in cs):
            raise RecordError(f"dense array {name!r}: chunks {[c.index for c in cs]} of {head.count}, or they disagree")
        dt = np.dtype(head.dtype)
        raw = b"".join(c.data for c in cs)
        if len(raw) != dt.itemsize * math.prod(head.shape):
            raise RecordError(f"dense array {name!r}: {len(raw)} bytes for shape {head.shape} of {dt}")
        arrays[name] = np.frombuffer(raw, dt).reshape(head.shape).astype(dt.newbyteorder("="))
    return DenseBlob(version=chunks[0].version, arrays=arrays, updated_at=chunks[0].updated_at)


# ------------------------------------------------------------------------------ catalog, users


def encode_item(features: Mapping[str, Any]) -> bytes:
    return _json_encode(features)


def decode_item(value: bytes) -> dict:
    out = _json_decode(value)
    if not isinstance(out, dict):
        raise RecordError("an item record must be a JSON object")
    return out


class UserActions(list):
    """A user's recent actions that are (str, str, float) tuples by construction (the flow's
    catalog makes them from parsed events): `encode_user_actions` writes them as they are, where
    any other sequence has each field converted first."""

    __slots__ = ()


_USER_ACTIONS = list[tuple[str, str, float]]
_msgpack_encode = msgspec.msgpack.Encoder().encode
_user_decode = msgspec.msgpack.Decoder(_USER_ACTIONS).decode


def encode_user_actions(actions: Iterable[Sequence[Any]] | bytes) -> bytes:
    """`[[item_id, action, ts], ...]` of a user's recent (item_id, action, ts), oldest first.
    `bytes` are taken as a record this function made (the flow's catalog keeps them so)."""
    if type(actions) is bytes:
        return actions
    return _msgpack_encode(actions if type(actions) is UserActions else _typed(actions))


def _typed(actions: Iterable[Sequence[Any]]) -> list[tuple[str, str, float]]:
    """Each action as the record holds it: (str, str, float), so its ts is a msgpack float64."""
    return [(str(a[0]), str(a[1]), float(a[2])) for a in actions]


_TS_TAIL = struct.Struct(">Bd")  # an action's ts, last in its array: msgpack's float64 marker, big-endian


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    return b"\xdc" + n.to_bytes(2, "big") if n < 65536 else b"\xdd" + n.to_bytes(4, "big")


def _array_len(b: bytes) -> tuple[int, int]:
    """(length, header size) of the msgpack array `b` begins with; (-1, 0) if it does not."""
    c = b[0] if b else 0
    if 0x90 <= c <= 0x9F:
        return c & 0x0F, 1
    if c == 0xDC and len(b) >= 3:
        return int.from_bytes(b[1:3], "big"), 3
    if c == 0xDD and len(b) >= 5:
        return int.from_bytes(b[1:5], "big"), 5
    return -1, 0


def _after_str(b: bytes, i: int) -> int:
    """Where the msgpack string at `i` ends; -1 if no string starts there."""
    c = b[i]
    if 0xA0 <= c <= 0xBF:
        return i + 1 + (c & 0x1F)
    if c == 0xD9:
        return i + 2 + b[i + 1]
    if c == 0xDA:
        return i + 3 + int.from_bytes(b[i + 1:i + 3], "big")
    if c == 0xDB:
        return i + 5 + int.from_bytes(b[i + 1:i + 5], "big")
    return -1


def append_user_actions(record: bytes, new: Sequence[tuple[str, str, float]], cap: int) -> bytes | None:
    """`record` (of `encode_user_actions`) with `new` after its actions and its oldest dropped to
    keep `cap`, without decoding it: the usual case of a user's next actions, all newer than what
    the record holds. `new` must be in ts order, without repeats. None when that does not hold
    (an action not newer than the record's newest), or the record is not as this module writes it:
    the caller merges the decoded list then.

    >>> r = encode_user_actions([("v1", "like", 1.0), ("v2", "skip", 2.0)])
    >>> decode_user_actions(append_user_actions(r, [("v3", "like", 3.0)], 2))
    [('v2', 'skip', 2.0), ('v3', 'like', 3.0)]
    >>> append_user_actions(r, [("v3", "like", 2.0)], 2) is None
    True
    """
    n, head = _array_len(record)
    if n < 0 or not new:
        return None
    new = _typed(new)  # so that every action ends in its float64 ts, as the record's do
    if n:
        if len(record) < head + 9:
            return None
        marker, newest = _TS_TAIL.unpack_from(record, len(record) - 9)
        if marker != 0xCB or not new[0][2] > newest:
            return None
    drop = n + len(new) - cap
    if drop >= n:
        return _msgpack_encode(new[-cap:])
    i = head
    try:
        for _ in range(max(drop, 0)):  # over the oldest: [item_id, action, ts] each
            if record[i] != 0x93:
                return None
            j = _after_str(record, i + 1)
            j = _after_str(record, j) if j > 0 else -1
            if j < 0 or record[j] != 0xCB:
                return None
            i = j + 9
    except IndexError:  # a length that runs past the end: not a record of this module's
        return None
    if i > len(record):
        return None
    body = _msgpack_encode(new)
    return _array_header(n - max(drop, 0) + len(new)) + record[i:] + body[_array_len(body)[1]:]


def decode_user_actions(value: bytes) -> list[tuple[str, str, float]]:
    if value[:1] == b"[":  # JSON, as stores written before msgpack hold it
        out = _json_decode(value)
        if not isinstance(out, list):
            raise RecordError("a user record must be an array")
        return [(a[0], a[1], float(a[2])) for a in out]
    try:
        return _user_decode(value)
    except msgspec.DecodeError as exc:  # not msgpack, or not of those types
        raise RecordError(f"a user record is not an array of [item_id, action, ts]: {exc}") from None


# ------------------------------------------------------------------------------ a write's records


@dataclass
class Records:
    """The records of one write, in order (a later record of a key wins), with what the store
    needs to know of them without decoding them again: the earliest arrival behind each row record
    (for freshness), the newest update time and the dense version they carry.

    Build one from RowBatches and the like (`ServingWriter` does), or from raw pairs with
    `Records.from_pairs`, which reads those figures out of the records themselves.
    """

    keys: list[bytes] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)  # b"": a tombstone
    arrivals: list[np.ndarray] = field(default_factory=list)  # earliest arrivals of the row records
    newest_update: float = -math.inf
    dense_version: int | None = None
    tombstones: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    def pairs(self) -> list[tuple[bytes, bytes]]:
        return list(zip(self.keys, self.values, strict=True))

    def arrival_times(self) -> np.ndarray:
        return np.concatenate(self.arrivals) if self.arrivals else np.zeros(0)

    def add(self, keys: list[bytes], values: list[bytes]) -> None:
        self.keys += keys
        self.values += values
        self.tombstones += values.count(b"")

    def delete(self, keys: list[bytes]) -> None:
        self.keys += keys
        self.values += [b""] * len(keys)
        self.tombstones += len(keys)

    def add_row_batch(self, batch: RowBatch) -> None:
        tombs, keys, vals = encode_row_batch(batch)
        self.delete(tombs)  # before the rows: an id evicted and admitted again keeps its new row
        self.add(keys, vals)
        if keys:
            self.arrivals.append(np.asarray(batch.earliest_arrival, np.float64))
            self.newest_update = max(self.newest_update, float(batch.updated_at))

    def add_dense(self, blob: DenseBlob, stale_keys: Iterable[bytes] = (), chunk_bytes: int = DENSE_CHUNK_BYTES) -> None:
        """The blob's chunks; `stale_keys` (dense keys the store holds) not among them are deleted."""
        recs = encode_dense(blob, chunk_bytes)
        fresh = {k for k, _ in recs}
        self.delete([k for k in stale_keys if k not in fresh])
        for k, v in recs:
            self.keys.append(k)
            self.values.append(v)
        self.dense_version = blob.version
        self.newest_update = max(self.newest_update, float(blob.updated_at))

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[bytes, bytes | None]]) -> Records:
        """Records of raw (key, value) pairs (None or b"" a tombstone), their figures read from them."""
        out = cls()
        keys = out.keys
        values = out.values
        rows: list[bytes] = []
        for k, v in pairs:
            k = bytes(k)
            v = bytes(v) if v else b""
            keys.append(k)
            values.append(v)
            if not v:
                out.tombstones += 1
            elif k.startswith(_DENSE_PREFIX):
                c = decode_dense_chunk(k, v)
                out.dense_version = c.version
                out.newest_update = max(out.newest_update, c.updated_at)
            elif not (k.startswith(_ITEM_PREFIX) or k.startswith(_USER_PREFIX)):
                rows.append(v)
        if rows:
            arr, upd = _row_times(rows)
            out.arrivals.append(arr)
            if len(upd):
                out.newest_update = max(out.newest_update, float(upd.max()))
        return out


_TIMES = np.dtype({"names": ["updated_at", "arrival"], "formats": ["<f8", "<f8"], "offsets": [9, 17],
                   "itemsize": ROW_HEADER_BYTES})


def _row_times(rows: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(earliest arrivals, update times) of row records, of any dims."""
    size = len(rows[0])
    if size >= ROW_HEADER_BYTES and len(set(map(len, rows))) == 1:
        dt = np.dtype({"names": ["updated_at", "arrival"], "formats": ["<f8", "<f8"], "offsets": [9, 17],
                       "itemsize": size})
        rec = np.frombuffer(b"".join(rows), dt)
        return rec["arrival"].astype(np.float64), rec["updated_at"].astype(np.float64)
    heads = [r[:ROW_HEADER_BYTES] for r in rows if len(r) >= ROW_HEADER_BYTES]
    if len(heads) != len(rows):
        raise RecordError("a row record is shorter than its header")
    rec = np.frombuffer(b"".join(heads), _TIMES)
    return rec["arrival"].astype(np.float64), rec["updated_at"].astype(np.float64)
