"""The one parser of the contract's events (CONTRACT.md: Time, Feature/Action/Item event, Dead letter).

Example tests name each kind of bad input the contract lists; property tests check that no byte
sequence raises, that every valid event survives a round trip, and that wrong types never pass.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flows.events import (
    DEFAULT_MAX_FUTURE_S,
    MAX_MESSAGE_BYTES,
    MAX_TS,
    STREAMS,
    ActionEvent,
    DeadLetter,
    FeatureEvent,
    ItemEvent,
    encode,
    encode_lines,
    parse,
    parse_many,
)

ARRIVAL = 1764288000.5
TS = 1764288000.125

VALID: dict[str, dict[str, Any]] = {
    "features": {
        "request_id": "r-9f3c", "user_id": "u42", "item_id": "v9001", "ts": TS, "position": 0,
        "sparse": {"author": "a7", "tags": ["dance", "cat"]}, "dense": {"item_ctr_7d": 0.031},
        "model_version": "17", "score": 0.42, "event_id": "e-1",
    },
    "actions": {
        "request_id": "r-9f3c", "user_id": "u42", "item_id": "v9001", "ts": TS,
        "action": "like", "value": 12.5, "event_id": "e-2",
    },
    "items": {"item_id": "v9001", "ts": TS, "sparse": {"author": "a7", "tags": ["dance"]}, "dense": {"len": 31.0}},
}
REQUIRED = {
    "features": ["request_id", "user_id", "item_id", "ts"],
    "actions": ["request_id", "user_id", "item_id", "ts", "action"],
    "items": ["item_id", "ts"],
}
ID_FIELDS = {s: [f for f in fields if f.endswith("_id")] for s, fields in REQUIRED.items()}
ALL_STREAMS = list(STREAMS)
ACTIONS = ["click", "like", "share", "comment", "follow", "finish", "purchase", "watch", "skip", "dislike"]

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def raw_of(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def with_(stream: str, **changes: Any) -> bytes:
    """The stream's valid example with some fields changed (a value of `...` removes the field)."""
    obj = dict(VALID[stream])
    for k, v in changes.items():
        if v is ...:
            obj.pop(k, None)
        else:
            obj[k] = v
    return raw_of(obj)


def splice(stream: str, field: str, token: str) -> bytes:
    """The valid example with a raw JSON token (e.g. NaN, 1e400) as the value of `field`."""
    obj = dict(VALID[stream])
    obj[field] = "@@TOKEN@@"
    return raw_of(obj).replace(b'"@@TOKEN@@"', token.encode())


def dead(result: Any, *words: str) -> DeadLetter:
    """Assert `result` is a dead letter whose reason contains every one of `words`."""
    assert isinstance(result, DeadLetter), f"accepted: {result!r}"
    for w in words:
        assert w in result.reason, f"{w!r} not in reason {result.reason!r}"
    return result


def accepted(result: Any, stream: str) -> Any:
    assert not isinstance(result, DeadLetter), f"dead-lettered: {result.reason}"
    assert type(result) is STREAMS[stream]
    return result


def floats_of(event: Any) -> list[float]:
    """Every float an accepted event holds."""
    out = [event.ts, event.received_at]
    out += [getattr(event, f) for f in ("score", "value") if getattr(event, f, None) is not None]
    out += list(getattr(event, "dense", {}).values())
    return out


def assert_finite(event: Any) -> None:
    for x in floats_of(event):
        assert isinstance(x, float) and math.isfinite(x), (x, event)


# --------------------------------------------------------------------------------------------
# Valid input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_contract_example_is_accepted_with_arrival_as_received_at(stream):
    e = accepted(parse(stream, raw_of(VALID[stream]), ARRIVAL), stream)
    assert e.ts == TS and e.received_at == ARRIVAL
    for k, v in VALID[stream].items():
        assert getattr(e, k) == v


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_only_required_fields_is_accepted_with_defaults(stream):
    obj = {k: VALID[stream][k] for k in REQUIRED[stream]}
    e = accepted(parse(stream, raw_of(obj), ARRIVAL), stream)
    if stream != "actions":
        assert e.sparse == {} and e.dense == {}


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_unknown_fields_are_ignored(stream):
    extra = {"zz": {"a": [1, {"b": None}]}, "n": 1e300, "t": True, "s": "x", "l": [], "o": {}}
    plain = accepted(parse(stream, raw_of(VALID[stream]), ARRIVAL), stream)
    assert parse(stream, raw_of({**extra, **VALID[stream]}), ARRIVAL) == plain


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_integer_ts_is_accepted_as_float(stream):
    e = accepted(parse(stream, with_(stream, ts=1764288000), ARRIVAL), stream)
    assert e.ts == 1764288000.0 and type(e.ts) is float


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_ts_range_bounds(stream):
    accepted(parse(stream, with_(stream, ts=MAX_TS), MAX_TS), stream)
    accepted(parse(stream, with_(stream, ts=5e-324), ARRIVAL), stream)  # smallest positive float


