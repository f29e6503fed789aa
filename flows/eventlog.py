"""Event logs for processes outside the flow (the model server): append keyed JSON lines to a
stream, asynchronously, and learn when the stream has them. Imports no Bytewax.

A file log is a `StreamWriter` (its own file, named at start); a Kafka log is one producer whose
delivery reports become awaitable acknowledgements. Either raises `StreamDown` when the stream
cannot take the write, quickly rather than hanging, so an HTTP caller can answer 503.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from flows.config import Config
from flows.streams import StreamWriter

log = logging.getLogger(__name__)

PROBE_S = 0.5  # while the broker is down, an event log asks for it this often
CLOSE_FLUSH_S = 10.0  # a closing Kafka log waits at most this long for its last deliveries
Record = tuple[str, bytes]  # (message key, one JSON object without its newline)


class StreamDown(RuntimeError):
    """The stream did not take a write; the message says why. Nothing of the batch is acknowledged."""


class EventLog(Protocol):
    async def append(self, records: Sequence[Record], sync: bool = True) -> None:
        """Writes the batch; returns once the stream acknowledged all of it (Kafka: delivered;
        files: written, and with `sync` also fsynced), or raises StreamDown."""
        ...

    def healthy(self) -> bool:
        ...

    async def close(self) -> None:
        ...


class FileEventLog:
    """A stream folder of JSON Lines; this process's own file, opened on the first write (and again
    after a failure, so a folder that comes back is used again)."""

    def __init__(self, directory, tag: str, rotate_bytes: int = 64 << 20):
        self.directory = directory
        self.tag = tag
        self.rotate_bytes = rotate_bytes
        self._writer: StreamWriter | None = None
        self._lock = threading.Lock()
        self._down = False
        # One thread: writes of one log stay in order, and a slow disk never blocks the event loop.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"eventlog-{tag}")

    def _write(self, data: bytes, sync: bool) -> None:
        with self._lock:
            try:
                if self._writer is None:
                    self._writer = StreamWriter(self.directory, self.tag, self.rotate_bytes)
                self._writer.write_raw(data)
                if sync:
                    self._writer.flush()
                self._down = False
            except OSError as e:
                self._down = True
                if self._writer is not None:
                    try:
                        self._writer.close()
                    except OSError:
                        pass
                    self._writer = None
                raise StreamDown(f"cannot write {self.directory}: {e.strerror or e}") from None

    async def append(self, records: Sequence[Record], sync: bool = True) -> None:
        if not records:
            return
        data = b"".join(value + b"\n" for _key, value in records)
        await asyncio.get_running_loop().run_in_executor(self._pool, self._write, data, sync)

    def healthy(self) -> bool:
        return not self._down

    @property
    def path(self):
        return None if self._writer is None else self._writer.path

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                if self._writer is not None:
                    try:
                        self._writer.flush()
                        self._writer.close()
                    except OSError as e:
                        log.warning("closing %s: %s", self.directory, e)
                    self._writer = None

        await asyncio.get_running_loop().run_in_executor(self._pool, close)
        self._pool.shutdown(wait=True)


class _Batch:
    """Counts the delivery reports of one append; resolves its future on the event loop."""

    __slots__ = ("loop", "future", "left", "error")

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int):
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.left = n
        self.error: str | None = None

    def report(self, err: Any, _msg: Any) -> None:  # called in the poll thread
        if err is not None and self.error is None:
            self.error = err.str()
        self.left -= 1
        if self.left == 0:
            self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if self.future.done():
            return
        if self.error is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(StreamDown(self.error))


class KafkaEventLog:
    """One Kafka topic through one producer. A thread polls for delivery reports every few
    milliseconds (the producer's own linger batches the sends), so neither a request nor an event
    costs a flush. Messages time out after `delivery_timeout_ms` (librdkafka's message.timeout.ms):
    a dead broker fails the write then; once librdkafka reports every broker down, writes fail at
    once until a delivery succeeds again.
    """

    def __init__(self, brokers: str, topic: str, *, delivery_timeout_ms: int = 5000,
                 extra: dict[str, str] | None = None, poll_interval_s: float = 0.005, fail_fast: bool = True):
        from confluent_kafka import KafkaException, Producer

        self.topic = topic
        self.delivery_timeout_ms = delivery_timeout_ms
        # False: a write while the broker is down waits in the producer's queue (up to the
        # delivery timeout) instead of failing at once: for writes nobody waits on (feature events).
        self.fail_fast = fail_fast
        # Set when librdkafka reports every broker down or a delivery fails: for one delivery
        # timeout from then, writes fail at once instead of each waiting out the timeout.
        self._down_since: float | None = None
        self._last_error: str | None = None
        conf: dict[str, Any] = {
            "bootstrap.servers": brokers,
            "acks": "all",
            "linger.ms": 2,
            "message.timeout.ms": delivery_timeout_ms,
            "socket.connection.setup.timeout.ms": max(1000, min(delivery_timeout_ms, 30_000)),
            "error_cb": self._on_error,
            **(extra or {}),
        }
        self._producer = Producer(conf)
        self._kafka_exception = KafkaException
        self._stop = threading.Event()
        self._poll_interval_s = poll_interval_s
        self._thread = threading.Thread(target=self._poll, name=f"eventlog-{topic}", daemon=True)
        self._thread.start()

    def _on_error(self, err: Any) -> None:
        from confluent_kafka import KafkaError

        self._last_error = err.str()
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._down_since = time.monotonic()
        log.warning("kafka producer for %s: %s", self.topic, err.str())

    def _poll(self) -> None:
        last_probe = 0.0
        while not self._stop.is_set():
            self._producer.poll(self._poll_interval_s)
            if self._down_since is not None and time.monotonic() - last_probe > PROBE_S:
                last_probe = time.monotonic()
                self._probe()

    def _probe(self) -> None:
        """While writes fail fast, ask the broker for the topic's metadata: once every partition
        has a leader again, writes go through, instead of failing until the delivery timeout has
        passed since the last error (measured: the first 202 came 3.9 s after the broker was back)."""
        try:
            topic = self._producer.list_topics(self.topic, timeout=PROBE_S).topics.get(self.topic)
        except self._kafka_exception:
            return
        if topic is not None and topic.error is None and topic.partitions \
                and all(p.leader >= 0 for p in topic.partitions.values()):
            self._down_since = None

    def _down(self) -> bool:
        since = self._down_since
        return since is not None and time.monotonic() - since < self.delivery_timeout_ms / 1000

    async def append(self, records: Sequence[Record], sync: bool = True) -> None:
        if not records:
            return
        if self.fail_fast and self._down():
            raise StreamDown(f"Kafka is unreachable: {self._last_error}")
        batch = _Batch(asyncio.get_running_loop(), len(records))
        produced = 0
        try:
            for key, value in records:
                self._producer.produce(self.topic, value, key.encode(), on_delivery=self._reporter(batch))
                produced += 1
        except (BufferError, self._kafka_exception) as e:
            if produced == 0:
                raise StreamDown(f"Kafka producer refused the write: {e}") from None
            # What went already is reported through the batch; the rest failed.
            for _ in range(len(records) - produced):
                batch.report(_Refused(str(e)), None)
        await batch.future

    def _reporter(self, batch: _Batch):
        def report(err: Any, msg: Any) -> None:
            if err is None:
                self._down_since = None
            else:
                self._last_error = err.str()
                self._down_since = time.monotonic()
            batch.report(err, msg)
        return report

    def healthy(self) -> bool:
        return not self._down()

    async def close(self) -> None:
        def close() -> None:
            # Bounded: a log that buffers for minutes must not hold a stopping server that long.
            left = self._producer.flush(min(self.delivery_timeout_ms / 1000, CLOSE_FLUSH_S))
            if left:
                log.warning("kafka producer for %s closed with %d messages undelivered", self.topic, left)

        await asyncio.get_running_loop().run_in_executor(None, close)
        self._stop.set()
        self._thread.join()
        self._producer = None  # librdkafka's threads (and reconnects) end with the last reference


class _Refused:
    def __init__(self, text: str):
        self.text = text

    def str(self) -> str:
        return self.text


def open_event_log(stream: str, config: Config, tag: str = "serve") -> EventLog:
    """The stream's log for this process: its folder of files, or its Kafka topic. Feature events
    (nobody waits on them) wait out a broker's outage in the producer's queue, up to
    FRESHREC_SERVE_FEATURE_BUFFER_S; other writes fail fast (POST /actions answers 503)."""
    if config.source == "kafka":
        if stream == "features":
            return KafkaEventLog(config.brokers, config.topic(stream),
                                 delivery_timeout_ms=int(config.serve_feature_buffer_s * 1000),
                                 extra=config.kafka_settings(), fail_fast=False)
        return KafkaEventLog(config.brokers, config.topic(stream),
                             delivery_timeout_ms=config.serve_delivery_timeout_ms,
                             extra=config.kafka_settings())
    return FileEventLog(config.stream_dir(stream), tag, config.rotate_bytes)
