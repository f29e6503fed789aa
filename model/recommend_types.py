"""What the model server asks of a recommender, so the HTTP layer and the ranking code meet here.

No TensorFlow, no numpy: the server's request handling and its tests import only this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Protocol


class Served(NamedTuple):
    """One recommended item: its score and the features the model used (for the feature event).
    A NamedTuple, not a dataclass: a request makes k of them, and a frozen dataclass costs three
    times as much to make. The default dicts are shared: read them only."""

    item_id: str
    score: float
    sparse: dict[str, Any] = {}
    dense: dict[str, float] = {}


@dataclass(frozen=True, slots=True)
class Recommendation:
    items: list[Served]
    model_version: str
    cold_start: bool = False  # the user is unknown (or no model yet): popular and fresh items
    # The user-side features the model used (e.g. `recent_author`), logged in every feature event
    # of the request beside the item's own, so training sees what serving saw.
    user_sparse: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Health:
    params_version: int  # of the serving store the recommender has applied; only grows
    dense_version: int
    items: int  # items in the in-memory index
    freshness_ms: Optional[float]  # of the newest applied update (its rows' earliest arrival to commit)
    staleness_ms: Optional[float]  # age of the newest update the store holds


class Recommender(Protocol):
    def recommend(self, user_id: str, k: int) -> Recommendation:
        """The top `k` items for `user_id`, best first; an unknown user gets a cold-start list."""
        ...

    def refresh(self) -> int:
        """Brings the in-memory item vectors up to the serving store; returns the items recomputed."""
        ...

    def health(self) -> Health:
        ...
