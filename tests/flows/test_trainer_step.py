"""The trainer step in the flow: every example trained, once, through SIGKILLs and resumes, and
the changed rows published to the serving store."""

from __future__ import annotations

import math
import random
import shutil
import time
from collections import Counter
from concurrent.futures import Future

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.sample import write_sample
from tests.flows.test_recovery import by_key, bytewax_run, flow_env, lines_written, read_stream, run_with_kills

pytestmark = pytest.mark.slow


def trained_keys(base) -> Counter:
    log = base / "state" / "trainer" / "trained-keys.log"
    return Counter(tuple(line.split("\t")[1:]) for line in log.read_text().splitlines())


def test_every_example_is_trained_once_through_sigkills_and_resumes(tmp_path):
    rng = random.Random(5)
    straight = tmp_path / "straight"
    write_sample(straight / "data", requests=3000, per_request=5, seed=9)
    killed = tmp_path / "killed"
    shutil.copytree(straight / "data", killed / "data")

    env = flow_env(straight, FRESHREC_TRAIN="1", FRESHREC_TRAIN_BATCH="64", FRESHREC_TRAINED_KEYS_LOG="1")
    t0 = time.monotonic()
    p = bytewax_run(env)
    assert p.wait(timeout=900) == 0, p.stderr.read().decode()[-3000:]
    straight_s = time.monotonic() - t0
    keys = trained_keys(straight)
    examples = by_key(read_stream(straight, "examples"))
    assert set(keys) == set(examples) and set(keys.values()) == {1}

    from paramserver.serving import LmdbServingStore

    store = LmdbServingStore(straight / "state" / "serving")
    users = sorted({k[0] for k in examples})
    assert store.params_version() > 0 and store.read_dense() is not None
    assert store.read_rows("item_id", ["v1", "v2", "v3"]).found.all()
    assert users
    store.close()

    targets = [int(rng.uniform(0.1, 0.9) * len(examples)) for _ in range(3)]
    kills = run_with_kills(flow_env(killed, FRESHREC_TRAIN="1", FRESHREC_TRAIN_BATCH="64", FRESHREC_TRAINED_KEYS_LOG="1"),
                           killed / "recovery", targets, lambda: lines_written(killed))
    assert kills == 3, f"the flow ended before its kills ({straight_s:.1f} s straight)"
    keys = trained_keys(killed)
    assert set(keys) == set(examples), "an example was never trained"
    assert set(keys.values()) == {1}, f"trained twice: {[k for k, n in keys.items() if n > 1][:5]}"


def pv_count(source: str) -> float:
    from flows.trainer_step import PV_SCORES

    return sum(m.value for m in PV_SCORES.collect()[0].samples
               if m.name.endswith("_total") and m.labels["source"] == source)


def test_impressions_without_a_logged_score_are_scored_when_they_arrive(tmp_path):
    from bytewax.testing import TestingSink, run_main

    from flows.pipeline import build_flow
    from tests.helpers import config_for

    write_sample(tmp_path / "data", requests=300, per_request=5, seed=2, malformed=False)
    config = config_for(tmp_path, train=1, train_batch=64)
    before = {s: pv_count(s) for s in ("logged", "on_arrival", "at_training")}
    out = []
    run_main(build_flow(config, tap=TestingSink(out)))
    got = {s: pv_count(s) - before[s] for s in before}
    # The sample's impressions carry no serving score: every one was scored on arrival, by the
    # model as it was then, before its example came.
    assert got == {"logged": 0, "on_arrival": len(out), "at_training": 0}
    assert len(out) == 1500


