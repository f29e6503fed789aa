"""The flow's Prometheus metrics, under the contract's names (`freshrec_<part>_<what>[_<unit>]`).

Steps keep plain counts and publish them here once per batch, never per event, through labelled
children they look up once (`.labels()` takes a lock and builds a tuple each call).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge

from flows.joiner import JoinCounts

_JOIN_COUNTERS = {
    "impressions": ("freshrec_join_impressions", "feature events accepted as impressions"),
    "positives": ("freshrec_join_matched", "impressions matched by a positive action"),
    "explicit_negatives": ("freshrec_join_explicit_negatives", "impressions resolved by skip or dislike"),
    "expired_kept": ("freshrec_join_expired_kept", "expired impressions kept as weighted negatives"),
    "sampled_out": ("freshrec_join_sampled_out", "expired impressions sampled out (no example)"),
    "after_example": ("freshrec_join_after_example_actions", "actions for a key already resolved"),
    "late": ("freshrec_join_late_actions", "actions whose key's state was already gone"),
    "duplicates": ("freshrec_join_duplicate_actions", "repeated actions (same event_id or identical)"),
    "duplicate_features": ("freshrec_join_duplicate_features", "feature events for a key already seen"),
    "orphans": ("freshrec_join_orphan_actions", "actions dead-lettered with no feature event"),
    "cache_hits": ("freshrec_join_cache_hits", "join key lookups answered by the cache"),
    "cache_misses": ("freshrec_join_cache_misses", "join key lookups not in the cache"),
    "spill_writes": ("freshrec_join_spill_writes", "join entries written to or deleted from LMDB"),
    "spill_reads": ("freshrec_join_spill_reads", "join entries looked up in LMDB"),
    "flushes": ("freshrec_join_flushes", "write transactions of join state"),
}

JOIN = {name: Counter(metric, doc, ["worker"]) for name, (metric, doc) in _JOIN_COUNTERS.items()}
WAITING = Gauge("freshrec_join_waiting_impressions", "join keys waiting, by where they are",
                ["worker", "bucket", "where"])
WATERMARK_LAG = Gauge("freshrec_join_watermark_lag_seconds", "wall time minus a bucket's watermark",
                      ["worker", "bucket"])
EVENTS_BEHIND = Counter("freshrec_join_events_behind_watermark",
                        "events that reached a bucket with a ts already behind its watermark", ["worker"])
CACHE_HIT_RATIO = Gauge("freshrec_join_cache_hit_ratio", "join key lookups answered by the cache, of all",
                        ["worker"])
DEAD_LETTERS = Counter("freshrec_source_dead_letters", "inputs dead-lettered, by stream and kind of reason",
                       ["stream", "reason"])
CATALOG = {
    "items_loaded": Counter("freshrec_sync_catalog_items_loaded",
                            "catalog entries read from the serving store the first time the flow touched them", ["worker"]),
    "users_loaded": Counter("freshrec_sync_catalog_users_loaded",
                            "users' recent actions read from the serving store on first touch", ["worker"]),
    "rewound": Counter("freshrec_sync_catalog_rewound",
                       "catalog entries whose counts a resume set back to its snapshot's", ["worker"]),
    "inexact": Counter("freshrec_sync_catalog_inexact",
                       "catalog entries whose counts a resume could not set back exactly (their history was "
                       "shorter than the resume's distance; raise FRESHREC_UNDO_KEEP)", ["worker"]),
}
EVENTS_READ = Counter("freshrec_source_events", "valid events read, by stream", ["stream"])


class Children:
    """The labelled children of metrics, each looked up on first use and kept (a child appears in
    the output from its first use, as with `.labels()`, so nothing shows that never happened)."""

    def __init__(self) -> None:
        self._kept: dict[tuple, Any] = {}

    def __call__(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._kept.get(key)
        if child is None:
            child = self._kept[key] = metric.labels(*labels)
        return child


class CatalogPublisher:
    """Publishes the growth of a catalog's counts since the last call."""

    def __init__(self, worker: str):
        self.worker = worker
        self.last: dict[str, int] = {}
        self.child = Children()

    def publish(self, counts: dict[str, int]) -> None:
        for name, counter in CATALOG.items():
            delta = counts[name] - self.last.get(name, 0)
            if delta > 0:
                self.child(counter, self.worker).inc(delta)
        self.last = dict(counts)


class JoinPublisher:
    """Publishes the growth of a bucket's counts since the last call."""

    def __init__(self, worker: str):
        self.worker = worker
        self.last = JoinCounts().as_dict()
        self.child = Children()

    def publish(self, counts: JoinCounts) -> None:
        now = counts.as_dict()
        if now == self.last:
            return  # a batch that changed nothing (a marker alone) publishes nothing
        last = self.last
        for name, counter in JOIN.items():
            delta = now[name] - last[name]
            if delta > 0:
                self.child(counter, self.worker).inc(delta)
        self.last = now
        looked = now["cache_hits"] + now["cache_misses"]
        if looked:
            self.child(CACHE_HIT_RATIO, self.worker).set(now["cache_hits"] / looked)


MAX_REASONS = 32  # distinct reason labels per process; the rest count as "other"
_reasons: dict[str, str] = {}


def reason_class(reason: str) -> str:
    """A dead letter's reason without its particulars, as a bounded label value:
    "missing field user_id", "invalid field ts", "not JSON", "not UTF-8", "ts from the future"."""
    label = _reasons.get(reason)
    if label is None:
        head = reason.split(":", 1)[0].strip()
        if head.startswith("invalid field "):  # a nested field may be named by the input: cut it
            head = head.split(".", 1)[0].split("[", 1)[0]
        head = head[:48] or "other"
        label = head if head in _reasons.values() or len(set(_reasons.values())) < MAX_REASONS else "other"
        if len(_reasons) < 10_000:
            _reasons[reason] = label
    return label
