"""The model server's HTTP API under attack: a full schemathesis run (every phase, every check,
valid and invalid data) without a 5xx; bodies over the limit get 413 however they are framed;
slow clients (slowloris: headers or a body dribbled a byte at a time) hold no connection past
FRESHREC_SERVE_READ_TIMEOUT_S and block nobody else meanwhile.
"""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlparse

import pytest

from model.server import MAX_BODY_BYTES, running_server
from tests.helpers import config_for
from tests.model.serving_fakes import ListRecommender, call

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
READ_TIMEOUT_S = 5
ACTION = {"request_id": "r1", "user_id": "u1", "item_id": "v1", "ts": 1764288000.0, "action": "like"}


def connect(url: str) -> socket.socket:
    u = urlparse(url)
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    return s


def read_response(s: socket.socket, limit: float = 60) -> tuple[int, bytes]:
    """(status, raw response) once the server has answered and closed, or sent a whole JSON body."""
    s.settimeout(limit)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = [int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:")]
            if length and len(body) >= length[0]:
                break
    return int(data.split(b" ", 2)[1]) if data else 0, data


@pytest.mark.slow
def test_a_full_schemathesis_run_finds_no_5xx_and_no_other_issue(tmp_path):
    # Every phase (examples, coverage, fuzzing, stateful), every check, positive and negative data.
    # A bound past the contract's largest ts makes the document exact (see test_server_openapi.py).
    config = config_for(tmp_path, max_future_s=4102444800)
    t0 = time.monotonic()
    with running_server(ListRecommender(), config) as s:
        run = subprocess.run(
            [SCHEMATHESIS, "run", s.url + "/openapi.json", "--checks", "all", "--mode", "all",
             "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "100", "--seed", "8",
             "--workers", "1", "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml")],
            capture_output=True, text=True, timeout=1200, cwd=tmp_path)  # its cache goes to tmp_path
        statuses = {k: v for k, v in _requests_by_status(s.server).items()}
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    cases = suite.iter("testcase")
    assert sum(1 for _ in cases) >= 4
    assert not any(st.startswith("5") for st in statuses), statuses
    line = next(x for x in run.stdout.splitlines() if "generated" in x)
    print(f"\nHTTP schemathesis: {line.strip()}; statuses {statuses}; {time.monotonic() - t0:.1f} s")


def _requests_by_status(server) -> dict[str, int]:
    out: dict[str, int] = {}
    for metric in server.metrics.requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out[sample.labels["status"]] = out.get(sample.labels["status"], 0) + int(sample.value)
    return out


@pytest.fixture
def server(tmp_path):
    config = config_for(tmp_path, serve_read_timeout_s=READ_TIMEOUT_S)
    with running_server(ListRecommender(), config) as s:
        yield s