@pytest.mark.parametrize("validation_sample, validated_rate", [(1.0, 0.25), (0.1, 0.1)])
def test_with_sampled_negatives_only_the_key_sample_is_scored_on_arrival_and_validated(
        tmp_path, validation_sample, validated_rate):
    from bytewax.testing import TestingSink, run_main

    from flows.clock import join_key
    from flows.joiner import in_key_sample
    from flows.pipeline import build_flow
    from tests.helpers import config_for

    write_sample(tmp_path / "data", requests=300, per_request=5, seed=2, malformed=False)
    config = config_for(tmp_path, train=1, train_batch=64, neg_sample_rate=0.25, validation_sample=validation_sample)
    sources = ("logged", "on_arrival", "at_training", "left_out")
    before = {s: pv_count(s) for s in sources}
    out = []
    run_main(build_flow(config, tap=TestingSink(out)))
    got = {s: pv_count(s) - before[s] for s in sources}
    sampled = [e for e in out if in_key_sample(join_key(e.request_id, e.item_id), validated_rate)]
    # Every kept negative is in the expiry's sample (0.25); validation takes the keys of its own
    # sample, at most that one (a validation sample of 1 means the expiry's): positives and explicit
    # negatives outside it train but are left out of validation, and no example outside it was
    # scored on arrival.
    assert all(in_key_sample(join_key(e.request_id, e.item_id), 0.25) for e in out if e.weight != 1.0)
    assert 0 < len(sampled) < len(out)
    assert got == {"logged": 0, "on_arrival": len(sampled), "at_training": 0, "left_out": len(out) - len(sampled)}


def _examples(n: int) -> list:
    from flows.events import Example

    return [Example(request_id=f"r{i}", user_id=f"u{i % 7}", item_id=f"v{i % 13}", ts=1764288000.0 + i,
                    label_ts=1764288001.0 + i, label=i % 2, actions=[], weight=1.0, position=0, score=None,
                    model_version=None, sparse={"author": f"a{i % 5}", "tags": ["cat"]}, dense={})
            for i in range(n)]


def _trainer_cfg(state_dir, recovery_dir):
    from flows.trainer_step import TrainStepConfig

    return TrainStepConfig(state_dir=state_dir, batch_size=32, max_wait_s=60.0, user_slots=(),
                           item_slots=("author", "tags"), dense=(), dim=4, sync_interval_s=0.05,
                           dense_interval_s=10.0, recovery_dir=str(recovery_dir), trained_keys_log=True)


def _trained(logic, called) -> list[int]:
    """The sizes of the steps a call of the step reported, and of the one it left running."""
    return [r.examples for r in called[0] + logic._settle()]


class _Lazy(Future):
    """For `TrainerLogic._graph_pool`: a graph that runs when its result is first asked for
    (`done()` is False until then), so a test decides when a step in flight ends."""

    def __init__(self, fn, *args):
        super().__init__()
        self._run = (fn, args)

    @classmethod
    def submit(cls, fn, *args):
        return cls(fn, *args)

    @classmethod
    def shutdown(cls, wait=True):
        pass

    def result(self, timeout=None):
        if not self.done():
            fn, args = self._run
            self.set_result(fn(*args))
        return super().result(timeout)


def _killed(logic) -> None:
    """What a SIGKILL leaves: the files as they are, the process's handles gone."""
    params, _trainer, sync, keys = logic._parts
    keys.close()
    params.close()
    sync.writer.store.close()


def test_a_restart_killed_before_its_first_commit_trains_nothing_twice(tmp_path):
    from flows.trainer_step import TrainerLogic

    cfg = _trainer_cfg(tmp_path / "state", tmp_path / "recovery")
    examples = _examples(96)
    first = TrainerLogic(cfg, None)
    first.on_batch(examples)
    assert first.snapshot()["seq"] == 1  # checkpoint 1 written; the kill comes before Bytewax commits it
    _killed(first)

    # Bytewax hands the restart no state (nothing committed) and replays the same examples.
    again = TrainerLogic(cfg, None)
    again.on_batch(examples)
    assert again.snapshot()["seq"] == 1
    _killed(again)
    keys = trained_keys(tmp_path)
    assert set(keys) == {(e.request_id, e.item_id) for e in examples}
    assert set(keys.values()) == {1}, "the replayed epoch was trained on top of its own checkpoint"

    # A run under another recovery directory is a new run: it carries on from the newest tables.
    other = TrainerLogic(_trainer_cfg(tmp_path / "state", tmp_path / "recovery2"), None)
    other.on_batch(examples[:32])
    assert other.seq == 1 and other.snapshot()["seq"] == 2
    _killed(other)


