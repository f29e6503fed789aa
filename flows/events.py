"""The contract's events as typed structs, and the one place that parses and validates them.

Raw bytes in, an event or a `DeadLetter` with a precise reason out; nothing raises. Imports no
Bytewax: the model server and the simulator use it too.
"""

from __future__ import annotations

import base64
import operator
from typing import Annotated, Literal, Optional, Union

import msgspec

from flows.untrack import untrack_impressions

MAX_MESSAGE_BYTES = 64 * 1024
MAX_TS = 4102444800.0  # 2100-01-01: anything later is a unit mistake (milliseconds)
# JSON integers have no bound; the spill store's msgpack, Kafka's consumers (a Java long) and numpy
# do. A larger position would be accepted and then stop the flow where it is first stored.
MAX_POSITION = 2**63 - 1

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
# msgspec rejects NaN/Infinity tokens and numbers that overflow a float, so every decoded float is
# finite; the bounds on `ts` are checked by the decoder in the same pass.
Ts = Annotated[float, msgspec.Meta(gt=0, le=MAX_TS)]
Sparse = dict[str, Union[str, list[str]]]
Dense = dict[str, float]

Action = Literal[
    "click", "like", "share", "comment", "follow", "finish", "purchase", "watch", "skip", "dislike"
]
POSITIVE_ACTIONS = frozenset({"click", "like", "share", "comment", "follow", "finish", "purchase"})
NEGATIVE_ACTIONS = frozenset({"skip", "dislike"})


class FeatureEvent(msgspec.Struct, omit_defaults=True, gc=False):
    """One item that the model server showed in one request."""

    request_id: Id
    user_id: Id
    item_id: Id
    ts: Ts
    position: Optional[Annotated[int, msgspec.Meta(ge=0, le=MAX_POSITION)]] = None
    sparse: Sparse = {}
    dense: Dense = {}
    model_version: Optional[str] = None
    score: Optional[float] = None
    event_id: Optional[str] = None
    received_at: Optional[float] = None


class ActionEvent(msgspec.Struct, omit_defaults=True, gc=False):
    """What a user did with an item shown to them."""

    request_id: Id
    user_id: Id
    item_id: Id
    ts: Ts
    action: Action
    value: Optional[float] = None
    event_id: Optional[str] = None
    received_at: Optional[float] = None


class ItemEvent(msgspec.Struct, omit_defaults=True, gc=False):
    """An item entering the catalog or changing its features; the latest per item_id wins."""

    item_id: Id
    ts: Ts
    sparse: Sparse = {}
    dense: Dense = {}
    received_at: Optional[float] = None


Event = Union[FeatureEvent, ActionEvent, ItemEvent]


class ExampleAction(msgspec.Struct, omit_defaults=False, gc=False):
    """One action behind a training example."""

    action: str
    ts: float
    value: Optional[float] = None


class Example(msgspec.Struct, omit_defaults=False, gc=False):
    """A training example: an impression with its label (CONTRACT.md, Training example).

    `label_received_at` (an addition to the contract's fields) is the arrival time of the action
    that decided a positive or explicit negative label, so freshness can be measured downstream.
    """

    request_id: str
    user_id: str
    item_id: str
    ts: float
    label_ts: float
    label: int
    actions: list[ExampleAction]
    weight: float
    position: Optional[int]
    score: Optional[float]
    model_version: Optional[str]
    sparse: Sparse
    dense: Dense
    label_received_at: Optional[float] = None


class DeadLetter(msgspec.Struct, omit_defaults=False, gc=False):
    """An input that could not be accepted, kept with the reason (CONTRACT.md, Dead letter)."""

    stream: str
    reason: str
    raw: Optional[str]
    raw_b64: Optional[str]
    truncated: bool
    received_at: float


class Joined(msgspec.Struct, gc=False):
    """What one call of a join bucket gave: its examples, its dead letters, and the impressions with
    no logged score that it forwards on arrival so the trainer scores them then. One flow item per
    call, not one per example: every step after the join (sinks, the trainer) takes them a batch
    at a time (`join.in_memory`: 0.77x the time of an item per example)."""

    examples: list[Example]
    dead: list[DeadLetter]
    impressions: list[FeatureEvent]


STREAMS: dict[str, type] = {
    "features": FeatureEvent,
    "actions": ActionEvent,
    "items": ItemEvent,
}

_DECODERS = {name: msgspec.json.Decoder(cls) for name, cls in STREAMS.items()}
_ENCODER = msgspec.json.Encoder()

DEFAULT_MAX_FUTURE_S = 86400.0


