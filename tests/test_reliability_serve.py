"""Reliability: the model server restarted while the flow syncs into the serving store.

The flow trains online on what the clients do (files, follow mode), so its DeltaSync writes the
serving LMDB all along; `freshrec serve` runs as a child process that is stopped (SIGTERM) and
started again on the same port, twice. Meanwhile a reader reads every row of the store again and
again: each row must decode, and one (key, row version) must always hold the same values (a torn
read would show two). Clients must see no failure outside the restarts, and every action answered
202 must be in the actions stream afterwards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from flows.config import Config
from flows.demo import wait_for_catalog
from flows.kafka_local import free_port_pair
from flows.processes import FlowProcess, config_env
from flows.simulate import World
from flows.streams import read_lines, stream_files
from paramserver.records import RecordError, decode_dense, decode_rows, key_kind
from paramserver.serving import LmdbServingStore
from tests.model.serving_fakes import call

pytestmark = pytest.mark.slow

RESTARTS = 2


class Server:
    """`freshrec serve` in a child process on a fixed port."""

    def __init__(self, config: Config, port: int, log: Path):
        self.config, self.port, self.log = config, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(self.port)],
                                         env=config_env(self.config), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, "the server exited:\n" + self.log.read_text()[-3000:]
            try:
                if call(self.url, "GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not start:\n" + self.log.read_text()[-3000:]
            time.sleep(0.05)

    def stop(self) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait(30)


@dataclass
class Clients:
    url: str
    calls: list = field(default_factory=list)  # (start, end, what, status or error text)
    accepted: list = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _call(self, what: str, method: str, path: str, body: str | None = None):
        t0 = time.monotonic()
        try:
            status, _, answer = call(self.url, method, path, body=body)
        except OSError as e:
            status, answer = f"{type(e).__name__}: {e}", None
        self.calls.append((t0, time.monotonic(), what, status))
        return status, answer

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            user = f"u{rng.randrange(40)}"
            status, body = self._call("recommend", "GET", f"/recommend?user_id={user}&k=10")
            if status != 200:
                time.sleep(0.05)
                continue
            items = body["items"]
            if items:
                actions = [{"request_id": body["request_id"], "user_id": user, "item_id": it["item_id"],
                            "ts": time.time(), "action": "like" if rng.random() < 0.5 else "skip"}
                           for it in rng.sample(items, min(2, len(items)))]
                status, _ = self._call("actions", "POST", "/actions", json.dumps(actions))
                if status == 202:
                    self.accepted.extend(actions)
            self.stop.wait(0.02)


@dataclass
class RowReader:
    """Reads the whole serving store, again and again, as a model server does (read-only)."""

    store: LmdbServingStore
    dim: int
    seen: dict = field(default_factory=dict)  # (key, version) -> values bytes
    rows_read: int = 0
    passes: int = 0
    torn: list = field(default_factory=list)
    dense_versions: list = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        store = self.store
        while not self.stop.is_set():
            records = list(store.scan())
            rows = [(k, v) for k, v in records if key_kind(k) == "row"]
            for k, v in rows:
                try:
                    dec = decode_rows([v])  # its own dim: embeddings have the configured one, biases 1
                except RecordError as e:
                    self.torn.append((k, f"does not decode: {e}"))
                    continue
                values = dec.values[0]
                if len(values) not in (self.dim, 1):
                    self.torn.append((k, f"a row of dim {len(values)}"))
                if not np.isfinite(values).all():
                    self.torn.append((k, "non-finite values"))
                ident = (k, int(dec.versions[0]))
                raw = values.tobytes()
                if self.seen.setdefault(ident, raw) != raw:
                    self.torn.append((k, f"version {ident[1]} read with two different values"))
            self.rows_read += len(rows)
            try:
                blob = decode_dense([(k, v) for k, v in records if key_kind(k) == "dense"])
            except RecordError as e:
                self.torn.append((b"dense", str(e)))
            else:
                if blob is not None:
                    self.dense_versions.append(blob.version)
            self.passes += 1
            self.stop.wait(0.005)  # leave the 2 cores to the flow and the server between passes


def test_the_model_server_restarted_while_the_flow_syncs_serves_on_without_torn_reads(tmp_path):
    config = Config.from_env({}, data_dir=str(tmp_path / "data"), state_dir=str(tmp_path / "state"), follow="1",
                             join_window_s="5", lateness_s="1", idle_s="1", metrics_port="off", train="1",
                             sync_interval_ms="20", dense_sync_s="1")
    flow = FlowProcess(config, ["-w", "1"], log_path=tmp_path / "flow.log").start()
    server = Server(config, free_port_pair(), tmp_path / "serve.log")
    try:
        server.start()
        wait_for_catalog(config, World(seed=4, n_users=40, n_items=80, n_authors=8), server.url, flow,
                         lambda _m: None)
        store = LmdbServingStore(config.state_dir / "serving")  # read-only, as a model server opens it
        reader = RowReader(store, config.embedding_dim)
        clients = [Clients(server.url) for _ in range(2)]
        threads = [threading.Thread(target=reader.run, daemon=True)]
        threads += [threading.Thread(target=c.run, args=(i,), daemon=True) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        windows = []
        versions = []
        try:
            time.sleep(8)
            for _ in range(RESTARTS):
                before = call(server.url, "GET", "/healthz")[2]["params_version"]
                written_before = store.params_version()
                down = time.monotonic()
                assert server.stop() == 0, "the server did not stop cleanly:\n" + server.log.read_text()[-2000:]
                server.start()
                up = time.monotonic()
                after = call(server.url, "GET", "/healthz")[2]["params_version"]
                versions.append((before, after, written_before, store.params_version()))
                windows.append((down, up))
                time.sleep(8)
                assert flow.running, "the flow died:\n" + flow.log_tail()
        finally:
            for c in clients:
                c.stop.set()
            reader.stop.set()
            for t in threads:
                t.join(60)
            store.close()
        assert flow.running, "the flow died:\n" + flow.log_tail()
    finally:
        server.stop()
        flow.stop()

    def in_restart(start: float, end: float) -> bool:
        return any(end >= down and start <= up for down, up in windows)

    calls = [c for cl in clients for c in cl.calls]
    outside = [c for c in calls if not in_restart(c[0], c[1])]
    failed_outside = [c for c in outside if c[3] not in (200, 202)]
    failed_inside = [c for c in calls if in_restart(c[0], c[1]) and c[3] not in (200, 202)]
    assert len(outside) > 100
    assert not failed_outside, failed_outside[:10]
    assert not reader.torn, reader.torn[:10]
    assert reader.rows_read > 0 and reader.passes > 10
    assert reader.dense_versions == sorted(reader.dense_versions)
    for before, after, written_before, written_after in versions:
        assert after >= before  # params_version only grows, across a restart too
        assert written_after > written_before, "the flow did not sync during the restart"
    # Every action answered 202 is in the actions stream (the server flushed its log on SIGTERM).
    streamed = set()
    for path in stream_files(config.stream_dir("actions")):
        for chunk in read_lines(path):
            for line in chunk:
                e = json.loads(line)
                streamed.add((e["request_id"], e["item_id"], e["action"]))
    accepted = [(a["request_id"], a["item_id"], a["action"]) for c in clients for a in c.accepted]
    assert set(accepted) <= streamed
    restart_s = [up - down for down, up in windows]
    print(f"\nserver restarted {RESTARTS}x while the flow synced: restart windows "
          f"{', '.join(f'{s:.2f} s' for s in restart_s)}; {len(calls)} client calls, {len(failed_inside)} failed "
          f"inside the restarts, {len(failed_outside)} outside; {len(accepted)} actions accepted, all in the "
          f"stream; reader: {reader.passes} passes, {reader.rows_read} rows read, {len(reader.seen)} row versions, "
          f"torn {len(reader.torn)}; params_version across restarts {versions}")
