import math
import shutil
import subprocess
import sys
import tempfile

import lmdb
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flows.spill import LmdbSpillStore, SpillStore, SpillStoreError, SpillStoreFull

INF = math.inf


@pytest.fixture
def store(tmp_path):
    s = LmdbSpillStore(tmp_path / "bucket-0")
    yield s
    s.close()


def everything_due(s: LmdbSpillStore) -> list[tuple[float, bytes]]:
    return s.due(INF, limit=1 << 30)


def undo_tags(s: LmdbSpillStore) -> set[int]:
    """White box: the tags that still have undo records."""
    with s._env.begin(db=s._undo) as txn:
        return {int.from_bytes(k[:8], "big") for k, _ in txn.cursor()}


def test_a_new_store_is_empty(store):
    as_protocol: SpillStore = store  # checked by type checkers; the asserts check the behaviour
    assert as_protocol.last_tag() == 0 and len(store) == 0
    assert store.get("nothing") is None and store.due(INF) == []


def test_round_trip(store):
    store.flush(1, {"a": (10.5, b"payload-a"), "b": (3.0, b""), "\x00\xff": (-2.0, bytes(range(256)))})
    assert store.get("a") == (10.5, b"payload-a")
    assert store.get("b") == (3.0, b"")
    assert store.get_many(["\x00\xff", "missing", "a", "a"]) == [
        (-2.0, bytes(range(256))),
        None,
        (10.5, b"payload-a"),
        (10.5, b"payload-a"),
    ]
    assert store.get_many([]) == []
    assert len(store) == 3 and store.last_tag() == 1


def test_due_walks_in_due_then_key_order(store):
    store.flush(
        1,
        {
            "late": (100.0, b""),
            "b": (5.0, b""),
            "a": (5.0, b""),
            "neg": (-1.0, b""),
            "never": (-INF, b""),
            "inf": (INF, b""),
            "zero": (-0.0, b""),
        },
    )
    assert everything_due(store) == [
        (-INF, "never"),
        (-1.0, "neg"),
        (0.0, "zero"),
        (5.0, "a"),
        (5.0, "b"),
        (100.0, "late"),
        (INF, "inf"),
    ]
    assert store.due(5.0) == [(-INF, "never"), (-1.0, "neg"), (0.0, "zero"), (5.0, "a"), (5.0, "b")]
    assert store.due(4.999) == [(-INF, "never"), (-1.0, "neg"), (0.0, "zero")]
    # `start` is exclusive, whether or not it names a stored entry
    assert store.due(100.0, start=(5.0, "a")) == [(5.0, "b"), (100.0, "late")]
    assert store.due(100.0, start=(5.0, "aa")) == [(5.0, "b"), (100.0, "late")]
    assert store.due(100.0, start=(100.0, "late")) == []
    assert store.due(INF, start=(200.0, "")) == [(INF, "inf")]
    # paging with `limit` and the last result as `start` visits everything once
    pages, start = [], None
    while page := store.due(INF, start, limit=2):
        pages.append(page)
        start = page[-1]
    assert [x for page in pages for x in page] == everything_due(store) and len(pages) == 4
    assert store.due(math.nan) == [] and store.due(INF, limit=0) == []


def test_due_change_moves_the_index_and_delete_drops_it(store):
    store.flush(1, {"a": (1.0, b"x"), "b": (2.0, b"y"), "c": (3.0, b"z")})
    store.flush(2, {"a": (9.0, b"x2"), "b": (2.0, b"y2"), "c": None, "absent": None})
    assert everything_due(store) == [(2.0, "b"), (9.0, "a")]
    assert store.get_many(["a", "b", "c", "absent"]) == [(9.0, b"x2"), (2.0, b"y2"), None, None]
    assert len(store) == 2
    store.flush(3, {"a": None, "b": None})
    assert everything_due(store) == [] and len(store) == 0


