"""model/served_events.py: the assembled bytes are exactly what encoding the events would make."""

from __future__ import annotations

import math

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from flows.events import FeatureEvent, encode
from model.recommend_types import Served
from model.served_events import AnswerEncoder

text = st.text(min_size=1, max_size=12)  # any code points: quotes, backslashes, controls, non-BMP
values = st.one_of(text, st.lists(text, max_size=3))
sparse = st.dictionaries(st.sampled_from(["author", "tags", "recent_author", "genre", 'q"k']), values, max_size=4)
dense = st.dictionaries(st.sampled_from(["item_ctr_7d", "age", "x\\y"]), st.floats(allow_nan=False,
                                                                                  allow_infinity=False), max_size=3)
scores = st.one_of(st.floats(), st.integers(-3, 3))
served = st.builds(Served, item_id=text, score=scores, sparse=sparse, dense=dense)


def expected(request_id, user_id, version, ts, items, user_sparse):
    body = {"request_id": request_id, "user_id": user_id, "model_version": version, "items": []}
    lines = []
    for position, s in enumerate(items):
        score = float(s.score)
        score = score if math.isfinite(score) else None
        body["items"].append({"item_id": s.item_id, "score": score})
        lines.append(encode(FeatureEvent(
            request_id=request_id, user_id=user_id, item_id=s.item_id, ts=ts, position=position,
            sparse={**s.sparse, **user_sparse}, dense=dict(s.dense), model_version=version, score=score,
            event_id=f"{request_id}-{position}")))
    return msgspec.json.encode(body), lines


@given(request_id=text, user_id=text, version=text, ts=st.floats(1.0, 4102444800.0), items=st.lists(served, max_size=6),
       user_sparse=sparse)
def test_answers_are_byte_for_byte_the_encoded_events(request_id, user_id, version, ts, items, user_sparse):
    enc = AnswerEncoder()
    want = expected(request_id, user_id, version, ts, items, user_sparse)
    assert enc.encode(request_id, user_id, version, ts, items, user_sparse) == want
    # Again from the cached parts (the same dicts), and for an item whose features changed.
    assert enc.encode(request_id, user_id, version, ts, items, user_sparse) == want
    if items:
        changed = Served(items[0].item_id, items[0].score, {**items[0].sparse, "author": "new"}, {"age": 2.5})
        items = [changed, *items[1:]]
        assert enc.encode(request_id, user_id, version, ts, items, user_sparse) == expected(
            request_id, user_id, version, ts, items, user_sparse)


def test_a_full_cache_starts_again_and_its_lines_stay_right():
    enc = AnswerEncoder(max_items=2)
    items = [Served(f"v{i}", 0.5, {"author": f"a{i}"}, {}) for i in range(5)]
    for _ in range(2):  # the cache starts again when full; lines stay right
        _, lines = enc.encode("r-1", "u", "1.2", 1.5, items, {})
        assert lines == expected("r-1", "u", "1.2", 1.5, items, {})[1]
    assert len(enc._parts) <= 2
