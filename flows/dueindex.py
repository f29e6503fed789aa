"""The spill store's in-memory index: a join key's 64-bit hash -> the due its entry is stored under.

The spill store keys its entries by (due, join key), so that the writes of a flush and the
deletes of expiry walk the B-tree in order (a random key costs LMDB a page copy and write per
put and per delete: 5-7 µs against 1-2). A label finds its impression's due here: 16 bytes a
slot in one open-addressing table (linear probing, deletes by backward shift, no tombstones),
where a Python dict would take 150 bytes an entry and 10 million waiting impressions would not fit
in memory. Two keys may share a hash: the store tells them apart by the full key in LMDB.

setup.py compiles this module with Cython, as flows/joiner.py; the same source runs as plain
Python (slower) when it is not compiled. `COMPILED` says which one was imported.
"""

from __future__ import annotations

import math
import struct
from array import array
from typing import Optional

import cython

from flows.compiled import check_built_from

COMPILED: bool = cython.compiled
_BUILT_FROM: Optional[str] = None  # when compiled: the sha256 of the source it was compiled from (setup.py)

if COMPILED:
    check_built_from(__file__, "dueindex.py", _BUILT_FROM)

_MIN_CAPACITY = 64
_ALL = (1 << 64) - 1
_D = struct.Struct(">d")
_Q = struct.Struct(">Q")


@cython.cfunc
@cython.inline
def _hash_of(key: object, bits: cython.ulonglong) -> cython.ulonglong:
    """The slot hash of `key`: Python's hash as 64 unsigned bits (those of `bits`), never 0 (0
    marks an empty slot)."""
    h: cython.ulonglong
    if cython.compiled:
        h = cython.cast(cython.ulonglong, cython.cast(cython.longlong, hash(key))) & bits
    else:
        h = hash(key) & _ALL & bits
    return h if h != 0 else 1


# A double's bits read as an integer through a union (a pointer cast would break C's aliasing rules).
_Bits = cython.union(d=cython.double, u=cython.ulonglong)
_SIGN_BIT = cython.declare(cython.ulonglong, 0x8000_0000_0000_0000)
_ALL_BITS = cython.declare(cython.ulonglong, 0xFFFF_FFFF_FFFF_FFFF)


@cython.ccall
def due_prefix(due: cython.double) -> bytes:
    """8 bytes that sort like the number `due` (a big-endian IEEE 754 double does not: negatives,
    -inf included, would sort after positives and in reverse). -0.0 is 0.0; NaN is refused."""
    if due != due:
        raise ValueError("due must not be NaN: an entry with a NaN due would never come due")
    due = due + 0.0  # -0.0 becomes 0.0: one position per instant
    bits: cython.ulonglong
    if cython.compiled:
        v = cython.declare(_Bits)
        v.d = due
        bits = v.u
    else:
        bits = _Q.unpack(_D.pack(due))[0]
    bits ^= _ALL_BITS if bits & _SIGN_BIT else _SIGN_BIT
    return _Q.pack(bits)


@cython.ccall
def due_of_prefix(prefix: bytes) -> cython.double:
    """The due that `due_prefix` made `prefix` from (its first 8 bytes)."""
    bits: cython.ulonglong = _Q.unpack_from(prefix)[0]
    bits ^= _SIGN_BIT if bits & _SIGN_BIT else _ALL_BITS
    if cython.compiled:
        v = cython.declare(_Bits)
        v.u = bits
        return v.d
    return _D.unpack(_Q.pack(bits))[0]


