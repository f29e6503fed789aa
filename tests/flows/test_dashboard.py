"""Per-process metrics, the flow's own Kafka lag, and the dashboard's scraping and merging."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY, CollectorRegistry, ProcessCollector

from flows.config import Config, ConfigError
from flows.dashboard import Scraper, Target, default_targets, make_app, quantile
from flows.lag import LagMonitor
from flows.metrics import MAX_REASONS, reason_class
from flows.observe import MetricsServer, ProcessFigures, graph_of, process_id, use_process_figures, workers_per_process
from flows.pipeline import build_flow

ROOT = Path(__file__).resolve().parents[2]


def test_the_process_id_comes_from_bytewax_flags_then_its_variables():
    assert process_id(["bytewax.run", "flows.pipeline:flow", "-i", "1", "-a", "x;y"], {}) == 1
    assert process_id(["bytewax.run", "--process-id=3"], {}) == 3
    assert process_id(["bytewax.run", "-w", "2"], {"BYTEWAX_PROCESS_ID": "2"}) == 2
    assert process_id([], {"BYTEWAX_POD_NAME": "freshrec-4", "BYTEWAX_STATEFULSET_NAME": "freshrec"}) == 4
    assert process_id(["bytewax.run", "-w", "2"], {}) == 0


def test_workers_per_process_come_from_bytewax_flags():
    assert workers_per_process(["bytewax.run", "flows.pipeline:flow", "-w", "2"]) == 2
    assert workers_per_process(["bytewax.run", "--workers-per-process=3"]) == 3
    assert workers_per_process(["bytewax.run", "-w4"]) == 4
    assert workers_per_process(["bytewax.run", "-i", "1"]) == 1


def test_the_metrics_port_setting_takes_off_and_checks_its_range():
    assert Config.from_env({}).metrics_port == 9464
    assert Config.from_env({"FRESHREC_METRICS_PORT": "off"}).metrics_port is None
    assert Config.from_env({"FRESHREC_METRICS_PORT": "0"}).metrics_port is None
    with pytest.raises(ConfigError, match="FRESHREC_METRICS_PORT"):
        Config.from_env({"FRESHREC_METRICS_PORT": "70000"})
    assert Config.from_env({}).api_token == ""
    assert Config.from_env({"FRESHREC_API_TOKEN": "s3cret"}).api_token == "s3cret"


def test_dead_letter_reasons_become_a_bounded_set_of_labels():
    assert reason_class("missing field user_id") == "missing field user_id"
    assert reason_class("not UTF-8: invalid byte at offset 3") == "not UTF-8"
    assert reason_class("ts from the future: 90000 s ahead of its arrival") == "ts from the future"
    assert reason_class("invalid field sparse.someone's-own-key: Expected `str`") == "invalid field sparse"
    labels = {reason_class(f"made up reason {i}: x") for i in range(3 * MAX_REASONS)}
    assert "other" in labels and len(labels) <= MAX_REASONS + 1


def test_quantiles_interpolate_inside_a_bucket():
    edges = [0.1, 0.2, 0.5, float("inf")]
    assert quantile(edges, [0, 10, 0, 0], 0.5) == pytest.approx(0.15)
    assert quantile(edges, [0, 0, 0, 5], 0.99) == 0.5  # beyond the last edge: its lower bound
    assert quantile(edges, [0, 0, 0, 0], 0.5) is None


def test_a_process_serves_its_metrics_and_the_dataflows_graph(tmp_path):
    config = Config.from_env({"FRESHREC_DATA_DIR": str(tmp_path / "d"), "FRESHREC_STATE_DIR": str(tmp_path / "s")})
    flow = build_flow(config)
    server = MetricsServer(0, graph_of(flow), process=1)
    try:
        base = f"http://127.0.0.1:{server.port}"
        text = urllib.request.urlopen(base + "/metrics").read().decode()
        assert "freshrec_source_events" in text and "freshrec_join_matched" in text
        graph = json.loads(urllib.request.urlopen(base + "/graph").read())
        names = {n["id"] for n in graph["nodes"]}
        assert {"in_features", "join", "out_examples"} <= names
        assert {"from": "route", "to": "join", "port": "up"} in graph["edges"]
        assert "flowchart" in graph["mermaid"]
        assert json.loads(urllib.request.urlopen(base + "/info").read())["process"] == 1
        assert server.address[0] == "127.0.0.1"
    finally:
        server.close()


def _until_closed(s: socket.socket) -> bytes:
    got = b""
    while chunk := s.recv(4096):
        got += chunk
    return got


def test_the_metrics_server_keeps_a_scrapers_connection_and_answers_plain_http():
    server = MetricsServer(0)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        for _ in range(3):  # one connection, one serving thread, for every scrape
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain")
            assert b"process_cpu_seconds_total" in r.read()
        assert sum(t.name == "freshrec-metrics-conn" for t in threading.enumerate()) == 1
        conn.request("HEAD", "/info")
        r = conn.getresponse()
        assert r.status == 200 and int(r.getheader("Content-Length")) > 0 and r.read() == b""
        conn.request("GET", "/nothing")
        r = conn.getresponse()
        assert r.status == 404 and b"/metrics" in r.read()
        conn.request("DELETE", "/metrics")
        r = conn.getresponse()
        assert r.status == 405 and r.getheader("Allow") == "GET, HEAD"
        r.read()
        conn.request("GET", "/metrics", body=b"x")  # no bodies: refused, and the connection closed
        r = conn.getresponse()
        assert r.status == 400 and r.getheader("Connection") == "close"
        r.read()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"NONSENSE\r\n\r\n")
            assert _until_closed(s).startswith(b"HTTP/1.1 400 ")  # and closed after it
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"GET /info HTTP/1.0\r\n\r\n")  # HTTP/1.0 without keep-alive: one answer, closed
            got = _until_closed(s)
            assert got.startswith(b"HTTP/1.1 200 ") and b'"pid"' in got
        kept = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        kept.request("GET", "/info")
        kept.getresponse().read()
    finally:
        server.close()
    # Closing wakes the acceptor and every kept connection's thread.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(t.name.startswith("freshrec-metrics") for t in threading.enumerate()):
        time.sleep(0.01)
    assert not any(t.name.startswith("freshrec-metrics") for t in threading.enumerate())
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_process_figures_are_prometheus_clients_process_metrics():
    ours = {m.name: m for m in ProcessFigures().collect()}
    theirs = {m.name: m for m in ProcessCollector(registry=None).collect()}
    assert set(ours) == set(theirs)
    for name, m in theirs.items():
        assert ours[name].documentation == m.documentation and ours[name].type == m.type
    assert ours["process_start_time_seconds"].samples[0].value == pytest.approx(
        theirs["process_start_time_seconds"].samples[0].value, abs=0.02)
    assert ours["process_max_fds"].samples[0].value == theirs["process_max_fds"].samples[0].value
    assert ours["process_cpu_seconds"].samples[0].value == pytest.approx(
        theirs["process_cpu_seconds"].samples[0].value, abs=0.05)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    use_process_figures(registry)
    use_process_figures(registry)  # once only
    kinds = [type(c) for c in registry._collector_to_names]
    assert kinds == [ProcessFigures]


def test_kafka_lag_is_the_high_watermark_minus_the_next_offset_to_read():
    asked = []

    def watermarks(tps):
        asked.append(list(tps))
        return {("features", 0): 120, ("features", 1): 40}

    m = LagMonitor(watermarks, interval_s=3600)  # no timed reading within the test: only wake-ups
    m.note("features", 0, 100)
    # A partition's first note wakes the thread at once: a backlog shows before the first batch.
    deadline = time.monotonic() + 10
    while not asked and time.monotonic() < deadline:
        time.sleep(0.01)
    assert asked and asked[0][0] == ("features", 0)
    m.note("features", 1, 40)
    m.note("features", 0, 105)  # positions move per batch; only the newest counts
    assert m.refresh() == {("features", 0): 15, ("features", 1): 0}
    assert asked[-1] == [("features", 0), ("features", 1)]
    assert REGISTRY.get_sample_value("freshrec_source_kafka_lag", {"topic": "features", "partition": "0"}) == 15
    m.stop()
    m._thread.join(5)
    assert not m._thread.is_alive()


PROCESS = """# TYPE freshrec_source_events counter
freshrec_source_events_total{{stream="features"}} {ev}
# TYPE freshrec_join_matched counter
freshrec_join_matched_total{{worker="w{p}"}} {m}
# TYPE freshrec_join_waiting_impressions gauge
freshrec_join_waiting_impressions{{worker="w{p}",bucket="0",where="memory"}} 7
freshrec_join_waiting_impressions{{worker="w{p}",bucket="0",where="disk"}} 3
# TYPE freshrec_source_dead_letters counter
freshrec_source_dead_letters_total{{stream="actions",reason="not JSON"}} {p}
# TYPE freshrec_sync_freshness_seconds histogram
freshrec_sync_freshness_seconds_bucket{{store="primary",le="0.1"}} {f1}
freshrec_sync_freshness_seconds_bucket{{store="primary",le="1.0"}} {f2}
freshrec_sync_freshness_seconds_bucket{{store="primary",le="+Inf"}} {f2}
freshrec_sync_freshness_seconds_count{{store="primary"}} {f2}
freshrec_sync_freshness_seconds_sum{{store="primary"}} 1.0
"""


def test_the_dashboard_merges_processes_into_rates_and_serves_them_behind_its_token():
    async def scenario():
        counts = {0: [100, 10], 1: [50, 5]}

        def app_for(p):
            async def metrics(_r):
                ev, m = counts[p]
                return web.Response(text=PROCESS.format(p=p, ev=ev, m=m, f1=m, f2=2 * m))
            app = web.Application()
            app.router.add_get("/metrics", metrics)
            return app

        servers = [TestServer(app_for(p)) for p in (0, 1)]
        for s in servers:
            await s.start_server()
        targets = [Target(f"http://127.0.0.1:{s.port}") for s in servers] + [Target("http://127.0.0.1:9/metrics")]
        scraper = Scraper(targets, interval_s=1.0)
        async with ClientSession() as session:
            first = await scraper.scrape(session)
            counts[0] = [400, 30]
            counts[1] = [150, 25]
            second = await scraper.scrape(session)
        assert "rate/events/features" not in first  # a rate needs two scrapes
        dt = scraper.times[1] - scraper.times[0]
        assert second["rate/events/features"] == pytest.approx((550 - 150) / dt)
        assert second["rate/join/matched"] == pytest.approx((55 - 15) / dt)
        assert second["waiting/memory"] == 14 and second["waiting/disk"] == 6
        assert scraper.totals["dead"] == {"not JSON": 1.0}
        # Freshness over the window: 40 new observations, half under 0.1 s.
        assert 0.0 < second["freshness/primary/p50"] <= 0.1 < second["freshness/primary/p99"] <= 1.0
        up = [t.up for t in scraper.targets]
        assert up == [True, True, False] and scraper.targets[2].error
        assert [t.kind for t in scraper.targets[:2]] == ["flow", "flow"]

        client = TestClient(TestServer(make_app(scraper, token="s3cret")))
        await client.start_server()
        try:
            assert (await client.get("/api/state")).status == 401
            assert (await client.get("/api/state", headers={"Authorization": "Bearer nope"})).status == 401
            r = await client.get("/api/state", headers={"Authorization": "Bearer s3cret"})
            assert r.status == 200
            state = await r.json()
            assert len(state["t"]) >= 2 and state["series"]["rate/events/features"][1] > 0
            page = await client.get("/")
            body = await page.text()
            assert page.status == 200 and "<svg" in body and "http" not in body.split("<script>")[1].split("NS =")[0]
        finally:
            await client.close()
            for s in servers:
                await s.close()

    asyncio.run(scenario())


def test_default_targets_are_one_port_per_process_and_the_model_server():
    assert default_targets(9464, 2, False) == ["http://127.0.0.1:9464/metrics", "http://127.0.0.1:9465/metrics",
                                               "http://127.0.0.1:8000/metrics"]
    assert default_targets(None, 1, True) == ["http://127.0.0.1:8000/metrics", "http://127.0.0.1:3030/metrics"]


SERVER = """# TYPE freshrec_serve_requests counter
freshrec_serve_requests_total{{endpoint="/recommend",status="200"}} {n}
freshrec_serve_requests_total{{endpoint="/actions",status="202"}} 4
freshrec_serve_requests_total{{endpoint="/metrics",status="200"}} {n}
freshrec_serve_requests_total{{endpoint="/recommend",status="500"}} {e}
# TYPE freshrec_serve_request_latency_seconds histogram
freshrec_serve_request_latency_seconds_bucket{{endpoint="/recommend",le="0.005"}} {fast}
freshrec_serve_request_latency_seconds_bucket{{endpoint="/recommend",le="0.05"}} {n}
freshrec_serve_request_latency_seconds_bucket{{endpoint="/recommend",le="+Inf"}} {n}
freshrec_serve_request_latency_seconds_count{{endpoint="/recommend"}} {n}
freshrec_serve_request_latency_seconds_sum{{endpoint="/recommend"}} 1.0
# TYPE freshrec_serve_index_items gauge
freshrec_serve_index_items {items}
# TYPE freshrec_serve_params_version gauge
freshrec_serve_params_version {version}
"""


def test_the_dashboard_shows_the_model_servers_rate_latency_index_and_version():
    async def scenario():
        now = {"n": 100, "e": 0, "fast": 100, "items": 500, "version": 7}

        async def metrics(_r):
            return web.Response(text=SERVER.format(**now))

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        server = TestServer(app)
        await server.start_server()
        scraper = Scraper([Target(f"http://127.0.0.1:{server.port}/metrics")], interval_s=1.0)
        try:
            async with ClientSession() as session:
                await scraper.scrape(session)
                # 200 more /recommend, of which 4 took 5 to 50 ms; one 500; the index grew.
                now.update(n=300, e=1, fast=296, items=600, version=9)
                point = await scraper.scrape(session)
        finally:
            await server.close()
        dt = scraper.times[1] - scraper.times[0]
        assert scraper.targets[0].kind == "server"
        assert point["rate/serve/recommend"] == pytest.approx((301 - 100) / dt)
        assert point["rate/serve_errors"] == pytest.approx(1 / dt)
        assert point["rate/serve/actions"] == 0
        assert not any("metrics" in k for k in point), "the scrapes themselves are not the server's work"
        # Over the window (the two scrapes), 196 of 200 new requests under 5 ms: p50 there, p99 above.
        assert point["latency/recommend/p50"] <= 0.005 < point["latency/recommend/p99"] <= 0.05
        assert point["serve/index_items"] == 600 and point["serve/params_version"] == 9

    asyncio.run(scenario())


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="no Linux autogroup here")
def test_a_niced_dashboard_leading_its_session_lowers_its_autogroup_and_no_other():
    # /proc/self/autogroup reads "/autogroup-N nice V", or nothing for a process still in the
    # kernel's default group (a session begun before autogroup was on, as under some CI runners).
    code = ("import json; from flows.cli import lower_own_autogroup; "
            "print(json.dumps([lower_own_autogroup(7), open('/proc/self/autogroup').read().strip()]))")
    own = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         start_new_session=True, cwd=ROOT)
    assert own.returncode == 0, own.stderr
    set_, line = json.loads(own.stdout)
    assert set_ is True and line.endswith(" nice 7"), (set_, line)
    ours = open("/proc/self/autogroup").read().strip()
    shared = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert shared.returncode == 0, shared.stderr
    assert json.loads(shared.stdout) == [False, ours]  # the session it shares: left alone
