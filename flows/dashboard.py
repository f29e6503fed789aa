"""`freshrec dashboard`: one page that watches the whole loop, live.

The server scrapes its targets' Prometheus `/metrics` (the flow's processes, the model server,
Bytewax's API server when it is on) every `interval_s`, merges the processes, turns counters into
rates, keeps a short history and serves it as JSON at `/api/state`; the page (no external assets,
charts drawn as SVG) polls that. With `FRESHREC_API_TOKEN` set, `/api/state` wants
`Authorization: Bearer <token>` (the page takes it from `?token=` in its own address).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from aiohttp import ClientSession, ClientTimeout, web
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("freshrec.dashboard")

PAGE = Path(__file__).with_name("dashboard.html")
MODEL_SERVER = "http://127.0.0.1:8000/metrics"
BYTEWAX_API = "http://127.0.0.1:3030/metrics"
SCRAPE_TASK = web.AppKey("scrape", asyncio.Task)
FRESHNESS_WINDOW = 10  # scrapes over which freshness quantiles are taken


@dataclass
class Target:
    """One place to scrape: its /metrics address, and the flow's /graph beside it."""

    url: str
    name: str = ""
    up: bool = False
    error: Optional[str] = None
    last_ok: Optional[float] = None
    scrape_ms: Optional[float] = None
    kind: str = "other"  # flow | bytewax | server | other, from what its metrics hold
    workers: list[str] = field(default_factory=list)
    samples: list[tuple[str, dict, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not urlsplit(self.url).path.rstrip("/"):
            self.url = self.url.rstrip("/") + "/metrics"
        if not self.name:
            self.name = urlsplit(self.url).netloc

    @property
    def base(self) -> str:
        return self.url.rsplit("/", 1)[0]

    def view(self) -> dict:
        return {"name": self.name, "url": self.url, "up": self.up, "error": self.error, "kind": self.kind,
                "last_ok": self.last_ok, "scrape_ms": self.scrape_ms, "workers": self.workers}


def parse_metrics(text: str) -> list[tuple[str, dict, float]]:
    """Prometheus text into (sample name, labels, value)."""
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.append((s.name, s.labels, s.value))
    return out


def total(samples: Iterable[tuple[str, dict, float]], name: str, by: Optional[str] = None, **match: str
          ) -> dict[str, float]:
    """The sum of `name` over every sample (every process) whose labels match, grouped by label `by`."""
    out: dict[str, float] = {}
    for n, labels, v in samples:
        if n != name or any(labels.get(k) != want for k, want in match.items()) or math.isnan(v):
            continue
        key = labels.get(by, "") if by else ""
        out[key] = out.get(key, 0.0) + v
    return out


def quantile(edges: list[float], counts: list[float], q: float) -> Optional[float]:
    """The q-quantile of a histogram's non-cumulative bucket counts (upper `edges`, the last +Inf)."""
    n = sum(counts)
    if n <= 0:
        return None
    rank, seen, lo = q * n, 0.0, 0.0
    for hi, c in zip(edges, counts, strict=True):
        if c > 0 and seen + c >= rank:
            if math.isinf(hi):
                return lo
            return lo + (hi - lo) * (rank - seen) / c
        seen += c
        lo = hi if not math.isinf(hi) else lo
    return lo


def _worker(label: str) -> str:
    """A worker label as the page lists it: Bytewax's index (ours and its own) as `worker N`."""
    return f"worker {label}" if label.isdigit() else label


def _short_step(step_id: str) -> str:
    """Bytewax's `flow.step.inner_op` as the top-level step name the graph shows."""
    parts = step_id.split(".")
    return parts[1] if len(parts) > 1 else step_id


class Scraper:
    """Scrapes the targets, merges processes, keeps `history` points of every series."""

    def __init__(self, targets: list[Target], *, interval_s: float = 1.0, history: int = 600,
                 token: Optional[str] = None, serving_dir: Optional[Path] = None):
        self.targets = targets
        self.interval_s = interval_s
        self.token = token
        self.serving_dir = serving_dir
        self.times: deque[float] = deque(maxlen=history)
        self.points: deque[dict[str, float]] = deque(maxlen=history)
        self.totals: dict[str, dict[str, float]] = {}
        self.latest: dict[str, Any] = {}
        self.graph: Optional[dict] = None
        self._prev: Optional[tuple[float, dict[str, float]]] = None
        self._fresh: dict[str, deque] = {}
        self._store: Any = None
        self.scrapes = 0

    # -- scraping ----------------------------------------------------------------------------

    async def _fetch(self, session: ClientSession, t: Target) -> None:
        t0 = time.perf_counter()
        try:
            async with session.get(t.url) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
                text = await r.text()
            t.samples = parse_metrics(text)
            t.up, t.error, t.last_ok = True, None, time.time()
            t.scrape_ms = (time.perf_counter() - t0) * 1000.0
            names = {n for n, _, _ in t.samples}
            t.kind = ("bytewax" if any(n.startswith("bytewax_") for n in names)
                      else "flow" if any(n.startswith(("freshrec_join_", "freshrec_source_")) for n in names)
                      else "server" if any(n.startswith("freshrec_serve_") for n in names) else "other")
            t.workers = sorted({_worker(lab["worker"]) for n, lab, _ in t.samples if "worker" in lab and
                                n.startswith("freshrec_")} |
                               {_worker(lab["worker_index"]) for n, lab, _ in t.samples if "worker_index" in lab},
                               key=lambda w: (len(w), w))
            if t.kind == "flow" and self.graph is None:
                async with session.get(t.base + "/graph") as r:
                    if r.status == 200:
                        self.graph = await r.json()
        except Exception as e:  # a target down is a fact to show, not an error  # noqa: BLE001
            t.up, t.samples = False, []
            t.error = str(e) or type(e).__name__

    async def scrape(self, session: ClientSession) -> dict[str, float]:
        await asyncio.gather(*(self._fetch(session, t) for t in self.targets))
        return self._merge(time.time())

    def _store_stats(self) -> Optional[dict]:
        if self.serving_dir is None or not (self.serving_dir / "data.mdb").exists():
            return None
        try:
            if self._store is None:
                from paramserver.serving import LmdbServingStore

                self._store = LmdbServingStore(self.serving_dir, writer=False, name="dashboard")
            return self._store.stats().as_dict()
        except Exception as e:  # noqa: BLE001
            log.debug("serving store unreadable: %s", e)
            self._store = None
            return None

    def _merge(self, now: float) -> dict[str, float]:
        # Bytewax's API server also serves this process's Python metrics: count each sample once.
        flow_up = any(t.kind == "flow" for t in self.targets if t.up)
        samples = [s for t in self.targets if t.up for s in t.samples
                   if not (t.kind == "bytewax" and flow_up and s[0].startswith("freshrec_"))]
        counters: dict[str, float] = {}
        for stream, v in total(samples, "freshrec_source_events_total", "stream").items():
            counters[f"events/{stream}"] = v
        for what in ("matched", "expired_kept", "sampled_out", "explicit_negatives", "orphan_actions",
                     "late_actions", "impressions"):
            counters[f"join/{what}"] = sum(total(samples, f"freshrec_join_{what}_total").values())
        for reason, v in total(samples, "freshrec_source_dead_letters_total", "reason").items():
            counters[f"dead/{reason or 'unknown'}"] = v
        counters["dead/orphan"] = counters["join/orphan_actions"]
        counters["train/examples"] = sum(total(samples, "freshrec_train_examples_total").values())
        point: dict[str, float] = {}
        self._serving(samples, counters, point)
        for step, v in total(samples, "bytewax_item_out_count_total", "step_id").items():
            short = _short_step(step)
            counters[f"step/{short}"] = counters.get(f"step/{short}", 0.0) + v
        if self._prev is not None:
            t_prev, prev = self._prev
            dt = max(now - t_prev, 1e-6)
            for k, v in counters.items():
                if k in prev:
                    point["rate/" + k] = max(0.0, v - prev[k]) / dt  # a restarted process: not negative
        self._prev = (now, counters)
        self.totals = {"dead": {k[5:]: v for k, v in counters.items() if k.startswith("dead/") and v},
                       "join": {k[5:]: v for k, v in counters.items() if k.startswith("join/")},
                       "events": {k[7:]: v for k, v in counters.items() if k.startswith("events/")}}

        for where, v in total(samples, "freshrec_join_waiting_impressions", "where").items():
            point[f"waiting/{where}"] = v
        for name, key in (("freshrec_train_loss", "train/loss"), ("freshrec_train_auc", "train/auc"),
                          ("freshrec_train_logloss", "train/logloss")):
            vals = [v for n, _, v in samples if n == name and not math.isnan(v)]
            if vals:
                point[key] = sum(vals) / len(vals)
        lags = {(lab.get("topic", ""), lab.get("partition", "")): v for n, lab, v in samples
                if n == "freshrec_source_kafka_lag"}
        for (topic, part), v in lags.items():
            point[f"lag/{topic}/{part}"] = v
        if lags:
            point["lag/total"] = sum(lags.values())
        wm = [v for n, _, v in samples if n == "freshrec_join_watermark_lag_seconds"]
        if wm:
            point["watermark_lag"] = max(wm)
        for store, v in total(samples, "freshrec_params_version", "store").items():
            point[f"version/{store}"] = v
        self._freshness(samples, point)
        stats = self._store_stats()
        if stats is not None:
            point["store/entries"] = float(stats["entries"])
            point["store/version"] = float(stats["params_version"])
            if stats.get("staleness_ms") is not None:
                point["store/staleness_s"] = stats["staleness_ms"] / 1000.0
            if stats.get("freshness_ms") is not None:
                point["store/last_freshness_s"] = stats["freshness_ms"] / 1000.0
        self.latest = {"store": stats}
        self.times.append(now)
        self.points.append(point)
        self.scrapes += 1
        return point

    def _freshness(self, samples: list, point: dict[str, float]) -> None:
        """p50/p99 of `freshrec_sync_freshness_seconds` over the last FRESHNESS_WINDOW scrapes, by store."""
        for store, qs in self._windowed(samples, "freshrec_sync_freshness_seconds", "store").items():
            for name, x in qs.items():
                point[f"freshness/{store}/{name}"] = x

    def _serving(self, samples: list, counters: dict[str, float], point: dict[str, float]) -> None:
        """The model server's requests by endpoint, its latency quantiles (over the same window as
        freshness), its index and the serving store version it has applied."""
        # /metrics is the dashboard's (and Prometheus's) own scraping: not the server's work.
        for endpoint, v in total(samples, "freshrec_serve_requests_total", "endpoint").items():
            if endpoint != "/metrics":
                counters[f"serve/{endpoint.strip('/') or 'root'}"] = v
        counters["serve_errors"] = sum(v for n, lab, v in samples if n == "freshrec_serve_requests_total"
                                       and lab.get("status", "").startswith("5"))
        for endpoint, qs in self._windowed(samples, "freshrec_serve_request_latency_seconds", "endpoint").items():
            if endpoint == "/metrics":
                continue
            for name, x in qs.items():
                point[f"latency/{endpoint.strip('/')}/{name}"] = x
        for name, key in (("freshrec_serve_index_items", "serve/index_items"),
                          ("freshrec_serve_params_version", "serve/params_version")):
            vals = [v for n, _, v in samples if n == name and not math.isnan(v)]
            if vals:  # several replicas: the smallest is what every one of them serves at least
                point[key] = min(vals)

    def _windowed(self, samples: list, name: str, by: str) -> dict[str, dict[str, float]]:
        """p50/p99 of histogram `name` over the last FRESHNESS_WINDOW scrapes, grouped by label `by`
        and summed over processes: what happened lately, not since each process started."""
        groups: dict[str, dict[float, float]] = {}
        for n, lab, v in samples:
            if n == name + "_bucket":
                le = float(lab["le"])
                d = groups.setdefault(lab.get(by, ""), {})
                d[le] = d.get(le, 0.0) + v
        out: dict[str, dict[str, float]] = {}
        for key, cum in groups.items():
            edges = sorted(cum)
            vec = [cum[e] for e in edges]
            hist = self._fresh.setdefault(f"{name}/{key}", deque(maxlen=FRESHNESS_WINDOW + 1))
            hist.append((edges, vec))
            old_edges, old = hist[0]
            if old_edges != edges or len(hist) < 2:
                old = [0.0] * len(vec)
            window = [max(0.0, a - b) for a, b in zip(vec, old, strict=True)]
            counts = [window[0]] + [max(0.0, window[i] - window[i - 1]) for i in range(1, len(window))]
            for q, label in ((0.5, "p50"), (0.99, "p99")):
                x = quantile(edges, counts, q)
                if x is not None:
                    out.setdefault(key, {})[label] = x
        return out

    async def run(self) -> None:
        if self.serving_dir is not None:
            # Imported as scraping starts, not at the first scrape that finds the store (mid-watch,
            # while the flow that just made it is busy): numpy and lmdb are most of its start-up.
            import paramserver.serving  # noqa: F401
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with ClientSession(timeout=ClientTimeout(total=max(0.5, self.interval_s * 0.9)),
                                 headers=headers) as session:
            while True:
                t0 = time.monotonic()
                try:
                    await self.scrape(session)
                except Exception:  # noqa: BLE001
                    log.exception("scrape failed")
                await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - t0)))

    # -- the page's view -----------------------------------------------------------------------

    def state(self, since: float = 0.0) -> dict:
        idx = [i for i, t in enumerate(self.times) if t > since]
        keys = sorted({k for i in idx for k in self.points[i]})
        return {
            "now": time.time(),
            "interval_s": self.interval_s,
            "targets": [t.view() for t in self.targets],
            "graph": self.graph,
            "t": [self.times[i] for i in idx],
            "series": {k: [self.points[i].get(k) for i in idx] for k in keys},
            "totals": self.totals,
            "latest": self.latest,
            "scrapes": self.scrapes,
        }


