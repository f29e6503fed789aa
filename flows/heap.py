"""Long-lived objects kept out of the cyclic garbage collector's full collections.

A model server's heap is mostly its catalog index, about ten GC-tracked objects an item: over a
million for 100,000 items, all of which a full collection walks while holding the GIL (measured:
680 ms, during which no request is answered; the p99 of `GET /recommend` at 200 requests/s was
141-586 ms from these pauses alone). `gc.freeze()` moves every object alive into a generation the
collector never walks; frozen objects are still freed by reference counting when dropped.

Freezing right after a full collection leaks nothing: every unreachable cycle has just been
collected, and nothing runs between the collection and the freeze. So `FreezeAfterSlowCollections`
freezes whenever a full collection took long (the heap has grown by what the index built since the
last freeze), and `freeze_now` collects, then freezes, once start-up has built the index.

The flow process freezes too (`flows.pipeline.main_flow`, through `flow_heap`): its join state,
catalog and TensorFlow's objects made full collections of 250-870 ms there, about 13% of a files
run with training. It also collects less often (`FLOW_THRESHOLDS`).

The price: an object alive at a freeze that later dies in a reference cycle (an in-flight
request's task and coroutine, say) is never collected. Freezes come only after slow collections,
rare once the index is frozen, so what can be kept that way is a few requests' worth each time.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SLOW_MS = 10.0  # a full collection this long means many long-lived objects: freeze them
# The flow process's collection thresholds (CPython's: 700, 10, 10). Each impression waiting in the
# join holds two tracked objects (its `sparse` dict and a tag list) for the join window, tens of
# thousands a second that climb through every generation: with CPython's thresholds the loop flow
# at 5,000 actions/s spent 22.6% of its time collecting (young collections every 700 allocations,
# full ones of 74 ms every 0.8 s). With these: 8.8% (young collections of about
# 9 ms, middle ones of 56 ms every 1.6 s), and 14.9k events/s consumed against 11.8k (two runs
# of `serve.freshness` on files, the machine shared alike). A
# larger first threshold collects less still (7% at 50,000) but pauses longer (60 ms, 600 ms).
# Since then they are untracked (flows/untrack.py, now as the parser makes them; at first by the
# joiner, when the impression came): over a 600,000-event replay of the loop's events, middle collections took 0.18-0.24 s
# against 0.65 s.
FLOW_THRESHOLDS = (10_000, 10, 100)


def freeze_now() -> None:
    """A full collection, then everything alive frozen: for a process whose start-up built what it
    will keep (before it starts answering: the collection is the last long one)."""
    gc.collect()
    gc.freeze()


class FreezeAfterSlowCollections:
    """A `gc.callbacks` hook: after each full collection that took at least `slow_ms`, freezes what
    survived it. `install()` once per process; `uninstall()` to take it away."""

    def __init__(self, slow_ms: float = SLOW_MS):
        self.slow_ms = slow_ms
        self.full_collections = 0
        self.freezes = 0
        self.last_ms = 0.0
        self._t0 = 0.0

    def install(self) -> FreezeAfterSlowCollections:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        self.full_collections += 1
        self.last_ms = (time.perf_counter() - self._t0) * 1000.0
        if self.last_ms >= self.slow_ms:
            gc.freeze()  # the collection is over: the generations hold only what is reachable
            self.freezes += 1


def flow_heap(freezer: FreezeAfterSlowCollections) -> None:
    """A flow process's heap, once its start-up is done: `freeze_now`, `FLOW_THRESHOLDS`, and
    `freezer` installed."""
    freeze_now()
    gc.set_threshold(*FLOW_THRESHOLDS)
    freezer.install()


@contextmanager
def frozen_heap(slow_ms: float = SLOW_MS,
                thresholds: tuple[int, ...] | None = None) -> Iterator[FreezeAfterSlowCollections]:
    """For work inside a process that lives on after it (a command's runs, a benchmark's): what is
    alive now frozen (`freeze_now`), slow full collections freeze what survived them, and at the
    end the hook goes and everything frozen is the collector's again. `thresholds`: the
    collector's for the block (`FLOW_THRESHOLDS` to run as a flow process does), then restored."""
    freeze_now()
    before = gc.get_threshold()
    if thresholds is not None:
        gc.set_threshold(*thresholds)
    freezer = FreezeAfterSlowCollections(slow_ms).install()
    try:
        yield freezer
    finally:
        freezer.uninstall()
        gc.set_threshold(*before)
        gc.unfreeze()
