"""The simulator: a seeded world, taste-aware lists beating random ones, heavy-tailed delays, open
loop events that parse and join, and the closed loop against a small real HTTP server."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from bytewax.testing import TestingSink, run_main

from flows.cli import main
from flows.events import POSITIVE_ACTIONS, ActionEvent, FeatureEvent, ItemEvent, encode, parse, parse_many
from flows.outputs import FileEventOutput
from flows.pipeline import build_flow
from flows.simulate import ClosedLoop, OpenLoop, World
from flows.streams import read_lines, stream_files
from tests.helpers import config_for

T0 = 1764288000.0


def small_world(seed=5, **kw):
    return World(seed, n_users=200, n_items=300, n_authors=20, n_tags=12, dim=8, start_ts=T0, **kw)


def read_events(config, stream):
    """Every line of a stream, parsed as the flow would; returns (events, dead letters)."""
    events, dead = [], []
    for path in stream_files(config.stream_dir(stream)):
        for lines in read_lines(path):
            e, d = parse_many(stream, lines, time.time())  # read now, as the flow reads them
            events += e
            dead += d
    return events, dead


def test_a_world_is_determined_by_its_seed():
    a, b, c = small_world(1), small_world(1), small_world(2)
    assert [encode(e) for e in a.catalog()] == [encode(e) for e in b.catalog()]
    assert np.array_equal(a.tastes, b.tastes)
    assert [encode(e) for e in a.catalog()] != [encode(e) for e in c.catalog()]
    # Evolving with the same calls gives the same drift and the same newcomers.
    for t in (30.0, 30.5, 3600.0):
        assert [encode(e) for e in a.advance(T0 + t)] == [encode(e) for e in b.advance(T0 + t)]
    assert a.n_items == b.n_items > 300 and a.n_users == b.n_users > 200
    assert np.array_equal(a.tastes, b.tastes)
    assert not np.array_equal(a.tastes[:200], small_world(1).tastes)  # tastes did drift


def test_new_items_are_item_events_with_author_and_tags():
    w = small_world(new_items_per_s=1.0)
    new = w.advance(T0 + 60)
    assert 30 < len(new) < 100
    for item in new:
        assert isinstance(parse("items", encode(item), T0 + 60), ItemEvent)
        assert item.sparse["author"].startswith("a") and item.sparse["tags"]
        assert item.ts == T0 + 60
        assert w.item_index(item.item_id) is not None


def test_taste_aware_lists_get_a_clearly_higher_hit_rate_than_random_ones():
    w = World(seed=3, start_ts=T0)
    rng = np.random.default_rng(0)
    users = w.pick_users(400, rng)
    hits = {}
    for name, lists in [("random", w.naive_lists(400, 10, rng)),
                        ("popular", w.naive_lists(400, 10, rng, popular=True)),
                        ("taste-aware", w.best_lists(users, 10, candidates=200, rng=rng))]:
        kind, _, _ = w.decide(users, lists, np.random.default_rng(1))
        hits[name] = float(np.mean(kind > 0))
    assert 0.02 < hits["random"] < 0.15, hits
    assert 0.02 < hits["popular"] < 0.15, hits
    assert hits["taste-aware"] > 3 * hits["random"], hits
    assert abs(w.mean_p() - hits["random"]) < 0.03


def test_decisions_are_positive_skip_or_nothing_never_two():
    w = small_world()
    rng = np.random.default_rng(2)
    users = w.pick_users(2000, rng)
    kind, delay, p = w.decide(users, w.naive_lists(2000, 5, rng), rng, skip_p=0.5)
    assert set(np.unique(kind)) == {-1, 0, 1, 2, 3, 4}
    # Skips take half of what was not liked; positives follow p.
    assert abs(np.mean(kind > 0) - p.mean()) < 0.02
    assert abs(np.mean(kind == 0) - 0.5 * (1 - p).mean()) < 0.02
    assert (delay > 0).all()


def test_label_delays_are_heavy_tailed():
    d = small_world().delays(200_000, np.random.default_rng(4))
    p50, p90, p99, p999 = np.percentile(d, [50, 90, 99, 99.9])
    assert 2 < p50 < 8  # most labels within seconds
    assert p90 < 60
    assert p99 > 120  # ... a few after minutes
    assert p999 > 3600  # ... and some after hours of event time
    assert 0.0005 < np.mean(d > 3600) < 0.01
    assert d.max() <= 6 * 3600


def test_open_loop_events_parse_and_join_into_positives_and_negatives(tmp_path):
    # A join window longer than any delay: every positive action lands within its window.
    config = config_for(tmp_path, join_window_s=7 * 3600, buckets=2)
    out = FileEventOutput(config, "sim")
    loop = OpenLoop(small_world(), out, rate=300, impressions_per_action=5, k=5, seed=1)
    stats = loop.run(1.5, flush_pending=True)
    out.close()
    assert stats.pending_at_end > 0 and stats.flushed == stats.pending_at_end
    assert stats.actions == stats.decided
    assert 250 < stats.decided < 600
    items, dead_items = read_events(config, "items")
    features, dead_features = read_events(config, "features")
    actions, dead_actions = read_events(config, "actions")
    assert dead_items == dead_features == dead_actions == []
    assert len(items) == stats.items >= 300 and len(features) == stats.features
    assert len(actions) == stats.actions
    assert all(isinstance(f, FeatureEvent) and f.score is None and f.sparse["author"] for f in features)
    # About one action per impressions_per_action feature events.
    assert 3.5 < len(features) / len(actions) < 7
    assert {a.action for a in actions} >= {"skip", "finish", "like"}
    shown = {(f.request_id, f.item_id): f for f in features}
    assert len(shown) == len(features)  # no item twice in one request
    for a in actions:
        assert isinstance(a, ActionEvent) and a.ts >= shown[(a.request_id, a.item_id)].ts
        assert a.received_at is not None
    # Through the real flow: every impression has one outcome, as the simulator decided it.
    examples = []
    run_main(build_flow(config, tap=TestingSink(examples)))
    assert len(examples) == len(features)
    labels = [e.label for e in examples]
    assert sum(labels) == stats.positives > 0
    assert sum(1 for e in examples if e.label == 0 and e.actions) == sum(a.action == "skip" for a in actions)
    assert labels.count(0) > labels.count(1)


def test_simulate_command_open_loop_writes_files(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["simulate", "--open-loop", "--rate", "200", "--duration", "0.5", "--users", "50",
                 "--items", "100", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "actions not yet due at the end" in out
    assert list((data / "features").glob("*.jsonl")) and list((data / "items").glob("*.jsonl"))


# -- closed loop ---------------------------------------------------------------------------------

FIXED = ["v3", "v1", "v4", "unknown-item", "v5", "v9", "v2", "v6"]


class FakeServer:
    """A model server stand-in: /recommend answers a fixed list; /actions records valid actions,
    answering 503 with Retry-After to the first POST and 400 to invalid ones."""

    def __init__(self, ranker=None):
        self.ranker = ranker  # (user_id, k) -> item ids; default: the fixed list
        self.actions: list[ActionEvent] = []
        self.served: dict[str, list[str]] = {}
        self.posts = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                from urllib.parse import parse_qs, urlparse

                u = urlparse(self.path)
                q = parse_qs(u.query)
                if u.path != "/recommend":
                    return self._send(404, {"error": "not found"})
                k, user = int(q["k"][0]), q["user_id"][0]
                items = outer.ranker(user, k) if outer.ranker else FIXED[:k]
                with outer.lock:
                    rid = f"req-{len(outer.served)}"
                    outer.served[rid] = items
                self._send(200, {"request_id": rid, "user_id": user, "model_version": "fixed",
                                 "items": [{"item_id": i, "score": 1.0 - n / 10} for n, i in enumerate(items)]})

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    outer.posts += 1
                    if outer.posts == 1:
                        return self._send(503, {"error": "stream down"}, [("Retry-After", "0")])
                    raw = json.loads(body)
                    parsed = [parse("actions", json.dumps(x).encode(), time.time()) for x in raw]
                    bad = [p.reason for p in parsed if not isinstance(p, ActionEvent)]
                    if bad:
                        return self._send(400, {"errors": bad})
                    outer.actions += parsed
                self._send(202, {"accepted": len(parsed)})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def run_closed_loop(tmp_path, name, seed=11):
    config = config_for(tmp_path / name)
    with FakeServer() as server:
        loop = ClosedLoop(small_world(skip_p=0.3), server.url, config, rate=60, k=6, seed=seed,
                          concurrency=3, window_s=0.5)
        ticks = []
        stats = loop.run(1.5, on_tick=lambda st: ticks.append(len(st.records)), flush_pending=True)
    return config, server, stats, ticks


def test_closed_loop_posts_valid_actions_retries_and_counts_hits(tmp_path):
    config, server, stats, ticks = run_closed_loop(tmp_path, "a")
    assert stats.failed_requests == 0 and stats.rejected == []
    assert len(stats.records) == 90 == len(server.served)
    assert stats.retries >= 1  # the first POST got a 503 and was retried
    assert stats.actions_posted == len(server.actions) > 0
    assert ticks and ticks[-1] == 90
    # Every action belongs to an item its request served; none for the unknown item.
    served_keys = {(rid, i) for rid, items in server.served.items() for i in items}
    keys = [(a.request_id, a.item_id) for a in server.actions]
    assert set(keys) <= served_keys and len(set(keys)) == len(keys)
    assert all(a.item_id != "unknown-item" for a in server.actions)
    assert all(r.unknown == 1 and r.served == 6 for r in stats.records)
    # The hit rate is the fraction of served items that got a positive action.
    positives = defaultdict(int)
    for a in server.actions:
        positives[a.request_id] += a.action in POSITIVE_ACTIONS
    assert stats.hit_rate() == pytest.approx(sum(positives.values()) / (90 * 6))
    assert stats.hit_at_k() == pytest.approx(sum(1 for n in positives.values() if n) / 90)
    last = sorted(stats.records, key=lambda r: r.index)[-20:]
    assert stats.hit_rate(20) == pytest.approx(sum(positives[r.request_id] for r in last) / (20 * 6))
    assert any(a.action == "skip" for a in server.actions)
    wins = stats.windows()
    assert stats.last_complete_window() in wins and stats.last_complete_window().end_s <= stats.elapsed_s
    assert sum(w.requests for w in wins) == 90 and sum(w.positives for w in wins) == sum(positives.values())
    # The World's catalog went to the items stream for the flow's catalog.
    items = [json.loads(x) for p in config.stream_dir("items").glob("*.jsonl") for x in p.read_bytes().splitlines()]
    assert len(items) == stats.items_written >= 300


def test_simulate_command_closed_loop_prints_the_hit_rate(tmp_path, capsys):
    with FakeServer() as server:
        assert main(["simulate", "--url", server.url, "--duration", "1.2", "--rate", "40", "--window", "0.5",
                     "--k", "5", "--users", "50", "--items", "100", "--flush-pending",
                     "--data-dir", str(tmp_path / "data")]) == 0
        posted = len(server.actions)
    out = capsys.readouterr().out
    assert "hit rate: last 0.5 s" in out
    assert f"{posted} actions posted" in out and "48 requests" in out


def test_simulate_command_says_when_the_server_serves_nothing(tmp_path, capsys):
    with FakeServer(ranker=lambda user, k: []) as server:
        assert main(["simulate", "--url", server.url, "--duration", "0.3", "--rate", "20", "--users", "20",
                     "--items", "50", "--data-dir", str(tmp_path / "data")]) == 0
    assert "served no items" in capsys.readouterr().err


def test_simulate_command_says_when_no_server_answers(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["simulate", "--url", f"http://127.0.0.1:{port}", "--duration", "0.2", "--rate", "20",
                 "--users", "20", "--items", "50", "--data-dir", str(tmp_path / "data")]) == 1
    assert "no answer from the model server" in capsys.readouterr().err


def test_closed_loop_schedule_and_decisions_are_reproducible(tmp_path):
    _, _, a, _ = run_closed_loop(tmp_path, "a")
    _, _, b, _ = run_closed_loop(tmp_path, "b")
    _, _, c, _ = run_closed_loop(tmp_path, "c", seed=12)
    ordered = [[(r.index, r.user_id, r.positives, r.skips) for r in sorted(s.records, key=lambda r: r.index)]
               for s in (a, b, c)]
    assert ordered[0] == ordered[1]
    assert ordered[0] != ordered[2]
    assert a.by_request_count(30) == b.by_request_count(30)


@pytest.mark.kafka
def test_open_loop_to_kafka_keys_and_parses_every_message(tmp_path, kafka_bootstrap):
    import uuid

    from flows.kafka_local import create_topics
    from flows.outputs import open_output
    from tests.kafka_support import read_topic

    prefix = f"t{uuid.uuid4().hex[:8]}."
    create_topics(kafka_bootstrap, {prefix + s: 2 for s in ("items", "features", "actions")})
    config = config_for(tmp_path, source="kafka", brokers=kafka_bootstrap, topic_prefix=prefix)
    out = open_output(config, "sim")
    stats = OpenLoop(small_world(), out, rate=200, seed=2).run(1.0, flush_pending=True)
    out.close()
    counts = {}
    for stream, key in (("items", "item_id"), ("features", "request_id"), ("actions", "request_id")):
        msgs = read_topic(kafka_bootstrap, prefix + stream)
        events = [parse(stream, m.value(), time.time()) for m in msgs]  # read now, as the flow reads them
        assert all(not hasattr(e, "reason") for e in events), stream
        assert all(m.key() == getattr(e, key).encode() for m, e in zip(msgs, events, strict=True))
        counts[stream] = len(events)
    assert counts == {"items": stats.items, "features": stats.features, "actions": stats.actions}
    assert stats.actions > 0


def test_the_closed_loop_hit_rate_tells_a_taste_aware_server_from_a_random_one(tmp_path):
    world = small_world()
    rng = np.random.default_rng(9)
    lock = threading.Lock()

    def random_ranker(user, k):
        with lock:
            return [World.item_id(i) for i in world.naive_lists(1, k, rng)[0]]

    def oracle_ranker(user, k):  # knows the hidden tastes (as they were at the start)
        return [World.item_id(i) for i in world.best_lists(np.array([int(user[1:])]), k)[0]]

    rates = {}
    for name, ranker in (("random", random_ranker), ("oracle", oracle_ranker)):
        with FakeServer(ranker) as server:
            loop = ClosedLoop(small_world(), server.url, config_for(tmp_path / name), rate=80, k=5, seed=4,
                              write_items=False)
            stats = loop.run(1.5)
        assert len(stats.records) == 120 and stats.failed_requests == 0
        rates[name] = stats.hit_rate()
    assert rates["oracle"] > 3 * rates["random"], rates
    assert abs(rates["random"] - world.mean_p()) < 0.06, rates
