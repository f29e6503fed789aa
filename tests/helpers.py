"""Builders shared by tests: configs on temporary folders, sample events, running a flow."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

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


def source_module(module: Any) -> Any:
    """The source of a module that setup.py compiles (flows/joiner.py, say), run as plain Python,
    whether or not the compiled module is what `module` is."""
    import importlib.util

    path = Path(module.__file__).with_name(module.__name__.rsplit(".", 1)[1] + ".py")
    spec = importlib.util.spec_from_file_location(f"freshrec_source_{module.__name__.replace('.', '_')}", path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(loaded)
    finally:
        del sys.modules[spec.name]
    assert not loaded.COMPILED
    return loaded