def test_a_body_declared_over_the_limit_gets_413_before_it_is_sent(server):
    s = connect(server.url)
    s.sendall(b"POST /actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1))
    status, raw = read_response(s)  # not one byte of the body sent
    assert status == 413 and b"larger than" in raw
    s.close()


@pytest.mark.parametrize("size", [MAX_BODY_BYTES + 1, 3 * MAX_BODY_BYTES])
def test_a_chunked_body_over_the_limit_gets_413(server, size):
    s = connect(server.url)
    s.sendall(b"POST /actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n")
    sent = 0
    try:
        while sent < size:
            n = min(64 << 10, size - sent)
            s.sendall(b"%x\r\n" % n + b" " * n + b"\r\n")
            sent += n
        s.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer and close before the rest is sent
    status, raw = read_response(s)
    assert status == 413 and b"larger than" in raw
    s.close()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_does_not_decompress_gets_400_not_500(server, encoding):
    # aiohttp decompresses a body by its Content-Encoding; one that is not what it says must be
    # the client's error, told as such, and nothing written.
    body = b"this is not " + encoding.encode() + b" data"
    s = connect(server.url)
    s.sendall(b"POST /actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (encoding.encode(), len(body), body))
    status, raw = read_response(s)
    s.close()
    assert status == 400 and b"body could not be read" in raw, raw
    assert _requests_by_status(server.server).get("500", 0) == 0


def test_a_gzip_body_is_read(server):
    s = connect(server.url)
    body = gzip.compress(json.dumps([ACTION]).encode())
    s.sendall(b"POST /actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    status, raw = read_response(s)
    s.close()
    assert status == 202 and b'"accepted":1' in raw.replace(b" ", b""), raw


def test_bodies_at_the_limit_are_read_whole(server):
    # A body of exactly the limit (a valid array padded with spaces) is read, not refused.
    body = json.dumps([ACTION]).encode()
    body += b" " * (MAX_BODY_BYTES - len(body))
    status, _, answer = call(server.url, "POST", "/actions", body)
    assert status == 202 and answer == {"accepted": 1}


def test_slow_clients_are_cut_off_and_block_no_one_else(server):
    """Slowloris: many connections dribbling a request's headers, or its body, a byte at a time.
    Other clients are answered meanwhile; each slow connection ends at the read timeout (2 s here),
    the body ones with 408, while their client is still sending."""
    t0 = time.monotonic()
    n_headers, n_bodies = 150, 50
    ended: dict[str, list[float]] = {"headers": [], "bodies": []}
    statuses: list[int] = []
    stop = threading.Event()
    lock = threading.Lock()

    def dribble(kind: str) -> None:
        s = connect(server.url)
        if kind == "headers":
            rest = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 4000 + b"\r\n\r\n"
        else:
            body = json.dumps([ACTION] * 50).encode()
            s.sendall(b"POST /actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body))
            rest = body
        started = time.monotonic()
        s.settimeout(0.2)
        status, data = 0, b""
        for i in range(len(rest)):  # one byte every 0.2 s: 800 s for the whole request
            if stop.is_set():
                break
            try:
                s.sendall(rest[i:i + 1])
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            except TimeoutError:
                continue
            except OSError:  # reset or broken pipe: the server closed it
                break
        if data:
            status = int(data.split(b" ", 2)[1])
        with lock:
            ended[kind].append(time.monotonic() - started)
            statuses.append(status)
        s.close()

    threads = [threading.Thread(target=dribble, args=("headers",)) for _ in range(n_headers)]
    threads += [threading.Thread(target=dribble, args=("bodies",)) for _ in range(n_bodies)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)  # the slow clients connected and dribbling
        # Meanwhile, others are answered (each within the client's generous 30 s timeout), while
        # the slow clients still hang: a server they blocked would answer only once they are cut off.
        answered = 0
        hanging = []
        while answered < 30:
            assert call(server.url, "GET", "/healthz")[0] == 200
            assert call(server.url, "GET", "/recommend?user_id=u1&k=3")[0] == 200
            assert call(server.url, "POST", "/actions", json.dumps(ACTION).encode())[0] == 202
            answered += 3
            with lock:
                hanging.append(n_headers + n_bodies - len(ended["headers"]) - len(ended["bodies"]))
        assert hanging[0] > 0, "the first answers came only after every slow client was cut off"
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a slow client was never cut off"
    finally:
        stop.set()
    # Every slow connection was ended by the server, long before its client would have finished.
    assert len(ended["headers"]) == n_headers and len(ended["bodies"]) == n_bodies
    assert max(ended["headers"] + ended["bodies"]) < 100
    assert statuses.count(408) == n_bodies  # a body cut off is told why; headers never came: no answer
    assert call(server.url, "GET", "/healthz")[0] == 200
    print(f"\nHTTP slowloris: {n_headers} header + {n_bodies} body dribblers cut off after "
          f"{min(ended['headers']):.1f}-{max(ended['headers']):.1f} s / "
          f"{min(ended['bodies']):.1f}-{max(ended['bodies']):.1f} s (timeout {READ_TIMEOUT_S} s); {answered} other "
          f"requests answered while {hanging[0]}..{hanging[-1]} slow ones hung; {time.monotonic() - t0:.1f} s")
