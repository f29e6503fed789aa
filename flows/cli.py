"""The `freshrec` command: one entry point for the flow, the local broker and the tools.

Every setting of `Config` is an environment variable and a flag of the commands that use it; a
flag wins over the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from flows.config import LMDB_CAP, Config, ConfigError, ensure_state_dir
from flows.kafka_client import check_broker


def _config_flags() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (each overrides its environment variable)")
    for f in dataclasses.fields(Config):
        env, default, doc = f.metadata["env"], f.metadata["default"], f.metadata["doc"]
        group.add_argument("--" + f.name.replace("_", "-"), dest=f"cfg_{f.name}", metavar="V",
                           help=f"{doc} [{env}, default {default}]")
    return parent


def _config(args: argparse.Namespace) -> Config:
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    return Config.from_env(**overrides)


def _export(args: argparse.Namespace) -> dict[str, str]:
    """The environment for a child process, with this command's flags applied."""
    env = dict(os.environ)
    for f in dataclasses.fields(Config):
        value = getattr(args, f"cfg_{f.name}", None)
        if value is not None:
            env[f.metadata["env"]] = str(value)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def cmd_run(args: argparse.Namespace) -> int:
    """Run the streaming job with Bytewax's own flags (-w, -i/-a, -r/-s/-b)."""
    config = _config(args)
    ensure_state_dir(config)
    recovery = _recovery_dir(args.bytewax_args)
    if recovery is not None and not recovery.exists():
        # Bytewax wants its recovery partitions made first; one is enough on one machine.
        recovery.mkdir(parents=True)
        subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), "1"], check=True)
        print(f"made the Bytewax recovery directory {recovery}", file=sys.stderr)
    cmd = [sys.executable, "-m", "bytewax.run", "flows.pipeline:flow", *args.bytewax_args]
    return subprocess.call(cmd, env=_export(args))


def _recovery_dir(bytewax_args: list[str]) -> Path | None:
    for i, a in enumerate(bytewax_args):
        if a in ("-r", "--recovery-directory") and i + 1 < len(bytewax_args):
            return Path(bytewax_args[i + 1])
        if a.startswith("--recovery-directory="):
            return Path(a.split("=", 1)[1])
    return None


def cmd_sample(args: argparse.Namespace) -> int:
    from flows.sample import write_sample

    config = _config(args)
    counts = write_sample(config.data_dir, requests=args.requests, seed=args.seed)
    print(f"wrote {counts.items} items, {counts.features} feature events, {counts.actions} action "
          f"events and {counts.malformed} malformed lines under {config.data_dir}")
    return 0


