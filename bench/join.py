"""join.*: the joiner (flows.pipeline's `JoinLogic` over `flows.joiner.JoinBucket`) against minimal
joins measured in the same run on the same events.

The inputs are built up front as already-parsed events (except in `join.flow_files`), cut into
source batches by event time and routed to 8 buckets with `flows.clock.route`, as the flow does,
then pushed through a Bytewax dataflow from a `TestingSource` of keyed `BucketBatch`es.

`python -m bench.join memory N DIR` is the child process of `join.memory_10m` (it prints JSON).
"""

from __future__ import annotations

import collections
import gc
import itertools
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import lmdb
import msgspec
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource, run_main

from bench import Figure, benchmark, compared
from flows.clock import ACTIVE, ENDED, BucketBatch, SourceBatch, bucket_of, route
from flows.config import Config
from flows.events import ActionEvent, Example, ExampleAction, FeatureEvent, Joined, encode_lines
from flows.heap import FLOW_THRESHOLDS, frozen_heap
from flows.joiner import JoinBucket, JoinCounts, JoinSettings
from flows.pipeline import EVICT_TO, JoinLogic, JoinStepConfig, build_flow
from flows.spill import LmdbSpillStore

T0 = 1764288000.0
BUCKETS = 8
PARTITIONS = ("features-0", "actions-0")
LATENESS_S = 5.0
EPOCH = timedelta(seconds=10)  # Bytewax's default, said out loud: every run uses the same
TAGS = ("dance", "cat", "food", "travel", "music", "sport", "diy", "comedy")
COUNTRIES = ("de", "fr", "us", "br", "jp", "in")


# -- inputs ----------------------------------------------------------------------------------

def make_feature(rng: random.Random, i: int, ts: float) -> FeatureEvent:
    """An impression as the model server logs it; every container its own, as a parser makes them."""
    r = rng.random
    t1 = TAGS[int(r() * 8)]
    return FeatureEvent(
        request_id=f"r-{i // 5:09d}-{rng.getrandbits(32):08x}", user_id=f"u{int(r() * 1e6)}",
        item_id=f"v{int(r() * 1e7)}", ts=ts, position=i % 5,
        sparse={"author": f"a{int(r() * 1e5)}", "tags": [t1, TAGS[(TAGS.index(t1) + 1 + int(r() * 7)) % 8]],
                "country": COUNTRIES[int(r() * 6)]},
        dense={"item_ctr_7d": r(), "age_h": r() * 500.0}, model_version="17", score=r(),
        event_id=f"f-{i}", received_at=ts + 0.05)


def join_events(n: int, *, rate: float, p_label: float, delay: Callable[[random.Random], float],
                seed: int = 1) -> list[tuple[float, int, Any]]:
    """`n` impressions at `rate` per second of event time; a share `p_label` of them liked
    `delay(rng)` seconds later. (ts, 0 feature | 1 action, event), in ts order."""
    rng = random.Random(seed)
    out: list[tuple[float, int, Any]] = []
    for i in range(n):
        ts = T0 + i / rate
        f = make_feature(rng, i, ts)
        out.append((ts, 0, f))
        if rng.random() < p_label:
            ats = ts + delay(rng)
            out.append((ats, 1, ActionEvent(request_id=f.request_id, user_id=f.user_id, item_id=f.item_id,
                                            ts=ats, action="like", event_id=f"a-{i}", received_at=ats + 0.05)))
    out.sort(key=lambda x: x[0])
    return out


