"""The writer step of the dataflow: the one owner of the serving store's writer. It merges the
catalog's deltas and, when the flow trains, runs the online trainer: mini-batches of fresh examples
through the train step, gradients to the training tables; changed rows and catalog entries go to
the serving store together within the sync interval.

All examples and catalog deltas go to this one step (one key), so with `-w 2` the joiner's buckets
keep running on the other worker while a step trains (TensorFlow releases the GIL inside its ops).
A step's graph runs on a thread of its own, so the rest of the flow goes on meanwhile even with
one worker; its rows are pushed when the step is next called after it finished, or sooner where
the step has to wait for it (a backlog past BACKLOG_BATCHES, UNSCORED_MAX impressions to score, a
snapshot, the end).
Its Bytewax snapshot is a manifest: the tag of the table checkpoint written at that snapshot, and
the run the catalog's count history belongs to. With FRESHREC_TRAIN=0 it imports no TensorFlow and
keeps no training tables: it writes the catalog only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from bytewax.operators import StatefulBatchLogic
from prometheus_client import Counter, Gauge

from flows.catalog import Catalog, CatalogDelta
from flows.clock import join_key
from flows.config import LMDB_CAP
from flows.events import Example, Joined
from flows.joiner import in_key_sample
from flows.metrics import CatalogPublisher
from flows.observe import worker_label

if TYPE_CHECKING:
    from model.trainer import PendingStep

log = logging.getLogger("freshrec.trainer")
RUN_START = "run-start.json"  # under state/trainer: the checkpoint a recovery run's tables began at

TRAIN_EXAMPLES = Counter("freshrec_train_examples", "examples trained", ["worker"])
TRAIN_STEPS = Counter("freshrec_train_steps", "train steps", ["worker"])
PV_SCORES = Counter("freshrec_train_pv_scores", "progressive-validation scores by where they came from: "
                    "logged by the model server, taken when the impression arrived, or at training; "
                    "left_out: examples outside the validated join-key sample (no logged score)",
                    ["worker", "source"])
TRAIN_LOSS = Gauge("freshrec_train_loss", "training loss of the last step", ["worker"])
TRAIN_AUC = Gauge("freshrec_train_auc", "progressive-validation AUC over the sliding window", ["worker"])
TRAIN_LOGLOSS = Gauge("freshrec_train_logloss", "progressive-validation log loss over the sliding window",
                      ["worker"])
# The window's AUC and log loss sort and sum the whole window (10,000 pairs by default): once per
# this many seconds, not per step (a step of 256 examples spent about 5 % of its time on them).
VALIDATION_EVERY_S = 1.0
# The longest one call of the step spends starting steps before it lets the flow go on (it starts
# another only once the last has finished, so without a wait that is rare; with a backlog past
# BACKLOG_BATCHES it waits for each; a snapshot or the end train everything, however long).
# Examples labelled by an action train before expired negatives: rows' fresh updates (the
# contract's freshness) do not wait behind a burst of expiries. In the loop flow at 2,500
# actions/s, one call trained such a burst for 1.8-2.1 s.
TRAIN_SLICE_S = 0.1
# Batches waiting, at most, while a step is in flight, before the step waits for its steps (as it
# did before their graph had a thread of its own): training that cannot keep up holds up the flow
# rather than let the examples pile up.
BACKLOG_BATCHES = 8
UNSCORED_MAX = 8192  # impressions waiting for their score on arrival, at most, before they are scored anyway
PENDING_POLL_S = 0.005  # how soon an idle step looks again at a train step still running


def item_tower_slots(user_slots: tuple[str, ...], item_slots: tuple[str, ...]) -> tuple[str, ...]:
    """The tables of the item tower (its id, its slots, the item's bias): what
    `FRESHREC_ITEM_SYNC_INTERVAL_MS` times. A slot of both towers is the user's."""
    from model.features import BIAS_SLOTS, FeatureSpec

    spec = FeatureSpec(user_slots=user_slots, item_slots=item_slots)
    item_bias = [s for s in BIAS_SLOTS if s.startswith("item_id")]
    return tuple(s for s in (*spec.item_side, *item_bias) if s not in spec.user_side)


@dataclass(frozen=True)
class TrainStepConfig:
    state_dir: Path
    batch_size: int
    max_wait_s: float
    user_slots: tuple[str, ...]
    item_slots: tuple[str, ...]
    dense: tuple[str, ...]
    dim: int
    sync_interval_s: float
    dense_interval_s: float
    # The item tower's rows (item id, item slots, the item's bias) go at most this often; None: at
    # every sync, as the user tower's.
    item_sync_interval_s: Optional[float] = None
    window: int = 10_000
    max_arrival_scores: int = 1_000_000
    # On Kafka, every write to the serving store also goes to `param-deltas`, for replicas.
    deltas_brokers: Optional[str] = None
    deltas_topic: str = "param-deltas"
    kafka_settings: tuple[tuple[str, str], ...] = ()
    train: bool = True  # False: no trainer, no tables; the step writes the catalog only
    trained_keys_log: bool = False  # FRESHREC_TRAINED_KEYS_LOG: list the join keys each checkpoint covers
    user_recent: int = 50  # actions kept per user in the catalog
    undo_keep: int = 12  # snapshots back a resume can set the catalog's counts to
    # Bytewax's recovery directory (resolved, with when it was made) when recovery is on: it names
    # the run, so a restart killed before its first snapshot still counts as a resume of the same
    # run (at snapshot 0).
    recovery_dir: Optional[str] = None
    lmdb_max_bytes: Optional[int] = None  # FRESHREC_LMDB_MAX_BYTES: the cap of the serving store and checkpoints
    # Progressive validation takes the examples with a logged score, and the others only in the
    # join-key sample at this rate (`flows.pipeline.validation_rate`, at most the negative sample
    # rate: the joiner forwards only their impressions to be scored on arrival). 1: all.
    validation_sample: float = 1.0


@dataclass
class StepReport:
    examples: int
    loss: float
    auc: float


class TrainedKeysLog:
    """Which join keys each checkpoint's training covered, so a resume can show each example was
    trained once: lines of `tag<TAB>request_id<TAB>item_id`; a resume cuts the lines after its tag."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")

    def cut_after(self, tag: int) -> None:
        self._file.close()
        keep = []
        if self.path.exists():
            for line in self.path.read_bytes().splitlines(keepends=True):
                head = line.split(b"\t", 1)[0]
                if line.endswith(b"\n") and head.isdigit() and int(head) <= tag:
                    keep.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(keep))
        tmp.replace(self.path)
        self._file = open(self.path, "ab")

    def write(self, tag: int, examples: list[Example]) -> None:
        prefix = f"{tag}\t"
        self._file.write("".join(f"{prefix}{e.request_id}\t{e.item_id}\n" for e in examples).encode())

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TrainerLogic(StatefulBatchLogic[Any, StepReport, dict]):
    """The writer step: catalog deltas into the `Catalog`; examples (when it trains: the join's
    `Joined` batches, or examples one by one) into mini-batches by size or by the longest wait,
    whichever comes first."""

    def __init__(self, cfg: TrainStepConfig, state: Optional[dict]):
        self.cfg = cfg
        self.resumed = state is not None
        self.seq = (state or {}).get("seq", 0)
        # This process is one attempt of the run; the catalog tells committed history from an
        # abandoned attempt's changes by the attempts the snapshots resumed from (flows.catalog).
        self.attempt = uuid.uuid4().hex
        self.lineage: dict[str, int] = dict((state or {}).get("lineage") or {})
        if state and state.get("attempt"):
            self.lineage[state["attempt"]] = self.seq
        # The catalog's count history is kept per run: a resume sets back only this run's counts.
        self.run = (state or {}).get("run") or (f"recovery:{cfg.recovery_dir}" if cfg.recovery_dir
                                                 else uuid.uuid4().hex)
        self.catalog: Optional[Catalog] = None
        self.catalog_metrics = CatalogPublisher(worker_label())
        self.buffer: list[Example] = []  # labelled by an action, in arrival order: trained first
        self.expired: list[Example] = []  # the rest (expired negatives), in arrival order
        self.first_at: Optional[float] = None
        self.last_dense = 0.0
        self.worker = worker_label()
        # Scores of impressions taken when they arrived (in memory only: after a resume, examples
        # of impressions scored before it use the score at training).
        self.arrival_scores: OrderedDict[str, float] = OrderedDict()
        # Impressions to score on arrival, scored together just before the next train step (or
        # when UNSCORED_MAX wait): the model changes only in a step, so each gets the score it
        # had when it came, in one call for all where a call per join output was 6.8% of the
        # loop flow's main thread.
        self.unscored: list = []
        self._parts: Optional[tuple[Any, Any, Any, Any]] = None
        # The train step whose graph runs on `_graph_pool` while the flow goes on (TensorFlow lets
        # go of the GIL inside it): its rows are pushed, and nothing else touches the model or the
        # tables' rows, until `_settle` takes it. In the Kafka loop, the flow's thread slept on a
        # futex 10-15% of its time, about 5% waiting for the graph (py-spy --idle), with the rest of
        # the flow held up behind it.
        self._pending: Optional[PendingStep] = None  # with its batch, scores on arrival and sample
        self._graph_pool: Optional[ThreadPoolExecutor] = None
        self._unreported: list[StepReport] = []  # of steps a snapshot took: the next call's output
        self._ended = False  # on_eof ran (Bytewax still takes a snapshot after it, with recovery on)
        self.auc = float("nan")
        self._validated_at = -float("inf")

    def _open(self):
        from paramserver.serving import KafkaDeltaProducer, LmdbServingStore, ServingWriter
        from paramserver.sync import DeltaSync

        cfg = self.cfg
        params = trainer = keys = None
        if cfg.train:
            params, trainer, keys = self._open_trainer()
        store = LmdbServingStore(cfg.state_dir / "serving", writer=True, max_map_size=cfg.lmdb_max_bytes,
                                 cap_name=LMDB_CAP)
        deltas = None
        if cfg.deltas_brokers:
            deltas = KafkaDeltaProducer(cfg.deltas_brokers, cfg.deltas_topic, dict(cfg.kafka_settings))
        self.catalog = Catalog(store.read_items, store.read_users, cfg.user_recent, run=self.run, seq=self.seq,
                               resumed_at=self.seq if self.resumed else (0 if cfg.recovery_dir else None),
                               keep=cfg.undo_keep, attempt=self.attempt, lineage=self.lineage)
        sync = DeltaSync(params, ServingWriter(store, deltas), interval_s=cfg.sync_interval_s,
                         dense_interval_s=cfg.dense_interval_s, extra=self.catalog.take_dirty,
                         slow_slots=item_tower_slots(cfg.user_slots, cfg.item_slots),
                         slow_interval_s=cfg.item_sync_interval_s)
        self._parts = (params, trainer, sync, keys)
        log.info("writer step ready at snapshot %s (%s, %s)", self.seq, "resumed" if self.resumed else "fresh flow",
                 "training" if cfg.train else "catalog only")
        return self._parts

    def _open_trainer(self):
        from model.features import FeatureSpec
        from model.trainer import OnlineTrainer, parameter_store

        cfg = self.cfg
        ckpt = cfg.state_dir / "params"
        began_at = self._run_began_at()
        if began_at == 0 or (not self.resumed and ckpt.exists() and not any(ckpt.iterdir())):
            shutil.rmtree(ckpt, ignore_errors=True)
        spec = FeatureSpec(cfg.user_slots, cfg.item_slots, cfg.dense, cfg.dim)
        params = parameter_store(spec, ckpt, checkpoint_max_bytes=cfg.lmdb_max_bytes, cap_name=LMDB_CAP)
        tags = params.tags()
        if self.resumed and self.seq:
            params.restore(self.seq)
        elif began_at:
            params.restore(began_at)
            self.seq = began_at
        elif began_at is None and tags:
            # A fresh flow carries on from the newest tables (train-batch's, or an earlier run's).
            params.restore(tags[-1])
            self.seq = tags[-1]
        if began_at is None and cfg.recovery_dir:
            self._record_run_start()
        trainer = OnlineTrainer(spec, params, window=cfg.window)
        self._graph_pool = ThreadPoolExecutor(1, thread_name_prefix="freshrec-train")
        dense = params.dense()
        if dense.arrays:
            trainer.load_dense_state(dense.arrays)
        keys = None
        if cfg.trained_keys_log:
            keys = TrainedKeysLog(cfg.state_dir / "trainer" / "trained-keys.log")
            keys.cut_after(self.seq)
        return params, trainer, keys

    def _run_began_at(self) -> Optional[int]:
        """The checkpoint this recovery run's tables began at, when Bytewax hands back no committed
        snapshot of the step (none, or one from before its first checkpoint) in a run that began
        before: it was killed before its first commit, so every checkpoint written since is of
        epochs Bytewax replays, and carrying on from the newest would train them twice. None when
        this is no such restart."""
        if not self.cfg.recovery_dir or (self.resumed and self.seq):
            return None
        path = self.cfg.state_dir / "trainer" / RUN_START
        try:
            record = json.loads(path.read_bytes())
            if record["run"] != self.run:
                return None  # another run's record: this one starts now
            return int(record["tag"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RuntimeError(f"{path}: unreadable ({e}); remove it only if no run with recovery "
                               "is under way on this state directory") from None

    def _record_run_start(self) -> None:
        path = self.cfg.state_dir / "trainer" / RUN_START
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"run": self.run, "tag": self.seq}))
        os.replace(tmp, path)

    def _sync(self, now: float, soon: bool = False) -> None:
        """The touched rows and catalog changes to the serving store if the sync interval passed
        (`soon`: half of it)."""
        sync = (self._parts or self._open())[2]
        if sync.maybe_sync(now, sync.interval_s / 2 if soon else None) and self.catalog is not None:
            self.catalog.forget_clean_users()  # written: they reload from the store when they act again

    def _waiting(self) -> int:
        return len(self.buffer) + len(self.expired)

    def _train_buffer(self, now: float, all_of_it: bool, slice_s: Optional[float] = None,
                      wait: bool = False) -> list[StepReport]:
        """Train full batches (and, `all_of_it`, the last partial one) for up to `slice_s`
        (`TRAIN_SLICE_S`), cut from the examples labelled by an action followed by the expired:
        one queue, so a batch the labelled ones leave room in fills with expired ones, and a flush
        trains one partial batch, not one of each kind (a step costs about 2.5 ms besides its
        examples).

        One step at most is in flight, its graph on `_graph_pool`: unless `wait` (a snapshot,
        the end) or more than `BACKLOG_BATCHES` batches wait, a call never waits for it. While it
        runs, the call starts nothing and the examples wait for a later one (`notify_at` comes back
        soon); else it starts one batch (more only if a step ends before the call does). With
        `wait`, every step has finished when it returns."""
        params, trainer, _, _ = self._parts or self._open()
        out: list[StepReport] = []
        wait = wait or self._waiting() > BACKLOG_BATCHES * self.cfg.batch_size
        if self._pending is not None:
            if not (wait or self._pending.done()):
                return out
            out += self._settle()
        if self.unscored:
            self._score_on_arrival()  # with the model they came to, before a step changes it
        if now - self.last_dense >= self.cfg.dense_interval_s:
            params.set_dense(trainer.dense_state(), now)  # between steps: as the last one left them
            self.last_dense = now
        size = self.cfg.batch_size
        until = time.perf_counter() + (TRAIN_SLICE_S if slice_s is None else slice_s)
        labelled, expired = self.buffer, self.expired
        n_labelled, total, done = len(labelled), len(labelled) + len(expired), 0
        try:
            while done < total and (all_of_it or total - done >= size):
                if done and (time.perf_counter() >= until or not (wait or self._pending.done())):
                    break
                end = done + size
                if end <= n_labelled:
                    batch = labelled[done:end]
                elif done >= n_labelled:
                    batch = expired[done - n_labelled:end - n_labelled]
                else:
                    batch = labelled[done:] + expired[:end - n_labelled]
                done = min(end, total)
                out += self._settle()
                self._start_batch(batch, now, trainer)
        finally:
            # One copy of what is left, however many batches went (never of both queues joined):
            # slicing the rest off at each batch copied it each time (quadratic in a backlog: 59%
            # of a loop flow behind its input).
            if done < n_labelled:
                self.buffer = labelled[done:]
            elif done:
                self.buffer, self.expired = [], expired[done - n_labelled:]
        if wait:
            out += self._settle()
        if out and now - self._validated_at >= VALIDATION_EVERY_S:
            self._validate(now)
            out[-1].auc = self.auc
        self.first_at = (self.first_at or now) if self._waiting() else None
        if self._pending is None:
            self._sync(now)
        # else the step's rows are not pushed yet: `_take_step` syncs once they are (a sync now
        # would take the interval's turn, and they would wait for the next)
        return out

    def _start_batch(self, batch: list[Example], now: float, trainer: Any) -> None:
        """Starts a train step on `batch` (its graph on `_graph_pool`), its provenance kept for
        `_settle`."""
        kept = self.arrival_scores
        rate = self.cfg.validation_sample
        # The join keys, made once for both uses below (only flows that forward impressions keep
        # scores on arrival; only a sampled validation asks for the key sample). `join_key`, as the
        # joiner's sample and `_to_score` take it: a digest for ids too long or ambiguous.
        keys_of = [join_key(e.request_id, e.item_id) for e in batch] if kept or rate < 1.0 else []
        arrival = np.array([kept.pop(k, np.nan) for k in keys_of], np.float64) if kept else None
        validated = None
        if rate < 1.0:
            validated = np.fromiter((e.score is not None or in_key_sample(k, rate) for e, k in zip(batch, keys_of, strict=True)),
                                    bool, len(batch))
        run = self._graph_pool.submit if self._graph_pool is not None else None
        self._pending = trainer.start_train(batch, now, arrival_scores=arrival, validated=validated, run=run)

    def _settle(self) -> list[StepReport]:
        """The train step in flight, if any, taken: waits for its graph, pushes its rows, and
        counts it; its report ([] if none)."""
        if self._pending is None:
            return []
        pending, self._pending = self._pending, None
        step = pending.result()
        batch, validated, arrival = pending.examples, pending.validated, pending.arrival_scores
        child, w = self.catalog_metrics.child, self.worker
        # Where each validated example's score came from (as OnlineTrainer._validate picks it).
        logged = np.fromiter((e.score is not None for e in batch), bool, len(batch))
        taken = np.ones(len(batch), bool) if validated is None else validated
        on_arrival = taken & ~logged & (False if arrival is None else ~np.isnan(arrival))
        counts = {"logged": int(np.count_nonzero(logged)), "on_arrival": int(np.count_nonzero(on_arrival)),
                  "at_training": int(np.count_nonzero(taken & ~logged & ~on_arrival)),
                  "left_out": len(batch) - int(np.count_nonzero(taken))}
        for source, n in counts.items():
            child(PV_SCORES, w, source).inc(n)
        keys = self._parts[3] if self._parts is not None else None
        if keys is not None:
            keys.write(self.seq + 1, batch)
        child(TRAIN_EXAMPLES, w).inc(step.size)
        child(TRAIN_STEPS, w).inc()
        child(TRAIN_LOSS, w).set(step.loss)
        return [StepReport(step.size, step.loss, self.auc)]

    def _take_step(self, now: float, wait: bool = False) -> list[StepReport]:
        """`_settle` when the step in flight has finished (`wait`: once it has), its rows synced
        if due."""
        if self._pending is None or not (wait or self._pending.done()):
            return []
        out = self._settle()
        # The step's rows go at once unless a sync went less than half an interval ago: steps come
        # about as often as syncs, and out of phase with them, their rows waited 56 ms on average
        # (p90 145 ms) for the interval's next turn in the loop flow.
        self._sync(now, soon=True)
        return out

    def _validate(self, now: float) -> None:
        trainer = (self._parts or self._open())[1]
        self._validated_at = now
        self.auc = trainer.validation.auc()
        child, w = self.catalog_metrics.child, self.worker
        if self.auc == self.auc:
            child(TRAIN_AUC, w).set(self.auc)
        child(TRAIN_LOGLOSS, w).set(trainer.validation.log_loss())

    def _score_on_arrival(self) -> None:
        """Score the impressions waiting in `unscored` with the model as it is now (as it was when
        they came: no step since); kept by join key until their examples."""
        trainer = (self._parts or self._open())[1]
        impressions, self.unscored = self.unscored, []
        scores = trainer.score(impressions)
        kept = self.arrival_scores
        for e, score in zip(impressions, scores.tolist(), strict=True):
            kept[join_key(e.request_id, e.item_id)] = score
        while len(kept) > self.cfg.max_arrival_scores:
            kept.popitem(last=False)  # the oldest: its example falls back to the score at training

    def _reports(self) -> list[StepReport]:
        out, self._unreported = self._unreported, []
        return out

    def on_batch(self, values: list[Any]) -> tuple[list[StepReport], bool]:
        now = time.time()
        out = self._reports() + self._take_step(now)
        if any(type(v) is not Example for v in values):
            deltas = [v for v in values if type(v) is CatalogDelta]
            if deltas:
                if self._parts is None:
                    self._open()
                self.catalog.merge(deltas)  # type: ignore[union-attr]
                self.catalog_metrics.publish(self.catalog.counts.as_dict())  # type: ignore[union-attr]
            joined = [v for v in values if type(v) is Joined]
            impressions = [e for v in joined for e in v.impressions]
            if impressions:
                self.unscored += impressions  # scored before the next step (`_train_buffer`)
                if len(self.unscored) >= UNSCORED_MAX:
                    out += self._take_step(now, wait=True)
                    self._score_on_arrival()
            examples = [v for v in values if type(v) is Example]
            for v in joined:
                examples += v.examples
            values = examples
            if not values:
                if deltas and self._pending is None:  # else they go with the step's rows, soon
                    self._sync(now)
                return out, False
        if not self._waiting():
            self.first_at = now
        labelled = [e for e in values if e.label_received_at is not None]
        if len(labelled) == len(values):
            self.buffer += values
        else:
            self.buffer += labelled
            self.expired += [e for e in values if e.label_received_at is None]
        waited = now - (self.first_at or now) >= self.cfg.max_wait_s
        if waited or self._waiting() >= self.cfg.batch_size:
            out += self._train_buffer(now, all_of_it=waited)
        return out, False

    def on_notify(self) -> tuple[list[StepReport], bool]:
        now = time.time()
        out = self._reports() + self._take_step(now)
        if self._waiting():
            out += self._train_buffer(now, all_of_it=now - (self.first_at or now) >= self.cfg.max_wait_s)
        elif self._parts is not None and self._pending is None and not out:
            self._sync(now)
        return out, False

    def on_eof(self) -> tuple[list[StepReport], bool]:
        out = self._reports()
        if self._waiting():
            out += self._train_buffer(time.time(), all_of_it=True, slice_s=math.inf, wait=True)
        out += self._settle()
        if self._parts is not None:
            params, trainer, sync, keys = self._parts
            if keys is not None:
                keys.flush()  # the last steps' lines, as a snapshot writes them
            if trainer is not None:
                self._validate(time.time())  # the gauges end on the whole stream's last window
                if out:
                    out[-1].auc = self.auc
                params.set_dense(trainer.dense_state())
            self.catalog.release_counts()  # type: ignore[union-attr]
            sync.sync(dense=True)
            sync.writer.close()  # flushes what is still on its way to param-deltas
        if self._graph_pool is not None:
            self._graph_pool.shutdown()
            self._graph_pool = None
        self._ended = True
        return out, False

    def notify_at(self) -> Optional[datetime]:
        if self._unreported:
            return datetime.now(UTC)  # reports of steps a snapshot took
        if self._pending is not None:
            # Nothing trains until the step in flight has finished (then its rows go to the serving
            # store): a wait that is up meanwhile would bring the step back at once, again and again.
            return datetime.now(UTC) + timedelta(seconds=PENDING_POLL_S)
        if self.first_at is not None:
            return datetime.fromtimestamp(self.first_at + self.cfg.max_wait_s, UTC)
        if self._parts is not None:
            # Keep publishing touched rows while no examples come.
            return datetime.now(UTC) + timedelta(seconds=self.cfg.sync_interval_s)
        return None

    def snapshot(self) -> dict:
        # Examples waiting for a batch belong to this epoch: train them now, so the checkpoint
        # below covers every example the epoch brought, and a resume trains none twice.
        if self._waiting():
            self._unreported += self._train_buffer(time.time(), all_of_it=True, slice_s=math.inf, wait=True)
        self._unreported += self._settle()
        if self._parts is not None:
            params, trainer, sync, keys = self._parts
            # The store must hold every catalog change made before this snapshot: a resume from it
            # replays only what came after, and sets counts back by the history written with them.
            self.catalog.release_counts()  # type: ignore[union-attr]
            sync.sync()
            if self._ended:
                sync.writer.close()  # after on_eof: flushes what this sync sent to param-deltas
            self.seq += 1
            if trainer is not None:
                params.set_dense(trainer.dense_state())
                params.checkpoint(self.seq)
                if keys is not None:
                    keys.flush()
            self.catalog.snapshot(self.seq)  # type: ignore[union-attr]
        return {"seq": self.seq, "run": self.run, "attempt": self.attempt, "lineage": self.lineage}
