"""freshrec's benchmarks: `python -m bench [NAME ...] [--quick] [--json]`.

Each figure is measured against a baseline run in the same process on the same input, and reported
as a ratio; benchmarks assert nothing about time.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class HostCpu:
    """The machine's CPU time so far, in clock ticks over all CPUs (the first line of /proc/stat):
    busy, idle (iowait included) and stolen (time the hypervisor gave to other guests while this
    machine wanted a CPU). On a shared virtual machine the steal within a timed window tells how
    much of a bad latency figure came from the host rather than from the code."""

    busy: int
    idle: int
    steal: int

    @classmethod
    def parse(cls, text: str) -> HostCpu:
        line = text.split("\n", 1)[0].split()
        if not line or line[0] != "cpu":
            raise ValueError("no aggregate cpu line first in /proc/stat")
        # user nice system idle iowait irq softirq steal (guest time is in user already)
        user, nice, system, idle, iowait, irq, softirq, steal = ([int(x) for x in line[1:9]] + [0] * 8)[:8]
        return cls(busy=user + nice + system + irq + softirq, idle=idle + iowait, steal=steal)

    @classmethod
    def read(cls, path: str = "/proc/stat") -> Optional[HostCpu]:
        """Now, or None where the system has no /proc/stat."""
        try:
            return cls.parse(Path(path).read_text())
        except (OSError, ValueError):
            return None


def host_shares(before: Optional[HostCpu], after: Optional[HostCpu]) -> Optional[tuple[float, float]]:
    """(busy, stolen) shares of all the machine's CPU time between two readings; None without both
    or when no tick passed."""
    if before is None or after is None:
        return None
    busy, idle, steal = after.busy - before.busy, after.idle - before.idle, after.steal - before.steal
    total = busy + idle + steal
    if total <= 0:
        return None
    return busy / total, steal / total


def process_cpu_s(pid: int, thread: Optional[int] = None) -> Optional[float]:
    """CPU seconds (user + system) a process has used so far, all its threads, or one thread's
    (`thread`, a task id: the process's own id is its main thread); None where /proc does not say.
    A rate held on a shared machine moves with what else runs; the CPU an event costs the flow
    moves far less, so it shows a change that the rate's noise hides."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command's closing parenthesis: state is field 3, utime and stime fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_figures(prefix: str, shares: Optional[tuple[float, float]], suffix: str = "") -> Iterator[Figure]:
    """`<prefix>_host_busy<suffix>` and `<prefix>_host_steal<suffix>` from `host_shares`: percent of
    the machine's CPU time in a window that was busy, and that the hypervisor took; nothing where
    the system does not say."""
    if shares is not None:
        yield Figure(f"{prefix}_host_busy{suffix}", shares[0] * 100.0, "% of CPU")
        yield Figure(f"{prefix}_host_steal{suffix}", shares[1] * 100.0, "% of CPU")
