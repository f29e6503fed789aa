"""simulate.open_loop: the open-loop simulator's rate on one core, on a virtual clock that moves
only when it would sleep, so it generates and writes as fast as it can (to files, in a temporary
folder). An absolute figure: actions decided per second, with ~5 feature events each."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator

from bench import Figure, benchmark
from flows.config import Config
from flows.outputs import FileEventOutput
from flows.simulate import OpenLoop, World


class VirtualClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


@benchmark("simulate.open_loop")
def open_loop(quick: bool) -> Iterator[Figure]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Config.from_env({}, data_dir=tmp, state_dir=tmp)
        out = FileEventOutput(config, "bench")
        clock = VirtualClock()
        loop = OpenLoop(World(seed=1), out, rate=20_000, clock=clock, sleep=clock.sleep)
        t0 = time.perf_counter()
        stats = loop.run(2.0 if quick else 10.0)
        elapsed = time.perf_counter() - t0
        out.close()
    yield Figure("simulate.open_loop", stats.decided / elapsed, "actions/s")
    yield Figure("simulate.open_loop_features", stats.features / elapsed, "events/s")
