"""serve.recommend_p99 and serve.max_rate: the model server over HTTP, as clients see it.

A real `freshrec serve` subprocess on 127.0.0.1 (a free port; it stops itself after a deadline)
serves a 100,000-item store (20,000 with --quick) built by `build_catalog_store`, writing its
feature events to files in a temporary data dir, while a third process plays the flow's sync
(item and user rows every 200 ms through ServingWriter) and the server refreshes its index. This
process generates the load: GET /recommend?k=100 at a fixed arrival rate, open loop (each request
leaves at its scheduled time whatever the others are doing, on keep-alive connections, and its
latency runs from the scheduled time, so queueing counts). The generator's own send lag (how late
a request left) is reported, so a saturated generator shows.
- serve.recommend_p99: p99 at 200 req/s, against a bare numpy top-k (V @ u, argpartition, sort)
  over the same vectors in this process;
- serve.max_rate: the highest rate whose p99 stays within 20 ms (rates stepped up by half, then
  bisected), against the bare top-k's 1 / mean time;
- serve.recommend_cpu: the server processes' CPU time per request answered in the 200 req/s run
  (on a machine others load, the figure their load moves least), against the bare top-k's mean.
FRESHREC_SERVE_PROCESSES in the environment runs that many server processes.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import Figure, HostCpu, benchmark, compared, host_figures, host_shares, process_cpu_s
from bench.serve import SPEC, K, _rows, build_catalog_store

TARGET_MS = 20.0
RATE = 200.0
ROOT = Path(__file__).resolve().parent.parent
# The server is `freshrec serve` itself, with a deadline after which it sends itself SIGTERM (a
# clean stop), so a benchmark that dies leaves no server behind for long.
_CHILD = """
import os, signal, sys, threading
t = threading.Timer(float(sys.argv[1]), lambda: os.kill(os.getpid(), signal.SIGTERM))
t.daemon = True
t.start()
from flows.cli import main
sys.exit(main(["serve", "--host", "127.0.0.1", "--port", "0"]))
"""


@dataclass
class Run:
    rate: float
    sent: int
    ok: int
    errors: int
    latency_ms: np.ndarray  # from the scheduled send time; inf for a failed request
    lag_ms: np.ndarray  # how late each request left its schedule

    def p(self, q: float) -> float:
        # "higher": no interpolation, which would make nan of two failed (inf) requests
        return float(np.percentile(self.latency_ms, q, method="higher")) if len(self.latency_ms) else float("inf")

    @property
    def p99(self) -> float:
        return self.p(99)

    @property
    def lag_p99(self) -> float:
        return float(np.percentile(self.lag_ms, 99, method="higher"))


def sync_rows(path: str, n_items: int, n_users: int, stop: Any, every_s: float = 0.2, items: int = 600,
              users: int = 200) -> None:
    """In a process of its own, as the flow's DeltaSync: `items` item rows and `users` user rows
    (embedding and bias) every `every_s`, each tick one transaction through the one writer."""
    from paramserver.serving import LmdbServingStore, ServingWriter

    store = LmdbServingStore(path, writer=True)
    try:
        w = ServingWriter(store)
        g = np.random.default_rng(3)
        while not stop.wait(every_s):
            it = list(dict.fromkeys(f"v{i}" for i in g.integers(n_items, size=items)))
            us = list(dict.fromkeys(f"u{i}" for i in g.integers(n_users, size=users)))
            w.write([_rows("item_id", it, g.standard_normal((len(it), SPEC.dim)) * 0.3),
                     _rows("item_id.bias", it, g.standard_normal((len(it), 1)) * 0.1),
                     _rows("user_id", us, g.standard_normal((len(us), SPEC.dim)) * 0.3),
                     _rows("user_id.bias", us, g.standard_normal((len(us), 1)) * 0.1)])
    finally:
        store.close()


class ServerProcess:
    """`freshrec serve` on a state dir and a data dir, in a subprocess; `url` once it listens."""

    def __init__(self, state_dir: Path, data_dir: Path, log_dir: Path, lifetime_s: float):
        env = {**os.environ, "FRESHREC_STATE_DIR": str(state_dir), "FRESHREC_DATA_DIR": str(data_dir),
               "FRESHREC_SOURCE": "files", "FRESHREC_ITEM_SLOTS": ",".join(SPEC.item_slots),
               "FRESHREC_USER_SLOTS": ",".join(SPEC.user_slots), "FRESHREC_DENSE_FEATURES": ",".join(SPEC.dense),
               "FRESHREC_EMBEDDING_DIM": str(SPEC.dim), "PYTHONPATH": str(ROOT)}
        self.out = log_dir / "serve.out"
        self.err = log_dir / "serve.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(lifetime_s)], cwd=ROOT, env=env,
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.url = ""

    def wait_ready(self, timeout_s: float = 180.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.out.read_text(errors="replace").splitlines():
                if line.startswith("serving on "):
                    self.url = line.split()[2]
                    return self.url
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"freshrec serve did not start: {self.err.read_text(errors='replace')[-2000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        """CPU seconds (user + system) of the server and the server processes it started."""
        total, todo, seen = 0.0, [self.proc.pid], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            cpu = process_cpu_s(pid)
            if cpu is None:  # gone
                continue
            total += cpu
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def open_loop(url: str, users: list[str], rate: float, duration_s: float, *, k: int = K,
                    connections: int = 64, timeout_s: float = 2.0, seed: int = 0) -> Run:
    """GET /recommend at `rate` per second for `duration_s`, each request sent at its scheduled
    time on one of `connections` keep-alive connections (a request waiting for a free one waits
    on the clock, as it would in the server's queue)."""
    import aiohttp

    rng = np.random.default_rng(seed)
    n = max(1, int(rate * duration_s))
    who = [users[i] for i in rng.integers(len(users), size=n)]
    latency = np.full(n, np.inf)
    lag = np.full(n, np.nan)
    errors = 0
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def one(i: int, at: float) -> None:
            nonlocal errors
            lag[i] = loop.time() - at
            try:
                async with session.get(f"{url}/recommend", params={"user_id": who[i], "k": str(k)}) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        return
            except (TimeoutError, aiohttp.ClientError):
                errors += 1
                return
            latency[i] = loop.time() - at

        tasks = []
        start = loop.time() + 0.01
        for i in range(n):
            at = start + i / rate
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(one(i, at)))
        await asyncio.wait(tasks, timeout=timeout_s + 5)
        for t in tasks:
            t.cancel()
    sent = int(np.count_nonzero(~np.isnan(lag)))
    return Run(rate, sent, int(np.count_nonzero(np.isfinite(latency))), errors, latency * 1000.0,
               np.nan_to_num(lag, nan=np.inf) * 1000.0)