def _count_lines(directory: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in directory.glob("*.jsonl")) if directory.is_dir() else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole loop, live, on the embedded default: flow, model server, closed-loop simulator."""
    if args.sample:
        return cmd_demo_sample(args)
    from flows.demo import DemoOptions, run_demo

    # The demo's own defaults, where the environment and the flags say nothing: a following flow,
    # a short join window (the simulated users act within seconds), quick examples.
    for name, value in (("follow", "1"), ("join_window_s", "30"), ("lateness_s", "1"), ("idle_s", "1")):
        env = next(f.metadata["env"] for f in dataclasses.fields(Config) if f.name == name)
        if getattr(args, f"cfg_{name}", None) is None and env not in os.environ:
            setattr(args, f"cfg_{name}", value)
    config = _config(args)
    opts = DemoOptions(duration_s=args.duration, rate=args.rate, seed=args.seed, workers=args.workers)
    return run_demo(config, opts)


def cmd_demo_sample(args: argparse.Namespace) -> int:
    """The flow over a generated sample on the embedded default (files and LMDB, no Kafka)."""
    import json

    config = _config(args)
    if config.source != "files":
        raise ConfigError("FRESHREC_SOURCE: the demo runs on the embedded default, `files`")
    fresh = not (config.stream_dir("features").is_dir() or config.stream_dir("actions").is_dir())
    if fresh:
        rc = cmd_sample(argparse.Namespace(**{**vars(args), "requests": args.requests, "seed": 7}))
        if rc:
            return rc
    else:
        print(f"using the events already under {config.data_dir}")
    dead_before = _count_lines(config.stream_dir("dead-letter"))
    print("running the flow: python -m bytewax.run flows.pipeline:flow ...")
    t0 = time.time()
    rc = cmd_run(argparse.Namespace(**{**vars(args), "bytewax_args": ["-w", str(args.workers)]}))
    if rc:
        return rc
    print(f"the flow ended by itself at the end of its input in {time.time() - t0:.1f} s")
    reasons: Counter[str] = Counter()
    dead_dir = config.stream_dir("dead-letter")
    for path in sorted(dead_dir.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            reasons[json.loads(line)["reason"]] += 1
    print(f"dead letters: {_count_lines(dead_dir) - dead_before} new, by reason:")
    for reason, n in reasons.most_common():
        print(f"  {n:6d}  {reason}")
    labels: Counter[str] = Counter()
    examples = config.stream_dir("examples")
    for path in sorted(examples.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            e = json.loads(line)
            labels["positive" if e["label"] else "explicit negative" if e["actions"] else "expired negative"] += 1
    print(f"training examples in {examples}: {sum(labels.values())} "
          f"({', '.join(f'{n} {kind}' for kind, n in labels.most_common())})")
    serving = config.state_dir / "serving"
    if config.train and serving.is_dir():
        from paramserver.serving import LmdbServingStore

        with LmdbServingStore(serving) as store:
            st = store.stats()
        print(f"serving store {serving}: params_version {st.params_version}, {st.entries} entries, "
              f"dense weights version {st.dense_version}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Progressive validation of online training against a frozen model and hashed tables."""
    from tqdm import tqdm

    from model import datasets
    from model.evaluate import examples_gone_through, frozen, hashed, online, report
    from model.features import FeatureSpec

    if args.dataset == "movielens":
        examples, fields, title = datasets.movielens_100k(), datasets.MOVIELENS_SPEC, "MovieLens-100K"
    else:
        examples, fields, title = datasets.drifting_stream(), datasets.DRIFTING_SPEC, "simulated users, drifting tastes"
    if args.limit:
        examples = examples[: args.limit]
    spec = FeatureSpec(fields["user_slots"], fields["item_slots"], (), args.dim)
    print(f"{title}: {len(examples)} examples in event-time order", file=sys.stderr)
    runs = []
    for fn in (online, frozen, hashed):
        # A bar on stderr only when it is a terminal (disable=None): logs and pipes stay clean.
        with tqdm(total=examples_gone_through(fn, len(examples)), desc=fn.__name__, unit="ex",
                  disable=None, leave=False) as bar:
            run = fn(examples, spec, batch_size=args.batch, progress=bar.update)
        print(f"  {run.name:32s} AUC over the second half {run.auc_second_half:.4f}  "
              f"log loss {run.logloss_second_half:.4f}  {run.examples_per_s:,.0f} examples/s", file=sys.stderr)
        runs.append(run)
    js, png = report(runs, Path(args.out) / args.dataset, title)
    print(f"report: {js} and {png}")
    return 0


