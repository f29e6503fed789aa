"""Security: Kafka SASL and TLS settings reach every Kafka client freshrec makes; wrong credentials
stop a start with an error naming the setting; nothing unpickles or evaluates outside data; every
server binds 127.0.0.1 unless told otherwise.

The SASL tests run a local broker of their own with a SASL_PLAINTEXT listener (mechanism PLAIN)
beside its PLAINTEXT one; the clients under test are pointed at the SASL listener only.
"""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from flows import kafka_local
from flows.config import Config, ConfigError
from flows.kafka_client import check_broker
from flows.processes import config_env
from tests.helpers import action, config_for, feature
from tests.kafka_support import started

ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "freshrec", "s3cret-pw"
T0 = 1764288000.0


def sasl(user: str = USER, password: str = PASSWORD) -> str:
    return json.dumps({"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
                       "sasl.username": user, "sasl.password": password})


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory):
    broker = kafka_local.LocalKafka(kafka_local.free_port_pair(), data_dir=tmp_path_factory.mktemp("kafka-sasl"),
                                    sasl_users={USER: PASSWORD, "admin": "admin-pw"},
                                    sasl_port=kafka_local.free_port_pair())
    with started(broker, "the local broker with SASL"):
        yield broker


def count(bootstrap: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "t"})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts)
    finally:
        c.close()


# --- SASL/PLAIN against a real broker ----------------------------------------------------------