def test_position_zero_and_every_action_are_accepted():
    accepted(parse("features", with_("features", position=0), ARRIVAL), "features")
    for action in ACTIONS:
        assert accepted(parse("actions", with_("actions", action=action), ARRIVAL), "actions").action == action


def test_sparse_and_dense_shapes_are_accepted():
    e = parse("items", with_("items", sparse={"a": "b", "t": [], "u": ["x", "y"]}, dense={"i": 3, "f": -0.5}), 1e10)
    e = accepted(e, "items")
    assert e.sparse == {"a": "b", "t": [], "u": ["x", "y"]} and e.dense == {"i": 3.0, "f": -0.5}


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_whitespace_around_the_object_is_accepted(stream):
    accepted(parse(stream, b" \t" + raw_of(VALID[stream]) + b"\r\n", ARRIVAL), stream)


# --------------------------------------------------------------------------------------------
# Bad input, one kind at a time
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", ALL_STREAMS)
@pytest.mark.parametrize("raw", [b"\xff", b"\xc3(", b"ab\x80cd", b'{"item_id": "\xed\xa0\x80"}'], ids=repr)
def test_not_utf8_is_dead_lettered_as_base64(stream, raw):
    d = dead(parse(stream, raw, ARRIVAL), "not UTF-8")
    assert d.raw is None and base64.b64decode(d.raw_b64) == raw and d.truncated is False
    assert d.stream == stream and d.received_at == ARRIVAL


@pytest.mark.parametrize("stream", ALL_STREAMS)
@pytest.mark.parametrize("where", ["unknown value", "unknown key", "known field", "sparse key"])
def test_not_utf8_inside_an_otherwise_valid_event_is_dead_lettered(stream, where):
    """msgspec skips unknown fields without checking their bytes; the parser must not accept them."""
    good = raw_of(VALID[stream])
    raw = {
        "unknown value": good[:-1] + b', "zz": "a\xffb"}',
        "unknown key": good[:-1] + b', "z\xfe": 1}',
        "known field": good.replace(b'"v9001"', b'"v9\xc0\x81"'),
        "sparse key": b'{"sparse": {"\xff": "x"}, ' + good[1:],
    }[where]
    d = dead(parse(stream, raw, ARRIVAL), "not UTF-8", "offset")
    assert d.raw is None and base64.b64decode(d.raw_b64) == raw
    offset = int(d.reason.rsplit(" ", 1)[1])
    with pytest.raises(UnicodeDecodeError) as err:
        raw.decode()
    assert offset == err.value.start  # an offset in the input, not in some string inside it


@pytest.mark.parametrize("stream", ALL_STREAMS)
@pytest.mark.parametrize(
    "raw", [b"", b"   ", b"{", b"nul", b"{'a': 1}", b'{"a" 1}', b'{"a": 1,}', b"\xef\xbb\xbf{}"], ids=repr
)
def test_not_json_is_dead_lettered_as_text(stream, raw):
    d = dead(parse(stream, raw, ARRIVAL), "not JSON")
    assert d.raw == raw.decode() and d.raw_b64 is None and d.truncated is False


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_trailing_garbage_after_a_valid_event_is_not_json(stream):
    dead(parse(stream, raw_of(VALID[stream]) + b" x", ARRIVAL), "not JSON")


@pytest.mark.parametrize("stream", ALL_STREAMS)
@pytest.mark.parametrize(
    "raw, kind", [(b"[1, 2]", "array"), (b"[]", "array"), (b'"str"', "str"), (b"5", "int"), (b"2.5", "float"),
                  (b"true", "bool"), (b"null", "null")],
)
def test_not_an_object_is_dead_lettered(stream, raw, kind):
    dead(parse(stream, raw, ARRIVAL), "not an object", kind)


@pytest.mark.parametrize("stream, field", [(s, f) for s in ALL_STREAMS for f in REQUIRED[s]])
def test_missing_required_field_is_named(stream, field):
    d = dead(parse(stream, with_(stream, **{field: ...}), ARRIVAL))
    assert d.reason == f"missing field {field}"


@pytest.mark.parametrize(
    "stream, field, value",
    [(s, f, v) for s in ALL_STREAMS for f in REQUIRED[s]
     for v in ([None, "x", "1764288000", [], {}] if f == "ts" else [None, 7, 1.5, [], {}, ["x"]])],
    ids=repr,
)
def test_mistyped_required_field_is_named(stream, field, value):
    dead(parse(stream, with_(stream, **{field: value}), ARRIVAL), f"invalid field {field}:", "Expected")


NUMBER_FIELDS = [("features", "ts"), ("features", "score"), ("features", "position"), ("features", "received_at"),
                 ("actions", "ts"), ("actions", "value"), ("actions", "received_at"),
                 ("items", "ts"), ("items", "received_at")]


