"""freshrec's benchmarks: `python -m bench [NAME ...] [--quick] [--json]`.

Each figure is measured against a baseline run in the same process on the same input, and reported
as a ratio; benchmarks assert nothing about time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Optional


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    baseline: Optional[str] = None
    baseline_value: Optional[float] = None
    ratio: Optional[float] = None

    def as_dict(self) -> dict:
        return asdict(self)


Bench = Callable[[bool], Iterator[Figure]]
REGISTRY: dict[str, Bench] = {}


def benchmark(*names: str) -> Callable[[Bench], Bench]:
    """Register a function that yields the figures `names` (it gets `quick`)."""

    def register(fn: Bench) -> Bench:
        for name in names:
            REGISTRY[name] = fn
        return fn

    return register


def rate(n: int, fn: Callable[[], object], repeats: int = 5) -> float:
    """Items per second of `fn` over `n` items: the median of `repeats` runs."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def interleaved(n: int, ours: Callable[[], object], base: Callable[[], object], repeats: int = 5, *,
                ours_spent: bool = False) -> tuple[float, float]:
    """Rates of `ours` and `base`, run alternately so that machine noise hits both alike.
    `ours_spent`: `ours` returns the seconds that count (it leaves out work not its own, such as a
    writer's that another process would do), rather than being timed whole."""
    a, b = [], []
    for _ in range(repeats):
        for fn, acc in ((base, b), (ours, a)):
            t0 = time.perf_counter()
            got = fn()
            acc.append(got if fn is ours and ours_spent else time.perf_counter() - t0)
    return n / statistics.median(a), n / statistics.median(b)


def compared(name: str, unit: str, value: float, baseline: str, baseline_value: float) -> Figure:
    return Figure(name, value, unit, baseline, baseline_value,
                  value / baseline_value if baseline_value else None)
