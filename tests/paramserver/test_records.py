"""The param-deltas records: many rows at once, dense chunks, catalog and users, round trip exactly."""

from __future__ import annotations

import math
import struct

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from paramserver.records import (
    LONG_ID_MARK,
    MAX_KEY_BYTES,
    ROW_FORMAT,
    ROW_HEADER_BYTES,
    RecordError,
    Records,
    UserActions,
    append_user_actions,
    decode_dense,
    decode_dense_chunk,
    decode_item,
    decode_row_values,
    decode_rows,
    decode_user_actions,
    dense_key,
    encode_dense,
    encode_item,
    encode_rows,
    encode_user_actions,
    item_key,
    key_kind,
    long_id,
    row_key,
    row_keys,
    split_row_key,
    user_key,
)
from paramserver.rows import DenseBlob, RowBatch

ids_st = st.lists(st.text(max_size=20), unique=True, max_size=50)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(0, 300), dim=st.integers(1, 40))
def test_rows_round_trip_bit_for_bit(data, n, dim):
    values = data.draw(hnp.arrays(np.float32, (n, dim), elements=st.floats(width=32, allow_nan=True)))
    versions = data.draw(hnp.arrays(np.uint64, n))
    arrivals = data.draw(hnp.arrays(np.float64, n, elements=st.floats(allow_nan=True, allow_infinity=False)))
    recs = encode_rows(values, versions, 1764288000.5, arrivals)
    assert len(recs) == n
    assert all(len(r) == ROW_HEADER_BYTES + 4 * dim and r[0] == ROW_FORMAT for r in recs)
    got = decode_rows(recs, dim if n else None)
    assert got.values.view(np.uint32).tolist() == values.view(np.uint32).tolist()
    assert got.versions.tolist() == versions.tolist()
    assert got.arrivals.view(np.uint64).tolist() == arrivals.view(np.uint64).tolist()
    assert (got.updated_at == 1764288000.5).all()


def test_row_record_layout_is_the_documented_one():
    import struct

    rec = encode_rows(np.array([[1.5, -2.0]], np.float32), [7], 10.25, [9.5])[0]
    fmt, version, upd, arr, dim = struct.unpack_from("<BQddI", rec)
    assert (fmt, version, upd, arr, dim) == (1, 7, 10.25, 9.5, 2)
    assert np.frombuffer(rec[29:], "<f4").tolist() == [1.5, -2.0]


def test_decoding_refuses_records_that_are_not_rows_of_one_dim():
    a = encode_rows(np.zeros((2, 4), np.float32), [1, 2], 0.0, [0.0, 0.0])
    b = encode_rows(np.zeros((1, 5), np.float32), [1], 0.0, [0.0])
    with pytest.raises(RecordError):
        decode_rows(a + b)
    with pytest.raises(RecordError):
        decode_rows(a, dim=5)
    with pytest.raises(RecordError):
        decode_rows([b"\x02" + a[0][1:]])
    with pytest.raises(RecordError):
        decode_rows([b"short"])
    for bad in (a + b, [b"\x02" + a[0][1:]], [b"short"], [a[0], a[1][:-4] + b"\0" * 4 + b"\0"]):
        with pytest.raises(RecordError):
            decode_row_values(bad)
    with pytest.raises(RecordError):
        decode_row_values(a, dim=5)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 20), dim=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_decode_row_values_is_what_decode_rows_reads(n, dim, seed):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, dim)).astype(np.float32)
    versions = rng.integers(0, 2**63, n, dtype=np.uint64)
    recs = encode_rows(values, versions, 5.0, np.full(n, 1.0))
    got, got_versions = decode_row_values(recs, dim)
    full = decode_rows(recs, dim)
    assert got.dtype == np.float32 and got.shape == (n, dim) and got_versions.dtype == np.uint64
    assert got.tobytes() == values.tobytes() == full.values.tobytes()
    assert got_versions.tolist() == versions.tolist() == full.versions.tolist()


@settings(max_examples=100, deadline=None)
@given(slot=st.text(min_size=1, max_size=10).filter(lambda s: "/" not in s and s not in ("dense", "item", "user")),
       ids=ids_st)
def test_row_keys_are_slot_slash_id_for_any_id(slot, ids):
    keys = row_keys(slot, ids)
    assert keys == [f"{slot}/{i}".encode() for i in ids] == [row_key(slot, i) for i in ids]
    assert [split_row_key(k) for k in keys] == [(slot, i) for i in ids]
    assert all(key_kind(k) == "row" for k in keys)


def test_ids_with_nul_and_slashes_still_make_their_own_keys():
    ids = ["a\0b", "x/y/z", "", "\0", "é"]
    assert row_keys("s", ids) == [b"s/a\0b", b"s/x/y/z", b"s/", b"s/\0", "s/é".encode()]