def test_the_trained_keys_log_is_written_only_when_asked_for(tmp_path):
    import dataclasses

    from flows.trainer_step import TrainerLogic

    for wanted in (False, True):
        state = tmp_path / f"log-{wanted}" / "state"
        logic = TrainerLogic(dataclasses.replace(_trainer_cfg(state, tmp_path / "recovery"), trained_keys_log=wanted),
                             None)
        logic.on_batch(_examples(64))
        logic.snapshot()
        log = state / "trainer" / "trained-keys.log"
        assert log.exists() is wanted
        if wanted:
            assert len(log.read_text().splitlines()) == 64
            logic._parts[3].close()
        logic._parts[0].close()
        logic._parts[2].writer.store.close()


def test_labelled_and_expired_examples_share_their_batches_labelled_first(tmp_path):
    import flows.trainer_step as ts
    from flows.events import Joined

    logic = ts.TrainerLogic(_trainer_cfg(tmp_path / "state", tmp_path / "recovery"), None)  # batches of 32
    expired, labelled = _examples(20), _examples(200)[100:120]
    for e in labelled:
        e.label_received_at = e.label_ts
    assert logic.on_batch([Joined(expired, [], [])])[0] == []  # 20 wait: no batch yet
    # 40 wait: one full batch, the 20 labelled ones and the first 12 expired ones; 8 expired wait.
    assert _trained(logic, logic.on_batch([Joined(labelled, [], [])])) == [32]
    assert logic.buffer == [] and logic.expired == expired[12:]
    more = _examples(300)[200:205]
    for e in more:
        e.label_received_at = e.label_ts
    logic.on_batch([Joined(more, [], [])])
    assert logic.buffer == more and logic._waiting() == 13
    logic.first_at -= 120.0  # the wait is up: one partial batch of both kinds, not one of each
    assert _trained(logic, logic.on_notify()) == [13] and logic._waiting() == 0
    logic.snapshot()
    _killed(logic)
    trained = trained_keys(tmp_path)
    assert set(trained) == {(e.request_id, e.item_id) for e in expired + labelled + more}
    assert set(trained.values()) == {1}


def test_examples_labelled_by_an_action_train_before_a_backlog_of_expired_ones(tmp_path, monkeypatch):
    import flows.trainer_step as ts
    from flows.events import Joined

    monkeypatch.setattr(ts, "TRAIN_SLICE_S", 0.0)  # one batch per call (as with a step in flight): the backlog outlasts it
    logic = ts.TrainerLogic(_trainer_cfg(tmp_path / "state", tmp_path / "recovery"), None)
    expired, labelled = _examples(96), _examples(200)[100:132]
    for e in labelled:
        e.label_received_at = e.label_ts  # its label came with an action
    assert _trained(logic, logic.on_batch([Joined(expired, [], [])])) == [32] and len(logic.expired) == 64
    # The labelled batch went first, though the expired ones came before it.
    assert _trained(logic, logic.on_batch([Joined(labelled, [], [])])) == [32]
    assert logic.buffer == [] and logic.expired == expired[32:]
    assert logic.notify_at() is not None  # the step comes back for the rest
    logic.snapshot()  # a snapshot trains everything, however long it takes
    assert logic.expired == [] and logic.buffer == []
    _killed(logic)
    trained = trained_keys(tmp_path)
    assert set(trained) == {(e.request_id, e.item_id) for e in expired + labelled} and set(trained.values()) == {1}


