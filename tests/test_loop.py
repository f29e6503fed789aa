"""The whole loop, end to end: users -> model server -> streams -> flow (join, online training) ->
serving store -> model server. On the embedded default (files, follow mode) and through a real
Kafka broker."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from flows.config import Config
from flows.demo import wait_for_catalog
from flows.processes import FlowProcess
from flows.simulate import ClosedLoop, World
from model.recommender import build_recommender
from model.server import running_server
from tests.model.serving_fakes import call

pytestmark = pytest.mark.slow

SEED = 11


def loop_config(tmp_path: Path, **overrides) -> Config:
    settings = dict(data_dir=str(tmp_path / "data"), state_dir=str(tmp_path / "state"), follow="1",
                    join_window_s="30", lateness_s="1", idle_s="1", metrics_port="off")
    settings.update({k: str(v) for k, v in overrides.items()})
    return Config.from_env({}, **settings)


@dataclass
class Loop:
    config: Config
    flow: FlowProcess
    url: str
    recommender: object


@contextlib.contextmanager
def running_loop(config: Config) -> Iterator[Loop]:
    flow = FlowProcess(config, ["-w", "1"], log_path=config.state_dir.parent / "flow.log").start()
    recommender = None
    try:
        recommender = build_recommender(config)
        with running_server(recommender, config) as server:
            # The catalog first, so no simulated request meets an empty one while the flow starts.
            wait_for_catalog(config, world(), server.url, flow, print)
            yield Loop(config, flow, server.url, recommender)
        assert flow.running, "the flow died:\n" + flow.log_tail()
    finally:
        flow.stop()
        if recommender is not None:
            recommender.store.close()


def world() -> World:
    return World(seed=SEED, n_users=200, n_items=400, n_authors=30)


def wait_until(check, timeout_s: float, what: str, loop: Loop):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        assert loop.flow.running, "the flow died:\n" + loop.flow.log_tail()
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s\n" + loop.flow.log_tail())


def recommend(loop: Loop, user: str, k: int = 100) -> dict:
    status, _, body = call(loop.url, "GET", f"/recommend?user_id={user}&k={k}")
    assert status == 200, body
    return body


def post(loop: Loop, actions: list[dict]) -> None:
    status, _, body = call(loop.url, "POST", "/actions", body=__import__("json").dumps(actions))
    assert status == 202, body


def knows(loop: Loop, user: str) -> bool:
    return bool(loop.recommender.store.read_rows("user_id", [user], loop.config.embedding_dim).found[0])


def mean_position(items: list[dict], wanted: set[str]) -> float:
    pos = [i for i, it in enumerate(items) if it["item_id"] in wanted]
    return sum(pos) / len(pos) if pos else float("inf")


def check_a_fans_author_rises(loop: Loop, w: World) -> None:
    """After a user likes several items of one author, that author's other items rank higher in
    the user's next recommendations, within seconds.

    Usually within a second, but not always: in 23 runs of one fan on a quiet machine (2026-11-30)
    21 rose (20 within about 5 s, one at 15 s), and in 2 the liked author's other items fell out of
    the fan's list after the likes and stayed out (a fan known from three skips alone, and a
    ranking head trained for 15 s, can take the likes' update anywhere). Later that day, on files, the
    first fan did not rise in 3 of 13 runs, and in one of them the second fan did not either (0 of 9
    with the morning's code, run in turn with it: not a difference the counts can tell from chance).
    So a fan gets a try after another until three have not risen (30, 60, 60 s); a loop where likes
    do not raise their author fails all three."""
    # Warm up: simulated users act for a while, so the model and the catalog have something.
    warm = ClosedLoop(w, loop.url, loop.config, rate=20, k=10, seed=SEED).run(15)
    assert warm.actions_posted > 0 and not warm.rejected and not warm.failed_requests
    author_of = {w.item_id(i): w.item_sparse(i)["author"] for i in range(w.n_items)}
    if fan_likes_an_author(loop, author_of, 30) is None and fan_likes_an_author(loop, author_of, 60) is None:
        assert fan_likes_an_author(loop, author_of, 60) is not None, \
            "three fans' liked authors did not rise in their lists\n" + loop.flow.log_tail()


def fan_likes_an_author(loop: Loop, author_of: dict[str, str], wait_s: float) -> Optional[float]:
    """A new user skips three items, then likes three items of one author: the seconds until that
    author's other items stand higher in their list (and the liked ones are gone from it), or None
    if not within `wait_s`."""
    fan = f"fan-{uuid.uuid4().hex[:6]}"
    # The fan's first actions: skips, so the model knows them before the likes (a list of the
    # model's before, not the cold-start list).
    first = recommend(loop, fan)
    post(loop, [{"request_id": first["request_id"], "user_id": fan, "item_id": it["item_id"], "ts": time.time(),
                 "action": "skip"} for it in first["items"][-3:]])
    wait_until(lambda: knows(loop, fan), 30, "the fan's first actions trained", loop)
    time.sleep(0.5)
    before = recommend(loop, fan)
    authors = Counter(author_of.get(it["item_id"]) for it in before["items"][:60])

    def pick(author: str) -> tuple[float, str, list[str], set[str]]:
        by_author = [it["item_id"] for it in before["items"] if author_of.get(it["item_id"]) == author]
        liked, others = by_author[:3], set(by_author[3:])
        # Positions counted without the liked items (they leave the list), so that alone moves nothing.
        return mean_position([it for it in before["items"] if it["item_id"] not in liked], others), author, liked, others

    # The author the fan is shown most whose other items have room to rise (one whose items already
    # stand near the top cannot rise by much: that made this flaky), else the one with the most room.
    picks = [pick(a) for a, n in authors.most_common() if a and n >= 5]
    start, author, liked, others = next((p for p in picks if p[0] >= 35), max(picks))
    post(loop, [{"request_id": before["request_id"], "user_id": fan, "item_id": i, "ts": time.time(),
                 "action": "like"} for i in liked])
    posted = time.monotonic()
    last: list[float] = [start]

    def risen():
        after = recommend(loop, fan)
        shown = {it["item_id"] for it in after["items"]}
        last[0] = mean_position(after["items"], others)
        return after if not shown & set(liked) and last[0] < start - 3 else None

    deadline = posted + wait_s
    while time.monotonic() < deadline:
        after = risen()
        if after is not None:
            took = time.monotonic() - posted
            print(f"{fan}: {author}'s other items: mean position {start:.1f} -> {last[0]:.1f} after {took:.2f} s")
            return took
        assert loop.flow.running, "the flow died:\n" + loop.flow.log_tail()
        time.sleep(0.2)
    print(f"{fan}: {author}'s other items did not rise within {wait_s:.0f} s: mean position {start:.1f} -> "
          f"{last[0]:.1f} (inf: none of them in the list)")
    return None


# The fan's tests keep impressions waiting longer than they run. The test asks for the fan's list five
# times a second while it waits: with the 30 s window, 30 s on, every list it had been shown would
# expire into negatives for the fan, hundreds a second, pushing that author's items down again
# (a real user does not ask for a list five times a second without acting on any).
FAN_WINDOW_S = 600


def test_the_loop_on_files_a_fans_author_rises(tmp_path):
    with running_loop(loop_config(tmp_path, join_window_s=FAN_WINDOW_S)) as loop:
        check_a_fans_author_rises(loop, world())


@pytest.mark.kafka
def test_the_loop_through_kafka_a_fans_author_rises(tmp_path, kafka_bootstrap):
    from flows.kafka_local import create_contract_topics

    prefix = f"loop{uuid.uuid4().hex[:8]}."
    create_contract_topics(kafka_bootstrap, prefix)
    config = loop_config(tmp_path, source="kafka", brokers=kafka_bootstrap, topic_prefix=prefix,
                         join_window_s=FAN_WINDOW_S)
    with running_loop(config) as loop:
        check_a_fans_author_rises(loop, world())


def run_closed_loop(tmp_path: Path, train: bool, seconds: float) -> list[float]:
    config = loop_config(tmp_path, train=int(train))
    with running_loop(config) as loop:
        stats = ClosedLoop(world(), loop.url, config, rate=20, k=10, seed=SEED).run(seconds)
    assert not stats.rejected and not stats.failed_requests
    return stats.by_request_count(len(stats.records) // 4)


def test_hit_rate_rises_with_online_training_and_beats_no_training(tmp_path):
    on = run_closed_loop(tmp_path / "on", True, 60)
    off = run_closed_loop(tmp_path / "off", False, 60)
    print(f"hit rate by quarter, training on: {on}; off: {off}")
    assert on[-1] > on[0]
    # The end as its second half, 6,000 recommendations a side: a quarter alone (3,000) once tied
    # (0.0843 both, in CI), where runs of the same code ended 0.106 against 0.077-0.082.
    assert sum(on[2:]) > sum(off[2:])
