"""`freshrec serve`: a clear message without a recommender, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main
from flows.streams import read_stream
from tests.model.serving_fakes import call

ROOT = Path(__file__).resolve().parents[2]


def test_serve_without_a_recommender_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "model.recommender", None)  # as if it were not written yet
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "model.recommender" in err and "--recommender" in err


@pytest.mark.parametrize("argv, named", [
    (["serve", "--recommender", "nocolon"], "--recommender"),
    (["serve", "--recommender", "tests.model.serving_fakes:nothing_here"], "nothing_here"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--serve-refresh-ms", "0"], "FRESHREC_SERVE_REFRESH_MS"),
    (["serve", "--api-token", "two words"], "FRESHREC_API_TOKEN"),
])
def test_bad_serve_settings_stop_start_up_naming_the_setting(argv, named, capsys):
    assert main(argv) == 2
    assert named in capsys.readouterr().err


def test_settings_does_not_print_the_token(capsys):
    assert main(["settings", "--api-token", "s3cret"]) == 0
    out = capsys.readouterr().out
    assert "FRESHREC_API_TOKEN=(set)" in out and "s3cret" not in out


def test_serve_answers_and_stops_cleanly_on_sigterm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
         "--state-dir", str(tmp_path / "state"), "--recommender", "tests.model.serving_fakes:build_list_recommender"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[2]
        assert call(url, "GET", "/healthz")[0] == 200
        event = {"request_id": "r1", "user_id": "u1", "item_id": "v1", "ts": time.time(), "action": "click"}
        assert call(url, "POST", "/actions", json.dumps(event))[0] == 202
        assert call(url, "GET", "/recommend?user_id=u1&k=3")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Shut down cleanly: the feature events written in the background are all there.
    features = [e for good, _ in read_stream(tmp_path / "data" / "features", "features") for e in good]
    actions = [e for good, _ in read_stream(tmp_path / "data" / "actions", "actions") for e in good]
    assert len(features) == 3 and [a.request_id for a in actions] == ["r1"]


def test_serve_processes_share_the_port_and_every_served_item_is_logged(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--port", "0", "--processes", "2", "--data-dir",
         str(tmp_path / "data"), "--state-dir", str(tmp_path / "state"),
         "--recommender", "tests.model.serving_fakes:build_list_recommender"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[2]
        ids = set()
        for i in range(40):  # a new connection each: the kernel spreads them over both processes
            status, _, body = call(url, "GET", f"/recommend?user_id=u{i}&k=5")
            assert status == 200 and len(body["items"]) == 5
            ids.add(body["request_id"])
        assert len(ids) == 40
        children = _children(proc.pid)
        assert len(children) >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        # Each child ends (a server process; multiprocessing's resource tracker, when it sees the
        # parent's end of its pipe close): gone, or a zombie of whichever process reaps it.
        deadline = time.monotonic() + 30
        while (alive := {c: (_state(c), _cmdline(c)) for c in children if _state(c) not in ("Z", "gone")}) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Both processes served (each writes its own file), and stopping wrote every feature event.
    features = [e for good, _ in read_stream(tmp_path / "data" / "features", "features") for e in good]
    assert len(features) == 200 and {e.request_id for e in features} == ids
    assert len(list((tmp_path / "data" / "features").glob("*.jsonl"))) == 2


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def test_a_replica_serves_from_one_process(capsys):
    assert main(["serve", "--replica", "--processes", "2"]) == 2
    assert "FRESHREC_SERVE_PROCESSES" in capsys.readouterr().err


@pytest.mark.kafka
def test_serve_as_a_replica_follows_param_deltas(tmp_path, kafka_bootstrap):
    import uuid

    from flows.kafka_local import create_topics
    from paramserver.serving import KafkaDeltaProducer, LmdbServingStore, ServingWriter

    prefix = f"t{uuid.uuid4().hex[:8]}-"
    deltas = prefix + "param-deltas"
    create_topics(kafka_bootstrap, {deltas: 1, prefix + "actions": 1, prefix + "features": 1}, compacted=[deltas])
    primary = LmdbServingStore(tmp_path / "primary", writer=True, name="primary-serve")
    producer = KafkaDeltaProducer(kafka_bootstrap, deltas)
    writer = ServingWriter(primary, producer)
    writer.write(items={f"v{i}": {"item_id": f"v{i}", "ts": 1.0 + i} for i in range(5)})
    assert producer.flush() == 0

    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--port", "0", "--replica", "--store", str(tmp_path / "replica"),
         "--source", "kafka", "--brokers", kafka_bootstrap, "--topic-prefix", prefix,
         "--state-dir", str(tmp_path / "state"), "--recommender", "tests.model.serving_fakes:build_store_recommender"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[2]
        from tests.model.serving_fakes import wait_for

        wait_for(lambda: call(url, "GET", "/healthz")[2]["items"] == 5, what="the replica's copy")
        writer.write(items={"v9": {"item_id": "v9", "ts": 9.0}})
        assert producer.flush() == 0
        wait_for(lambda: call(url, "GET", "/healthz")[2]["params_version"] == primary.params_version(),
                 what="the replica following the deltas")
        assert call(url, "GET", "/healthz")[2]["items"] == 6
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        primary.close()
