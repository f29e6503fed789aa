"""From events to the model's inputs: which sparse fields feed which tower, and batches of ids.

No TensorFlow here: a `Batch` is numpy arrays that the graph takes as they are. Each sparse slot
becomes the unique ids of the batch (their rows are pulled from paramserver/) and, per occurrence,
an index into them and the example it belongs to, so multi-valued fields are mean-pooled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np

from paramserver.records import MAX_KEY_BYTES, long_id


class HasFeatures(Protocol):
    user_id: str
    item_id: str
    sparse: dict
    dense: dict


# A scalar per user and per item, beside their embeddings: how much each likes, and is liked, overall.
BIAS_SLOTS = ("user_id.bias", "item_id.bias")


@dataclass(frozen=True)
class FeatureSpec:
    """Which fields the model reads. `user_id` and `item_id` are always slots of their towers."""

    user_slots: tuple[str, ...] = ()
    item_slots: tuple[str, ...] = ("author", "tags")
    dense: tuple[str, ...] = ()
    dim: int = 16

    @property
    def slots(self) -> tuple[str, ...]:
        """Every table the model pulls from: the embedding slots, then the id bias slots."""
        return (*self.embedding_slots, *BIAS_SLOTS)

    @property
    def embedding_slots(self) -> tuple[str, ...]:
        return ("user_id", "item_id", *self.user_slots, *self.item_slots)

    def width(self, slot: str) -> int:
        return 1 if slot in BIAS_SLOTS else self.dim

    @property
    def user_side(self) -> tuple[str, ...]:
        return ("user_id", *self.user_slots)

    @property
    def item_side(self) -> tuple[str, ...]:
        return ("item_id", *self.item_slots)

    def as_dict(self) -> dict:
        return {"user_slots": list(self.user_slots), "item_slots": list(self.item_slots),
                "dense": list(self.dense), "dim": self.dim}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(tuple(d["user_slots"]), tuple(d["item_slots"]), tuple(d["dense"]), int(d["dim"]))


@dataclass
class SlotIds:
    """One slot of a batch: its unique ids, and for each occurrence the row index and example."""

    ids: list[str]
    index: np.ndarray  # int32, into ids
    example: np.ndarray  # int32, into the batch


@dataclass
class Batch:
    size: int
    slots: dict[str, SlotIds]
    dense: np.ndarray  # float32 (size, len(spec.dense)), raw (the trainer normalises)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


def _values(x) -> list[str]:
    if x is None:
        return []
    return [x] if isinstance(x, str) else list(x)


def make_batch(events: Sequence[HasFeatures], spec: FeatureSpec,
               labels: Optional[Sequence[float]] = None,
               weights: Optional[Sequence[float]] = None) -> Batch:
    """The model's inputs for a batch of examples (or of feature events, for scoring)."""
    n = len(events)
    slots: dict[str, SlotIds] = {}
    every = np.arange(n, dtype=np.int32)
    sparse = [e.sparse for e in events] if len(spec.embedding_slots) > 2 else []
    for slot in spec.embedding_slots:
        if slot == "user_id":
            raw, example = [e.user_id for e in events], every
        elif slot == "item_id":
            raw, example = [e.item_id for e in events], every
        else:
            raw = [sp.get(slot) for sp in sparse]
            if set(map(type, raw)) <= {str}:  # one value per event: no list per event
                example = every
            else:
                per = list(map(_values, raw))
                example = np.repeat(every, np.fromiter(map(len, per), np.int32, n))
                raw = [v for vs in per for v in vs]
        # Distinct ids in order of first sight, and each occurrence's place among them.
        ids = list(dict.fromkeys(raw))
        place = {v: i for i, v in enumerate(ids)}
        index = np.fromiter(map(place.__getitem__, raw), np.int32, len(raw))
        if ids and max(map(len, ids)) * 4 > MAX_KEY_BYTES:
            # The parameter tables take ids of at most 640 bytes and LMDB keys of 511: a longer id
            # is the digest its serving key holds (paramserver/records.py), which is unique too.
            ids = [long_id(v) if len(v.encode()) > MAX_KEY_BYTES else v for v in ids]
        slots[slot] = SlotIds(ids, index, example)
    slots["user_id.bias"] = slots["user_id"]
    slots["item_id.bias"] = slots["item_id"]
    dense = np.zeros((n, len(spec.dense)), np.float32)
    for j, name in enumerate(spec.dense):
        dense[:, j] = [float(e.dense.get(name, 0.0)) for e in events]
    batch = Batch(n, slots, dense)
    if labels is not None:
        batch.labels = np.asarray(labels, np.float32)
        batch.weights = np.asarray(weights if weights is not None else np.ones(n), np.float32)
    return batch


class DenseNormalizer:
    """Running mean and variance of each dense feature (Welford), to standardise them online."""

    def __init__(self, width: int):
        self.count = 0.0
        self.mean = np.zeros(width, np.float64)
        self.m2 = np.zeros(width, np.float64)

    def update(self, x: np.ndarray) -> None:
        if not len(x) or not x.shape[1]:
            return
        n = float(len(x))
        mean = x.mean(axis=0)
        m2 = ((x - mean) ** 2).sum(axis=0)
        delta = mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    def apply(self, x: np.ndarray) -> np.ndarray:
        if not x.shape[1]:
            return x
        if self.count < 2:
            return np.zeros_like(x, np.float32)  # nothing known yet: every value is average
        std = np.sqrt(self.m2 / max(self.count - 1.0, 1.0))
        return ((x - self.mean) / np.where(std > 1e-6, std, 1.0)).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {"norm_count": np.array([self.count]), "norm_mean": self.mean.copy(), "norm_m2": self.m2.copy()}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        if "norm_count" in arrays:
            self.count = float(arrays["norm_count"][0])
            self.mean = np.array(arrays["norm_mean"], np.float64)
            self.m2 = np.array(arrays["norm_m2"], np.float64)
