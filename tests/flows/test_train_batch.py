"""`freshrec train-batch`, then online training in the flow, which starts from the batch state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.cli import main
from flows.sample import write_sample
from tests.flows.test_recovery import bytewax_run, flow_env, read_stream

pytestmark = pytest.mark.slow


def test_online_training_carries_on_from_the_batch_state(tmp_path):
    write_sample(tmp_path / "data", requests=800, per_request=5, seed=1, malformed=False)
    p = bytewax_run(flow_env(tmp_path, FRESHREC_TRAIN="0"))
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    assert main(["train-batch", "--epochs", "2", "--data-dir", str(tmp_path / "data"),
                 "--state-dir", str(tmp_path / "state"), "--buckets", "4", "--train", "1"]) == 0

    from paramserver.serving import LmdbServingStore

    batch_items = sorted({e["item_id"] for e in read_stream(tmp_path, "examples")})
    with LmdbServingStore(tmp_path / "state" / "serving") as store:
        before = store.read_rows("item_id", batch_items)
    assert before.found.all()

    # New impressions of a few items only: every other item's row must be the batch's, unchanged.
    online = tmp_path / "online" / "features" / "online.jsonl"
    online.parent.mkdir(parents=True)
    fresh = [{"request_id": f"n{i}", "user_id": "u1", "item_id": batch_items[i % 3], "ts": 1764300000.0 + i}
             for i in range(300)]
    online.write_text("".join(json.dumps(f) + "\n" for f in fresh))
    p = bytewax_run(flow_env(tmp_path, FRESHREC_TRAIN="1", FRESHREC_DATA_DIR=str(tmp_path / "online")))
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    with LmdbServingStore(tmp_path / "state" / "serving") as store:
        after = store.read_rows("item_id", batch_items)
    trained_online = set(batch_items[:3])
    for i, item in enumerate(batch_items):
        same = np.array_equal(after.values[i], before.values[i])
        assert same != (item in trained_online), item
    # The online trainer's own tables hold the batch rows: it started from them, not from scratch.
    from model.features import FeatureSpec
    from model.trainer import parameter_store

    params = parameter_store(FeatureSpec(), tmp_path / "state" / "params")
    assert len(params.tags()) >= 2
    params.restore(params.tags()[-1])
    rows = params.pull("item_id", batch_items, admit=False)
    untouched = [i for i, item in enumerate(batch_items) if item not in trained_online]
    np.testing.assert_array_equal(rows[untouched], before.values[untouched])
