"""The catalog: per-batch deltas, merge rules, first-touch loads, the user cap, and counts that a
resume sets back to its snapshot's."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.catalog import COUNTS_AT, Catalog, catalog_delta
from flows.clock import ACTIVE, SourceBatch
from flows.events import ActionEvent, FeatureEvent, ItemEvent
from flows.joiner import positive_rule
from paramserver.records import decode_user_actions, encode_user_actions

T0 = 1764288000.0
DEFAULT_RULE = positive_rule(None)


def batch(stream: str, events: list) -> SourceBatch:
    return SourceBatch(stream, f"{stream}-0", events, [], max((e.ts for e in events), default=0.0), ACTIVE, 0.0)


def item(i: str, ts: float, **kw) -> ItemEvent:
    return ItemEvent(item_id=i, ts=ts, **kw)


def feat(i: str, ts: float, user: str = "u1", **kw) -> FeatureEvent:
    return FeatureEvent(request_id=f"r{ts}", user_id=user, item_id=i, ts=ts, **kw)


def act(i: str, ts: float, action: str = "like", user: str = "u1", **kw) -> ActionEvent:
    return ActionEvent(request_id=f"r{ts}", user_id=user, item_id=i, ts=ts, action=action, **kw)


class FakeStore:
    """The serving store's reads, as the writer step hands them to the catalog."""

    def __init__(self, items=None, users=None):
        self.items = dict(items or {})
        self.users = dict(users or {})
        self.item_reads: list[list[str]] = []

    def read_items(self, ids):
        self.item_reads.append(list(ids))
        return [self.items.get(i) for i in ids]

    def read_users(self, ids):
        return [self.users.get(u) for u in ids]

    def write(self, catalog: Catalog) -> tuple[dict, dict]:
        items, users = catalog.take_dirty()
        self.items.update({k: _json_roundtrip(v) for k, v in items.items()})
        self.users.update({k: [list(a) for a in decode_user_actions(encode_user_actions(v))] for k, v in users.items()})
        return items, users


def _json_roundtrip(entry: dict) -> dict:
    from paramserver.records import decode_item, encode_item

    return decode_item(encode_item(entry))


def make(store: FakeStore | None = None, **kw) -> Catalog:
    store = store or FakeStore()
    kw.setdefault("run", "run-a")
    return Catalog(store.read_items, store.read_users, kw.pop("user_recent", 50), **kw)


def deltas(*batches: SourceBatch, rule=DEFAULT_RULE) -> list:
    return [d for b in batches for d in catalog_delta(b, rule)]


def test_one_delta_per_source_batch_and_none_for_an_empty_one():
    assert catalog_delta(batch("features", []), DEFAULT_RULE) == []
    got = catalog_delta(batch("features", [feat("v1", T0), feat("v1", T0 + 1), feat("v2", T0 + 2)]), DEFAULT_RULE)
    assert len(got) == 1 and {i: s[4] for i, s in got[0].seen.items()} == {"v1": 2, "v2": 1}
    got = catalog_delta(batch("items", [item("v1", T0 + 5, sparse={"a": "new"}), item("v1", T0, sparse={"a": "old"})]),
                        DEFAULT_RULE)
    assert got[0].items == {"v1": (T0 + 5, {"a": "new"}, {})}  # the latest by ts, not by order


def test_the_items_streams_features_win_and_feature_events_only_fill_the_rest():
    cat = make()
    cat.merge(deltas(batch("features", [feat("v1", T0 + 1, sparse={"author": "seen"}),
                                        feat("v2", T0 + 2, sparse={"author": "seen2"}, dense={"x": 1.0})])))
    cat.merge(deltas(batch("items", [item("v1", T0 + 10, sparse={"author": "cat"}, dense={"q": 2.0})])))
    cat.merge(deltas(batch("features", [feat("v1", T0 + 20, sparse={"author": "later"})])))
    items, _ = cat.take_dirty()
    v1, v2 = items["v1"], items["v2"]
    assert (v1["sparse"], v1["dense"], v1["source"], v1["ts"]) == ({"author": "cat"}, {"q": 2.0}, "items", T0 + 10)
    assert (v2["sparse"], v2["dense"], v2["source"], v2["ts"]) == ({"author": "seen2"}, {"x": 1.0}, "features", T0 + 2)
    assert v1["impressions"] == 2 and v2["impressions"] == 1
    # A later item event replaces the features; an older one only moves the age back.
    cat.merge(deltas(batch("items", [item("v1", T0 + 30, sparse={"author": "cat2"})])))
    cat.merge(deltas(batch("items", [item("v1", T0 + 5, sparse={"author": "stale"})])))
    v1 = cat.take_dirty()[0]["v1"]
    assert (v1["sparse"], v1["ts"], v1["updated_ts"]) == ({"author": "cat2"}, T0 + 5, T0 + 30)