def test_impressions_are_scored_together_before_the_next_step_with_the_model_they_came_to(tmp_path, monkeypatch):
    import flows.trainer_step as ts
    from flows.clock import join_key
    from flows.events import FeatureEvent, Joined

    logic = ts.TrainerLogic(_trainer_cfg(tmp_path / "state", tmp_path / "recovery"), None)
    trainer = logic._open()[1]
    calls: list = []
    score, train = trainer.score, trainer.start_train
    monkeypatch.setattr(trainer, "score", lambda imps: calls.append(("score", len(imps), trainer.steps)) or score(imps))
    monkeypatch.setattr(trainer, "start_train", lambda *a, **k: calls.append(("train", trainer.steps)) or train(*a, **k))
    examples = _examples(32)
    impressions = [FeatureEvent(request_id=e.request_id, user_id=e.user_id, item_id=e.item_id, ts=e.ts,
                                sparse=e.sparse) for e in examples]
    assert logic.on_batch([Joined([], [], impressions[:10])]) == ([], False)
    assert logic.on_batch([Joined(examples[:31], [], impressions[10:])]) == ([], False)
    assert calls == [] and len(logic.unscored) == 32  # no step yet: nothing to score them before
    assert _trained(logic, logic.on_batch([Joined(examples[31:], [], [])])) == [32]
    assert calls == [("score", 32, 0), ("train", 0)]  # all in one call, by the model before the step
    assert set(logic.arrival_scores) == {join_key(e.request_id, e.item_id) for e in impressions} - {
        join_key(e.request_id, e.item_id) for e in examples}  # the trained ones' were taken
    monkeypatch.setattr(ts, "UNSCORED_MAX", 5)  # too many waiting: scored at once
    logic._graph_pool = _Lazy  # a step's graph runs only when its result is asked for
    again = _examples(32)
    for e in again:
        e.request_id += "-again"
    logic.on_batch([Joined(again, [], [])])
    assert calls[-1] == ("train", 1) and logic._pending is not None and not logic._pending.done()
    logic.on_batch([Joined([], [], impressions[:6])])  # too many waiting: scored at once, after the step
    assert calls[-1] == ("score", 6, 2) and logic.unscored == [] and logic._pending is None
    _killed(logic)


def test_a_step_in_flight_holds_up_nothing_and_a_snapshot_waits_for_every_step(tmp_path):
    import datetime as dt

    import flows.trainer_step as ts
    from flows.events import Joined

    logic = ts.TrainerLogic(_trainer_cfg(tmp_path / "state", tmp_path / "recovery"), None)  # batches of 32
    logic._open()
    logic._graph_pool = _Lazy  # a step's graph runs only when its result is asked for
    examples = _examples(96)
    assert logic.on_batch([Joined(examples[:32], [], [])])[0] == []  # started, still running
    step = logic._pending
    assert not step.done() and logic._parts[1].steps == 0
    soon = logic.notify_at()
    assert soon is not None and soon - dt.datetime.now(dt.UTC) <= dt.timedelta(seconds=ts.PENDING_POLL_S)
    # A full batch more: it waits for the step in flight, which the call does not wait for.
    assert logic.on_batch([Joined(examples[32:64], [], [])])[0] == [] and logic._pending is step
    assert logic._waiting() == 32 and not step.done()
    logic.first_at -= 120.0  # the wait is up: still nothing is waited for, nor asked for at once
    assert logic.notify_at() > dt.datetime.fromtimestamp(logic.first_at + logic.cfg.max_wait_s + 60.0, dt.UTC)
    assert logic.on_notify()[0] == [] and logic._pending is step and logic._waiting() == 32
    step.result()  # the graph ends: the next call takes the step and starts the next batch
    assert [r.examples for r in logic.on_notify()[0]] == [32]
    assert logic._pending is not step and logic._waiting() == 0 and logic._parts[1].steps == 1
    logic.on_batch([Joined(examples[64:], [], [])])  # waits, while the second step runs
    assert logic._waiting() == 32
    logic.snapshot()  # trains all, every step finished
    assert logic._pending is None and logic._waiting() == 0 and logic._parts[1].steps == 3
    _killed(logic)
    trained = trained_keys(tmp_path)
    assert set(trained) == {(e.request_id, e.item_id) for e in examples} and set(trained.values()) == {1}