@pytest.mark.kafka
@pytest.mark.slow
def test_every_kafka_client_authenticates_with_sasl_plain(tmp_path, sasl_broker):
    from bytewax.testing import TestingSink, run_main

    from flows.eventlog import open_event_log
    from flows.lag import KAFKA_LAG
    from flows.outputs import open_output
    from flows.pipeline import build_flow
    from paramserver.replica import ParamDeltaReplica
    from paramserver.serving import LmdbServingStore

    prefix = f"sec{uuid.uuid4().hex[:6]}."
    kafka_local.create_contract_topics(sasl_broker.bootstrap, prefix)
    config = config_for(tmp_path, source="kafka", brokers=sasl_broker.sasl_bootstrap, topic_prefix=prefix,
                        kafka_config=sasl(), train=1, buckets=2)
    # The simulator's and replay's producer.
    out = open_output(config, "t")
    out.write("features", [feature(i, T0 + i) for i in range(40)])
    out.write("actions", [action(i, T0 + i + 1) for i in range(0, 40, 4)])
    out.close()
    # The model server's event logs.

    async def log_some():
        log = open_event_log("actions", config)
        try:
            await log.append([("r1000", json.dumps({"request_id": "r1000", "user_id": "u", "item_id": "v",
                                                    "ts": T0 + 1, "action": "like"}).encode())])
        finally:
            await log.close()

    asyncio.run(log_some())
    # The flow: its sources (partition listing, bounds, consumers), lag monitor, sinks, and the
    # trainer's param-deltas producer.
    examples = []
    run_main(build_flow(config, tap=TestingSink(examples)))
    assert len({(e.request_id, e.item_id) for e in examples}) == 40
    assert count(sasl_broker.bootstrap, prefix + "examples") == 40
    assert count(sasl_broker.bootstrap, prefix + "dead-letter") == 1  # r1000's action: an orphan
    assert count(sasl_broker.bootstrap, prefix + "param-deltas") > 0
    lags = [s for m in KAFKA_LAG.collect() for s in m.samples if s.labels["topic"].startswith(prefix)]
    assert lags, "the lag monitor read no high watermark"
    # A serving replica's consumer.
    store = LmdbServingStore(tmp_path / "replica", writer=True, name="replica")
    try:
        with ParamDeltaReplica(store, config.brokers, config.topic("param-deltas"),
                               consumer_config=config.kafka_settings()) as replica:
            assert replica.bootstrap(timeout_s=60) > 0
    finally:
        store.close()


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.parametrize("kafka_config, why", [
    (sasl(password="wrong"), "Invalid username or password"),
    (sasl(user="mallory"), "Invalid username or password"),
    ("{}", "does its listener expect SASL or TLS"),
])
def test_a_flow_with_wrong_credentials_stops_naming_the_setting(tmp_path, sasl_broker, kafka_config, why):
    prefix = f"sec{uuid.uuid4().hex[:6]}."
    kafka_local.create_contract_topics(sasl_broker.bootstrap, prefix)
    config = config_for(tmp_path, source="kafka", brokers=sasl_broker.sasl_bootstrap, topic_prefix=prefix,
                        kafka_config=kafka_config, metrics_port="off")
    env = config_env(config)
    r = subprocess.run([sys.executable, "-m", "bytewax.run", "flows.pipeline:flow"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode != 0, r.stderr[-2000:]
    assert "freshrec: configuration error: FRESHREC_KAFKA_CONFIG: the broker at" in r.stderr, r.stderr[-2000:]
    assert why in r.stderr


@pytest.mark.kafka
@pytest.mark.slow
def test_the_model_server_and_a_replica_refuse_wrong_credentials_but_the_server_starts_without_kafka(
        tmp_path, sasl_broker):
    with pytest.raises(ConfigError, match="FRESHREC_KAFKA_CONFIG: the broker .* refused"):
        check_broker(sasl_broker.sasl_bootstrap, json.loads(sasl(password="nope")), timeout_s=20,
                     unreachable_ok=True)
    assert check_broker(sasl_broker.sasl_bootstrap, json.loads(sasl()), timeout_s=20)
    nobody = f"127.0.0.1:{kafka_local.free_port_pair()}"
    assert check_broker(nobody, {}, timeout_s=1, unreachable_ok=True) is False
    with pytest.raises(ConfigError, match="FRESHREC_BROKERS=.*no broker answered"):
        check_broker(nobody, {}, timeout_s=1)
    r = subprocess.run([sys.executable, "-m", "flows.cli", "replica", "--once", "--store", str(tmp_path / "r")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=180,
                       env={**config_env(config_for(tmp_path, source="kafka", brokers=sasl_broker.sasl_bootstrap,
                                                    kafka_config=sasl(password="nope")))})
    assert r.returncode != 0
    assert "FRESHREC_KAFKA_CONFIG" in r.stderr, r.stderr[-2000:]


# --- TLS against a real broker (a keystore made with Java's keytool) ---------------------------

STORE_PASSWORD = "store-pw-1"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    import shutil

    keytool = shutil.which("keytool")
    if keytool is None:
        pytest.skip("no keytool (Java's) to make the broker's keystore")
    d = tmp_path_factory.mktemp("kafka-tls")
    store, ca = d / "broker.p12", d / "ca.pem"
    for args in (["-genkeypair", "-alias", "broker", "-keyalg", "RSA", "-keysize", "2048", "-validity", "2",
                  "-dname", "CN=127.0.0.1", "-ext", "SAN=IP:127.0.0.1"],
                 ["-exportcert", "-rfc", "-alias", "broker", "-file", str(ca)]):
        subprocess.run([keytool, *args, "-keystore", str(store), "-storetype", "PKCS12", "-storepass", STORE_PASSWORD,
                        *(["-keypass", STORE_PASSWORD] if args[0] == "-genkeypair" else [])],
                       check=True, capture_output=True, timeout=120)
    broker = kafka_local.LocalKafka(kafka_local.free_port_pair(), data_dir=d / "kafka", tls_keystore=store,
                                    tls_password=STORE_PASSWORD, tls_port=kafka_local.free_port_pair())
    with started(broker, "the local broker with TLS"):
        yield broker, ca


@pytest.mark.kafka
@pytest.mark.slow
def test_a_flow_over_tls_runs_with_the_brokers_ca_and_stops_naming_the_setting_without(tmp_path, tls_broker):
    from bytewax.testing import TestingSink, run_main

    from flows.outputs import open_output
    from flows.pipeline import build_flow

    broker, ca = tls_broker
    prefix = f"tls{uuid.uuid4().hex[:6]}."
    kafka_local.create_contract_topics(broker.bootstrap, prefix)
    tls = json.dumps({"security.protocol": "SSL", "ssl.ca.location": str(ca)})
    config = config_for(tmp_path / "ok", source="kafka", brokers=broker.tls_bootstrap, topic_prefix=prefix,
                        kafka_config=tls, buckets=2)
    out = open_output(config, "t")
    out.write("features", [feature(i, T0 + i) for i in range(30)])
    out.write("actions", [action(i, T0 + i + 1) for i in range(0, 30, 3)])
    out.close()
    examples = []
    run_main(build_flow(config, tap=TestingSink(examples)))
    assert len({(e.request_id, e.item_id) for e in examples}) == 30
    assert count(broker.bootstrap, prefix + "examples") == 30
    # A CA that did not sign the broker's certificate; plaintext on the TLS listener.
    _, other_ca = self_signed(tmp_path)
    for kafka_config, why in ((json.dumps({"security.protocol": "SSL", "ssl.ca.location": str(other_ca)}),
                               "certificate verify failed"),
                              ("{}", "does its listener expect SASL or TLS")):
        bad = config_for(tmp_path / "bad", source="kafka", brokers=broker.tls_bootstrap, topic_prefix=prefix,
                         kafka_config=kafka_config, metrics_port="off")
        r = subprocess.run([sys.executable, "-m", "bytewax.run", "flows.pipeline:flow"], cwd=tmp_path,
                           env=config_env(bad), capture_output=True, text=True, timeout=180)
        assert r.returncode != 0, r.stderr[-2000:]
        assert "freshrec: configuration error: FRESHREC_KAFKA_CONFIG: the broker at" in r.stderr, r.stderr[-2000:]
        assert why in r.stderr, r.stderr[-2000:]


# --- settings, without a broker ----------------------------------------------------------------

@pytest.mark.parametrize("kafka_config, message", [
    ('{"security.protocol": "SASL_PLAINTEXT"}', "needs sasl.mechanism"),
    ('{"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.username": "u"}', "needs sasl.password"),
    ('{"security.protocol": "TLS"}', "security.protocol='TLS': expected one of"),
    ('{"sasl.mechanism": "PLAIN", "sasl.username": "u", "sasl.password": "p"}', "security.protocol=plaintext"),
    ('{"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "MD5", "sasl.username": "u", "sasl.password": "p"}',
     "sasl.mechanism='MD5'"),
    ('{"security.protocol": "SSL", "ssl.ca.location": "/nonexistent/ca.pem"}', "ssl.ca.location='/nonexistent/ca.pem'"),
    ('{"bootstrap.servers": "elsewhere:9092"}', "set FRESHREC_BROKERS instead"),
    ('{"group.id": "mine"}', "freshrec's own setting"),
    ('{"socket.timeout.mz": "5"}', "librdkafka refuses it"),
    ('{"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN", "sasl.username": "u", '
     '"sasl.password": "p", "socket.timeout.ms": "soon"}', "librdkafka refuses it"),
    ("not json", "not a JSON object"),
])
def test_bad_kafka_security_settings_stop_start_up_naming_the_variable(kafka_config, message):
    with pytest.raises(ConfigError, match="FRESHREC_KAFKA_CONFIG") as e:
        Config.from_env({"FRESHREC_KAFKA_CONFIG": kafka_config})
    assert message in str(e.value)


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"],
                       capture_output=True, text=True, timeout=120, check=False)
    if r.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {r.stderr[-300:]}")
    return key, cert


def test_tls_settings_are_checked_by_librdkafka_and_passed_to_every_client(tmp_path, monkeypatch):
    """TLS at the configuration level: a CA file librdkafka cannot load stops start-up; a good one
    reaches each client constructor (recorded, nothing connects)."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    key, cert = self_signed(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="FRESHREC_KAFKA_CONFIG: librdkafka refuses it"):
        Config.from_env({"FRESHREC_KAFKA_CONFIG": json.dumps({"security.protocol": "SSL",
                                                              "ssl.ca.location": str(garbage)})})
    tls = {"security.protocol": "SSL", "ssl.ca.location": str(cert), "ssl.certificate.location": str(cert),
           "ssl.key.location": str(key), "ssl.endpoint.identification.algorithm": "none"}
    config = config_for(tmp_path, source="kafka", brokers="127.0.0.1:1", kafka_config=json.dumps(tls))
    made = record_clients(monkeypatch)
    build_every_client(config)
    kinds = sorted({kind for kind, _ in made})
    assert kinds == ["AdminClient", "Consumer", "Producer"]
    assert len(made) == 9  # event log, simulator output, sink, partition listing, source, bounds, lag, deltas, replica
    for kind, conf in made:
        missing = {k: v for k, v in tls.items() if conf.get(k) != v}
        assert not missing, (kind, missing)


def record_clients(monkeypatch) -> list[tuple[str, dict]]:
    import bytewax.connectors.kafka as bytewax_kafka
    import confluent_kafka
    import confluent_kafka.admin

    made: list[tuple[str, dict]] = []

    class Fake:
        kind = ""

        def __init__(self, conf):
            made.append((self.kind, dict(conf)))

        def get_watermark_offsets(self, *a, **k):
            return 0, 0

        def list_topics(self, *a, **k):  # no broker answers
            raise confluent_kafka.KafkaException(confluent_kafka.KafkaError(confluent_kafka.KafkaError._TRANSPORT))

        def __getattr__(self, name):  # poll, produce, assign, close, ...
            return lambda *a, **k: 0

    fakes = {k: type(k, (Fake,), {"kind": k}) for k in ("Producer", "Consumer", "AdminClient")}
    for module in (confluent_kafka, confluent_kafka.admin, bytewax_kafka):
        for name, fake in fakes.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fake)
    return made


def build_every_client(config: Config) -> None:
    """One of each Kafka client freshrec makes, from `config`, as its code makes them."""
    from flows.eventlog import KafkaEventLog, open_event_log
    from flows.lag import broker_watermarks
    from flows.outputs import KafkaEventOutput
    from flows.pipeline import train_step_config
    from flows.sinks import KafkaStreamSink
    from flows.sources import KafkaStreamSource
    from paramserver.serving import KafkaDeltaProducer

    log = open_event_log("actions", config)
    assert isinstance(log, KafkaEventLog)
    log._stop.set()
    KafkaEventOutput(config)
    KafkaStreamSink("examples", config).build("s", 0, 1)
    source = KafkaStreamSource("features", config)
    with pytest.raises(confluent_kafka_exception()):
        source.inner.list_parts()  # Bytewax's admin client, made before it asks
    source.inner.build_part("s", "0-features", None)
    source.bounds(0)
    broker_watermarks(config.brokers, config.kafka_settings())([("features", 0)])
    tcfg = train_step_config(config)
    KafkaDeltaProducer(tcfg.deltas_brokers, tcfg.deltas_topic, dict(tcfg.kafka_settings))
    from paramserver.replica import ParamDeltaReplica
    from paramserver.serving import LmdbServingStore

    store = LmdbServingStore(config.state_dir / "replica", writer=True, name="replica")
    try:
        with pytest.raises(confluent_kafka_exception()):  # its consumer made, it asks for the topic
            ParamDeltaReplica(store, config.brokers, "param-deltas", consumer_config=config.kafka_settings())
    finally:
        store.close()


def confluent_kafka_exception() -> type:
    from confluent_kafka import KafkaException

    return KafkaException


# --- no pickle, eval or exec of outside data ---------------------------------------------------

UNSAFE_IMPORTS = {"pickle", "cPickle", "dill", "shelve", "marshal", "cloudpickle", "joblib"}
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}


def unsafe_uses(root: Path) -> list[tuple[str, int, str]]:
    """(file, line, what) for each import of a pickle-like module, call of eval/exec/compile,
    `allow_pickle` not False, and yaml/pickle/marshal/torch `load(s)` under the packages of `root`."""
    found: list = []
    for path in sorted(p for d in ("flows", "model", "paramserver", "bench") for p in (root / d).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(path, node.lineno, a.name) for a in node.names if a.name.split(".")[0] in UNSAFE_IMPORTS]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_IMPORTS:
                found.append((path, node.lineno, node.module))
            elif isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if isinstance(f, ast.Name) and name in UNSAFE_CALLS:
                    found.append((path, node.lineno, name))
                # numpy's loaders unpickle object arrays only when asked to; yaml.load runs constructors.
                if any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                       for k in node.keywords):
                    found.append((path, node.lineno, "allow_pickle"))
                if isinstance(f, ast.Attribute) and name in ("load", "loads") and isinstance(f.value, ast.Name) \
                        and f.value.id in ("yaml", "pickle", "marshal", "torch"):
                    found.append((path, node.lineno, f"{f.value.id}.{name}"))
    return [(str(p.relative_to(root)), line, what) for p, line, what in found]


def test_no_module_unpickles_or_evaluates_anything():
    assert unsafe_uses(ROOT) == []


def test_ruff_forbids_pickle_eval_and_exec_outside_the_tests():
    import tomllib

    lint = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert {"S102", "S301", "S307"} <= set(lint["select"])
    for pattern, ignored in lint.get("per-file-ignores", {}).items():
        if any(code in ("S", "S1", "S10", "S102", "S3", "S30", "S301", "S307") for code in ignored):
            assert pattern.startswith("tests"), pattern


def test_the_checker_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "flows"
    bad.mkdir()
    (bad / "x.py").write_text("import pickle\nfrom marshal import loads\neval('1')\nimport numpy as np\n"
                              "np.load('f', allow_pickle=True)\nimport yaml\nyaml.load('a')\n")
    assert [what for _, _, what in unsafe_uses(tmp_path)] == ["pickle", "marshal", "eval", "allow_pickle",
                                                              "yaml.load"]


# --- servers bind 127.0.0.1 by default ----------------------------------------------------------

def test_every_server_binds_127_0_0_1_by_default(tmp_path):
    import inspect

    from flows import observe
    from flows.cli import build_parser
    from model import server
    from tests.model.serving_fakes import call

    # Defaults in code and on the command line.
    assert Config.from_env({}).metrics_host == "127.0.0.1"
    assert observe.HOST == "127.0.0.1"
    assert inspect.signature(observe.serve_metrics).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(server.serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(server.running_server).parameters["host"].default == "127.0.0.1"
    commands = build_parser()._subparsers._group_actions[0].choices
    hosts = {name: a.default for name, sub in commands.items() for a in sub._actions if "--host" in a.option_strings}
    assert {"serve", "dashboard"} <= set(hosts)
    assert set(hosts.values()) == {"127.0.0.1"}, hosts
    # What they bind, started with their defaults.
    metrics = observe.MetricsServer(0)
    try:
        assert metrics.address[0] == "127.0.0.1"
    finally:
        metrics.close()
    from tests.model.serving_fakes import ListRecommender

    with server.running_server(ListRecommender(), config_for(tmp_path)) as running:
        assert running.url.startswith("http://127.0.0.1:")
        assert call(running.url, "GET", "/healthz")[0] == 200
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "dashboard", "--port", "0", "--nice", "0"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=config_env(config_for(tmp_path)))
    try:
        line = ""
        for line in proc.stdout:
            if line.startswith("dashboard on "):
                break
        assert line.startswith("dashboard on http://127.0.0.1:"), line
    finally:
        proc.terminate()
        proc.wait(30)
