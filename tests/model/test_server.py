"""The model server's HTTP contract (CONTRACT.md, Model server HTTP API), on a running server."""

from __future__ import annotations

import json
import socket
import time
import uuid
from urllib.parse import quote, urlsplit

import pytest

from flows.config import Config, ConfigError
from flows.eventlog import FileEventLog, KafkaEventLog
from flows.events import ActionEvent, FeatureEvent, parse
from flows.streams import read_stream, stream_files
from model.server import MAX_BODY_BYTES, running_server
from tests.helpers import config_for
from tests.model.serving_fakes import ListRecommender, call, wait_for

NOW = time.time()


def act(i: int = 0, **kw) -> dict:
    return {"request_id": f"r{i}", "user_id": "u1", "item_id": f"v{i}", "ts": NOW - 5, "action": "like", **kw}


def lines(config, stream: str) -> list:
    events = []
    for good, dead in read_stream(config.stream_dir(stream), stream):
        assert not dead, dead
        events += good
    return events


@pytest.fixture
def config(tmp_path):
    return config_for(tmp_path)


@pytest.fixture
def server(config, request):
    # Indirectly parametrized with the server's threads (FRESHREC_SERVE_THREADS) where a test
    # asks; the setting's default otherwise.
    options = {"threads": request.param} if hasattr(request, "param") else {}
    rec = ListRecommender()
    with running_server(rec, config, **options) as s:
        s.recommender = rec
        yield s


# --- /recommend --------------------------------------------------------------------------------

@pytest.mark.parametrize("server", [0, 2], indirect=True, ids=["on-the-event-loop", "two-threads"])
def test_recommend_answers_the_contract_and_writes_one_feature_event_per_item(server, config):
    status, _, body = call(server.url, "GET", "/recommend?user_id=u1&k=5")
    assert status == 200
    assert set(body) == {"request_id", "user_id", "model_version", "items"}
    assert body["user_id"] == "u1" and body["model_version"] == "m3"
    assert len(body["items"]) == 5 and all(set(i) == {"item_id", "score"} for i in body["items"])
    expected = server.recommender.recommend("u1", 5).items
    assert [i["item_id"] for i in body["items"]] == [s.item_id for s in expected]

    events = wait_for(lambda: (e := lines(config, "features")) and len(e) == 5 and e, what="feature events")
    # Each line is valid for the flow's own parser too.
    for path in stream_files(config.stream_dir("features")):
        for raw in path.read_bytes().splitlines():
            assert isinstance(parse("features", raw, time.time()), FeatureEvent)
    events.sort(key=lambda e: e.position)
    assert [e.position for e in events] == list(range(5))
    for e, item, served in zip(events, body["items"], expected, strict=True):
        assert e.request_id == body["request_id"] and e.user_id == "u1"
        assert e.item_id == item["item_id"] and e.score == item["score"]
        assert e.model_version == "m3"
        # The item's features and the user-side ones the model used, so training sees what serving saw.
        assert e.sparse == {**served.sparse, "recent_author": ["a1", "a2"]} and e.dense == served.dense
        assert e.event_id and abs(e.ts - time.time()) < 3600
    assert len({e.event_id for e in events}) == 5


def test_k_defaults_to_20_and_an_unknown_user_gets_a_list(server):
    status, _, body = call(server.url, "GET", "/recommend?user_id=nobody-" + uuid.uuid4().hex)
    assert status == 200 and len(body["items"]) == 20


def test_user_ids_are_counted_in_code_points(server):
    uid = "é" * 128  # 256 bytes in UTF-8, 128 characters
    status, _, body = call(server.url, "GET", "/recommend?user_id=" + quote(uid) + "&k=1")
    assert status == 200 and body["user_id"] == uid
    assert call(server.url, "GET", "/recommend?user_id=" + quote("é" * 129))[0] == 400


@pytest.mark.parametrize("query", [
    "", "?k=5", "?user_id=", "?user_id=" + "x" * 129, "?user_id=a&user_id=b",
    "?user_id=u1&k=0", "?user_id=u1&k=1001", "?user_id=u1&k=-1", "?user_id=u1&k=abc", "?user_id=u1&k=1.5",
    "?user_id=u1&k=", "?user_id=u1&k=%205", "?user_id=u1&k=%2B5", "?user_id=u1&k=99999999999",
    "?user_id=u1&k=%D9%A5",  # an Arabic-Indic digit five: int() takes it, the contract does not
])
def test_bad_recommend_parameters_are_400_json(server, query):
    status, headers, body = call(server.url, "GET", "/recommend" + query)
    assert status == 400
    assert headers["content-type"].startswith("application/json") and body["error"]


