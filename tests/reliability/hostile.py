"""A seeded generator of hostile messages for the three input streams, each with the reason the
flow must dead-letter it for, and of valid events that must all be processed.

Every hostile message carries its number `k` within its first bytes, so each dead letter (whose
`raw` keeps the first 64 KiB) is matched to exactly one injected message. No message holds a
newline byte or is only whitespace: in a file those are line framing, not messages.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from flows.events import MAX_MESSAGE_BYTES, MAX_TS

DAY = 86400.0
EMOJI = "\U0001F600"
FIELDS = {
    "features": {"request_id": "str", "user_id": "str", "item_id": "str", "ts": "ts"},
    "actions": {"request_id": "str", "user_id": "str", "item_id": "str", "ts": "ts", "action": "action"},
    "items": {"item_id": "str", "ts": "ts"},
}
OPTIONAL = {
    "features": {"position": "position", "sparse": "sparse", "dense": "dense", "score": "float",
                 "model_version": "str", "event_id": "str", "received_at": "float"},
    "actions": {"value": "float", "event_id": "str", "received_at": "float"},
    "items": {"sparse": "sparse", "dense": "dense", "received_at": "float"},
}
WRONG = {  # JSON text of values of the wrong type for each kind of field
    "str": ["5", "1.5", "true", "null", "[]", "{}", '["a"]'],
    "ts": ['"1764288000"', "true", "false", "null", "[]", "{}"],
    "action": ["5", '"poke"', '"LIKE"', "null", '["like"]', '""'],
    "position": ["-1", "1.5", '"3"', "true", "[]"],
    "sparse": ["[]", '"a"', '{"a": 5}', '{"a": [1]}', '{"a": {"b": "c"}}', '{"a": null}'],
    "dense": ["[]", '{"a": "x"}', '{"a": true}', '{"a": [1]}', '{"a": null}'],
    "float": ['"x"', "true", "[]", "{}"],
}


@dataclass
class Injected:
    """What went into one stream: hostile messages by their first 64 KiB, and valid events."""

    hostile: dict[bytes, tuple[str, str]] = field(default_factory=dict)  # raw[:64 KiB] -> (kind, reason prefix)
    copies: dict[bytes, int] = field(default_factory=dict)  # raw[:64 KiB] -> how many were sent (1 but framing)
    valid: list[dict] = field(default_factory=list)

    def add(self, msg: bytes, kind: str, reason: str) -> None:
        key = msg[:MAX_MESSAGE_BYTES]
        assert self.hostile.get(key, (kind, reason)) == (kind, reason), key[:100]
        self.hostile[key] = (kind, reason)
        self.copies[key] = self.copies.get(key, 0) + 1


# Lines of whitespace only: empty messages, not JSON (an empty line, or "\r" of CRLF, is framing).
FILE_BLANKS = [b" ", b"\t", b"  \t ", b"\x0b", b"\x0c", b" \r"]
KAFKA_FRAMING = [  # values a Kafka message may have and a file line may not: all "not JSON"
    b"", b" ", b"\n", b"\r\n", b"\t \n ", b'{"request_id": "r",\n', b"\n{\n", b"\n]"]


def _obj(pairs: list[tuple[str, str]]) -> bytes:
    """A JSON object from (name, JSON text of the value) pairs, in order."""
    return ("{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}").encode()


class HostileGenerator:
    """Hostile messages of every kind the issue names, in proportions fixed by `KINDS`."""

    def __init__(self, seed: int, now: float, past: float):
        self.rng = random.Random(seed)
        self.now = now
        self.past = past  # event time of the hostile messages whose defect is not their ts
        self.k = 0

    def _base(self, stream: str) -> list[tuple[str, str]]:
        """A valid event of `stream` as (name, JSON value) pairs, with the message's number first."""
        r = self.rng
        ts = self.past + r.random() * 3600
        pairs = [("k", str(self.k))]
        for name, kind in FIELDS[stream].items():
            if kind == "str":
                pairs.append((name, json.dumps(f"h{self.k}-{name[0]}")))
            elif kind == "ts":
                pairs.append((name, repr(ts)))
            else:
                pairs.append((name, json.dumps(r.choice(["like", "click", "skip", "watch"]))))
        return pairs

    def _set(self, pairs: list[tuple[str, str]], name: str, value: str) -> list[tuple[str, str]]:
        out = [(k, value if k == name else v) for k, v in pairs]
        if name not in dict(pairs):
            out.append((name, value))
        return out

    def _field(self, stream: str, kinds: tuple[str, ...] | None = None) -> tuple[str, str]:
        names = {**FIELDS[stream], **OPTIONAL[stream]}
        choices = [(n, k) for n, k in names.items() if kinds is None or k in kinds]
        return self.rng.choice(choices)

    # Each returns (message, reason prefix).

    def utf8_garbage(self, stream: str) -> tuple[bytes, str]:
        junk = bytearray(self.rng.randbytes(self.rng.randint(1, 300)))
        junk.insert(self.rng.randint(0, len(junk)), 0xFF)  # never in UTF-8
        return b"%d" % self.k + bytes(junk).replace(b"\n", b"\xfe"), "not UTF-8"

    def utf8_in_string(self, stream: str) -> tuple[bytes, str]:
        bad = self.rng.choice([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
        name = self.rng.choice([*(n for n, k in FIELDS[stream].items() if k == "str"), "note"])
        pairs = self._set(self._base(stream), name, '"x"')
        msg = _obj(pairs)
        at = msg.index(b'"x"', msg.index(json.dumps(name).encode() + b":")) + 1
        return msg[:at] + bad + msg[at:], "not UTF-8"

    def deep_nesting(self, stream: str) -> tuple[bytes, str]:
        depth = self.rng.randint(1100, 9000)  # 7 bytes a level at most: under 64 KiB
        if self.rng.random() < 0.5:
            nest = "[" * depth + "]" * depth
        else:
            nest = '{"a": ' * depth + "1" + "}" * depth
        if self.rng.random() < 0.2:
            return f"[{self.k}, {nest}]".encode(), "not an object"
        return _obj(self._set(self._base(stream), "extra", nest)), "not accepted: JSON nested too deeply"

    def huge_number(self, stream: str) -> tuple[bytes, str]:
        big = self.rng.choice(["9" * self.rng.randint(310, 2000), "1e400", "-1e999", "2e308"])
        name, _ = self._field(stream, ("ts", "float", "dense", "position"))
        if name == "position":
            return _obj(self._set(self._base(stream), name, self.rng.choice(["9" * 400, str(2**63), str(10**30)]))), \
                "invalid field position: Expected `int` <= 9223372036854775807"
        if name == "dense":
            return _obj(self._set(self._base(stream), "dense", f'{{"d": {big}}}')), \
                "invalid field dense[...]: not a finite number"
        return _obj(self._set(self._base(stream), name, big)), f"invalid field {name}: not a finite number"

    def nan_inf(self, stream: str) -> tuple[bytes, str]:
        token = self.rng.choice(["NaN", "Infinity", "-Infinity", "nan", "inf"])
        name, _ = self._field(stream, ("ts", "float", "dense"))
        value = f'{{"d": {token}}}' if name == "dense" else token
        return _obj(self._set(self._base(stream), name, value)), "not JSON"

    def long_id(self, stream: str) -> tuple[bytes, str]:
        name = self.rng.choice([n for n, k in FIELDS[stream].items() if k == "str"])
        length = self.rng.choice([129, 500, 5000, 10_000])  # at most 40 KB: under 64 KiB
        value = f"{self.k}-" + self.rng.choice(["x", "é", EMOJI]) * length
        return _obj(self._set(self._base(stream), name, json.dumps(value, ensure_ascii=False))), \
            f"invalid field {name}: Expected `str` of length <= 128"

    def oversize(self, stream: str) -> tuple[bytes, str]:
        pad = "z" * self.rng.randint(MAX_MESSAGE_BYTES, 3 * MAX_MESSAGE_BYTES)
        return _obj(self._set(self._base(stream), "pad", json.dumps(pad))), \
            f"message larger than {MAX_MESSAGE_BYTES} bytes"

    def wrong_type(self, stream: str) -> tuple[bytes, str]:
        name, kind = self._field(stream)
        wrong = [w for w in WRONG[kind] if not (w == "null" and name in OPTIONAL[stream])]  # null: absent
        return _obj(self._set(self._base(stream), name, self.rng.choice(wrong))), f"invalid field {name}"

    def missing(self, stream: str) -> tuple[bytes, str]:
        name = self.rng.choice(list(FIELDS[stream]))
        return _obj([p for p in self._base(stream) if p[0] != name]), f"missing field {name}"

    def not_object(self, stream: str) -> tuple[bytes, str]:
        value = self.rng.choice([f"[{self.k}]", f'"{self.k}"', f"[{self.k}, {{}}]", f'["{self.k}", null]'])
        return value.encode(), "not an object"

    def not_json(self, stream: str) -> tuple[bytes, str]:
        letters = "".join(self.rng.choice("abc{}[]:,\"' \t\\") for _ in range(self.rng.randint(0, 60)))
        return self.rng.choice([b"{%d" % self.k + letters.encode(), b"x%d %s" % (self.k, letters.encode()),
                                _obj(self._base(stream))[:-1] + b",}"]), "not JSON"

    def future_ts(self, stream: str) -> tuple[bytes, str]:
        ts = self.rng.uniform(self.now + 2 * DAY, MAX_TS)
        return _obj(self._set(self._base(stream), "ts", repr(ts))), "ts from the future"

    def future_received_at(self, stream: str) -> tuple[bytes, str]:
        at = self.rng.uniform(self.now + 2 * DAY, MAX_TS)
        pairs = self._set(self._set(self._base(stream), "ts", repr(at)), "received_at", repr(at))
        return _obj(pairs), "received_at from the future"

    def ts_out_of_range(self, stream: str) -> tuple[bytes, str]:
        ts = self.rng.choice([self.now * 1000, MAX_TS + 1, 0, -5, -self.now, 1e300])
        return _obj(self._set(self._base(stream), "ts", repr(ts))), "invalid field ts: out of range"

    def bad_received_at(self, stream: str) -> tuple[bytes, str]:
        return _obj(self._set(self._base(stream), "received_at", self.rng.choice(["0", "-1", "-1e9"]))), \
            "invalid field received_at: must be > 0"

    KINDS: dict[str, int] = {  # kind -> weight
        "utf8_garbage": 8, "utf8_in_string": 8, "deep_nesting": 4, "huge_number": 8, "nan_inf": 8,
        "long_id": 6, "oversize": 1, "wrong_type": 20, "missing": 8, "not_object": 4, "not_json": 8,
        "future_ts": 8, "future_received_at": 3, "ts_out_of_range": 4, "bad_received_at": 2,
    }

    def message(self, stream: str) -> tuple[bytes, str, str]:
        """One hostile message: (bytes, kind, reason prefix)."""
        kind = self.rng.choices(list(self.KINDS), weights=list(self.KINDS.values()))[0]
        make: Callable[[str], tuple[bytes, str]] = getattr(self, kind)
        msg, reason = make(stream)
        self.k += 1
        assert b"\n" not in msg and msg.strip(), (kind, msg[:80])
        return msg, kind, reason


def valid_events(n_features: int, n_items: int, t0: float, rng: random.Random) -> dict[str, list[dict]]:
    """Valid events, odd ones included (128-character ids of 4-byte characters, NUL in ids, long
    tags, huge positions, nesting under the limit in unknown fields): each feature event has one
    action 1 s after it (like, click: positive; skip: explicit negative; watch: neutral, so it
    expires), and every event is in ts order within its stream."""
    features, actions, items = [], [], []
    for i in range(n_features):
        rid, iid, uid = f"r{i}", f"v{i % 700}", f"u{i % 300}"
        if i % 97 == 0:
            rid = f"{i}-" + EMOJI * (126 - len(str(i)))  # 128 characters, 4 bytes each but the first few
            uid = EMOJI * 128
        if i % 89 == 0:
            iid = f"v{i}-" + EMOJI * (126 - len(str(i)))
        if i % 83 == 0:
            rid = f"r{i}\x00nul"
        f = {"request_id": rid, "user_id": uid, "item_id": iid, "ts": t0 + i * 0.5, "position": i % 20,
             "sparse": {"author": f"a{i % 40}", "tags": [f"t{i % 9}", f"t{i % 11}"]}}
        if i % 101 == 0:
            f["sparse"]["tags"].append(f"long{i}-" + "é" * rng.randint(300, 20_000))
        if i % 103 == 0:
            f["position"] = 2**63 - 1  # the largest accepted: msgpack, numpy and Kafka's Java take it
        if i % 107 == 0:
            f["extra"] = json.loads("[" * 400 + "]" * 400)
        features.append(f)
        act = ("like", "click", "skip", "watch")[i % 4]
        actions.append({"request_id": rid, "user_id": uid, "item_id": iid, "ts": t0 + i * 0.5 + 1.0,
                        "action": act, "value": 3.5})
    for j in range(n_items):
        iid = f"v{j}" if j % 13 else f"v{j}-" + EMOJI * (126 - len(str(j)))
        items.append({"item_id": iid, "ts": t0 + j * 0.1,
                      "sparse": {"author": f"a{j % 40}", "tags": ["x" * rng.randint(1, 3000)]},
                      "dense": {"d": 1e300 if j % 17 == 0 else j * 0.5}})
    return {"features": features, "actions": actions, "items": items}


def expected_label(i: int) -> int:
    return int(i % 4 in (0, 1))
