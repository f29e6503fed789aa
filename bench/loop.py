"""serve.freshness_p50 / _p99 / serve.rate_held: the whole loop under an open-loop load, once on
files (no suffix) and once through a Kafka broker (`.kafka`).

Three processes besides this one: the flow (`FlowProcess`, follow mode, training on, defaults
except a temporary data/state directory and `DEPLOYMENT`), the open-loop simulator at the
target rate (5,000 actions/s, 5 feature events per action; `--quick`: 1,000/s), and a reader that
polls the serving LMDB read-only every few ms. Freshness (CONTRACT.md) of a row is the poll time at
which the reader first sees it at a new version minus the earliest arrival behind it (rows updated
only by expired negatives carry none and are left out); the figures are over `user_id` rows, what a
user's next recommendation depends on. The baseline beside each: the same run's arrival -> example
written (the join's part, so ratio - 1 is what training and sync add). Also reported: the flow's
own `freshrec_sync_freshness_seconds` over the same window, and every row slot together.

`serve.rate_held` is the flow's consumed events/s (features + actions, `freshrec_source_events`)
over the offered events/s, in the measured window after a warm-up; its baseline is what the
simulator achieved over the offered rate. Absolute figures, on a shared 2-core machine: noisy.
`serve.flow_cpu_per_event` is the flow's CPU time (its processes, all threads) per event consumed
in the window, beside its main thread's (with `-w 1` and one process, the thread that runs the
dataflow; otherwise no baseline): steadier than the rate held.

`FRESHREC_BENCH_LOOP_ENV` (a JSON object of FRESHREC_* settings) overrides the flow's settings, to
try tunings without changing defaults; `FRESHREC_BENCH_LOOP_WORKERS` sets `-w`;
`FRESHREC_BENCH_LOOP_PROCESSES` runs the flow as a cluster of that many processes (`-i/-a`);
`FRESHREC_BENCH_LOOP_SOURCES` (`files,kafka`) picks the sources; `FRESHREC_BENCH_LOOP_RATE` offers
another number of actions/s (to find the rate the loop holds; the targets are at the default);
`KAFKA_BOOTSTRAP` names a broker to use instead of starting one.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bench import Figure, HostCpu, benchmark, compared, host_figures, host_shares, process_cpu_s
from flows.config import Config

FEATURES_PER_ACTION = 5
# The flow's settings that differ from the defaults, as a deployment at this rate would set them: a
# short join window; expired negatives sampled at 0.2 (weight 5), since four impressions in five
# expire and training all 25,000 a second would take this machine's whole CPU; and a join cache
# that holds the waiting impressions (25,000/s for the window and the lateness, 375,000, where the
# default holds 400,000 over 8 buckets, so any backlog spilled them to LMDB). At this rate the
# trainer gets about 9,000 examples a second: a step of up to 1,024 of them (or what 50 ms brought)
# rather than 256 spends less of the flow's one core on each step's fixed cost, and a sync every
# 100 ms (within the 250 ms freshness target) writes a row touched twice in that time once. Three
# runs of each, alternated (README): Kafka rate held 0.67-0.78 against 0.62-0.68; files freshness
# p99 0.92-1.89 s against 1.79-2.59 s, both holding the rate (0.98). The simulator logs no serving
# score, so the trainer scores impressions on arrival for progressive validation: 5% of the keys
# (1,250 impressions a second, the 10,000-pair window in 8 s) rather than the expiry's 20%, whose
# scoring was 6.6% of the flow's thread (py-spy); three runs of the whole flow over the same 30 s
# of this load, each beside one without it: 0.94-1.00x the main thread's CPU an event.
DEPLOYMENT = {"join_window_s": "10", "neg_sample_rate": "0.2", "join_cache": "100000",
              "train_batch": "1024", "sync_interval_ms": "100", "validation_sample": "0.05"}
POLL_S = 0.005  # the reader's poll interval: a bound on what it adds to each freshness
ROW_SKIP = (b"item/", b"user/", b"dense/")  # catalog entries and dense chunks, not embedding rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Samples of the flow's /metrics: {(name, sorted labels): value}; empty if it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _scrape_all(ports: list[int]) -> dict[tuple[str, tuple], float]:
    """The flow's samples summed over its processes (empty if any does not answer)."""
    out: dict[tuple[str, tuple], float] = {}
    for port in ports:
        got = _scrape(port)
        if not got:
            return {}
        for k, v in got.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _events(samples: dict) -> float:
    return sum(v for (name, labels), v in samples.items()
               if name == "freshrec_source_events_total" and dict(labels).get("stream") in ("features", "actions"))


