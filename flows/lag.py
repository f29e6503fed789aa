"""Kafka lag as the flow itself sees it: `freshrec_source_kafka_lag{topic,partition}`.

Bytewax's Kafka source keeps its offsets in its recovery state and commits nothing, so Kafka's
own tools show no lag for the flow. Here each partition of the flow's Kafka source notes the next
offset it will read (a dict assignment per batch); one daemon thread per process asks the broker
for the high watermarks of those partitions at once, then every `interval_s`
(`FRESHREC_KAFKA_LAG_S`; network calls, never per event), and sets the gauge to high watermark
minus that offset. A partition noted for the first time wakes the thread at once, so a flow
started behind shows its whole backlog from its first batch, not nothing for an interval.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Optional

from prometheus_client import Gauge

log = logging.getLogger("freshrec.lag")

KAFKA_LAG = Gauge("freshrec_source_kafka_lag", "messages in a topic-partition the flow has not read yet: "
                  "high watermark minus the next offset it will read", ["topic", "partition"])
INTERVAL_S = 5.0

# (topic, partition) -> high watermark, by one network call each
Watermarks = Callable[[list[tuple[str, int]]], dict[tuple[str, int], int]]


class LagMonitor:
    """Positions noted by the partitions, high watermarks fetched by one thread, the gauge set."""

    def __init__(self, watermarks: Watermarks, interval_s: float = INTERVAL_S):
        self.watermarks = watermarks
        self.interval_s = interval_s
        self.positions: dict[tuple[str, int], int] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()  # a partition noted for the first time: read its lag now
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def note(self, topic: str, partition: int, next_offset: int) -> None:
        """The next offset the flow will read from `topic`/`partition` (cheap: call it per batch)."""
        tp = (topic, partition)
        new = tp not in self.positions
        self.positions[tp] = next_offset
        if new:
            self._wake.set()
            self._start()

    def forget(self, topic: str, partition: int) -> None:
        """A partition that is closed; when none is left, the thread stops (and closes its consumer)."""
        self.positions.pop((topic, partition), None)
        if not self.positions:
            self.stop()

    def refresh(self) -> dict[tuple[str, int], int]:
        """Query the high watermarks now and set the gauge; returns the lags."""
        positions = dict(self.positions)
        if not positions:
            return {}
        highs = self.watermarks(sorted(positions))
        lags = {}
        for tp, high in highs.items():
            if tp not in positions:
                continue
            lag = max(0, high - positions[tp])
            KAFKA_LAG.labels(tp[0], str(tp[1])).set(lag)
            lags[tp] = lag
        return lags

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive() and self._stop.is_set():
                self._thread.join()  # stopping (a flow ended, another starts in this process): let it end
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="freshrec-kafka-lag", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()  # before reading, so a partition noted meanwhile wakes the next round
                try:
                    self.refresh()
                except Exception as e:  # a broker hiccup must not stop the flow  # noqa: BLE001
                    log.warning("Kafka lag: cannot read high watermarks (%s)", e)
                self._wake.wait(self.interval_s)
        finally:
            close = getattr(self.watermarks, "close", None)
            if close is not None:
                close()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


def broker_watermarks(brokers: str, settings: dict[str, str], timeout_s: float = 5.0) -> Watermarks:
    """A `Watermarks` function on a consumer of its own (it never joins a group or commits)."""
    state: dict = {}

    def query(tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        from confluent_kafka import Consumer, TopicPartition

        if "consumer" not in state:
            state["consumer"] = Consumer({"bootstrap.servers": brokers, "group.id": "freshrec-lag",
                                          "enable.auto.commit": "false", **settings})
        c = state["consumer"]
        return {(t, p): c.get_watermark_offsets(TopicPartition(t, p), timeout=timeout_s, cached=False)[1]
                for t, p in tps}

    def close() -> None:
        c = state.pop("consumer", None)
        if c is not None:
            c.close()

    query.close = close  # type: ignore[attr-defined]
    return query


_MONITORS: dict[str, LagMonitor] = {}
_MONITORS_LOCK = threading.Lock()


def monitor_for(brokers: str, settings: dict[str, str], interval_s: float = INTERVAL_S) -> LagMonitor:
    """One monitor (one thread, one consumer) per process and cluster."""
    with _MONITORS_LOCK:
        m = _MONITORS.get(brokers)
        if m is None:
            m = _MONITORS[brokers] = LagMonitor(broker_watermarks(brokers, settings), interval_s)
        return m
