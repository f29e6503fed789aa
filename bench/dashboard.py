"""dashboard.overhead: the flow's throughput with its metrics served and the dashboard polling
them, over its throughput with neither, as the median of interleaved repeated runs.

The flow runs in this process (`run_main`, files in, examples out, no trainer step) over the same
generated sample each time, from empty state. "On": the flow process's metrics server (the same
`MetricsServer` `FRESHREC_METRICS_PORT` starts, with the graph) and a `freshrec dashboard` child
process scraping it every second, as the defaults do. "Off": no server; the dashboard's scrapes
of the closed port fail at once, outside this process.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from bytewax.testing import run_main

from bench import Figure, benchmark, compared
from flows.config import Config
from flows.observe import MetricsServer, graph_of
from flows.pipeline import build_flow
from flows.sample import write_sample

EPOCH = timedelta(seconds=10)
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@benchmark("dashboard.overhead")
def dashboard_overhead(quick: bool) -> Iterator[Figure]:
    requests = 8_000 if quick else 40_000
    repeats = 3 if quick else 7
    root = Path(tempfile.mkdtemp(prefix="freshrec-bench-dash-"))
    port = _free_port()
    dash = subprocess.Popen([sys.executable, "-m", "flows.cli", "dashboard", "--port", "0", "--interval", "1",
                             "--targets", f"http://127.0.0.1:{port}/metrics"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        counts = write_sample(root / "inputs", requests=requests, seed=1)
        events = counts.features + counts.actions + counts.items
        runs = [0]

        def one(served: bool) -> float:
            runs[0] += 1
            run = root / f"run-{runs[0]}"
            (run / "data").mkdir(parents=True)
            for stream in ("features", "actions", "items"):
                (run / "data" / stream).symlink_to(root / "inputs" / stream)
            config = Config.from_env({}, data_dir=str(run / "data"), state_dir=str(run / "state"), train="0")
            flow = build_flow(config)
            server = MetricsServer(port, graph_of(flow)) if served else None
            try:
                t0 = time.perf_counter()
                run_main(flow, epoch_interval=EPOCH)
                return time.perf_counter() - t0
            finally:
                if server is not None:
                    server.close()
                shutil.rmtree(run, ignore_errors=True)

        one(False)  # warm-up: imports, first LMDB environments
        on, off = [], []
        for _ in range(repeats):
            off.append(one(False))
            on.append(one(True))
    finally:
        dash.kill()
        dash.wait()
        shutil.rmtree(root, ignore_errors=True)
    yield compared("dashboard.overhead", "events/s", events / statistics.median(on),
                   "the same flow, no metrics server, no dashboard", events / statistics.median(off))