def test_feature_events_keep_the_first_ts_and_the_latest_features():
    cat = make()
    cat.merge(deltas(batch("features", [feat("v1", T0 + 5, sparse={"a": "1"}), feat("v1", T0 + 3),
                                        feat("v1", T0 + 9, sparse={"a": "2"})])))
    cat.merge(deltas(batch("features", [feat("v1", T0 + 1)])))  # no features: age only
    v1 = cat.take_dirty()[0]["v1"]
    assert (v1["ts"], v1["updated_ts"], v1["sparse"], v1["impressions"]) == (T0 + 1, T0 + 9, {"a": "2"}, 4)


def test_positive_actions_count_and_negatives_and_neutral_watches_do_not():
    acts = [act("v1", T0, "click"), act("v1", T0 + 1, "purchase"), act("v1", T0 + 2, "skip"),
            act("v1", T0 + 3, "dislike"), act("v1", T0 + 4, "watch", value=30.0), act("v2", T0 + 5, "watch", value=3.0)]
    for rule, want in ((DEFAULT_RULE, {"v1": 2}), (positive_rule(10.0), {"v1": 3})):
        cat = make()
        cat.merge(deltas(batch("features", [feat("v1", T0 - 1), feat("v2", T0 - 1)]), batch("actions", acts),
                         rule=rule))
        items = cat.take_dirty()[0]
        assert {i: e["positives"] for i, e in items.items() if e["positives"]} == want
        assert items["v2"]["positives"] == 0


def users_of(cat: Catalog) -> dict[str, list]:
    """The users' lists of the next write, decoded (the catalog keeps and writes them as records)."""
    return {u: decode_user_actions(r) for u, r in cat.take_dirty()[1].items()}


def test_users_keep_their_newest_actions_in_ts_order_each_once():
    cat = make(user_recent=3)
    cat.merge(deltas(batch("actions", [act("v1", T0 + 1), act("v2", T0 + 5, "skip"), act("v3", T0 + 3)])))
    assert users_of(cat) == {"u1": [("v1", "like", T0 + 1), ("v3", "like", T0 + 3), ("v2", "skip", T0 + 5)]}
    cat.merge(deltas(batch("actions", [act("v4", T0 + 4, user="u1"), act("v1", T0 + 1), act("v9", T0, user="u2")])))
    users = users_of(cat)
    assert users["u1"] == [("v3", "like", T0 + 3), ("v4", "like", T0 + 4), ("v2", "skip", T0 + 5)]
    assert users["u2"] == [("v9", "like", T0)]
    cat.merge(deltas(batch("actions", [act("v4", T0 + 4)])))  # seen already (a replay): no change
    assert cat.take_dirty()[1] == {}


def test_entries_load_from_the_store_on_first_touch_so_counts_carry_on():
    store = FakeStore(items={"v1": {"item_id": "v1", "ts": T0, "updated_ts": T0, "sparse": {"a": "x"}, "dense": {},
                                    "impressions": 10, "positives": 4, "source": "items"}},
                      users={"u1": [["v0", "like", T0 - 10]]})
    cat = make(store)
    cat.merge(deltas(batch("features", [feat("v1", T0 + 1), feat("v2", T0 + 1)]), batch("actions", [act("v1", T0 + 2)])))
    cat.merge(deltas(batch("features", [feat("v1", T0 + 3)])))
    assert store.item_reads == [["v1", "v2"]]  # one read, then memory
    items, users = cat.take_dirty()
    assert (items["v1"]["impressions"], items["v1"]["positives"], items["v1"]["sparse"]) == (12, 5, {"a": "x"})
    assert items["v2"]["impressions"] == 1
    assert decode_user_actions(users["u1"]) == [("v0", "like", T0 - 10), ("v1", "like", T0 + 2)]