@pytest.mark.parametrize("slot", ["", "item", "user", "dense", "a/b"])
def test_slot_names_that_would_clash_with_other_keys_are_refused(slot):
    with pytest.raises(RecordError):
        row_keys(slot, ["1"])


def test_key_kinds():
    assert key_kind(b"item/v1") == "item"
    assert key_kind(b"user/u1") == "user"
    assert key_kind(b"dense/w/0") == "dense"
    assert key_kind(b"item_id/v1") == "row"


dense_arrays = st.dictionaries(
    st.text(alphabet="abcdefgh_", min_size=1, max_size=6),
    st.one_of(
        hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=30)),
        hnp.arrays(np.int64, hnp.array_shapes(min_dims=1, max_dims=2, max_side=10)),
        hnp.arrays(np.dtype(">f8"), hnp.array_shapes(min_dims=1, max_dims=2, max_side=10)),
    ),
    min_size=1, max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(arrays=dense_arrays, chunk=st.integers(1, 300), version=st.integers(0, 2**63))
def test_dense_blob_round_trips_through_chunks(arrays, chunk, version):
    blob = DenseBlob(version=version, arrays=arrays, updated_at=123.5)
    recs = encode_dense(blob, chunk_bytes=chunk)
    for k, v in recs:
        c = decode_dense_chunk(k, v)
        assert k == dense_key(c.name, c.index) and c.version == version and len(c.data) <= chunk
    got = decode_dense(reversed(recs))  # any order
    assert got.version == version and got.updated_at == 123.5
    assert set(got.arrays) == set(arrays)
    for name, a in arrays.items():
        b = got.arrays[name]
        assert b.shape == a.shape and b.dtype.kind == a.dtype.kind
        assert np.array_equal(b, a, equal_nan=a.dtype.kind == "f")


def test_a_big_array_goes_in_512_kib_chunks():
    blob = DenseBlob(3, {"w": np.arange(300_000, dtype=np.float32)}, 1.0)
    recs = encode_dense(blob)
    assert [k for k, _ in recs] == [b"dense/w/0", b"dense/w/1", b"dense/w/2"]
    assert decode_dense_chunk(*recs[0]).count == 3
    assert np.array_equal(decode_dense(recs).arrays["w"], blob.arrays["w"])


def test_dense_chunks_that_do_not_make_one_whole_blob_are_refused():
    a = encode_dense(DenseBlob(1, {"w": np.arange(100, dtype=np.float32), "b": np.zeros(2, np.float32)}, 1.0), 64)
    b = encode_dense(DenseBlob(2, {"w": np.arange(100, dtype=np.float32), "b": np.zeros(2, np.float32)}, 1.0), 64)
    with pytest.raises(RecordError):
        decode_dense(a[:-1])  # an array missing
    with pytest.raises(RecordError):
        decode_dense(a[1:])  # a chunk missing
    with pytest.raises(RecordError):
        decode_dense(a[:3] + b[3:])  # two versions
    assert decode_dense([]) is None


def test_catalog_records_are_json_and_user_records_msgpack():
    item = {"item_id": "v1", "ts": 1764280000.0, "sparse": {"author": "a7", "tags": ["dance"]},
            "dense": {"ctr": 0.5}, "popularity": {"like": 3}}
    assert decode_item(encode_item(item)) == item
    assert encode_item({"a": 1}) == b'{"a":1}'
    acts = [("v1", "like", 1.5), ("v2", "click", 2)]
    want = [("v1", "like", 1.5), ("v2", "click", 2.0)]
    assert msgspec.msgpack.decode(encode_user_actions(acts)) == [list(a) for a in want]
    assert decode_user_actions(encode_user_actions(acts)) == want
    assert decode_user_actions(encode_user_actions(iter([(7, "like", 1.5)]))) == [("7", "like", 1.5)]  # converted
    typed = UserActions(want)
    assert encode_user_actions(typed) == encode_user_actions(acts)
    # What stores written before msgpack hold, JSON, reads the same.
    assert decode_user_actions(b'[["v1","like",1.5],["v2","click",2]]') == want
    for bad in (msgspec.msgpack.encode([[1, "like", 1.5]]), msgspec.msgpack.encode({"a": 1}), b"\xc1"):
        with pytest.raises(RecordError, match="user record"):
            decode_user_actions(bad)


_IDS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=300)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_IDS, st.sampled_from(["like", "skip"]), st.floats(-1e6, 1e6)), max_size=40),
       st.lists(st.tuples(_IDS, st.sampled_from(["like", "skip"]), st.floats(-1e6, 1e6)), max_size=20),
       st.integers(1, 45))