def cmd_train_batch(args: argparse.Namespace) -> int:
    """Batch training on the examples stream; online training then continues from its state."""
    import msgspec
    from tqdm import tqdm

    from flows.events import Example
    from flows.streams import read_lines, stream_files
    from model.features import FeatureSpec
    from model.trainer import OnlineTrainer, parameter_store
    from paramserver.serving import LmdbServingStore, ServingWriter
    from paramserver.sync import DeltaSync

    config = _config(args)
    ensure_state_dir(config)
    decode = msgspec.json.Decoder(Example).decode
    examples = []
    for path in stream_files(config.stream_dir("examples")):
        for lines in read_lines(path):
            examples += [decode(x) for x in lines]
    if not examples:
        raise ConfigError(f"FRESHREC_DATA_DIR: no examples under {config.stream_dir('examples')}; run the flow first")
    examples.sort(key=lambda e: e.label_ts)
    spec = FeatureSpec(config.user_slots, config.item_slots, config.dense_features, config.embedding_dim)
    params = parameter_store(spec, config.state_dir / "params", checkpoint_max_bytes=config.lmdb_max_bytes,
                             cap_name=LMDB_CAP)
    tags = params.tags()
    if tags:
        params.restore(tags[-1])
    trainer = OnlineTrainer(spec, params)
    if params.dense().arrays:
        trainer.load_dense_state(params.dense().arrays)
    for epoch in range(args.epochs):
        losses = []
        with tqdm(total=len(examples), desc=f"epoch {epoch + 1}/{args.epochs}", unit="ex", disable=None,
                  leave=False) as bar:
            for i in range(0, len(examples), args.batch):
                step = trainer.train(examples[i:i + args.batch])
                losses.append(step.loss)
                bar.update(step.size)
        print(f"epoch {epoch + 1}/{args.epochs}: {len(examples)} examples, mean loss {sum(losses) / len(losses):.4f}",
              file=sys.stderr)
    params.set_dense(trainer.dense_state())
    tag = (tags[-1] if tags else 0) + 1
    params.checkpoint(tag)
    store = LmdbServingStore(config.state_dir / "serving", writer=True, max_map_size=config.lmdb_max_bytes,
                             cap_name=LMDB_CAP)
    rows = DeltaSync(params, ServingWriter(store)).sync(dense=True)
    store.close()
    print(f"trained {len(examples)} examples x {args.epochs} epochs; tables checkpointed as {tag}; "
          f"{rows} rows and the dense weights published to {config.state_dir / 'serving'}")
    return 0


def cmd_replica(args: argparse.Namespace) -> int:
    """A serving replica: a full copy of `param-deltas` (compacted) into its own LMDB, then the deltas."""
    import threading

    from paramserver.replica import ParamDeltaReplica
    from paramserver.serving import LmdbServingStore

    config = _config(args)
    check_broker(config.brokers, config.kafka_settings())
    store = LmdbServingStore(args.store, writer=True, name="replica", max_map_size=config.lmdb_max_bytes,
                             cap_name=LMDB_CAP)
    stop = threading.Event()
    try:
        with ParamDeltaReplica(store, config.brokers, config.topic("param-deltas"),
                               consumer_config=config.kafka_settings()) as replica:
            n = replica.bootstrap(timeout_s=args.timeout)
            st = store.stats()
            print(f"replica {args.store} caught up: {n} records applied, params_version {st.params_version}, "
                  f"primary version {st.source_version}, {st.entries} entries", flush=True)
            if not args.once:
                try:
                    replica.run(stop)
                except KeyboardInterrupt:
                    stop.set()
    finally:
        store.close()
    return 0


DEFAULT_RECOMMENDER = "model.recommender:build_recommender"