@cython.final
@cython.cclass
class DueIndex:
    """key -> due (float), by the key's hash only: `get` of a key that shares its hash with a
    stored one answers that one's due, so a caller keeps the key beside (the store's LMDB key).
    Keys are any hashable; the store's are str, whose hash Python keeps with the string, so a
    lookup hashes nothing. The table doubles when it is 70% full and halves when it is under 5%
    full."""

    # Views of two arrays, array('Q') and array('d'), taken once per allocation (a typed view
    # taken in each call cost more than the lookup). A hash of 0 marks an empty slot.
    _hashes = cython.declare(cython.ulonglong[::1])
    _dues = cython.declare(cython.double[::1])
    _mask = cython.declare(cython.Py_ssize_t)
    _n = cython.declare(cython.Py_ssize_t)
    _bits = cython.declare(cython.ulonglong)

    def __init__(self, capacity: int = _MIN_CAPACITY, *, hash_bits: int = 64) -> None:
        """`hash_bits` below 64 keep only that many bits of each hash: tests use it to make keys
        share hashes."""
        if not 1 <= hash_bits <= 64:
            raise ValueError(f"hash_bits must be in [1, 64], got {hash_bits}")
        self._bits = (1 << hash_bits) - 1
        self._n = 0
        self._allocate(_capacity_for(capacity))

    @cython.cfunc
    def _allocate(self, capacity: cython.Py_ssize_t) -> cython.void:
        self._hashes = array("Q", bytes(8 * capacity))
        self._dues = array("d", bytes(8 * capacity))
        self._mask = capacity - 1

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return self._mask + 1

    @property
    def nbytes(self) -> int:
        """Bytes the table takes."""
        return 16 * (self._mask + 1)

    @cython.cfunc
    def _find(self, h: cython.ulonglong) -> cython.Py_ssize_t:
        """The slot that holds `h`, or the empty slot where it would go."""
        hashes: cython.ulonglong[::1] = self._hashes
        mask: cython.Py_ssize_t = self._mask
        i: cython.Py_ssize_t = cython.cast(cython.Py_ssize_t, h & mask)
        k: cython.ulonglong
        while True:
            k = hashes[i]
            if k == h or k == 0:
                return i
            i = (i + 1) & mask

    @cython.cfunc
    def _insert(self, i: cython.Py_ssize_t, h: cython.ulonglong, due: cython.double) -> cython.void:
        """Fill the empty slot `i` (as `_find` gave it), growing the table past 70% full."""
        self._hashes[i] = h
        self._dues[i] = due
        self._n += 1
        if self._n * 10 > (self._mask + 1) * 7:
            self._resize((self._mask + 1) * 2)

    def get(self, key: object) -> float:
        """The due stored for `key`'s hash, or NaN."""
        h: cython.ulonglong = _hash_of(key, self._bits)
        i: cython.Py_ssize_t = self._find(h)
        return self._dues[i] if self._hashes[i] == h else math.nan

    def hits(self, keys: list) -> list:
        """The positions in `keys` of those whose hash is held (their `get` is not NaN)."""
        out: list = []
        if self._n == 0:
            return out
        bits: cython.ulonglong = self._bits
        j: cython.Py_ssize_t
        h: cython.ulonglong
        for j in range(len(keys)):
            h = _hash_of(keys[j], bits)
            if self._hashes[self._find(h)] == h:
                out.append(j)
        return out

    def put(self, key: object, due: float) -> None:
        """Set the due of `key`'s hash (a key sharing it is overwritten: see the class)."""
        h: cython.ulonglong = _hash_of(key, self._bits)
        i: cython.Py_ssize_t = self._find(h)
        if self._hashes[i] == h:
            self._dues[i] = due
        else:
            self._insert(i, h, due)

    def add(self, key: object, due: float) -> bool:
        """`put` if no key holds `key`'s hash yet; whether it did."""
        h: cython.ulonglong = _hash_of(key, self._bits)
        i: cython.Py_ssize_t = self._find(h)
        if self._hashes[i] == h:
            return False
        self._insert(i, h, due)
        return True

    def pop(self, key: object) -> bool:
        """Remove `key`'s hash; whether it was there."""
        h: cython.ulonglong = _hash_of(key, self._bits)
        i: cython.Py_ssize_t = self._find(h)
        hashes: cython.ulonglong[::1] = self._hashes
        dues: cython.double[::1] = self._dues
        mask: cython.Py_ssize_t = self._mask
        j: cython.Py_ssize_t
        home: cython.Py_ssize_t
        k: cython.ulonglong
        if hashes[i] != h:
            return False
        # Backward shift: move up each later slot of the run whose home is not in (i, j].
        j = i
        while True:
            j = (j + 1) & mask
            k = hashes[j]
            if k == 0:
                break
            home = cython.cast(cython.Py_ssize_t, k & mask)
            if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                hashes[i] = k
                dues[i] = dues[j]
                i = j
        hashes[i] = 0
        self._n -= 1
        if self._n * 20 < mask + 1 and mask + 1 > _MIN_CAPACITY:
            self._resize((mask + 1) // 2)
        return True

    def clear(self) -> None:
        self._n = 0
        self._allocate(_MIN_CAPACITY)

    @cython.cfunc
    def _resize(self, capacity: cython.Py_ssize_t) -> cython.void:
        old_hashes: cython.ulonglong[::1] = self._hashes
        old_dues: cython.double[::1] = self._dues
        old_capacity: cython.Py_ssize_t = self._mask + 1
        self._allocate(capacity)
        hashes: cython.ulonglong[::1] = self._hashes
        dues: cython.double[::1] = self._dues
        mask: cython.Py_ssize_t = self._mask
        s: cython.Py_ssize_t
        i: cython.Py_ssize_t
        k: cython.ulonglong
        for s in range(old_capacity):
            k = old_hashes[s]
            if k == 0:
                continue
            i = cython.cast(cython.Py_ssize_t, k & mask)
            while hashes[i] != 0:
                i = (i + 1) & mask
            hashes[i] = k
            dues[i] = old_dues[s]


@cython.ccall
def flush_plan(index: DueIndex, shared: dict, writes: dict) -> tuple:
    """The LMDB work of a store's flush of `writes` (join key -> (due, payload), or None to
    delete), with no undo records to keep: (deletes, puts, placed). `deletes`: (entry key now,
    key) of each key the index or `shared` gives a due (it may be another key's with the same
    hash: its entry key is then absent); `puts`: (entry key, payload) of each entry written;
    `placed`: (key, due) of each, for the index after the commit. `deletes` and `puts` are in
    entry-key order, so that each walks the B-tree from left to right. One loop in C: as Python,
    the lookups, encodings and tuples of this loop took about 65% more than the LMDB work itself."""
    deletes: list = []
    puts: list = []
    placed: list = []
    due: cython.double
    for key, entry in writes.items():
        raw = key.encode()
        old = shared.get(key) if shared else None
        if old is not None:
            due = old
        else:
            due = index.get(key)
        if due == due:
            deletes.append((due_prefix(due) + raw, key))
        if entry is not None:
            new_due = entry[0]
            puts.append((due_prefix(new_due) + raw, entry[1]))
            placed.append((key, new_due))
    deletes.sort()
    puts.sort()
    return deletes, puts, placed


@cython.ccall
def entry_keys(index: DueIndex, shared: dict, keys: list) -> list:
    """(entry key, position, due) of each of `keys` whose hash the index holds (or that `shared`
    holds), sorted by entry key: where the store would find its entry, if it is the key's (see
    `DueIndex`), for reads that walk the B-tree from left to right."""
    out: list = []
    if index._n == 0 and not shared:
        return out
    bits: cython.ulonglong = index._bits
    j: cython.Py_ssize_t
    h: cython.ulonglong
    i: cython.Py_ssize_t
    for j in range(len(keys)):
        key = keys[j]
        if shared:
            old = shared.get(key)
            if old is not None:
                out.append((due_prefix(old) + key.encode(), j, old))
                continue
        h = _hash_of(key, bits)
        i = index._find(h)
        if index._hashes[i] == h:
            out.append((due_prefix(index._dues[i]) + key.encode(), j, index._dues[i]))
    out.sort()
    return out


@cython.ccall
def flush_settle(index: DueIndex, shared: dict, gone: list, placed: list) -> cython.void:
    """The index after a committed `flush_plan`: the keys whose entries were deleted (`gone`)
    leave it, then the keys put (`placed`: (key, due)) come in; a key whose hash another holds
    has its due in `shared` instead (see `DueIndex`)."""
    for key in gone:
        if shared and key in shared:
            del shared[key]
        else:
            index.pop(key)
    for key, due in placed:
        if not index.add(key, due):
            shared[key] = due


def _capacity_for(n: int) -> int:
    """The smallest power of two of at least `_MIN_CAPACITY` slots that holds `n` under 70% full."""
    capacity = _MIN_CAPACITY
    while n * 10 > capacity * 7:
        capacity *= 2
    return capacity