def test_a_scan_that_found_nothing_due_sees_what_is_flushed_after_it(store):
    """`due` remembers what lies past its last scan (to answer "nothing yet" without LMDB): every
    flush, rollback and clear must keep that right."""
    store.flush(1, {"a": (5.0, b"x"), "b": (10.0, b"y")})
    assert store.due(4.0) == [] and store.due(4.0) == []
    store.flush(2, {"c": (3.0, b"z")})
    assert store.due(4.0) == [(3.0, "c")]
    assert store.due(6.0, (3.0, "c")) == [(5.0, "a")]
    assert store.due(7.0, (5.0, "a")) == []
    store.flush(3, {"d": (6.0, b"w"), "e": (4.0, b"behind the scan")})
    assert store.due(7.0, (5.0, "a")) == [(6.0, "d")]
    assert store.due(7.0, (6.0, "d")) == []
    store.flush(4, {"b": None, "f": (6.5, b"v")})
    assert store.due(20.0, (6.0, "d")) == [(6.5, "f")]
    assert store.rollback(3) == 2
    assert store.due(20.0, (6.0, "d")) == [(10.0, "b")]
    store.clear()
    assert store.due(20.0) == [] and store.due(20.0, (6.0, "d")) == []
    store.flush(5, {"g": (1.0, b"u")})
    assert store.due(20.0) == [(1.0, "g")]


def test_nan_due_is_refused_and_writes_nothing(store):
    store.flush(1, {"a": (1.0, b"x")})
    with pytest.raises(ValueError, match="NaN"):
        store.flush(2, {"b": (2.0, b""), "c": (math.nan, b"")})
    assert store.last_tag() == 1 and len(store) == 1 and everything_due(store) == [(1.0, "a")]


def test_flush_with_a_lower_tag_raises(store):
    store.flush(5, {"a": (1.0, b"x")})
    store.flush(5, {"a": (2.0, b"y")})  # the same tag again is fine: an early flush under memory pressure
    with pytest.raises(ValueError, match="tags only grow"):
        store.flush(4, {"a": (3.0, b"z")})
    assert store.get("a") == (2.0, b"y") and store.last_tag() == 5


def test_undo_keeps_the_value_from_before_the_tag(store):
    store.flush(1, {"a": (1.0, b"one")})
    store.flush(2, {"a": (2.0, b"two"), "new": (5.0, b"")})
    store.flush(2, {"a": (3.0, b"three"), "new": None})
    store.flush(3, {"a": None, "b": (4.0, b"b")})
    assert store.rollback(3) == 0 and store.rollback(7) == 0 and store.last_tag() == 3  # no-ops
    assert store.rollback(2) == 2
    assert store.get_many(["a", "b", "new"]) == [(3.0, b"three"), None, None]
    assert store.rollback(1) == 2
    assert store.get_many(["a", "b", "new"]) == [(1.0, b"one"), None, None]
    assert everything_due(store) == [(1.0, "a")] and store.last_tag() == 1
    assert undo_tags(store) == {1}
    store.flush(2, {"a": (8.0, b"again")})  # after a rollback the tags go on from there
    assert store.rollback(0) == 1 and len(store) == 0 and everything_due(store) == [] and undo_tags(store) == set()


def test_old_undo_records_are_dropped_and_rollback_past_them_is_refused(tmp_path):
    s = LmdbSpillStore(tmp_path / "b", undo_keep=2)
    for tag in range(1, 6):
        s.flush(tag, {"k": (float(tag), b"v%d" % tag)})
    assert undo_tags(s) == {4, 5}  # tags <= 5 - 2 dropped
    with pytest.raises(SpillStoreError, match="impossible") as err:
        s.rollback(2)
    assert str(tmp_path / "b") in str(err.value) and "remove the state directory" in str(err.value)
    assert s.get("k") == (5.0, b"v5") and s.last_tag() == 5  # the refusal changed nothing
    s.close()
    s = LmdbSpillStore(tmp_path / "b", undo_keep=2)  # and it is remembered across a reopen
    with pytest.raises(SpillStoreError):
        s.rollback(2)
    assert s.rollback(3) == 1 and s.get("k") == (3.0, b"v3")
    s.close()


def test_rollback_past_empty_or_sparse_tags_is_exact(tmp_path):
    s = LmdbSpillStore(tmp_path / "b", undo_keep=2)
    s.flush(1, {"k": (1.0, b"1")})
    s.flush(2, {})
    s.flush(10, {"k": (10.0, b"10")})  # drops tag <= 8: only tag 1 had records, so 1 is still reachable
    assert s.rollback(1) == 1 and s.get("k") == (1.0, b"1")
    with pytest.raises(SpillStoreError):
        s.rollback(0)
    s.close()


