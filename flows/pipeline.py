"""The streaming job: `python -m bytewax.run flows.pipeline:flow`.

Reads the three input streams and validates them (dead letters to their stream), routes feature
and action events to join buckets with the clock's markers in band, and joins them in each bucket
into training examples (to the examples stream, and on to the steps after the join). Every source
batch also leaves one catalog delta for the writer step, which keeps the catalog and users' recent
actions in the serving store (and trains, unless FRESHREC_TRAIN=0).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Optional

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import Sink

from flows.catalog import catalog_delta
from flows.clock import BucketBatch, BucketClock, SourceBatch, join_key, route
from flows.config import LMDB_CAP, Config, ConfigError, ensure_state_dir
from flows.events import DeadLetter, Example, Joined
from flows.heap import FreezeAfterSlowCollections, flow_heap
from flows.joiner import JoinBucket, JoinSettings, in_key_sample, positive_rule
from flows.kafka_client import check_broker
from flows.metrics import (
    DEAD_LETTERS,
    EVENTS_BEHIND,
    EVENTS_READ,
    WAITING,
    WATERMARK_LAG,
    Children,
    JoinPublisher,
    reason_class,
)
from flows.observe import serve_metrics, worker_label
from flows.sinks import make_sink
from flows.sources import Alignment, make_source, partition_names
from flows.spill import LmdbSpillStore
from flows.trainer_step import TrainerLogic, TrainStepConfig

log = logging.getLogger("freshrec.flow")

JOIN_STREAMS = ("features", "actions")
FREE_RUN_TICK_S = 1.0  # how often a bucket wakes itself while its watermark follows the wall clock
EVICT_TO = 0.8  # after a flush under memory pressure, keep this fraction of the cache
FLOW_HEAP = FreezeAfterSlowCollections()  # one per process: `main_flow` installs it
PUBLISH_EVERY_S = 0.2  # a bucket publishes its counts at most this often, and at every snapshot


@dataclass(frozen=True)
class JoinStepConfig:
    """What a bucket needs to build itself: picklable, closed over by the step's builder."""

    partitions: tuple[str, ...]
    lateness_s: float
    state_dir: Path
    undo_keep: int
    settings: JoinSettings
    forward_impressions: bool = False
    score_sample: float = 1.0  # the key sample scored on arrival (`validation_rate`)
    lmdb_max_bytes: Optional[int] = None
    # False only where recovery is known to be off (`bytewax.run` without a recovery directory):
    # no resume will read LMDB, so a snapshot writes nothing there (pressure flushes still do) and
    # the store syncs nothing to disk.
    recovery: bool = True