def test_an_item_no_stream_described_waits_for_one():
    cat = make()
    cat.merge(deltas(batch("actions", [act("v7", T0, "like")])))
    assert "v7" not in cat.take_dirty()[0]
    assert not cat.dirty_items  # not walked again at every sync: describing it marks it changed
    cat.merge(deltas(batch("items", [item("v7", T0 + 1)])))
    v7 = cat.take_dirty()[0]["v7"]
    assert (v7["positives"], v7["source"]) == (1, "items")


def write_all(store: FakeStore, cat: Catalog) -> tuple[dict, dict]:
    """A write that takes every count change too: a snapshot's, or one after the counts' interval."""
    cat.release_counts()
    return store.write(cat)


def test_a_resume_sets_counts_back_to_its_snapshot_so_replayed_epochs_count_once():
    store = FakeStore()
    cat = make(store, attempt="a1")
    epochs = [[feat("v1", T0 + i) for i in range(n)] for n in (3, 2, 4, 5)]
    cat.merge(deltas(batch("features", epochs[0])))
    write_all(store, cat)
    cat.snapshot(1)
    cat.merge(deltas(batch("features", epochs[1] + [feat("v2", T0)])))  # v2 first touched after snapshot 1
    write_all(store, cat)
    cat.snapshot(2)
    cat.merge(deltas(batch("features", epochs[2])))
    write_all(store, cat)  # then a crash: Bytewax resumes from snapshot 1 and replays epochs 1 and 2
    assert store.items["v1"]["impressions"] == 9
    again = make(store, seq=1, resumed_at=1, attempt="a2", lineage={"a1": 1})
    again.merge(deltas(batch("features", epochs[1] + [feat("v2", T0)])))
    again.snapshot(2)
    again.merge(deltas(batch("features", epochs[2] + epochs[3])))
    items, _ = write_all(store, again)
    assert items["v1"]["impressions"] == 3 + 2 + 4 + 5 and items["v2"]["impressions"] == 1
    assert again.counts.rewound == 2 and again.counts.inexact == 0
    # A fresh run (another run id) carries the counts on as they are: no rewinding.
    fresh = make(store, run="run-b", seq=0)
    fresh.merge(deltas(batch("features", [feat("v1", T0)])))
    assert fresh.take_dirty()[0]["v1"]["impressions"] == 15 and fresh.counts.rewound == 0


def test_a_resume_of_a_resume_ignores_what_an_abandoned_attempt_counted_after_its_snapshots():
    # Attempt a1 snapshots 1 and 2, then counts v1 and v9 at places past the next resume's
    # snapshots; it is killed and Bytewax resumes a2 from snapshot 1 (a1's snapshot 2 was not
    # committed). a2 numbers its own snapshots 2 and 3 at earlier places in the stream, never
    # reaches v9's impression, and is killed; a3 resumes from a2's snapshot 3 and counts v9's
    # impression again: once in all.
    store = FakeStore()
    a1 = make(store, attempt="a1")
    a1.merge(deltas(batch("features", [feat("v1", T0)])))
    a1.snapshot(1)
    a1.snapshot(2)
    a1.merge(deltas(batch("features", [feat("v1", T0 + 1), feat("v9", T0 + 2)])))
    store.write(a1)
    a2 = make(store, seq=1, resumed_at=1, attempt="a2", lineage={"a1": 1})
    a2.merge(deltas(batch("features", [feat("v1", T0 + 1)])))
    store.write(a2)
    a2.snapshot(2)
    a2.snapshot(3)
    a3 = make(store, seq=3, resumed_at=3, attempt="a3", lineage={"a1": 1, "a2": 3})
    a3.merge(deltas(batch("features", [feat("v9", T0 + 2)])))
    a3.merge(deltas(batch("features", [feat("v1", T0 + 3)])))
    items, _ = store.write(a3)
    assert items["v9"]["impressions"] == 1  # by snapshot numbers alone a1's count of it stood: 2
    assert items["v1"]["impressions"] == 3
    assert a3.counts.rewound == 1  # v9; v1's a2 history is committed, a1's past snapshot 1 was cut by a2