def _histogram_quantiles(before: dict, after: dict, name: str, qs: tuple[float, ...]) -> list[float]:
    """Quantiles (linear within a bucket) of a histogram's observations between two scrapes."""
    def buckets(s: dict) -> dict[float, float]:
        acc: dict[float, float] = {}
        for (n, labels), v in s.items():
            if n == name + "_bucket":
                le = float(dict(labels)["le"])
                acc[le] = acc.get(le, 0.0) + v
        return acc

    b, a = buckets(before), buckets(after)
    edges = sorted(a)
    cum = np.array([a[e] - b.get(e, 0.0) for e in edges])
    if not len(cum) or cum[-1] <= 0:
        return [float("nan")] * len(qs)
    out = []
    for q in qs:
        target = q * cum[-1]
        i = int(np.searchsorted(cum, target))
        lo_edge = edges[i - 1] if i else 0.0
        hi_edge = edges[i] if np.isfinite(edges[i]) else lo_edge
        lo_cum = cum[i - 1] if i else 0.0
        frac = (target - lo_cum) / (cum[i] - lo_cum) if cum[i] > lo_cum else 1.0
        out.append(lo_edge + frac * (hi_edge - lo_edge))
    return out


# -- the child processes ------------------------------------------------------------------------

def _simulate(config: Config, rate: float, duration_s: float, out_path: str) -> None:
    """The load: an open loop at `rate` actions/s; its progress (time, features, actions, decided)."""
    from flows.outputs import open_output
    from flows.simulate import OpenLoop, World

    output = open_output(config, "bench-loop")
    progress: list[tuple[float, int, int, int]] = []

    def note(stats: Any) -> None:
        now = time.time()
        if not progress or now - progress[-1][0] >= 0.25:
            progress.append((now, stats.features, stats.actions, stats.decided))

    loop = OpenLoop(World(seed=11), output, rate=rate, impressions_per_action=FEATURES_PER_ACTION, seed=3)
    stats = loop.run(duration_s, progress=note)
    output.close()
    progress.append((time.time(), stats.features, stats.actions, stats.decided))
    Path(out_path).write_text(json.dumps({"progress": progress, "decided": stats.decided,
                                          "elapsed_s": stats.elapsed_s, "max_behind_s": stats.max_behind_s}))


def _read_loop(config: Config, until: float, out_path: str) -> None:
    """Polls the serving store (and the examples stream) until `until` (wall time); writes
    (seen, arrival) pairs of user_id rows, of all rows, and of examples, as .npy files."""
    from paramserver.records import decode_rows
    from paramserver.serving import LmdbServingStore, ServingStoreError

    path = config.state_dir / "serving"
    store = None
    while store is None and time.time() < until:
        try:
            store = LmdbServingStore(path)
        except ServingStoreError:
            time.sleep(0.05)
    users: list[tuple[float, float]] = []
    rows: list[tuple[float, float]] = []
    examples: list[tuple[float, float]] = []
    tail = _ExampleTail(config)
    seen_version: dict[bytes, int] = {}
    version = store.params_version() if store is not None else 0
    while time.time() < until:
        t_poll = time.time()
        if store is not None:
            got = store.changes_since(version)
            now = time.time()
            if got is None:  # pruned or rebuilt: start again from here
                version = store.params_version()
            else:
                version, keys = got
                by_slot: dict[bytes, list[bytes]] = {}
                for k in keys:
                    if not k.startswith(ROW_SKIP):
                        by_slot.setdefault(k.split(b"/", 1)[0], []).append(k)
                for slot, ks in by_slot.items():
                    vals = store.get(ks)
                    live = [(k, v) for k, v in zip(ks, vals, strict=True) if v]
                    if not live:
                        continue
                    dec = decode_rows([v for _, v in live])
                    for (k, _), ver, arr in zip(live, dec.versions.tolist(), dec.arrivals.tolist(), strict=True):
                        if seen_version.get(k) == ver or arr != arr:  # seen already, or no action behind it
                            continue
                        seen_version[k] = ver
                        rows.append((now, arr))
                        if slot == b"user_id":
                            users.append((now, arr))
        examples.extend(tail.poll())
        spare = POLL_S - (time.time() - t_poll)
        if spare > 0:
            time.sleep(spare)
    tail.close()
    np.save(out_path + ".users.npy", np.array(users, np.float64).reshape(-1, 2))
    np.save(out_path + ".rows.npy", np.array(rows, np.float64).reshape(-1, 2))
    np.save(out_path + ".examples.npy", np.array(examples, np.float64).reshape(-1, 2))


