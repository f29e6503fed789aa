"""A small recommender implementing model/recommend_types.py's protocol, and an HTTP helper, for
the model server's tests."""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from flows.config import Config
from model.recommend_types import Health, Recommendation, Served


class ListRecommender:
    """Ranks a fixed catalog by a score that depends on the user, deterministically."""

    def __init__(self, n_items: int = 50, known_users: tuple[str, ...] = ("u1", "u2")):
        self.items = [f"v{i}" for i in range(n_items)]
        self.known = set(known_users)
        self.refreshes = 0
        self.version = 3
        self._lock = threading.Lock()

    def recommend(self, user_id: str, k: int) -> Recommendation:
        cold = user_id not in self.known
        salt = sum(map(ord, user_id)) % 7
        ranked = sorted(self.items, key=lambda i: (-(int(i[1:]) * 31 + salt) % 97, i))[:k]
        served = [Served(item_id=i, score=1.0 - n / (len(ranked) + 1),
                         sparse={"author": f"a{int(i[1:]) % 5}", "tags": ["t1", f"t{int(i[1:]) % 3}"]},
                         dense={"item_ctr_7d": int(i[1:]) / 100})
                  for n, i in enumerate(ranked)]
        user_sparse = {} if cold else {"recent_author": ["a1", "a2"]}
        return Recommendation(items=served, model_version=f"m{self.version}", cold_start=cold,
                              user_sparse=user_sparse)

    def refresh(self) -> int:
        with self._lock:
            self.refreshes += 1
        return 0

    def health(self) -> Health:
        return Health(params_version=self.version, dense_version=1, items=len(self.items),
                      freshness_ms=12.5, staleness_ms=None)


def build_list_recommender(config: Config, store: Any = None) -> ListRecommender:
    """A factory with the shape `freshrec serve` calls (used by the CLI test)."""
    return ListRecommender()


def call(base: str, method: str, path: str, body: bytes | str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One request; returns status, headers and the JSON body (or the text, if not JSON)."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        if isinstance(body, str):
            body = body.encode()
        hdrs = dict(headers or {})
        if body is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        hs = {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()
    try:
        return r.status, hs, json.loads(data)
    except ValueError:
        return r.status, hs, data.decode()


def wait_for(condition, timeout_s: float = 20.0, what: str = "condition"):
    """Polls until `condition()` is truthy (returns it); fails after a generous timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class StoreRecommender(ListRecommender):
    """Reports the version of the serving store it reads, as a real recommender does."""

    def __init__(self, store: Any):
        super().__init__()
        self.store = store

    def health(self) -> Health:
        return Health(params_version=self.store.params_version(), dense_version=self.store.dense_version(),
                      items=len(self.store.keys(b"item/")), freshness_ms=None, staleness_ms=None)


def build_store_recommender(config: Config, store: Any = None) -> StoreRecommender:
    if store is None:
        raise ValueError("this test recommender needs the replica's store (--replica)")
    return StoreRecommender(store)
