"""The catalog the model server reads: each item's features, popularity and age, and each user's
recent actions, kept by the flow and written to the serving store through its one writer.

`catalog_delta` pre-aggregates one source batch before the key exchange (one delta per batch,
never one item per event); `Catalog` merges the deltas at the writer step, loads an entry from the
serving store the first time it touches an id (so counts carry on across runs), and hands the
changed entries to `DeltaSync`. Plain logic: no Bytewax.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import operator
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import filterfalse
from typing import Any, Optional

from flows.clock import SourceBatch
from flows.events import ActionEvent
from paramserver.records import append_user_actions, decode_user_actions, encode_user_actions

_ts_of = operator.itemgetter(2)

NO_TS = -math.inf
COUNTS_AT = "counts_at"  # the entry's counts at recent snapshots, so a resume can rewind them
# An item's impression and positive counts (popularity, for cold-start lists) go to the serving
# store at most this often, where a new item or a feature change goes at the next sync: at 25,000
# impressions/s most of the catalog's items changed counts in every 50 ms sync, and encoding and
# writing them all was a tenth of the loop flow (`serve.freshness`). Once a second, the loop's
# 2,000 items still took 14 ms of the flow's one thread each second (7 us an entry, LMDB alone)
# in one sync's commit; every 5 s a fifth of that, and popularity a few seconds old changes no
# cold-start list that matters.
COUNTS_EVERY_S = 5.0
MAX_USERS_IN_MEMORY = 200_000  # users kept in memory past a successful write (the rest reload)


def merge_user_actions(old: list[tuple[str, str, float]], new: list[tuple[str, str, float]],
                       cap: int) -> list[tuple[str, str, float]]:
    """A user's list `old` (in ts order) with `new` merged in by ts, repeats of old ones left out,
    the newest `cap` kept."""
    # Only the old actions from the earliest new `ts` on can equal a new one, or sort after one.
    start = bisect.bisect_left(old, min(map(_ts_of, new)), key=_ts_of)
    have = set(old[start:])
    add = [a for a in new if a not in have]
    if not add:
        return old
    tail = old[start:] + add
    tail.sort(key=_ts_of)  # stable: as sorting the whole list
    merged = old[:start] + tail if start else tail
    return merged[-cap:] if len(merged) > cap else merged


@dataclass(slots=True)
class CatalogDelta:
    """What one source batch says about the catalog.

    - `items`: per item id, the latest item event's (ts, sparse, dense);
    - `seen`: per item id, from feature events, [first ts, ts of the features, sparse, dense,
      impressions] (the features of the latest event that carried any, NO_TS when none did; the
      item's feature events in the batch);
    - `positives`: positive actions per item id;
    - `actions`: per user id, their actions in the batch as (item_id, action, ts).
    """

    items: dict[str, tuple[float, dict, dict]] = field(default_factory=dict)
    seen: dict[str, list] = field(default_factory=dict)
    positives: dict[str, int] = field(default_factory=dict)
    actions: dict[str, list[tuple[str, str, float]]] = field(default_factory=dict)


def catalog_delta(batch: SourceBatch, is_positive: Callable[[ActionEvent], bool]) -> list[CatalogDelta]:
    """The catalog delta of one source batch: [] when it holds no events, else one delta."""
    events = batch.events
    if not events:
        return []
    d = CatalogDelta()
    if batch.stream == "items":
        latest = d.items
        for e in events:
            old = latest.get(e.item_id)
            if old is None or e.ts >= old[0]:
                latest[e.item_id] = (e.ts, e.sparse, e.dense)
    elif batch.stream == "features":
        seen = d.seen
        for e in events:
            s = seen.get(e.item_id)
            if s is None:
                seen[e.item_id] = [e.ts, e.ts, e.sparse, e.dense, 1] if e.sparse or e.dense else [e.ts, NO_TS, {}, {}, 1]
                continue
            s[4] += 1
            if e.ts < s[0]:
                s[0] = e.ts
            if (e.sparse or e.dense) and e.ts >= s[1]:
                s[1], s[2], s[3] = e.ts, e.sparse, e.dense
    elif batch.stream == "actions":
        d.positives = dict(Counter(e.item_id for e in events if is_positive(e)))
        users = d.actions
        for e in events:
            got = users.get(e.user_id)
            if got is None:
                users[e.user_id] = [(e.item_id, e.action, e.ts)]
            else:
                got.append((e.item_id, e.action, e.ts))
    return [d]


def new_item(item_id: str, ts: float, source: Optional[str], sparse: dict, dense: dict) -> dict:
    """A catalog entry (paramserver/records.py documents its fields); `source` None: counted but
    not described yet by either stream, so not written."""
    return {"item_id": item_id, "ts": ts, "updated_ts": ts, "sparse": sparse, "dense": dense,
            "impressions": 0, "positives": 0, "source": source}


@dataclass
class CatalogCounts:
    items_loaded: int = 0  # entries read from the serving store on first touch
    users_loaded: int = 0
    rewound: int = 0  # entries whose counts a resume set back to the snapshot's
    inexact: int = 0  # entries whose counts a resume could not set back exactly (history cut)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Catalog:
    """The catalog state at the writer step: merges deltas, keeps what changed for the next write.

    `load_items(ids)` / `load_users(ids)` read entries from the serving store (None where absent).
    `user_recent` caps each user's list to their newest actions. Exactly-once counts through a
    crash: each entry carries, under `counts_at`, its (impressions, positives) as they were at each
    of the last `keep` snapshots after which they changed, with the `run` they belong to and the
    `attempt` (process) that made the change; a resume at snapshot `resumed_at` sets the counts of
    the entries it loads back to those before their first change that is not committed history.
    `lineage` maps each earlier attempt whose snapshots a resume built on to the snapshot the next
    attempt resumed from: a change by attempt a after its snapshot k is committed if k < lineage[a].
    Snapshot numbers alone do not tell: an attempt killed before it reached an item leaves that
    item's record of an abandoned attempt's snapshot k, while the attempt after it numbers its own
    snapshots k, k+1, ... at other places in the stream. `run` names the flow's run (kept in
    Bytewax's snapshot, with `attempt` and `lineage`).
    """

    def __init__(self, load_items: Callable[[Sequence[str]], Sequence[Optional[dict]]],
                 load_users: Callable[[Sequence[str]], Sequence[Optional[Sequence[Sequence[Any]]]]],
                 user_recent: int, *, run: str, seq: int = 0, resumed_at: Optional[int] = None,
                 keep: int = 12, attempt: str = "", lineage: Optional[dict[str, int]] = None,
                 counts_every_s: float = COUNTS_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        if user_recent < 1:
            raise ValueError("user_recent must be at least 1")
        self.load_items = load_items
        self.load_users = load_users
        self.user_recent = user_recent
        self.run = run
        self.seq = seq
        self.resumed_at = resumed_at
        self.keep = max(2, keep)
        self.attempt = attempt
        self.lineage = dict(lineage or {})
        self.items: dict[str, dict] = {}
        # Each user's recent actions as the record the serving store holds (`encode_user_actions`):
        # the next actions are appended to it as bytes (`append_user_actions`), and a write takes it
        # as it is. As lists of tuples they were 7.5% of the Kafka loop flow's main thread (merged,
        # then encoded whole at every write, each field a separate object far apart in memory),
        # and five times the memory (7.7 KB a user of 50 actions, against 1.6 KB: `catalog.user_actions`
        # in bench/ measures the time, 1.8x the actions/s).
        self.users: dict[str, bytes] = {}
        self.dirty_items: set[str] = set()
        # Items whose counts alone changed: written with the next take_dirty at least
        # `counts_every_s` after the last that wrote counts, or at `release_counts` (snapshots).
        self.counted_items: set[str] = set()
        self.counts_every_s = counts_every_s
        self.clock = clock
        self.counts_taken_at = -math.inf
        self.dirty_users: set[str] = set()
        # Items whose `counts_at` holds this snapshot's record already (`_before_counting` has
        # nothing to add): one set lookup per count, where the call was 3.6% of the loop flow's
        # main thread. Emptied by `snapshot`.
        self._recorded: set[str] = set()
        self.counts = CatalogCounts()

    # ------------------------------------------------------------------------------ loading

    def _load(self, deltas: Sequence[CatalogDelta]) -> None:
        """Reads the entries the deltas touch and memory lacks, in one read per kind."""
        have = self.items
        want: set[str] = set()
        absent = functools.partial(filterfalse, have.__contains__)  # in C, per key: no generator
        for d in deltas:
            for m in (d.items, d.seen, d.positives):
                want.update(absent(m))
        if want:
            ids = sorted(want)
            for i, entry in zip(ids, self.load_items(ids), strict=True):
                have[i] = self._adopt(i, entry)
            self.counts.items_loaded += len(ids)
        users = self.users
        uwant = {u for d in deltas for u in filterfalse(users.__contains__, d.actions)}
        if uwant:
            ids = sorted(uwant)
            for u, got in zip(ids, self.load_users(ids), strict=True):
                users[u] = encode_user_actions(got or ())
            self.counts.users_loaded += len(ids)

    def _adopt(self, item_id: str, entry: Optional[dict]) -> dict:
        """A stored entry made whole, its counts set back to the resumed snapshot's if need be."""
        if entry is None:
            return new_item(item_id, NO_TS, None, {}, {})
        out = new_item(item_id, float(entry.get("ts", NO_TS)), entry.get("source"), {}, {})
        out.update(entry)
        out["item_id"] = item_id
        hist = out.get(COUNTS_AT)
        if not isinstance(hist, dict) or hist.get("run") != self.run:
            out.pop(COUNTS_AT, None)  # another run's history: nothing of it can be replayed now
            return out
        at = hist["at"]
        if self.resumed_at is not None:
            j = next((j for j, a in enumerate(at) if not self._committed(a)), None)
            if j is not None:
                # The record of the first change that is not committed history holds the counts
                # as they were before it.
                out["impressions"], out["positives"] = at[j][1], at[j][2]
                hist["at"] = at[:j]
                self.counts.rewound += 1
                if hist.get("cut") and j == 0:
                    self.counts.inexact += 1  # the record of the resumed point may have fallen off
        return out

    def _committed(self, record: Sequence[Any]) -> bool:
        """Whether the change a `counts_at` record stands before is in the history resumed from."""
        seq = record[0]
        if len(record) < 4:  # a record without its attempt: by its snapshot number alone
            return seq < self.resumed_at  # type: ignore[operator]
        end = self.lineage.get(record[3])
        return end is not None and seq < end

    # ------------------------------------------------------------------------------ merging

    def _before_counting(self, e: dict) -> None:
        hist = e.get(COUNTS_AT)
        if hist is None:
            hist = e[COUNTS_AT] = {"run": self.run, "at": [], "cut": False}
        at = hist["at"]
        if at:
            last = at[-1]  # this snapshot's record is there already (usual): nothing to add
            if last[0] == self.seq and len(last) == 4 and last[3] == self.attempt:
                return
        at.append([self.seq, e["impressions"], e["positives"], self.attempt])
        if len(at) > self.keep:
            del at[0]
            hist["cut"] = True

    def merge(self, deltas: Sequence[CatalogDelta]) -> None:
        """Merges deltas in arrival order. The items stream's features win; feature events only
        describe items the items stream has not; counts add up; users keep their newest actions."""
        if not deltas:
            return
        self._load(deltas)
        items, dirty, counted, recorded = self.items, self.dirty_items, self.counted_items, self._recorded
        for d in deltas:
            for i, (ts, sparse, dense) in d.items.items():
                e = items[i]
                if e["source"] != "items":
                    e.update(ts=ts, updated_ts=ts, sparse=sparse, dense=dense, source="items")
                else:
                    if ts < e["ts"]:
                        e["ts"] = ts
                    if ts >= e["updated_ts"]:
                        e.update(updated_ts=ts, sparse=sparse, dense=dense)
                dirty.add(i)
            # One pass per item over what the feature events say, counts included: a pass for
            # the features and another for the counts were 0.85x the speed (a batch's items are
            # entries far apart in memory, each looked up once instead of twice).
            for i, (first, fts, sparse, dense, n) in d.seen.items():
                e = items[i]
                if i not in recorded:
                    self._before_counting(e)
                    recorded.add(i)
                e["impressions"] += n
                src = e["source"]
                if src == "items":
                    continue
                if src is None:
                    e.update(ts=first, updated_ts=max(first, fts), sparse=sparse, dense=dense, source="features")
                else:
                    changed = first < e["ts"]
                    if changed:
                        e["ts"] = first
                    if fts > NO_TS and (fts >= e["updated_ts"] or not (e["sparse"] or e["dense"])):
                        if sparse != e["sparse"] or dense != e["dense"]:
                            if fts > e["updated_ts"]:
                                e["updated_ts"] = fts
                            e["sparse"], e["dense"] = sparse, dense
                            changed = True
                        elif fts > e["updated_ts"]:
                            # The same features again (the model server logs an item's with each
                            # impression): a newer `updated_ts` goes with the entry's next write, of its
                            # counts at the latest (this impression's). Written at once, every item seen
                            # was written at every sync: 15,000 entries a second in the loop flow.
                            e["updated_ts"] = fts
                    if not changed:
                        continue
                dirty.add(i)
            counted.update(d.seen)
            if d.positives:
                for i, n in d.positives.items():
                    e = items[i]
                    if i not in recorded:
                        self._before_counting(e)
                        recorded.add(i)
                    e["positives"] += n
                counted.update(d.positives)
            if d.actions:
                self._merge_actions(d.actions)

    def _merge_actions(self, actions: dict[str, list[tuple[str, str, float]]]) -> None:
        users, cap = self.users, self.user_recent
        for u, new in actions.items():
            # An action seen already (a replayed epoch, a retry) is not added twice.
            add = list(dict.fromkeys(new)) if len(new) > 1 else new
            if not add:
                continue
            if len(add) > 1:
                add.sort(key=_ts_of)  # stable
            merged = append_user_actions(users[u], add, cap)
            if merged is None:  # not all newer than the user's newest: merge the decoded list
                merged = encode_user_actions(merge_user_actions(decode_user_actions(users[u]), add, cap))
                if merged == users[u]:
                    continue
            users[u] = merged
            self.dirty_users.add(u)

    def user_actions(self, user_id: str) -> list[tuple[str, str, float]]:
        """A user's recent (item_id, action, ts) in memory, oldest first ([] if none)."""
        record = self.users.get(user_id)
        return decode_user_actions(record) if record is not None else []

    # ------------------------------------------------------------------------------ writing

    def take_dirty(self) -> tuple[dict[str, dict], dict[str, bytes]]:
        """The entries changed since the last call (for `DeltaSync`'s `extra`). Items no stream
        has described yet are left out: the merge that describes one marks it changed again. (They
        were once kept among the changed ones, and walked at every sync: with many items known
        only from actions, that walk was 39% of a files flow without training.)"""
        items = self.items
        ids = self.dirty_items
        if self.counted_items:
            now = self.clock()
            if now - self.counts_taken_at >= self.counts_every_s:
                ids |= self.counted_items
                self.counted_items = set()
                self.counts_taken_at = now
            else:
                self.counted_items -= ids  # written now anyway
        out_items = {i: e for i in ids if (e := items[i])["source"] is not None}
        self.dirty_items = set()
        users = self.users
        out_users = {u: users[u] for u in self.dirty_users}  # records: written as they are
        self.dirty_users = set()
        return out_items, out_users

    def release_counts(self) -> None:
        """The next `take_dirty` takes every count change too (a snapshot's sync, the last one)."""
        self.dirty_items |= self.counted_items
        self.counted_items = set()

    def snapshot(self, seq: int) -> None:
        """A Bytewax snapshot numbered `seq` was taken: later count changes record the counts at it."""
        self.seq = seq
        self._recorded = set()

    def forget_clean_users(self, limit: int = MAX_USERS_IN_MEMORY) -> int:
        """Drops users beyond `limit` whose records are written (they reload on their next action).
        Call it only after a write succeeded; returns how many were dropped."""
        users = self.users
        over = len(users) - limit
        if over <= 0:
            return 0
        drop = [u for u in users if u not in self.dirty_users][:over]
        for u in drop:
            del users[u]
        return len(drop)