class _ExampleTail:
    """(written, label arrival) of each new example with a label arrival: for Kafka the message's
    log-append time, for files the poll time at which its line is first seen."""

    def __init__(self, config: Config) -> None:
        import msgspec

        class _Ex(msgspec.Struct):
            label_received_at: Optional[float] = None

        self._decoder = msgspec.json.Decoder(_Ex)
        self.config = config
        self._offsets: dict[Path, int] = {}
        self._consumer = None
        if config.source == "kafka":
            from confluent_kafka import Consumer

            self._consumer = Consumer({"bootstrap.servers": config.brokers, **config.kafka_settings(),
                                       "group.id": f"bench-{uuid.uuid4().hex}",
                                       "auto.offset.reset": "earliest", "enable.auto.commit": False})
            self._consumer.subscribe([config.topic("examples")])

    def _arrival(self, raw: bytes) -> Optional[float]:
        try:
            return self._decoder.decode(raw).label_received_at
        except Exception:  # a torn or foreign line: not an example to time
            return None

    def poll(self) -> list[tuple[float, float]]:
        out = []
        if self._consumer is not None:
            for m in self._consumer.consume(10_000, timeout=0):
                if m.error() is None:
                    arr = self._arrival(m.value())
                    if arr is not None:
                        out.append((m.timestamp()[1] / 1000.0, arr))
            return out
        now = time.time()
        for f in sorted(self.config.stream_dir("examples").glob("*.jsonl")):
            at = self._offsets.get(f, 0)
            try:
                with open(f, "rb") as fh:
                    fh.seek(at)
                    data = fh.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1
            self._offsets[f] = at + end
            for line in data[:end].splitlines():
                arr = self._arrival(line)
                if arr is not None:
                    out.append((now, arr))
        return out

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()


# -- one run ------------------------------------------------------------------------------------

def _at(progress: list, t: float, col: int) -> float:
    """The simulator's count in column `col` at wall time `t`, interpolated."""
    times = [p[0] for p in progress]
    return float(np.interp(t, times, [p[col] for p in progress]))