def test_appending_to_a_users_record_is_encoding_the_appended_list(old, new, cap):
    # Ids of every string header's size (fix, 8 and 16 bit), arrays of both headers' sizes; the
    # append stands down (None) exactly when a new action is not newer than the record's newest.
    old = sorted(old, key=lambda a: a[2])[-cap:]
    new = sorted(dict.fromkeys(new), key=lambda a: a[2])
    got = append_user_actions(encode_user_actions(old), new, cap)
    if not new or (old and not new[0][2] > old[-1][2]):
        assert got is None
    else:
        assert got == encode_user_actions((old + new)[-cap:])


def test_appending_stands_down_on_a_record_it_did_not_write():
    # Not an array; a newest ts that is not a float64; an oldest action to drop that is not
    # [str, str, float64]: it does not guess, the catalog merges the decoded list instead.
    enc = msgspec.msgpack.encode
    for record in (b"", b"\xc1", enc({"a": 1}), enc([["v1", "like", 1]]), enc([[1, "a", 1.0], ["v1", "like", 2.0]]),
                   enc([["v0", "like", 1], ["v1", "like", 2.0]]), enc([["v0", "like"], ["v1", "like", 2.0]])):
        assert append_user_actions(record, [("v2", "like", 5.0)], 2) is None
    cut = b"\x92\x93\xd9\xffab" + b"\xcb" + struct.pack(">d", 2.0)  # an id's length past the record's end
    assert append_user_actions(cut, [("v2", "like", 5.0)], 2) is None
    assert encode_user_actions(b"any record") == b"any record"  # a record is written as it is


def test_appending_crosses_the_array_headers_and_types_what_it_appends():
    for n in (14, 15, 16, 65_534, 65_535, 70_000):
        old = [(f"v{k}", "like", float(k)) for k in range(n)]
        for cap in (n, n + 1, n + 2):
            new = [("w", "skip", n + 1), ("x", "like", n + 2.5)]  # an int ts: written as a float
            want = encode_user_actions((old + new)[-cap:])
            assert append_user_actions(encode_user_actions(old), new, cap) == want, (n, cap)


def test_the_records_module_examples_hold():
    import doctest

    import paramserver.records as records

    assert doctest.testmod(records).failed == 0


def test_records_of_pairs_know_what_the_writer_knows():
    n = 5
    batch = RowBatch("s", 3, [str(i) for i in range(n)], np.ones((n, 3), np.float32), np.arange(n),
                     np.array([1.0, math.nan, 3.0, 4.0, 5.0]), 50.0, evicted=["x"])
    built = Records()
    built.add_row_batch(batch)
    built.add_dense(DenseBlob(4, {"w": np.zeros(3, np.float32)}, 60.0), stale_keys=[b"dense/w/0", b"dense/old/0"])
    built.add([b"item/v1"], [encode_item({"item_id": "v1"})])
    pairs = [(k, v or None) for k, v in built.pairs()]
    read = Records.from_pairs(pairs)
    assert read.pairs() == built.pairs()
    assert read.tombstones == built.tombstones == 2  # the evicted row and the dropped dense array
    assert read.dense_version == built.dense_version == 4
    assert read.newest_update == built.newest_update == 60.0
    assert np.array_equal(read.arrival_times(), built.arrival_times(), equal_nan=True)


@settings(max_examples=50, deadline=None)
@given(size=st.integers(1, 40), n=st.sampled_from([0, 1, 5, 8191, 8192, 8193, 17000]))
def test_split_bytes_cuts_like_slicing(size, n):
    from paramserver.records import split_bytes

    buf = bytes(range(256)) * (size * n // 256 + 1)
    buf = buf[:size * n]
    assert split_bytes(buf, size) == [buf[i:i + size] for i in range(0, len(buf), size)]


@pytest.mark.parametrize("make", [lambda i: row_keys("item_id.bias", [i])[0], lambda i: row_key("s", i),
                                  item_key, user_key])
def test_ids_too_long_for_an_lmdb_key_make_a_digest_key_of_their_own(make):
    # 128 characters of 4 bytes: a valid id (CONTRACT.md) of 512 bytes, past LMDB's 511-byte keys.
    long_a, long_b = "\U0001F600" * 128, "\U0001F600" * 127 + "x"
    ka, kb = make(long_a), make(long_b)
    assert len(ka) <= MAX_KEY_BYTES and len(kb) <= MAX_KEY_BYTES and ka != kb
    assert ka.endswith(long_id(long_a).encode()) and LONG_ID_MARK.encode() in ka
    assert make(long_a) == ka  # the same in every call and process: no salt
    assert make("short").endswith(b"/short")


def test_row_keys_of_a_mixed_batch_match_row_key_one_by_one():
    ids = ["a", "é" * 300, "\0" * 600, "b" * 511, "c" * 505]
    assert row_keys("s", ids) == [row_key("s", i) for i in ids]
    assert [len(k) <= MAX_KEY_BYTES for k in row_keys("s", ids)] == [True] * 5
    assert row_keys("s", ids)[0] == b"s/a"