def test_reopen_keeps_data_and_last_tag(tmp_path):
    s = LmdbSpillStore(tmp_path / "b")
    s.flush(3, {"a": (1.0, b"x"), "b": (2.0, b"y")})
    s.flush(4, {"b": (0.5, b"z")})
    s.close()
    with LmdbSpillStore(tmp_path / "b") as s:
        assert s.last_tag() == 4 and len(s) == 2
        assert everything_due(s) == [(0.5, "b"), (1.0, "a")]
        assert s.rollback(3) == 1 and s.get("b") == (2.0, b"y")
    with LmdbSpillStore(tmp_path / "b") as s:
        assert s.last_tag() == 3 and everything_due(s) == [(1.0, "a"), (2.0, "b")]


def test_a_store_no_resume_reads_syncs_nothing_and_keeps_what_it_committed(tmp_path, monkeypatch):
    synced = []
    with LmdbSpillStore(tmp_path / "durable") as s:
        monkeypatch.setattr(s, "_lmdb", _Spy(s._env, synced))  # `_env` opens it
        assert s._env.flags()["sync"]  # every commit syncs its data pages
        s.flush(1, {"a": (1.0, b"x")})
        assert synced == [True]  # and a durable flush the meta page too
    synced.clear()
    with LmdbSpillStore(tmp_path / "b", durable=False) as s:
        monkeypatch.setattr(s, "_lmdb", _Spy(s._env, synced))  # `_env` opens it
        assert not s._env.flags()["sync"]
        s.flush(1, {"a": (1.0, b"x"), "b": (2.0, b"y")})
        s.flush(2, {"b": None}, durable=False)
        assert synced == []
    with LmdbSpillStore(tmp_path / "b", durable=False) as s:  # a process's commits outlive it
        assert s.last_tag() == 2 and everything_due(s) == [(1.0, "a")]


class _Spy:
    """An LMDB environment that records its `sync` calls."""

    def __init__(self, env, calls):
        self._env, self._calls = env, calls

    def sync(self, force=False):
        self._calls.append(force)
        return self._env.sync(force)

    def __getattr__(self, name):
        return getattr(self._env, name)


class _FailingSync(_Spy):
    def sync(self, force=False):
        raise OSError(5, "Input/output error")


def test_a_sync_that_fails_after_the_commit_leaves_the_index_in_step(tmp_path, monkeypatch):
    """The flush committed before its sync failed: what the store says must be what LMDB holds, or
    a later flush would miss the committed entry and store the key at a second due."""
    with LmdbSpillStore(tmp_path / "b") as s:
        monkeypatch.setattr(s, "_lmdb", _FailingSync(s._env, []))
        with pytest.raises(OSError):
            s.flush(1, {"a": (1.0, b"x")})
        assert s.get("a") == (1.0, b"x") and len(s) == 1 and s.last_tag() == 1
        with pytest.raises(OSError):
            s.flush(2, {"a": (2.0, b"y")})
        assert everything_due(s) == [(2.0, "a")] and len(s) == 1
        with pytest.raises(OSError):
            s.rollback(1)
        assert everything_due(s) == [(1.0, "a")] and s.get("a") == (1.0, b"x") and s.last_tag() == 1


def test_get_many_takes_any_sequence(store):
    store.flush(1, {"a": (1.0, b"x")})
    assert store.get_many(("a", "b")) == store.get_many(["a", "b"]) == [(1.0, b"x"), None]


def test_clear_empties_everything(store):
    store.flush(7, {"a": (1.0, b"x"), "b": (2.0, b"y")})
    store.clear()
    assert len(store) == 0 and store.last_tag() == 0 and everything_due(store) == [] and undo_tags(store) == set()
    store.flush(1, {"c": (3.0, b"z")})
    assert store.get_many(["a", "c"]) == [None, (3.0, b"z")]