def run_loop(source: str, rate: float, warmup_s: float, measure_s: float, *, brokers: Optional[str] = None,
             overrides: Optional[dict[str, str]] = None, workers: int = 1, processes: int = 1,
             log_dir: Optional[Path] = None) -> dict[str, float]:
    """One run of the loop; the figures as a dict (milliseconds, fractions, events/s). `processes`
    > 1 runs the flow as that many processes of one Bytewax cluster (metrics on consecutive ports)."""
    from flows.processes import FlowProcess

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="freshrec-bench-loop-") as tmp:
        tmp_path = Path(tmp)
        port = _free_port()
        settings = {"data_dir": str(tmp_path / "data"), "state_dir": str(tmp_path / "state"), "follow": "1",
                    "train": "1", "metrics_port": str(port), "source": source, **DEPLOYMENT}
        if source == "kafka":
            from flows.kafka_local import COMPACTED_TOPICS, contract_topics, create_topics

            prefix = f"bl{uuid.uuid4().hex[:8]}."
            create_topics(brokers, {prefix + t: n for t, n in contract_topics().items()},
                          compacted=[prefix + t for t in COMPACTED_TOPICS])
            settings.update(brokers=brokers, topic_prefix=prefix)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
        config = Config.from_env(env, **{**settings, **(overrides or {})})
        cluster = ["-a", ";".join(f"127.0.0.1:{_free_port()}" for _ in range(processes))] if processes > 1 else []
        flows = [FlowProcess(config, ["-w", str(workers), *(["-i", str(i)] if cluster else []), *cluster],
                             log_path=(log_dir or tmp_path) / f"flow-{source}-{i}.log") for i in range(processes)]
        ports = [port + i for i in range(processes)]  # each process serves on the port plus its id
        sim = reader = None
        try:
            for f in flows:
                f.start()
            deadline = time.time() + 60
            while not _scrape_all(ports):  # the flow has built and serves its metrics
                if not all(f.running for f in flows) or time.time() > deadline:
                    raise RuntimeError(f"the flow did not start: {' | '.join(f.log_tail() for f in flows)}")
                time.sleep(0.2)
            duration = warmup_s + measure_s
            sim_out, read_out = str(tmp_path / "sim.json"), str(tmp_path / "read")
            t_start = time.time()
            reader = ctx.Process(target=_read_loop, args=(config, t_start + duration + 3.0, read_out))
            reader.start()
            sim = ctx.Process(target=_simulate, args=(config, rate, duration, sim_out))
            sim.start()
            # The window opens after the warm-up (the trainer imports TensorFlow on the first examples).
            while time.time() < t_start + warmup_s and sim.is_alive():
                time.sleep(0.1)
            pids = [f.proc.pid for f in flows if f.proc is not None]
            before, t_a, host_a, cpu_a = _scrape_all(ports), time.time(), HostCpu.read(), _flow_cpu(pids)
            sim.join(duration + 60)
            after, t_b, host_b, cpu_b = _scrape_all(ports), time.time(), HostCpu.read(), _flow_cpu(pids)
            reader.join(30)
            for f in flows:
                if not f.running:
                    raise RuntimeError(f"the flow stopped during the run (exit {f.proc.returncode}): {f.log_tail()}")
            if sim.exitcode != 0 or reader.exitcode != 0:
                raise RuntimeError(f"the simulator or the reader failed (exit {sim.exitcode}, {reader.exitcode})")
            simmed = json.loads(Path(sim_out).read_text())
            users = np.load(read_out + ".users.npy")
            rows = np.load(read_out + ".rows.npy")
            examples = np.load(read_out + ".examples.npy")
        finally:
            for p in (sim, reader):
                if p is not None and p.is_alive():
                    p.terminate()
                    p.join(10)
            for f in flows:
                f.stop()

    prog = simmed["progress"]
    t_end = prog[-1][0]
    t_b = min(t_b, t_end)
    offered = rate * (FEATURES_PER_ACTION + 1)
    written = sum(_at(prog, t_b, c) - _at(prog, t_a, c) for c in (1, 2)) / (t_b - t_a)
    events = _events(after) - _events(before)  # consumed in the window
    consumed = events / (t_b - t_a)
    # Events written but not yet read when the window closes, in seconds of the offered load.
    backlog_end = (sum(_at(prog, t_b, c) for c in (1, 2)) - _events(after)) / offered

    def window(pairs: np.ndarray) -> np.ndarray:
        # Actions that arrived in the window, so the warm-up's backlog is not counted.
        keep = (pairs[:, 1] >= t_a) & (pairs[:, 1] <= t_end)
        return (pairs[keep, 0] - pairs[keep, 1]) * 1000.0

    def pct(ms: np.ndarray, q: float) -> float:
        return float(np.percentile(ms, q)) if len(ms) else float("nan")

    u, r, e = window(users), window(rows), window(examples)
    h50, h99 = _histogram_quantiles(before, after, "freshrec_sync_freshness_seconds", (0.5, 0.99))
    host = host_shares(host_a, host_b)
    cpu_us, main_us = ((b - a) / events * 1e6 if events > 0 else float("nan")
                       for a, b in zip(cpu_a, cpu_b, strict=True))
    if workers != 1 or processes != 1:
        main_us = float("nan")  # Bytewax then runs its workers on threads of their own, not the main one
    return {
        "p50": pct(u, 50), "p99": pct(u, 99), "n_users": len(u),
        "rows_p50": pct(r, 50), "rows_p99": pct(r, 99), "n_rows": len(r),
        "example_p50": pct(e, 50), "example_p99": pct(e, 99), "n_examples": len(e),
        "flow_p50": h50 * 1000.0, "flow_p99": h99 * 1000.0,
        "consumed": consumed, "backlog_end_s": backlog_end, "written": written, "offered": offered,
        "sim_actions": simmed["decided"] / simmed["elapsed_s"], "rate": rate,
        # The machine over the window (nan where it does not say): busy, and stolen by the host.
        "host_busy": host[0] if host else float("nan"), "host_steal": host[1] if host else float("nan"),
        # The flow's CPU (its processes, all threads; and, with `-w 1` and one process, its main
        # thread, which runs the dataflow) per event consumed in the window: the cost of an event,
        # which moves far less with the machine's load than the rate held.
        "flow_cpu_us": cpu_us, "flow_main_us": main_us,
    }