def test_k_bounds_are_inclusive(server):
    assert len(call(server.url, "GET", "/recommend?user_id=u1&k=1")[2]["items"]) == 1
    assert call(server.url, "GET", "/recommend?user_id=u1&k=1000")[0] == 200


# --- POST /actions -----------------------------------------------------------------------------

def test_one_action_is_accepted_and_stamped_with_its_arrival(server, config):
    before = time.time()
    status, _, body = call(server.url, "POST", "/actions", json.dumps(act(1, received_at=5.0, extra="x")))
    after = time.time()
    assert (status, body) == (202, {"accepted": 1})
    [e] = lines(config, "actions")  # acknowledged means written: no waiting
    assert isinstance(e, ActionEvent) and e.request_id == "r1" and e.action == "like"
    assert before <= e.received_at <= after  # the server's stamp replaces the client's


def test_an_array_of_actions_is_accepted_whole(server, config):
    events = [act(i, action=a) for i, a in enumerate(["click", "skip", "watch"])]
    events[2]["value"] = 12.5
    status, _, body = call(server.url, "POST", "/actions", json.dumps(events))
    assert (status, body) == (202, {"accepted": 3})
    got = lines(config, "actions")
    assert [(e.request_id, e.action) for e in got] == [("r0", "click"), ("r1", "skip"), ("r2", "watch")]
    assert got[2].value == 12.5


@pytest.mark.parametrize("body, reason", [
    ("{not json", "not JSON"),
    ("[{]", "not JSON"),
    ("5", "not an object"),
    ('"like"', "not an object"),
    ("null", "not an object"),
    ("", "empty body"),
    ("[]", "empty array"),
    ("[5]", "not an object"),
])
def test_bodies_that_are_not_events_are_400(server, config, body, reason):
    status, _, out = call(server.url, "POST", "/actions", body)
    assert status == 400
    assert reason in json.dumps(out)
    assert lines(config, "actions") == []


def test_one_invalid_event_among_valid_ones_rejects_all_with_index_and_reason(server, config):
    events = [act(0), act(1), act(2), act(3)]
    del events[1]["user_id"]
    events[3]["ts"] = 1764288000123  # milliseconds by mistake
    status, _, body = call(server.url, "POST", "/actions", json.dumps(events))
    assert status == 400
    assert body["invalid"] == [{"index": 1, "reason": "missing field user_id"},
                               {"index": 3, "reason": body["invalid"][1]["reason"]}]
    assert "ts" in body["invalid"][1]["reason"]
    assert lines(config, "actions") == []


def test_the_server_rejects_what_the_flow_would_dead_letter(server, config):
    # The same parser decides: a boolean is not a number; an unknown action; ts from the future.
    for bad in (act(0, ts=True), act(0, action="poke"), act(0, ts=time.time() + 2 * 86400), act(0, value="x")):
        status, _, body = call(server.url, "POST", "/actions", json.dumps(bad))
        assert status == 400 and body["invalid"][0]["index"] == 0, bad
    assert lines(config, "actions") == []


def test_more_than_1000_events_is_400_and_1000_is_fine(server, config):
    assert call(server.url, "POST", "/actions", json.dumps([act(i) for i in range(1001)]))[0] == 400
    assert lines(config, "actions") == []
    assert call(server.url, "POST", "/actions", json.dumps([act(i) for i in range(1000)]))[2] == {"accepted": 1000}


