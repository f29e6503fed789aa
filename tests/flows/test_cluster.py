"""The same examples with one worker, two workers, and two processes of a Bytewax cluster."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest

from flows.sample import write_sample
from tests.flows.test_recovery import by_key, flow_env, read_stream

pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run(base, *args):
    env = flow_env(base, FRESHREC_SOURCE_BATCH_BYTES="65536", FRESHREC_JOIN_CACHE="2000")
    return subprocess.Popen([sys.executable, "-m", "bytewax.run", "flows.pipeline:flow", *args],
                            env=env, cwd=base, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(*procs):
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-3000:]


def test_one_worker_two_workers_and_two_processes_make_the_same_examples(tmp_path):
    sample = tmp_path / "sample"
    write_sample(sample, requests=4000, per_request=5, seed=5)
    runs = {}
    for name in ("w1", "w2", "p2"):
        shutil.copytree(sample, tmp_path / name / "data")
    finish(run(tmp_path / "w1"))
    finish(run(tmp_path / "w2", "-w", "2"))
    a, b = free_ports(2)
    addresses = f"127.0.0.1:{a};127.0.0.1:{b}"
    finish(run(tmp_path / "p2", "-i", "0", "-a", addresses), run(tmp_path / "p2", "-i", "1", "-a", addresses))
    for name in ("w1", "w2", "p2"):
        runs[name] = by_key(read_stream(tmp_path / name, "examples"))
    assert len(runs["w1"]) == 20000
    assert runs["w2"] == runs["w1"]
    assert runs["p2"] == runs["w1"]
    # Two processes really shared the work: each wrote examples of its own.
    writers = {p.name.split("-")[2] for p in (tmp_path / "p2" / "data" / "examples").glob("*.jsonl")}
    assert len(writers) == 2
