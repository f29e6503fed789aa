import math
import os
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from flows.clock import ACTIVE, ENDED, IDLE, NO_TS, BucketClock, PartitionClock, SourceBatch, bucket_of, route
from tests.helpers import feature


def test_watermark_is_slowest_active_partition_minus_lateness():
    c = BucketClock(("a", "b"), lateness_s=5)
    assert c.observe("a", 100, ACTIVE, now=0) == NO_TS  # b has read nothing: it holds the clock
    assert c.observe("b", 50, ACTIVE, now=0) == 45
    assert c.observe("b", 200, ACTIVE, now=0) == 95


def test_idle_and_ended_partitions_stop_holding_back():
    c = BucketClock(("a", "b"), lateness_s=0)
    c.observe("a", 100, ACTIVE, now=0)
    c.observe("b", 10, ACTIVE, now=0)
    assert c.observe("b", 10, IDLE, now=1) == 100
    assert c.observe("a", 120, ENDED, now=2) >= 100


def test_all_idle_advances_with_the_wall_clock_from_its_last_value():
    c = BucketClock(("a", "b"), lateness_s=0)
    c.observe("a", 100, ACTIVE, now=0)
    c.observe("b", 90, ACTIVE, now=0)
    c.observe("a", 100, IDLE, now=10)
    assert c.watermark == 90
    c.observe("b", 90, IDLE, now=20)
    assert c.free_running()
    assert c.advance(now=23) == 93
    # New data makes a partition hold it again, but the watermark never goes back.
    assert c.observe("b", 91, ACTIVE, now=24) == 93
    assert not c.free_running()


def test_all_ended_passes_everything():
    c = BucketClock(("a",), lateness_s=5)
    c.observe("a", 100, ENDED, now=0)
    assert c.watermark == math.inf and c.ended()


def test_partition_clock_turns_idle_after_idle_s_and_back_on_data():
    p = PartitionClock(idle_s=5, now=0)
    assert not p.observe([], now=4.9)
    assert p.observe([], now=5.0) and p.status == IDLE
    assert not p.observe([], now=9)
    assert p.observe([feature(1, 42.0)], now=10) and p.status == ACTIVE and p.progress == 42.0


def test_route_gives_every_bucket_the_marker_and_each_event_one_bucket():
    events = [feature(i, 1000.0 + i) for i in range(100)]
    batch = SourceBatch("features", "features-0", events, [], 1099.0, ACTIVE, 0.0)
    out = list(route(batch, 8))
    assert [k for k, _ in out] == [f"b{i:04d}" for i in range(8)]
    assert all(b.progress == 1099.0 and b.partition == "features-0" for _, b in out)
    seen = [e for _, b in out for e in b.events]
    assert sorted(seen, key=lambda e: e.ts) == events
    for key, b in out:
        assert all(bucket_of(e.request_id, e.item_id, 8) == int(key[1:]) for e in b.events)


def test_bucket_of_is_stable_across_processes():
    # Python's salted hash() would differ between processes with other PYTHONHASHSEEDs.
    code = "from flows.clock import bucket_of; print(bucket_of('r-9f3c', 'v9001', 1 << 30))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert outs == {str(bucket_of("r-9f3c", "v9001", 1 << 30))}


@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 1e6), st.sampled_from([ACTIVE, IDLE, ENDED]),
                          st.floats(0, 10)), max_size=60),
       st.floats(0, 100))
def test_watermark_never_goes_back_and_never_passes_an_active_partition(steps, lateness):
    c = BucketClock(("a", "b", "c"), lateness_s=lateness)
    now = 0.0
    last = NO_TS
    for part, progress, status, dt in steps:
        now += dt
        wm = c.observe(part, progress, status, now)
        assert wm >= last
        last = wm
        active = [c.progress[p] for p in c.partitions if c.status[p] == ACTIVE]
        if active and not c.free_running():
            # Only the free-running spell (all idle) may have carried it past an active partition.
            assert wm <= max(min(active) - lateness, c.watermark)


def test_join_keys_too_long_for_the_spill_store_or_ambiguous_are_digests():
    from flows.clock import MAX_JOIN_KEY_BYTES, join_key

    emoji = "\U0001F600" * 128  # a valid id of 512 bytes: the plain key would be 1,025
    assert join_key("r", "v") == "r\x00v"
    long = join_key(emoji, emoji)
    assert len(long.encode()) <= MAX_JOIN_KEY_BYTES and long == join_key(emoji, emoji)
    # An id holding NUL could make another pair's key: such keys are digests of both ids.
    assert join_key("a\x00b", "c") != join_key("a", "b\x00c")
    batch = SourceBatch("features", "features-0", [feature_with(emoji, "v"), feature_with("a\x00b", "c")],
                        [], 1.0, ACTIVE, 0.0)
    routed = [bb for _, bb in route(batch, 4) if bb.events]
    assert sorted(k for bb in routed for k in bb.keys) == sorted([join_key(emoji, "v"), join_key("a\x00b", "c")])
    for bb in routed:
        assert all(bucket_of(e.request_id, e.item_id, 4) == int(bb.bucket[1:]) for e in bb.events)


def feature_with(request_id: str, item_id: str):
    from flows.events import FeatureEvent

    return FeatureEvent(request_id=request_id, user_id="u", item_id=item_id, ts=1.0)