class JoinLogic(StatefulBatchLogic[BucketBatch, Any, dict]):
    """One join bucket in the dataflow: its clock, its `JoinBucket`, its LMDB store.

    Bytewax's snapshot of a bucket is a manifest (`seq`, the clock); each `snapshot()` flushes the
    bucket's changes to LMDB tagged `seq`, and a resume rolls LMDB back to the manifest's `seq`.
    Bytewax takes snapshots with recovery off too: then (`recovery` False) only the counts are
    published, as a fresh start clears LMDB anyway (measured on the files flow with training: 14%
    more events/s), and the store's flushes skip fsync (`join.spill` 0.10x -> 0.18x).
    """

    def __init__(self, cfg: JoinStepConfig, state: Optional[dict]):
        self.cfg = cfg
        self.state = state
        self.bucket_key: Optional[str] = None
        self.bucket: Optional[JoinBucket] = None
        self.clock = BucketClock.resume(cfg.partitions, cfg.lateness_s, (state or {}).get("clock"))
        self.seq = (state or {}).get("seq", 0)
        self.publisher = JoinPublisher(worker_label())
        self.published_at = 0.0
        self.unpublished = False

    def _open(self, key: str) -> JoinBucket:
        # Bytewax tells a builder no key: the bucket opens its store when its first batch comes.
        self.bucket_key = key
        path = self.cfg.state_dir / "join" / key
        if not self.cfg.recovery:
            # Nothing of an earlier run is kept (as `resume(0)` clears it), and a store that synced
            # nothing may have been torn by a system crash: it goes unread.
            shutil.rmtree(path, ignore_errors=True)
        store = LmdbSpillStore(path, undo_keep=self.cfg.undo_keep, max_map_size=self.cfg.lmdb_max_bytes,
                               cap_name=LMDB_CAP, durable=self.cfg.recovery)
        bucket = JoinBucket(self.cfg.settings, store)
        bucket.resume(self.seq)  # 0: a fresh start, so nothing of an earlier run is kept
        bucket.advance(self.clock.watermark)
        return bucket

    def on_batch(self, values: list[BucketBatch]) -> tuple[list[Any], bool]:
        bucket = self.bucket or self._open(values[0].bucket)
        self.bucket = bucket
        now = time.time()
        out: list[Example] = []
        dead: list[DeadLetter] = []
        unscored: list[Any] = []
        for b in values:
            if b.events:
                # The bucket's watermark is the clock's (advanced after every batch): it counts the
                # events behind it in its own loop, so this step touches no event.
                if b.partition.startswith("features"):
                    out += bucket.on_features(b.events, b.keys, b.partition)
                    if self.cfg.forward_impressions:
                        unscored += _to_score(b, min(self.cfg.score_sample, self.cfg.settings.neg_sample_rate))
                else:
                    out += bucket.on_actions(b.events, b.keys, b.partition)
            self.clock.observe(b.partition, b.progress, b.status, now)
            expired, orphans = bucket.advance(self.clock.watermark)
            out += expired
            dead += orphans
        if bucket.over_capacity():
            bucket.spill(self.seq + 1, int(self.cfg.settings.cache_size * EVICT_TO))  # the snapshot's flush makes it durable
        if bucket.behind:
            self.publisher.child(EVENTS_BEHIND, self.publisher.worker).inc(bucket.behind)
            bucket.behind = 0
        if now - self.published_at >= PUBLISH_EVERY_S:  # a few hundred batches a second: not each
            self._publish(now)
        else:
            self.unpublished = True  # notify_at brings the step back to publish them
        return _joined(out, dead, unscored), False

    def _publish(self, now: float) -> None:
        self.publisher.publish(self.bucket.counts)  # type: ignore[union-attr]
        self.published_at = now
        self.unpublished = False

    def on_eof(self) -> tuple[list[Any], bool]:
        # Counts are published at most every PUBLISH_EVERY_S: the last batches' go out here.
        if self.bucket is not None:
            self._publish(time.time())
        return [], False

    def on_notify(self) -> tuple[list[Any], bool]:
        if self.bucket is None:
            return [], False
        now = time.time()
        examples, dead = self.bucket.advance(self.clock.advance(now))
        if self.unpublished and now - self.published_at >= PUBLISH_EVERY_S:
            self._publish(now)
        return _joined(examples, dead, []), False

    def notify_at(self) -> Optional[datetime]:
        due = []
        if self.clock.free_running():
            due.append(datetime.now(UTC) + timedelta(seconds=FREE_RUN_TICK_S))
        if self.unpublished:  # counts of the last batches, held back by PUBLISH_EVERY_S
            due.append(datetime.fromtimestamp(self.published_at + PUBLISH_EVERY_S, UTC))
        return min(due) if due else None

    def snapshot(self) -> dict:
        if self.bucket is not None:
            self.seq += 1
            if self.cfg.recovery:
                self.bucket.flush(self.seq)
            self._publish(time.time())
            memory, disk = self.bucket.waiting()
            w, child = self.publisher.worker, self.publisher.child
            child(WAITING, w, self.bucket_key, "memory").set(memory)
            child(WAITING, w, self.bucket_key, "disk").set(disk)
            lag = max(0.0, time.time() - self.clock.watermark) if self.clock.watermark > 0 else 0.0
            child(WATERMARK_LAG, w, self.bucket_key).set(lag)
        return {"seq": self.seq, "clock": self.clock.state()}


def _to_score(b: BucketBatch, rate: float) -> list:
    """The impressions of `b` the trainer scores on arrival, for progressive validation: those
    without a logged score in the key sample at `rate` (`validation_rate`; all keys at 1). Beyond
    the negative sample rate an expiry makes no example, so scoring them all was mostly wasted: a
    fifth of the loop flow's time at 5,000 actions/s with a rate of 0.2 (`serve.freshness`)."""
    if rate >= 1.0:
        return [e for e in b.events if e.score is None]
    keys = b.keys if b.keys is not None else [join_key(e.request_id, e.item_id) for e in b.events]
    return [e for e, k in zip(b.events, keys, strict=True) if e.score is None and in_key_sample(k, rate)]


def _joined(examples: list, dead: list, impressions: list) -> list[Joined]:
    """A call's outcomes as the step's one output item (none when there are none)."""
    return [Joined(examples, dead, impressions)] if examples or dead or impressions else []


