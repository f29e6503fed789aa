"""The whole flow on files: dead letters, end of input, and the in-band clock under skewed reads."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

from bytewax.testing import TestingSink, cluster_main, run_main

from flows.events import encode
from flows.metrics import EVENTS_BEHIND
from flows.pipeline import build_flow
from flows.sources import FileStreamSource
from tests.helpers import action, config_for, feature

T0 = 1764288000.0

BAD_LINES = {
    b"\xff\xfe\xfd": "not UTF-8",
    b"{not json": "not JSON",
    b"[1, 2]": "not an object",
    b'{"user_id": "u", "item_id": "i", "ts": 1764288000}': "missing field request_id",
    b'{"request_id": 5, "user_id": "u", "item_id": "i", "ts": 1764288000}': "invalid field request_id",
    b'{"request_id": "r", "user_id": "u", "item_id": "i", "ts": true}': "invalid field ts",
    b'{"request_id": "r", "user_id": "u", "item_id": "i", "ts": 1e999}': "invalid field ts",
    b'{"request_id": "r", "user_id": "u", "item_id": "i", "ts": 1764288000000}': "invalid field ts",
    b'{"request_id": "' + b"x" * 129 + b'", "user_id": "u", "item_id": "i", "ts": 1764288000}': "invalid field request_id",
    b'{"request_id": "r", "user_id": "u", "item_id": "i", "ts": 1764288000, "pad": "' + b"z" * 70000 + b'"}': "message larger than",
    b'{"request_id": "r", "user_id": "u", "item_id": "i", "ts": 4000000000}': "ts from the future",
}
BAD_ACTION = b'{"request_id": "r", "user_id": "u", "item_id": "i", "ts": 1764288000, "action": "poke"}'


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(x + b"\n" for x in lines))


def read_dead(config):
    out = []
    for p in sorted(config.stream_dir("dead-letter").glob("*.jsonl")):
        out += [json.loads(x) for x in p.read_bytes().splitlines()]
    return out


def test_every_kind_of_bad_input_is_dead_lettered_and_the_flow_keeps_going(tmp_path):
    config = config_for(tmp_path, buckets=4)
    good = [encode(feature(i, T0 + i)) for i in range(50)]
    lines = []
    for i, bad in enumerate(BAD_LINES):
        lines += [good[i], bad]
    lines += good[len(BAD_LINES):]
    write(config.stream_dir("features") / "f.jsonl", lines)
    write(config.stream_dir("actions") / "a.jsonl", [encode(action(1, T0 + 3)), BAD_ACTION])
    write(config.stream_dir("items") / "i.jsonl", [b'{"item_id": "v1", "ts": 1764288000}', b"[]"])
    out = []
    run_main(build_flow(config, tap=TestingSink(out)))
    # Every valid impression has its one example: r1 liked, the others expired at the end of input.
    assert sorted((e.request_id, e.label) for e in out) == sorted(
        (f"r{i}", int(i == 1)) for i in range(50))
    dead = read_dead(config)
    by_stream = {}
    for d in dead:
        by_stream.setdefault(d["stream"], []).append(d)
    reasons = [d["reason"] for d in by_stream["features"]]
    assert len(reasons) == len(BAD_LINES)
    for want, reason in zip(BAD_LINES.values(), reasons, strict=True):
        assert reason.startswith(want), (want, reason)
    assert [d["reason"] for d in by_stream["actions"]] == ["invalid field action: Invalid enum value 'poke'"]
    assert by_stream["items"][0]["reason"].startswith("not an object")
    assert by_stream["features"][0]["raw_b64"] == "//79" and by_stream["features"][0]["raw"] is None
    examples = [json.loads(x) for p in config.stream_dir("examples").glob("*.jsonl")
                for x in p.read_bytes().splitlines()]
    assert sorted(e["request_id"] for e in examples) == sorted(f"r{i}" for i in range(50))


class SlowFileSource(FileStreamSource):
    """Reads one small batch every few milliseconds, however much input waits."""

    def build_part(self, step_id, for_part, resume_state):
        part = super().build_part(step_id, for_part, resume_state)
        part.batch_bytes = 2048
        part.next_awake = lambda: datetime.now(UTC) + timedelta(milliseconds=3)
        return part


def skewed_flow(tmp_path, n=3000):
    config = config_for(tmp_path, buckets=4, lateness_s=0, join_window_s=60)
    # Event time runs alike in both streams; features are read in 1 MiB batches, actions in 2 KiB
    # batches every 3 ms, so the features partition runs far ahead in event time. Every impression
    # is liked 0.5 s after it: all positives, unless a bucket's clock let the fast partition expire
    # impressions whose actions had not been read yet.
    write(config.stream_dir("features") / "f.jsonl", [encode(feature(i, T0 + i)) for i in range(n)])
    write(config.stream_dir("actions") / "a.jsonl", [encode(action(i, T0 + i + 0.5)) for i in range(n)])
    out = []
    flow = build_flow(config, tap=TestingSink(out),
                      sources={"actions": SlowFileSource("actions", config)})
    return flow, out, n


def behind() -> float:
    return sum(m.value for m in EVENTS_BEHIND.collect()[0].samples if m.name.endswith("_total"))


def check_no_event_behind_its_buckets_watermark(out, n, behind_before):
    assert behind() == behind_before
    assert sorted((e.request_id, e.label) for e in out) == sorted((f"r{i}", 1) for i in range(n))


def test_clock_in_band_one_worker_fast_and_slow_partitions(tmp_path):
    flow, out, n = skewed_flow(tmp_path)
    before = behind()
    run_main(flow)
    check_no_event_behind_its_buckets_watermark(out, n, before)


def test_clock_in_band_two_workers_fast_and_slow_partitions(tmp_path):
    flow, out, n = skewed_flow(tmp_path)
    before = behind()
    cluster_main(flow, [], 0, worker_count_per_proc=2)
    check_no_event_behind_its_buckets_watermark(out, n, before)


def test_the_flow_ends_by_itself_at_the_end_of_its_input(tmp_path):
    config = config_for(tmp_path)
    write(config.stream_dir("features") / "f.jsonl", [encode(feature(1, T0))])
    t0 = time.monotonic()
    run_main(build_flow(config))
    assert time.monotonic() - t0 < 60


def test_snapshots_write_the_join_state_to_lmdb_unless_recovery_is_known_to_be_off(tmp_path, monkeypatch):
    import flows.pipeline as pipeline
    from flows.metrics import JOIN

    def spill_writes() -> float:
        return sum(m.value for m in JOIN["spill_writes"].collect()[0].samples if m.name.endswith("_total"))

    # Impressions whose labels never come wait out a long window (far below the cache bound)
    # while snapshots are taken; the end of the input expires them.
    lines = [encode(feature(i, T0 + i)) for i in range(400)]
    got = {}
    recovery_off = pipeline.recovery_off
    # (recovery_off's answer, build_flow's `recovery`)
    for off, recovery in ((False, None), (True, None), (False, False), (True, True)):
        config = config_for(tmp_path / f"{off}-{recovery}", join_window_s=86400, buckets=2, source_batch_bytes=2048)
        write(config.stream_dir("features") / "f.jsonl", lines)
        monkeypatch.setattr(pipeline, "recovery_off", lambda off=off: off)
        out: list = []
        before = spill_writes()
        run_main(build_flow(config, tap=TestingSink(out), recovery=recovery), epoch_interval=timedelta(0))
        got[off, recovery] = (spill_writes() - before > 0, len(out))
    # With recovery possibly on (run_main's is out of a flow's sight), snapshots write the waiting
    # impressions to LMDB; known off, nothing is written (there was no memory pressure). The
    # caller's word wins.
    assert got == {(False, None): (True, 400), (True, None): (False, 400),
                   (False, False): (False, 400), (True, True): (True, 400)}
    # The bucket's store syncs to disk only when a resume may read it; without recovery, a store
    # an earlier run left (torn by a system crash, say) goes unread.
    for recovery in (True, False):
        state = tmp_path / f"open-{recovery}"
        step = pipeline.JoinStepConfig(("features-0",), 5.0, state, 12, pipeline.join_settings(config),
                                       recovery=recovery)
        if not recovery:
            (state / "join" / "b0000").mkdir(parents=True)
            (state / "join" / "b0000" / "data.mdb").write_bytes(b"torn" * 4096)
        bucket = pipeline.JoinLogic(step, None)._open("b0000")
        assert bucket.store.durable is recovery and bucket.store._env.flags()["sync"] is recovery
        assert bucket.waiting() == (0, 0)
        bucket.store.close()
    assert recovery_off(["/v/lib/bytewax/run.py", "flows.pipeline:flow"], {})
    assert not recovery_off(["/v/lib/bytewax/run.py", "flows.pipeline:flow", "-r", "rec"], {})
    assert not recovery_off(["/v/lib/bytewax/run.py", "x:flow"], {"BYTEWAX_RECOVERY_DIRECTORY": "rec"})
    assert not recovery_off(["/usr/bin/pytest"], {})