def bare_topk(store_path: Path, users: list[str], n: int) -> np.ndarray:
    """Seconds per call of a bare numpy top-k (V @ u + bias, argpartition, sort of the k) over
    the same item vectors the server holds, for `n` of the same known users."""
    from model.recommender import StoreRecommender
    from paramserver.serving import LmdbServingStore

    store = LmdbServingStore(store_path)
    try:
        r = StoreRecommender(store, SPEC)
        snap = r.index.snapshot
        rng = np.random.default_rng(1)
        who = [users[i] for i in rng.integers(len(users), size=n)]
        us = {u: r._user(u, snap.model)[1][0] for u in set(who)}
        vectors, bias = snap.vectors, snap.bias
        out = np.empty(n)
        for j, u in enumerate(who):
            t = time.perf_counter()
            s = vectors @ us[u] + bias
            top = np.argpartition(-s, K - 1)[:K]
            top[np.argsort(-s[top])]
            out[j] = time.perf_counter() - t
        return out
    finally:
        store.close()


def find_max_rate(url: str, users: list[str], duration_s: float, bisections: int, start: float = 100.0,
                  cap: float = 5000.0, floor: float = 10.0, log: list[Run] | None = None) -> float:
    """The highest rate (req/s) whose run keeps p99 within TARGET_MS and answers every request:
    up by half while it holds (down by halves if the start does not), then bisected between the
    last that held and the first that did not; 0 when not even `floor` holds."""
    def holds(rate: float) -> bool:
        run = asyncio.run(open_loop(url, users, rate, duration_s, seed=int(rate)))
        if log is not None:
            log.append(run)
        return run.errors == 0 and run.p99 <= TARGET_MS

    good, bad = 0.0, None
    rate = start
    while rate <= cap:
        if not holds(rate):
            bad = rate
            break
        good, rate = rate, rate * 1.5
    if bad is None:
        return good
    while good == 0.0 and bad > floor:  # not even the start held: down by halves first
        rate = bad / 2
        if holds(rate):
            good = rate
        else:
            bad = rate
    if good == 0.0:
        return 0.0
    for _ in range(bisections):
        mid = (good + bad) / 2
        if holds(mid):
            good = mid
        else:
            bad = mid
    return good