class DeadLetterStep:
    """Every source batch passes here once: its events are counted by stream, its dead letters by
    stream and kind of reason (one `inc` per kind in the batch), and the dead letters go on."""

    def __init__(self) -> None:
        self.child = Children()

    def __call__(self, batch: SourceBatch) -> list:
        if batch.events:
            self.child(EVENTS_READ, batch.stream).inc(len(batch.events))
        if batch.dead:
            for reason, n in Counter(reason_class(d.reason) for d in batch.dead).items():
                self.child(DEAD_LETTERS, batch.stream, reason).inc(n)
        return batch.dead


def _examples(x: Joined) -> Optional[list[Example]]:
    return x.examples or None


def _dead(x: Joined) -> list[DeadLetter]:
    return x.dead


def _each_example(x: Joined) -> list[Example]:
    return x.examples


def _request_id(x: Example) -> str:
    return x.request_id


def _trainer_key(_example: Any) -> str:
    return "trainer"  # one model and one serving store writer: everything goes to one step


def _quiet(_step_id: str, _item: Any) -> None:
    pass


def validation_rate(config: Config) -> float:
    """The key sample progressive validation takes where no score was logged: a sample of the keys
    an expiry keeps (`in_key_sample` nests: a key under a lower rate is under every higher one), so
    it never waits on an example that will not come, and it is independent of the label."""
    return min(config.validation_sample, config.neg_sample_rate)


def train_step_config(config: Config) -> TrainStepConfig:
    return TrainStepConfig(
        state_dir=config.state_dir, batch_size=config.train_batch, max_wait_s=config.train_max_wait_ms / 1000.0,
        user_slots=config.user_slots, item_slots=config.item_slots, dense=config.dense_features,
        dim=config.embedding_dim, sync_interval_s=config.sync_interval_ms / 1000.0,
        dense_interval_s=config.dense_sync_s, item_sync_interval_s=config.item_sync_interval_ms / 1000.0,
        deltas_brokers=config.brokers if config.source == "kafka" else None,
        deltas_topic=config.topic("param-deltas"), kafka_settings=tuple(config.kafka_settings().items()),
        train=config.train, trained_keys_log=config.trained_keys_log, user_recent=config.user_recent,
        validation_sample=validation_rate(config),
        undo_keep=config.undo_keep,
        recovery_dir=recovery_run_name(bytewax_recovery_dir()), lmdb_max_bytes=config.lmdb_max_bytes)


def bytewax_recovery_dir(argv: Optional[list[str]] = None, env: Optional[dict] = None) -> Optional[str]:
    """The recovery directory `python -m bytewax.run` was given (-r, --recovery-directory or
    BYTEWAX_RECOVERY_DIRECTORY), resolved; None when recovery is off or this is not bytewax.run."""
    argv = sys.argv if argv is None else argv
    env = os.environ if env is None else env
    if not _bytewax_run(argv):
        return None
    found = env.get("BYTEWAX_RECOVERY_DIRECTORY")
    for i, a in enumerate(argv):
        if a in ("-r", "--recovery-directory") and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith("--recovery-directory="):
            found = a.split("=", 1)[1]
    return str(Path(found).resolve()) if found else None


def recovery_off(argv: Optional[list[str]] = None, env: Optional[dict] = None) -> bool:
    """Whether this is `python -m bytewax.run` with no recovery directory: recovery known to be
    off. False elsewhere (`run_main`, say, whose recovery config a flow cannot see)."""
    argv = sys.argv if argv is None else argv
    return _bytewax_run(argv) and bytewax_recovery_dir(argv, env) is None


def _bytewax_run(argv: list[str]) -> bool:
    """Whether `argv` is that of `python -m bytewax.run`."""
    return bool(argv) and argv[0].replace("\\", "/").endswith("bytewax/run.py")


def recovery_run_name(recovery_dir: Optional[str]) -> Optional[str]:
    """The name of the run a recovery directory holds: its path and when `bytewax.recovery` made
    it (the earliest `created_at` of its partitions' `parts` table), so a directory made again at
    the same path is another run. The path alone when that cannot be read."""
    if recovery_dir is None:
        return None
    made = None
    for part in sorted(Path(recovery_dir).glob("part-*.sqlite3"))[:1]:
        try:
            con = sqlite3.connect(f"{part.resolve().as_uri()}?mode=ro", uri=True)
            try:
                made = con.execute("SELECT min(created_at) FROM parts").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error as e:
            log.warning("recovery partition %s: %s; the run is named by its path alone", part, e)
    return f"{recovery_dir}@{made}" if made else recovery_dir


def join_settings(config: Config) -> JoinSettings:
    return JoinSettings(window_s=config.join_window_s, orphan_hold_s=config.orphan_hold_s,
                        neg_sample_rate=config.neg_sample_rate, watch_positive_s=config.watch_positive_s,
                        cache_size=config.join_cache)


