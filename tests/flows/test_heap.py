import gc
import weakref

import pytest

from flows.heap import FreezeAfterSlowCollections, freeze_now


class Node:
    def __init__(self):
        self.other = None


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def cycle() -> weakref.ref:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_a_slow_full_collection_freezes_what_survived_it_and_no_garbage(unfrozen):
    kept = [[i] for i in range(200_000)]  # long-lived tracked objects: a full collection walks them
    freezer = FreezeAfterSlowCollections(slow_ms=0.0).install()
    try:
        garbage = cycle()
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert freezer.full_collections == 1 and freezer.freezes == 1
        assert garbage() is None  # the cycle was collected before the freeze, not frozen
        assert gc.get_freeze_count() >= len(kept)
        # Frozen objects dropped later still go, by reference counting.
        before = gc.get_freeze_count()
        del kept
        assert gc.get_freeze_count() <= before - 200_000
    finally:
        freezer.uninstall()
    assert freezer._callback not in gc.callbacks


def test_a_quick_full_collection_freezes_nothing(unfrozen):
    freezer = FreezeAfterSlowCollections(slow_ms=1e9).install()
    try:
        gc.collect()
        assert freezer.full_collections == 1 and freezer.freezes == 0
        assert gc.get_freeze_count() == 0
        gc.collect(0)  # a young collection is none of its business
        assert freezer.full_collections == 1
    finally:
        freezer.uninstall()


def test_freeze_now_collects_first_and_full_collections_then_skip_what_it_froze(unfrozen):
    garbage = cycle()
    kept = [1]
    freeze_now()
    assert garbage() is None
    assert gc.get_freeze_count() > 0
    gc.collect()
    assert not any(o is kept for g in range(3) for o in gc.get_objects(generation=g))
    fresh = [2]
    assert any(o is fresh for g in range(3) for o in gc.get_objects(generation=g))


def test_the_flow_process_freezes_its_start_up_heap_and_watches_full_collections(tmp_path):
    """`bytewax.run flows.pipeline:flow` builds the flow through `main_flow`: what start-up made
    (TensorFlow's objects, with training on) is frozen, and slow full collections freeze again."""
    import subprocess
    import sys

    from flows.heap import FLOW_THRESHOLDS
    from tests.flows.test_recovery import flow_env

    probe = ("import gc, flows.pipeline as p; flow = p.flow; "
             "print(gc.get_freeze_count(), p.FLOW_HEAP._callback in gc.callbacks, 'tensorflow' in __import__('sys').modules, "
             "','.join(map(str, gc.get_threshold())))")
    env = flow_env(tmp_path, FRESHREC_TRAIN="1", FRESHREC_METRICS_PORT="0")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    frozen, installed, tf, thresholds = out.stdout.split()
    assert int(frozen) > 100_000 and installed == "True" and tf == "True"
    assert tuple(map(int, thresholds.split(","))) == FLOW_THRESHOLDS != (700, 10, 10)


def test_frozen_heap_freezes_for_its_block_then_gives_everything_back(unfrozen):
    from flows.heap import frozen_heap

    kept = [[i] for i in range(1000)]
    with frozen_heap(slow_ms=0.0) as freezer:
        assert gc.get_freeze_count() >= len(kept) and freezer._callback in gc.callbacks
        gc.collect()
        assert freezer.freezes == 1
    assert gc.get_freeze_count() == 0 and freezer._callback not in gc.callbacks


def test_frozen_heap_sets_the_thresholds_it_is_given_for_its_block_only(unfrozen):
    from flows.heap import FLOW_THRESHOLDS, frozen_heap

    before = gc.get_threshold()
    with frozen_heap(thresholds=FLOW_THRESHOLDS):
        assert gc.get_threshold() == FLOW_THRESHOLDS
    assert gc.get_threshold() == before
    with frozen_heap():
        assert gc.get_threshold() == before
