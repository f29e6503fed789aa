"""Synthetic users with hidden tastes, for load (open loop) and for learning (closed loop).

A seeded `World` holds a catalog (items with an author and tags) and users; every item and user
has a hidden latent vector, and a user acts positively on a shown item with probability
sigmoid(scale * taste . item + bias). `OpenLoop` writes items, feature and action events to the
streams at a target rate, playing a naive model server itself; `ClosedLoop` asks a running model
server for recommendations over HTTP and POSTs what its users do. Imports no Bytewax.

Label delays (`World.delays`): a mixture. With probability 1 - `tail_p` (0.95) a lognormal with
median 4 s and sigma 0.9 (most labels within seconds); otherwise a Pareto tail with scale 30 s
and shape 0.7, capped at 6 h. Quantiles: p50 ~4 s, p90 ~17 s, p99 ~5 min, p99.9 ~2 h; about 0.2 % after an hour. Skips come
while scrolling: lognormal, median 2 s, sigma 0.6.
"""

from __future__ import annotations

import heapq
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import msgspec
import numpy as np

from flows.config import Config
from flows.events import ActionEvent, FeatureEvent, ItemEvent
from flows.outputs import EventOutput, stamp

POSITIVE_KINDS = ("finish", "like", "share", "comment")
POSITIVE_WEIGHTS = np.array([0.5, 0.3, 0.1, 0.1])


