"""The joiner's table of resolved keys (`flows.joiner._ResolvedKeys`) against a dict, with keys
whose hashes collide: linear probing, backward-shift deletes and growth must lose nothing, and a
key is only ever found by its equal key (the table is exact, not by hash)."""

from __future__ import annotations

import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from flows.joiner import _ResolvedKeys


class Key:
    """A key whose hash is chosen: many keys share one, or share a table slot's low bits."""

    def __init__(self, n: int, h: int):
        self.n, self.h = n, h

    def __hash__(self) -> int:
        return self.h

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and other.n == self.n

    def __repr__(self) -> str:
        return f"Key({self.n}, {self.h})"


HASHES = [0, 1, -1, -2, 1024, 2048, 1 << 40, 7, 7 + 1024, (1 << 63) - 1, -(1 << 63)]
keys = st.builds(lambda n, h: Key(n, h), st.integers(0, 40), st.sampled_from(HASHES))
ops = st.lists(st.tuples(st.sampled_from(["put", "pop", "get", "has"]), keys, st.integers(0, 3)), max_size=300)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_the_table_answers_as_a_dict_does(program):
    t, d = _ResolvedKeys(), {}
    canonical: dict[int, Key] = {}
    for op, k, v in program:
        k = canonical.setdefault(k.n, k)  # one hash per key number, as a real key has
        if op == "put":
            ids = (f"e{v}",) if v else f"e{v}"
            t.put(k, ids)
            d[k] = ids
        elif op == "pop":
            t.pop(k)
            d.pop(k, None)
        elif op == "get":
            assert t.get(k) == d.get(k)
        else:
            assert t.has(k) == (k in d)
        assert len(t) == len(d)
    for k in canonical.values():
        assert t.get(k) == d.get(k)


def test_it_grows_and_shrinks_back_to_nothing_without_losing_or_leaking_a_key():
    t = _ResolvedKeys()
    keys = [f"r-{i:07d}\x00v{i % 97}" for i in range(20_000)]
    ids = [f"a-{i}" for i in range(20_000)]
    def refs() -> list[int]:
        return [sys.getrefcount(x) for x in keys[:50] + ids[:50]]

    before = refs()
    for k, i in zip(keys, ids, strict=True):
        t.put(k, i)
    assert len(t) == 20_000 and all(t.get(k) == i for k, i in zip(keys, ids, strict=True))
    assert refs() == [b + 1 for b in before]  # the table holds each key and ids once
    t.put(keys[0], ("x", "y"))  # new ids for a key: the old ones are let go
    assert refs()[50] == before[50] and t.get(keys[0]) == ("x", "y")
    for k in keys[::2]:
        t.pop(k)
    assert len(t) == 10_000 and not t.has(keys[0]) and t.get(keys[1]) == ids[1]
    assert t.get(f"r-{1:07d}\x00v{1 % 97}") == ids[1]  # an equal key, not the same object
    for k in keys[1::2]:
        t.pop(k)
    assert len(t) == 0 and refs() == before


def test_a_table_let_go_lets_go_of_its_keys():
    keys = [f"k{i}" for i in range(3000)]
    before = [sys.getrefcount(k) for k in keys]
    t = _ResolvedKeys()
    for k in keys:
        t.put(k, ())
    del t, k
    assert [sys.getrefcount(k) for k in keys] == before