def test_a_snapshot_takes_the_step_in_flight_before_its_checkpoint_and_reports_it_next(tmp_path, monkeypatch):
    import flows.trainer_step as ts
    from flows.events import Joined

    logic = ts.TrainerLogic(_trainer_cfg(tmp_path / "state", tmp_path / "recovery"), None)  # batches of 32
    params, trainer, sync, _ = logic._open()
    logic._graph_pool = _Lazy
    examples = _examples(32)
    logic.on_batch([Joined(examples, [], [])])
    assert logic._pending is not None and logic._waiting() == 0
    syncs: list = []
    monkeypatch.setattr(sync, "sync", lambda *a, **k: syncs.append(1))
    logic.on_notify()  # nothing waits, the step runs: no sync of the interval's (its rows are not pushed)
    assert syncs == [] and logic._pending is not None
    monkeypatch.undo()
    checkpoints: list = []
    checkpoint = params.checkpoint
    monkeypatch.setattr(params, "checkpoint", lambda tag: checkpoints.append(trainer.steps) or checkpoint(tag))
    logic.snapshot()
    assert checkpoints == [1] and logic._pending is None  # the step was taken before the checkpoint
    assert logic.notify_at() <= ts.datetime.now(ts.UTC)  # its report goes out at the next call
    assert [r.examples for r in logic.on_notify()[0]] == [32] and logic.on_notify()[0] == []
    _killed(logic)
    assert set(trained_keys(tmp_path)) == {(e.request_id, e.item_id) for e in examples}


def test_a_backlog_past_its_bound_waits_for_its_steps(tmp_path, monkeypatch):
    import flows.trainer_step as ts
    from flows.events import Joined

    monkeypatch.setattr(ts, "BACKLOG_BATCHES", 2)
    monkeypatch.setattr(ts, "TRAIN_SLICE_S", math.inf)  # no time limit: what the call trains is fixed
    logic = ts.TrainerLogic(_trainer_cfg(tmp_path / "state", tmp_path / "recovery"), None)  # batches of 32
    logic._open()
    logic._graph_pool = _Lazy
    examples = _examples(200)
    logic.on_batch([Joined(examples[:64], [], [])])  # two batches: one starts, one waits
    assert logic._pending is not None and logic._waiting() == 32
    logic.on_batch([Joined(examples[64:96], [], [])])  # 64 wait, no more than the bound: no wait
    assert logic._waiting() == 64 and logic._parts[1].steps == 0
    # Past the bound: the call waits for its steps, as steps did before: the one in flight, then
    # every full batch (5 of the 168 waiting), and returns with none in flight.
    reports, _ = logic.on_batch([Joined(examples[96:], [], [])])
    assert [r.examples for r in reports] == [32] * 6 and logic._parts[1].steps == 6
    assert logic._pending is None and logic._waiting() == 8
    logic.snapshot()
    _killed(logic)
    trained = trained_keys(tmp_path)
    assert set(trained) == {(e.request_id, e.item_id) for e in examples} and set(trained.values()) == {1}