def _normalise(m: np.ndarray) -> np.ndarray:
    return m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class World:
    """A seeded catalog and user population with hidden tastes that drift, growing over time.

    Everything random comes from the seed, in separate streams: building the world, evolving it
    (`advance`), and the delays; so two runs with the same seed and the same calls agree, whatever
    a model server answers in between. Decisions take their own generator (`decide(..., rng)`).

    >>> w = World(seed=3, n_users=10, n_items=20, n_authors=4, n_tags=6, dim=8)
    >>> w.item_event(0, 1764288000.0).sparse["author"] == World(3, 10, 20, 4, 6, 8).item_event(0, 1.0).sparse["author"]
    True
    """

    def __init__(self, seed: int = 7, n_users: int = 1000, n_items: int = 2000, n_authors: int = 100,
                 n_tags: int = 40, dim: int = 16, *, scale: float = 7.0, bias: float = -4.0,
                 skip_p: float = 0.15, drift_per_hour: float = 0.3, new_items_per_s: float = 0.2,
                 new_users_per_s: float = 0.1, start_ts: Optional[float] = None, step_s: float = 1.0,
                 tail_p: float = 0.05):
        if min(n_users, n_items, n_authors, n_tags, dim) < 1:
            raise ValueError("a world needs at least one user, item, author, tag and dimension")
        self.seed = seed
        self.dim = dim
        self.scale, self.bias, self.skip_p = scale, bias, skip_p
        self.drift_per_hour = drift_per_hour
        self.new_items_per_s, self.new_users_per_s = new_items_per_s, new_users_per_s
        self.step_s = step_s
        self.tail_p = tail_p
        build, evolve, delays = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
        self._build, self._evolve, self._delays = build, evolve, delays
        self._lock = threading.Lock()
        self.author_vecs = build.normal(0, 1, (n_authors, dim))
        self.tag_vecs = build.normal(0, 1, (n_tags, dim))
        self.tag_names = [f"t{i}" for i in range(n_tags)]
        self.item_author = np.zeros(0, dtype=np.int64)
        self.item_tags: list[list[int]] = []
        self.item_vecs = np.zeros((0, dim))
        self.item_duration = np.zeros(0)
        self.item_weight = np.zeros(0)  # popularity, for the naive server's `popular` lists
        self.item_ts: list[float] = []
        self.tastes = np.zeros((0, dim))
        self.user_weight = np.zeros(0)  # how often a user comes back
        self.clock = time.time() if start_ts is None else float(start_ts)
        self._new_items(n_items, build, self.clock)
        self._new_users(n_users, build)

    # -- the population -------------------------------------------------------------------------

    @property
    def n_items(self) -> int:
        return len(self.item_tags)

    @property
    def n_users(self) -> int:
        return len(self.tastes)

    @staticmethod
    def item_id(i: int) -> str:
        return f"v{i}"

    @staticmethod
    def user_id(u: int) -> str:
        return f"u{u}"

    def item_index(self, item_id: str) -> Optional[int]:
        """The index of a World item id, or None for an id this world never made."""
        if item_id[:1] != "v" or not item_id[1:].isdigit():
            return None
        i = int(item_id[1:])
        return i if i < self.n_items else None

    def _new_items(self, n: int, rng: np.random.Generator, ts: float) -> list[int]:
        if n <= 0:
            return []
        n_authors, n_tags = len(self.author_vecs), len(self.tag_vecs)
        # Authors and tags are Zipf-like: a few prolific authors, a few common tags.
        authors = rng.choice(n_authors, n, p=_zipf(n_authors))
        tag_p = _zipf(n_tags)
        counts = rng.integers(1, 4, n)
        tags = [sorted(set(rng.choice(n_tags, c, p=tag_p).tolist())) for c in counts]
        vecs = np.stack([self.author_vecs[a] + 0.8 * self.tag_vecs[t].sum(axis=0) for a, t in zip(authors, tags, strict=True)])
        vecs = _normalise(vecs + 0.5 * rng.normal(0, 1, vecs.shape))
        start = self.n_items
        self.item_author = np.concatenate([self.item_author, authors])
        self.item_tags += tags
        self.item_vecs = np.vstack([self.item_vecs, vecs])
        self.item_duration = np.concatenate([self.item_duration, np.round(rng.uniform(5, 180, n), 1)])
        self.item_weight = np.concatenate([self.item_weight, rng.pareto(1.2, n) + 0.05])
        self.item_ts += [ts] * n
        return list(range(start, start + n))

    def _new_users(self, n: int, rng: np.random.Generator) -> None:
        if n <= 0:
            return
        # A taste leans towards two tags and an author, plus something of its own.
        n_tags, n_authors = len(self.tag_vecs), len(self.author_vecs)
        t = rng.integers(0, n_tags, (n, 2))
        a = rng.integers(0, n_authors, n)
        tastes = self.tag_vecs[t].sum(axis=1) + 0.6 * self.author_vecs[a] + 0.7 * rng.normal(0, 1, (n, self.dim))
        self.tastes = np.vstack([self.tastes, _normalise(tastes)])
        self.user_weight = np.concatenate([self.user_weight, rng.pareto(1.5, n) + 0.2])

    def item_event(self, i: int, ts: Optional[float] = None) -> ItemEvent:
        """Item `i` as an item event (its author, tags and duration)."""
        return ItemEvent(item_id=self.item_id(i), ts=self.item_ts[i] if ts is None else ts,
                         sparse=self.item_sparse(i), dense={"duration_s": float(self.item_duration[i])})

    def item_sparse(self, i: int) -> dict:
        return {"author": f"a{int(self.item_author[i])}", "tags": [self.tag_names[t] for t in self.item_tags[i]]}

    def catalog(self, ts: Optional[float] = None) -> list[ItemEvent]:
        """Every item as an item event."""
        return [self.item_event(i, ts) for i in range(self.n_items)]

    # -- time -----------------------------------------------------------------------------------

    def start_at(self, ts: float) -> None:
        """Set the clock to `ts` without evolving: a run starts the world at its own start time."""
        with self._lock:
            self.clock = float(ts)

    def advance(self, ts: float) -> list[ItemEvent]:
        """Move the world's clock to `ts` in whole steps of `step_s`: tastes drift (a random walk
        on the unit sphere, `drift_per_hour` per sqrt(hour)), new users and new items arrive
        (Poisson). Returns the new items' events. The same calls give the same world."""
        with self._lock:
            steps = int((ts - self.clock) // self.step_s)
            if steps <= 0:
                return []
            self.clock += steps * self.step_s
            dt = steps * self.step_s
            rng = self._evolve
            sigma = self.drift_per_hour * math.sqrt(dt / 3600.0) / math.sqrt(self.dim)
            if sigma > 0:
                self.tastes = _normalise(self.tastes + rng.normal(0, sigma, self.tastes.shape))
            self._new_users(int(rng.poisson(self.new_users_per_s * dt)), rng)
            new = self._new_items(int(rng.poisson(self.new_items_per_s * dt)), rng, self.clock)
            return [self.item_event(i) for i in new]

    # -- behaviour ------------------------------------------------------------------------------

    def p_positive(self, users: np.ndarray | int, items: np.ndarray, tastes: Optional[np.ndarray] = None
                   ) -> np.ndarray:
        """P(positive) of users (shape n, or one user) for items (shape n x k, or k); `tastes`
        instead of the users' current ones, when given (a snapshot taken earlier)."""
        tastes = self.tastes[users] if tastes is None else tastes
        v = self.item_vecs[items]
        dots = (v @ tastes) if tastes.ndim == 1 else np.einsum("nd,nkd->nk", tastes, v)
        return _sigmoid(self.scale * dots + self.bias)

    def delays(self, n: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """Seconds from an impression to a positive action: see the module's docstring."""
        rng = self._delays if rng is None else rng
        body = rng.lognormal(math.log(4.0), 0.9, n)
        tail = np.minimum(30.0 * (1.0 - rng.random(n)) ** (-1 / 0.7), 6 * 3600.0)
        return np.where(rng.random(n) < self.tail_p, tail, body)

    def skip_delays(self, n: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        rng = self._delays if rng is None else rng
        return rng.lognormal(math.log(2.0), 0.6, n)

    def decide(self, users: np.ndarray | int, items: np.ndarray, rng: np.random.Generator,
               skip_p: Optional[float] = None, tastes: Optional[np.ndarray] = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What users do with shown items: (kind, delay_s, p) arrays shaped like `items`, where
        kind is -1 for nothing (the impression expires), 0 for skip, 1.. for POSITIVE_KINDS."""
        with self._lock:
            p = self.p_positive(users, items, tastes)
        skip_p = self.skip_p if skip_p is None else skip_p
        u = rng.random(p.shape)
        positive = u < p
        # A skip is decided by the same draw, so a user who likes an item never also skips it.
        skip = ~positive & (u > 1.0 - (1.0 - p) * skip_p)
        kinds = rng.choice(len(POSITIVE_KINDS), p.shape, p=POSITIVE_WEIGHTS) + 1
        kind = np.where(positive, kinds, np.where(skip, 0, -1))
        n = p.size
        delay = np.where(positive, self.delays(n, rng).reshape(p.shape), self.skip_delays(n, rng).reshape(p.shape))
        return kind, delay, p

    def mean_p(self, sample: int = 20000, popular: bool = False, seed: int = 0) -> float:
        """P(positive) of a random user for a random (or popularity-weighted) item."""
        rng = np.random.default_rng(seed)
        users = rng.choice(self.n_users, sample, p=self.user_weight / self.user_weight.sum())
        items = (rng.choice(self.n_items, sample, p=self.item_weight / self.item_weight.sum()) if popular
                 else rng.integers(0, self.n_items, sample))
        with self._lock:
            return float(np.mean(self.p_positive(users, items[:, None])))

    def pick_users(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Users who come to ask, by their activity."""
        w = self.user_weight
        return rng.choice(len(w), n, p=w / w.sum())

    def naive_lists(self, n: int, k: int, rng: np.random.Generator, popular: bool = False) -> np.ndarray:
        """n lists of k distinct items: uniformly random, or weighted by popularity."""
        k = min(k, self.n_items)
        if popular:
            w = self.item_weight
            lists = rng.choice(len(w), (n, k), p=w / w.sum())
        else:
            lists = rng.integers(0, self.n_items, (n, k))
        s = np.sort(lists, axis=1)
        for r in np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1)):
            lists[r] = rng.choice(self.n_items, k, replace=False)
        return lists

    def best_lists(self, users: np.ndarray, k: int, candidates: int = 0,
                   rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """Taste-aware lists: the k items of highest P(positive) for each user (among `candidates`
        random items when given, as a retrieval stage would)."""
        out = []
        with self._lock:
            for u in np.atleast_1d(users):
                pool = (rng.choice(self.n_items, candidates, replace=False)
                        if candidates and rng is not None else np.arange(self.n_items))
                p = self.p_positive(int(u), pool)
                out.append(pool[np.argsort(-p, kind="stable")[:k]])
        return np.array(out)


def _zipf(n: int, s: float = 0.8) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def skip_rate_for(actions_per_impression: float, mean_positive: float) -> float:
    """The skip probability (of impressions not liked) that gives `actions_per_impression`."""
    if mean_positive >= actions_per_impression:
        return 0.0
    return min(1.0, (actions_per_impression - mean_positive) / (1.0 - mean_positive))


# -- open loop ----------------------------------------------------------------------------------

@dataclass
class OpenLoopStats:
    requests: int = 0
    features: int = 0
    decided: int = 0  # actions users decided on (written now, or pending until due)
    actions: int = 0  # actions written
    positives: int = 0
    items: int = 0
    pending_at_end: int = 0
    flushed: int = 0
    elapsed_s: float = 0.0
    max_behind_s: float = 0.0  # how far generation fell behind the schedule at worst

    @property
    def action_rate(self) -> float:
        """Actions decided per second: the rate held (written ones lag by their delays)."""
        return self.decided / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def feature_rate(self) -> float:
        return self.features / self.elapsed_s if self.elapsed_s else 0.0


class OpenLoop:
    """Writes item, feature and action events at `rate` actions per second of wall time.

    It plays a naive model server: each request shows `k` random (or popular) items to a user,
    one feature event per item (position = rank, the item's features, no score); requests come at
    rate * impressions_per_action / k per second, and skips are calibrated so that about one
    impression in `impressions_per_action` gets an action. Event time is wall time; an action's
    ts is its impression's plus its delay, and it is written when due. Writes are batched per tick.
    """

    def __init__(self, world: World, output: EventOutput, *, rate: float, impressions_per_action: float = 5.0,
                 k: int = 5, popular: bool = False, seed: int = 0, tick_s: float = 0.05,
                 run_id: Optional[str] = None, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep):
        if rate <= 0 or impressions_per_action < 1 or k < 1:
            raise ValueError("rate must be > 0, impressions_per_action >= 1 and k >= 1")
        self.world, self.output = world, output
        self.rate, self.k, self.popular = rate, k, popular
        self.request_rate = rate * impressions_per_action / k
        self.skip_p = skip_rate_for(1.0 / impressions_per_action, world.mean_p(popular=popular, seed=seed))
        self.rng = np.random.default_rng([seed, 17])
        self.tick_s = tick_s
        self.run_id = run_id or secrets.token_hex(3)
        self.model_version = "naive-popular" if popular else "naive-random"
        self.clock, self.sleep = clock, sleep  # a virtual clock runs it as fast as it can (bench)
        self.pending: list[tuple[float, int, ActionEvent]] = []
        self._seq = 0
        self._sparse: list[dict] = []
        self._dense: list[dict] = []

    def run(self, duration_s: float, *, flush_pending: bool = False,
            progress: Optional[Callable[[OpenLoopStats], None]] = None) -> OpenLoopStats:
        stats = OpenLoopStats()
        t0 = self.clock()
        self.world.start_at(t0)
        catalog = self.world.catalog(ts=t0)
        stamp(catalog)
        self.output.write("items", catalog)
        stats.items = len(catalog)
        per_tick_cap = max(1, int(self.request_rate * 0.5))
        while True:
            now = self.clock()
            elapsed = now - t0
            if elapsed >= duration_s:
                break
            due = int(elapsed * self.request_rate) - stats.requests
            if due > 0:
                n = min(due, per_tick_cap)
                stats.max_behind_s = max(stats.max_behind_s, (due - n) / self.request_rate)
                self._requests(stats, t0, n, now)
            self._write_due(stats, now)
            if progress is not None:
                progress(stats)
            spare = self.tick_s - (self.clock() - now)
            if spare > 0:
                self.sleep(spare)
        self._write_due(stats, self.clock())
        stats.elapsed_s = self.clock() - t0
        stats.pending_at_end = len(self.pending)
        if flush_pending and self.pending:
            rest = [a for _, _, a in sorted(self.pending)]
            self.pending.clear()
            stamp(rest)
            self.output.write("actions", rest)
            stats.flushed = len(rest)
            stats.actions += len(rest)
        if progress is not None:
            progress(stats)
        return stats

    def _requests(self, stats: OpenLoopStats, t0: float, n: int, now: float) -> None:
        world, rng, k = self.world, self.rng, self.k
        first = stats.requests
        new_items = world.advance(now)
        if new_items:
            stamp(new_items, now)
            self.output.write("items", new_items)
            stats.items += len(new_items)
        users = world.pick_users(n, rng)
        lists = world.naive_lists(n, k, rng, self.popular)
        kind, delay, _ = world.decide(users, lists, rng, skip_p=self.skip_p)
        sparse, dense = self._sparse, self._dense  # one dict per item, shared by its feature events
        sparse += [world.item_sparse(i) for i in range(len(sparse), world.n_items)]
        dense += [{"duration_s": float(world.item_duration[i])} for i in range(len(dense), world.n_items)]
        features = []
        pending, push = self.pending, heapq.heappush
        mv, run = self.model_version, self.run_id
        users_l, lists_l, kind_l, delay_l = users.tolist(), lists.tolist(), kind.tolist(), delay.tolist()
        for j in range(n):
            ts = t0 + (first + j) / self.request_rate
            rid = f"o{run}-{first + j}"
            uid = f"u{users_l[j]}"
            row_kind, row_delay = kind_l[j], delay_l[j]
            for pos, item in enumerate(lists_l[j]):
                iid = f"v{item}"
                features.append(FeatureEvent(request_id=rid, user_id=uid, item_id=iid, ts=ts, position=pos,
                                             sparse=sparse[item], dense=dense[item], model_version=mv,
                                             received_at=now))
                kd = row_kind[pos]
                if kd >= 0:
                    act = POSITIVE_KINDS[kd - 1] if kd else "skip"
                    ats = ts + row_delay[pos]
                    value = float(world.item_duration[item]) if act == "finish" else None
                    self._seq += 1
                    push(pending, (ats, self._seq, ActionEvent(request_id=rid, user_id=uid, item_id=iid, ts=ats,
                                                               action=act, value=value, event_id=f"{rid}/{iid}")))
                    stats.positives += kd > 0
                    stats.decided += 1
        self.output.write("features", features)
        stats.requests += n
        stats.features += len(features)

    def _write_due(self, stats: OpenLoopStats, now: float) -> None:
        pending, pop = self.pending, heapq.heappop
        due = []
        while pending and pending[0][0] <= now:
            due.append(pop(pending)[2])
        if due:
            stamp(due, now)
            self.output.write("actions", due)
            stats.actions += len(due)


# -- closed loop --------------------------------------------------------------------------------

@dataclass
class RequestRecord:
    """One recommendation request and what its user did with it."""

    index: int
    user_id: str
    request_id: str
    t: float  # wall seconds since the run started
    served: int
    positives: int
    skips: int
    unknown: int  # items this world does not know (counted as served, never positive)
    model_version: str
    latency_s: float


@dataclass
class Window:
    start_s: float
    end_s: float
    requests: int
    served: int
    positives: int
    hits: int  # requests with at least one positive (hit@k)

    @property
    def hit_rate(self) -> float:
        return self.positives / self.served if self.served else 0.0

    @property
    def hit_at_k(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


@dataclass
class SimStats:
    """What a closed-loop run saw: every request in schedule order, and the action traffic."""

    k: int
    window_s: float
    records: list[RequestRecord] = field(default_factory=list)
    failed_requests: int = 0
    actions_posted: int = 0
    post_calls: int = 0
    retries: int = 0  # 503s (and connection errors) that were retried
    rejected: list[str] = field(default_factory=list)  # reasons of 400s
    pending_at_end: int = 0
    flushed: int = 0
    items_written: int = 0
    random_baseline: float = 0.0  # the expected hit rate of random lists in this world
    elapsed_s: float = 0.0  # so far, when on_tick is called; in all, at the end

    def last_complete_window(self) -> Optional[Window]:
        """The newest window that has ended (None before the first has)."""
        done = [w for w in self.windows() if w.end_s <= self.elapsed_s]
        return done[-1] if done else None

    def _sel(self, last: Optional[int]) -> list[RequestRecord]:
        recs = sorted(self.records, key=lambda r: r.index)
        return recs[-last:] if last else recs

    def hit_rate(self, last: Optional[int] = None) -> float:
        """The fraction of served items that got a positive action (over the last N requests)."""
        recs = self._sel(last)
        served = sum(r.served for r in recs)
        return sum(r.positives for r in recs) / served if served else 0.0

    def hit_at_k(self, last: Optional[int] = None) -> float:
        """The fraction of requests with at least one positive (over the last N requests)."""
        recs = self._sel(last)
        return sum(r.positives > 0 for r in recs) / len(recs) if recs else 0.0

    def windows(self, window_s: Optional[float] = None) -> list[Window]:
        """The timeline: one window per `window_s` of the run, by when each request was made."""
        w = window_s or self.window_s
        out: dict[int, Window] = {}
        for r in self.records:
            i = int(r.t // w)
            win = out.setdefault(i, Window(i * w, (i + 1) * w, 0, 0, 0, 0))
            win.requests += 1
            win.served += r.served
            win.positives += r.positives
            win.hits += r.positives > 0
        return [out[i] for i in sorted(out)]

    def by_request_count(self, chunk: int) -> list[float]:
        """Hit rate per consecutive `chunk` of requests in schedule order (the same in every run
        with the same seed, whatever the server's speed)."""
        recs = self._sel(None)
        out = []
        for i in range(0, len(recs), chunk):
            part = recs[i:i + chunk]
            served = sum(r.served for r in part)
            out.append(sum(r.positives for r in part) / served if served else 0.0)
        return out


class ServerError(RuntimeError):
    """The model server answered in a way the contract does not allow."""


class ClosedLoop:
    """Drives a running model server: users ask `GET /recommend`, decide on each item by their
    tastes, and their actions are POSTed to `/actions` in batches when due.

    The schedule is seeded: request i is made at `i / rate` s into the run, for a user drawn from
    the schedule's own generator, with the world advanced to that planned time and the user's
    taste taken then; the decision on each served item comes from a generator seeded by (seed, i,
    item). So a run with training on and one with training off see the same users at the same
    points, and the same item shown in the same request meets the same fate in both.
    The World's catalog goes to the items stream at the start, and new items as they arrive.
    """

    def __init__(self, world: World, base_url: str, config: Config, *, rate: float = 20.0, k: int = 10,
                 seed: int = 0, concurrency: int = 4, timeout_s: float = 10.0, post_every_s: float = 0.2,
                 window_s: float = 5.0, output: Optional[EventOutput] = None, write_items: bool = True,
                 max_retry_s: float = 60.0):
        if rate <= 0 or not 1 <= k <= 1000:
            raise ValueError("rate must be > 0 and k from 1 to 1000")
        self.world, self.base_url, self.config = world, base_url.rstrip("/"), config
        self.rate, self.k, self.seed = rate, k, seed
        self.concurrency, self.timeout_s, self.post_every_s = concurrency, timeout_s, post_every_s
        self.window_s, self.max_retry_s = window_s, max_retry_s
        self.write_items = write_items
        self._output = output
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pending: list[tuple[float, int, ActionEvent]] = []
        self._seq = 0
        self.stats = SimStats(k=k, window_s=window_s)

    def _session(self) -> Any:
        s = getattr(self._local, "session", None)
        if s is None:
            import requests

            s = self._local.session = requests.Session()
        return s

    def run(self, duration_s: float, on_tick: Optional[Callable[[SimStats], None]] = None,
            flush_pending: bool = False, stop: Optional[threading.Event] = None) -> SimStats:
        """Runs the schedule for `duration_s` (or until `stop` is set); `self.stats` is the live view."""
        from flows.outputs import open_output

        stats = self.stats = SimStats(k=self.k, window_s=self.window_s)
        output = self._output
        own_output = output is None and self.write_items
        if own_output:
            output = open_output(self.config, "sim")
        schedule = np.random.default_rng([self.seed, 23])
        start_ts = time.time()
        self.world.start_at(start_ts)
        stats.random_baseline = self.world.mean_p()
        try:
            if output is not None:
                catalog = self.world.catalog()
                stamp(catalog)
                output.write("items", catalog)
                stats.items_written += len(catalog)
            t0 = time.monotonic()
            n_total = int(duration_s * self.rate)
            futures: list[Future] = []
            next_post = next_tick = 0.0
            i = 0
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="sim-user") as pool:
                while i < n_total or futures:
                    if stop is not None and stop.is_set():
                        n_total = i  # no new requests; the ones under way finish
                    now = time.monotonic() - t0
                    while i < n_total and i / self.rate <= now and len(futures) < 4 * self.concurrency:
                        new = self.world.advance(start_ts + i / self.rate)
                        if new and output is not None:
                            stamp(new)
                            output.write("items", new)
                            stats.items_written += len(new)
                        user = int(self.world.pick_users(1, schedule)[0])
                        # The taste as at the planned time, whenever the worker gets to decide.
                        taste = self.world.tastes[user].copy()
                        futures.append(pool.submit(self._one_request, i, user, taste, t0))
                        i += 1
                    futures = [f for f in futures if not f.done() or self._collect(f, stats)]
                    if now >= next_post:
                        self._post_due(stats, time.time())
                        next_post = now + self.post_every_s
                    if on_tick is not None and now >= next_tick:
                        stats.elapsed_s = time.time() - start_ts
                        on_tick(stats)
                        next_tick = now + self.window_s
                    time.sleep(0.005 if i < n_total else 0.02)
            self._post_due(stats, time.time())
            stats.pending_at_end = len(self._pending)
            if flush_pending and self._pending:
                rest = [a for _, _, a in sorted(self._pending)]
                self._pending.clear()
                stats.flushed = len(rest)
                self._post(rest, stats)
            stats.elapsed_s = time.time() - start_ts
            if on_tick is not None:
                on_tick(stats)
        finally:
            if own_output and output is not None:
                output.close()
        return stats

    def _collect(self, f: Future, stats: SimStats) -> bool:
        """Record a finished request; returns False so the future leaves the list."""
        try:
            rec = f.result()
        except Exception:  # a request that failed (timeout, bad answer) is counted, not fatal
            stats.failed_requests += 1
            return False
        stats.records.append(rec)
        return False

    def _one_request(self, index: int, user: int, taste: np.ndarray, t0: float) -> RequestRecord:
        uid = self.world.user_id(user)
        sent = time.monotonic()
        r = self._session().get(f"{self.base_url}/recommend", params={"user_id": uid, "k": self.k},
                                timeout=self.timeout_s)
        if r.status_code != 200:
            raise ServerError(f"GET /recommend answered {r.status_code}: {r.text[:200]}")
        body = r.json()
        shown_ts = time.time()
        latency = time.monotonic() - sent
        rid = body["request_id"]
        items = [it["item_id"] for it in body.get("items", [])]
        known = [(pos, iid, idx) for pos, iid in enumerate(items) if (idx := self.world.item_index(iid)) is not None]
        positives = skips = 0
        actions = []
        for _pos, iid, idx in known:
            # Dice of their own per (request, item): the same item in the same request gets the
            # same fate in every run, wherever the server ranked it.
            rng = np.random.default_rng([self.seed, 29, index, idx])
            kind, delay, _ = self.world.decide(user, np.array([idx]), rng, tastes=taste)
            kd, d = int(kind[0]), float(delay[0])
            if kd >= 0:
                act = POSITIVE_KINDS[kd - 1] if kd else "skip"
                positives += kd > 0
                skips += kd == 0
                value = float(self.world.item_duration[idx]) if act == "finish" else None
                actions.append(ActionEvent(request_id=rid, user_id=uid, item_id=iid, ts=shown_ts + d,
                                           action=act, value=value, event_id=f"{rid}/{iid}"))
        with self._lock:
            for a in actions:
                self._seq += 1
                heapq.heappush(self._pending, (a.ts, self._seq, a))
        return RequestRecord(index=index, user_id=uid, request_id=rid, t=sent - t0, served=len(items),
                             positives=positives, skips=skips, unknown=len(items) - len(known),
                             model_version=str(body.get("model_version", "")), latency_s=latency)

    def _post_due(self, stats: SimStats, now: float) -> None:
        with self._lock:
            due = []
            while self._pending and self._pending[0][0] <= now:
                due.append(heapq.heappop(self._pending)[2])
        if due:
            self._post(due, stats)

    def _post(self, actions: Sequence[ActionEvent], stats: SimStats) -> None:
        """POST in batches of at most 1,000 (the contract's limit); 503 means retry after a pause."""
        for start in range(0, len(actions), 1000):
            batch = list(actions[start:start + 1000])
            body = msgspec.json.encode(batch)
            deadline = time.monotonic() + self.max_retry_s
            while True:
                try:
                    r = self._session().post(f"{self.base_url}/actions", data=body, timeout=self.timeout_s,
                                             headers={"Content-Type": "application/json"})
                except OSError:
                    r = None
                stats.post_calls += 1
                if r is not None and r.status_code == 202:
                    stats.actions_posted += int(r.json().get("accepted", len(batch)))
                    break
                if r is not None and r.status_code == 400:
                    stats.rejected.append(r.text[:500])
                    break
                if r is not None and r.status_code != 503:
                    raise ServerError(f"POST /actions answered {r.status_code}: {r.text[:200]}")
                if time.monotonic() > deadline:
                    raise ServerError(f"POST /actions: the action stream stayed down for {self.max_retry_s:.0f} s")
                stats.retries += 1
                time.sleep(_retry_after(r))


def _retry_after(r: Any) -> float:
    """Seconds to wait from a Retry-After header (seconds), bounded; 1 s when absent or odd."""
    try:
        return min(30.0, max(0.0, float(r.headers.get("Retry-After", "1"))))
    except (AttributeError, TypeError, ValueError):
        return 1.0
