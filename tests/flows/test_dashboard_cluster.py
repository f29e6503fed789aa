"""`freshrec dashboard` over a two-process Bytewax cluster and over one process with two workers.

Files in follow mode, so the flow never ends; the dashboard finds the processes' metrics ports by
itself (`FRESHREC_METRICS_PORT` plus each process id, `--processes 2`). Once the input is read the
counters stop moving, and the dashboard's merged totals must equal the sum of what each process
serves on its own /metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest

from flows.dashboard import parse_metrics, total
from flows.processes import FlowProcess
from flows.sample import write_sample
from tests.flows.test_cluster import free_ports
from tests.flows.test_dashboard_browser import api_state, wait_for
from tests.flows.test_recovery import ROOT
from tests.helpers import config_for

pytestmark = pytest.mark.slow

COUNTERS = ("freshrec_join_matched_total", "freshrec_join_explicit_negatives_total", "freshrec_join_impressions_total")


def own_metrics(port: int) -> list:
    return parse_metrics(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())


def figures(samples: list) -> dict:
    out = {f"events/{k}": v for k, v in total(samples, "freshrec_source_events_total", "stream").items()}
    for name in COUNTERS:
        out[name] = sum(total(samples, name).values())
    return out


def run_and_merge(tmp_path: Path, runs: Sequence[Sequence[str]], processes: int) -> tuple[dict, list[dict], list]:
    """The flow as `runs` (one list of Bytewax flags per process) and a dashboard; once the input is
    read: the dashboard's state, each process's own figures, and each process's /info."""
    counts = write_sample(tmp_path / "data", requests=1500, seed=11)
    base, dash_port = free_ports(2)
    config = config_for(tmp_path, buckets=4, follow="1", metrics_port=base)
    flows = [FlowProcess(config, args, log_path=tmp_path / f"flow-{i}.log") for i, args in enumerate(runs)]
    dash = None
    try:
        for f in flows:
            f.start()
        dash = subprocess.Popen([sys.executable, "-m", "flows.cli", "dashboard", "--port", str(dash_port),
                                 "--interval", "0.5", "--processes", str(processes)],
                                env=flows[0].env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ports = [base + i for i in range(processes)]
        url = f"http://127.0.0.1:{dash_port}/"

        def read_all():
            for f in flows:
                assert f.running, f.log_tail()
            mine = [figures(own_metrics(p)) for p in ports]
            return mine if sum(m.get("events/features", 0) for m in mine) == counts.features else None

        try:
            wait_for(read_all, 240, "the processes to read every feature event")
        except AssertionError as e:  # read_all's own failures are swallowed while waiting: say them
            raise AssertionError(f"{e}; " + "; ".join(
                f"process {i} {'running' if f.running else 'stopped'}, its log:\n{f.log_tail()}"
                for i, f in enumerate(flows))) from None
        # The counters settle (the join's last outcomes), then the dashboard scrapes twice more.
        def unchanged():
            before = read_all()
            time.sleep(1.5)
            return before if read_all() == before else None

        settled = wait_for(unchanged, 120, "the counters to settle")
        scrapes = api_state(url)["scrapes"]
        wait_for(lambda: api_state(url)["scrapes"] >= scrapes + 2, 30, "two more scrapes")
        state = api_state(url)
        infos = [json.loads(urllib.request.urlopen(f"http://127.0.0.1:{p}/info", timeout=5).read()) for p in ports]
        assert [figures(own_metrics(p)) for p in ports] == settled, "the counters moved after settling"
        return state, settled, infos
    finally:
        if dash is not None:
            dash.kill()
            dash.wait()
        for f in flows:
            f.stop()


def check_merged(state: dict, per_process: list[dict]) -> None:
    summed: dict[str, float] = {}
    for figs in per_process:
        for k, v in figs.items():
            summed[k] = summed.get(k, 0.0) + v
    totals = state["totals"]
    assert {f"events/{k}": v for k, v in totals["events"].items()} == \
        {k: v for k, v in summed.items() if k.startswith("events/")}
    assert totals["join"]["matched"] == summed["freshrec_join_matched_total"] > 0
    assert totals["join"]["explicit_negatives"] == summed["freshrec_join_explicit_negatives_total"]
    assert totals["join"]["impressions"] == summed["freshrec_join_impressions_total"]


def test_the_dashboard_merges_the_two_processes_of_a_cluster(tmp_path):
    a, b = free_ports(2)
    addresses = f"127.0.0.1:{a};127.0.0.1:{b}"
    state, per_process, infos = run_and_merge(tmp_path, [["-i", "0", "-a", addresses], ["-i", "1", "-a", addresses]], 2)
    flows = [t for t in state["targets"] if t["kind"] == "flow"]
    assert [t["up"] for t in flows] == [True, True]
    assert [i["process"] for i in infos] == [0, 1]
    # Each process names its own worker by Bytewax's index in the cluster, and both did part of the work.
    assert [t["workers"] for t in flows] == [["worker 0"], ["worker 1"]]
    assert all(figs["freshrec_join_impressions_total"] > 0 for figs in per_process)
    check_merged(state, per_process)


def test_the_dashboard_lists_both_workers_of_one_process(tmp_path):
    state, per_process, _ = run_and_merge(tmp_path, [["-w", "2"]], 1)
    flows = [t for t in state["targets"] if t["kind"] == "flow"]
    assert len(flows) == 1 and flows[0]["up"]
    assert flows[0]["workers"] == ["worker 0", "worker 1"]
    check_merged(state, per_process)