def _flow_cpu(pids: list[int]) -> tuple[float, float]:
    """CPU seconds so far of the flow's processes, and of their main threads (nan unless /proc says)."""
    whole = [process_cpu_s(p) for p in pids]
    main = [process_cpu_s(p, p) for p in pids]
    nan = float("nan")
    return (nan if None in whole else sum(whole)), (nan if None in main else sum(main))  # type: ignore[arg-type]


def _figures(res: dict[str, float], suffix: str) -> Iterator[Figure]:
    yield compared("serve.freshness_p50" + suffix, "ms", res["p50"], "arrival->example p50", res["example_p50"])
    yield compared("serve.freshness_p99" + suffix, "ms", res["p99"], "arrival->example p99", res["example_p99"])
    yield compared("serve.rate_held" + suffix, "fraction", res["consumed"] / res["offered"],
                   "simulator's achieved", res["written"] / res["offered"])
    yield Figure("serve.backlog_end" + suffix, res["backlog_end_s"], "s of load")
    yield compared("serve.freshness_rows_p50" + suffix, "ms", res["rows_p50"], "flow histogram p50", res["flow_p50"])
    yield compared("serve.freshness_rows_p99" + suffix, "ms", res["rows_p99"], "flow histogram p99", res["flow_p99"])
    yield compared("serve.sim_actions" + suffix, "actions/s", res["sim_actions"], "offered", res["rate"])
    if res["flow_cpu_us"] == res["flow_cpu_us"]:  # not nan: /proc said
        if res["flow_main_us"] == res["flow_main_us"]:
            yield compared("serve.flow_cpu_per_event" + suffix, "us", res["flow_cpu_us"], "its main thread's",
                           res["flow_main_us"])
        else:
            yield Figure("serve.flow_cpu_per_event" + suffix, res["flow_cpu_us"], "us")
    said = res["host_steal"] == res["host_steal"]  # not nan: the system said
    yield from host_figures("serve.loop", (res["host_busy"], res["host_steal"]) if said else None, suffix)


def _broker() -> tuple[Optional[str], Any]:
    """(bootstrap, a broker this process started or None); (None, None) without Kafka."""
    env = os.environ.get("KAFKA_BOOTSTRAP")
    if env:
        return env, None
    from flows import kafka_local

    broker = kafka_local.LocalKafka(kafka_local.free_port_pair(), data_dir=tempfile.mkdtemp(prefix="freshrec-bench-kafka-"))
    try:
        return broker.start(topics=False), broker
    except kafka_local.KafkaLocalError as exc:
        broker.stop()
        print(f"bench loop: no Kafka broker ({exc}); the .kafka figures are left out", file=sys.stderr)
        return None, None


@benchmark("serve.freshness_p50", "serve.freshness_p99", "serve.rate_held")
def loop(quick: bool) -> Iterator[Figure]:
    rate, warmup, measure = (1000.0, 15.0, 10.0) if quick else (5000.0, 15.0, 60.0)
    rate = float(os.environ.get("FRESHREC_BENCH_LOOP_RATE", rate))
    overrides = json.loads(os.environ.get("FRESHREC_BENCH_LOOP_ENV", "{}"))
    fields = {f.metadata["env"]: f.name for f in Config.__dataclass_fields__.values()}
    overrides = {fields.get(k, k): str(v) for k, v in overrides.items()}
    workers = int(os.environ.get("FRESHREC_BENCH_LOOP_WORKERS", "1"))
    processes = int(os.environ.get("FRESHREC_BENCH_LOOP_PROCESSES", "1"))
    sources = os.environ.get("FRESHREC_BENCH_LOOP_SOURCES", "files,kafka").split(",")
    if "files" in sources:
        res = run_loop("files", rate, warmup, measure, overrides=overrides, workers=workers, processes=processes)
        print(f"  files: {json.dumps({k: round(v, 1) for k, v in res.items()})}", file=sys.stderr, flush=True)
        yield from _figures(res, "")
    if "kafka" in sources:
        brokers, broker = _broker()
        if brokers is None:
            return
        try:
            res = run_loop("kafka", rate, warmup, measure, brokers=brokers, overrides=overrides, workers=workers, processes=processes)
            print(f"  kafka: {json.dumps({k: round(v, 1) for k, v in res.items()})}", file=sys.stderr, flush=True)
            yield from _figures(res, ".kafka")
        finally:
            if broker is not None:
                broker.stop()
                shutil.rmtree(broker.data_dir, ignore_errors=True)
