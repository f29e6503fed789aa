"""Crash recovery at scale: a million input events through the whole flow (joiner and trainer),
SIGKILLed at five random moments with Bytewax recovery on and restarted each time, against an
uninterrupted run of the same input. Checks the examples, the trained join keys and the serving
store, and reports the repeats and each restart's recovery time."""

from __future__ import annotations

import math
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from flows.sample import write_sample
from tests.flows.test_recovery import flow_env, serving_catalog

pytestmark = pytest.mark.slow

REQUESTS = 158_000  # x5 impressions, plus their actions and the catalog: just over 1 M input lines
KILLS = 5


def env_1m(base: Path, train: str = "1") -> dict[str, str]:
    return flow_env(
        base,
        FRESHREC_TRAIN=train,
        FRESHREC_TRAINED_KEYS_LOG="1",
        # The defaults' 1 MiB reads; a cache of a quarter of the waiting impressions per bucket, so
        # most wait in LMDB and its rollback is in play; a big batch keeps the trainer in step.
        FRESHREC_SOURCE_BATCH_BYTES="1048576",
        FRESHREC_JOIN_CACHE="5000",
        FRESHREC_TRAIN_BATCH="1024",
        FRESHREC_METRICS_PORT="off",  # other flows may be running on this machine
    )


class LineCounter:
    """Lines in a stream's files so far, read incrementally (rereading 200 MB each poll would
    starve the flow it watches)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.seen: dict[Path, int] = {}
        self.lines = 0

    def __call__(self) -> int:
        if self.directory.exists():
            for p in self.directory.glob("*.jsonl"):
                at = self.seen.get(p, 0)
                if p.stat().st_size > at:
                    with open(p, "rb") as f:
                        f.seek(at)
                        chunk = f.read()
                    self.seen[p] = at + len(chunk)
                    self.lines += chunk.count(b"\n")
        return self.lines


def start(env: dict, log: Path, *args: str) -> subprocess.Popen:
    # stderr to a file, not a pipe nobody reads while the flow runs.
    return subprocess.Popen([sys.executable, "-m", "bytewax.run", "flows.pipeline:flow", *args],
                            env=env, cwd=env["FRESHREC_STATE_DIR"].rsplit("/", 1)[0],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def trained_log(path: Path) -> dict[tuple[str, str], list[int]]:
    """join key -> the checkpoint tags it was trained under, from a trainer's log (whole lines)."""
    data = path.read_bytes()
    out: dict[tuple[str, str], list[int]] = {}
    for line in data[: data.rfind(b"\n") + 1].decode().splitlines():
        tag, rid, iid = line.split("\t")
        out.setdefault((rid, iid), []).append(int(tag))
    return out


class Outcome(msgspec.Struct):
    request_id: str
    item_id: str
    label: int
    label_ts: float
    weight: float


_outcomes = msgspec.json.Decoder(list[Outcome]).decode


def examples_in(files: list[Path]) -> list[tuple[tuple[str, str], tuple[int, float, float]]]:
    out = []
    for p in files:
        data = p.read_bytes()
        data = data[: data.rfind(b"\n") + 1]  # a killed writer's last line may be cut short
        if data:
            body = b"[" + data.rstrip(b"\n").replace(b"\n", b",") + b"]"
            out += [((e.request_id, e.item_id), (e.label, e.label_ts, e.weight)) for e in _outcomes(body)]
    return out


def check_serving_store(base: Path) -> int:
    """Open the serving store as the model server would and decode every record; its params_version."""
    from paramserver.records import decode_dense_chunk, decode_item, decode_rows, decode_user_actions, key_kind
    from paramserver.serving import LmdbServingStore

    decode = {"row": lambda k, v: decode_rows([v]), "dense": decode_dense_chunk,
              "item": lambda k, v: decode_item(v), "user": lambda k, v: decode_user_actions(v)}
    with LmdbServingStore(base / "state" / "serving") as store:
        records = list(store.scan())
        for k, v in records:
            decode[key_kind(k)](k, v)
        assert store.read_dense() is not None or not any(key_kind(k) == "dense" for k, _ in records)
        return store.params_version()


