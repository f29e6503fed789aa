"""The flow's sources: JSON Lines files (the embedded default) and Kafka, as Bytewax sources.

Both emit `SourceBatch`es: parsed events, dead letters, and the partition's clock (progress, idle,
ended) in band. A partition is fixed when the flow is built, so the clock knows the full set.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Optional

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from flows.clock import ENDED, NO_TS, PartitionClock, SourceBatch
from flows.config import Config
from flows.events import parse_many
from flows.lag import LagMonitor, monitor_for
from flows.streams import SUFFIX, split_lines

POLL_S = 0.05  # how often an idle file partition looks for new bytes and new files
HOLD_S = 0.01  # how soon a partition paused by `Alignment` looks again
Clock = Callable[[], float]


def _at(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)


def file_partitions(stream: str, count: int) -> list[str]:
    return [f"{stream}-{i}" for i in range(count)]


def owner_of(file_name: str, count: int) -> int:
    """The partition that owns a file: a stable hash of its name, so files created later have one."""
    return zlib.crc32(file_name.encode()) % count


class Alignment:
    """Event-time alignment of the partitions of the join's streams in one process (what Flink
    calls watermark alignment): a partition that has read more than `max_lead_s` seconds of event
    time past the slowest partition still reading pauses until that one catches up.

    Why: the join holds every impression until the watermark, the slowest partition's progress,
    passes its due, and every action that comes before its impression. A reader that runs ahead
    adds what it reads ahead to the join state. One did: a read of at most
    `FRESHREC_SOURCE_BATCH_BYTES` holds about 1 s of event time of the loop benchmark's actions but
    0.12 s of its feature events (five per action, larger ones), and with a backlog on both the
    flow read one action per 3.0 feature events where one per 5 was written. Aligned, it reads
    them 1 to 5.4, the join spills and reads back less LMDB (spill reads 240k against 367k by
    the same point of a run) and makes about 12% more examples in the measured minute. The price under
    an overload: an action waits in the backlog with its impression instead of in the join state.

    Only a partition with a backlog (its last read found new input) can hold others back: one
    that has read everything there is is not slow, only quiet, and holds no one. Partitions in
    other processes (`-i/-a`) are not seen: each process aligns its own. Thread-safe (workers of
    one process share it)."""

    def __init__(self, max_lead_s: float):
        self.max_lead_s = max_lead_s
        self._reading: dict[str, float] = {}  # partitions whose last read found input: their progress
        self._lock = threading.Lock()
        self.holds = 0  # polls paused, for tests and tuning

    def reading(self, name: str, progress: float) -> None:
        """`name` read input and may have more; `progress` is its clock's."""
        with self._lock:
            if progress > NO_TS:
                self._reading[name] = progress

    def quiet(self, name: str) -> None:
        """`name` read everything there is (or ended, or closed): it holds no one back."""
        with self._lock:
            self._reading.pop(name, None)

    def ahead(self, name: str, progress: float) -> bool:
        """Whether `name`, at `progress`, must pause: it leads the slowest reading partition by
        more than `max_lead_s`."""
        if self.max_lead_s <= 0 or progress == NO_TS:
            return False
        with self._lock:
            slowest = min((p for n, p in self._reading.items() if n != name), default=None)
        if slowest is None or progress <= slowest + self.max_lead_s:
            return False
        self.holds += 1
        return True


