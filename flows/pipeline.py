"""The streaming job: `python -m bytewax.run flows.pipeline:flow`.

Reads the three input streams, validates them (dead letters to their stream), routes feature and
action events to join buckets with the clock's markers in band, and keeps each bucket's watermark.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Optional

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import Sink

from flows.clock import BucketBatch, BucketClock, SourceBatch, route
from flows.config import Config, ConfigError, ensure_state_dir
from flows.events import Event
from flows.sinks import make_sink
from flows.sources import make_source, partition_names

log = logging.getLogger("freshrec.flow")

JOIN_STREAMS = ("features", "actions")
FREE_RUN_TICK_S = 1.0  # how often a bucket wakes itself while its watermark follows the wall clock


@dataclass(slots=True)
class BucketTick:
    """What a bucket passes on: the events it got, and its watermark before and after them."""

    bucket: str
    events: list[Event]
    watermark_before: float
    watermark: float
    late: int  # events whose ts was already behind the bucket's watermark


class BucketClockLogic(StatefulBatchLogic[BucketBatch, BucketTick, dict]):
    """One join bucket's clock; the joiner takes its place and keeps the same clock."""

    def __init__(self, partitions: tuple[str, ...], lateness_s: float, state: Optional[dict]):
        # Bytewax tells a builder no key: the bucket learns it from its first batch.
        self.bucket = (state or {}).get("bucket", "")
        self.clock = BucketClock.resume(partitions, lateness_s, (state or {}).get("clock"))

    def on_batch(self, values: list[BucketBatch]) -> tuple[list[BucketTick], bool]:
        now = time.time()
        out = []
        for b in values:
            self.bucket = b.bucket
            before = self.clock.watermark
            late = sum(1 for e in b.events if e.ts < before)
            after = self.clock.observe(b.partition, b.progress, b.status, now)
            if b.events or after != before:
                out.append(BucketTick(self.bucket, b.events, before, after, late))
        return out, False

    def on_notify(self) -> tuple[list[BucketTick], bool]:
        before = self.clock.watermark
        after = self.clock.advance(time.time())
        return ([BucketTick(self.bucket, [], before, after, 0)] if after != before else []), False

    def notify_at(self) -> Optional[datetime]:
        if self.clock.free_running():
            return datetime.now(UTC) + timedelta(seconds=FREE_RUN_TICK_S)
        return None

    def snapshot(self) -> dict:
        return {"bucket": self.bucket, "clock": self.clock.state()}


def _dead_letters(batch: SourceBatch) -> list:
    return batch.dead


def _events(batch: SourceBatch) -> list:
    return batch.events


def build_flow(config: Config, *, tap: Sink | None = None,
               sources: dict[str, Any] | None = None) -> Dataflow:
    """The dataflow for `config`; `tap` receives each bucket's `BucketTick`s (tests, tools)."""
    ensure_state_dir(config)
    flow = Dataflow("freshrec")
    made = {s: (sources or {}).get(s) or make_source(s, config) for s in ("features", "actions", "items")}
    batches = {s: op.input(f"in_{s}", flow, src) for s, src in made.items()}

    everything = op.merge("all_batches", *batches.values())
    dead = op.flat_map("dead_letters", everything, _dead_letters)
    op.output("out_dead_letter", dead, make_sink("dead-letter", config))

    partitions = tuple(p for s in JOIN_STREAMS for p in partition_names(s, config, made[s]))
    join_in = op.merge("join_in", *(batches[s] for s in JOIN_STREAMS))
    keyed = op.flat_map("route", join_in, partial(route, buckets=config.buckets))
    ticks = op.stateful_batch(
        "buckets", keyed,
        lambda state: BucketClockLogic(partitions, config.lateness_s, state),
    )
    if tap is not None:
        op.output("tap", op.map("tick", ticks, lambda kv: kv[1]), tap)
    # Catalog updates go to the serving store in [serving]; until then they are validated only.
    op.flat_map("items", batches["items"], _events)
    return flow


def main_flow() -> Dataflow:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return build_flow(Config.from_env())
    except ConfigError as e:
        raise SystemExit(f"freshrec: configuration error: {e}") from None


def __getattr__(name: str) -> Any:
    # `flow` is built when bytewax.run asks for it, so importing this module reads no settings.
    if name == "flow":
        return main_flow()
    raise AttributeError(name)