READY = re.compile(r"writer step ready at snapshot (\d+) \((resumed|fresh flow)")


@dataclass
class Restart:
    """One kill and the restart after it."""

    at_lines: int  # example lines written (repeats included) when the kill landed
    trained_at_kill: Path  # a copy of the trainer's log as the kill left it
    params_version: int
    resumed_at: int = -1  # the checkpoint tag the restart resumed from
    to_first_example_s: float = math.nan  # restart -> its first example line written
    to_first_training_s: float = math.nan  # restart -> its first trained key logged
    repeated: set = field(default_factory=set, repr=False)  # join keys this restart wrote again


@pytest.mark.timeout(2400)
def test_a_million_events_through_five_sigkills_lose_nothing_and_train_each_example_once(tmp_path, capsys):
    t_test = time.monotonic()
    rng = random.Random(8)
    straight = tmp_path / "straight"
    counts = write_sample(straight / "data", requests=REQUESTS, per_request=5, seed=3)
    events = counts.items + counts.features + counts.actions
    assert events >= 1_000_000, events
    killed = tmp_path / "killed"
    shutil.copytree(straight / "data", killed / "data")

    t0 = time.monotonic()
    # The reference run joins without training: the examples and the catalog do not depend on
    # the model, and the trained keys are checked against the examples themselves.
    p = start(env_1m(straight, train="0"), tmp_path / "straight.err")
    assert p.wait(timeout=1200) == 0, tail(tmp_path / "straight.err")
    straight_s = time.monotonic() - t0
    want = dict(examples_in(sorted((straight / "data" / "examples").glob("*.jsonl"))))
    assert len(want) == counts.features  # rate 1.0: every impression makes one example
    want_version = check_serving_store(straight)

    # --- the same input, SIGKILLed at five random points of its progress and restarted each time
    env = env_1m(killed)
    recovery = killed / "recovery"
    recovery.mkdir()
    subprocess.run([sys.executable, "-m", "bytewax.recovery", str(recovery), "1"], check=True)
    args = ("-r", str(recovery), "-s", "1", "-b", "0")
    progress = LineCounter(killed / "data" / "examples")
    log_path = killed / "state" / "trainer" / "trained-keys.log"
    targets = sorted(int(rng.uniform(0.1, 0.9) * len(want)) for _ in range(KILLS))
    restarts: list[Restart] = []
    run_files: list[list[Path]] = []
    seen_files: set[Path] = set()
    t_killed = time.monotonic()
    for run, target in enumerate([*targets, None]):
        err = tmp_path / f"killed-{run}.err"
        lines_before = progress()
        log_ino = log_path.stat().st_ino if log_path.exists() else None
        t_start = time.monotonic()
        p = start(env, err, *args)
        r = restarts[-1] if restarts else None
        deadline = t_start + 1200
        while p.poll() is None and (target is None or progress() < target) and time.monotonic() < deadline:
            now = time.monotonic()
            if r is not None and math.isnan(r.to_first_example_s) and progress() > lines_before:
                r.to_first_example_s = now - t_start
            if r is not None and math.isnan(r.to_first_training_s) and log_path.exists():
                # The restart cuts the log back to its checkpoint (a new file), then appends to it.
                st = log_path.stat()
                if st.st_ino != log_ino and st.st_size > 0:
                    m = READY.search(err.read_text(errors="replace"))
                    with open(log_path, "rb") as f:
                        f.seek(max(0, st.st_size - 200))
                        last = f.read().rsplit(b"\n", 2)
                    if m and len(last) > 1 and int(last[-2].split(b"\t", 1)[0]) > int(m[1]):
                        r.to_first_training_s = now - t_start
            time.sleep(0.02)
        if target is None:
            assert p.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, tail(err)
        else:
            assert p.poll() is None, f"run {run} ended before its kill at {target} lines: {tail(err)}"
            p.send_signal(signal.SIGKILL)
            p.wait()
        files = sorted(set((killed / "data" / "examples").glob("*.jsonl")) - seen_files)
        seen_files.update(files)
        run_files.append(files)
        if r is not None:
            m = READY.search(err.read_text(errors="replace"))
            assert m and m[2] == "resumed", f"run {run} did not resume: {tail(err)}"
            r.resumed_at = int(m[1])
        if target is not None:
            # The flow is down: the serving store must open and read whole, its version never back.
            version = check_serving_store(killed)
            assert not restarts or version >= restarts[-1].params_version
            copy = tmp_path / f"trained-keys-at-kill-{run + 1}.log"
            shutil.copyfile(log_path, copy)
            restarts.append(Restart(progress(), copy, version))
    killed_s = time.monotonic() - t_killed

    # --- examples: every one of the straight run's, none invented, a repeat only ever the same
    # example again, and only from an epoch the kill interrupted (not yet in the checkpoint the
    # restart resumed from)
    first_run: dict[tuple[str, str], int] = {}
    got: dict[tuple[str, str], set] = {}
    lines = 0
    for run, files in enumerate(run_files):
        for key, outcome in examples_in(files):
            lines += 1
            got.setdefault(key, set()).add(outcome)
            if key not in first_run:
                first_run[key] = run
            elif first_run[key] < run:
                restarts[run - 1].repeated.add(key)
    assert got.keys() == want.keys(), "an example was lost or invented"
    repeats = sum(len(r.repeated) for r in restarts)
    assert lines - len(got) == repeats, "an example was written twice within one run, or thrice"
    for i, r in enumerate(restarts, 1):
        # A key trained under a checkpoint the restart resumed from was in a committed epoch.
        for key, tags in trained_log(r.trained_at_kill).items():
            assert key not in r.repeated or min(tags) > r.resumed_at, \
                f"{key} written again by restart {i} though checkpoint {min(tags)} <= {r.resumed_at} had it"
    wrong = [k for k, v in got.items() if v != {want[k]}]
    assert not wrong, f"examples that differ from the straight run's: {wrong[:5]}"

    # --- training: each example trained exactly once across the kills
    trained = Counter({k: len(v) for k, v in trained_log(log_path).items()})
    assert trained.keys() == want.keys(), "an example was never trained, or a key never made was"
    twice = [k for k, n in trained.items() if n > 1]
    assert not twice, f"{len(twice)} examples trained twice: {twice[:5]}"

    # --- the serving store: whole, its version only grew, the catalog's counts the straight run's
    final_version = check_serving_store(killed)
    assert final_version > restarts[-1].params_version and want_version > 0
    want_items, want_users = serving_catalog(straight)
    got_items, got_users = serving_catalog(killed)
    assert len(want_items) == counts.items and sum(e[0] for e in want_items.values()) == counts.features
    assert got_items == want_items
    assert got_users == want_users

    for r in restarts:
        assert r.to_first_example_s == r.to_first_example_s, "a restart made no progress"
    with capsys.disabled():  # the figures belong in CI's log, not only in a failure's report
        print(f"\n{events} input events ({counts.features} impressions, {counts.actions} actions, "
              f"{counts.items} items); uninterrupted run (no training) {straight_s:.1f} s; killed run with {KILLS} restarts "
              f"{killed_s:.1f} s")
        for i, r in enumerate(restarts, 1):
            print(f"kill {i}: at {r.at_lines} example lines, resumed from checkpoint {r.resumed_at}, "
                  f"{len(r.repeated)} repeated examples, restart -> first example {r.to_first_example_s:.1f} s, "
                  f"-> first training {r.to_first_training_s:.1f} s")
        print(f"repeats {repeats} of {len(want)} examples; "
              f"test {time.monotonic() - t_test:.0f} s")
