"""dashboard.overhead: the flow's throughput with its metrics served and the dashboard polling
them, over its throughput with neither, as the median of the ratios of interleaved pairs of runs.

The flow runs in this process (`run_main`, files in, examples out, no trainer step) over the same
generated sample each time, from empty state. "On": the flow process's metrics server (the same
`MetricsServer` `FRESHREC_METRICS_PORT` starts, with the graph) and a `freshrec dashboard` child
process, as its defaults run it (at `--nice 10`, every second), started before the run and past
its first scrape (its start-up is not polling), stopped after. "Off": no server and no dashboard process at all. Pairs alternate their order
(off-on, on-off, ...) so a machine that slows down or speeds up hits both alike. The metric
updates themselves run in both (the flow has no switch for them): this measures serving and
scraping them.

Also reported: `dashboard.scrape_ms`, one `generate_latest` of the flow's registry after a run
(the flow process's own cost per scrape, holding the GIL), and `dashboard.cpu_share`, the
dashboard process's CPU time over the wall time of the "on" runs (share of one core).
"""

from __future__ import annotations

import os
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
from prometheus_client import REGISTRY, generate_latest

from bench import Figure, benchmark
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


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process `pid` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _first_scrape(url: str, timeout_s: float = 60.0) -> None:
    import json
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "healthz", timeout=5) as r:
            if json.loads(r.read())["scrapes"] >= 1:
                return
        time.sleep(0.05)
    raise RuntimeError("freshrec dashboard made no scrape")


@benchmark("dashboard.overhead", "dashboard.scrape_ms", "dashboard.cpu_share")
def dashboard_overhead(quick: bool) -> Iterator[Figure]:
    requests = 8_000 if quick else 40_000
    repeats = 4 if quick else 10
    root = Path(tempfile.mkdtemp(prefix="freshrec-bench-dash-"))
    port = _free_port()
    dash_cpu = dash_wall = 0.0
    try:
        counts = write_sample(root / "inputs", requests=requests, seed=1)
        events = counts.features + counts.actions + counts.items
        runs = [0]

        def one(served: bool) -> float:
            nonlocal dash_cpu, dash_wall
            runs[0] += 1
            run = root / f"run-{runs[0]}"
            (run / "data").mkdir(parents=True)
            for stream in ("features", "actions", "items"):
                (run / "data" / stream).symlink_to(root / "inputs" / stream)
            config = Config.from_env({}, data_dir=str(run / "data"), state_dir=str(run / "state"), train="0")
            flow = build_flow(config)
            server = dash = None
            try:
                if served:
                    server = MetricsServer(port, graph_of(flow))
                    dash = subprocess.Popen([sys.executable, "-m", "flows.cli", "dashboard", "--port", "0",
                                             "--targets", f"http://127.0.0.1:{port}/metrics",
                                             "--state-dir", str(run / "state")],
                                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                    line = dash.stdout.readline()
                    if not line.startswith("dashboard on"):
                        raise RuntimeError("freshrec dashboard did not start")
                    _first_scrape(line.split()[2])  # its lazy imports are start-up, not polling
                    cpu0 = _cpu_s(dash.pid)
                t0 = time.perf_counter()
                run_main(flow, epoch_interval=EPOCH)
                elapsed = time.perf_counter() - t0
                if dash is not None:
                    dash_cpu += _cpu_s(dash.pid) - cpu0
                    dash_wall += elapsed
                return elapsed
            finally:
                if dash is not None:
                    dash.kill()
                    dash.wait()
                if server is not None:
                    server.close()
                shutil.rmtree(run, ignore_errors=True)

        one(False)  # warm-up: imports, first LMDB environments
        on, off, ratios = [], [], []
        for i in range(repeats):
            if i % 2 == 0:
                t_off, t_on = one(False), one(True)
            else:
                t_on, t_off = one(True), one(False)
            on.append(t_on)
            off.append(t_off)
            ratios.append(t_off / t_on)  # throughput on over throughput off
        n, t0 = 50, time.perf_counter()
        for _ in range(n):
            generate_latest(REGISTRY)
        scrape_ms = (time.perf_counter() - t0) / n * 1e3
    finally:
        shutil.rmtree(root, ignore_errors=True)
    yield Figure("dashboard.overhead", events / statistics.median(on), "events/s",
                 "the same flow, no metrics server, no dashboard (ratio: median of interleaved pairs)",
                 events / statistics.median(off), statistics.median(ratios))
    yield Figure("dashboard.scrape_ms", scrape_ms, "ms")
    yield Figure("dashboard.cpu_share", dash_cpu / dash_wall if dash_wall else float("nan"), "cores")
