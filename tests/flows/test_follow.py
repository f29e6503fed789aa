"""Follow mode, the whole flow: lines appended while it runs are joined, half lines wait."""

from __future__ import annotations

import json
import time

import pytest

from flows.events import encode
from tests.flows.test_recovery import bytewax_run, flow_env, read_stream
from tests.helpers import action, feature

pytestmark = pytest.mark.slow
T0 = 1764288000.0


def wait_for(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_the_following_flow_joins_lines_appended_while_it_runs(tmp_path):
    env = flow_env(tmp_path, FRESHREC_FOLLOW="1", FRESHREC_FILE_PARTITIONS="1")
    feats = tmp_path / "data" / "features"
    acts = tmp_path / "data" / "actions"
    feats.mkdir(parents=True)
    acts.mkdir(parents=True)
    (state := tmp_path / "state").mkdir()
    p = bytewax_run(env, "-s", "1")
    try:
        with (feats / "f.jsonl").open("ab", buffering=0) as f, (acts / "a.jsonl").open("ab", buffering=0) as a:
            f.write(b"".join(encode(feature(i, T0 + i)) + b"\n" for i in range(5)))
            line = encode(action(1, T0 + 2)) + b"\n"
            a.write(line[:15])  # half a line: not an event yet
            time.sleep(1.5)
            assert read_stream(tmp_path, "dead-letter") == []
            a.write(line[15:])
            assert wait_for(lambda: [e["request_id"] for e in read_stream(tmp_path, "examples")] == ["r1"])
            # A file made while the flow runs is read too.
            with (acts / "later.jsonl").open("ab") as b:
                b.write(encode(action(3, T0 + 4, "skip")) + b"\n")
            assert wait_for(lambda: len(read_stream(tmp_path, "examples")) == 2)
        examples = {e["request_id"]: e["label"] for e in read_stream(tmp_path, "examples")}
        assert examples == {"r1": 1, "r3": 0}
        assert read_stream(tmp_path, "dead-letter") == []
        assert p.poll() is None, "a following flow never ends by itself"
    finally:
        p.kill()
        p.wait()
    assert state.exists() and json.loads((state / "settings.json").read_text())