def source_batches(events: list[tuple[float, int, Any]], window_s: float) -> list[SourceBatch]:
    """Both streams cut at the same event-time edges (features first), then an end marker each:
    every action comes after its impression, as when both sources keep pace."""
    streams = ("features", "actions")
    cur: list[list[Any]] = [[], []]
    progress = [-math.inf, -math.inf]
    out: list[SourceBatch] = []

    def cut() -> None:
        for s in (0, 1):
            if cur[s]:
                out.append(SourceBatch(streams[s], PARTITIONS[s], cur[s], [], progress[s], ACTIVE, 0.0))
                cur[s] = []

    edge = events[0][0] + window_s
    for ts, s, e in events:
        if ts >= edge:
            cut()
            edge += window_s * (1 + int((ts - edge) // window_s))
        cur[s].append(e)
        if ts > progress[s]:
            progress[s] = ts
    cut()
    out += [SourceBatch(streams[s], PARTITIONS[s], [], [], progress[s], ENDED, 0.0) for s in (0, 1)]
    return out


def keyed(batches: list[SourceBatch]) -> list[tuple[str, BucketBatch]]:
    return [kv for b in batches for kv in route(b, BUCKETS)]


def join_input(n: int, *, rate: float, p_label: float, delay: Callable[[random.Random], float],
               per_bucket: int = 300) -> tuple[list[tuple[str, BucketBatch]], int, int]:
    """Keyed micro-batches of about `per_bucket` events per bucket; (items, events, impressions)."""
    events = join_events(n, rate=rate, p_label=p_label, delay=delay)
    # Event-time window that holds about per_bucket * BUCKETS events of both streams.
    window = per_bucket * BUCKETS / (rate * (1 + p_label))
    items = keyed(source_batches(events, window))
    return items, len(events), n


def _frozen(build: Callable[[], Any]) -> Any:
    """Build inputs, then keep the collector from walking them during the runs."""
    data = build()
    gc.collect()
    gc.freeze()
    return data


# -- the dataflows -----------------------------------------------------------------------------

class _CountPartition(StatelessSinkPartition[Any]):
    def __init__(self, box: list[int]):
        self.box = box

    def write_batch(self, items: list[Any]) -> None:
        n = 0
        for _, x in items:  # (bucket, outcome), as stateful_batch emits them
            if type(x) is Joined:
                n += len(x.examples) + len(x.dead)
            elif type(x) is list:
                n += len(x)
            else:
                n += 1
        self.box[0] += n


class CountSink(DynamicSink[Any]):
    """Counts the outcomes that reach it (both sides of every comparison end in one): the join's
    `Joined` batches by their examples and dead letters, a list by its length, an item as one."""

    def __init__(self) -> None:
        self.box = [0]

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _CountPartition:
        return _CountPartition(self.box)


class MinimalJoin(StatefulBatchLogic[BucketBatch, Any, None]):
    """A bare bucket join: pairs features and actions by join key in a dict. No clock, no
    expiry, no store, no counts; unmatched events wait forever."""

    def __init__(self, state: Any):
        self.features: dict[str, Any] = {}
        self.actions: dict[str, Any] = {}

    def on_batch(self, values: list[BucketBatch]) -> tuple[list[Any], bool]:
        out: list[Any] = []
        for b in values:
            pair(b, self.features, self.actions, out)
        return out, False

    def snapshot(self) -> None:
        return None


def pair(b: BucketBatch, features: dict[str, Any], actions: dict[str, Any], out: list[Any]) -> None:
    """The baselines' whole join: pair a batch's events with the other side's by join key."""
    if b.partition.startswith("features"):
        for e in b.events:
            k = f"{e.request_id}\x00{e.item_id}"
            a = actions.pop(k, None)
            if a is None:
                features[k] = e
            else:
                out.append((e, a))
    else:
        for e in b.events:
            k = f"{e.request_id}\x00{e.item_id}"
            f = features.pop(k, None)
            if f is None:
                actions[k] = e
            else:
                out.append((f, e))


class MinimalExamples(MinimalJoin):
    """The bare bucket join, but each pair becomes the training `Example` the joiner would make:
    what copying a cold impression's fields into an example costs, without any join logic."""

    def on_batch(self, values: list[BucketBatch]) -> tuple[list[Any], bool]:
        pairs: list[Any] = []
        for b in values:
            pair(b, self.features, self.actions, pairs)
        return [Example(f.request_id, f.user_id, f.item_id, f.ts, a.ts, 1, [ExampleAction(a.action, a.ts, a.value)],
                        1.0, f.position, f.score, f.model_version, f.sparse, f.dense, a.received_at)
                for f, a in pairs], False


_astuple = msgspec.structs.astuple


def _labelled(x: Example, a: ActionEvent) -> Example:
    x.label = 1
    x.label_ts = a.ts
    x.actions = [ExampleAction(a.action, a.ts, a.value)]
    x.label_received_at = a.received_at
    return x


def _prepared(b: BucketBatch, features: dict[str, Any], actions: dict[str, Any], out: list[Any]) -> None:
    """A batch of feature events made into their examples on arrival (as `flows.joiner` prepares
    them), each labelled at once by an action that came first, else waiting in `features`."""
    for e in b.events:
        k = f"{e.request_id}\x00{e.item_id}"
        t = _astuple(e)
        x = Example(t[0], t[1], t[2], t[3], 0.0, 0, None, 1.0, t[4], t[8], t[7], t[5], t[6], None)
        a = actions.pop(k, None)
        if a is None:
            features[k] = x
        else:
            out.append(_labelled(x, a))


class MinimalPrepared(MinimalJoin):
    """The bare bucket join making the contract's examples as cheaply as the joiner knows how: each
    impression's `Example` made when it comes (its fields read while it is at hand, as
    `flows.joiner` prepares it), and labelled positive by its action, emitted as a list per call.
    Still no clock, no expiry, no dead letters, no duplicates or after-example actions told apart,
    no counts: what the joiner would cost if all that were free (the bound under which its logic must
    fit)."""

    def on_batch(self, values: list[BucketBatch]) -> tuple[list[Any], bool]:
        out: list[Any] = []
        features, actions = self.features, self.actions
        for b in values:
            if b.partition.startswith("features"):
                _prepared(b, features, actions, out)
            else:
                for a in b.events:
                    k = f"{a.request_id}\x00{a.item_id}"
                    x = features.pop(k, None)
                    if x is None:
                        actions[k] = a
                    else:
                        out.append(_labelled(x, a))
        return ([out] if out else []), False


class MinimalBatched(MinimalJoin):
    """The bare bucket join emitting each call's pairs as one list, as the joiner emits its
    examples: what the joiner's logic costs, with Bytewax's cost per item the same on both sides."""

    def on_batch(self, values: list[BucketBatch]) -> tuple[list[Any], bool]:
        out, _ = super().on_batch(values)
        return ([out] if out else []), False


class MinimalSpill(MinimalJoin):
    """`MinimalPrepared` with a bounded memory: when more than `cache_size` impressions wait, the
    oldest beyond `EVICT_TO` of it go to LMDB in one transaction (encoded as the joiner's records
    are, keyed by join key alone), and a label for one of them reads it back and makes its example
    from it; its record is deleted with the next spill's transaction. An impression still unlabelled
    when the slowest partition's progress (less the lateness) passes `ts + window` becomes a negative
    example, read back first if it was spilled (the spilled keys wait in a FIFO by due: inputs come
    in ts order); an ended partition's progress is infinite, so all are decided at the end, as in
    the joiner. The same LMDB settings as a store with recovery off. Still no duplicates,
    after-example, late or orphan actions told apart, no sampling, no held actions spilled, no due
    order on disk, no undo, no counts: the bound under which the joiner's spilling must fit."""

    def __init__(self, root: Path, cache_size: int, state: Any):
        super().__init__(state)
        self.root = root
        self.cache_size = cache_size
        self.keep = int(cache_size * EVICT_TO)
        self.spilled: set[str] = set()
        self.spilled_dues: collections.deque[tuple[float, str]] = collections.deque()
        self.deletes: list[bytes] = []
        self.progress: dict[str, float] = {}
        self.written = 0  # impressions written to LMDB (each at most once: it is read back only to leave)
        self.env: Any = None
        self.db: Any = None

    def _open(self, bucket: str) -> None:
        path = self.root / f"minimal-spill-{bucket}-{id(self)}"
        path.mkdir()
        self.env = lmdb.open(str(path), map_size=1 << 30, subdir=True, max_dbs=1, writemap=False, sync=False,
                             metasync=False, lock=True, readahead=False)
        self.db = self.env.open_db(b"entries")

    def on_batch(self, values: list[BucketBatch]) -> tuple[list[Any], bool]:
        out: list[Any] = []
        features, actions, spilled = self.features, self.actions, self.spilled
        for b in values:
            if b.partition.startswith("features"):
                _prepared(b, features, actions, out)
            else:
                reads: list[tuple[str, Any]] = []
                for a in b.events:
                    k = f"{a.request_id}\x00{a.item_id}"
                    x = features.pop(k, None)
                    if x is not None:
                        out.append(_labelled(x, a))
                    elif k in spilled:
                        reads.append((k, a))
                    else:
                        actions[k] = a
                if reads:
                    got = self._read([k for k, _ in reads])
                    out += [_labelled(x, a) for x, (_, a) in zip(got, reads, strict=True)]
            self.progress[b.partition] = math.inf if b.status == ENDED else b.progress
            if len(self.progress) == 2:
                self._expire(min(self.progress.values()) - LATENESS_S, out)
        if len(features) + len(actions) > self.cache_size:
            self._spill(values[0].bucket)
        return ([out] if out else []), False

    def _read(self, keys: list[str]) -> list[Example]:
        """The prepared examples of spilled `keys`, read back; their records go with the next spill."""
        got = []
        with self.env.begin(db=self.db) as txn:
            get = txn.get
            for k in keys:
                raw = k.encode()
                r = _DECODE_RECORD(get(raw))
                self.spilled.discard(k)
                self.deletes.append(raw)
                got.append(Example(r[2], r[3], r[4], r[5], 0.0, 0, None, 1.0, r[6], r[7], r[8], r[9], r[10], None))
        return got

    def _expire(self, watermark: float, out: list[Any]) -> None:
        """Impressions whose window closed become negatives: those in memory (oldest first, by ts),
        then those spilled, read back."""
        features = self.features
        while features:
            k = next(iter(features))
            if features[k].ts + SPILL_WINDOW > watermark:
                break
            out.append(_negative(features.pop(k)))
        dues = self.spilled_dues
        due_keys = []
        while dues and dues[0][0] <= watermark:
            k = dues.popleft()[1]
            if k in self.spilled:
                due_keys.append(k)
        if due_keys:
            out += map(_negative, self._read(due_keys))

    def _spill(self, bucket: str) -> None:
        if self.env is None:
            self._open(bucket)
        features = self.features
        puts: list[tuple[bytes, bytes]] = []
        for k in list(itertools.islice(features, max(0, len(features) + len(self.actions) - self.keep))):
            t = _astuple(features.pop(k))
            due = t[3] + SPILL_WINDOW
            puts.append((k.encode(), _ENCODE_RECORD((due, None, t[0], t[1], t[2], t[3], t[8], t[9], t[10], t[11], t[12]))))
            self.spilled.add(k)
            self.spilled_dues.append((due, k))
        self.written += len(puts)
        puts.sort()
        self.deletes.sort()
        with self.env.begin(write=True, db=self.db) as txn:
            delete = txn.delete
            for raw in self.deletes:
                delete(raw)
            txn.cursor().putmulti(puts)
        self.deletes = []

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


def _negative(x: Example) -> Example:
    x.label_ts = x.ts + SPILL_WINDOW
    x.actions = []
    return x


_ENCODE_RECORD = msgspec.msgpack.Encoder().encode
_DECODE_RECORD = msgspec.msgpack.Decoder().decode


def dict_join(items: list[tuple[str, BucketBatch]]) -> int:
    """The tight plain-Python loop: the same pairing over the same batches, no Bytewax."""
    features: dict[str, Any] = {}
    actions: dict[str, Any] = {}
    out: list[Any] = []
    for _, b in items:
        pair(b, features, actions, out)
    return len(out)


def _flow(items: list, builder: Callable[[Any], StatefulBatchLogic]) -> tuple[Dataflow, CountSink]:
    flow = Dataflow("bench_join")
    # One poll hands over one routed source batch: an item per bucket, as `route` emits them.
    keyed_in = op.input("in", flow, TestingSource(items, batch_size=BUCKETS))
    joined = op.stateful_batch("join", keyed_in, builder)
    sink = CountSink()
    op.output("out", joined, sink)
    return flow, sink


class Runs:
    """Fresh state (and recovery) directories for every run, under one temp dir removed at the end."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="freshrec-bench-join-"))
        self.n = 0
        self.logics: list[JoinLogic] = []

    def fresh(self, name: str) -> Path:
        self.n += 1
        path = self.root / f"{name}-{self.n}"
        path.mkdir()
        return path

    def joiner(self, items: list, settings: JoinSettings, *, recovery: bool = False,
               logic: type[JoinLogic] = JoinLogic) -> Callable[[], int]:
        """A run of the real join step; returns the number of outcomes (examples, dead letters)."""

        def run() -> int:
            step = JoinStepConfig(PARTITIONS, LATENESS_S, self.fresh("state"), 12, settings, recovery=recovery)
            logics = self.logics = []

            def build(state: Any) -> JoinLogic:
                lg = logic(step, state)
                logics.append(lg)
                return lg

            flow, sink = _flow(items, build)
            if recovery:
                rdir = self.fresh("recovery")
                init_db_dir(rdir, 1)
                run_main(flow, epoch_interval=EPOCH,
                         recovery_config=RecoveryConfig(str(rdir), backup_interval=timedelta(0)))
            else:
                run_main(flow, epoch_interval=EPOCH)
            return sink.box[0]

        return run

    def counts(self) -> JoinCounts:
        """The counts of the last run's buckets, summed."""
        total: Counter = Counter()
        for lg in self.logics:
            if lg.bucket is not None:
                total.update(lg.bucket.counts.as_dict())
        return JoinCounts(**{k: total.get(k, 0) for k in JoinCounts().as_dict()})

    def close(self) -> None:
        self.logics = []
        gc.collect()  # closes the LMDB environments of finished runs
        shutil.rmtree(self.root, ignore_errors=True)


def minimal(items: list, logic: type[MinimalJoin] = MinimalJoin) -> Callable[[], int]:
    def run() -> int:
        flow, sink = _flow(items, logic)
        run_main(flow, epoch_interval=EPOCH)
        return sink.box[0]

    return run


def minimal_spill(items: list, runs: Runs, cache_size: int,
                  logics: list[MinimalSpill] | None = None) -> Callable[[], int]:
    """A run of `MinimalSpill`; `logics` (if given) gets the last run's bucket logics."""

    def run() -> int:
        root = runs.fresh("minimal-spill")
        if logics is not None:
            logics.clear()
        made = logics if logics is not None else []

        def build(state: Any) -> MinimalSpill:
            lg = MinimalSpill(root, cache_size, state)
            made.append(lg)
            return lg

        flow, sink = _flow(items, build)
        try:
            run_main(flow, epoch_interval=EPOCH)
        finally:
            for lg in made:
                lg.close()
        return sink.box[0]

    return run


def medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each fn, run in turn within every repeat so that noise hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _note(msg: str) -> None:
    print(f"  [join] {msg}", file=sys.stderr, flush=True)


# -- in memory --------------------------------------------------------------------------------

def _liked_soon(rng: random.Random) -> float:
    return rng.expovariate(1 / 3.0)  # seconds of event time, mean 3


IN_MEMORY_SETTINGS = JoinSettings(window_s=600.0)  # unlabelled impressions expire during the run


def in_memory_input(n: int) -> tuple[list, int, int]:
    # 100 impressions per second of event time, 85 % liked a few seconds later, 15 % expire.
    return join_input(n, rate=100.0, p_label=0.85, delay=_liked_soon)


@benchmark("join.in_memory", "join.in_memory_vs_dict", "join.in_memory_vs_minimal_examples",
           "join.in_memory_vs_minimal_prepared", "join.in_memory_vs_minimal_batched")
def join_in_memory(quick: bool) -> Iterator[Figure]:
    n = 30_000 if quick else 200_000
    items, events, _ = _frozen(lambda: in_memory_input(n))
    runs = Runs()
    try:
        ours = runs.joiner(items, IN_MEMORY_SETTINGS)
        assert ours() == n, "every impression makes one example"
        c = runs.counts()
        _note(f"in_memory: {events:,} events, {c.positives:,} liked, {c.expired_kept:,} expired, "
              f"{c.spill_writes} spill writes")
        t = medians({"minimal": minimal(items), "dict": lambda: dict_join(items), "ours": ours,
                     "minimal_examples": minimal(items, MinimalExamples),
                     "minimal_prepared": minimal(items, MinimalPrepared),
                     "minimal_batched": minimal(items, MinimalBatched)}, repeats=3 if quick else 5)
    finally:
        runs.close()
        gc.unfreeze()
    rate = events / t["ours"]
    yield compared("join.in_memory", "events/s", rate, "minimal Bytewax bucket join", events / t["minimal"])
    yield compared("join.in_memory_vs_dict", "events/s", rate, "plain dict join loop", events / t["dict"])
    yield compared("join.in_memory_vs_minimal_examples", "events/s", rate,
                   "minimal Bytewax bucket join making Examples", events / t["minimal_examples"])
    yield compared("join.in_memory_vs_minimal_prepared", "events/s", rate,
                   "minimal Bytewax bucket join preparing Examples on arrival", events / t["minimal_prepared"])
    yield compared("join.in_memory_vs_minimal_batched", "events/s", rate,
                   "minimal Bytewax bucket join emitting a list per call", events / t["minimal_batched"])


@benchmark("join.in_memory_recovery")
def join_in_memory_recovery(quick: bool) -> Iterator[Figure]:
    # Full size: long enough that Bytewax closes (and snapshots) several 10 s epochs mid-run.
    n = 30_000 if quick else 1_000_000
    items, events, _ = _frozen(lambda: in_memory_input(n))
    runs = Runs()
    try:
        ours = runs.joiner(items, IN_MEMORY_SETTINGS, recovery=True)
        t = medians({"minimal": minimal(items), "ours": ours}, repeats=3)
    finally:
        runs.close()
        gc.unfreeze()
    epochs = t["ours"] / EPOCH.total_seconds()
    _note(f"in_memory_recovery: {events:,} events, a run takes {t['ours']:.1f} s = {epochs:.1f} epochs of 10 s"
          + ("" if epochs >= 1 else " (shorter than an epoch: only the final snapshot is taken)"))
    yield compared("join.in_memory_recovery", "events/s", events / t["ours"],
                   "minimal Bytewax bucket join, no recovery", events / t["minimal"])


# -- spill ------------------------------------------------------------------------------------

SPILL_RATE, SPILL_P, SPILL_WINDOW = 100.0, 0.9, 600.0
SPILL_DELAY = (60.0, 180.0)  # labels come 6,000 to 18,000 impressions later


def _liked_late(rng: random.Random) -> float:
    return rng.uniform(*SPILL_DELAY)


class _CountingStore:
    """A spill store that remembers which keys were ever written (not deleted) to it."""

    def __init__(self, inner: LmdbSpillStore):
        self.inner = inner
        self.written: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def flush(self, tag: int, writes: dict, **kw: Any) -> None:
        self.written.update(k for k, v in writes.items() if v is not None)
        self.inner.flush(tag, writes, **kw)


class _CountingLogic(JoinLogic):
    def _open(self, key: str) -> JoinBucket:
        bucket = super()._open(key)
        bucket.store = _CountingStore(bucket.store)  # type: ignore[assignment]
        return bucket


def _written_fraction(runs: Runs, items: list, settings: JoinSettings, impressions: int) -> tuple[float, JoinCounts]:
    """One untimed run: the share of the impressions written to LMDB before their label or expiry."""
    assert runs.joiner(items, settings, logic=_CountingLogic)() == impressions, "one example per impression"
    written = sum(len(lg.bucket.store.written) for lg in runs.logics if lg.bucket is not None)
    return written / impressions, runs.counts()


def _largest_spilling_cache(runs: Runs, items: list, impressions: int,
                            start: int) -> tuple[int, float, JoinCounts]:
    """The largest cache size (within 1%) with which the joiner writes at least half of the
    impressions to LMDB before their label or expiry: (cache, its fraction, its counts)."""
    return _largest_cache(lambda cache: _written_fraction(
        runs, items, JoinSettings(window_s=SPILL_WINDOW, cache_size=cache), impressions), impressions, start)


def _largest_cache(written: Callable[[int], tuple[float, Any]], impressions: int,
                   start: int) -> tuple[int, float, Any]:
    """The largest cache size (within 1%) that writes at least half of the impressions to LMDB
    (`written(cache)`: the share written, and what else the run tells). The share falls steeply as
    the cache nears the count waiting (here, from 58% to 0% over a tenth of it), so stepping by
    tenths alone measured a case with more writes than the target's. Down by tenths from `start`
    to one that does it, up by tenths to one that does not, then halving between the two."""
    tried: dict[int, tuple[float, Any]] = {}

    def does(cache: int) -> bool:
        tried[cache] = written(cache)
        return tried[cache][0] >= 0.5

    lo, hi = start, None  # lo: the largest known to do it; hi: the smallest known not to
    while not does(lo):
        if lo <= 10:
            raise RuntimeError(f"join.spill: even a cache of {lo} writes only {tried[lo][0]:.0%} of the "
                               f"impressions to LMDB, not the target's half")
        hi, lo = lo, max(10, int(lo * 0.9))
    while hi is None:
        up = int(lo * 1.1) + 1
        if up < impressions and does(up):  # a cache that holds every impression writes none
            lo = up
        else:
            hi = up
    while hi - lo > max(1, lo // 100):
        mid = (lo + hi) // 2
        if does(mid):
            lo = mid
        else:
            hi = mid
    return lo, *tried[lo]


@benchmark("join.spill", "join.spill_fraction", "join.spill_writes_per_impression", "join.spill_all",
           "join.spill_all_fraction", "join.spill_vs_minimal_spill", "join.spill_floor")
def join_spill(quick: bool) -> Iterator[Figure]:
    n = 30_000 if quick else 200_000
    items, events, impressions = _frozen(
        lambda: join_input(n, rate=SPILL_RATE, p_label=SPILL_P, delay=_liked_late))
    # Impressions waiting at a time, per bucket: labelled ones for their delay, the rest for the window.
    waiting = SPILL_RATE * (SPILL_P * sum(SPILL_DELAY) / 2 + (1 - SPILL_P) * SPILL_WINDOW) / BUCKETS
    in_memory = JoinSettings(window_s=SPILL_WINDOW)
    runs = Runs()
    try:
        # The target's case: at least half of the impressions written to LMDB before their label or
        # expiry, with the largest cache that does it, found by untimed runs over the same input (so
        # the same cache every run).
        cache, fraction, c = _largest_spilling_cache(runs, items, impressions, int(waiting))
        spilling = JoinSettings(window_s=SPILL_WINDOW, cache_size=cache)
        # And nearly all of them: a cache of a twentieth of the impressions waiting.
        everything = JoinSettings(window_s=SPILL_WINDOW, cache_size=max(10, int(waiting / 20)))
        fraction_all, c_all = _written_fraction(runs, items, everything, impressions)
        # The bare spilling join (`MinimalSpill`) at its own cache that writes half of the impressions.
        logics: list[MinimalSpill] = []

        def minimal_written(size: int) -> tuple[float, None]:
            assert minimal_spill(items, runs, size, logics)() == impressions, "one example per impression"
            return sum(lg.written for lg in logics) / impressions, None

        minimal_cache, minimal_fraction, _ = _largest_cache(minimal_written, impressions, int(waiting))
        _note(f"spill: {events:,} events, about {waiting:,.0f} impressions waiting per bucket; cache_size {cache}: "
              f"{fraction:.0%} of {c.impressions:,} impressions written to LMDB, {c.spill_writes:,} spill writes, "
              f"{c.spill_reads:,} reads, {c.flushes:,} flushes; cache_size {everything.cache_size}: "
              f"{fraction_all:.0%} written, {c_all.spill_writes:,} spill writes; the minimal spilling join: "
              f"cache {minimal_cache}, {minimal_fraction:.0%} written")
        t = medians({"in_memory": runs.joiner(items, in_memory), "spill": runs.joiner(items, spilling),
                     "spill_all": runs.joiner(items, everything),
                     "minimal_spill": minimal_spill(items, runs, minimal_cache)}, repeats=3)
    finally:
        runs.close()
        gc.unfreeze()
    yield compared("join.spill", "events/s", events / t["spill"], "join.in_memory, same input",
                   events / t["in_memory"])
    yield Figure("join.spill_fraction", fraction, "of impr.")
    yield Figure("join.spill_writes_per_impression", c.spill_writes / impressions, "writes/impr.")
    yield compared("join.spill_all", "events/s", events / t["spill_all"], "join.in_memory, same input",
                   events / t["in_memory"])
    yield Figure("join.spill_all_fraction", fraction_all, "of impr.")
    yield compared("join.spill_vs_minimal_spill", "events/s", events / t["spill"],
                   "minimal spilling join, half written", events / t["minimal_spill"])
    # The target's floor: what a join with nothing but pairing, expiry and spilling reaches (a
    # join.spill above it would be faster than the bare join it adds its logic to).
    yield compared("join.spill_floor", "events/s", events / t["minimal_spill"],
                   "join.in_memory, same input", events / t["in_memory"])


# -- memory -----------------------------------------------------------------------------------

def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def memory_child(n: int, directory: Path, progress: bool = False) -> dict:
    """Feed `n` impressions, none labelled, to 8 JoinBuckets as JoinLogic would; measure memory."""
    settings = JoinSettings()  # the default cache bound per bucket
    start = rss_anon()
    buckets = [JoinBucket(settings, LmdbSpillStore(directory / f"b{b:04d}", undo_keep=12))
               for b in range(BUCKETS)]
    seqs = [0] * BUCKETS
    rng = random.Random(3)
    per_round = 8000  # about a 1 MiB source batch of feature events, routed
    epoch_rounds = 25  # an epoch's flush every 200k impressions
    span = settings.window_s * 0.9  # every impression is still waiting at the end
    watermark = T0 - LATENESS_S
    t0 = time.perf_counter()
    for r, lo in enumerate(range(0, n, per_round)):
        parts: list[list[FeatureEvent]] = [[] for _ in range(BUCKETS)]
        for i in range(lo, min(n, lo + per_round)):
            f = make_feature(rng, i, T0 + span * i / n)
            parts[bucket_of(f.request_id, f.item_id, BUCKETS)].append(f)
            watermark = f.ts - LATENESS_S
        for b, bucket in enumerate(buckets):
            bucket.on_features(parts[b])
            bucket.advance(watermark)
            if bucket.over_capacity():
                bucket.spill(seqs[b] + 1, int(settings.cache_size * EVICT_TO))
            if r % epoch_rounds == epoch_rounds - 1:
                seqs[b] += 1
                bucket.flush(seqs[b])
        del parts
        if progress and r % 125 == 124:
            print(f"  [join] memory: {lo + per_round:,} of {n:,} impressions, {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    gc.collect()
    waiting = [b.waiting() for b in buckets]
    counts = sum(b.counts.impressions for b in buckets)
    return {"impressions": counts, "rss_anon": rss_anon(), "rss_anon_at_start": start,
            "memory_waiting": sum(m for m, _ in waiting), "disk_waiting": sum(d for _, d in waiting),
            "disk_bytes": sum(b.store.disk_bytes() for b in buckets), "seconds": time.perf_counter() - t0}


@benchmark("join.memory_10m", "join.disk_bytes_per_impression")
def join_memory(quick: bool) -> Iterator[Figure]:
    n = 1_000_000 if quick else 10_000_000
    root = Path(tempfile.mkdtemp(prefix="freshrec-bench-mem-"))
    try:
        done = subprocess.run([sys.executable, "-m", "bench.join", "memory", str(n), str(root)]
                              + ([] if quick else ["--progress"]),
                              check=True, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    size = "1M impressions (--quick size)" if quick else "10M impressions"
    _note(f"memory: {size}: {got['memory_waiting']:,} waiting in memory, {got['disk_waiting']:,} in LMDB, "
          f"RssAnon {got['rss_anon'] / 2**20:,.0f} MiB ({got['rss_anon_at_start'] / 2**20:,.0f} MiB before "
          f"the buckets), {got['disk_bytes'] / 2**20:,.0f} MiB on disk, {got['seconds']:.0f} s")
    yield Figure("join.memory_10m", float(got["rss_anon"]), "bytes, 1M" if quick else "bytes")
    yield Figure("join.disk_bytes_per_impression", got["disk_bytes"] / got["impressions"], "bytes")


# -- the whole flow on files ------------------------------------------------------------------

def write_inputs(data_dir: Path, impressions: int, actions: int) -> int:
    """Feature events, and likes for the first share of them, as JSON Lines; returns lines written."""
    events = join_events(impressions, rate=100.0, p_label=actions / impressions, delay=_liked_soon)
    for stream, s in (("features", 0), ("actions", 1)):
        path = data_dir / stream
        path.mkdir(parents=True)
        objs = [e for _, kind, e in events if kind == s]
        for e in objs:
            e.received_at = None  # the flow stamps arrival itself
        with open(path / f"{stream}.jsonl", "wb") as f:
            for lo in range(0, len(objs), 10_000):
                f.write(encode_lines(objs[lo:lo + 10_000]))
    return len(events)


def _lines(directory: Path) -> int:
    total = 0
    for p in directory.glob("*.jsonl"):
        with open(p, "rb") as f:
            total += sum(chunk.count(b"\n") for chunk in iter(lambda f=f: f.read(1 << 20), b""))
    return total


@benchmark("join.flow_files")
def join_flow_files(quick: bool) -> Iterator[Figure]:
    impressions = 30_000 if quick else 300_000
    root = Path(tempfile.mkdtemp(prefix="freshrec-bench-flow-"))
    try:
        inputs = root / "inputs"
        events = write_inputs(inputs, impressions, impressions // 2)
        files = sorted(inputs.glob("*/*.jsonl"))
        made: list[int] = []
        runs = [0]

        def ours() -> None:
            runs[0] += 1
            run = root / f"run-{runs[0]}"
            (run / "data").mkdir(parents=True)
            for stream in ("features", "actions"):
                (run / "data" / stream).symlink_to(inputs / stream)
            # The figure ends at the examples stream: no trainer step (an override of a setting the
            # Config does not have is ignored).
            config = Config.from_env({}, data_dir=str(run / "data"), state_dir=str(run / "state"), train="0")
            flow = build_flow(config, recovery=False)
            with frozen_heap(thresholds=FLOW_THRESHOLDS):  # as `flows.pipeline.main_flow` keeps a flow process's heap
                run_main(flow, epoch_interval=EPOCH)
            made.append(_lines(config.stream_dir("examples")))

        def floor() -> None:
            loads = json.loads
            for p in files:
                with open(p, "rb") as f:
                    for line in f:
                        loads(line)

        t = medians({"json.loads": floor, "flow": ours}, repeats=3)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if any(m != impressions for m in made):
        _note(f"flow_files: examples per run {made}, expected {impressions:,} each")
    yield compared("join.flow_files", "events/s", events / t["flow"], "read + json.loads per line",
                   events / t["json.loads"])


def _main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "memory":
        got = memory_child(int(argv[1]), Path(argv[2]), progress="--progress" in argv)
        print(json.dumps(got))
        return 0
    print("usage: python -m bench.join memory N DIR [--progress]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
