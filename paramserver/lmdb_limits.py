"""What every LMDB store of freshrec does when its map is full: grow it, up to an optional cap.

LMDB fails a write transaction with MapFullError when the map is full; the stores abort it, grow the
map and run the whole transaction again, so a write is never split. Past the cap (the disk space
an operator gives the store) the write fails whole with `LmdbStoreFull`, naming the store and the
setting that caps it; nothing of it is written, and the store reads as before. A disk that fills
first fails the write the same way (`LmdbDiskFull`, naming the store).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


class LmdbStoreFull(Exception):
    """A write needs more room than the store's cap allows; the store is as it was before it."""


class LmdbDiskFull(LmdbStoreFull):
    """The disk under a store had no room for a write (LMDB's DiskError, ENOSPC); the store is as it
    was before it (LMDB commits a transaction whole or not at all)."""


def disk_full(store: str, path: Path | str, err: Exception) -> LmdbDiskFull:
    """The error for a write that LMDB could not commit because the disk is full."""
    return LmdbDiskFull(
        f"the disk under the {store} {path} is full ({err}), so nothing of the write was written and the store "
        f"holds what it held before. Free disk space there (or move the store to a larger disk), then start "
        f"again: a flow started with recovery (-r) resumes from its last snapshot."
    )


def grown_size(size: int, cap: Optional[int], store: str, path: Path | str, cap_name: str) -> int:
    """The next map size after `size` (double it, at most `cap`); `LmdbStoreFull` at the cap."""
    if cap is not None and size >= cap:
        raise LmdbStoreFull(
            f"{store} {path} is full: the write needs more than {cap_name}={cap} bytes, so nothing of it "
            f"was written and the store holds what it held before. Free disk space and raise {cap_name} "
            f"(or unset it), then start again: a flow started with recovery (-r) resumes from its last "
            f"snapshot."
        )
    return size * 2 if cap is None else min(size * 2, cap)


def initial_size(size: int, cap: Optional[int]) -> int:
    """A store's first map size: its default, at most the cap."""
    return size if cap is None else min(size, cap)
