"""The files source: bytes not text, partitions owning files by name hash, offsets, follow mode."""

from __future__ import annotations

import pytest

from flows.clock import ACTIVE, ENDED, IDLE, NO_TS
from flows.events import DeadLetter, encode
from flows.sources import Alignment, FileStreamSource, owner_of
from tests.helpers import action, config_for, feature


class FakeClock:
    def __init__(self, t: float = 1_764_300_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def drain(part, limit: int = 10_000):
    """All batches until the partition ends (or, in follow mode, until nothing new comes)."""
    out = []
    for _ in range(limit):
        try:
            batches = part.next_batch()
        except StopIteration:
            return out, True
        if not batches and part.follow:
            return out, False
        out.extend(batches)
    raise AssertionError("partition did not settle")


def events_of(batches):
    return [e for b in batches for e in b.events]


def line(i: int, ts: float = 1764288000.0) -> bytes:
    return encode(feature(i, ts + i)) + b"\n"


def source(tmp_path, **kw):
    config = config_for(tmp_path, **kw)
    return config, FileStreamSource("features", config, now=kw.pop("now", FakeClock()))


def test_bad_bytes_never_stop_the_source_and_go_to_dead_letters(tmp_path):
    config, src = source(tmp_path, file_partitions=1)
    d = config.stream_dir("features")
    d.mkdir(parents=True)
    (d / "a.jsonl").write_bytes(line(1) + b"\xff\xfe\x00garbage\n" + b"{not json\n" + line(2))
    batches, ended = drain(src.build_part("in", "features-0", None))
    assert ended
    assert [e.request_id for e in events_of(batches)] == ["r1", "r2"]
    dead = [x for b in batches for x in b.dead]
    assert [x.reason.split(":")[0] for x in dead] == ["not UTF-8", "not JSON"]
    assert all(isinstance(x, DeadLetter) for x in dead)
    assert batches[-1].status == ENDED and not batches[-1].events


def test_each_file_is_read_by_exactly_the_partition_its_name_hashes_to(tmp_path):
    config, src = source(tmp_path, file_partitions=3)
    d = config.stream_dir("features")
    d.mkdir(parents=True)
    for f in range(12):
        (d / f"f{f}.jsonl").write_bytes(line(f))
    seen = {}
    for p in src.list_parts():
        batches, _ = drain(src.build_part("in", p, None))
        for e in events_of(batches):
            seen.setdefault(e.request_id, []).append(p)
    assert sorted(seen) == sorted(f"r{f}" for f in range(12))
    for rid, parts in seen.items():
        assert parts == [f"features-{owner_of(f'f{rid[1:]}.jsonl', 3)}"]


def test_without_follow_the_input_is_what_existed_at_start(tmp_path):
    config, src = source(tmp_path, file_partitions=1)
    d = config.stream_dir("features")
    d.mkdir(parents=True)
    (d / "a.jsonl").write_bytes(line(1) + encode(feature(2, 1764288002.0)))  # last line: no newline
    part = src.build_part("in", "features-0", None)
    (d / "a.jsonl").open("ab").write(b"\n" + line(3))
    (d / "b.jsonl").write_bytes(line(4))
    batches, ended = drain(part)
    assert ended
    # The input is complete, so its unterminated last line counts; later writes do not.
    assert [e.request_id for e in events_of(batches)] == ["r1", "r2"]


def test_follow_reads_appended_lines_and_new_files_but_never_half_a_line(tmp_path):
    clock = FakeClock()
    config = config_for(tmp_path, file_partitions=1, follow=1)
    src = FileStreamSource("features", config, now=clock)
    d = config.stream_dir("features")
    d.mkdir(parents=True)
    f = d / "a.jsonl"
    f.write_bytes(line(1))
    part = src.build_part("in", "features-0", None)
    batches, ended = drain(part)
    assert not ended and [e.request_id for e in events_of(batches)] == ["r1"]
    half = line(2)
    with f.open("ab") as w:
        w.write(half[:20])
    clock.t += 1
    assert events_of(drain(part)[0]) == []
    with f.open("ab") as w:
        w.write(half[20:])
    (d / "later.jsonl").write_bytes(line(3))
    clock.t += 1
    assert sorted(e.request_id for e in events_of(drain(part)[0])) == ["r2", "r3"]


def test_follow_partition_says_idle_after_idle_s_and_active_with_new_data(tmp_path):
    clock = FakeClock()
    config = config_for(tmp_path, file_partitions=1, follow=1, idle_s=5)
    d = config.stream_dir("features")
    d.mkdir(parents=True)
    part = FileStreamSource("features", config, now=clock).build_part("in", "features-0", None)
    assert drain(part)[0] == []
    clock.t += 5
    batches, _ = drain(part)
    assert [b.status for b in batches] == [IDLE]
    (d / "a.jsonl").write_bytes(line(7))
    clock.t += 1
    batches, _ = drain(part)
    assert batches[0].status == ACTIVE and batches[0].progress == 1764288007.0


def test_resume_from_a_snapshot_reads_on_after_the_last_line_read(tmp_path):
    config = config_for(tmp_path, file_partitions=1, follow=1, source_batch_bytes=1024)
    d = config.stream_dir("features")
    d.mkdir(parents=True)
    (d / "a.jsonl").write_bytes(b"".join(line(i) for i in range(100)))
    src = FileStreamSource("features", config, now=FakeClock())
    part = src.build_part("in", "features-0", None)
    first = part.next_batch()
    snap = part.snapshot()
    got = [e.request_id for e in events_of(first)]
    assert 0 < len(got) < 100
    resumed = src.build_part("in", "features-0", snap)
    rest = [e.request_id for e in events_of(drain(resumed)[0])]
    assert got + rest == [f"r{i}" for i in range(100)]
    assert resumed.clock.progress == pytest.approx(first[-1].progress)


def test_a_line_longer_than_a_batch_is_read_whole_and_dead_lettered(tmp_path):
    config, src = source(tmp_path, file_partitions=1, source_batch_bytes=1024)
    d = config.stream_dir("features")
    d.mkdir(parents=True)
    (d / "a.jsonl").write_bytes(line(1) + b'{"x": "' + b"y" * 70_000 + b'"}\n' + line(2))
    batches, ended = drain(src.build_part("in", "features-0", None))
    assert ended and [e.request_id for e in events_of(batches)] == ["r1", "r2"]
    dead = [x for b in batches for x in b.dead]
    assert len(dead) == 1 and dead[0].truncated and dead[0].reason.startswith("message larger than")


def _two_streams(tmp_path, clock, align, features_too: bool = True):
    """Features at 10 per second of event time and actions at one per 2 s, 40 s of each, read at
    most 1 KiB at a time: a read takes about 1 s of feature events but 20 s of actions."""
    config = config_for(tmp_path, file_partitions=1, follow=1, source_batch_bytes=1024, idle_s=5)
    parts = {}
    for stream, make, step, n in (("features", feature, 0.1, 400), ("actions", action, 2.0, 20)):
        d = config.stream_dir(stream)
        d.mkdir(parents=True)
        if stream == "actions" or features_too:
            (d / "a.jsonl").write_bytes(b"".join(encode(make(i, 1764288000.0 + i * step)) + b"\n" for i in range(n)))
        parts[stream] = FileStreamSource(stream, config, now=clock, align=align).build_part("in", f"{stream}-0", None)
    return parts


def _poll_in_turn(parts, clock, rounds: int = 400):
    """Polls each partition in turn; (events read by stream, the largest lead of the actions over
    the features at the start of an actions read while the features still had input, statuses)."""
    read = {s: [] for s in parts}
    statuses = {s: [] for s in parts}
    lead = -float("inf")
    for _ in range(rounds):
        for s, p in parts.items():
            f_before, a_before = parts["features"].clock.progress, parts["actions"].clock.progress
            batches = p.next_batch()
            for b in batches:
                read[s] += b.events
                statuses[s].append(b.status)
            features_behind = len(read["features"]) < 400
            if s == "actions" and batches and batches[0].events and features_behind and a_before > NO_TS:
                lead = max(lead, a_before - f_before)
        clock.t += 0.5
    return read, lead, statuses


def test_a_join_stream_reading_ahead_pauses_until_the_slowest_catches_up(tmp_path):
    clock = FakeClock()
    align = Alignment(max_lead_s=1.0)
    read, lead, statuses = _poll_in_turn(_two_streams(tmp_path / "aligned", clock, align), clock)
    # Nothing lost or repeated, and the actions never began a read more than 1 s of event time
    # ahead of the feature events while those had input left.
    assert [e.request_id for e in read["features"]] == [f"r{i}" for i in range(400)]
    assert [e.request_id for e in read["actions"]] == [f"r{i}" for i in range(20)]
    assert lead <= 1.0 and align.holds > 0
    # Paused is not idle: the actions said idle only after the features had caught up.
    first_idle = statuses["actions"].index(IDLE)
    assert all(st == ACTIVE for st in statuses["actions"][:first_idle])
    # Without alignment the same polls run the actions far ahead: the test can tell.
    _, unaligned, _ = _poll_in_turn(_two_streams(tmp_path / "free", clock, None), clock)
    assert unaligned > 10.0


def test_a_partition_with_nothing_to_read_holds_no_one_back(tmp_path):
    clock = FakeClock()
    align = Alignment(max_lead_s=1.0)
    # The feature events' partition has read nothing and has nothing: quiet, not slow.
    read, _, _ = _poll_in_turn(_two_streams(tmp_path, clock, align, features_too=False), clock, rounds=5)
    assert len(read["actions"]) == 20 and align.holds == 0


def test_alignment_off_or_alone_never_pauses():
    assert not Alignment(0.0).ahead("a", 100.0)
    one = Alignment(1.0)
    one.reading("a", 100.0)
    assert not one.ahead("a", 100.0)  # only itself is reading
    one.reading("b", 50.0)
    assert one.ahead("a", 100.0) and not one.ahead("b", 50.0)
    assert not one.ahead("a", 51.0)  # within the lead
    one.quiet("b")
    assert not one.ahead("a", 100.0)