def test_a_resume_older_than_the_kept_history_is_counted_as_inexact():
    store = FakeStore()
    cat = make(store, keep=2)
    for seq in range(5):
        cat.merge(deltas(batch("features", [feat("v1", T0 + seq)])))
        write_all(store, cat)
        cat.snapshot(seq + 1)
    assert len(store.items["v1"][COUNTS_AT]["at"]) == 2
    again = make(store, keep=2, seq=1, resumed_at=1)
    again.merge(deltas(batch("features", [feat("v1", T0)])))
    assert again.counts.inexact == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["v1", "v2", "v3"]), st.sampled_from(["click", "skip", "watch", "share"]),
                          st.integers(0, 50)), max_size=60),
       st.lists(st.integers(1, 10), min_size=1, max_size=8))
def test_counts_do_not_depend_on_how_the_stream_is_cut_into_batches(events, cuts):
    acts = [act(i, T0 + t, a, user=f"u{t % 3}") for i, a, t in events]
    feats = [feat(i, T0 + t) for i, _, t in events]
    one = make()
    one.merge(deltas(batch("features", feats), batch("actions", acts)))
    many = make()
    at, k = 0, 0
    while at < len(acts):
        n = cuts[k % len(cuts)]
        many.merge(deltas(batch("features", feats[at:at + n]), batch("actions", acts[at:at + n])))
        at, k = at + n, k + 1
    a, b = one.take_dirty(), many.take_dirty()
    strip = {i: (e["impressions"], e["positives"], e["ts"]) for i, e in a[0].items()}
    assert strip == {i: (e["impressions"], e["positives"], e["ts"]) for i, e in b[0].items()}
    assert sum(e["impressions"] for e in a[0].values()) == len(feats)
    assert sum(e["positives"] for e in a[0].values()) == sum(1 for _, x, _ in events if x in ("click", "share"))
    assert a[1] == b[1]


# ------------------------------------------------------------------------------------ the flow


def read_lines(config, stream: str) -> list[dict]:
    import json

    return [json.loads(x) for p in sorted(config.stream_dir(stream).glob("*.jsonl"))
            for x in p.read_bytes().splitlines() if x.startswith(b"{")]


@pytest.mark.parametrize("train", [0, 1])
def test_the_flow_leaves_the_catalog_and_recent_actions_in_the_serving_store(tmp_path, train):
    from bytewax.testing import run_main

    from flows.events import encode
    from flows.pipeline import build_flow
    from flows.sample import write_sample
    from flows.streams import StreamWriter
    from paramserver.serving import LmdbServingStore
    from tests.helpers import config_for

    config = config_for(tmp_path, train=train, train_batch=64, user_recent=5)
    write_sample(config.data_dir, users=20, items=40, requests=150, per_request=3, seed=3, malformed=False)
    w = StreamWriter(config.stream_dir("features"), "extra")  # an item only impressions describe
    w.write_raw(encode(feat("x1", T0 + 7, sparse={"author": "ax"})) + b"\n")
    w.close()
    from prometheus_client import REGISTRY

    def metric(name: str) -> float:
        return sum(REGISTRY.get_sample_value(name, labels) or 0 for labels in
                   [{"store": "primary"}, {"worker": "0"}])

    before = {m: metric(m) for m in ("freshrec_sync_catalog_items_total", "freshrec_sync_catalog_users_total",
                                     "freshrec_sync_catalog_items_loaded_total")}
    run_main(build_flow(config))

    items = {e["item_id"]: e for e in read_lines(config, "items")}
    feats = read_lines(config, "features")
    acts = read_lines(config, "actions")
    with LmdbServingStore(config.state_dir / "serving") as store:
        stored = {k[len(b"item/"):].decode(): v for k, v in store.scan(b"item/")}
        assert set(stored) == set(items) | {"x1"}
        got = dict(zip(stored, store.read_items(list(stored)), strict=True))
        for i, e in items.items():
            g = got[i]
            assert (g["sparse"], g["dense"], g["ts"], g["source"]) == (e["sparse"], e["dense"], e["ts"], "items")
            assert g["impressions"] == sum(1 for f in feats if f["item_id"] == i)
            assert g["positives"] == sum(1 for a in acts if a["item_id"] == i and a["action"] != "skip")
        assert (got["x1"]["source"], got["x1"]["sparse"], got["x1"]["impressions"]) == ("features", {"author": "ax"}, 1)
        assert sum(g["positives"] for g in got.values()) > 0
        users = sorted({a["user_id"] for a in acts})
        recent = dict(zip(users, store.read_users(users), strict=True))
        for u in users:
            mine = sorted(((a["item_id"], a["action"], a["ts"]) for a in acts if a["user_id"] == u), key=lambda a: a[2])
            assert recent[u] == mine[-5:]
        grew = {m: metric(m) - v for m, v in before.items()}
        assert grew["freshrec_sync_catalog_items_total"] >= len(stored)  # each entry written at least once
        assert grew["freshrec_sync_catalog_users_total"] >= len(users)
        assert grew["freshrec_sync_catalog_items_loaded_total"] == len(stored)  # loaded (absent) once each
        rows = store.keys(b"item_id/")
        assert bool(rows) == bool(train)  # the catalog is there either way; embeddings only when training