def _recommender_factory(spec: str):
    """The function named `module:function` that builds the recommender, imported only now (it
    brings TensorFlow); a clear message when it is not there."""
    import importlib

    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ConfigError(f"--recommender={spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if e.name is not None and module_name.startswith(e.name):
            raise ConfigError(f"--recommender={spec}: there is no module {module_name} in this installation "
                              f"(no recommender to serve yet?): {e}") from None
        raise
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ConfigError(f"--recommender={spec}: {module_name} has no function {func_name}")
    return factory


def cmd_serve(args: argparse.Namespace) -> int:
    """The model server: recommendations, feature events and action events over HTTP."""
    import logging
    import threading

    from model.server import serve

    config = _config(args)
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port={args.port}: expected 0 to 65535")
    factory = _recommender_factory(args.recommender)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.source == "kafka" or args.replica:
        # Refused credentials stop the start; a broker that is down does not (POST /actions: 503).
        check_broker(config.brokers, config.kafka_settings(), timeout_s=30.0 if args.replica else 5.0,
                     unreachable_ok=not args.replica)
    if not args.replica:
        recommender = factory(config)
        serve(recommender, config, args.host, args.port,
              on_ready=lambda url: print(f"serving on {url}", flush=True))
        return 0
    # A replica: the server's own serving store, fed by param-deltas, read by its recommender.
    from paramserver.replica import ParamDeltaReplica
    from paramserver.serving import LmdbServingStore

    store_path = Path(args.store) if args.store else config.state_dir / "serving-replica"
    store = LmdbServingStore(store_path, writer=True, name="replica", max_map_size=config.lmdb_max_bytes,
                             cap_name=LMDB_CAP)
    stop = threading.Event()
    failed: list[BaseException] = []
    try:
        with ParamDeltaReplica(store, config.brokers, config.topic("param-deltas"),
                               consumer_config=config.kafka_settings()) as replica:
            def follow() -> None:
                try:
                    replica.run(stop)
                except BaseException as e:  # reported at shutdown; the server keeps its last state
                    failed.append(e)
                    logging.getLogger("freshrec.serve").exception("the replica stopped following param-deltas")

            thread = threading.Thread(target=follow, name="param-deltas-replica", daemon=True)
            thread.start()
            try:
                recommender = factory(config, store=store)
                serve(recommender, config, args.host, args.port,
                      on_ready=lambda url: print(f"serving on {url} as a replica of "
                                                 f"{config.topic('param-deltas')} into {store_path}", flush=True))
            finally:
                stop.set()
                thread.join()
    finally:
        store.close()
    if failed:
        print(f"freshrec serve: the replica failed: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def lower_own_autogroup(nice: int) -> bool:
    """Linux's autogroup (on by default on many distributions) shares CPU between sessions first,
    and a nice value weighs only within its session: a dashboard in a session of its own (a
    service, `setsid`, a launcher) competes with the flow's session as an equal whatever its nice
    value. When this process leads its session, give the session's autogroup the nice value too.
    In a terminal the shell leads the session: left alone (the value would reach the shell and all
    it runs). True when set."""
    if os.getsid(0) != os.getpid():
        return False
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        return False  # no autogroup here (or not allowed): os.nice alone is what there is
    return True


def cmd_dashboard(args: argparse.Namespace) -> int:
    """The live dashboard: scrapes the flow's processes and the model server, serves one page."""
    import asyncio

    from flows.dashboard import Scraper, Target, default_targets, serve

    config = _config(args)
    urls = ([u.strip() for u in args.targets.split(",") if u.strip()] if args.targets else
            default_targets(config.metrics_port, args.processes, bool(os.environ.get("BYTEWAX_DATAFLOW_API_ENABLED"))))
    scraper = Scraper([Target(u) for u in urls], interval_s=args.interval, history=args.history,
                      token=config.api_token, serving_dir=config.state_dir / "serving")
    if args.nice > 0:
        # The dashboard watches; the flow and the model server are the work. Where CPU is short,
        # its scrapes may come late, never the flow's events.
        try:
            os.nice(args.nice)
        except OSError as e:
            print(f"freshrec dashboard: --nice {args.nice}: {e.strerror}; running at normal priority", file=sys.stderr)
        lower_own_autogroup(args.nice)
    try:
        asyncio.run(serve(scraper, args.host, args.port, config.api_token))
    except OSError as e:
        print(f"freshrec dashboard: cannot listen on {args.host}:{args.port} ({e.strerror})", file=sys.stderr)
        return 1
    return 0


def _progress_bar(total: int, unit: str):
    """A tqdm bar on stderr, quiet when stdout is not a terminal (logs, pipes, tests)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, dynamic_ncols=True, disable=not sys.stdout.isatty())


def cmd_simulate(args: argparse.Namespace) -> int:
    """Synthetic users: open loop (events straight to the streams) or closed loop (a model server)."""
    from flows.outputs import open_output
    from flows.simulate import ClosedLoop, OpenLoop, ServerError, World

    config = _config(args)
    if args.rate is None:
        args.rate = 1000.0 if args.open_loop else 20.0
    if args.k is None:
        args.k = 5 if args.open_loop else 10
    if args.rate <= 0 or args.duration <= 0:
        raise ConfigError("freshrec simulate: --rate and --duration must be > 0")
    world = World(args.seed, args.users, args.items, args.authors, args.tags, args.dim)
    if args.open_loop:
        if args.url:
            raise ConfigError("freshrec simulate: --open-loop plays the model server itself; leave out --url")
        output = open_output(config, "sim")
        loop = OpenLoop(world, output, rate=args.rate, impressions_per_action=args.impressions_per_action,
                        k=args.k, popular=args.popular, seed=args.seed)
        where = config.brokers if config.source == "kafka" else str(config.data_dir)
        print(f"open loop: {args.rate:g} actions/s with about {args.impressions_per_action:g} feature events "
              f"each, for {args.duration:g} s, to {config.source} ({where})", file=sys.stderr)
        bar = _progress_bar(int(args.rate * args.duration), "actions")
        shown = [0]

        def progress(st) -> None:
            bar.update(st.decided - shown[0])
            shown[0] = st.decided

        try:
            st = loop.run(args.duration, flush_pending=args.flush_pending, progress=progress)
        finally:
            bar.close()
            output.close()
        print(f"wrote {st.items} item events, {st.features} feature events ({st.feature_rate:,.0f}/s) and "
              f"{st.actions} action events in {st.elapsed_s:.1f} s; actions decided {st.action_rate:,.0f}/s "
              f"(target {args.rate:g}/s, at worst {st.max_behind_s:.2f} s behind schedule); "
              f"{st.pending_at_end} actions not yet due at the end"
              + (f", {st.flushed} of them written anyway (--flush-pending)" if st.flushed else
                 " (not written; --flush-pending writes them)"))
        return 0
    url = args.url or "http://127.0.0.1:8000"
    loop = ClosedLoop(world, url, config, rate=args.rate, k=args.k, seed=args.seed,
                      concurrency=args.concurrency, window_s=args.window)
    print(f"closed loop against {url}: {args.rate:g} requests/s of k={args.k} for {args.duration:g} s "
          f"(a random list's expected hit rate here: {world.mean_p():.3f})", flush=True)

    def tick(st) -> None:
        win = st.last_complete_window()
        if win is None:
            return
        print(f"{st.elapsed_s:6.0f} s  requests {len(st.records):6d}  hit rate: last {args.window:g} s "
              f"{win.hit_rate:.3f}, "
              f"last {args.last} {st.hit_rate(args.last):.3f}, all {st.hit_rate():.3f}  "
              f"hit@{args.k} {st.hit_at_k(args.last):.3f}  actions posted {st.actions_posted}  "
              f"retries {st.retries}  failed requests {st.failed_requests}", flush=True)

    try:
        st = loop.run(args.duration, on_tick=tick, flush_pending=args.flush_pending)
    except ServerError as e:
        print(f"freshrec simulate: the model server at {url}: {e}", file=sys.stderr)
        return 1
    if not st.records:
        print(f"freshrec simulate: no answer from the model server at {url} ({st.failed_requests} requests "
              "failed); is `freshrec serve` running there?", file=sys.stderr)
        return 1
    if not any(r.served for r in st.records):
        print("freshrec simulate: the model server served no items: has its catalog (the flow's items, in the "
              "serving store) come yet?", file=sys.stderr)
    print(f"done: {len(st.records)} requests, hit rate {st.hit_rate():.3f} (last {args.last}: "
          f"{st.hit_rate(args.last):.3f}; random lists: {st.random_baseline:.3f}), {st.actions_posted} actions "
          f"posted, {st.pending_at_end} not yet due at the end"
          + (" (posted anyway: --flush-pending)" if st.flushed else "")
          + f", {len(st.rejected)} batches rejected")
    return 1 if st.rejected else 0


def cmd_replay(args: argparse.Namespace) -> int:
    """A data set onto the input streams in event-time order."""
    from flows.outputs import open_output
    from flows.replay import replay_movielens

    config = _config(args)
    if args.speedup < 0:
        raise ConfigError("freshrec replay: --speedup must be >= 0 (0: as fast as possible)")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("freshrec replay: --limit must be >= 1")
    output = open_output(config, "replay")
    bar = _progress_bar(args.limit or 100_000, "ratings")
    try:
        st = replay_movielens(output, speedup=args.speedup, limit=args.limit, progress=bar.update)
    finally:
        bar.close()
        output.close()
    print(f"MovieLens-100K: {st.items} item events, {st.features} feature events and {st.actions} action "
          f"events ({st.positives} likes: ratings >= 4) to {config.source}, in {st.elapsed_s:.1f} s")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    config = _config(args)
    for f in dataclasses.fields(Config):
        value = getattr(config, f.name)
        if f.name == "api_token" and value:
            value = "(set)"  # a secret: not printed
        print(f"{f.metadata['env']}={value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freshrec",
        description="freshrec: a real-time recommendation loop (streaming join, online training, "
                    "sub-second parameter sync).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    flags = _config_flags()

    p = sub.add_parser("demo", parents=[flags], help="the whole loop, live, on files and LMDB (no Kafka): the flow, "
                       "the model server and the closed-loop simulator")
    p.add_argument("--duration", type=float, default=90.0, help="seconds to run (0: until Ctrl-C)")
    p.add_argument("--rate", type=float, default=20.0, help="the simulator's recommendation requests per second")
    p.add_argument("--seed", type=int, default=7, help="the simulated world's seed")
    p.add_argument("--workers", type=int, default=1, help="Bytewax workers (-w)")
    p.add_argument("--sample", action="store_true",
                   help="instead: run the flow once over a generated sample of events (some malformed) to its end")
    p.add_argument("--requests", type=int, default=2000, help="with --sample: recommendation requests in the sample")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", parents=[flags], help="run the streaming job (python -m bytewax.run flows.pipeline:flow)",
                       epilog="Bytewax's own flags pass through: -w N, -i I -a ADDRS, -r DIR -s S -b B.")
    p.set_defaults(func=cmd_run, passes_unknown=True, bytewax_args=[])

    p = sub.add_parser("sample", parents=[flags], help="write a sample of item, feature and action events")
    p.add_argument("--requests", type=int, default=2000, help="recommendation requests in the sample")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_sample)

    sub.add_parser("kafka", help="start|stop|status a local Kafka broker (KRaft, 127.0.0.1) for machines "
                   "without Docker; see freshrec kafka --help")

    p = sub.add_parser("eval", help="progressive validation: online vs frozen vs hashed, a JSON and PNG report")
    p.add_argument("dataset", choices=["movielens", "simulator"])
    p.add_argument("--out", default="reports", help="folder for report.json and report.png")
    p.add_argument("--batch", type=int, default=8, help="examples per online step")
    p.add_argument("--dim", type=int, default=16, help="embedding width")
    p.add_argument("--limit", type=int, default=0, help="only the first N events (0: all)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train-batch", parents=[flags], help="train on the examples stream in batch, publish to serving")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.set_defaults(func=cmd_train_batch)

    p = sub.add_parser("replica", parents=[flags],
                       help="a serving replica fed by the param-deltas topic (a full copy, then the deltas)")
    p.add_argument("--store", required=True, help="the replica's own LMDB serving store (a folder)")
    p.add_argument("--once", action="store_true", help="stop once caught up with the topic's end")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds the full copy may take")
    p.set_defaults(func=cmd_replica)

    p = sub.add_parser("serve", parents=[flags], help="the model server (HTTP): recommendations, feature events, "
                       "action events")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    p.add_argument("--recommender", default=DEFAULT_RECOMMENDER, metavar="MODULE:FUNCTION",
                   help="the function that builds the recommender from the settings, called as "
                        f"function(config) or, with --replica, function(config, store=...) "
                        f"[default {DEFAULT_RECOMMENDER}]")
    p.add_argument("--replica", action="store_true",
                   help="serve from the server's own serving store, fed by the param-deltas topic (Kafka)")
    p.add_argument("--store", default=None,
                   help="with --replica: the replica's LMDB serving store [default $FRESHREC_STATE_DIR/serving-replica]")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("dashboard", parents=[flags], help="a live dashboard of the flow and the model server",
                       epilog="Default targets: the flow's metrics port(s) (FRESHREC_METRICS_PORT + process id), "
                              "the model server's http://127.0.0.1:8000/metrics, and Bytewax's API server "
                              "(127.0.0.1:3030) when BYTEWAX_DATAFLOW_API_ENABLED is set.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8050, help="port to listen on (0: any free one, printed)")
    p.add_argument("--targets", default="", help="comma-separated /metrics addresses to scrape (replaces the defaults)")
    p.add_argument("--processes", type=int, default=1, help="flow processes (-i 0..N-1) to scrape by default")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    p.add_argument("--history", type=int, default=600, help="scrapes kept (the charts' width)")
    p.add_argument("--nice", type=int, default=10,
                   help="run this much below normal priority (os.nice), so a busy machine serves the flow first; 0: "
                        "as is")
    p.set_defaults(func=cmd_dashboard)


    p = sub.add_parser("simulate", parents=[flags],
                       help="synthetic users with hidden tastes: against a model server (closed loop) or "
                            "straight to the streams (--open-loop)")
    p.add_argument("--open-loop", action="store_true",
                   help="write item, feature and action events to the streams, playing a naive server")
    p.add_argument("--url", default=None, help="closed loop: the model server [http://127.0.0.1:8000]")
    p.add_argument("--rate", type=float, default=None,
                   help="open loop: actions per second [1000]; closed loop: requests per second [20]")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of wall time")
    p.add_argument("--impressions-per-action", type=float, default=5.0,
                   help="open loop: about this many feature events per action")
    p.add_argument("--k", type=int, default=None, help="items per request [open loop 5, closed loop 10]")
    p.add_argument("--popular", action="store_true", help="open loop: show popular items, not random ones")
    p.add_argument("--flush-pending", action="store_true",
                   help="at the end, also write the actions not yet due (their ts is in the future)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--authors", type=int, default=100)
    p.add_argument("--tags", type=int, default=40)
    p.add_argument("--dim", type=int, default=16, help="width of the hidden taste vectors")
    p.add_argument("--concurrency", type=int, default=4, help="closed loop: users asking at once")
    p.add_argument("--window", type=float, default=5.0, help="closed loop: seconds per hit-rate line")
    p.add_argument("--last", type=int, default=200, help="closed loop: also report the last N requests' hit rate")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("replay", parents=[flags], help="replay a data set onto the streams in event-time order")
    p.add_argument("dataset", choices=["movielens"])
    p.add_argument("--speedup", type=float, default=0.0,
                   help="divide event-time gaps by X (0: as fast as possible)")
    p.add_argument("--limit", type=int, default=None, help="only the first N ratings")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("settings", parents=[flags], help="print the settings in force, validated")
    p.set_defaults(func=cmd_settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["kafka"]:
        # The broker manager has its own parser (and --help).
        from flows.kafka_local import main as kafka_main

        return kafka_main(argv[1:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not getattr(args, "passes_unknown", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.bytewax_args = [a for a in unknown if a != "--"]
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"freshrec: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