def dead_letter(stream: str, raw: bytes, reason: str, received_at: float) -> DeadLetter:
    """Wrap rejected input: as text when it is UTF-8, else base64; at most 64 KiB of it."""
    truncated = len(raw) > MAX_MESSAGE_BYTES
    kept = raw[:MAX_MESSAGE_BYTES]
    text: Optional[str] = None
    try:
        text = kept.decode("utf-8")
    except UnicodeDecodeError as e:
        # The cut at 64 KiB may split the last character of otherwise valid text.
        if truncated and e.reason == "unexpected end of data":
            text = kept[: e.start].decode("utf-8")
    b64 = None if text is not None else base64.b64encode(kept).decode("ascii")
    return DeadLetter(stream, reason, text, b64, truncated, received_at)


def _reason(raw: bytes, err: Exception) -> str:
    """Turn a decoder error into a reason that names the field and what was wrong."""
    # Bad UTF-8 first, whatever the decoder tripped over: the JSON scanner may stop earlier (at a
    # syntax error, or at a first value that is not an object), and msgspec's offset of a
    # UnicodeDecodeError is within the string it was decoding, not the input.
    bad_utf8 = _utf8_error(raw)
    if bad_utf8:
        return bad_utf8
    if not raw.strip():
        return "not JSON: empty (whitespace only)" if raw else "not JSON: empty"
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8: invalid byte at offset {err.start}"
    if isinstance(err, RecursionError):
        return "not accepted: JSON nested too deeply"
    msg = str(err)
    if isinstance(err, msgspec.ValidationError):
        if msg.startswith("Object missing required field"):
            return "missing field " + msg.split("`")[1]
        if msg.startswith("Expected `object`, got") and " - at `$" not in msg:
            return "not an object: " + msg.split("got ", 1)[1].strip("`")
        if " - at `$." in msg:
            what, where = msg.rsplit(" - at `$.", 1)
            field = where.rstrip("`")
            if what == "Number out of range":
                return f"invalid field {field}: not a finite number"
            if field == "ts" and what.startswith("Expected `float` "):
                return f"invalid field ts: out of range, must be in (0, {MAX_TS:.0f}] seconds since the epoch"
            return f"invalid field {field}: {what}"
        return msg
    return "not JSON: " + msg.removeprefix("JSON is malformed: ")


def _utf8_error(raw: bytes) -> Optional[str]:
    """The reason `raw` is not UTF-8, or None. msgspec skips unknown fields without checking them."""
    if raw.isascii():
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8: invalid byte at offset {e.start}"
    return None


def _check(
    stream: str, raw: bytes, event: Event, arrival: float, max_future_s: float
) -> Union[Event, DeadLetter]:
    """The rules a schema cannot say: arrival time, and no `ts` from the future."""
    if event.received_at is None:
        event.received_at = arrival
    elif not event.received_at > 0:
        return dead_letter(stream, raw, "invalid field received_at: must be > 0", arrival)
    elif event.received_at > arrival + max_future_s:
        # Set by freshrec's writers before the flow reads the event: one from the future would let
        # its `ts` pass the check below and drag the watermark forward.
        ahead = event.received_at - arrival
        return dead_letter(stream, raw, f"received_at from the future: {ahead:.0f} s ahead of its arrival",
                           arrival)
    if event.ts > event.received_at + max_future_s:
        ahead = event.ts - event.received_at
        return dead_letter(stream, raw, f"ts from the future: {ahead:.0f} s ahead of its arrival", arrival)
    return event


def parse(
    stream: str,
    raw: bytes,
    arrival: float,
    max_future_s: float = DEFAULT_MAX_FUTURE_S,
) -> Union[Event, DeadLetter]:
    """Decode and validate one message of `stream`; never raises.

    `arrival` is when it reached freshrec (CONTRACT.md, Streams); an event's own `received_at`,
    set by freshrec's writers, wins over it. An event whose `ts` is more than `max_future_s`
    ahead of its arrival is dead-lettered, so no bogus timestamp drags the watermark forward.

    >>> e = parse("actions", b'{"request_id":"r","user_id":"u","item_id":"i","ts":5,"action":"like"}', 9.0)
    >>> (e.action, e.received_at)
    ('like', 9.0)
    >>> parse("actions", b'{"request_id":"r","ts":5}', 9.0).reason
    'missing field user_id'
    """
    if len(raw) > MAX_MESSAGE_BYTES:
        return dead_letter(stream, raw, f"message larger than {MAX_MESSAGE_BYTES} bytes", arrival)
    try:
        event = _DECODERS[stream].decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as err:
        return dead_letter(stream, raw, _reason(raw, err), arrival)
    bad_utf8 = _utf8_error(raw)
    if bad_utf8:
        return dead_letter(stream, raw, bad_utf8, arrival)
    if stream == "features":
        untrack_impressions([event])
    return _check(stream, raw, event, arrival, max_future_s)