@benchmark("serve.recommend_p99", "serve.max_rate")
def recommend_http(quick: bool) -> Iterator[Figure]:
    n_items = 20_000 if quick else 100_000
    duration = 5.0 if quick else 30.0
    step_s, bisections = (2.0, 1) if quick else (5.0, 3)
    with tempfile.TemporaryDirectory(prefix="freshrec-bench-http-") as tmp:
        tmp_path = Path(tmp)
        state, data = tmp_path / "state", tmp_path / "data"
        cat = build_catalog_store(state / "serving", n_items, SPEC, seed=0)
        base = bare_topk(cat.path, cat.user_ids, 500 if quick else 3000)

        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        writer = ctx.Process(target=sync_rows, args=(str(cat.path), n_items, len(cat.user_ids), stop), daemon=True)
        server = ServerProcess(state, data, tmp_path, lifetime_s=300 if quick else 900)
        try:
            url = server.wait_ready()
            writer.start()
            asyncio.run(open_loop(url, cat.user_ids, 50, 1.0))  # connections, caches, the first refreshes
            time.sleep(0.5)  # the warm-up's feature events written
            cpu0, lines0 = server.cpu_s(), _feature_lines(data)
            host0 = HostCpu.read()
            run = asyncio.run(open_loop(url, cat.user_ids, RATE, duration))
            host1 = HostCpu.read()
            time.sleep(0.5)
            cpu1, served = server.cpu_s(), (_feature_lines(data) - lines0) / K
            if os.environ.get("FRESHREC_BENCH_VERBOSE"):
                _report(run, sys.stderr)
            yield compared("serve.recommend_p99", "ms", run.p99, "numpy V@u+argpartition p99",
                           float(np.percentile(base, 99) * 1000.0))
            yield Figure("serve.recommend_p50", run.p(50), "ms")
            yield Figure("serve.recommend_failed", float(len(run.latency_ms) - run.ok), "requests")
            yield Figure("serve.loadgen_lag_p99", run.lag_p99, "ms")
            # The machine in that window: a p99 far off with much CPU stolen is the host's, not ours.
            yield from host_figures("serve.recommend", host_shares(host0, host1))
            # What the machine's load moves least: the server processes' CPU time per request they
            # answered (feature lines / k: timed-out requests were served too), beside the bare top-k.
            yield compared("serve.recommend_cpu", "ms/request", (cpu1 - cpu0) * 1000.0 / max(served, 1.0),
                           "numpy V@u+argpartition mean", float(np.mean(base) * 1000.0))
            steps: list[Run] = []
            best = find_max_rate(url, cat.user_ids, step_s, bisections, log=steps)
            if os.environ.get("FRESHREC_BENCH_VERBOSE"):
                for s in steps:
                    _report(s, sys.stderr)
            yield compared("serve.max_rate", "req/s", best, "numpy V@u+argpartition 1/mean",
                           1.0 / float(np.mean(base)))
            yield Figure("serve.max_rate_loadgen_lag_p99", max((s.lag_p99 for s in steps),
                                                               default=0.0), "ms")
        finally:
            stop.set()
            server.stop()
            if writer.is_alive() or writer.exitcode is not None:
                writer.join(30)


def _feature_lines(data: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in (data / "features").glob("*.jsonl"))


def _report(run: Run, out: Any) -> None:
    print(f"  rate {run.rate:7.1f}/s sent {run.sent} ok {run.ok} errors {run.errors} p50 {run.p(50):.2f} "
          f"p99 {run.p99:.2f} max {run.p(100):.2f} ms; send lag p99 {run.lag_p99:.2f} ms",
          file=out, flush=True)