def test_the_end_takes_the_step_in_flight_and_trains_what_waits(tmp_path):
    import flows.trainer_step as ts
    from flows.events import Joined

    logic = ts.TrainerLogic(_trainer_cfg(tmp_path / "state", tmp_path / "recovery"), None)  # batches of 32
    trainer = logic._open()[1]
    pool = logic._graph_pool
    logic._graph_pool = _Lazy
    examples = _examples(50)
    logic.on_batch([Joined(examples[:32], [], [])])
    logic.on_batch([Joined(examples[32:], [], [])])  # 18 wait behind the step in flight
    assert logic._pending is not None and not logic._pending.done() and logic._waiting() == 18
    reports, _ = logic.on_eof()
    assert [r.examples for r in reports] == [32, 18] and trainer.steps == 2
    assert logic._pending is None and logic._waiting() == 0 and logic._graph_pool is None
    pool.shutdown()
    # With recovery, Bytewax snapshots once more after on_eof: a checkpoint of the end's tables, and
    # what the snapshot's sync sends flushed as on_eof flushed its own.
    closes: list = []
    writer = logic._parts[2].writer
    close = writer.close
    writer.close = lambda: closes.append(1) or close()
    assert logic.snapshot()["seq"] == 1 and closes == [1]
    assert set(trained_keys(tmp_path)) == {(e.request_id, e.item_id) for e in examples}


def test_a_failed_graph_stops_the_step_with_its_error(tmp_path):
    import flows.trainer_step as ts
    from flows.events import Joined

    logic = ts.TrainerLogic(_trainer_cfg(tmp_path / "state", tmp_path / "recovery"), None)  # batches of 32
    logic._open()
    logic._graph_pool.shutdown()

    class Broken(_Lazy):
        def __init__(self, fn, *args):
            super().__init__(fn, *args)
            self.set_exception(RuntimeError("graph failed: out of memory"))

    logic._graph_pool = Broken
    assert logic.on_batch([Joined(_examples(32), [], [])])[0] == []  # started; its graph has failed
    with pytest.raises(RuntimeError, match="graph failed: out of memory"):
        logic.on_notify()  # the next call takes the step: the error stops the flow
    assert logic._pending is None and logic._parts[1].steps == 0
    _killed(logic)


def test_a_steps_rows_sync_when_it_ends_unless_a_sync_went_within_half_an_interval(tmp_path):
    import dataclasses

    import flows.trainer_step as ts
    from flows.events import Joined

    cfg = dataclasses.replace(_trainer_cfg(tmp_path / "state", tmp_path / "recovery"), sync_interval_s=10.0)
    logic = ts.TrainerLogic(cfg, None)  # batches of 32
    sync = logic._open()[2]
    logic._graph_pool = _Lazy
    store = sync.writer.store
    users = sorted({e.user_id for e in _examples(32)})

    def versions() -> list[int]:
        return store.read_rows("user_id", users).versions.tolist()

    def step(batch: list) -> None:
        logic.on_batch([Joined(batch, [], [])])
        assert logic._pending is not None
        logic._pending.result()  # the graph ends, the step is not taken yet
        logic.on_notify()  # takes it

    batch = _examples(32)
    sync.last_sync = time.time() - 6.0  # more than half the interval ago, less than all of it
    step(batch)
    assert versions() == [1] * len(users)  # synced when the step ended
    for e in batch:
        e.request_id += "-again"
    sync.last_sync = time.time() - 4.0  # less than half the interval ago: the interval's turn
    step(batch)
    assert versions() == [1] * len(users) and logic._pending is None
    sync.last_sync -= 6.0
    logic.on_notify()
    assert versions() == [2] * len(users)
    _killed(logic)