def test_without_training_the_writer_step_imports_no_tensorflow(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from flows.sample import write_sample

    write_sample(tmp_path / "data", users=5, items=10, requests=20, per_request=2, seed=1, malformed=False)
    script = (
        "import sys\n"
        "from bytewax.testing import run_main\n"
        "from flows.pipeline import build_flow\n"
        "from paramserver.serving import LmdbServingStore\n"
        "from tests.helpers import config_for\n"
        "from pathlib import Path\n"
        f"config = config_for(Path({str(tmp_path)!r}), train=0)\n"
        "run_main(build_flow(config))\n"
        "store = LmdbServingStore(config.state_dir / 'serving')\n"
        "assert len(store.keys(b'item/')) == 10, store.keys()\n"
        "print('tensorflow' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False"


def test_the_recovery_directory_names_the_run_only_under_bytewax_run(tmp_path):
    from flows.pipeline import bytewax_recovery_dir

    run_py = "/venv/lib/python3.11/site-packages/bytewax/run.py"
    rec = tmp_path / "rec"
    assert bytewax_recovery_dir([run_py, "flows.pipeline:flow", "-r", str(rec), "-s", "1"], {}) == str(rec.resolve())
    assert bytewax_recovery_dir([run_py, "flows.pipeline:flow", f"--recovery-directory={rec}"], {}) == str(rec.resolve())
    assert bytewax_recovery_dir([run_py, "flows.pipeline:flow"], {"BYTEWAX_RECOVERY_DIRECTORY": str(rec)}) == str(
        rec.resolve())
    assert bytewax_recovery_dir([run_py, "flows.pipeline:flow"], {}) is None  # recovery off
    assert bytewax_recovery_dir(["/usr/bin/pytest", "-r", "a"], {}) is None  # not bytewax.run: pytest's -r


def test_a_recovery_directory_made_again_at_the_same_path_names_another_run(tmp_path):
    import shutil
    import time

    from bytewax.recovery import init_db_dir

    from flows.pipeline import recovery_run_name

    rec = tmp_path / "rec"
    assert recovery_run_name(None) is None
    assert recovery_run_name(str(rec)) == str(rec)  # no partitions (yet): the path alone
    rec.mkdir()
    init_db_dir(rec, 1)
    first = recovery_run_name(str(rec))
    assert first.startswith(f"{rec}@") and recovery_run_name(str(rec)) == first
    shutil.rmtree(rec)
    time.sleep(1.1)  # sqlite's CURRENT_TIMESTAMP counts seconds
    rec.mkdir()
    init_db_dir(rec, 1)
    assert recovery_run_name(str(rec)) not in (first, str(rec))


def test_count_changes_alone_wait_for_their_interval_where_descriptions_go_at_the_next_sync():
    now = [100.0]
    store = FakeStore()
    cat = make(store, counts_every_s=1.0, clock=lambda: now[0])
    cat.merge(deltas(batch("items", [item("v1", T0), item("v2", T0)])))
    assert set(store.write(cat)[0]) == {"v1", "v2"}
    cat.merge(deltas(batch("features", [feat("v1", T0 + 1), feat("v2", T0 + 2)])))
    assert set(store.write(cat)[0]) == {"v1", "v2"}  # the first counts go at once
    cat.merge(deltas(batch("features", [feat("v1", T0 + 3), feat("v2", T0 + 4)])))
    now[0] += 0.5
    assert store.write(cat) == ({}, {})  # counts only, within the interval: they wait
    cat.merge(deltas(batch("items", [item("v2", T0 + 5, sparse={"author": "a9"})])))
    items, _ = store.write(cat)
    assert set(items) == {"v2"} and items["v2"]["impressions"] == 2  # described again: goes with its counts
    now[0] += 0.6
    items, _ = store.write(cat)
    assert set(items) == {"v1"} and items["v1"]["impressions"] == 2  # the interval passed
    cat.merge(deltas(batch("features", [feat("v1", T0 + 6)])))
    now[0] += 0.1
    assert store.write(cat)[0] == {}
    cat.release_counts()  # a snapshot's sync writes every change
    assert store.write(cat)[0]["v1"]["impressions"] == 3
    assert store.items["v1"]["impressions"] == 3 and store.items["v2"]["impressions"] == 2


def test_the_same_features_again_go_with_the_counts_where_new_ones_go_at_the_next_sync():
    # The model server logs an item's features with every impression of it: the same again only
    # moves `updated_ts`, which the entry's next write (of its counts, at the latest) carries.
    now = [100.0]
    store = FakeStore()
    cat = make(store, counts_every_s=1.0, clock=lambda: now[0])
    same = {"sparse": {"author": "a1", "tags": ["x", "y"]}, "dense": {"d": 1.0}}
    cat.merge(deltas(batch("features", [feat("v1", T0, **same)])))
    assert set(store.write(cat)[0]) == {"v1"}
    cat.merge(deltas(batch("features", [feat("v1", T0 + 1, **same)])))
    now[0] += 0.5
    assert store.write(cat)[0] == {}
    cat.merge(deltas(batch("features", [feat("v1", T0 + 2, sparse={"author": "a2"})])))
    v1 = store.write(cat)[0]["v1"]  # new features: at once, counts with them
    assert (v1["sparse"], v1["dense"], v1["updated_ts"], v1["impressions"]) == ({"author": "a2"}, {}, T0 + 2, 3)
    cat.merge(deltas(batch("features", [feat("v1", T0 + 3, sparse={"author": "a2"}), feat("v1", T0 - 5)])))
    v1 = store.write(cat)[0]["v1"]  # seen before its first `ts`: its age changed, at once
    assert (v1["ts"], v1["updated_ts"], v1["impressions"]) == (T0 - 5, T0 + 3, 5)
    cat.merge(deltas(batch("features", [feat("v1", T0 + 4, sparse={"author": "a2"})])))
    assert store.write(cat)[0] == {}
    now[0] += 1.0
    v1 = store.write(cat)[0]["v1"]
    assert (v1["sparse"], v1["updated_ts"], v1["impressions"]) == ({"author": "a2"}, T0 + 4, 6)


def _merged_plainly(old: list, new: list, cap: int) -> list:
    """A user's list after a batch, as the rule says it plainly: the new actions not already in the
    list (nor twice in the batch), everything in `ts` order (stable), the newest `cap` kept."""
    have, add = set(old), []
    for a in new:
        if a not in have:
            have.add(a)
            add.append(a)
    return sorted(old + add, key=lambda a: a[2])[-cap:] if add else old


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from(["v1", "v2", "v3"]), st.sampled_from(["click", "skip"]),
                                   st.integers(0, 30)), min_size=1, max_size=6), max_size=12),
       st.sampled_from([1, 3, 50]))
def test_a_users_list_merges_as_the_plain_rule_says(batches, cap):
    cat = make(user_recent=cap)
    want: list = []
    for b in batches:
        acts = [act(i, T0 + t, a, user="u1") for i, a, t in b]
        cat.merge(deltas(batch("actions", acts)))
        want = _merged_plainly(want, [(i, a, T0 + t) for i, a, t in b], cap)
        assert cat.user_actions("u1") == want