@pytest.mark.parametrize("stream, field", NUMBER_FIELDS)
@pytest.mark.parametrize("flag", [True, False])
def test_a_boolean_is_not_a_number(stream, field, flag):
    dead(parse(stream, with_(stream, **{field: flag}), ARRIVAL), f"invalid field {field}:", "bool")


@pytest.mark.parametrize("stream", ["features", "items"])
@pytest.mark.parametrize("flag", [True, False])
def test_a_boolean_is_not_a_dense_value(stream, flag):
    dead(parse(stream, with_(stream, dense={"x": 1.0, "y": flag}), ARRIVAL), "invalid field dense", "bool")


@pytest.mark.parametrize("action", ["love", "LIKE", "", " like", "view"])
def test_unknown_action_is_dead_lettered(action):
    dead(parse("actions", with_("actions", action=action), ARRIVAL), "invalid field action", "enum", repr(action))


FLOAT_FIELDS = [("features", "ts"), ("features", "score"), ("features", "received_at"), ("actions", "ts"),
                ("actions", "value"), ("actions", "received_at"), ("items", "ts"), ("items", "received_at")]


@pytest.mark.parametrize("stream, field", FLOAT_FIELDS)
@pytest.mark.parametrize("token", ["1e400", "-1e400", "1" * 400])
def test_overflowing_number_is_dead_lettered(stream, field, token):
    d = dead(parse(stream, splice(stream, field, token), ARRIVAL))
    assert field_named(d.reason) == field
    assert "finite" in d.reason or "out of range" in d.reason


@pytest.mark.parametrize("stream, field", FLOAT_FIELDS)
@pytest.mark.parametrize("token", ["NaN", "nan", "Infinity", "-Infinity", "inf"])
def test_non_finite_token_is_dead_lettered_as_not_json(stream, field, token):
    dead(parse(stream, splice(stream, field, token), ARRIVAL), "not JSON")


@pytest.mark.parametrize("stream", ["features", "items"])
@pytest.mark.parametrize("token", ["1e400", "NaN", "Infinity", "-Infinity"])
def test_non_finite_dense_value_is_dead_lettered(stream, token):
    raw = splice(stream, "dense", '{"ok": 1.0, "bad": ' + token + '}')
    d = dead(parse(stream, raw, ARRIVAL))
    assert d.reason.startswith("invalid field dense") or d.reason.startswith("not JSON")


@pytest.mark.parametrize("stream", ALL_STREAMS)
@pytest.mark.parametrize("ts", [0, 0.0, -0.0, -1, -1764288000.0, 1e-400, 1764288000000, 4102444800.001, 1e300])
def test_ts_out_of_range_is_dead_lettered(stream, ts):
    d = dead(parse(stream, splice(stream, "ts", repr(ts)), ARRIVAL))
    assert field_named(d.reason) == "ts"


@pytest.mark.parametrize("stream, field", [(s, f) for s in ALL_STREAMS for f in ID_FIELDS[s]])
@pytest.mark.parametrize("char", ["a", "漢", "😀"])
def test_id_length_is_counted_in_code_points(stream, field, char):
    e = accepted(parse(stream, with_(stream, **{field: char * 128}), ARRIVAL), stream)
    assert getattr(e, field) == char * 128
    dead(parse(stream, with_(stream, **{field: char * 129}), ARRIVAL), f"invalid field {field}:", "length")


@pytest.mark.parametrize("stream, field", [(s, f) for s in ALL_STREAMS for f in ID_FIELDS[s]])
def test_empty_id_is_dead_lettered(stream, field):
    dead(parse(stream, with_(stream, **{field: ""}), ARRIVAL), f"invalid field {field}:", "length")


@pytest.mark.parametrize("stream", ALL_STREAMS)
@pytest.mark.parametrize("filler", ["a", "漢"])
def test_message_over_64kib_is_truncated(stream, filler):
    """Only the first 64 KiB is kept; a character the cut splits is left out of `raw`."""
    head = raw_of(VALID[stream])[:-1] + b', "pad": "'
    raw = head + (filler * MAX_MESSAGE_BYTES).encode() + b'"}'
    d = dead(parse(stream, raw, ARRIVAL), "larger than", str(MAX_MESSAGE_BYTES))
    assert d.truncated is True and d.raw_b64 is None and d.received_at == ARRIVAL
    kept = d.raw.encode()
    assert raw.startswith(kept) and MAX_MESSAGE_BYTES - 3 < len(kept) <= MAX_MESSAGE_BYTES
    if filler == "a":
        assert kept == raw[:MAX_MESSAGE_BYTES]