class _ClockedPartition:
    """What both sources' partitions do with what they read: parse it and stamp the clock."""

    stream: str
    name: str
    max_future_s: float
    clock: PartitionClock
    align: Optional[Alignment] = None
    _wake: float | None = None
    _done: bool = False

    def _held(self, now: float) -> bool:
        """Whether `Alignment` pauses this partition now (it then looks again in `HOLD_S`; its
        clock is left alone: a paused partition is not idle)."""
        if self.align is None or not self.align.ahead(self.name, self.clock.progress):
            return False
        self._wake = now + HOLD_S
        return True

    def _emit(self, lines: list[bytes], arrivals: float | list[float], now: float) -> list[SourceBatch]:
        events, dead = parse_many(self.stream, lines, arrivals, self.max_future_s)
        self.clock.observe(events, now)
        self._wake = None
        if self.align is not None:
            self.align.reading(self.name, self.clock.progress)
        return [SourceBatch(self.stream, self.name, events, dead, self.clock.progress, self.clock.status, now)]

    def _nothing_new(self, now: float) -> list[SourceBatch]:
        """Poll again soon; tell the buckets when this partition turns idle."""
        self._wake = now + POLL_S
        self._forget()
        if self.clock.observe((), now):
            return [SourceBatch(self.stream, self.name, [], [], self.clock.progress, self.clock.status, now)]
        return []

    def _finish(self, now: float) -> list[SourceBatch]:
        """The end of this partition's input, said in band; the next call stops."""
        self._done = True
        self.clock.end()
        self._forget()
        return [SourceBatch(self.stream, self.name, [], [], self.clock.progress, ENDED, now)]

    def _forget(self) -> None:
        """Holds no one back (nothing new to read, the end, or closed)."""
        if self.align is not None:
            self.align.quiet(self.name)

    def next_awake(self) -> Optional[datetime]:
        return None if self._wake is None else _at(self._wake)


class _FilePartition(_ClockedPartition, StatefulSourcePartition[SourceBatch, dict]):
    """Reads the files of one stream that hash to this partition, as bytes, from saved offsets."""

    def __init__(self, stream: str, directory: Path, index: int, count: int, follow: bool,
                 batch_bytes: int, idle_s: float, max_future_s: float,
                 offsets: dict[str, int] | None, now: Clock):
        self.stream = stream
        self.name = f"{stream}-{index}"
        self.directory = directory
        self.index, self.count = index, count
        self.follow = follow
        self.batch_bytes = batch_bytes
        self.max_future_s = max_future_s
        self.now = now
        self.offsets: dict[str, int] = dict(offsets or {})
        self.clock = PartitionClock(idle_s, now())
        self._files: dict[str, object] = {}
        # Without follow, the input is what exists now: each file up to its size at start.
        self._ends: dict[str, int] | None = None if follow else self._sizes()
        self._last_scan = 0.0

    def _owned(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(SUFFIX) and owner_of(n, self.count) == self.index)

    def _sizes(self) -> dict[str, int]:
        sizes = {}
        for n in self._owned():
            try:
                sizes[n] = os.path.getsize(self.directory / n)
            except FileNotFoundError:
                continue
        return sizes

    def _read_some(self) -> list[bytes]:
        """Up to `batch_bytes` of whole lines from the first file that has new bytes."""
        if self._ends is not None:
            names = list(self._ends)
        else:
            now = self.now()
            if now - self._last_scan >= POLL_S or not self.offsets:
                self._last_scan = now
                for n in self._owned():
                    self.offsets.setdefault(n, 0)
            names = list(self.offsets)
        for n in names:
            offset = self.offsets.get(n, 0)
            end = self._ends[n] if self._ends is not None else None
            if end is not None and offset >= end:
                continue
            f = self._files.get(n)
            if f is None:
                try:
                    f = self._files[n] = open(self.directory / n, "rb")
                except FileNotFoundError:
                    self.offsets.pop(n, None)
                    continue
            want = self.batch_bytes if end is None else min(self.batch_bytes, end - offset)
            f.seek(offset)
            chunk = f.read(want)
            if not chunk:
                continue
            final = end is not None and offset + len(chunk) >= end
            lines, used = split_lines(chunk, final=final)
            if used == 0 and len(chunk) == want and not final:
                # One line longer than a batch: read on to its end; the parser rejects it for size.
                more = f.readline()
                if more.endswith(b"\n") or (end is not None and offset + len(chunk) + len(more) >= end):
                    lines, used = [chunk + more.rstrip(b"\n")], len(chunk) + len(more)
            if used:
                self.offsets[n] = offset + used
            if lines:
                return lines
            if end is not None and self.offsets.get(n, 0) >= end:
                f.close()
                del self._files[n]
        return []

    def next_batch(self) -> list[SourceBatch]:
        if self._done:
            raise StopIteration()
        if self._held(self.now()):
            return []
        lines = self._read_some()
        now = self.now()
        if lines:
            return self._emit(lines, now, now)
        if self._ends is not None:
            return self._finish(now)  # everything that existed at start is read
        return self._nothing_new(now)

    def snapshot(self) -> dict:
        return {"offsets": dict(self.offsets), "progress": self.clock.progress}

    def close(self) -> None:
        self._forget()
        for f in self._files.values():
            f.close()  # type: ignore[attr-defined]
        self._files.clear()


