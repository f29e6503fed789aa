"""Builders shared by tests: configs on temporary folders, sample events, running a flow."""

from __future__ import annotations

from pathlib import Path

from flows.config import Config
from flows.events import ActionEvent, FeatureEvent


def config_for(tmp_path: Path, **overrides) -> Config:
    # The trainer is off unless a test turns it on: most flow tests are about the join.
    base = {"data_dir": str(tmp_path / "data"), "state_dir": str(tmp_path / "state"), "train": "0"}
    base.update({k: str(v) for k, v in overrides.items()})
    return Config.from_env({}, **base)


def feature(i: int, ts: float, **kw) -> FeatureEvent:
    return FeatureEvent(request_id=f"r{i}", user_id=f"u{i % 7}", item_id=f"v{i % 13}", ts=ts, **kw)


def action(i: int, ts: float, act: str = "like", **kw) -> ActionEvent:
    return ActionEvent(request_id=f"r{i}", user_id=f"u{i % 7}", item_id=f"v{i % 13}", ts=ts,
                       action=act, **kw)