def test_message_over_64kib_that_is_not_utf8_is_truncated_base64():
    raw = b"\xff" + b"x" * MAX_MESSAGE_BYTES
    d = dead(parse("items", raw, ARRIVAL), "larger than")
    assert d.truncated and d.raw is None and base64.b64decode(d.raw_b64) == raw[:MAX_MESSAGE_BYTES]


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_message_of_exactly_64kib_is_accepted(stream):
    head = raw_of(VALID[stream])[:-1] + b', "pad": "'
    raw = head + b"a" * (MAX_MESSAGE_BYTES - len(head) - 2) + b'"}'
    assert len(raw) == MAX_MESSAGE_BYTES
    accepted(parse(stream, raw, ARRIVAL), stream)
    dead(parse(stream, raw[:-2] + b'a"}', ARRIVAL), "larger than")


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_moderately_nested_unknown_field_is_ignored(stream):
    raw = raw_of(VALID[stream])[:-1] + b', "deep": ' + b"[" * 100 + b"]" * 100 + b"}"
    accepted(parse(stream, raw, ARRIVAL), stream)


@pytest.mark.parametrize("stream", ALL_STREAMS)
@pytest.mark.parametrize("opener, closer", [(b"[", b"]"), (b'{"a":', b"}")])
@pytest.mark.parametrize("closed", [True, False])
def test_deeply_nested_unknown_field_never_raises(stream, opener, closer, closed):
    depth = 20000 if opener == b"[" else 8000
    raw = raw_of(VALID[stream])[:-1] + b', "deep": ' + opener * depth + (b"1" + closer * depth if closed else b"") + b"}"
    assert len(raw) <= MAX_MESSAGE_BYTES
    d = dead(parse(stream, raw, ARRIVAL))
    assert d.raw == raw.decode()
    events, dls = parse_many(stream, [raw], ARRIVAL)
    assert events == [] and dls == [d]


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_ts_from_the_future_is_dead_lettered(stream):
    arrival, ahead = 1764288000.0, 100.0
    ok = parse(stream, with_(stream, ts=arrival + ahead), arrival, max_future_s=ahead)
    assert accepted(ok, stream).received_at == arrival
    d = dead(parse(stream, with_(stream, ts=arrival + ahead + 0.5), arrival, max_future_s=ahead), "from the future")
    assert d.received_at == arrival
    # the default is one day
    accepted(parse(stream, with_(stream, ts=arrival + DEFAULT_MAX_FUTURE_S), arrival), stream)
    dead(parse(stream, with_(stream, ts=arrival + DEFAULT_MAX_FUTURE_S + 1), arrival), "from the future")


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_event_with_its_own_received_at_is_judged_by_it(stream):
    arrival, ahead = 1764288000.0, 100.0
    # read much later than its writer accepted it: its own received_at says the ts was from the future
    late = with_(stream, ts=arrival + 500, received_at=arrival)
    d = dead(parse(stream, late, arrival + 10_000, max_future_s=ahead), "from the future")
    assert d.received_at == arrival + 10_000
    # read before its received_at (clock skew, less than max_future_s): judged by received_at, which it keeps
    early = with_(stream, ts=arrival + 150, received_at=arrival + 90)
    e = accepted(parse(stream, early, arrival, max_future_s=ahead), stream)
    assert e.received_at == arrival + 90


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_received_at_from_the_future_cannot_carry_a_future_ts_past_the_check(stream):
    # Both a day and more ahead of the moment the flow read it: it would drag the watermark forward.
    arrival = 1764288000.0
    bogus = with_(stream, ts=arrival + 3 * DEFAULT_MAX_FUTURE_S, received_at=arrival + 3 * DEFAULT_MAX_FUTURE_S)
    d = dead(parse(stream, bogus, arrival), "received_at from the future")
    assert d.received_at == arrival
    assert parse_many(stream, [bogus], arrival)[1][0].reason == d.reason


@pytest.mark.parametrize("stream", ALL_STREAMS)
@pytest.mark.parametrize("received_at", [0, -5.0])
def test_non_positive_received_at_is_dead_lettered(stream, received_at):
    dead(parse(stream, with_(stream, received_at=received_at), ARRIVAL), "received_at")


@pytest.mark.parametrize("position", [-1, -(2**40)])
def test_negative_position_is_dead_lettered(position):
    dead(parse("features", with_("features", position=position), ARRIVAL), "invalid field position:", ">= 0")


@pytest.mark.parametrize("position", [1.0, 0.5, "3", [0], {}])
def test_non_integer_position_is_dead_lettered(position):
    dead(parse("features", with_("features", position=position), ARRIVAL), "invalid field position:")


