"""The train step over examples: pull the batch's rows, run the graph, push the rows' gradients.

The graph (model/graph.py) holds the dense weights; the `ParameterStore` of paramserver/ holds
every embedding row. Each example is scored before any gradient from it, so the scores feed
progressive validation as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import msgspec
import numpy as np

from model.evaluation import ProgressiveValidation
from model.features import BIAS_SLOTS, DenseNormalizer, FeatureSpec, make_batch


@dataclass
class StepResult:
    loss: float
    scores: np.ndarray  # the model's score of each example, taken before learning from it
    labels: np.ndarray
    size: int


class PendingStep:
    """A step of `OnlineTrainer.start_train` whose graph may still be running: `result()` waits for
    it, pushes the rows' gradients and updates progressive validation (once; later calls give the
    same result, or, when the graph failed, raise). A failed step has left what `start_train` did
    before the graph: the normaliser's statistics took its batch and the tables admitted its ids
    (the flow stops on the error, and a resume restores both from the checkpoint)."""

    def __init__(self, trainer: OnlineTrainer, examples: Sequence[Any], now: float,
                 arrival_scores: Optional[np.ndarray], validated: Optional[np.ndarray], batch: Any, graph: Any):
        self.trainer, self.examples, self.now = trainer, examples, now
        self.arrival_scores, self.validated, self.batch = arrival_scores, validated, batch
        self._graph = graph  # a `GraphRun`; None once its result is taken
        self._result: Optional[StepResult] = None

    def done(self) -> bool:
        """Whether `result()` would not wait for the graph (it has finished, or failed)."""
        return self._graph is None or self._graph.done()

    def result(self) -> StepResult:
        if self._result is None:
            graph, self._graph = self._graph, None
            if graph is None:
                raise RuntimeError("this step failed already")
            try:
                self._result = self.trainer._finish(self, graph.result())
            finally:
                self.trainer._in_flight = None
        return self._result


USER_ID_LR = 0.3


def parameter_store(spec: FeatureSpec, checkpoint_dir: Any = None, *, checkpoint_max_bytes: Optional[int] = None,
                    cap_name: str = "max_map_size", **slot_options: Any) -> Any:
    """The training tables for `spec`: every slot of its width; user and item ids admitted at first
    sight, other ids after two sightings (paramserver's defaults). Checkpoints in `checkpoint_dir`
    grow up to `checkpoint_max_bytes` (the setting `cap_name`)."""
    from model.features import BIAS_SLOTS
    from paramserver.optimizers import Adagrad
    from paramserver.store import ParameterStore
    from paramserver.table import SlotConfig

    # Tuned on MovieLens-100K's progressive validation (model/evaluate.py): biases learn fastest.
    slots = {s: SlotConfig(dim=1, init="zeros", min_count=1, optimizer=Adagrad(lr=0.3)) for s in BIAS_SLOTS}
    default = SlotConfig(dim=spec.dim, **{"min_count": 2, "optimizer": Adagrad(lr=0.05), **slot_options})
    # A user's own row learns faster than the other slots: a few actions move that user's list (the
    # point of training online). MovieLens-100K online AUC over the second half, by this rate:
    # 0.05 (the other slots') 0.7690, 0.3 0.7714, 1.0 0.7682.
    slots["user_id"] = msgspec.structs.replace(default, min_count=1, optimizer=Adagrad(lr=USER_ID_LR))
    return ParameterStore(slots, default=default, checkpoint_dir=checkpoint_dir,
                          checkpoint_max_bytes=checkpoint_max_bytes, cap_name=cap_name)


def _per_step(step: np.ndarray, row: np.ndarray, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Occurrences of rows (< m) in steps (< k) as each step's distinct rows (k, width; -1 pads)
    and each occurrence's position among its step's."""
    uniq, inv = np.unique(step.astype(np.int64) * m + row, return_inverse=True)
    u_step = uniq // m
    per = np.bincount(u_step, minlength=k)
    rank = (np.arange(len(uniq)) - (np.cumsum(per) - per)[u_step]).astype(np.int32)
    rows = np.full((k, max(int(per.max()), 1)), -1, np.int32)
    rows[u_step, rank] = uniq % m
    return rows, rank[inv.reshape(-1)]


def _arrivals(examples: Sequence[Any]) -> np.ndarray:
    """When each example's label reached the flow (NaN where unknown)."""
    return np.array([e.label_received_at if e.label_received_at is not None else np.nan for e in examples],
                    np.float64)


@dataclass
class _WorkingSlot:
    """One slot's rows for `OnlineTrainer.train_steps`: the pulled `WorkingRows`, the step from
    which each row counts (`ready`, int32 max: never), each occurrence's row and step, and each
    row's Adagrad rate and epsilon (its accumulator is `rows.state`)."""

    rows: Any
    ready: np.ndarray
    occ_row: np.ndarray
    occ_step: np.ndarray
    lr: np.ndarray
    eps: np.ndarray
    updates: np.ndarray  # the steps that update each row: those it appears in from its `ready` step on

    def arrival(self, arrivals: Optional[np.ndarray], example: np.ndarray) -> Optional[np.ndarray]:
        """The earliest arrival behind each row's updates (NaN where unknown); None if none known."""
        if arrivals is None:
            return None
        live = self.occ_step >= self.ready[self.occ_row]  # occurrences from each row's ready step on
        out = np.full(len(self.ready), np.inf)
        np.fmin.at(out, self.occ_row[live], arrivals[example[live]])
        out[np.isinf(out)] = np.nan
        return out


@dataclass
class _Prepared:
    """`OnlineTrainer.prepare_steps`: a `train_steps` call's inputs from its examples alone."""

    examples: Sequence[Any]
    batch_size: int
    k: int  # steps
    labels: np.ndarray
    weights: np.ndarray
    batch: Any
    dense: np.ndarray  # (k, batch_size, dense features), normalised
    arrivals: Optional[np.ndarray]
    step_of: np.ndarray  # each example's step
    pairs: dict[int, tuple]  # by SlotIds (shared by the bias slots): distinct (id, step) pairs
    # The steps' layout (`OnlineTrainer._layout`) for working sets of a row per distinct id, as
    # collisionless tables pull: made here, beside the graph, and used where the pulls agree.
    occ_rows: dict[str, np.ndarray]
    layout: dict[str, np.ndarray]


class OnlineTrainer:
    """Trains the graph and the parameter store together, one mini-batch at a time (`train`, or
    `start_train` with its graph on another thread) or many in one TensorFlow call (`train_steps`).
    While a step of `start_train` is in flight, every other use of the model or the tables here
    raises, until its `result()` is taken."""

    def __init__(self, spec: FeatureSpec, params: Any, model: Any = None, *, window: int = 10_000):
        if model is None:
            from model.graph import TwoTowerRanker

            model = TwoTowerRanker(spec)
        self.spec = spec
        self.params = params
        self.model = model
        self.normalizer = DenseNormalizer(len(spec.dense))
        self.validation = ProgressiveValidation(window)
        self.steps = 0
        self.examples = 0
        self.last_loss = float("nan")
        self._in_flight: Optional[PendingStep] = None  # a step whose result is not taken yet

    def _idle(self, what: str) -> None:
        """Refuses `what` while a step is in flight: its graph may be changing the dense weights,
        and its rows' gradients are not pushed yet (`start_train`)."""
        if self._in_flight is not None:
            raise RuntimeError(f"cannot {what} while a train step is in flight: take its result() first")

    def _rows(self, batch, now: float, admit: bool = True) -> dict[str, np.ndarray]:
        return {s: self.params.pull(s, batch.slots[s].ids, now=now, admit=admit) for s in self.spec.slots}

    def train(self, examples: Sequence[Any], now: Optional[float] = None,
              arrival_scores: Optional[np.ndarray] = None, validated: Optional[np.ndarray] = None) -> StepResult:
        """One step on `examples` (training examples: label, weight, features, arrival times).

        `arrival_scores` (NaN where unknown) are this trainer's scores of the impressions when they
        arrived, for progressive validation where the model server logged none. `validated` (bool
        per example; None: all) picks the examples progressive validation takes."""
        return self.start_train(examples, now, arrival_scores, validated).result()

    def start_train(self, examples: Sequence[Any], now: Optional[float] = None,
                    arrival_scores: Optional[np.ndarray] = None, validated: Optional[np.ndarray] = None,
                    run: Optional[Callable[..., Any]] = None) -> PendingStep:
        """`train` with the graph run by `run` (an executor's `submit`; None: here), its result
        and the rows' updates taken by `PendingStep.result`. The batch and its rows are pulled
        here; until the result is taken, nothing else may pull, push, score or read the dense
        weights, so steps run in the order they started and each sees the one before it whole
        (the same results as `train`): what runs meanwhile is the rest of the flow."""
        self._idle("start a train step")
        now = time.time() if now is None else now
        batch = make_batch(examples, self.spec, [e.label for e in examples], [e.weight for e in examples])
        # Normalise with what was known before this batch, so its scores are taken before learning.
        dense = self.normalizer.apply(batch.dense)
        self.normalizer.update(batch.dense)
        rows = self._rows(batch, now)
        graph = self.model.start_train(batch, rows, dense, run)
        step = self._in_flight = PendingStep(self, examples, now, arrival_scores, validated, batch, graph)
        return step

    def _finish(self, step: PendingStep, graph_out: tuple[float, np.ndarray, dict[str, np.ndarray]]) -> StepResult:
        loss, scores, grads = graph_out
        examples, batch, now = step.examples, step.batch, step.now
        arrivals = _arrivals(examples)
        known = not np.isnan(arrivals).all()  # replays carry no arrival times: nothing to track
        earliest_by_slot: dict[int, np.ndarray] = {}  # the bias slots share their ids' SlotIds
        for s in self.spec.slots:
            slot = batch.slots[s]
            if not slot.ids:
                continue
            earliest = earliest_by_slot.get(id(slot))
            if not known:
                earliest = None  # unknown, as NaN would say
            elif earliest is not None:
                earliest = earliest.copy()  # the store may keep what it is given
            else:
                # The earliest arrival behind each row's update: min over the examples that hold it.
                earliest = np.full(len(slot.ids), np.inf)
                np.fmin.at(earliest, slot.index, arrivals[slot.example])
                earliest[np.isinf(earliest)] = np.nan
                earliest_by_slot[id(slot)] = earliest.copy()
            # Rows get the gradient of the summed loss (per-example scale): a row sits in a few
            # examples of a batch, and the batch mean would shrink its steps by the batch size.
            self.params.push(s, slot.ids, grads[s] * len(examples), now=now, arrival=earliest)
        self._validate(examples, scores, batch.labels, step.arrival_scores, step.validated)
        self.steps += 1
        self.examples += len(examples)
        self.last_loss = loss
        return StepResult(loss, scores, batch.labels, len(examples))

    def prepare_steps(self, examples: Sequence[Any], batch_size: int) -> Optional[_Prepared]:
        """What `train_steps(examples, batch_size)` takes from the examples alone, before any pull
        (None where it would take `train` step by step): the batch, labels, weights, arrivals, the
        (id, step) pairs, and the dense features normalised with what was known before each slice
        (the normaliser learns them here). Calls prepared ahead (the next one while this one runs
        in TensorFlow, which lets Python run) must then train in the order they were prepared."""
        n = len(examples)
        if n <= batch_size or not self._steps_apply():
            return None
        k = -(-n // batch_size)
        labels = np.array([e.label for e in examples], np.float32)
        weights = np.array([e.weight for e in examples], np.float32)
        batch = make_batch(examples, self.spec, labels, weights)
        dense = np.zeros((k, batch_size, len(self.spec.dense)), np.float32)
        if self.spec.dense:  # normalised as `train` does: with what was known before each slice
            for i in range(k):
                part = batch.dense[i * batch_size:(i + 1) * batch_size]
                dense[i, :len(part)] = self.normalizer.apply(part)
                self.normalizer.update(part)
        arrivals = _arrivals(examples)
        if np.isnan(arrivals).all():
            arrivals = None  # replays carry no arrival times: nothing to track
        step_of = np.arange(n, dtype=np.int32) // batch_size
        pairs: dict[int, tuple] = {}
        for s in self.spec.slots:
            ids = batch.slots[s]
            if id(ids) not in pairs:
                # Distinct (id, step) pairs, by id then step: an id's sightings in step order.
                both = np.unique(ids.index.astype(np.int64) * k + step_of[ids.example])
                pairs[id(ids)] = (both // k, (both % k).astype(np.int32))
        occ_rows = {s: batch.slots[s].index.astype(np.int32) for s in self.spec.slots}
        layout = self._layout(batch, batch_size, k, step_of, labels, weights, occ_rows,
                              {s: len(batch.slots[s].ids) for s in self.spec.slots})
        return _Prepared(examples, batch_size, k, labels, weights, batch, dense, arrivals, step_of, pairs, occ_rows,
                         layout)

    def _layout(self, batch: Any, batch_size: int, k: int, step_of: np.ndarray, labels: np.ndarray,
                weights: np.ndarray, occ_rows: dict[str, np.ndarray], n_rows: dict[str, int]) -> dict[str, np.ndarray]:
        """`TwoTowerRanker.train_steps`'s per-step inputs but the dense features, for working sets
        of `n_rows[s]` rows a slot and each occurrence's row `occ_rows[s]`: each step's rows and
        occurrences, field after field as `TwoTowerRanker.pack` lays out a batch, its bias rows,
        labels, weights and count of examples."""
        n = len(step_of)
        fields = (*self.spec.user_side, *self.spec.item_side)
        offsets = np.cumsum([0] + [n_rows[s] for s in fields])
        boffsets = np.cumsum([0] + [n_rows[s] for s in BIAS_SLOTS])
        m, mb = int(offsets[-1]), int(boffsets[-1])
        occ_row = np.concatenate([offsets[f] + occ_rows[s] for f, s in enumerate(fields)])
        occ_ex = np.concatenate([batch.slots[s].example for s in fields])
        occ_seg = np.concatenate([(batch.slots[s].example % batch_size) * len(fields) + f
                                  for f, s in enumerate(fields)]).astype(np.int32)
        order = np.argsort(occ_ex // batch_size, kind="stable")
        occ_step = step_of[occ_ex[order]]
        step_rows, at_row = _per_step(occ_step, occ_row[order], k, m)
        per = np.bincount(occ_step, minlength=k)
        at = np.arange(len(order)) - (np.cumsum(per) - per)[occ_step]
        occ_index = np.zeros((k, max(int(per.max()), 1)), np.int32)
        occ_segment = np.full(occ_index.shape, -1, np.int32)
        occ_index[occ_step, at] = at_row
        occ_segment[occ_step, at] = occ_seg[order]
        pos = np.arange(n) % batch_size
        ub, ib = occ_rows[BIAS_SLOTS[0]], boffsets[1] + occ_rows[BIAS_SLOTS[1]]
        step_bias, bias_at = _per_step(np.concatenate([step_of, step_of]), np.concatenate([ub, ib]), k, mb)
        bias_index = np.zeros((k, 2, batch_size), np.int32)
        bias_index[step_of, 0, pos] = bias_at[:n]
        bias_index[step_of, 1, pos] = bias_at[n:]
        shaped = np.zeros((k, batch_size), np.float32)
        lab, wts = shaped.copy(), shaped.copy()
        lab[step_of, pos], wts[step_of, pos] = labels, weights
        counts = np.bincount(step_of, minlength=k).astype(np.float32)
        return {"step_rows": step_rows, "occ_index": occ_index, "occ_segment": occ_segment, "step_bias": step_bias,
                "bias_index": bias_index, "labels": lab, "weights": wts, "counts": counts}

    def train_steps(self, examples: Sequence[Any], batch_size: int, now: Optional[float] = None,
                    arrival_scores: Optional[np.ndarray] = None, prepared: Optional[_Prepared] = None,
                    beside_graph: Optional[Callable[[], object]] = None) -> StepResult:
        """`train` on each `batch_size` slice of `examples` in turn, in one TensorFlow call.

        The rows every slice touches (values and optimizer state) are pulled from the store once,
        with the admissions the slices' pulls would make (an id not admitted until its n-th slice
        reads zeros and takes no update before it); the graph runs the steps in order on that
        working set, each slice scored before it is learned, and the rows go back to the store
        once. Scores, rows and dense weights are those of the steps one by one, to float rounding.
        Slots whose optimizer is not Adagrad, and single slices, take `train` step by step.
        The result holds every example's score and label, and the mean of the steps' losses.
        `prepared`: `prepare_steps(examples, batch_size)`, made ahead. `beside_graph` is called
        just before the graph runs, its inputs ready (threads it starts then have the GIL to
        themselves while it runs)."""
        self._idle("run train steps")
        now = time.time() if now is None else now
        n = len(examples)
        if prepared is None:
            prepared = self.prepare_steps(examples, batch_size)
        elif prepared.examples is not examples or prepared.batch_size != batch_size:
            raise ValueError("prepared for other examples or another batch size")
        if prepared is None:
            return self._one_by_one(examples, batch_size, now, arrival_scores)
        p = prepared
        k, labels, weights, batch, dense, arrivals, step_of = p.k, p.labels, p.weights, p.batch, p.dense, p.arrivals, p.step_of
        work = {s: self._working_set(s, batch.slots[s], step_of, k, now, p.pairs) for s in self.spec.slots}

        fields = (*self.spec.user_side, *self.spec.item_side)
        emb_slots, bias_slots = fields, BIAS_SLOTS
        offsets = np.cumsum([0] + [len(work[s].rows.values) for s in emb_slots])
        boffsets = np.cumsum([0] + [len(work[s].rows.values) for s in bias_slots])
        rows = {"emb": np.concatenate([work[s].rows.values.reshape(-1, self.spec.dim) for s in emb_slots]),
                "acc": np.concatenate([work[s].rows.state for s in emb_slots]),
                "lr": np.concatenate([work[s].lr for s in emb_slots]),
                "eps": np.concatenate([work[s].eps for s in emb_slots]),
                "ready": np.concatenate([work[s].ready for s in emb_slots]),
                "bias": np.concatenate([work[s].rows.values for s in bias_slots]),
                "bacc": np.concatenate([work[s].rows.state for s in bias_slots]),
                "blr": np.concatenate([work[s].lr for s in bias_slots]),
                "beps": np.concatenate([work[s].eps for s in bias_slots]),
                "bready": np.concatenate([work[s].ready for s in bias_slots])}
        if all(len(work[s].rows.values) == len(batch.slots[s].ids) and np.array_equal(work[s].occ_row, p.occ_rows[s])
               for s in self.spec.slots):
            layout = p.layout
        else:  # ids share rows (a hashed table): the layout of the rows pulled
            layout = self._layout(batch, batch_size, k, step_of, labels, weights,
                                  {s: work[s].occ_row for s in self.spec.slots},
                                  {s: len(work[s].rows.values) for s in self.spec.slots})
        emb, acc, bias, bacc, scores, losses = self.model.train_steps(rows, {**layout, "dense": dense}, k,
                                                                      beside_graph=beside_graph)
        scores = scores[step_of, np.arange(n) % batch_size].astype(np.float64)
        for s, (lo, hi), (w, a) in [*((s, offsets[f:f + 2], (emb, acc)) for f, s in enumerate(emb_slots)),
                                    *((s, boffsets[f:f + 2], (bias, bacc)) for f, s in enumerate(bias_slots))]:
            ws = work[s]
            self.params.write_working(ws.rows, w[lo:hi].reshape(ws.rows.values.shape), a[lo:hi], ws.updates,
                                      arrival=ws.arrival(arrivals, batch.slots[s].example), now=now)
        self._validate(examples, scores, labels, arrival_scores)
        self.steps += k
        self.examples += n
        self.last_loss = float(losses[-1])
        return StepResult(float(losses.mean()), scores, labels, n)

    def compile_steps(self, examples: Sequence[Any], batch_size: int) -> float:
        """Compile the program of `train_steps(examples, batch_size)` (and of later calls whose
        inputs fit its padded sizes) ahead of them, from the shapes of `examples` alone: nothing is
        pulled, learned or counted. Returns the seconds it took (tracing and XLA's compilation,
        which the first call would take otherwise)."""
        n = len(examples)
        if n <= batch_size or not self._steps_apply():
            return 0.0
        k = -(-n // batch_size)
        batch = make_batch(examples, self.spec)
        fields = (*self.spec.user_side, *self.spec.item_side)
        # What `train_steps` would hold, with a row per distinct id (a hashed table holds no more).
        offsets = np.cumsum([0] + [len(batch.slots[s].ids) for s in fields])
        step = np.concatenate([batch.slots[s].example // batch_size for s in fields]).astype(np.int64)
        row = np.concatenate([offsets[f] + batch.slots[s].index for f, s in enumerate(fields)])
        user, item = batch.slots["user_id.bias"], batch.slots["item_id.bias"]
        b_step = np.concatenate([user.example, item.example]) // batch_size
        b_row = np.concatenate([user.index, len(user.ids) + item.index])
        m, mb = int(offsets[-1]), len(user.ids) + len(item.ids)

        def most_distinct(steps: np.ndarray, rows: np.ndarray, width: int) -> int:
            return int(np.bincount(np.unique(steps.astype(np.int64) * width + rows) // width, minlength=k).max())

        return self.model.compile_steps(m, mb, k, most_distinct(step, row, max(m, 1)),
                                        int(np.bincount(step, minlength=k).max()),
                                        most_distinct(b_step, b_row, max(mb, 1)), batch_size)

    def _steps_apply(self) -> bool:
        """Whether every slot learns with Adagrad, the optimizer `TwoTowerRanker.train_steps` runs."""
        from paramserver.optimizers import Adagrad

        return all(type(self.params.config_for(s).optimizer) is Adagrad for s in self.spec.slots)

    def _one_by_one(self, examples: Sequence[Any], batch_size: int, now: float,
                    arrival_scores: Optional[np.ndarray]) -> StepResult:
        results = [self.train(examples[i:i + batch_size], now,
                              None if arrival_scores is None else arrival_scores[i:i + batch_size])
                   for i in range(0, len(examples), batch_size)]
        return StepResult(float(np.mean([r.loss for r in results])), np.concatenate([r.scores for r in results]),
                          np.concatenate([r.labels for r in results]), len(examples))

    def _working_set(self, slot: str, ids: Any, step_of: np.ndarray, k: int, now: float,
                     pairs: dict[int, tuple]) -> _WorkingSlot:
        """The rows of `slot` for a run of `k` steps: pulled, with the step each starts at and the
        steps that update it. `pairs`: the distinct (id, step) pairs of its ids (`prepare_steps`)."""
        occ_step = step_of[ids.example]
        n_ids = len(ids.ids)
        pair_id, pair_step = pairs[id(ids)]
        sightings = np.bincount(pair_id, minlength=n_ids)
        rows = self.params.pull_working(slot, ids.ids, sightings, now=now)
        first = np.cumsum(sightings) - sightings
        never = np.iinfo(np.int32).max
        late = rows.ready < sightings
        id_ready = np.full(n_ids, never, np.int32)
        id_ready[late] = pair_step[first[late] + rows.ready[late]]
        id_ready[late & (rows.ready == 0)] = 0
        m = len(rows.values)
        if m == n_ids and (rows.index == np.arange(n_ids)).all():
            ready = id_ready
            live = pair_step >= ready[pair_id]
            updates = np.bincount(pair_id[live], minlength=m)
        else:  # ids share rows (a hashed table): a row's steps are its ids' steps, once each
            ready = np.full(m, never, np.int32)
            np.minimum.at(ready, rows.index, id_ready)
            row_steps = np.unique(rows.index[pair_id].astype(np.int64) * k + pair_step)
            row, row_step = row_steps // k, row_steps % k
            updates = np.bincount(row[row_step >= ready[row]], minlength=m)
        opt = rows.optimizer
        return _WorkingSlot(rows, ready, rows.index[ids.index].astype(np.int32), occ_step,
                            np.full((m, 1), opt.lr, np.float32), np.full((m, 1), opt.eps, np.float32), updates)

    def _validate(self, examples: Sequence[Any], scores: np.ndarray, labels: np.ndarray,
                  arrival_scores: Optional[np.ndarray], validated: Optional[np.ndarray] = None) -> None:
        logged = np.array([e.score if e.score is not None else np.nan for e in examples], np.float64)
        # Progressive validation scores an impression with the model as it was when it happened: the
        # score the model server logged; else the trainer's score when the impression arrived; else
        # (a replay whose impressions came before the trainer could score them) its score before
        # this step.
        if arrival_scores is not None:
            logged = np.where(np.isnan(logged), arrival_scores, logged)
        scores = np.where(np.isnan(logged), scores, logged)
        if validated is not None:
            scores, labels = scores[validated], labels[validated]
        self.validation.update(scores, labels)

    def score(self, events: Sequence[Any], now: Optional[float] = None) -> np.ndarray:
        """Scores of feature events (or examples) with the model as it is now."""
        self._idle("score")
        now = time.time() if now is None else now
        batch = make_batch(events, self.spec)
        rows = self._rows(batch, now, admit=False)  # scoring looks; only training admits ids
        return self.model.score(batch, rows, self.normalizer.apply(batch.dense))

    def dense_state(self) -> dict[str, np.ndarray]:
        """The dense weights and the normaliser's statistics, for the parameter store."""
        self._idle("read the dense weights")
        return {**self.model.weights(), **self.normalizer.state()}

    def load_dense_state(self, arrays: dict[str, np.ndarray]) -> None:
        self._idle("load dense weights")
        self.model.load_weights(arrays)
        self.normalizer.load(arrays)
