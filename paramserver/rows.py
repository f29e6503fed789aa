"""What travels from the training tables to the serving store: changed rows and evictions.

The one shape both sides agree on: the training `ParameterStore` produces `RowBatch`es of the
rows touched since the last sync, and `DeltaSync` hands them to the serving store's one writer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RowBatch:
    """The rows of one slot that changed since the last sync, and the ids evicted meanwhile.

    `values[i]` is the current row of `ids[i]` (float32, shape (n, dim)); `versions[i]` its row
    version (grows by one per update); `earliest_arrival[i]` the arrival time of the earliest
    action behind the updates since the last sync (NaN when unknown), so freshness can be measured
    at the serving store. `updated_at` is the wall time of the newest update in the batch.
    """

    slot: str
    dim: int
    ids: list[str]
    values: np.ndarray
    versions: np.ndarray
    earliest_arrival: np.ndarray
    updated_at: float
    evicted: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.values.shape != (n, self.dim) or self.values.dtype != np.float32:
            raise ValueError(f"slot {self.slot!r}: values must be float32 of shape ({n}, {self.dim}), "
                             f"not {self.values.dtype} {self.values.shape}")
        if len(self.versions) != n or len(self.earliest_arrival) != n:
            raise ValueError(f"slot {self.slot!r}: versions and earliest_arrival need {n} entries")


@dataclass
class DenseBlob:
    """The dense weights of the model, as named float32 arrays, with a version that only grows."""

    version: int
    arrays: dict[str, np.ndarray]
    updated_at: float


@dataclass
class WorkingRows:
    """The rows of one slot that a trainer takes out for several sequential steps at once
    (`ParameterStore.pull_working`), and hands back with `write_working`.

    `values` and `state` (optimizer state, float32 (m, state width)) are copies of the `m` rows the
    ids touch; `index[i]` is the row of `ids[i]` among them (colliding ids of a hashed table share
    one). `sightings[i]` is in how many of the steps `ids[i]` appears; the id reads zeros and takes
    no update in its first `ready[i]` sightings (it is not admitted yet), and in all of them when
    `ready[i] == sightings[i]`. `unadmitted` counts those sightings. The rest is the table's
    bookkeeping, for the write-back.
    """

    slot: str
    ids: list[str]
    index: np.ndarray
    values: np.ndarray
    state: np.ndarray
    sightings: np.ndarray
    ready: np.ndarray
    optimizer: object
    unadmitted: int = 0
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # table row of each (0: none)
    owner: object = None  # the table the rows came from
    epoch: int = 0  # the owner's evictions count when they were taken