@pytest.mark.parametrize("stream", ["features", "items"])
@pytest.mark.parametrize(
    "sparse", [[], ["a"], "a", 1, 1.5, True, None, {"a": 1}, {"a": None}, {"a": True}, {"a": ["x", 2]},
               {"a": [["x"]]}, {"a": {"b": "c"}}, {"a": [None]}],
    ids=repr,
)
def test_sparse_with_wrong_types_is_dead_lettered(stream, sparse):
    d = dead(parse(stream, with_(stream, sparse=sparse), ARRIVAL), "invalid field sparse", "Expected")
    assert not d.reason.startswith("not an object")


@pytest.mark.parametrize("stream", ["features", "items"])
@pytest.mark.parametrize("dense", [[], [1.0], "a", 1, None, {"a": "1.5"}, {"a": None}, {"a": [1.0]}, {"a": {}}],
                         ids=repr)
def test_dense_with_wrong_types_is_dead_lettered(stream, dense):
    dead(parse(stream, with_(stream, dense=dense), ARRIVAL), "invalid field dense", "Expected")


@pytest.mark.parametrize("field, value", [("model_version", 17), ("event_id", 5), ("event_id", ["e"]),
                                          ("score", "0.4"), ("score", [0.4])])
def test_mistyped_optional_field_is_dead_lettered(field, value):
    dead(parse("features", with_("features", **{field: value}), ARRIVAL), f"invalid field {field}:")


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_dead_letter_keeps_stream_input_and_arrival(stream):
    raw = with_(stream, ts="soon")
    d = dead(parse(stream, raw, 123.25), "invalid field ts:")
    assert d == DeadLetter(stream, d.reason, raw.decode(), None, False, 123.25)
    assert msgspec.json.decode(encode(d)) == {
        "stream": stream, "reason": d.reason, "raw": raw.decode(), "raw_b64": None, "truncated": False,
        "received_at": 123.25,
    }


# --------------------------------------------------------------------------------------------
# parse_many agrees with parse
# --------------------------------------------------------------------------------------------


def mixed_lines(stream: str) -> list[bytes]:
    good = raw_of(VALID[stream])
    return [
        good, b"\xff", b"not json", b"[1]", with_(stream, ts=0), good,
        with_(stream, ts=ARRIVAL + 10 * DEFAULT_MAX_FUTURE_S),
        with_(stream, received_at=ARRIVAL - 7), with_(stream, received_at=ARRIVAL - 7, ts=ARRIVAL + 1e6),
        with_(stream, received_at=-1), good[:-1] + b', "x": "\xff"}', good + b"\n",
        b"{" + b" " * MAX_MESSAGE_BYTES + b"}", with_(stream, item_id=...), good,
    ]


def split_by_parse(stream, lines, arrivals, max_future_s=DEFAULT_MAX_FUTURE_S):
    events, dls = [], []
    for raw, arrival in zip(lines, arrivals, strict=True):
        r = parse(stream, raw, arrival, max_future_s)
        (dls if isinstance(r, DeadLetter) else events).append(r)
    return events, dls


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_parse_many_with_one_arrival_matches_parse(stream):
    lines = mixed_lines(stream)
    events, dls = parse_many(stream, lines, ARRIVAL)
    assert (events, dls) == split_by_parse(stream, lines, [ARRIVAL] * len(lines))
    assert len(events) == 5 and len(dls) == len(lines) - 5


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_parse_many_with_arrival_per_line_matches_parse(stream):
    lines = mixed_lines(stream)
    arrivals = [ARRIVAL + i * 1000.0 for i in range(len(lines))]
    got = parse_many(stream, lines, arrivals, max_future_s=5000.0)
    assert got == split_by_parse(stream, lines, arrivals, 5000.0)
    assert [d.received_at for d in got[1]] == [a for raw, a in zip(lines, arrivals, strict=True)
                                               if isinstance(parse(stream, raw, a, 5000.0), DeadLetter)]


@pytest.mark.parametrize("one_by_one", [False, True])
def test_parsed_impressions_leave_the_cyclic_collector_to_reference_counting(one_by_one):
    # Compiled (flows.untrack), an impression's `sparse` of strings and its tag lists are untracked
    # as they are parsed, by either path of parse_many and by parse; plain Python cannot untrack.
    import gc

    from flows import untrack

    good = raw_of(VALID["features"])
    lines = [good, b"not json", good] if one_by_one else [good, good]  # a bad line: line by line
    events = parse_many("features", lines, ARRIVAL)[0] + [parse("features", good, ARRIVAL)]
    assert len(events) == 3
    for e in events:
        assert gc.is_tracked(e.sparse) is not untrack.COMPILED
        assert gc.is_tracked(e.sparse["tags"]) is not untrack.COMPILED
    items = parse_many("items", [raw_of(VALID["items"])], ARRIVAL)[0]
    assert gc.is_tracked(items[0].sparse)  # items are the catalog's, not the join's: left as they are


@pytest.mark.parametrize("sparse", [{"nested": [["x"]]}, {"n": 1, "tags": ["x"]}, {1: ["x"]}, {"tags": ["x", 2]},
                                    [["x"]]])