def default_targets(metrics_port: Optional[int], processes: int, bytewax_api: bool) -> list[str]:
    urls = [f"http://127.0.0.1:{metrics_port + i}/metrics" for i in range(processes)] if metrics_port else []
    urls.append(MODEL_SERVER)
    if bytewax_api:
        urls.append(BYTEWAX_API)
    return urls


def make_app(scraper: Scraper, token: Optional[str] = None) -> web.Application:
    page = PAGE.read_bytes()

    def authorized(request: web.Request) -> bool:
        if not token:
            return True
        got = request.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())

    async def index(_request: web.Request) -> web.Response:
        # The page holds no data; the data behind it wants the token.
        return web.Response(body=page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def api_state(request: web.Request) -> web.Response:
        if not authorized(request):
            return web.json_response({"error": "missing or wrong bearer token (FRESHREC_API_TOKEN)"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        try:
            since = float(request.query.get("since", "0"))
        except ValueError:
            return web.json_response({"error": "since: expected a number"}, status=400)
        return web.json_response(scraper.state(since))

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "scrapes": scraper.scrapes})

    async def start(app: web.Application) -> None:
        app[SCRAPE_TASK] = asyncio.create_task(scraper.run())

    async def stop(app: web.Application) -> None:
        app[SCRAPE_TASK].cancel()

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/api/state", api_state)
    app.router.add_get("/healthz", healthz)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


async def serve(scraper: Scraper, host: str, port: int, token: Optional[str]) -> None:
    runner = web.AppRunner(make_app(scraper, token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    print(f"dashboard on http://{host}:{bound}/ scraping {', '.join(t.url for t in scraper.targets)}", flush=True)
    try:
        while True:
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()
