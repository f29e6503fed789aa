"""The files source: bytes not text, partitions owning files by name hash, offsets, follow mode."""

from __future__ import annotations

import pytest

from flows.clock import ACTIVE, ENDED, IDLE
from flows.events import DeadLetter, encode
from flows.sources import FileStreamSource, owner_of
from tests.helpers import config_for, feature


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
