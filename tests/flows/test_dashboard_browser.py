"""The dashboard in a real headless Chromium, against a running flow in follow mode.

Chromium is driven over the DevTools protocol (a websocket from aiohttp): the page loads, its
charts show live data that changes between two looks, the console has no errors, and a screenshot
is saved under the test's tmp dir. The first paint is printed, never asserted.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from aiohttp import ClientSession

from flows.sample import write_sample
from tests.flows.test_cluster import free_ports
from tests.flows.test_recovery import ROOT, flow_env

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def wait_for(cond, timeout=90.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = cond()
        except Exception:  # not up yet
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def api_state(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "api/state", timeout=5).read())


class DevTools:
    """A minimal DevTools protocol client: commands by id, events collected."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    async def call(self, method: str, **params):
        n = next(self.ids)
        await self.ws.send_json({"id": n, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), 60)
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    async def js(self, expr: str):
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return r["result"].get("value")

    def errors(self) -> list:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown" or (m == "Runtime.consoleAPICalled" and p.get("type") == "error"):
                out.append(p)
            if m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(p["entry"])
        return out


LOOK = """(() => {
  const paths = [...document.querySelectorAll('svg[data-chart] path[data-series]')].map(p => p.getAttribute('d'));
  const kpis = [...document.querySelectorAll('.kpi .v')].map(e => e.textContent);
  const labels = [...document.querySelectorAll('.kpi .l')].map(e => e.textContent);
  return {scrapes: Number(document.body.dataset.scrapes || 0), paths, kpis, labels,
          charts: [...document.querySelectorAll('svg[data-chart]')].filter(s => s.querySelector('path[data-series]'))
                    .map(s => s.dataset.chart),
          steps: document.querySelectorAll('#graph g[data-step]').length,
          up: document.querySelectorAll('#targets .dot.up').length};
})()"""


def ask_for_lists(url: str, stop: threading.Event) -> None:
    """GET /recommend for the sample's users, about 20 a second, until `stop`."""
    for i in itertools.count():
        if stop.wait(0.05):
            return
        try:
            urllib.request.urlopen(f"{url}/recommend?user_id=u{i % 200}&k=10", timeout=5).read()
        except OSError:  # the server is stopping: the test is over
            return


@pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true", reason="no chromium (CI installs it)")
def test_the_dashboard_shows_a_running_flow_live_in_chromium(tmp_path):
    assert CHROMIUM, "chromium is missing: .ci/run installs Debian's chromium"
    write_sample(tmp_path / "data", requests=1500, seed=3)
    (metrics_port,) = free_ports(1)
    env = flow_env(tmp_path, FRESHREC_FOLLOW="1", FRESHREC_TRAIN="1", FRESHREC_METRICS_PORT=str(metrics_port),
                   FRESHREC_TRAIN_BATCH="64", FRESHREC_DENSE_SYNC_S="1")
    flow = subprocess.Popen([sys.executable, "-m", "bytewax.run", "flows.pipeline:flow", "-s", "1"], env=env,
                            cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # The model server on the same state, asked for lists all along: its panels show live figures too.
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", "0"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dash = chrome = None
    stop = threading.Event()
    try:
        line = server.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), line + (server.stderr.read() if server.poll() else "")
        server_url = line.split()[2].rstrip("/")
        asker = threading.Thread(target=ask_for_lists, args=(server_url, stop), daemon=True)
        asker.start()
        dash = subprocess.Popen([sys.executable, "-m", "flows.cli", "dashboard", "--port", "0", "--interval", "0.5",
                                 "--targets", f"http://127.0.0.1:{metrics_port}/metrics,{server_url}/metrics"],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = dash.stdout.readline()
        assert line.startswith("dashboard on http://127.0.0.1:"), line + dash.stderr.read()
        url = line.split()[2]
        wait_for(lambda: api_state(url)["targets"][0]["up"] and api_state(url)["graph"], what="the flow's metrics")
        wait_for(lambda: "train/loss" in api_state(url)["series"], 180, "a training step")
        wait_for(lambda: "latency/recommend/p99" in api_state(url)["series"], 60, "the model server's figures")
        assert [t["workers"] for t in api_state(url)["targets"]] == [["worker 0"], []]

        profile = tmp_path / "chrome"
        chrome = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                   "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                   "--window-size=1400,1700", "--hide-scrollbars", "about:blank"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = int(wait_for(lambda: (profile / "DevToolsActivePort").read_text().split()[0], 60, "chromium"))
        pages = wait_for(lambda: [t for t in json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/json").read()) if t["type"] == "page"], 30, "a page")
        more = tmp_path / "data"

        async def drive():
            async with ClientSession() as s, s.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                dt = DevTools(ws)
                for domain in ("Runtime", "Log", "Page"):
                    await dt.call(f"{domain}.enable")
                await dt.call("Page.navigate", url=url)
                first = None
                for _ in range(150):
                    first = await dt.js(LOOK)
                    if first and first["scrapes"] > 2 and first["paths"] and first["steps"]:
                        break
                    await asyncio.sleep(0.2)
                # More input arrives while the page is open.
                write_sample(more, requests=800, seed=4, start_ts=1764300000.0)
                await asyncio.sleep(3.0)
                second = await dt.js(LOOK)
                paint = await dt.js("JSON.stringify(performance.getEntriesByType('paint').map(e => [e.name, e.startTime]))")
                shot = await dt.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
                return first, second, json.loads(paint), base64.b64decode(shot["data"]), dt.errors()

        first, second, paint, png, errors = asyncio.run(drive())
        (tmp_path / "dashboard.png").write_bytes(png)
        print(f"first paint: {dict(paint)} ms; screenshot {tmp_path / 'dashboard.png'}")
        assert errors == []
        assert first["steps"] >= 10, "the dataflow's graph is drawn"
        assert first["up"] == 2
        assert {"events", "outcomes", "waiting", "loss", "serve", "latency", "version"} <= set(first["charts"])
        # The model server's KPIs and freshness hold figures, not dashes.
        kpis = dict(zip(second["labels"], second["kpis"], strict=True))
        for name in ("recommend rate", "recommend p50 / p99", "server: index items · version", "freshness p50 / p99"):
            assert "–" not in kpis[name], (name, kpis[name])
        assert second["scrapes"] > first["scrapes"]
        assert second["paths"] != first["paths"], "the charts moved"
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
        assert flow.poll() is None, flow.stderr.read().decode()[-3000:]
    finally:
        stop.set()
        for p in (chrome, dash, server, flow):
            if p is not None:
                p.kill()
                p.wait()