def test_the_item_towers_rows_go_at_their_own_interval_and_all_at_a_snapshot(tmp_path):
    import dataclasses

    from flows.trainer_step import TrainerLogic, item_tower_slots

    assert item_tower_slots((), ("author", "tags")) == ("item_id", "author", "tags", "item_id.bias")
    assert item_tower_slots(("author",), ("author", "tags")) == ("item_id", "tags", "item_id.bias")
    cfg = dataclasses.replace(_trainer_cfg(tmp_path / "state", tmp_path / "recovery"), item_sync_interval_s=3600.0,
                              batch_size=64)
    logic = TrainerLogic(cfg, None)
    examples = _examples(64)
    logic.on_batch(examples)  # trains one batch (its rows sync once its step ends)
    if logic._pending is not None:
        logic._pending.result()
    logic.on_notify()  # takes the step: the first sync takes every slot
    store = logic._parts[2].writer.store
    items, users = ["v1", "v2"], ["u1", "u2"]
    assert store.read_rows("item_id", items).found.all() and store.read_rows("user_id", users).versions.tolist() == [1, 1]
    for e in examples:
        e.request_id += "-again"
    logic.on_batch(examples)  # the same users and items once more
    logic._settle()
    before = store.read_rows("item_id", items).versions.tolist()
    logic._parts[2].maybe_sync(time.time() + 2.0)
    assert store.read_rows("item_id", items).versions.tolist() == before  # the items' wait an hour
    assert store.read_rows("user_id", users).versions.tolist() == [2, 2]  # the users' went
    logic.snapshot()  # every slot
    assert [v > b for v, b in zip(store.read_rows("item_id", items).versions.tolist(), before, strict=True)] == [True, True]
    _killed(logic)


_CALLS = st.lists(st.one_of(
    # examples (whole batches of 32 as often as any other size), share labelled
    st.tuples(st.just("batch"), st.one_of(st.sampled_from([1, 31, 32, 33, 64]), st.integers(0, 80)),
              st.floats(0.0, 1.0)),
    st.tuples(st.just("notify")),
    st.tuples(st.just("graph ends")),  # the step in flight's graph finishes (not taken yet)
    st.tuples(st.just("wait is up")),  # the oldest example has waited its max_wait_s
    st.tuples(st.just("snapshot")),
), max_size=30)


@settings(max_examples=40)  # no deadline: the profile in conftest.py
@given(calls=_CALLS, backlog=st.integers(1, 4))
def test_every_example_is_trained_exactly_once_whatever_the_calls_and_graph_timings(calls, backlog):
    """Over any order of batches, notifications, graphs ending and snapshots: one step in flight at
    most, none after a snapshot, and by the end every example trained once, each step reported once."""
    import tempfile
    from pathlib import Path

    import flows.trainer_step as ts
    from flows.events import Joined

    saved = ts.BACKLOG_BATCHES
    ts.BACKLOG_BATCHES = backlog
    try:
        with tempfile.TemporaryDirectory(prefix="freshrec-test-trainer-") as tmp:
            base = Path(tmp)
            logic = ts.TrainerLogic(_trainer_cfg(base / "state", base / "recovery"), None)  # batches of 32
            trainer = logic._open()[1]
            logic._graph_pool.shutdown()
            logic._graph_pool = _Lazy
            sent: list = []
            reported = 0
            for call in calls:
                if call[0] == "batch":
                    n, share = call[1], call[2]
                    batch = _examples(len(sent) + n)[len(sent):]
                    for i, e in enumerate(batch):
                        if i < share * n:
                            e.label_received_at = e.ts  # labelled by an action: the first queue
                    sent += batch
                    out, _ = logic.on_batch([Joined(batch, [], [])])
                elif call[0] == "notify":
                    out, _ = logic.on_notify()
                elif call[0] == "graph ends":
                    if logic._pending is not None:
                        logic._pending._graph.future.result()
                    out = []
                elif call[0] == "wait is up":
                    if logic.first_at is not None:
                        logic.first_at -= logic.cfg.max_wait_s
                    out = []
                else:
                    logic.snapshot()
                    assert logic._pending is None and logic._waiting() == 0
                    out = []
                reported += sum(r.examples for r in out)
                assert logic._pending is None or trainer._in_flight is logic._pending
            out, _ = logic.on_eof()
            reported += sum(r.examples for r in out)
            assert logic._pending is None and logic._waiting() == 0
            assert reported == trainer.examples == len(sent)
            trained = trained_keys(base)
            assert set(trained) == {(e.request_id, e.item_id) for e in sent} and set(trained.values()) <= {1}
            _killed(logic)
    finally:
        ts.BACKLOG_BATCHES = saved
