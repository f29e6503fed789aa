"""The collisionless id -> row map under each embedding table: every distinct string id its own row.

Vectorised over a batch, with no per-id Python loop: ids become fixed-width key words (their UTF-8
bytes, zero-padded to whole 64-bit words), a stable multiply-mix hash picks two buckets of eight
slots, and each slot packs a 32-bit fingerprint with a row number. A hit is then checked against
the key stored for its row, so two ids never share a row whatever their hashes do. Python's dict
would be faster per lookup but costs over 100 bytes per id (the str, the int, the entry); this map
costs the key words plus about 10 bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap

import numpy as np

BUCKET = 8  # slots per bucket: 8 x 8 bytes, one cache line
MAX_LOAD = 0.92  # grow the buckets past this fill (or when the stash outgrows STASH_SHARE)
GROW_LOAD = 0.75  # fill right after growing; two choices of eight slots place all but ~1 in 5000 here
STASH_SHARE = 1 / 64  # keys that fit in neither bucket wait in a sorted side array, up to this share
_U64 = np.uint64
_LOW32 = _U64(0xFFFFFFFF)
_HIGH32 = _U64(0xFFFFFFFF00000000)
_FP_BIT = _U64(1 << 32)  # forced into every fingerprint, so a used slot never reads as empty (0)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_K2 = _U64(0x9E3779B97F4A7C15)


def zeros(shape: int | tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """np.zeros, but a large array gets its own private anonymous mapping: its pages stay
    unallocated until written (so spare capacity costs nothing) and go back to the system when the
    array is dropped (numpy's heap blocks can linger as fragments after a growth)."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if n < (1 << 20):
        return np.zeros(shape, dt)
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dt).reshape(shape)


def _libc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _libc_trim()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc keeps them after large temporaries
    are freed: a rebuild of a big index would otherwise leave tens of MB resident)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


# One odd multiplier per key word; a zero word adds nothing, so the hash ignores zero padding and a
# key hashes the same at any width.
_WORD_MULT = np.array([_splitmix(j + 1) | 1 for j in range(80)], dtype=np.uint64)


def mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array (returned)."""
    t = h >> _U64(30)
    h ^= t
    h *= _M1
    np.right_shift(h, _U64(27), out=t)
    h ^= t
    h *= _M2
    np.right_shift(h, _U64(31), out=t)
    h ^= t
    return h


def key_hash(keys: np.ndarray) -> np.ndarray:
    """Stable 64-bit hash of each row of key words, the same in every process and at any width."""
    n, w = keys.shape
    if w > len(_WORD_MULT):
        raise ValueError(f"ids longer than {8 * len(_WORD_MULT)} bytes are not supported")
    h = keys[:, 0] * _WORD_MULT[0]
    for j in range(1, w):
        h += keys[:, j] * _WORD_MULT[j]
    return mix64(h)


def encode(ids: list[str], words: int) -> np.ndarray:
    """Key words of `ids`: (n, w) uint64 with w >= `words`, wider only when some id needs it.

    The key of an id is its UTF-8 bytes zero-padded; an id ending in NUL (or empty) gets a 0xFF
    byte appended (never found in UTF-8) so that it differs from the same id without the NUL (and
    no key is all zeros, which marks a free row).
    """
    n = len(ids)
    if n and "\x00" not in "".join(ids):
        try:
            # One more word than needed: a nonzero last word means some id is longer.
            raw = np.fromiter(ids, dtype=f"S{8 * (words + 1)}", count=n)
        except UnicodeEncodeError:
            pass
        else:
            keys = raw.view(_U64).reshape(n, words + 1)
            if not keys[:, words].any() and keys[:, 0].all():
                return keys[:, :words]
    return _encode_exact(ids, words)


def _encode_exact(ids: list[str], words: int) -> np.ndarray:
    raw = list(map(str.encode, ids))
    if b"\x00" in b"".join(raw) or not all(raw):
        raw = [b + b"\xff" if not b or b.endswith(b"\x00") else b for b in raw]
    width = max([words * 8, *map(len, raw)]) if raw else words * 8
    width = max(8, -(-width // 8) * 8)
    return np.array(raw, dtype=f"S{width}").view(_U64).reshape(len(raw), width // 8)


def decode(keys: np.ndarray) -> list[str]:
    """The ids whose key words are the rows of `keys`."""
    n, w = keys.shape
    if n == 0:
        return []
    raw = np.ascontiguousarray(keys).view(f"S{8 * w}").reshape(n).tolist()
    if b"\xff" in b"".join(raw):
        raw = [b[:-1] if b.endswith(b"\xff") else b for b in raw]
    return list(map(bytes.decode, raw))


def key_width(keys: np.ndarray) -> int:
    """The number of words the longest key of `keys` needs (at least 1)."""
    if keys.shape[1] <= 1:
        return 1
    nz = keys.any(axis=0)
    return max(1, int(np.flatnonzero(nz)[-1]) + 1) if nz.any() else 1


def uniform01(h: np.ndarray, salt: int) -> np.ndarray:
    """A float64 in [0, 1) per hash, a stable function of (hash, salt)."""
    x = h ^ _U64(_splitmix(salt))
    x = mix64(x * _K2)
    return (x >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


class IdIndex:
    """Maps string ids to row numbers >= `first_row`, one row per distinct id, batch at a time.

    Rows come from a sorted free list (lowest first), then from the high-water mark; removed rows go
    back to the free list. The map knows nothing of what the rows hold: its owner sizes its arrays to
    `capacity`. Keys are kept per row (zero for a free row), so the buckets can always be rebuilt
    from them: on growth, and when a checkpoint is restored.
    """

    def __init__(self, first_row: int = 1, capacity: int = 1024, words: int = 1) -> None:
        self.first_row = first_row
        self._keys = zeros((max(capacity, first_row + 1), words), _U64)
        self._hw = first_row
        self._free = np.zeros(0, np.int64)
        self._live = 0
        self._stash_h = np.zeros(0, _U64)
        self._stash_rows = np.zeros(0, np.int64)
        self._set_table(zeros((max(2, -(-capacity // BUCKET)), BUCKET), _U64))

    # --- size and shape ---------------------------------------------------------------------------
    @property
    def words(self) -> int:
        return self._keys.shape[1]

    @property
    def live(self) -> int:
        return self._live

    @property
    def hw(self) -> int:
        """One past the highest row ever handed out."""
        return self._hw

    @property
    def capacity(self) -> int:
        return self._keys.shape[0]

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._tbl.nbytes + self._free.nbytes + 16 * len(self._stash_h)

    @property
    def free_rows(self) -> np.ndarray:
        return self._free

    def keys(self, rows: np.ndarray) -> np.ndarray:
        return self._keys[rows]

    def ids(self, rows: np.ndarray) -> list[str]:
        return decode(self._keys[rows])

    def alive(self, rows: np.ndarray) -> np.ndarray:
        return self._keys[rows].any(axis=1)

    # --- lookups ------------------------------------------------------------------------------------
    def _probe(self, h: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray]:
        """Fingerprint of each hash (its high half) and its two buckets, (n, 2) int64."""
        fp = h & _HIGH32
        fp |= _FP_BIT
        b = np.empty((len(h), 2), _U64)
        np.bitwise_and(h, _LOW32, out=b[:, 0])
        np.multiply(h, _K2, out=b[:, 1])
        b[:, 1] >>= _U64(32)
        b *= _U64(nb)  # "fastrange": a 32-bit hash times nb, over 2**32, is uniform in [0, nb)
        b >>= _U64(32)
        return fp, b.view(np.int64)

    def lookup(self, keys: np.ndarray, h: np.ndarray) -> np.ndarray:
        """Row of each key (int64), -1 where the id has none. `keys` is at least `words` wide."""
        return self.find(keys, h)[0]

    def find(self, keys: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, bool]:
        """`lookup`, and whether every key was found."""
        n = len(h)
        rows = np.full(n, -1, np.int64)
        if n == 0 or self._live == 0:
            return rows, n == 0
        fp, b = self._probe(h, self._nb)
        # The two buckets of each key side by side: a slot whose fingerprint matches XORs down to
        # its row number (< 2**32), every other slot stays above. Each candidate is then checked
        # against its row's stored key, so a fingerprint shared by two ids does no harm.
        x = self._tblv.take(b.reshape(-1)).view(_U64).reshape(n, 2 * BUCKET)
        x ^= fp[:, None]
        flat = x.reshape(-1)
        at = (flat < _FP_BIT).nonzero()[0]
        q = at >> 4
        cand = flat.take(at).view(np.int64)
        ok = self._same_keys(cand, keys, q)
        if ok.all():
            rows[q] = cand
        else:
            rows[q[ok]] = cand[ok]
        # (A count of hits would not do: when both buckets of a key are one bucket, its slot is
        # a candidate twice.)
        if rows.min() >= 0:
            return rows, True
        if len(self._stash_h):
            self._lookup_stash(keys, h, rows)
        return rows, bool(rows.min() >= 0)

    def _lookup_stash(self, keys: np.ndarray, h: np.ndarray, rows: np.ndarray) -> None:
        miss = np.flatnonzero(rows < 0)
        lo = np.searchsorted(self._stash_h, h[miss], "left")
        hi = np.searchsorted(self._stash_h, h[miss], "right")
        for d in range(int((hi - lo).max(initial=0))):  # one round per id sharing a whole hash
            sel = np.flatnonzero(lo + d < hi)
            cand = self._stash_rows[lo[sel] + d]
            ok = self._same_keys(cand, keys, miss[sel])
            rows[miss[sel[ok]]] = cand[ok]

    def _same_keys(self, rows: np.ndarray, keys: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Whether the key stored for each of `rows` is the key `keys[q]`."""
        w = self.words
        if w == 1:
            ok = self._keys.reshape(-1).take(rows) == keys[:, 0].take(q)
        else:
            ok = (self._keys.take(rows, axis=0) == keys.take(q, axis=0)[:, :w]).all(axis=1)
        if keys.shape[1] > w:
            ok &= ~keys.take(q, axis=0)[:, w:].any(axis=1)
        return ok

    # --- changes ------------------------------------------------------------------------------------
    def insert(self, keys: np.ndarray, h: np.ndarray) -> np.ndarray:
        """Give each key (distinct, none of them present) a row; returns the rows (int64)."""
        m = len(h)
        if m == 0:
            return np.zeros(0, np.int64)
        need = key_width(keys)
        if need > self.words:
            self._widen(need)
        rows = self._allocate(m)
        w = self.words
        if keys.shape[1] >= w:
            self._keys[rows] = keys[:, :w]
        else:
            self._keys[rows, : keys.shape[1]] = keys
            self._keys[rows, keys.shape[1]:] = 0
        self._live += m
        if self._live > MAX_LOAD * self._nb * BUCKET:
            self._rebuild(self._live)
        else:
            left = self._place(self._tbl, self._nb, h, rows)
            if len(left):
                self._stash_add(h[left], rows[left])
                if len(self._stash_h) > max(64, self._live * STASH_SHARE):
                    self._rebuild(self._live)
        return rows

    def remove(self, rows: np.ndarray) -> None:
        """Forget the ids of `rows` (alive, distinct) and free the rows for reuse."""
        if len(rows) == 0:
            return
        rows = np.asarray(rows, np.int64)
        fp, bb = self._probe(key_hash(self._keys[rows]), self._nb)
        packed = fp | rows.view(_U64)
        for b in (bb[:, 0], bb[:, 1]):
            i, c = np.nonzero(self._tbl.take(b, axis=0) == packed[:, None])
            self._tbl[b[i], c] = 0
        if len(self._stash_h):
            keep = ~np.isin(self._stash_rows, rows)
            self._stash_h, self._stash_rows = self._stash_h[keep], self._stash_rows[keep]
        self._keys[rows] = 0
        self._live -= len(rows)
        self._free = np.union1d(self._free, rows)

    def _allocate(self, m: int) -> np.ndarray:
        k = min(m, len(self._free))
        fresh = np.arange(self._hw, self._hw + (m - k), dtype=np.int64)
        rows = np.concatenate([self._free[:k], fresh]) if k else fresh
        self._free = self._free[k:]
        if self._hw + m - k > self.capacity:
            self._grow_rows(self._hw + m - k)
        self._hw += m - k
        return rows

    def _grow_rows(self, need: int) -> None:
        keys = zeros((max(need, 2 * self.capacity), self.words), _U64)
        keys[: self._hw] = self._keys[: self._hw]
        self._keys = keys

    def _widen(self, words: int) -> None:
        keys = zeros((self.capacity, words), _U64)
        keys[: self._hw, : self.words] = self._keys[: self._hw]
        self._keys = keys

    def _stash_add(self, h: np.ndarray, rows: np.ndarray) -> None:
        sh = np.concatenate((self._stash_h, h))
        sr = np.concatenate((self._stash_rows, rows))
        order = np.argsort(sh, kind="stable")
        self._stash_h, self._stash_rows = sh[order], sr[order]

    def _set_table(self, tbl: np.ndarray) -> None:
        self._tbl, self._nb = tbl, len(tbl)
        self._tblv = tbl.view(np.dtype((np.void, 8 * BUCKET))).reshape(len(tbl))

    def _rebuild(self, live: int) -> None:
        """New buckets sized for `live` keys at GROW_LOAD, filled from the keys of the live rows."""
        nb = max(2, -(-int(live / GROW_LOAD) // BUCKET))
        rows = np.flatnonzero(self._keys[: self._hw].any(axis=1))
        h = key_hash(self._keys[rows])
        tbl = zeros((nb, BUCKET), _U64)
        # In slices of nb/8 keys, so that each slice sees how full the last ones left the buckets
        # (all at once, every key would pick its first bucket and far more would overflow).
        step = max(1024, nb // 8)
        left = [s + self._place(tbl, nb, h[s : s + step], rows[s : s + step]) for s in range(0, len(h), step)]
        left = np.concatenate(left) if left else np.zeros(0, np.int64)
        self._stash_h, self._stash_rows = np.zeros(0, _U64), np.zeros(0, np.int64)
        self._set_table(tbl)
        if len(left):
            self._stash_add(h[left], rows[left])
        del h, rows, left
        if len(tbl) > (1 << 16):
            release_free_memory()

    def _place(self, tbl: np.ndarray, nb: int, h: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Put (hash, row) pairs into free slots of `tbl`, each in the emptier of its two buckets.

        Works in rounds: keys choosing the same bucket in a round take its free slots in turn; those
        left over retry. Returns the indices of pairs that fit nowhere (both buckets full)."""
        fp, bb = self._probe(h, nb)
        b1, b2 = bb[:, 0].copy(), bb[:, 1].copy()
        packed = fp | rows.view(_U64)
        tie = (h & _U64(1)) == 0
        todo = np.arange(len(h))
        while len(todo):
            e1 = tbl.take(b1[todo], axis=0) == 0
            e2 = tbl.take(b2[todo], axis=0) == 0
            f1 = e1.sum(axis=1)
            f2 = e2.sum(axis=1)
            first = (f1 > f2) | ((f1 == f2) & tie[todo])
            bucket = np.where(first, b1[todo], b2[todo])
            free = np.where(first, f1, f2)
            order = np.argsort(bucket, kind="stable")
            sb = bucket[order]
            pos = np.arange(len(sb))
            start = np.where(np.concatenate(([True], sb[1:] != sb[:-1])), pos, 0)
            rank = np.empty_like(pos)
            rank[order] = pos - np.maximum.accumulate(start)
            ok = rank < free
            if not ok.any():
                return todo
            sel = np.flatnonzero(ok)
            empty = np.where(first[sel, None], e1[sel], e2[sel])
            col = (np.cumsum(empty, axis=1) <= rank[sel, None]).sum(axis=1)
            tbl[bucket[sel], col] = packed[todo[sel]]
            todo = todo[~ok]
        return todo

    # --- checkpoints --------------------------------------------------------------------------------
    def load(self, keys: np.ndarray, hw: int) -> None:
        """Replace everything with rows [0, hw) keyed by `keys` (all-zero rows are free)."""
        self._keys = zeros((max(len(keys), hw, self.first_row + 1, 16), max(1, keys.shape[1])), _U64)
        self._keys[: len(keys), : keys.shape[1]] = keys
        self._hw = max(hw, self.first_row)
        alive = self._keys[: self._hw].any(axis=1)
        alive[: self.first_row] = False
        self._keys[: self.first_row] = 0
        self._live = int(alive.sum())
        self._free = np.flatnonzero(~alive[self.first_row:]).astype(np.int64) + self.first_row
        self._rebuild(max(16, self._live))
