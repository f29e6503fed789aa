"""A serving replica on another machine: its own LMDB serving store, fed by the `param-deltas` topic.

A new replica reads the compacted topic from the beginning (a full copy, since compaction keeps
the latest record of every key), then tails it. Records go through the store's one `apply`, in
batches; the consumed offsets are stored in the same transaction as the data they brought, so a
restarted replica resumes exactly where its store is. On a one-partition topic (the default) it
applies the primary's writes whole: it commits only up to a record marked as the end of a primary
write (header `freshrec-txn-end`), so its readers never see half of one (say, half a dense blob).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import Counter

from paramserver.records import Records
from paramserver.serving import TXN_END_HEADER, LmdbServingStore
from paramserver.sync import PARAMS_VERSION

__all__ = ["ParamDeltaReplica", "ReplicaError"]

log = logging.getLogger(__name__)

REPLICA_RECORDS = Counter("freshrec_sync_replica_records", "param-deltas records applied by a replica", ["store"])
_Q = struct.Struct(">Q")


class ReplicaError(RuntimeError):
    """The replica cannot follow the topic; the message says why."""


class ParamDeltaReplica:
    """Applies the `param-deltas` topic to `store` (opened with writer=True: the replica's store has
    this consumer as its one writer).

    `bootstrap()` reads up to the end offsets of the moment it starts and reports caught up;
    `run(stop_event)` bootstraps if needed, then tails until the event is set. `poll_once()` is one
    round, for callers with their own loop.
    """

    def __init__(
        self,
        store: LmdbServingStore,
        brokers: str,
        topic: str = "param-deltas",
        *,
        consumer_config: Mapping[str, Any] | None = None,
        batch_records: int = 20_000,
        poll_timeout_s: float = 0.1,
        max_pending_records: int = 500_000,
        marker_wait_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        if not store.writer:
            raise ReplicaError("a replica writes its store: open it with writer=True")
        self.store = store
        self.topic = topic
        self.batch_records = batch_records
        self.poll_timeout_s = poll_timeout_s
        self.max_pending_records = max_pending_records
        self.marker_wait_s = marker_wait_s
        self.clock = clock
        self.applied_records = 0
        self.caught_up = False
        conf: dict[str, Any] = {
            "bootstrap.servers": brokers,
            "group.id": f"freshrec-replica-{uuid.uuid4().hex}",  # never used: offsets live in the store
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 50,
        }
        conf.update(consumer_config or {})
        self._tp = TopicPartition
        self._consumer = Consumer(conf)
        try:
            meta = self._consumer.list_topics(topic, timeout=30)
            t = meta.topics.get(topic)
            if t is None or t.error is not None or not t.partitions:
                raise ReplicaError(f"topic {topic!r} is not there ({t.error if t is not None else 'unknown'}); "
                                   "create it (freshrec kafka start does) before starting a replica")
            self.partitions = sorted(t.partitions)
            stored = store.offsets(topic)
            self._consumer.assign([TopicPartition(topic, p, stored.get(p, OFFSET_BEGINNING)) for p in self.partitions])
        except BaseException:
            self._consumer.close()
            raise
        # Grouping by write holds only on one partition: a write's records spread over several.
        self.grouped = len(self.partitions) == 1
        self._applied = {p: stored.get(p, 0) for p in self.partitions}  # next offset after what is applied
        # (key, value, offset, the primary's version if the record ends one of its writes)
        self._pending: dict[int, list[tuple[bytes, bytes, int, int | None]]] = {p: [] for p in self.partitions}
        self._complete = dict.fromkeys(self.partitions, 0)  # pending records that end a primary write
        self._eof = dict.fromkeys(self.partitions, False)
        self._last_message = self.clock()
        self._m_records = REPLICA_RECORDS.labels(store.name)
        self._m_version = PARAMS_VERSION.labels(store.name)

    def end_offsets(self) -> dict[int, int]:
        """The topic's end offset (high watermark) per partition, now."""
        return {p: self._consumer.get_watermark_offsets(self._tp(self.topic, p), timeout=30)[1]
                for p in self.partitions}

    def lag(self) -> int:
        """Records between what the store holds and the end of the topic (compaction gaps count)."""
        return sum(max(0, end - self._applied[p]) for p, end in self.end_offsets().items())

    def bootstrap(self, timeout_s: float | None = 300.0, stop_event: threading.Event | None = None) -> int:
        """Applies the topic up to its end offsets of now (a full copy, for a new replica); returns
        the records applied. Raises ReplicaError after `timeout_s` (None: no limit); returns early,
        not caught up, if `stop_event` is set."""
        ends = self.end_offsets()
        deadline = None if timeout_s is None else self.clock() + timeout_s
        applied = 0
        while not self._reached(ends):
            if stop_event is not None and stop_event.is_set():
                return applied
            if deadline is not None and self.clock() > deadline:
                raise ReplicaError(f"replica of {self.topic!r} did not reach the end offsets {ends} in "
                                   f"{timeout_s} s (it is at {self._applied})")
            applied += self.poll_once()
        self.caught_up = True
        log.info("replica %s caught up with %s at %s (%d records)", self.store.path, self.topic, ends, applied)
        return applied

    def _reached(self, ends: Mapping[int, int]) -> bool:
        return all(self._applied[p] >= end or (self._eof[p] and not self._pending[p]) for p, end in ends.items())

    def poll_once(self, timeout_s: float | None = None) -> int:
        """Consumes what arrived (up to `batch_records`) and applies every whole write among it in
        one transaction; returns the records applied."""
        from confluent_kafka import KafkaError

        msgs = self._consumer.consume(self.batch_records, self.poll_timeout_s if timeout_s is None else timeout_s)
        now = self.clock()
        for m in msgs:
            err = m.error()
            p = m.partition()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._eof[p] = True
                    if not self._pending[p]:
                        self._applied[p] = max(self._applied[p], m.offset())
                    continue
                if err.fatal() or not err.retriable():
                    raise ReplicaError(f"consuming {self.topic!r}: {err.str()}")
                log.warning("consuming %s: %s", self.topic, err.str())
                continue
            marker = None
            headers = m.headers()
            if headers:
                for name, value in headers:
                    if name == TXN_END_HEADER:
                        marker = _Q.unpack(value)[0]
            pend = self._pending[p]
            pend.append((m.key(), m.value() or b"", m.offset(), marker))
            self._eof[p] = False
            self._last_message = now
            if marker is not None or not self.grouped:
                self._complete[p] = len(pend)
        return self._apply_ready(now)

    def _apply_ready(self, now: float) -> int:
        pairs: list[tuple[bytes, bytes]] = []
        offsets = {}
        source_version = None
        for p, pend in self._pending.items():
            n = self._complete[p]
            if n < len(pend) and (len(pend) > self.max_pending_records
                                  or (self._eof[p] and now - self._last_message >= self.marker_wait_s)):
                # The end of this write never came: compaction removed its marker (old history,
                # superseded anyway), or the primary stopped half-way. Apply what is there.
                n = len(pend)
            if not n:
                continue
            pairs.extend((k, v) for k, v, _, _ in pend[:n])
            offsets[p] = pend[n - 1][2] + 1
            markers = [mk for _, _, _, mk in pend[:n] if mk is not None]
            if markers:
                source_version = max(markers) if source_version is None else max(source_version, *markers)
            del pend[:n]
            self._complete[p] = 0
        if not pairs:
            return 0
        version = self.store.apply(Records.from_pairs(pairs),
                                   offsets={f"{self.topic}/{p}": off for p, off in offsets.items()},
                                   source_version=source_version)
        self._applied.update(offsets)
        self.applied_records += len(pairs)
        self._m_records.inc(len(pairs))
        self._m_version.set(version)
        return len(pairs)

    def run(self, stop_event: threading.Event) -> None:
        """Bootstraps (unless caught up already), then applies new records until `stop_event`."""
        if not self.caught_up:
            self.bootstrap(timeout_s=None, stop_event=stop_event)
        while not stop_event.is_set():
            self.poll_once()

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> ParamDeltaReplica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
