"""dashboard.overhead: the flow's throughput with its metrics served and the dashboard polling
them, over its throughput with neither, as the median of per-run ratios of interleaved runs.

The flow runs in this process (`run_main`, files in, examples out, no trainer step) over the same
generated sample each time, from empty state. "On": the flow process's metrics server (the same
`MetricsServer` `FRESHREC_METRICS_PORT` starts, with the graph) and one `freshrec dashboard` child
process, as its defaults run it (`--nice 10`, every second), past a scrape of this run's server
before the clock starts. The dashboard runs in a session of its own, as a service or a command in
another terminal does: with Linux's autogroup a child in this session would share the flow's
session's CPU share, out of which every millisecond it takes comes whatever its nice value (a nice
value weighs only within a session); `dashboard.cpu_share` is what that costs where it happens. "Off": no metrics server, and the dashboard process stopped (SIGSTOP: it
runs nothing, scrapes nothing; it is continued for the next "on" run, so its start-up, once,
before the first run, is not polling). The metric updates themselves run in both (the flow has no
switch for them; they are a few hundred calls per run, once per batch): this measures serving and
scraping them.

The runs go off, on, off, on, ..., off: each "on" run is set against the mean of the "off" runs
just before and after it, so a machine that slows down or speeds up steadily hits both alike, and
the figure is the median of those ratios, with their quartiles and their number beside it. On a
loaded machine one ratio can be off by 10 % either way: read the quartiles before the median.
Before the measured runs, one of each warms up imports, LMDB and the dashboard's first scrapes.
Each run starts after a random pause of up to a second: for an "on" run, a random point between
two scrapes.

Also reported: `dashboard.scrape_ms`, one `generate_latest` of the flow's registry after the runs
(the flow process's own CPU per scrape, holding the GIL), and `dashboard.cpu_share`, the dashboard
process's CPU time over the wall time of the "on" runs (share of one core).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from bytewax.testing import run_main
from prometheus_client import REGISTRY, generate_latest

from bench import Figure, benchmark, process_cpu_s
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
    cpu = process_cpu_s(pid)
    if cpu is None:
        raise RuntimeError(f"no CPU time for process {pid} in /proc")
    return cpu


def _scraped_since(url: str, since: float, timeout_s: float = 60.0) -> None:
    """Wait until the dashboard at `url` has scraped its (one) target successfully after `since`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "api/state?since=1e12", timeout=5) as r:
            target = json.loads(r.read())["targets"][0]
        if target["up"] and (target["last_ok"] or 0) > since:
            return
        time.sleep(0.02)
    raise RuntimeError("freshrec dashboard made no scrape")


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """First quartile, median, third quartile (inclusive method: defined from 1 value up)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def bracketed_ratios(off: list[float], on: list[float]) -> list[float]:
    """Throughput on over throughput off for each "on" run, against the mean of the "off" runs
    before and after it: runs went off[0], on[0], off[1], on[1], ..., off[n]; times in seconds."""
    if len(off) != len(on) + 1:
        raise ValueError("expected one more off run than on runs")
    return [(off[i] + off[i + 1]) / 2 / t for i, t in enumerate(on)]


@benchmark("dashboard.overhead", "dashboard.overhead_q1", "dashboard.overhead_q3", "dashboard.overhead_n",
           "dashboard.scrape_ms", "dashboard.cpu_share")
def dashboard_overhead(quick: bool) -> Iterator[Figure]:
    # Runs of ~1 s on an idle core, 3-5 s on the loaded machine (start-up ~0.2 s of it), as many
    # pairs as fit in the budget: on a quiet machine more, and less noisy ones.
    requests = 4_000 if quick else 10_000
    budget_s, least, most = (30.0, 4, 12) if quick else (480.0, 10, 200)
    phase = random.Random(7)
    root = Path(tempfile.mkdtemp(prefix="freshrec-bench-dash-"))
    port = _free_port()
    run = root / "run"  # one path for every run, so the one dashboard reads each run's serving store
    dash = None
    dash_cpu = dash_wall = 0.0
    try:
        counts = write_sample(root / "inputs", requests=requests, seed=1)
        events = counts.features + counts.actions + counts.items
        run.mkdir()
        dash = subprocess.Popen([sys.executable, "-m", "flows.cli", "dashboard", "--port", "0",
                                 "--targets", f"http://127.0.0.1:{port}/metrics", "--state-dir", str(run / "state")],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        line = dash.stdout.readline()
        if not line.startswith("dashboard on"):
            raise RuntimeError("freshrec dashboard did not start")
        dash_url = line.split()[2]
        dash.send_signal(signal.SIGSTOP)  # until the first "on" run

        def one(served: bool) -> float:
            nonlocal dash_cpu, dash_wall
            shutil.rmtree(run, ignore_errors=True)
            (run / "data").mkdir(parents=True)
            for stream in ("features", "actions", "items"):
                (run / "data" / stream).symlink_to(root / "inputs" / stream)
            config = Config.from_env({}, data_dir=str(run / "data"), state_dir=str(run / "state"), train="0")
            flow = build_flow(config)
            server = None
            try:
                if served:
                    server = MetricsServer(port, graph_of(flow))
                    since = time.time()
                    dash.send_signal(signal.SIGCONT)
                    _scraped_since(dash_url, since)
                # An "on" run starts at a random point between two scrapes (a run of T seconds then
                # sees T scrapes on average, not T rounded down); an "off" run waits as long, so
                # neither kind gets the machine after a pause the other does not.
                time.sleep(phase.random())
                cpu0 = _cpu_s(dash.pid)
                t0 = time.perf_counter()
                run_main(flow, epoch_interval=EPOCH)
                elapsed = time.perf_counter() - t0
                if served:
                    dash_cpu += _cpu_s(dash.pid) - cpu0
                    dash_wall += elapsed
                return elapsed
            finally:
                if served:
                    dash.send_signal(signal.SIGSTOP)
                if server is not None:
                    server.close()

        one(False)  # warm-up: imports, first LMDB environments, the dashboard's first scrapes
        one(True)
        dash_cpu = dash_wall = 0.0
        started = time.monotonic()
        off, on = [one(False)], []
        while len(on) < least or (len(on) < most and time.monotonic() - started < budget_s):
            on.append(one(True))
            off.append(one(False))
        ratios = bracketed_ratios(off, on)
        n, t0 = 50, time.perf_counter()
        for _ in range(n):
            generate_latest(REGISTRY)
        scrape_ms = (time.perf_counter() - t0) / n * 1e3
    finally:
        if dash is not None:
            dash.kill()
            dash.wait()
        shutil.rmtree(root, ignore_errors=True)
    q1, median, q3 = quartiles(ratios)
    yield Figure("dashboard.overhead", events / statistics.median(on), "events/s",
                 f"the same flow, no metrics server, dashboard stopped (ratio: median of {len(ratios)} runs, "
                 "each against the mean of the off runs around it)",
                 events / statistics.median(off), median)
    yield Figure("dashboard.overhead_q1", q1, "ratio")
    yield Figure("dashboard.overhead_q3", q3, "ratio")
    yield Figure("dashboard.overhead_n", len(ratios), "runs")
    yield Figure("dashboard.scrape_ms", scrape_ms, "ms")
    yield Figure("dashboard.cpu_share", dash_cpu / dash_wall if dash_wall else float("nan"), "cores")