def test_a_store_of_another_format_is_refused(tmp_path):
    LmdbSpillStore(tmp_path / "b").close()
    env = lmdb.open(str(tmp_path / "b"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"format", b"0", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(SpillStoreError, match="format"):
        LmdbSpillStore(tmp_path / "b")


def big_writes(n: int, start: int = 0, size: int = 1000) -> dict[str, tuple[float, bytes]]:
    return {f"key-{i:08d}": (float(i % 97), bytes([i % 251]) * size) for i in range(start, start + n)}


@pytest.mark.parametrize("durable", [True, False])
def test_map_grows_from_64_kib(tmp_path, durable):
    s = LmdbSpillStore(tmp_path / "b", map_size=64 << 10, durable=durable)
    for tag in range(1, 4):
        s.flush(tag, big_writes(1500, start=(tag - 1) * 1500))  # ~1.5 MB each, ~4.5 MB in all
    assert s._env.info()["map_size"] >= 4 << 20 and s.disk_bytes() >= 4 << 20
    keys = [f"key-{i:08d}" for i in range(4500)]
    assert all(got == (float(i % 97), bytes([i % 251]) * 1000) for i, got in enumerate(s.get_many(keys)))
    assert len(everything_due(s)) == 4500 == len(s)
    s.close()


def test_full_store_raises_and_keeps_its_state(tmp_path):
    s = LmdbSpillStore(tmp_path / "b", map_size=64 << 10, max_map_size=256 << 10)
    s.flush(1, big_writes(20))
    before = (s.get_many(list(big_writes(40))), everything_due(s), len(s), s.last_tag(), undo_tags(s))
    with pytest.raises(SpillStoreFull, match="max_map_size=262144") as err:
        s.flush(2, big_writes(3000, start=10))
    assert str(tmp_path / "b") in str(err.value)
    assert (s.get_many(list(big_writes(40))), everything_due(s), len(s), s.last_tag(), undo_tags(s)) == before
    s.flush(2, {"key-00000000": (0.5, b"small"), "key-00000001": None})  # still usable
    assert s.get_many(["key-00000000", "key-00000001"]) == [(0.5, b"small"), None]
    assert s.rollback(1) == 2 and s.get_many(list(big_writes(40))) == before[0]
    s.close()
    # A first map larger than the cap starts at the cap (the default map is larger than small caps).
    with LmdbSpillStore(tmp_path / "c", map_size=1 << 20, max_map_size=64 << 10) as c:
        assert c._env.info()["map_size"] == 64 << 10


def test_a_full_store_without_undo_records_keeps_its_state(tmp_path):
    """A store no resume reads (durable=False) deletes without copying old values out: a
    transaction that found the map full still leaves what was committed as it was."""
    s = LmdbSpillStore(tmp_path / "b", map_size=64 << 10, max_map_size=256 << 10, durable=False)
    s.flush(1, big_writes(20), durable=False)
    before = (s.get_many(list(big_writes(40))), everything_due(s), len(s), s.last_tag())
    deletes = {key: None for key in big_writes(5)}  # done in the transaction, before the puts fill the map
    with pytest.raises(SpillStoreFull, match="max_map_size=262144"):
        s.flush(2, {**deletes, **big_writes(3000, start=10)}, durable=False)
    assert (s.get_many(list(big_writes(40))), everything_due(s), len(s), s.last_tag()) == before
    s.flush(2, {"key-00000000": (0.5, b"small"), "key-00000001": None}, durable=False)  # still usable
    assert s.get_many(["key-00000000", "key-00000001"]) == [(0.5, b"small"), None]
    s.close()
    with LmdbSpillStore(tmp_path / "b", durable=False) as again:  # and a reopen reads the commits
        assert again.get_many(["key-00000000", "key-00000002"]) == [(0.5, b"small"), before[0][2]]


def test_a_hundred_thousand_entries_flush_in_one_call(store):
    writes = {f"r{i:07d}\x00i{i % 50:03d}": (1.7e9 + i % 600, b"x" * 24) for i in range(100_000)}
    store.flush(1, writes)
    assert len(store) == 100_000 and store.last_tag() == 1
    keys = list(writes)[::997]
    assert store.get_many(keys) == [writes[k] for k in keys]
    assert len(store.due(1.7e9 + 10)) == sum(1 for i in range(100_000) if i % 600 <= 10)
    store.flush(2, dict.fromkeys(writes))  # and leave in one call too
    assert len(store) == 0 and everything_due(store) == []


def test_module_does_not_import_bytewax():
    code = "import sys, flows.spill; print('bytewax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the undo property: any flushes, any rollback, the store equals a model -------------------

KEYS = ["a", "b", "c", "d", "e", "ab", "é", "\x00"]
DUES = st.sampled_from([-INF, -1.5, -0.0, 0.0, 1.0, 2.5, 1e12, INF]) | st.floats(allow_nan=False)
ENTRIES = st.none() | st.tuples(DUES, st.binary(max_size=6))
UNDO_KEEP = 3


class SpillModel(RuleBasedStateMachine):
    """A dict per tag is the model; the store must match it after every step, rollbacks included."""

    hash_bits = 64
    durable = True

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="spill-")
        self.store = LmdbSpillStore(self.dir, undo_keep=UNDO_KEEP, map_size=256 << 10, hash_bits=self.hash_bits,
                                    durable=self.durable)
        self.reset_model()

    def reset_model(self) -> None:
        self.state: dict[str, tuple[float, bytes]] = {}
        self.last = 0
        self.at_end_of: dict[int, dict] = {0: {}}  # the state after the last flush of each tag
        self.kept: set[int] = set()  # tags whose undo records the store must still hold
        self.written: dict[int, set[str]] = {}  # the keys each tag wrote (what a rollback restores)
        self.dropped = 0

    @rule(step=st.sampled_from([0, 0, 1, 1, 2, 5]), writes=st.dictionaries(st.sampled_from(KEYS), ENTRIES, max_size=6))
    def flush(self, step: int, writes: dict) -> None:
        tag = self.last + step
        self.store.flush(tag, writes, durable=self.durable)
        # Deleting an absent key changes nothing, so it has nothing to undo.
        writes = {k: v for k, v in writes.items() if v is not None or k in self.state}
        for key, entry in writes.items():
            if entry is None:
                self.state.pop(key, None)
            else:
                self.state[key] = entry
        self.last = tag
        self.at_end_of[tag] = dict(self.state)
        self.written.setdefault(tag, set()).update(writes)
        if not self.durable:  # no undo records: no rollback below this flush
            self.dropped = tag
            return
        if writes:
            self.kept.add(tag)
        for old in [t for t in self.kept if t <= tag - UNDO_KEEP]:
            self.kept.discard(old)
            self.dropped = max(self.dropped, old)

    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        to_tag = data.draw(st.integers(0, self.last + 1), label="to_tag")
        if to_tag < self.last and to_tag < self.dropped:
            with pytest.raises(SpillStoreError):
                self.store.rollback(to_tag)
            return
        restored = self.store.rollback(to_tag)
        if to_tag >= self.last:
            assert restored == 0
            return
        assert restored == len(set().union(*(keys for t, keys in self.written.items() if t > to_tag)))
        base = max(t for t in self.at_end_of if t <= to_tag)
        self.written = {t: keys for t, keys in self.written.items() if t <= to_tag}
        self.state = dict(self.at_end_of[base])
        self.at_end_of = {t: s for t, s in self.at_end_of.items() if t <= to_tag}
        self.kept = {t for t in self.kept if t <= to_tag}
        self.last = to_tag

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = LmdbSpillStore(self.dir, undo_keep=UNDO_KEEP, map_size=64 << 10, hash_bits=self.hash_bits,
                                    durable=self.durable)

    @precondition(lambda self: self.last > 6)
    @rule()
    def clear(self) -> None:
        self.store.clear()
        self.reset_model()

    @invariant()
    def matches_the_model(self) -> None:
        s = self.store
        assert s.last_tag() == self.last
        assert len(s) == len(self.state)
        assert s.get_many(KEYS) == [self.state.get(k) for k in KEYS]
        expected_index = sorted((due + 0.0, key) for key, (due, _) in self.state.items())
        assert everything_due(s) == expected_index
        assert s.due(1.0) == [x for x in expected_index if x[0] <= 1.0]
        assert undo_tags(s) == self.kept

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


SpillModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_undo_matches_a_model = SpillModel.TestCase


class SharedHashSpillModel(SpillModel):
    """The same with every key's hash cut to one bit: keys share the index's slots (see DueIndex)."""

    hash_bits = 1


SharedHashSpillModel.TestCase.settings = SpillModel.TestCase.settings
test_keys_that_share_a_hash_match_the_model = SharedHashSpillModel.TestCase


class NonDurableSpillModel(SpillModel):
    """The same for a store no resume reads (durable=False: no undo records, and deletes that copy
    nothing out), its keys sharing the index's slots; it refuses a rollback below its last flush."""

    hash_bits = 1
    durable = False


NonDurableSpillModel.TestCase.settings = SpillModel.TestCase.settings
test_a_store_without_undo_records_matches_the_model = NonDurableSpillModel.TestCase


def test_keys_that_share_a_hash_are_told_apart_by_their_entries(tmp_path):
    with LmdbSpillStore(tmp_path / "s", hash_bits=1) as s:
        keys = [f"k{i}" for i in range(50)]
        s.flush(1, {k: (float(i % 7), k.encode() * 2) for i, k in enumerate(keys)})
        assert len(s) == 50 and len(s._shared) >= 48  # two hashes at most in the index
        assert s.get_many(keys) == [(float(i % 7), k.encode() * 2) for i, k in enumerate(keys)]
        assert s.get("absent") is None
        s.flush(2, {k: None for k in keys[::2]} | {k: (9.0, b"x") for k in keys[1::4]})
        expected = {k: (9.0, b"x") if i % 4 == 1 else (float(i % 7), k.encode() * 2)
                    for i, k in enumerate(keys) if i % 2}
        assert s.get_many(keys) == [expected.get(k) for k in keys] and len(s) == len(expected)
        assert everything_due(s) == sorted((due, k) for k, (due, _) in expected.items())
        assert s.rollback(1) == 25 + 13
        assert s.get_many(keys) == [(float(i % 7), k.encode() * 2) for i, k in enumerate(keys)]


def test_a_store_no_resume_reads_keeps_no_undo_records_and_refuses_a_rollback_with_the_reason(tmp_path):
    with LmdbSpillStore(tmp_path / "s", durable=False) as s:
        s.flush(1, {"a": (1.0, b"x"), "b": (2.0, b"y")})
        s.flush(2, {"a": None, "b": (3.0, b"z")}, durable=False)
        with s._env.begin() as txn:
            assert txn.stat(s._undo)["entries"] == 0
        assert s.get("a") is None and everything_due(s) == [(3.0, "b")]  # the index kept up
        assert s.rollback(2) == 0  # to where it is: nothing to undo
        with pytest.raises(SpillStoreError, match="durable=False"):
            s.rollback(1)
    with LmdbSpillStore(tmp_path / "s") as s:  # reopened durable: still no rollback below
        with pytest.raises(SpillStoreError, match="tag 1"):
            s.rollback(1)
        s.clear()
        assert s.last_tag() == 0 and len(s) == 0


@pytest.mark.parametrize("durable", [True, False])
def test_a_fresh_store_creates_no_lmdb_files_until_its_first_write(tmp_path, durable):
    s = LmdbSpillStore(tmp_path / "b", durable=durable)
    s.clear()
    assert s.rollback(0) == 0 and s.get_many(["a"]) == [None] and everything_due(s) == []
    assert (len(s), s.last_tag(), s.disk_bytes()) == (0, 0, 0)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == []
    s.flush(1, {"a": (1.0, b"x")})
    assert (tmp_path / "b" / "data.mdb").exists() and s.get("a") == (1.0, b"x") and s.disk_bytes() > 0
    s.close()
    with LmdbSpillStore(tmp_path / "b", durable=durable) as again:  # a store with data opens at once
        assert again.last_tag() == 1 and everything_due(again) == [(1.0, "a")]
    closed = LmdbSpillStore(tmp_path / "c", durable=durable)
    closed.close()
    with pytest.raises(SpillStoreError, match="is closed"):
        closed.flush(1, {"a": (1.0, b"x")})


def test_a_flush_without_undo_puts_moves_and_deletes_around_everything_stored(tmp_path):
    with LmdbSpillStore(tmp_path / "s", durable=False) as s:
        s.flush(1, {f"k{i}": (10.0 + i, b"x") for i in range(0, 40, 2)})
        # Due before, between, after the entries stored; one moved from the middle to the end;
        # one deleted; one rewritten in place.
        s.flush(2, {"early": (1.0, b"e"), "k5": (15.0, b"m"), "late1": (100.0, b"l1"), "late0": (99.0, b"l0"),
                    "k4": (200.0, b"moved"), "k6": None, "k8": (18.0, b"again")})
        got = everything_due(s)
        assert got == sorted(got) and len(s) == len(got) == 23  # 20, 4 new, 1 deleted
        assert s.get_many(["early", "k5", "late0", "late1", "k4", "k6", "k8", "k10"]) == [
            (1.0, b"e"), (15.0, b"m"), (99.0, b"l0"), (100.0, b"l1"), (200.0, b"moved"), None, (18.0, b"again"),
            (20.0, b"x")]
    with LmdbSpillStore(tmp_path / "s", durable=False) as s:  # and LMDB holds them so, in order
        assert everything_due(s) == got
