"""The train step over examples: pull the batch's rows, run the graph, push the rows' gradients.

The graph (model/graph.py) holds the dense weights; the `ParameterStore` of paramserver/ holds
every embedding row. Each example is scored before any gradient from it, so the scores feed
progressive validation as they are.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import msgspec
import numpy as np

from model.evaluation import ProgressiveValidation
from model.features import DenseNormalizer, FeatureSpec, make_batch


@dataclass
class StepResult:
    loss: float
    scores: np.ndarray  # the model's score of each example, taken before learning from it
    labels: np.ndarray
    size: int


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


class OnlineTrainer:
    """Trains the graph and the parameter store together, one mini-batch at a time."""

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

    def _rows(self, batch, now: float, admit: bool = True) -> dict[str, np.ndarray]:
        return {s: self.params.pull(s, batch.slots[s].ids, now=now, admit=admit) for s in self.spec.slots}

    def train(self, examples: Sequence[Any], now: Optional[float] = None,
              arrival_scores: Optional[np.ndarray] = None) -> StepResult:
        """One step on `examples` (training examples: label, weight, features, arrival times).

        `arrival_scores` (NaN where unknown) are this trainer's scores of the impressions when they
        arrived, for progressive validation where the model server logged none."""
        now = time.time() if now is None else now
        batch = make_batch(examples, self.spec, [e.label for e in examples], [e.weight for e in examples])
        # Normalise with what was known before this batch, so its scores are taken before learning.
        dense = self.normalizer.apply(batch.dense)
        self.normalizer.update(batch.dense)
        rows = self._rows(batch, now)
        loss, scores, grads = self.model.train(batch, rows, dense)
        arrivals = np.array([e.label_received_at if e.label_received_at is not None else np.nan
                             for e in examples], np.float64)
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
        logged = np.array([e.score if e.score is not None else np.nan for e in examples], np.float64)
        # Progressive validation scores an impression with the model as it was when it happened: the
        # score the model server logged; else the trainer's score when the impression arrived; else
        # (a replay whose impressions came before the trainer could score them) its score before
        # this step.
        if arrival_scores is not None:
            logged = np.where(np.isnan(logged), arrival_scores, logged)
        pv_scores = np.where(np.isnan(logged), scores, logged)
        self.validation.update(pv_scores, batch.labels)
        self.steps += 1
        self.examples += len(examples)
        self.last_loss = loss
        return StepResult(loss, scores, batch.labels, len(examples))

    def score(self, events: Sequence[Any], now: Optional[float] = None) -> np.ndarray:
        """Scores of feature events (or examples) with the model as it is now."""
        now = time.time() if now is None else now
        batch = make_batch(events, self.spec)
        rows = self._rows(batch, now, admit=False)  # scoring looks; only training admits ids
        return self.model.score(batch, rows, self.normalizer.apply(batch.dense))

    def dense_state(self) -> dict[str, np.ndarray]:
        """The dense weights and the normaliser's statistics, for the parameter store."""
        return {**self.model.weights(), **self.normalizer.state()}

    def load_dense_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.model.load_weights(arrays)
        self.normalizer.load(arrays)
