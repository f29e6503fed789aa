import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

import flows.dueindex as compiled_or_not
from flows.dueindex import DueIndex, due_of_prefix, due_prefix
from tests.helpers import source_module

SOURCE = source_module(compiled_or_not)
BOTH = pytest.mark.parametrize("mod", [compiled_or_not, SOURCE], ids=["imported", "source"])

OPS = st.lists(st.tuples(st.sampled_from(["put", "pop"]), st.integers(0, 300), st.floats(allow_nan=False)),
               max_size=400)


@BOTH
@given(ops=OPS, hash_bits=st.sampled_from([64, 12, 3]))
def test_the_index_is_a_dict_of_hashes(mod, ops, hash_bits):
    """Against a dict keyed by the same hashes; deletes and resizes included (shared hashes too)."""
    index = mod.DueIndex(hash_bits=hash_bits)
    model: dict[int, float] = {}

    def slot(k: bytes) -> int:
        return (hash(k) & ((1 << hash_bits) - 1)) or 1

    for op, n, due in ops:
        key = b"key-%d" % n
        if op == "put":
            index.put(key, due)
            model[slot(key)] = due
        else:
            assert index.pop(key) == (model.pop(slot(key), None) is not None)
        assert len(index) == len(model)
    for n in range(301):
        key = b"key-%d" % n
        got = index.get(key)
        want = model.get(slot(key))
        assert (math.isnan(got) and want is None) or got == want


@BOTH
def test_the_table_grows_and_shrinks(mod):
    index = mod.DueIndex()
    keys = [random.randbytes(12) for _ in range(20_000)]
    for i, k in enumerate(keys):
        index.put(k, float(i))
    assert len(index) == 20_000 and index.capacity == 32_768 and index.nbytes == 16 * 32_768
    assert all(index.get(k) == i for i, k in enumerate(keys))
    for k in keys[:19_990]:
        assert index.pop(k)
    assert not index.pop(keys[0]) and len(index) == 10 and index.capacity <= 256
    assert [index.get(k) for k in keys[19_990:]] == [float(i) for i in range(19_990, 20_000)]
    index.clear()
    assert len(index) == 0 and math.isnan(index.get(keys[-1]))


@BOTH
def test_hash_bits_is_checked(mod):
    with pytest.raises(ValueError, match="hash_bits"):
        mod.DueIndex(hash_bits=0)


DUES = st.floats(allow_nan=False) | st.sampled_from([-0.0, 0.0, math.inf, -math.inf, 5e-324, -5e-324])


@given(a=DUES, b=DUES)
def test_due_prefixes_sort_like_their_dues_and_decode_back(a, b):
    for mod in (compiled_or_not, SOURCE):
        pa, pb = mod.due_prefix(a), mod.due_prefix(b)
        assert len(pa) == 8 and (pa < pb) == (a < b) and (pa == pb) == (a == b)
        assert mod.due_of_prefix(pa) == a and math.copysign(1, mod.due_of_prefix(mod.due_prefix(-0.0))) == 1
    assert due_prefix(a) == SOURCE.due_prefix(a) and due_of_prefix(due_prefix(a)) == SOURCE.due_of_prefix(due_prefix(a))


def test_a_nan_due_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        due_prefix(math.nan)


def test_keyed_like_the_store():
    index = DueIndex()
    index.put(b"a", 1.0)
    assert index.get(b"a") == 1.0 and math.isnan(index.get(b"b"))
