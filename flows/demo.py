"""`freshrec demo`: the whole loop on the embedded default, live.

The flow follows the file streams in a child process (join, online training, sync to the serving
LMDB); the model server answers in this process on 127.0.0.1; the closed-loop simulator's users ask
it for recommendations and act on them by their hidden tastes; their actions go through
`POST /actions` to the action stream and back into the flow. Every few seconds the demo prints the
simulator's hit rate and the freshness of the serving store; once along the way it shows one user's
recommendations before and after they like several items of one author. Ctrl-C stops it cleanly:
the simulator, the server and the flow, in that order, with nothing left running.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from flows.config import Config, ConfigError
from flows.processes import FlowProcess

DEMO_USER = "demo-user"


@dataclass
class DemoOptions:
    duration_s: float = 90.0  # 0: until Ctrl-C
    rate: float = 20.0  # recommendation requests per second
    k: int = 10
    seed: int = 7
    users: int = 300
    items: int = 600
    authors: int = 40
    workers: int = 1
    show_user_at_s: float = 20.0


def _get(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (our own server on 127.0.0.1)
        return json.loads(r.read())


def _post(url: str, body: Any, timeout: float = 10.0) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",  # noqa: S310
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _authors(items: list[dict], world: Any) -> list[str]:
    out = []
    for it in items:
        i = world.item_index(it["item_id"])
        out.append(world.item_sparse(i)["author"] if i is not None else "?")
    return out


def _line(items: list[dict], authors: list[str], mark: str, n: int = 8) -> str:
    return "  ".join(f"{it['item_id']}({a}){'*' if a == mark else ''}" for it, a in zip(items[:n], authors[:n],
                                                                                          strict=False))


def show_one_user(base: str, world: Any, known: Callable[[str], bool], *, wait_s: float = 20.0,
                  out=print) -> Optional[float]:
    """One user's recommendations, before and after they like three items of one author.

    The user first skips a few items, so the model knows them and "before" is the model's list, not
    the cold-start one. Returns the seconds from the likes to a list that ranks that author's other
    items higher (None if that did not come within `wait_s`)."""
    q = urllib.parse.urlencode
    first = _get(f"{base}/recommend?{q({'user_id': DEMO_USER, 'k': 100})}")
    if len(first["items"]) < 20:
        out("  (the catalog is still filling; the demo user waits for the next run)")
        return None
    if not known(DEMO_USER):
        status, body = _post(f"{base}/actions", [
            {"request_id": first["request_id"], "user_id": DEMO_USER, "item_id": it["item_id"], "ts": time.time(),
             "action": "skip", "event_id": f"demo-skip-{it['item_id']}"} for it in first["items"][-3:]])
        deadline = time.monotonic() + wait_s
        while status == 202 and not known(DEMO_USER) and time.monotonic() < deadline:
            time.sleep(0.1)
    before = _get(f"{base}/recommend?{q({'user_id': DEMO_USER, 'k': 100})}")
    items = before["items"]
    authors = _authors(items, world)
    counts = Counter(a for a in authors[:60] if a != "?")
    author, _ = counts.most_common(1)[0]
    by_author = [it["item_id"] for it, a in zip(items, authors, strict=True) if a == author]
    liked, others = by_author[:3], set(by_author[3:])

    def rank_of_others(listing: list[dict]) -> float:
        pos = [i for i, it in enumerate(listing) if it["item_id"] in others]
        return sum(pos) / len(pos) if pos else float("inf")

    out(f"  {DEMO_USER}'s list (model {before['model_version']}), top 8, * = by {author}:")
    out("    " + _line(items, authors, author))
    status, body = _post(f"{base}/actions", [
        {"request_id": before["request_id"], "user_id": DEMO_USER, "item_id": i, "ts": time.time(),
         "action": "like", "event_id": f"demo-like-{i}"} for i in liked])
    if status != 202:
        out(f"  POST /actions answered {status}: {body}")
        return None
    out(f"  {DEMO_USER} likes {', '.join(liked)} (by {author})")
    # Positions counted without the liked items (they leave the list), so that alone moves nothing.
    start_rank = rank_of_others([it for it in items if it["item_id"] not in liked])
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait_s:
        after = _get(f"{base}/recommend?{q({'user_id': DEMO_USER, 'k': 100})}")
        if rank_of_others(after["items"]) < start_rank - 3:
            took = time.monotonic() - t0
            out(f"  {DEMO_USER}'s list {took:.2f} s later (model {after['model_version']}), top 8:")
            out("    " + _line(after["items"], _authors(after["items"], world), author))
            out(f"  {author}'s other items: mean position {start_rank:.1f} -> {rank_of_others(after['items']):.1f}")
            return took
        time.sleep(0.1)
    out(f"  {DEMO_USER}'s list had not moved towards {author} after {wait_s:.0f} s")
    return None


def wait_for_catalog(config: Config, world: Any, base: str, flow: FlowProcess, out, timeout_s: float = 300.0) -> None:
    """Writes the world's catalog to the items stream and waits until the server has it: the
    flow's start (TensorFlow's import included) takes a while on a small machine."""
    from flows.outputs import open_output, stamp

    output = open_output(config, "demo-items")
    try:
        catalog = world.catalog()
        stamp(catalog)
        output.write("items", catalog)
    finally:
        output.close()
    out("waiting for the flow to take in the catalog ...")
    t0 = time.monotonic()
    while not _get(f"{base}/healthz").get("items"):
        if not flow.running:
            raise RuntimeError("the flow stopped:\n" + flow.log_tail())
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"the flow did not take in the catalog within {timeout_s:.0f} s:\n" + flow.log_tail())
        time.sleep(0.2)
    out(f"the catalog is in the serving store after {time.monotonic() - t0:.1f} s")


def _watch(flow: FlowProcess, sim: threading.Thread, loop: Any, base: str, world: Any, opts: DemoOptions,
           known: Callable[[str], bool], out) -> None:
    out(f"simulator: {opts.users} users, {opts.items} items by {opts.authors} authors, "
        f"{opts.rate:g} requests/s, k={opts.k}; Ctrl-C stops")
    t0 = time.monotonic()
    shown = False
    last_n = 0
    while sim.is_alive():
        sim.join(5.0)
        if not flow.running:
            raise RuntimeError("the flow stopped:\n" + flow.log_tail())
        elapsed = time.monotonic() - t0
        stats = loop.stats
        n = len(stats.records)
        health = _get(f"{base}/healthz")
        fresh = health.get("freshness_ms")
        out(f"[{elapsed:5.0f} s] requests {n:6d}  hit rate of the last {n - last_n:4d}: "
            f"{stats.hit_rate(n - last_n) if n > last_n else 0:.3f}  overall {stats.hit_rate():.3f}  "
            f"params_version {health.get('params_version')}  items {health.get('items')}  "
            f"freshness {'-' if fresh is None else f'{fresh:.0f} ms'}")
        last_n = n
        if not shown and elapsed >= opts.show_user_at_s:
            shown = True
            show_one_user(base, world, known, out=out)


def run_demo(config: Config, opts: DemoOptions, out=print) -> int:
    from flows.simulate import ClosedLoop, World
    from model.recommender import build_recommender
    from model.server import running_server

    if config.source != "files":
        raise ConfigError("FRESHREC_SOURCE: the demo runs on the embedded default, `files`")
    if not config.follow:
        raise ConfigError("FRESHREC_FOLLOW: the demo's flow follows its files; set it to 1 (the demo's default)")
    log_path = config.state_dir / "demo-flow.log"
    out(f"data under {config.data_dir}, state under {config.state_dir}; the flow's log: {log_path}")
    world = World(seed=opts.seed, n_users=opts.users, n_items=opts.items, n_authors=opts.authors)
    stop = threading.Event()
    flow = FlowProcess(config, ["-w", str(opts.workers)], log_path=log_path)
    recommender = None
    try:
        flow.start()
        out(f"flow: python -m bytewax.run flows.pipeline:flow -w {opts.workers} (following the files), "
            f"pid {flow.proc.pid}")
        recommender = build_recommender(config)
        with running_server(recommender, config) as server:
            base = server.url
            out(f"model server: {base} (GET /recommend, POST /actions, /healthz, /metrics)")
            wait_for_catalog(config, world, base, flow, out)
            loop = ClosedLoop(world, base, config, rate=opts.rate, k=opts.k, seed=opts.seed)
            result: dict[str, Any] = {}

            def simulate() -> None:
                try:
                    result["stats"] = loop.run(opts.duration_s or 10 * 365 * 86400.0, stop=stop)
                except BaseException as e:  # shown below; the demo then stops
                    result["error"] = e
                    stop.set()

            sim = threading.Thread(target=simulate, name="closed-loop", daemon=True)
            sim.start()
            try:
                def known(user: str) -> bool:
                    return bool(recommender.store.read_rows("user_id", [user], config.embedding_dim).found[0])

                _watch(flow, sim, loop, base, world, opts, known, out)
            finally:
                stop.set()  # the simulator first: no request reaches a server that is stopping
                sim.join(30.0)
            if "error" in result:
                raise result["error"]
            stats = result.get("stats")
            if stats is not None and stats.records:
                chunks = stats.by_request_count(max(1, len(stats.records) // 4))
                out(f"hit rate by quarter of the run: {', '.join(f'{h:.3f}' for h in chunks)} "
                    f"(random lists in this world: {stats.random_baseline:.3f})")
    except KeyboardInterrupt:
        out("\nstopping (Ctrl-C) ...")
    finally:
        stop.set()
        if recommender is not None:
            recommender.store.close()
        flow.stop()
        out("the flow stopped; nothing is left running")
    return 0