def test_anything_but_a_dict_of_strings_and_string_lists_stays_tracked(sparse):
    import gc

    from flows.untrack import untrack_sparse

    inner = [v for v in (sparse.values() if isinstance(sparse, dict) else sparse) if isinstance(v, list)]
    assert untrack_sparse(sparse) is False
    assert gc.is_tracked(sparse) and all(gc.is_tracked(v) for v in inner)


def test_parse_many_of_nothing_is_nothing():
    assert parse_many("actions", [], ARRIVAL) == ([], [])
    assert parse_many("actions", [], []) == ([], [])


# --------------------------------------------------------------------------------------------
# msgspec's float decoding: no event can hold NaN or infinity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"inf", b"1e400", b"-1e309",
                                   b"1" * 400, b'"NaN"', b'"inf"'])
def test_msgspec_float_decoding_rejects_non_finite(token):
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(token, type=float)
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(b'{"x": ' + token + b"}", type=dict[str, float])


def test_msgspec_float_decoding_accepts_extremes_as_finite():
    for token in (b"1.7976931348623157e308", b"5e-324", b"-0.0", b"1e-400"):
        assert math.isfinite(msgspec.json.decode(token, type=float))


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

ids = st.text(min_size=1, max_size=128)
finite = st.floats(allow_nan=False, allow_infinity=False)
opt_text = st.none() | st.text(max_size=40)
sparse_st = st.dictionaries(st.text(max_size=12), st.text(max_size=12) | st.lists(st.text(max_size=8), max_size=4),
                            max_size=5)
dense_st = st.dictionaries(st.text(max_size=12), finite, max_size=5)
ts_st = st.floats(min_value=0.0, max_value=MAX_TS, exclude_min=True)


@st.composite
def ts_and_received_at(draw):
    """A ts in range and a received_at that does not make it from the future."""
    ts = draw(ts_st)
    received_at = draw(st.floats(min_value=max(ts - DEFAULT_MAX_FUTURE_S, 1e-300), max_value=1e13))
    assume(ts <= received_at + DEFAULT_MAX_FUTURE_S)
    return ts, received_at


@st.composite
def feature_events(draw):
    ts, received_at = draw(ts_and_received_at())
    return FeatureEvent(
        request_id=draw(ids), user_id=draw(ids), item_id=draw(ids), ts=ts,
        position=draw(st.none() | st.integers(0, 2**63 - 1)), sparse=draw(sparse_st), dense=draw(dense_st),
        model_version=draw(opt_text), score=draw(st.none() | finite), event_id=draw(opt_text),
        received_at=received_at,
    )


@st.composite
def action_events(draw):
    ts, received_at = draw(ts_and_received_at())
    return ActionEvent(
        request_id=draw(ids), user_id=draw(ids), item_id=draw(ids), ts=ts, action=draw(st.sampled_from(ACTIONS)),
        value=draw(st.none() | finite), event_id=draw(opt_text), received_at=received_at,
    )


@st.composite
def item_events(draw):
    ts, received_at = draw(ts_and_received_at())
    return ItemEvent(item_id=draw(ids), ts=ts, sparse=draw(sparse_st), dense=draw(dense_st), received_at=received_at)


EVENTS = {"features": feature_events(), "actions": action_events(), "items": item_events()}
stream_and_event = st.sampled_from(ALL_STREAMS).flatmap(lambda s: st.tuples(st.just(s), EVENTS[s]))


@st.composite
def mutated_events(draw):
    """Bytes of a valid event, then flipped bytes, a truncation, insertions or deletions."""
    stream, event = draw(stream_and_event)
    data = bytearray(encode(event))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "replace"]))
        i = draw(st.integers(0, len(data)))
        if kind == "flip" and i < len(data):
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[i:]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
                [b'"', b"{", b"}", b"[", b",", b":", b"\\", b"NaN", b"1e400", b"true", b"\xff", b"\xe6\xbc"]))
        elif kind == "delete":
            del data[i:i + draw(st.integers(1, 8))]
        elif kind == "replace" and i < len(data):
            data[i] = draw(st.integers(0, 255))
    return stream, bytes(data)