class FileStreamSource(FixedPartitionedSource[SourceBatch, dict]):
    """A stream's folder of JSON Lines files as `count` partitions; state is `{file: offset}`."""

    def __init__(self, stream: str, config: Config, now: Clock = time.time, align: Optional[Alignment] = None):
        self.stream = stream
        self.directory = config.stream_dir(stream)
        self.count = config.file_partitions
        self.config = config
        self.now = now
        self.align = align

    def list_parts(self) -> list[str]:
        return file_partitions(self.stream, self.count)

    def build_part(self, step_id: str, for_part: str, resume_state: dict | None) -> _FilePartition:
        index = int(for_part.rsplit("-", 1)[1])
        c = self.config
        part = _FilePartition(self.stream, self.directory, index, self.count, c.follow,
                              c.source_batch_bytes, c.idle_s, c.max_future_s,
                              (resume_state or {}).get("offsets"), self.now)
        if resume_state:
            part.clock.progress = resume_state.get("progress", part.clock.progress)
        part.align = self.align
        return part


KAFKA_BATCH = 1000  # messages per consume call at most (as Bytewax's KafkaSource)


class KafkaReader:
    """One topic partition, read with confluent-kafka directly from an offset, which is its state.

    Bytewax's `KafkaSource` partition (whose listing and state this keeps: the next offset, or
    OFFSET_BEGINNING) made a dataclass of eight fields for every message, with a call per field,
    and parsed librdkafka's statistics every second: a tenth of the Kafka loop flow. Here each
    message gives its error, value and timestamp, and the batch its last offset.
    """

    def __init__(self, brokers: str, settings: dict[str, str], topic: str, part_idx: int,
                 offset: Optional[int], batch_size: int = KAFKA_BATCH):
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.topic, self.part_idx, self.batch_size = topic, part_idx, batch_size
        self.offset = OFFSET_BEGINNING if offset is None else offset
        # Assigned, not subscribed: no consumer group (the id is required, and unused).
        self.consumer = Consumer({"group.id": "freshrec-ignored", "enable.auto.commit": "false",
                                  "enable.partition.eof": "false", "bootstrap.servers": brokers, **settings})
        try:
            self.consumer.assign([TopicPartition(topic, part_idx, self.offset)])
        except BaseException:
            self.consumer.close()
            raise

    def snapshot(self) -> Optional[int]:
        return self.offset

    def next_batch(self) -> list:
        """The messages there are (librdkafka's `Message`s, none erroneous), at most `batch_size`."""
        msgs = self.consumer.consume(self.batch_size, 0.001)
        for m in msgs:
            if m.error() is not None:
                raise RuntimeError(f"error consuming from Kafka topic {self.topic!r} partition "
                                   f"{self.part_idx}: {m.error()}")
        if msgs:
            self.offset = msgs[-1].offset() + 1  # resume from the next message, not this one
        return msgs

    def close(self) -> None:
        self.consumer.close()


