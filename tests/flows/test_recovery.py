"""Crash recovery of the whole flow: SIGKILL it mid-stream, again and again, with LMDB join state
in use, restart it with Bytewax's recovery, and compare with an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from flows.sample import write_sample

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def flow_env(base: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRESHREC_", "BYTEWAX_"))}
    env.update({
        "PYTHONPATH": str(ROOT),
        "FRESHREC_DATA_DIR": str(base / "data"),
        "FRESHREC_STATE_DIR": str(base / "state"),
        "FRESHREC_BUCKETS": "4",
        "FRESHREC_TRAIN": "0",
        # Small reads and a small cache: the run lasts long enough to be killed mid-stream, and
        # most waiting impressions go through LMDB.
        "FRESHREC_SOURCE_BATCH_BYTES": "4096",
        "FRESHREC_JOIN_CACHE": "300",
        # Longer than any label delay in the sample, so each outcome is decided by its actions
        # alone and two runs can be compared key by key.
        "FRESHREC_JOIN_WINDOW_S": "7200",
    })
    env.update(extra)
    return env


def bytewax_run(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bytewax.run", "flows.pipeline:flow", *args],
                            env=env, cwd=env["FRESHREC_STATE_DIR"].rsplit("/", 1)[0],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def lines_written(base: Path, stream: str = "examples") -> int:
    """How many lines the flow has written to a stream so far, repeats included."""
    return sum(p.read_bytes().count(b"\n") for p in (base / "data" / stream).glob("*.jsonl"))


def run_with_kills(env: dict, recovery: Path, targets: list[int], progress, timeout: float = 900) -> int:
    """Run the flow with Bytewax recovery and SIGKILL it each time `progress()` (lines written so
    far, repeats included) reaches the next of `targets`, then let it run to its end; returns how
    many kills landed. Killing by progress, not by the clock, puts every kill mid-stream however
    fast or slow the machine is (a clock-timed kill missed the stream once the resumes got short)."""
    recovery.mkdir()
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), "1"], check=True)
    args = ("-r", str(recovery), "-s", "1", "-b", "0")
    kills = 0
    for target in sorted(targets):
        p = bytewax_run(env, *args)
        deadline = time.monotonic() + timeout
        while p.poll() is None and progress() < target and time.monotonic() < deadline:
            time.sleep(0.02)
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    p = bytewax_run(env, *args)
    assert p.wait(timeout=timeout) == 0, p.stderr.read().decode()[-3000:]
    return kills


def read_stream(base: Path, stream: str) -> list[dict]:
    out = []
    for p in sorted((base / "data" / stream).glob("*.jsonl")):
        # A killed writer may leave a last line without its newline: not a whole example.
        data = p.read_bytes()
        out += [json.loads(x) for x in data[: data.rfind(b"\n") + 1].splitlines()]
    return out


def by_key(examples: list[dict]) -> dict[tuple, list[tuple]]:
    keys = defaultdict(list)
    for e in examples:
        keys[(e["request_id"], e["item_id"])].append((e["label"], e["label_ts"], e["weight"]))
    return keys


def test_sigkill_at_random_moments_loses_nothing_and_repeats_only_interrupted_epochs(tmp_path):
    rng = random.Random(11)
    first = tmp_path / "straight"
    write_sample(first / "data", requests=12000, per_request=5, seed=3)
    again = tmp_path / "killed"
    shutil.copytree(first / "data", again / "data")

    env = flow_env(first)
    t0 = time.monotonic()
    p = bytewax_run(env)
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-3000:]
    straight_s = time.monotonic() - t0
    expected = by_key(read_stream(first, "examples"))
    assert len(expected) == 60000 and all(len(v) == 1 for v in expected.values())

    # Five kills at random points between a tenth and nine tenths of the stream.
    targets = [int(rng.uniform(0.1, 0.9) * 60000) for _ in range(5)]
    kills = run_with_kills(flow_env(again), again / "recovery", targets,
                           lambda: lines_written(again))
    assert kills == 5, f"the flow ended before its kills ({straight_s:.1f} s straight)"

    got = by_key(read_stream(again, "examples"))
    assert set(got) == set(expected), "an impression was lost or invented"
    repeats = 0
    for key, outcomes in got.items():
        assert set(outcomes) == set(expected[key]), key  # a repeat is the same example again
        repeats += len(outcomes) - 1
    # Repeats come only from epochs in flight at a kill: a few seconds of input each.
    print(f"straight run {straight_s:.1f} s, {kills} kills, {repeats} repeated examples")
    assert repeats < kills * 60000 * 0.3
    dead = sorted(d["reason"] for d in read_stream(again, "dead-letter"))
    assert set(dead) == set(d["reason"] for d in read_stream(first, "dead-letter"))
    # The catalog counts each event once through the kills: a resume sets the counts of the
    # entries it replays back to its snapshot's (to the run's start when a kill came before the
    # first snapshot: the recovery directory names the run).
    want_items, want_users = serving_catalog(first)
    got_items, got_users = serving_catalog(again)
    assert len(want_items) == 500 and sum(e[0] for e in want_items.values()) == 60000
    assert got_items == want_items
    assert got_users == want_users


def serving_catalog(base: Path) -> tuple[dict, dict]:
    """(item id -> its catalog fields, user id -> recent actions) of a run's serving store."""
    from paramserver.records import decode_item, decode_user_actions
    from paramserver.serving import LmdbServingStore

    with LmdbServingStore(base / "state" / "serving") as store:
        items = {k: decode_item(v) for k, v in store.scan(b"item/")}
        users = {k: decode_user_actions(v) for k, v in store.scan(b"user/")}
    fields = ("impressions", "positives", "ts", "updated_ts", "source", "sparse", "dense")
    return {k: tuple(e[f] for f in fields) for k, e in items.items()}, users