def padded(raw: bytes, filler: bytes) -> bytes:
    """Push `raw` over 64 KiB, so the truncation path is exercised too."""
    return raw + filler * (MAX_MESSAGE_BYTES // len(filler) + 1)


def assert_event_or_faithful_dead_letter(stream: str, raw: bytes, arrival: float) -> None:
    r = parse(stream, raw, arrival)
    if isinstance(r, DeadLetter):
        assert r.stream == stream and r.received_at == arrival and r.reason
        assert r.truncated == (len(raw) > MAX_MESSAGE_BYTES)
        assert (r.raw is None) != (r.raw_b64 is None)
        if r.raw is not None:
            kept = r.raw.encode()
            assert raw.startswith(kept)
            assert kept == raw if not r.truncated else len(raw[:MAX_MESSAGE_BYTES]) - len(kept) < 4
        else:
            assert base64.b64decode(r.raw_b64) == raw[:MAX_MESSAGE_BYTES]
            with pytest.raises(UnicodeDecodeError):
                raw[: MAX_MESSAGE_BYTES - 3].decode()
    else:
        accepted(r, stream)
        raw.decode()  # only UTF-8 is ever accepted
        assert len(raw) <= MAX_MESSAGE_BYTES
        assert_finite(r)
        assert 0 < r.ts <= MAX_TS


@PROPERTY
@given(stream=st.sampled_from(ALL_STREAMS), raw=st.binary(max_size=300), arrival=finite.filter(lambda x: x > 0))
def test_arbitrary_bytes_never_raise(stream, raw, arrival):
    assert_event_or_faithful_dead_letter(stream, raw, arrival)


@PROPERTY
@given(mutated=mutated_events())
def test_mutated_valid_events_never_raise(mutated):
    stream, raw = mutated
    assert_event_or_faithful_dead_letter(stream, raw, ARRIVAL)


@settings(max_examples=40, deadline=None)
@given(stream=st.sampled_from(ALL_STREAMS), raw=st.binary(max_size=40),
       filler=st.sampled_from([b"a", "漢".encode(), "😀".encode(), b"\xff", b"ab\xe6"]))
def test_oversized_input_keeps_a_faithful_prefix(stream, raw, filler):
    assert_event_or_faithful_dead_letter(stream, padded(raw, filler), ARRIVAL)


@PROPERTY
@given(stream_and_event)
def test_every_valid_event_round_trips_unchanged(se):
    stream, event = se
    raw = encode(event)
    # Its own received_at wins over the arrival (read up to max_future_s before it: clock skew).
    got = parse(stream, raw, arrival=max(1.0, (event.received_at or 1.0) - DEFAULT_MAX_FUTURE_S))
    assert got == event
    assert_finite(got)
    assert encode(got) == raw


@PROPERTY
@given(stream_and_event)
def test_valid_event_without_received_at_gets_the_arrival(se):
    stream, event = se
    event.received_at = None
    arrival = max(event.ts, 1.0)
    got = parse(stream, encode(event), arrival)
    event.received_at = arrival
    assert got == event


@settings(max_examples=50, deadline=None)
@given(stream=st.sampled_from(ALL_STREAMS), data=st.data())
def test_encode_lines_then_parse_many_round_trips(stream, data):
    events = data.draw(st.lists(EVENTS[stream], max_size=8))
    lines = encode_lines(events).splitlines()
    assert len(lines) == len(events)
    arrival = max([1.0] + [e.received_at - DEFAULT_MAX_FUTURE_S for e in events if e.received_at])
    assert parse_many(stream, lines, arrival) == (events, [])


@settings(max_examples=100, deadline=None)
@given(stream=st.sampled_from(ALL_STREAMS), data=st.data())
def test_parse_many_matches_parse_on_arbitrary_lines(stream, data):
    line = st.binary(max_size=60) | mutated_events().map(lambda m: m[1]) | EVENTS[stream].map(encode)
    lines = data.draw(st.lists(line, max_size=6))
    arrivals = data.draw(st.lists(st.floats(1.0, 1e10), min_size=len(lines), max_size=len(lines)))
    assert parse_many(stream, lines, arrivals) == split_by_parse(stream, lines, arrivals)
    assert parse_many(stream, lines, 5e9) == split_by_parse(stream, lines, [5e9] * len(lines))


# Wrong types for each field: values that must never be accepted there.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | finite | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def is_number(v: Any) -> bool:
    return type(v) in (int, float)


def wrong_for(field: str) -> st.SearchStrategy:
    if field in ("request_id", "user_id", "item_id"):
        return json_values.filter(lambda v: type(v) is not str) | st.just("") | st.text(min_size=129, max_size=140)
    if field == "ts":
        out_of_range = st.floats(max_value=0.0) | st.floats(min_value=MAX_TS, exclude_min=True) | st.integers(
            max_value=0) | st.integers(min_value=int(MAX_TS) + 1)
        return json_values.filter(lambda v: not is_number(v)) | out_of_range.filter(math.isfinite)
    if field == "action":
        return json_values.filter(lambda v: v not in ACTIONS)
    if field == "position":
        return json_values.filter(lambda v: v is not None and type(v) is not int) | st.integers(max_value=-1)
    if field in ("score", "value", "received_at"):
        bad = json_values.filter(lambda v: v is not None and not is_number(v))
        return bad | st.floats(max_value=0.0).filter(math.isfinite) if field == "received_at" else bad
    if field in ("model_version", "event_id"):
        return json_values.filter(lambda v: v is not None and type(v) is not str)
    if field == "sparse":
        good_value = lambda v: type(v) is str or (type(v) is list and all(type(x) is str for x in v))  # noqa: E731
        bad_map = st.dictionaries(st.text(max_size=5), json_values, min_size=1, max_size=3).filter(
            lambda d: not all(good_value(v) for v in d.values()))
        return json_values.filter(lambda v: type(v) is not dict) | bad_map
    if field == "dense":
        bad_map = st.dictionaries(st.text(max_size=5), json_values, min_size=1, max_size=3).filter(
            lambda d: not all(is_number(v) and abs(v) < 1e308 for v in d.values()))
        return json_values.filter(lambda v: type(v) is not dict) | bad_map
    raise AssertionError(field)


FIELDS = {s: [f for f in cls.__struct_fields__] for s, cls in STREAMS.items()}


def field_named(reason: str) -> str:
    """The field a reason names: 'invalid field sparse[...]: ...' -> 'sparse'."""
    if reason.startswith("ts out of range"):
        return "ts"
    assert reason.startswith("invalid field "), reason
    return reason.removeprefix("invalid field ").split(":", 1)[0].split("[", 1)[0]


@PROPERTY
@given(stream=st.sampled_from(ALL_STREAMS), data=st.data())
def test_wrong_types_in_random_fields_are_dead_lettered(stream, data):
    _, event = data.draw(EVENTS[stream].map(lambda e: (stream, e)))
    obj = msgspec.to_builtins(event)
    fields = data.draw(st.lists(st.sampled_from(FIELDS[stream]), min_size=1, max_size=3, unique=True))
    for f in fields:
        obj[f] = data.draw(wrong_for(f), label=f)
    order = data.draw(st.permutations(list(obj)))
    raw = json.dumps({k: obj[k] for k in order}, ensure_ascii=data.draw(st.booleans())).encode()
    r = parse(stream, raw, ARRIVAL)
    assert isinstance(r, DeadLetter), f"accepted {r!r} from {raw!r}"
    assert r.raw == raw.decode() and r.received_at == ARRIVAL
    assert field_named(r.reason) in fields, (r.reason, fields)
    assert parse_many(stream, [raw], ARRIVAL) == ([], [r])


@pytest.mark.parametrize("position", [2**63, 2**64, 10**30, int("9" * 400)])
def test_position_past_a_64_bit_integer_is_dead_lettered(position):
    # The spill store's msgpack (and Kafka's Java consumers) cannot hold it: accepted, it stopped the flow.
    raw = with_("features", position=position)
    dead(parse("features", raw, ARRIVAL), "invalid field position:", "<= 9223372036854775807")
    assert parse_many("features", [raw], ARRIVAL)[1][0].reason.startswith("invalid field position:")
    assert accepted(parse("features", with_("features", position=2**63 - 1), ARRIVAL), "features").position == 2**63 - 1


@pytest.mark.parametrize("stream", ALL_STREAMS)
def test_a_batch_stamped_by_freshrecs_writers_is_parsed_in_one_pass_with_the_same_results(stream, monkeypatch):
    import flows.events as events_module

    arrival, ahead = 1764288000.0, 100.0
    stamped = [with_(stream, ts=arrival - 5 + i, received_at=arrival - 1 + i * 0.5) for i in range(4)]
    expected = split_by_parse(stream, stamped, [arrival] * 4, ahead)
    assert len(expected[0]) == 4 and [e.received_at for e in expected[0]] == [arrival - 1 + i * 0.5 for i in range(4)]

    def slow(*args):
        raise AssertionError("a clean stamped batch went line by line")

    with monkeypatch.context() as m:
        m.setattr(events_module, "_parse_each", slow)
        assert parse_many(stream, stamped, arrival, ahead) == expected
    # Anything `_check` would refuse goes line by line, with the same results as `parse`.
    for bad in (with_(stream, ts=arrival + 150, received_at=arrival + 20),  # ts ahead of its stamp
                with_(stream, received_at=arrival + ahead + 1),  # a stamp from the future
                with_(stream, received_at=0),
                with_(stream)):  # unstamped among stamped: each keeps its own rule
        lines = [*stamped, bad]
        assert parse_many(stream, lines, arrival, ahead) == split_by_parse(stream, lines, [arrival] * 5, ahead)


def test_encode_each_is_encode_of_each_object_even_with_newlines_in_their_text():
    from flows.events import DeadLetter, encode, encode_each

    objs = [DeadLetter(stream="features", reason="bad\nline", raw="{\n}\u2028", raw_b64=None, truncated=False,
                       received_at=1.0),
            {"a": "x\ny", "b": [1, {"c": "\r\n"}]}, FeatureEvent(request_id="r\n", user_id="u", item_id="v", ts=2.0)]
    assert encode_each(objs) == [encode(o) for o in objs]
    assert encode_each([]) == []