def build_flow(config: Config, *, tap: Sink | None = None,
               sources: dict[str, Any] | None = None, recovery: bool | None = None) -> Dataflow:
    """The dataflow for `config`; `tap` also receives every example (tests, tools). `recovery`:
    whether the flow will run with Bytewax's recovery; None (unknown) is taken as on, except
    under `bytewax.run` without a recovery directory (`recovery_off`)."""
    ensure_state_dir(config)
    if config.source == "kafka":
        # Refused credentials stop the start here, naming the setting; Bytewax's partition listing
        # would wait for ever.
        check_broker(config.brokers, config.kafka_settings())
    flow = Dataflow("freshrec")
    # The join's streams read in step by event time (see `Alignment`); the items stream is not the join's.
    align = Alignment(config.source_max_lead_s)
    made = {s: (sources or {}).get(s) or make_source(s, config, align if s in JOIN_STREAMS else None)
            for s in ("features", "actions", "items")}
    batches = {s: op.input(f"in_{s}", flow, src) for s, src in made.items()}

    everything = op.merge("all_batches", *batches.values())
    dead_in = op.flat_map("dead_letters", everything, DeadLetterStep())

    partitions = tuple(p for s in JOIN_STREAMS for p in partition_names(s, config, made[s]))
    join_in = op.merge("join_in", *(batches[s] for s in JOIN_STREAMS))
    keyed = op.flat_map("route", join_in, partial(route, buckets=config.buckets))
    recovering = not recovery_off() if recovery is None else recovery
    step = JoinStepConfig(partitions, config.lateness_s, config.state_dir, config.undo_keep,
                          join_settings(config), forward_impressions=config.train,
                          score_sample=validation_rate(config),
                          lmdb_max_bytes=config.lmdb_max_bytes,
                          recovery=recovering)
    # One item per call of a bucket (`Joined`), not one per example: the sinks and the trainer
    # take an example list as a batch.
    joined = op.stateful_batch("join", keyed, lambda state: JoinLogic(step, state))
    outcomes: Stream[Joined] = op.map("outcome", joined, lambda kv: kv[1])
    op.output("out_examples", op.filter_map("examples", outcomes, _examples),
              make_sink("examples", config, key_of=_request_id, durable=recovering))
    dead = op.merge("all_dead", dead_in, op.flat_map("join_dead", outcomes, _dead))
    op.output("out_dead_letter", dead, make_sink("dead-letter", config, durable=recovering))
    if tap is not None:
        op.output("tap", op.flat_map("each_example", outcomes, _each_example), tap)
    # One catalog delta per source batch, made before the key exchange: the writer step merges
    # them, never one Bytewax item per event.
    deltas = op.flat_map("catalog_delta", everything,
                         partial(catalog_delta, is_positive=positive_rule(config.watch_positive_s)))
    to_writer = op.merge("train_in", deltas, outcomes) if config.train else deltas
    tcfg = train_step_config(config)
    # The step keeps its id "train" with or without training, so a recovery store stays valid.
    reports = op.stateful_batch("train", op.key_on("to_trainer", to_writer, _trainer_key),
                                lambda state: TrainerLogic(tcfg, state))
    op.inspect("trained", reports, _quiet)
    return flow


def main_flow() -> Dataflow:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = Config.from_env()
        if config.train:
            # TensorFlow is imported here, in the main thread, before Bytewax starts its workers:
            # imported lazily by the trainer's worker while another worker ran, it crashed the
            # process now and then (SIGSEGV, or "take_gil: PyMUTEX_LOCK failed") with -w 2.
            import model.graph  # noqa: F401
        flow = build_flow(config)
        serve_metrics(config.metrics_port, flow, config.metrics_host)  # one port per process: bytewax.run imports this in each
        # The join's waiting impressions, the catalog and TensorFlow's own objects are millions of
        # long-lived objects, which every full collection walked with the GIL held (measured on
        # the files flow with training: 250-870 ms each, 13% of the run): frozen at start-up, and
        # after each slow full collection, as the model server does (flows.heap says the price);
        # and collections come less often (`FLOW_THRESHOLDS`).
        flow_heap(FLOW_HEAP)
        return flow
    except ConfigError as e:
        raise SystemExit(f"freshrec: configuration error: {e}") from None


def __getattr__(name: str) -> Any:
    # `flow` is built when bytewax.run asks for it, so importing this module reads no settings.
    if name == "flow":
        return main_flow()
    raise AttributeError(name)