_ts = operator.attrgetter("ts")
_received_at = operator.attrgetter("received_at")


def parse_many(
    stream: str,
    lines: list[bytes],
    arrivals: Union[float, list[float]],
    max_future_s: float = DEFAULT_MAX_FUTURE_S,
) -> tuple[list[Event], list[DeadLetter]]:
    """Parse a batch (one arrival time for all, or one per line) into events and dead letters.

    Same results as `parse` line by line. Impressions come out of the cyclic collector's sight
    (`flows.untrack`). A clean batch (the common case) is checked with a few
    calls over the whole batch, leaving one decode per line as the only per-event work; any batch
    with something unusual in it is parsed line by line.
    """
    if lines and max(map(len, lines)) <= MAX_MESSAGE_BYTES:
        try:
            # msgspec skips unknown fields unchecked: bytes outside ASCII must be valid UTF-8.
            if not all(map(bytes.isascii, lines)):
                for raw in lines:
                    if not raw.isascii():
                        raw.decode("utf-8")
            events = list(map(_DECODERS[stream].decode, lines))
            if stream == "features":
                untrack_impressions(events)  # while they are in the CPU's cache (flows.untrack)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            events = None
        if events is not None:
            stamped = set(map(_received_at, events))
            earliest = min(arrivals) if isinstance(arrivals, list) else arrivals
            if stamped == {None}:
                if max(map(_ts, events)) <= earliest + max_future_s:
                    if isinstance(arrivals, list):
                        for e, arrival in zip(events, arrivals, strict=True):
                            e.received_at = arrival
                    else:
                        for e in events:
                            e.received_at = arrivals
                    return events, []
            elif None not in stamped and _stamped_in_time(events, stamped, earliest, max_future_s):
                # Stamped by freshrec's writers (the simulator, the model server, the replays),
                # as every event of theirs is: their own times stand, checked as `_check` does.
                return events, []
    return _parse_each(stream, lines, arrivals, max_future_s)


def _stamped_in_time(events: list[Event], stamped: set, earliest: float, max_future_s: float) -> bool:
    """Whether every event's own `received_at` passes `_check` against the batch's `earliest`
    arrival (so against its own), and its `ts` against that `received_at`."""
    bound = earliest + max_future_s
    if not all(0 < r <= bound for r in stamped):  # NaN fails `0 < r`, as `_check` refuses it
        return False
    return all(e.ts <= e.received_at + max_future_s for e in events)


def _parse_each(
    stream: str,
    lines: list[bytes],
    arrivals: Union[float, list[float]],
    max_future_s: float,
) -> tuple[list[Event], list[DeadLetter]]:
    decode = _DECODERS[stream].decode
    events: list[Event] = []
    dead: list[DeadLetter] = []
    one_arrival = not isinstance(arrivals, list)
    for i, raw in enumerate(lines):
        arrival = arrivals if one_arrival else arrivals[i]  # type: ignore[index]
        if len(raw) > MAX_MESSAGE_BYTES:
            dead.append(dead_letter(stream, raw, f"message larger than {MAX_MESSAGE_BYTES} bytes", arrival))
            continue
        try:
            event = decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as err:
            dead.append(dead_letter(stream, raw, _reason(raw, err), arrival))
            continue
        if not raw.isascii():
            bad_utf8 = _utf8_error(raw)
            if bad_utf8:
                dead.append(dead_letter(stream, raw, bad_utf8, arrival))
                continue
        # Inlined common case of `_check`: no received_at of its own, ts not from the future.
        if event.received_at is None and event.ts <= arrival + max_future_s:
            event.received_at = arrival
            events.append(event)
            continue
        checked = _check(stream, raw, event, arrival, max_future_s)
        (dead if type(checked) is DeadLetter else events).append(checked)
    if stream == "features":
        untrack_impressions(events)
    return events, dead


def encode(obj: Union[Event, DeadLetter, dict]) -> bytes:
    """One JSON object, no newline."""
    return _ENCODER.encode(obj)


def encode_lines(objs: list) -> bytes:
    """JSON Lines for a batch of objects, each line ending in a newline."""
    return _ENCODER.encode_lines(objs)


def encode_each(objs: list) -> list[bytes]:
    """`encode` of each object, in one encoder call (JSON holds no raw newline, so the lines split
    cleanly): for writers that send one message per object."""
    values = _ENCODER.encode_lines(objs).split(b"\n")
    values.pop()  # the b"" after the last newline
    return values
