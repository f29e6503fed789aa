"""The join decision: one outcome per impression, every action in exactly one case, and the same
examples whatever the cache size, flushes and evictions (state going through LMDB)."""

from __future__ import annotations

import math
import tempfile
from collections import Counter

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.events import ActionEvent, FeatureEvent
from flows.joiner import JoinBucket, JoinSettings, keep_fraction
from flows.spill import LmdbSpillStore
from tests.helpers import source_module

T0 = 1764288000.0
WINDOW, HOLD = 100.0, 10.0


def feat(k: int, ts: float) -> FeatureEvent:
    return FeatureEvent(request_id=f"r{k}", user_id="u", item_id=f"v{k % 3}", ts=ts)


def act(k: int, ts: float, action: str, eid: str | None = None) -> ActionEvent:
    return ActionEvent(request_id=f"r{k}", user_id="u", item_id=f"v{k % 3}", ts=ts, action=action,
                       event_id=eid, received_at=ts + 0.1)


def key(e) -> str:
    return f"{e.request_id}\x00{e.item_id}"


class Reference:
    """The contract's Joining rules, written as plainly as possible, with no cache and no store."""

    POS = {"click", "like", "share", "comment", "follow", "finish", "purchase"}

    def __init__(self, rate: float):
        self.rate = rate
        self.waiting: dict = {}
        self.pending: dict = {}
        self.resolved: dict = {}
        self.examples: list = []
        self.cases: Counter = Counter()
        self.wm = -math.inf

    @staticmethod
    def aid(a):
        return a.event_id if a.event_id is not None else (a.action, a.ts, a.value)

    def feature_with_pending(self, f):
        k = key(f)
        if k in self.resolved or k in self.waiting:
            self.cases["duplicate_feature"] += 1
            return
        self.waiting[k] = (f, [])
        pend = self.pending.pop(k, [])
        for i, a in enumerate(pend):
            if self.apply(k, a):
                self.cases["after_example"] += len(pend) - i - 1
                break
        self.advance(self.wm)  # an impression whose window has closed already expires at once

    def action(self, a):
        k = key(a)
        if k in self.waiting:
            if self.aid(a) in [self.aid(b) for b in self.waiting[k][1]]:
                self.cases["duplicate"] += 1
            else:
                self.apply(k, a)
        elif k in self.pending:
            if self.aid(a) in [self.aid(b) for b in self.pending[k]]:
                self.cases["duplicate"] += 1
            else:
                self.pending[k].append(a)
        elif k in self.resolved:
            self.cases["duplicate" if self.aid(a) in self.resolved[k] else "after_example"] += 1
        elif a.ts + HOLD <= self.wm:
            self.cases["late"] += 1
        else:
            self.pending[k] = [a]

    def apply(self, k, a) -> bool:
        f, acts = self.waiting[k]
        acts.append(a)
        self.cases["joined"] += 1
        label = 1 if a.action in self.POS else 0 if a.action in ("skip", "dislike") else None
        if label is None:
            return False
        self.resolve(k, label, a.ts, 1.0)
        return True

    def resolve(self, k, label, label_ts, weight, keep=True):
        f, acts = self.waiting.pop(k)
        self.resolved[k] = {self.aid(b) for b in acts}
        if keep:
            self.examples.append((k, label, label_ts, weight))

    def advance(self, wm):
        self.wm = max(self.wm, wm)
        for k, (f, _) in list(self.waiting.items()):
            if f.ts + WINDOW <= self.wm:
                kept = self.rate >= 1 or keep_fraction(k) < self.rate
                self.cases["kept" if kept else "sampled_out"] += 1
                self.resolve(k, 0, f.ts + WINDOW, 1 / self.rate, keep=kept)
        for k, acts in list(self.pending.items()):
            if acts[0].ts + HOLD <= self.wm:
                self.cases["orphan"] += len(acts)
                del self.pending[k]


