"""freshrec replay movielens: MovieLens-100K as item, feature and action events in ts order."""

from __future__ import annotations

from flows.cli import main
from flows.events import ActionEvent, FeatureEvent, ItemEvent
from flows.outputs import FileEventOutput
from flows.replay import replay_movielens
from tests.flows.test_simulate import read_events
from tests.helpers import config_for


def test_replay_writes_movielens_events_in_ts_order(tmp_path):
    config = config_for(tmp_path)
    out = FileEventOutput(config, "replay")
    stats = replay_movielens(out, limit=3000, batch=700)
    out.close()
    items, dead_i = read_events(config, "items")
    features, dead_f = read_events(config, "features")
    actions, dead_a = read_events(config, "actions")
    assert dead_i == dead_f == dead_a == []
    assert len(items) == stats.items == 1682
    assert len(features) == len(actions) == stats.features == stats.actions == 3000
    assert all(isinstance(i, ItemEvent) and i.ts < features[0].ts for i in items)
    toy = next(i for i in items if i.item_id == "m1")
    assert toy.sparse["tags"] == ["Animation", "Children's", "Comedy"] and toy.sparse["year"] == "1995"
    ts = [f.ts for f in features]
    assert ts == sorted(ts) and ts[-1] > ts[0]
    assert [a.ts for a in actions] == ts
    assert 8e8 < ts[0] < 9e8  # the original timestamps, in seconds
    assert len({f.request_id for f in features}) == 3000
    for f, a in zip(features, actions, strict=True):
        assert isinstance(f, FeatureEvent) and isinstance(a, ActionEvent)
        assert (f.request_id, f.user_id, f.item_id) == (a.request_id, a.user_id, a.item_id)
        assert f.sparse["tags"] and f.sparse["gender"] in ("M", "F") and f.position == 0
        assert a.action == ("like" if a.value >= 4 else "skip")
        assert a.received_at is not None
    assert stats.positives == sum(a.action == "like" for a in actions)
    assert 0.4 < stats.positives / 3000 < 0.7


def test_speedup_divides_the_event_time_gaps():
    class Clock:
        now = 100.0

        def __call__(self):
            return self.now

        def sleep(self, s):
            assert s > 0
            self.now += s

    class Sink:
        def __init__(self, clock):
            self.clock, self.writes = clock, []

        def write(self, stream, events):
            self.writes.append((self.clock(), stream, [e.ts for e in events]))

        def close(self):
            pass

    clock = Clock()
    sink = Sink(clock)
    stats = replay_movielens(sink, speedup=1000.0, limit=400, clock=clock, sleep=clock.sleep)
    span = stats.last_ts - stats.first_ts
    assert span > 0
    # Each feature went out no earlier than its event-time offset / speedup, and not much later.
    for wall, stream, tss in sink.writes:
        if stream == "features":
            assert all(wall >= 100.0 + (t - stats.first_ts) / 1000.0 - 0.011 for t in tss)
            assert wall <= 100.0 + (tss[-1] - stats.first_ts) / 1000.0 + 0.011
    assert clock.now - 100.0 >= span / 1000.0 - 0.011
    order = [t for _, stream, tss in sink.writes if stream == "features" for t in tss]
    assert order == sorted(order) and len(order) == 400


def test_replay_command(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["replay", "movielens", "--limit", "50", "--data-dir", str(data)]) == 0
    assert "50 feature events and 50 action events" in capsys.readouterr().out
    assert main(["replay", "movielens", "--speedup", "-1", "--data-dir", str(data)]) == 2
