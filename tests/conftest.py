"""Shared fixtures: a real Kafka broker (tests/kafka_support.py) and a clean settings environment."""

import os
import signal

import pytest
from hypothesis import HealthCheck, settings

from tests.kafka_support import *  # noqa: F401,F403  (the kafka_bootstrap fixture)

# Timings on these machines are noisy and never a test's verdict: no per-example deadlines.
settings.register_profile("freshrec", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("freshrec")


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    # A SIGTERM (a timeout, a CI job cancelled) ends the session as Ctrl-C does, so fixtures tear
    # down and the brokers and servers they started stop: by default it killed pytest outright and
    # left its local Kafka broker running.
    signal.signal(signal.SIGTERM, _interrupted)


@pytest.fixture(autouse=True)
def _no_freshrec_env(monkeypatch):
    """Tests build their own Config; settings exported in the shell must not leak in."""
    for name in list(os.environ):
        if name.startswith("FRESHREC_"):
            monkeypatch.delenv(name)
