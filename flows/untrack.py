"""Parsed impressions kept out of the cyclic garbage collector's lists.

An impression's `sparse` (a dict of strings and lists of strings) is two or more objects the
collector tracks: msgspec makes every list tracked, and a dict holding one is tracked too. The
join holds each impression for its whole window, so they were the flow's most numerous tracked
objects, and every collection walked them. Strings hold nothing, so no cycle can run through such
a dict: `untrack_sparse` takes it and its lists out of the collector's lists, as CPython itself
does for a dict of strings. A dict that later gets a container is tracked again by CPython (a list
is not: nothing changes an impression's lists once parsed).

`flows.events.parse_many` calls it on each batch of impressions it has just decoded, while they are
still in the CPU's cache: the joiner did it when an impression reached its bucket, where every one
of these objects was a cache miss (a fifth of `join.in_memory`'s run).

setup.py compiles this module with Cython (pure-Python mode). Only the compiled module untracks:
plain Python has no way to, and gives the same results without it. `COMPILED` says which.
"""

from __future__ import annotations

from typing import Optional

import cython

from flows.compiled import check_built_from

COMPILED: bool = cython.compiled
_BUILT_FROM: Optional[str] = None  # when compiled: the sha256 of the source it was compiled from (setup.py)

if COMPILED:
    check_built_from(__file__, "untrack.py", _BUILT_FROM)
if cython.compiled:
    from cython.cimports.flows._capi import PyObject_GC_UnTrack


@cython.ccall
def untrack_sparse(sparse: object) -> cython.bint:
    """Untrack `sparse` and its lists if it is a dict of str to str or list of str (anything else
    is left as it is); whether it did."""
    if not cython.compiled or type(sparse) is not dict:
        return False
    for k, v in cython.cast(dict, sparse).items():
        if type(k) is not str:
            return False
        if type(v) is list:
            for s in cython.cast(list, v):
                if type(s) is not str:
                    return False
        elif type(v) is not str:
            return False
    for v in cython.cast(dict, sparse).values():
        if type(v) is list:
            PyObject_GC_UnTrack(v)
    PyObject_GC_UnTrack(sparse)
    return True


@cython.ccall
def untrack_impressions(events: list) -> cython.void:
    """`untrack_sparse` of each impression's `sparse`."""
    if not cython.compiled:
        return
    for e in events:
        untrack_sparse(e.sparse)