def test_a_body_over_1_mib_is_413_with_or_without_content_length(server, config):
    big = b"[" + b" " * MAX_BODY_BYTES + json.dumps(act(0)).encode() + b"]"
    status, _, body = call(server.url, "POST", "/actions", big)
    assert status == 413 and body["error"]
    # Chunked: no Content-Length, so the server has to count.
    u = urlsplit(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(b"POST /actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b" " * 65536
        try:
            for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before the rest is sent
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413")
    assert lines(config, "actions") == []


def test_a_body_of_exactly_1_mib_is_read(server, config):
    event = json.dumps(act(0)).encode()
    body = b"[" + event + b"]"
    body = body[:-1] + b" " * (MAX_BODY_BYTES - len(body)) + b"]"
    assert len(body) == MAX_BODY_BYTES
    assert call(server.url, "POST", "/actions", body)[0] == 202


def test_a_token_guards_post_actions_when_set(tmp_path):
    config = config_for(tmp_path, api_token="s3cret-token")
    with running_server(ListRecommender(), config) as s:
        body = json.dumps(act(0))
        status, headers, out = call(s.url, "POST", "/actions", body)
        assert status == 401 and out["error"] and headers["www-authenticate"].startswith("Bearer")
        assert call(s.url, "POST", "/actions", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert call(s.url, "POST", "/actions", body, {"Authorization": "Basic s3cret-token"})[0] == 401
        assert call(s.url, "POST", "/actions", body, {"Authorization": "Bearer s3cret-token"})[0] == 202
        assert call(s.url, "GET", "/recommend?user_id=u1")[0] == 200  # reads need no token
    assert len(lines(config, "actions")) == 1


def test_503_with_retry_after_when_the_file_stream_cannot_be_written(tmp_path):
    config = config_for(tmp_path)
    config.data_dir.mkdir(parents=True)
    (config.data_dir / "actions").write_text("a file where the stream's folder should be")
    with running_server(ListRecommender(), config) as s:
        status, headers, body = call(s.url, "POST", "/actions", json.dumps(act(0)))
        assert status == 503 and int(headers["retry-after"]) >= 1 and "down" in body["error"]
        assert call(s.url, "GET", "/healthz")[2]["streams"]["actions"] == "down"
        # The folder comes back: the next write goes through.
        (config.data_dir / "actions").unlink()
        assert call(s.url, "POST", "/actions", json.dumps(act(0)))[0] == 202
        assert call(s.url, "GET", "/healthz")[2]["streams"]["actions"] == "up"
    assert len(lines(config, "actions")) == 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when this returns: nothing listens there


def test_503_with_retry_after_when_kafka_is_unreachable(tmp_path):
    config = config_for(tmp_path)
    brokers = f"127.0.0.1:{closed_port()}"
    logs = {name: KafkaEventLog(brokers, name, delivery_timeout_ms=1000,
                                extra={"reconnect.backoff.max.ms": "200"})
            for name in ("actions", "features")}
    with running_server(ListRecommender(), config, actions_log=logs["actions"],
                        features_log=logs["features"]) as s:
        for _ in range(2):  # the first waits out the delivery timeout, the next fails at once
            status, headers, body = call(s.url, "POST", "/actions", json.dumps(act(0)))
            assert status == 503 and headers["retry-after"] == "1" and "down" in body["error"]
        # Recommendations still work; their feature events are counted as lost.
        assert call(s.url, "GET", "/recommend?user_id=u1&k=3")[0] == 200
        wait_for(lambda: "freshrec_serve_feature_events_failed_total 3.0" in call(s.url, "GET", "/metrics")[2],
                 what="the failed feature events counted")


# --- /healthz, /metrics, /openapi.json, errors -------------------------------------------------

def test_healthz(server):
    status, _, body = call(server.url, "GET", "/healthz")
    assert status == 200
    assert body["status"] == "ok" and body["params_version"] == 3
    assert body["freshness_ms"] == 12.5 and body["staleness_ms"] is None and body["items"] == 50


def test_metrics_count_requests_events_and_the_index(server):
    call(server.url, "GET", "/recommend?user_id=u1&k=4")
    call(server.url, "GET", "/recommend?user_id=u1&k=0")
    call(server.url, "POST", "/actions", json.dumps([act(0), act(1)]))
    call(server.url, "POST", "/actions", json.dumps([act(0), {}]))
    wait_for(lambda: "freshrec_serve_feature_events_written_total 4.0" in call(server.url, "GET", "/metrics")[2],
             what="feature events counted")
    status, headers, text = call(server.url, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for line in ('freshrec_serve_requests_total{endpoint="/recommend",status="200"} 1.0',
                 'freshrec_serve_requests_total{endpoint="/recommend",status="400"} 1.0',
                 'freshrec_serve_requests_total{endpoint="/actions",status="202"} 1.0',
                 "freshrec_serve_actions_accepted_total 2.0",
                 'freshrec_serve_actions_rejected_total{reason="invalid"} 2.0',
                 "freshrec_serve_feature_events_failed_total 0.0",
                 "freshrec_serve_index_items 50.0",
                 "freshrec_serve_params_version 3.0",
                 'freshrec_serve_request_latency_seconds_count{endpoint="/recommend"} 2.0'):
        assert line in text, line


def test_unknown_paths_are_404_and_wrong_methods_405_as_json(server):
    status, headers, body = call(server.url, "GET", "/nope")
    assert status == 404 and headers["content-type"].startswith("application/json") and body["error"]
    status, headers, body = call(server.url, "DELETE", "/recommend")
    assert status == 405 and body["error"] and "GET" in headers["allow"]
    status, headers, body = call(server.url, "GET", "/actions")
    assert status == 405 and "POST" in headers["allow"]


def test_openapi_document_is_served(server):
    status, _, body = call(server.url, "GET", "/openapi.json")
    assert status == 200 and body["openapi"].startswith("3.")
    assert set(body["paths"]) == {"/recommend", "/actions", "/healthz", "/metrics", "/openapi.json"}


def test_the_recommender_is_refreshed_in_the_background(server):
    wait_for(lambda: server.recommender.refreshes >= 3, what="refreshes")


def test_a_slow_client_does_not_block_others(server, config):
    u = urlsplit(server.url)
    body = json.dumps(act(7)).encode()
    with socket.create_connection((u.hostname, u.port), timeout=30) as slow:
        slow.sendall(b"POST /actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        # While the slow body is still incomplete, others are answered.
        assert call(server.url, "GET", "/healthz")[0] == 200
        assert call(server.url, "GET", "/recommend?user_id=u2&k=2")[0] == 200
        slow.sendall(body[10:])
        reply = slow.recv(65536)
    assert reply.startswith(b"HTTP/1.1 202")
    assert [e.request_id for e in lines(config, "actions")] == ["r7"]


def test_closing_the_server_flushes_and_closes_its_logs(config):
    actions = FileEventLog(config.stream_dir("actions"), "t")
    with running_server(ListRecommender(), config, actions_log=actions) as s:
        assert call(s.url, "POST", "/actions", json.dumps(act(0)))[0] == 202
        path = actions.path
    assert actions.path is None and path.read_bytes().count(b"\n") == 1


# --- Kafka -------------------------------------------------------------------------------------

@pytest.mark.kafka
def test_actions_and_feature_events_land_on_their_topics(tmp_path, kafka_bootstrap):
    from flows.kafka_local import create_topics
    from tests.kafka_support import read_topic

    prefix = f"t{uuid.uuid4().hex[:8]}-"
    create_topics(kafka_bootstrap, {prefix + "actions": 1, prefix + "features": 1})
    config = config_for(tmp_path, source="kafka", brokers=kafka_bootstrap, topic_prefix=prefix)
    with running_server(ListRecommender(), config) as s:
        status, _, rec = call(s.url, "GET", "/recommend?user_id=u1&k=4")
        assert status == 200
        assert call(s.url, "POST", "/actions", json.dumps([act(1), act(2)]))[2] == {"accepted": 2}
        wait_for(lambda: "freshrec_serve_feature_events_written_total 4.0" in call(s.url, "GET", "/metrics")[2],
                 what="feature events delivered")
    actions = read_topic(kafka_bootstrap, prefix + "actions")  # 202 means delivered: no waiting
    assert [(m.key(), parse("actions", m.value(), time.time()).item_id) for m in actions] == [(b"r1", "v1"), (b"r2", "v2")]
    features = read_topic(kafka_bootstrap, prefix + "features")
    parsed = [parse("features", m.value(), time.time()) for m in features]
    assert all(m.key() == rec["request_id"].encode() for m in features)
    assert [(e.item_id, e.position) for e in parsed] == [(i["item_id"], n) for n, i in enumerate(rec["items"])]


@pytest.mark.parametrize("server", [0, 2], indirect=True, ids=["on-the-event-loop", "two-threads"])
def test_a_failing_recommender_is_a_500_and_the_server_goes_on(server, config):
    real = server.recommender.recommend

    def broken(user_id, k):
        if user_id == "boom":
            raise RuntimeError("the index broke")
        return real(user_id, k)

    server.recommender.recommend = broken
    status, _, body = call(server.url, "GET", "/recommend?user_id=boom&k=3")
    assert status == 500 and body == {"error": "internal error"}
    status, _, body = call(server.url, "GET", "/recommend?user_id=u1&k=3")
    assert status == 200 and len(body["items"]) == 3


def test_serve_threads_is_checked_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match="FRESHREC_SERVE_THREADS"):
        Config.from_env({"FRESHREC_SERVE_THREADS": "-1", "FRESHREC_DATA_DIR": str(tmp_path)})
    assert Config.from_env({"FRESHREC_DATA_DIR": str(tmp_path)}).serve_threads == 0
