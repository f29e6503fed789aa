"""The streaming job as a child process, for the commands and tests that run the whole loop.

`FlowProcess` starts `python -m bytewax.run flows.pipeline:flow` with a `Config`'s settings in its
environment and stops it for sure: SIGINT first (Bytewax stops at the next step), then SIGTERM,
then SIGKILL, and it waits for the process, so nothing is left running.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Optional

from flows.config import Config


def config_env(config: Config, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """An environment whose FRESHREC_* variables say exactly `config` (paths made absolute)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("FRESHREC_")}
    for f in dataclasses.fields(Config):
        value = getattr(config, f.name)
        if isinstance(value, Path):
            value = value.resolve()
        elif isinstance(value, bool):
            value = int(value)
        elif isinstance(value, tuple):
            value = ",".join(value)
        elif value is None:
            value = "off"
        env[f.metadata["env"]] = str(value)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class FlowProcess:
    """The dataflow in a child process; a context manager that always stops it."""

    def __init__(self, config: Config, bytewax_args: Sequence[str] = (), *, log_path: Optional[Path] = None,
                 extra_env: Optional[Mapping[str, str]] = None) -> None:
        self.config = config
        self.args = list(bytewax_args)
        self.log_path = log_path
        self.env = {**config_env(config), **(extra_env or {})}
        self.proc: Optional[subprocess.Popen] = None
        self._log: Optional[IO[Any]] = None

    def start(self) -> FlowProcess:
        if self.proc is not None:
            raise RuntimeError("the flow is running already")
        out: Any = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = out = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", "bytewax.run", "flows.pipeline:flow", *self.args]
        # Its own session: a Ctrl-C in the terminal reaches the parent, which stops the child in order.
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.proc is None:
            raise RuntimeError("the flow was not started")
        return self.proc.wait(timeout)

    def stop(self, grace_s: float = 15.0) -> Optional[int]:
        """Stops the flow (SIGINT, then SIGTERM, then SIGKILL) and waits for it; its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        try:
            for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 30.0)):
                if proc.poll() is not None:
                    break
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait_s
                while proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
            return proc.wait(30.0)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> FlowProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
