"""Replays of public data sets onto the input streams, in event-time order: MovieLens-100K.

Every movie becomes an item event (genres as `tags`, release year and title as sparse fields),
dated one second before the first rating. Each rating becomes one feature event (its own
request_id, position 0, the movie's and the user's features: age, gender, occupation, the zip
code's first two digits) and one action event at the rating's timestamp: `like` for a rating of
4 or 5, else `skip`, with the rating as `value`. Timestamps stay the original ones (seconds since
the epoch, 1997-98), which the contract accepts. Imports no Bytewax.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

from flows.events import ActionEvent, FeatureEvent, ItemEvent
from flows.outputs import EventOutput, stamp

POSITIVE_RATING = 4.0


@dataclass
class ReplayStats:
    items: int = 0
    features: int = 0
    actions: int = 0
    positives: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0
    elapsed_s: float = 0.0


def _movie_sparse(row: list[str]) -> dict:
    title = row[1].strip() if len(row) > 1 else ""
    year = row[2].strip() if len(row) > 2 else ""
    genres = row[3].split() if len(row) > 3 else []
    sparse: dict = {"tags": genres, "year": year, "title": title[:128]}
    return {k: v for k, v in sparse.items() if v}


def _user_sparse(row: list[str]) -> dict:
    age, gender, occupation, zip_code = (row + ["", "", "", ""])[1:5]
    sparse = {"age": f"age{age}" if age else "", "gender": gender, "occupation": occupation, "zip": zip_code[:2]}
    return {k: v for k, v in sparse.items() if v}


def movielens_events(limit: Optional[int] = None
                     ) -> tuple[list[ItemEvent], Iterator[tuple[FeatureEvent, ActionEvent]], int]:
    """The catalog's item events, the (feature, action) pairs in timestamp order, and their count."""
    from model.datasets import movielens_100k_tables

    users, movies, ratings = movielens_100k_tables()
    if limit is not None:
        ratings = ratings[:limit]
    first = float(ratings[0][3]) if ratings else 1.0
    items = [ItemEvent(item_id=f"m{mid}", ts=max(first - 1.0, 1.0), sparse=_movie_sparse(row))
             for mid, row in movies.items()]
    movie_sparse = {mid: _movie_sparse(row) for mid, row in movies.items()}
    user_sparse = {uid: _user_sparse(row) for uid, row in users.items()}

    def pairs() -> Iterator[tuple[FeatureEvent, ActionEvent]]:
        for n, (user, movie, rating, ts) in enumerate(ratings):
            t, r = float(ts), float(rating)
            rid, uid, iid = f"ml{n}", f"u{user}", f"m{movie}"
            sparse = {**movie_sparse.get(movie, {}), **user_sparse.get(user, {})}
            yield (FeatureEvent(request_id=rid, user_id=uid, item_id=iid, ts=t, position=0, sparse=sparse,
                                model_version="movielens"),
                   ActionEvent(request_id=rid, user_id=uid, item_id=iid, ts=t,
                               action="like" if r >= POSITIVE_RATING else "skip", value=r, event_id=f"{rid}/a"))

    return items, pairs(), len(ratings)


def replay_movielens(output: EventOutput, *, speedup: float = 0.0, limit: Optional[int] = None,
                     batch: int = 5000, progress: Optional[Callable[[int], None]] = None,
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> ReplayStats:
    """Write MovieLens-100K to `output`: the catalog first, then the ratings in timestamp order.

    `speedup` X divides the event-time gaps (X = 60: a minute of the data per second); 0 writes as
    fast as possible. Events go out in batches of at most `batch` ratings, each batch once its
    last rating is due; `progress(n)` is told how many ratings each batch held.
    """
    if speedup < 0:
        raise ValueError("speedup must be >= 0 (0: as fast as possible)")
    stats = ReplayStats()
    t_start = clock()
    items, pairs, _ = movielens_events(limit)
    stamp(items)
    output.write("items", items)
    stats.items = len(items)
    features: list[FeatureEvent] = []
    actions: list[ActionEvent] = []
    ts0: Optional[float] = None
    wall0 = clock()

    def flush() -> None:
        stamp(features)
        output.write("features", features)
        stamp(actions)
        output.write("actions", actions)  # after their impressions, as a server would log them
        stats.features += len(features)
        stats.actions += len(actions)
        if progress is not None:
            progress(len(features))
        features.clear()
        actions.clear()

    for f, a in pairs:
        if ts0 is None:
            ts0 = stats.first_ts = f.ts
        if speedup > 0:
            due = wall0 + (f.ts - ts0) / speedup
            wait = due - clock()
            if wait > 0.01:  # a pause worth a system call; what is due sooner goes out now
                if features:
                    flush()  # what is due goes out before the pause
                sleep(wait)
        features.append(f)
        actions.append(a)
        stats.positives += a.action == "like"
        stats.last_ts = f.ts
        if len(features) >= batch:
            flush()
    if features:
        flush()
    stats.elapsed_s = clock() - t_start
    return stats