class _KafkaPartition(_ClockedPartition, StatefulSourcePartition[SourceBatch, Optional[int]]):
    """A topic partition (`KafkaReader`), wrapped: parse values, stamp arrival times and the clock.

    Without follow mode it ends at the offset that was the end when it started.
    """

    def __init__(self, stream: str, name: str, inner: KafkaReader,
                 bounds: Optional[tuple[int, int]], idle_s: float, max_future_s: float, now: Clock,
                 lag: Optional[tuple[LagMonitor, str, int]] = None):
        self.stream = stream
        self.lag = lag  # (monitor, topic, partition): where the next offset to read is noted
        self.name = name
        self.inner = inner
        # (low, high) watermark offsets at start; None in follow mode.
        self.low, self.end = bounds if bounds is not None else (0, None)
        self.max_future_s = max_future_s
        self.now = now
        self.clock = PartitionClock(idle_s, now())

    def next_batch(self) -> list[SourceBatch]:
        from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME

        if self._done:
            raise StopIteration()
        now = self.now()
        if self._held(now):
            return []
        position = self.inner.snapshot()
        if position is None or position < 0:  # OFFSET_BEGINNING: not read yet
            position = self.low
        if self.lag is not None:
            monitor, topic, part = self.lag
            monitor.note(topic, part, position)
        if self.end is not None and position >= self.end:
            return self._finish(now)
        try:
            msgs = self.inner.next_batch()
        except StopIteration:
            return self._finish(now)
        if self.end is not None and msgs and msgs[-1].offset() >= self.end:
            end = self.end  # written after start: not this run's input
            msgs = [m for m in msgs if m.offset() < end]
        lines: list[bytes] = [m.value() or b"" for m in msgs]
        arrivals: list[float] = []
        for m in msgs:
            ts_type, ts_ms = m.timestamp()
            arrivals.append(ts_ms / 1000.0 if ts_type == TIMESTAMP_LOG_APPEND_TIME else now)
        if lines:
            return self._emit(lines, arrivals, now)
        return self._nothing_new(now)

    def snapshot(self) -> Optional[int]:
        return self.inner.snapshot()

    def close(self) -> None:
        self._forget()
        self.inner.close()
        if self.lag is not None:
            monitor, topic, part = self.lag
            monitor.forget(topic, part)  # the last partition gone: the monitor's thread and consumer end


class KafkaStreamSource(FixedPartitionedSource[SourceBatch, Optional[int]]):
    """A topic through Bytewax's `KafkaSource`; offsets live in Bytewax's recovery state."""

    def __init__(self, stream: str, config: Config, topic: str | None = None, now: Clock = time.time,
                 align: Optional[Alignment] = None):
        from bytewax.connectors.kafka import KafkaSource

        self.stream = stream
        self.align = align
        self.topic = topic or config.topic(stream)
        self.config = config
        self.now = now
        self.settings = config.kafka_settings()
        # Tail always: the end is decided here (the offsets at start), not by librdkafka's EOF,
        # which moves while producers write.
        self.inner = KafkaSource([config.brokers], [self.topic], tail=True,
                                 add_config=dict(self.settings), raise_on_errors=True)
        self._parts: list[str] | None = None

    def list_parts(self) -> list[str]:
        if self._parts is None:
            self._parts = self.inner.list_parts()
        return self._parts

    def bounds(self, part_idx: int) -> tuple[int, int]:
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.config.brokers, "group.id": "freshrec-offsets",
                             "enable.auto.commit": "false", **self.settings})
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, part_idx), timeout=30)
        finally:
            consumer.close()
        return low, high

    def build_part(self, step_id: str, for_part: str, resume_state: Optional[int]) -> _KafkaPartition:
        part_idx = int(for_part.split("-", 1)[0])
        inner = KafkaReader(self.config.brokers, self.settings, self.topic, part_idx, resume_state)
        bounds = None if self.config.follow else self.bounds(part_idx)
        c = self.config
        lag = (monitor_for(c.brokers, self.settings, c.kafka_lag_s), self.topic, part_idx)
        part = _KafkaPartition(self.stream, f"{self.stream}-{part_idx}", inner, bounds, c.idle_s,
                               c.max_future_s, self.now, lag)
        part.align = self.align
        return part


def make_source(stream: str, config: Config, align: Optional[Alignment] = None) -> FixedPartitionedSource:
    """`align`: shared by the sources of the join's streams (see `Alignment`)."""
    if config.source == "kafka":
        return KafkaStreamSource(stream, config, align=align)
    return FileStreamSource(stream, config, align=align)


def partition_names(stream: str, config: Config, source: FixedPartitionedSource) -> list[str]:
    """The names this stream's partitions carry in their batches (the clock's partition set)."""
    if isinstance(source, KafkaStreamSource):
        return [f"{stream}-{p.split('-', 1)[0]}" for p in source.list_parts()]
    return file_partitions(stream, config.file_partitions)
