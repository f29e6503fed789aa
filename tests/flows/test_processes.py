"""The flow as a child process: it runs, it stops for sure, and it leaves nothing running."""

from __future__ import annotations

import os
import time

from flows.config import Config
from flows.processes import FlowProcess, config_env
from flows.sample import write_sample


def test_config_env_says_the_config(tmp_path):
    c = Config.from_env({}, data_dir=str(tmp_path / "d"), follow="1", item_slots="author", watch_positive_s="off")
    env = config_env(c, base={"FRESHREC_SOURCE": "kafka", "PATH": "/bin"})
    assert env["FRESHREC_SOURCE"] == "files"  # the config's, not the base environment's
    assert env["FRESHREC_DATA_DIR"] == str((tmp_path / "d").resolve())
    assert env["FRESHREC_FOLLOW"] == "1" and env["FRESHREC_ITEM_SLOTS"] == "author"
    assert Config.from_env(env) == Config.from_env({}, data_dir=str((tmp_path / "d").resolve()),
                                                   state_dir=str(c.state_dir.resolve()), follow="1",
                                                   item_slots="author")


def test_follow_flow_runs_until_stopped(tmp_path):
    c = Config.from_env({}, data_dir=str(tmp_path / "data"), state_dir=str(tmp_path / "state"),
                        follow="1", train="0", join_window_s="1")
    write_sample(c.data_dir, requests=100, seed=3)
    fp = FlowProcess(c, log_path=tmp_path / "flow.log").start()
    try:
        deadline = time.monotonic() + 60
        while not list(c.stream_dir("examples").glob("*.jsonl")) and time.monotonic() < deadline:
            assert fp.running, fp.log_tail()
            time.sleep(0.2)
        assert fp.running  # follow mode: it does not end at the end of its input
        pid = fp.proc.pid
    finally:
        fp.stop()
    assert list(c.stream_dir("examples").glob("*.jsonl"))
    assert not fp.running
    try:
        os.killpg(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive
