"""A batch's slots: each field's distinct ids in order of first sight, and per occurrence its id
and example, for single-valued, multi-valued and missing fields alike."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from model.features import FeatureSpec, make_batch

SPEC = FeatureSpec(user_slots=("city",), item_slots=("author", "tags"), dim=4)
value = st.sampled_from(["a", "b", "c", ""])
field = st.one_of(st.none(), value, st.lists(value, max_size=3))


@given(st.lists(st.tuples(value, value, field, field, field), min_size=1, max_size=20))
def test_each_occurrence_names_its_id_and_example(rows):
    events = [SimpleNamespace(user_id=f"u{u}", item_id=f"v{v}", dense={},
                              sparse={k: x for k, x in zip(("city", "author", "tags"), fields, strict=True)
                                      if x is not None})
              for u, v, *fields in rows]
    batch = make_batch(events, SPEC)
    for slot in SPEC.embedding_slots:
        expected = []  # (example, value) in event order, a field's values in their order
        for i, e in enumerate(events):
            x = getattr(e, slot) if slot in ("user_id", "item_id") else e.sparse.get(slot)
            expected += [(i, v) for v in ([] if x is None else [x] if isinstance(x, str) else x)]
        s = batch.slots[slot]
        assert s.ids == list(dict.fromkeys(v for _, v in expected))
        assert [(int(ex), s.ids[ix]) for ex, ix in zip(s.example, s.index, strict=True)] == expected
        assert s.index.dtype == np.int32 and s.example.dtype == np.int32
    assert batch.slots["user_id.bias"] is batch.slots["user_id"]


def test_a_value_that_is_neither_text_nor_a_list_of_text_is_an_error():
    e = SimpleNamespace(user_id="u", item_id="v", dense={}, sparse={"author": 3})
    with pytest.raises(TypeError):
        make_batch([e], SPEC)