ACTIONS = ["like", "click", "skip", "dislike", "watch", "finish"]


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 25))
    steps = []
    for k in range(n):
        ts = T0 + draw(st.floats(0, 300))
        steps.append(("f", feat(k, ts)))
        if draw(st.booleans()):
            steps.append(("f", feat(k, ts)))  # a retry of the same impression
        for j in range(draw(st.integers(0, 3))):
            delay = draw(st.sampled_from([-5.0, 0.5, 3.0, 50.0, 150.0]))
            a = act(k, ts + delay, draw(st.sampled_from(ACTIONS)), draw(st.sampled_from([None, f"e{k}-{j}"])))
            steps.append(("a", a))
            if draw(st.integers(0, 4)) == 0:
                steps.append(("a", a))  # delivered twice
    steps = draw(st.permutations(steps))
    # The watermark moves now and then, never back, and passes everything at the end.
    out, wm = [], T0 - 50
    for s in steps:
        out.append(s)
        if draw(st.integers(0, 3)) == 0:
            wm += draw(st.floats(0, 80))
            out.append(("w", wm))
    out.append(("w", math.inf))
    return out


def run_bucket(steps, cache_size: int, rate: float, flush_every: int, path: str, spill: bool = False,
               lanes: int = 1):
    store = LmdbSpillStore(path, undo_keep=1000)
    b = JoinBucket(JoinSettings(window_s=WINDOW, orphan_hold_s=HOLD, neg_sample_rate=rate,
                                cache_size=cache_size, resolved_size=10**6), store)
    examples, dead, tag = [], [], 0
    for i, (kind, x) in enumerate(steps):
        # Events from `lanes` source partitions in turn (each keeps its own FIFO of dues).
        partition = None if lanes == 1 else f"{kind}-{i % lanes}"
        if kind == "f":
            examples += b.on_features([x], partition=partition)
        elif kind == "a":
            examples += b.on_actions([x], partition=partition)
        else:
            ex, d = b.advance(x)
            examples += ex
            dead += d
        if flush_every and i % flush_every == 0:
            tag += 1
            b.flush(tag)
        if b.over_capacity():
            tag += 1
            if spill:  # as the flow does: only the oldest entries leave, written if they must be
                b.spill(tag, cache_size // 2)
            else:
                b.flush(tag)
                b.evict(cache_size // 2)
    b.flush(tag + 1)
    store.close()
    return b, examples, dead


def outcome(examples):
    return sorted((f"{e.request_id}\x00{e.item_id}", e.label, e.label_ts, e.weight) for e in examples)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.sampled_from([1, 2, 5, 1000]), st.sampled_from([1.0, 0.5]),
       st.sampled_from([0, 1, 3, 7]), st.booleans(), st.sampled_from([1, 3]))
def test_the_bucket_follows_the_contract_whatever_its_cache_and_flushes(steps, cache_size, rate, flush_every, spill,
                                                                       lanes):
    ref = Reference(rate)
    for kind, x in steps:
        {"f": ref.feature_with_pending, "a": ref.action, "w": ref.advance}[kind](x)
    with tempfile.TemporaryDirectory() as d:
        b, examples, dead = run_bucket(steps, cache_size, rate, flush_every, d, spill, lanes)
    assert outcome(examples) == sorted(ref.examples), set(outcome(examples)) ^ set(ref.examples)
    # One outcome per impression, never two.
    keys = [k for k, *_ in outcome(examples)]
    assert len(keys) == len(set(keys))
    c = b.counts
    impressions = {key(x) for kind, x in steps if kind == "f"}
    assert c.impressions == len(impressions)
    assert c.positives + c.explicit_negatives + c.expired_kept + c.sampled_out == len(impressions)
    # Every action in exactly one of the contract's cases.
    n_actions = sum(1 for kind, _ in steps if kind == "a")
    assert (c.actions_joined + c.duplicates + c.after_example + c.late + c.orphans) == n_actions
    assert c.actions_pending == 0
    assert (c.duplicates, c.after_example, c.late, c.orphans, c.sampled_out) == (
        ref.cases["duplicate"], ref.cases["after_example"], ref.cases["late"], ref.cases["orphan"],
        ref.cases["sampled_out"])
    assert len(dead) == c.orphans and all(d.reason.startswith("orphan") for d in dead)
    assert b.waiting() == (0, 0)


def test_a_positive_action_makes_a_positive_example_at_once(tmp_path):
    b = JoinBucket(JoinSettings(window_s=WINDOW), LmdbSpillStore(tmp_path))
    assert b.on_features([feat(1, T0)]) == []
    assert b.on_actions([act(1, T0 + 2, "watch")]) == []
    [ex] = b.on_actions([act(1, T0 + 3, "like")])
    assert (ex.label, ex.label_ts, ex.weight, [a.action for a in ex.actions]) == (1, T0 + 3, 1.0, ["watch", "like"])
    assert ex.label_received_at == T0 + 3.1
    assert b.on_actions([act(1, T0 + 4, "share")]) == [] and b.counts.after_example == 1


def test_expiry_keeps_a_stable_fraction_weighted_by_one_over_the_rate(tmp_path):
    b = JoinBucket(JoinSettings(window_s=WINDOW, neg_sample_rate=0.25), LmdbSpillStore(tmp_path))
    b.on_features([feat(k, T0) for k in range(2000)])
    examples, _ = b.advance(T0 + WINDOW)
    assert 0.2 < len(examples) / 2000 < 0.3
    assert {e.weight for e in examples} == {4.0} and {e.label for e in examples} == {0}
    kept = {e.request_id for e in examples}
    assert kept == {f"r{k}" for k in range(2000) if keep_fraction(f"r{k}\x00v{k % 3}") < 0.25}


def test_watch_is_positive_above_a_configured_threshold(tmp_path):
    b = JoinBucket(JoinSettings(window_s=WINDOW, watch_positive_s=10), LmdbSpillStore(tmp_path))
    b.on_features([feat(1, T0), feat(2, T0)])
    assert b.on_actions([ActionEvent(request_id="r1", user_id="u", item_id="v1", ts=T0 + 1, action="watch",
                                     value=3.0)]) == []
    [ex] = b.on_actions([ActionEvent(request_id="r2", user_id="u", item_id="v2", ts=T0 + 1, action="watch",
                                     value=12.0)])
    assert ex.label == 1


def test_a_small_cache_really_goes_through_lmdb_and_changes_nothing(tmp_path):
    steps = [("f", feat(k, T0 + k * 0.01)) for k in range(3000)]
    steps += [("a", act(k, T0 + 1 + k * 0.01, "like")) for k in range(0, 3000, 2)]
    steps += [("w", math.inf)]
    small, ex_small, _ = run_bucket(steps, 100, 1.0, 0, str(tmp_path / "small"))
    big, ex_big, _ = run_bucket(steps, 10**6, 1.0, 0, str(tmp_path / "big"))
    assert outcome(ex_small) == outcome(ex_big) and len(ex_small) == 3000
    assert small.counts.spill_writes > 3000 and small.counts.spill_reads >= 1500
    assert big.counts.spill_writes == 0


def test_resume_rolls_the_store_back_to_the_flush_of_the_snapshot(tmp_path):
    b = JoinBucket(JoinSettings(window_s=WINDOW), LmdbSpillStore(tmp_path))
    b.on_features([feat(k, T0) for k in range(10)])
    b.flush(1)
    b.on_actions([act(k, T0 + 1, "like") for k in range(5)])
    b.on_features([feat(k, T0) for k in range(10, 20)])
    b.flush(2)  # a crash after this flush, before Bytewax committed snapshot 2
    b.resume(1)
    assert b.waiting() == (0, 10)
    again = b.on_actions([act(k, T0 + 1, "like") for k in range(5)])
    assert sorted(e.request_id for e in again) == [f"r{k}" for k in range(5)]


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_keep_fraction_is_uniform_enough(rate):
    xs = [keep_fraction(f"r{i}\x00v") for i in range(20000)]
    assert 0.48 < sum(x < 0.5 for x in xs) / len(xs) < 0.52


def _joiner_source():
    """flows/joiner.py run as plain Python, whether or not the compiled module is installed."""
    import flows.joiner as joiner

    return source_module(joiner)


PINNED = [0.368727, 0.303759, 0.512126]


def test_keep_fraction_is_the_same_compiled_or_not_and_in_every_version():
    keys = [f"r{i}\x00v{i % 7}" for i in range(300)] + ["", "é\x00ü", "漢字\x00x", "\U0001F600\x00y", "r" * 600]
    source = _joiner_source()
    assert [keep_fraction(k) for k in keys] == [source.keep_fraction(k) for k in keys]
    # Pinned: a resumed or upgraded flow must sample the same negatives out.
    assert [round(keep_fraction(k), 6) for k in ("r0\x00v0", "r1\x00v1", "é\x00ü")] == PINNED
    assert all(0.0 <= keep_fraction(k) < 1.0 for k in keys)


def test_a_compiled_joiner_refuses_to_run_in_place_of_a_changed_source(monkeypatch):
    import flows.joiner as joiner

    monkeypatch.setattr(joiner, "_BUILT_FROM", "0" * 64)
    with pytest.raises(ImportError, match="compiled from another version"):
        joiner._check_built_from_source()


def rich(k: int, ts: float) -> FeatureEvent:
    return FeatureEvent(request_id=f"r{k}", user_id=f"u{k}", item_id=f"v{k % 3}", ts=ts, position=k % 5,
                        sparse={"author": f"a{k}", "tags": ["x", f"t{k}"]}, dense={"ctr": k / 10},
                        model_version="7", score=k / 100, event_id=f"f{k}", received_at=ts + 0.2)


def test_an_example_carries_its_impression_whole_in_memory_and_through_lmdb(tmp_path):
    # The example is prepared when the impression comes; through LMDB it is made again from the
    # stored impression: both ways give the same whole example.
    steps = [("f", rich(k, T0 + k * 0.01)) for k in range(400)]
    steps += [("a", act(k, T0 + 5 + k * 0.01, ("like", "skip", "watch")[k % 3])) for k in range(0, 400, 2)]
    steps += [("w", math.inf)]
    _, ex_small, _ = run_bucket(steps, 5, 1.0, 0, str(tmp_path / "small"))
    big, ex_big, _ = run_bucket(steps, 10**6, 1.0, 0, str(tmp_path / "big"))
    assert big.counts.spill_writes == 0 and len(ex_big) == 400
    assert sorted(ex_small, key=key) == sorted(ex_big, key=key)
    for e in ex_big:
        k = int(e.request_id[1:])
        f = rich(k, T0 + k * 0.01)
        assert (e.user_id, e.item_id, e.ts, e.position, e.sparse, e.dense, e.model_version, e.score) == (
            f.user_id, f.item_id, f.ts, f.position, f.sparse, f.dense, f.model_version, f.score)
        label = 1 if k % 6 == 0 else 0  # like; skip is an explicit negative; watch and none expire
        assert e.label == label
        assert e.weight == 1.0
        if k % 6 in (0, 4):  # decided by its action
            assert e.label_ts == T0 + 5 + k * 0.01 and e.label_received_at == e.label_ts + 0.1
        else:
            assert e.label_ts == f.ts + WINDOW and e.label_received_at is None


def test_an_example_once_made_is_not_changed_by_what_comes_after(tmp_path):
    b = JoinBucket(JoinSettings(window_s=WINDOW, neg_sample_rate=0.5), LmdbSpillStore(tmp_path))
    b.on_features([rich(1, T0), rich(2, T0)])
    [pos] = b.on_actions([act(1, T0 + 1, "like", "e1")])
    [neg] = b.on_actions([act(2, T0 + 1, "dislike", "e2")])
    before = [msgspec.structs.astuple(x) for x in (pos, neg)]
    b.on_actions([act(1, T0 + 2, "share", "e3"), act(2, T0 + 2, "like", "e4"), act(1, T0 + 1, "like", "e1")])
    b.on_features([rich(1, T0 + 3), rich(2, T0 + 3)])  # duplicates of resolved keys
    b.flush(1)
    b.advance(math.inf)
    assert [msgspec.structs.astuple(x) for x in (pos, neg)] == before
    assert (pos.label, [a.action for a in pos.actions], neg.label, neg.weight) == (1, ["like"], 0, 1.0)
    assert (b.counts.after_example, b.counts.duplicates, b.counts.duplicate_features) == (2, 1, 2)


def test_impressions_read_back_from_lmdb_leave_the_cyclic_collector_as_parsed_ones_do(tmp_path):
    # Compiled, an impression's `sparse` of strings (and its tag lists) read back from LMDB is
    # untracked, as the parser leaves it (flows.untrack); one the joiner was handed is left as it
    # came, whatever is in it. Plain Python cannot untrack: all stay tracked, with the same examples.
    import gc

    from flows import untrack

    odd = FeatureEvent(request_id="r9", user_id="u9", item_id="v0", ts=T0, sparse={"nested": [["x"]]})
    b = JoinBucket(JoinSettings(window_s=WINDOW, cache_size=2), LmdbSpillStore(tmp_path))
    b.on_features([rich(k, T0) for k in range(4)])
    b.spill(1, 0)  # all on disk: a label reads them back
    examples = b.on_actions([act(k, T0 + 1, "like", f"e{k}") for k in (0, 1)])
    b.on_features([rich(k, T0) for k in range(4, 6)] + [odd])
    examples += b.on_actions([act(k, T0 + 1, "like", f"e{k}") for k in (4, 5, 9)])
    assert sorted(e.request_id for e in examples) == ["r0", "r1", "r4", "r5", "r9"]
    for e in examples:
        read_back = e.request_id in ("r0", "r1")
        assert gc.is_tracked(e.sparse) is not (untrack.COMPILED and read_back)
        if e.request_id != "r9":
            assert gc.is_tracked(e.sparse["tags"]) is not (untrack.COMPILED and read_back)
    assert [e.sparse for e in examples if e.request_id == "r9"] == [{"nested": [["x"]]}]


def test_an_entry_that_leaves_the_cache_before_its_due_leaves_its_fifo_too(tmp_path):
    # A resolved impression, held actions that became an impression's, a spilled entry: none is
    # kept until its due (that held about 120 bytes an impression for the whole join window).
    b = JoinBucket(JoinSettings(window_s=WINDOW, orphan_hold_s=HOLD), LmdbSpillStore(tmp_path, durable=False))
    b.on_features([feat(k, T0) for k in range(6)], partition="f0")
    b.on_actions([act(6, T0, "watch", "h6")], partition="a0")  # held: its impression comes next
    assert b.queued() == 7
    assert len(b.on_actions([act(k, T0 + 1, "like", f"e{k}") for k in (0, 1)], partition="a0")) == 2
    assert len(b.on_actions([act(2, T0 + 1, "dislike", "e2"), act(3, T0 + 1, "watch", "c3")], partition="a0")) == 1
    assert b.queued() == 4  # 3 (waiting with a neutral action), 4, 5, and 6's held action
    b.on_features([feat(6, T0 + 2)], partition="f0")
    assert b.queued() == 4 and b.waiting() == (4, 0)  # 6's held actions left, its impression came
    assert b.spill(1, 2) == 2 and b.queued() == 2 and b.waiting() == (2, 2)
    examples, _ = b.advance(T0 + WINDOW + 5)
    assert sorted(x.request_id for x in examples) == ["r3", "r4", "r5", "r6"] and b.queued() == 0
    assert b.counts.expired_kept == 4 and b.waiting() == (0, 2)  # the store deletes at its next write
    b.flush(2, durable=False)
    assert b.waiting() == (0, 0)


def test_the_cache_bound_counts_waiting_keys_only(tmp_path):
    b = JoinBucket(JoinSettings(window_s=WINDOW, cache_size=3), LmdbSpillStore(tmp_path))
    b.on_features([feat(k, T0) for k in range(3)])
    assert not b.over_capacity() and b.waiting() == (3, 0)
    b.on_features([feat(3, T0)])
    assert b.over_capacity() and b.waiting() == (4, 0)
    assert b.flush(1) == 4 and b.evict(2) == 2 and b.waiting() == (2, 4)


def test_a_spill_writes_only_the_oldest_entries_so_labels_of_the_newer_cost_no_write(tmp_path):
    b = JoinBucket(JoinSettings(window_s=WINDOW, cache_size=4), LmdbSpillStore(tmp_path, durable=False))
    b.on_features([feat(k, T0 + k) for k in range(6)])
    assert b.over_capacity()
    assert b.spill(1, 2) == 4 and b.waiting() == (2, 4)  # 0-3 written and gone; 4 and 5 unwritten
    assert len(b.on_actions([act(4, T0 + 5, "like"), act(5, T0 + 6, "skip")])) == 2
    assert b.flush(2) == 0 and b.counts.spill_writes == 4  # nothing of theirs was ever stored
    # The spilled ones come back for their labels or their expiry, each once.
    liked = b.on_actions([act(0, T0 + 7, "like")])
    assert [key(e) for e in liked] == [key(feat(0, T0))]
    expired, _ = b.advance(math.inf)
    assert sorted(key(e) for e in expired) == sorted(key(feat(k, T0 + k)) for k in (1, 2, 3))
    b.flush(3)
    assert len(b.store) == 0 and b.waiting() == (0, 0)


def test_entries_read_back_for_their_labels_leave_no_placeholders_in_the_cache(tmp_path):
    # A label that reads its impression back from the store takes it: the entry goes from memory
    # with the label, its key counts against the bound until the next write deletes its record.
    # (Before, its key stayed in the cache as a placeholder until then: in join.spill's run 45% of
    # the bound, so a bucket spilled long before it held `cache_size` waiting impressions.)
    b = JoinBucket(JoinSettings(window_s=WINDOW, cache_size=6), LmdbSpillStore(tmp_path, durable=False))
    b.on_features([feat(k, T0 + k) for k in range(6)])
    assert b.spill(1, 2) == 4 and b.waiting() == (2, 4)
    assert len(b.on_actions([act(k, T0 + 10, "like") for k in range(4)])) == 4
    assert b.waiting() == (2, 4)  # 4 and 5 wait in memory; the 4 records go at the next write
    assert b.counts.spill_reads == 4
    b.on_features([feat(k, T0 + 11) for k in range(6, 8)])  # 4 waiting + 4 taken keys
    assert b.over_capacity()
    assert b.spill(2, 4) == 4 and b.waiting() == (4, 0)  # the 4 deletes; no waiting entry had to leave
    assert not b.over_capacity()
    # Read again, they are duplicates' keys, not entries: nothing comes back from the store.
    assert b.on_actions([act(0, T0 + 12, "like")]) == [] and b.counts.after_example == 1
    assert b.counts.spill_reads == 4


def test_an_entry_read_back_that_stays_in_memory_still_expires_at_its_due(tmp_path):
    # A neutral action reads a spilled impression back and it stays: the next write deletes its
    # record, which the store's due index found it by, so it waits on the heap for its expiry.
    b = JoinBucket(JoinSettings(window_s=WINDOW, cache_size=10), LmdbSpillStore(tmp_path, durable=False))
    b.on_features([feat(k, T0) for k in range(3)])
    assert b.spill(1, 0) == 3 and b.waiting() == (0, 3)
    assert b.on_actions([act(1, T0 + 1, "watch", "w1")]) == []
    assert b.waiting() == (1, 3)
    b.on_features([feat(3, T0 + 2)])
    assert b.spill(2, 10) == 1 and b.waiting() == (2, 2)  # 1's record went; 1 and 3 stay in memory
    examples, _ = b.advance(T0 + WINDOW + 2)
    assert sorted((e.request_id, [a.action for a in e.actions]) for e in examples) == [
        ("r0", []), ("r1", ["watch"]), ("r2", []), ("r3", [])]
    b.flush(3)
    assert b.waiting() == (0, 0) and len(b.store) == 0


def test_a_taken_record_is_never_read_again_even_once_its_key_is_forgotten(tmp_path):
    # Its key resolved and then forgotten (resolved_size 1) before the next write deletes its
    # record: a late action finds neither, and the stale record does not come back as a waiting
    # impression (a second example).
    b = JoinBucket(JoinSettings(window_s=WINDOW, orphan_hold_s=HOLD, cache_size=10, resolved_size=1),
                   LmdbSpillStore(tmp_path, durable=False))
    b.on_features([feat(0, T0), feat(1, T0)])
    assert b.spill(1, 0) == 2
    assert len(b.on_actions([act(0, T0 + 1, "like", "a0")])) == 1  # read back, taken, resolved
    assert len(b.on_actions([act(1, T0 + 1, "like", "a1")])) == 1  # 0's key is forgotten
    assert b.on_actions([act(0, T0 + 2, "like", "a0-again")]) == []  # held: its hold is not over
    assert b.counts.actions_pending == 1 and b.counts.spill_reads == 2
    examples, dead = b.advance(T0 + 2 + HOLD)
    assert examples == [] and len(dead) == 1 and b.counts.orphans == 1
    b.flush(2)
    assert b.waiting() == (0, 0) and len(b.store) == 0
    assert b.counts.positives == 2 and b.counts.impressions == 2
