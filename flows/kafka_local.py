"""A real single-node Apache Kafka broker (KRaft, bound to 127.0.0.1) for machines without Docker:
Kafka's own jars, fetched once from Maven Central by docker/kafka-local/pom.xml, plus the contract's
topics. Driven by `freshrec kafka start|stop|status`, `python -m flows.kafka_local`, or `LocalKafka`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_PORT",
    "KafkaLocalError",
    "KafkaStatus",
    "LocalKafka",
    "contract_topics",
    "create_topics",
    "free_port_pair",
    "kafka_version",
    "main",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
POM = REPO_ROOT / "docker" / "kafka-local" / "pom.xml"
HOST = "127.0.0.1"
DEFAULT_PORT = 9092
# Input and output streams get 2 partitions by default: one per core of the team's machines, so
# `-w 2` has work for both workers. param-deltas and dead-letter get 1: a replica then replays
# parameter deltas in the one order they were written, and dead letters are low-volume.
DEFAULT_TOPIC_PARTITIONS = 2
SINGLE_PARTITION_TOPICS = ("param-deltas", "dead-letter")
PARTITIONED_TOPICS = ("features", "actions", "items", "examples")
COMPACTED_TOPICS = ("param-deltas",)
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
PORT_WAIT_S = 5.0
EXIT_NOT_RUNNING = 3

_SASL_WORD = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Popen handles of brokers this process started: polling them reaps the child, so an in-process
# caller (a test) never sees its stopped broker linger as a zombie that still answers kill(pid, 0).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class KafkaLocalError(RuntimeError):
    """The local broker could not be fetched, started or stopped; the message says why."""


@dataclass(frozen=True)
class KafkaStatus:
    running: bool
    pid: int | None
    bootstrap: str
    data_dir: Path


def kafka_version() -> str:
    """The Kafka release pinned in docker/kafka-local/pom.xml (the one source of that number)."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    try:
        root = ET.parse(POM).getroot()
    except (OSError, ET.ParseError) as exc:
        raise KafkaLocalError(f"cannot read {POM} (the local broker runs from a source checkout): {exc}") from exc
    version = root.findtext("m:properties/m:kafka.version", namespaces=ns)
    if not version:
        raise KafkaLocalError(f"{POM} has no <kafka.version> property")
    return version.strip()


def default_home() -> Path:
    env = os.environ.get("FRESHREC_KAFKA_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "freshrec" / f"kafka-{kafka_version()}"


def default_port() -> int:
    env = os.environ.get("FRESHREC_KAFKA_PORT")
    if not env:
        return DEFAULT_PORT
    try:
        return _check_port(int(env))
    except ValueError:
        raise KafkaLocalError(f"FRESHREC_KAFKA_PORT={env!r} is not a port number (1-65534)") from None


def _check_port(port: int) -> int:
    # 65534, not 65535: the controller listens on port + 1.
    if not 1 <= port <= 65534:
        raise ValueError(f"port {port} is out of range 1-65534")
    return port


def contract_topics(partitions: int = DEFAULT_TOPIC_PARTITIONS) -> dict[str, int]:
    """The contract's topics with their partition counts (param-deltas is also compacted)."""
    topics = {name: partitions for name in PARTITIONED_TOPICS}
    topics.update({name: 1 for name in SINGLE_PARTITION_TOPICS})
    return topics


def create_contract_topics(bootstrap: str, prefix: str = "", partitions: int = DEFAULT_TOPIC_PARTITIONS) -> list[str]:
    """The contract's topics under `prefix` (FRESHREC_TOPIC_PREFIX), as `create_topics` makes them."""
    return create_topics(bootstrap, {prefix + name: n for name, n in contract_topics(partitions).items()},
                         compacted=[prefix + name for name in COMPACTED_TOPICS])


def create_topics(
    bootstrap: str,
    partitions_by_topic: Mapping[str, int],
    *,
    compacted: Iterable[str] = (),
    timeout: float = 30.0,
) -> list[str]:
    """Creates topics with LogAppendTime timestamps (the contract's); returns those that were new.

    A topic that already exists is left as it is, so this is safe to repeat.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    compact = set(compacted)
    new_topics = []
    for name, partitions in partitions_by_topic.items():
        config = {"message.timestamp.type": "LogAppendTime"}
        if name in compact:
            config["cleanup.policy"] = "compact"
        new_topics.append(NewTopic(name, num_partitions=partitions, replication_factor=1, config=config))
    if not new_topics:
        return []
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(new_topics, operation_timeout=timeout, request_timeout=timeout)
    created = []
    for name, future in futures.items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise KafkaLocalError(f"cannot create topic {name!r}: {err.str()}") from exc
    # The controller acknowledges a topic before the broker's metadata has it: wait until every
    # partition has a leader, or a describe or produce right after would get UNKNOWN_TOPIC.
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        pending = [
            name
            for name in partitions_by_topic
            if name not in topics
            or not topics[name].partitions
            or any(p.leader < 0 for p in topics[name].partitions.values())
        ]
        if not pending:
            return created
        if time.monotonic() > deadline:
            raise KafkaLocalError(f"topics {pending} have no leader after {timeout:.0f} s")
        time.sleep(0.1)


def _ephemeral_low() -> int:
    """The lowest port of the kernel's range for outgoing connections (32768 where unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_pair() -> int:
    """A port p such that p and p + 1 (the controller's) are both free on 127.0.0.1 right now,
    below the ephemeral range where it can: a broker restarted on its ports could otherwise find
    one taken as the local port of some client's outgoing connection."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    if low > 10_002:
        for _ in range(200):
            port = rng.randrange(10_000, low - 1)
            if _port_free(port) and _port_free(port + 1):
                return port
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port < 65535 and _port_free(port) and _port_free(port + 1):
            return port
    raise KafkaLocalError("found no two adjacent free ports on 127.0.0.1")


def _port_free(port: int) -> bool:
    # SO_REUSEADDR as Java's server sockets use it: TIME_WAIT leftovers of a stopped broker do not
    # count as "in use", a listener does.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _port_answers(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 20, width: int = 400) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(line[:width] for line in text.splitlines()[-lines:])


# The broker's code compiled by the JVM's first-tier compiler only. Its optimising compiler took
# about a fifth of a core through a test or benchmark's first minutes (C2's thread, 0.22 of a core
# in the middle of `serve.rate_held.kafka`), on the 2-core machines where the local broker runs
# beside the flow and the simulator. Measured on one: the broker's CPU time to ready 0.6x (3.6 s
# against 5.3-6.7 s), idle afterwards 0.64x, during that benchmark 0.63x (0.21 of a core against
# 0.33); start-up as fast (4.6 s).
JIT_OPTIONS = ("-XX:TieredStopAtLevel=1",)


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    java = str(candidate) if candidate and candidate.is_file() else shutil.which("java")
    if not java:
        raise KafkaLocalError("java not found: the local Kafka broker needs Java 17 or newer on PATH (or JAVA_HOME)")
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match:
        major = int(match.group(1))
        if major == 1 and match.group(2):  # "1.8.0_x" style
            major = int(match.group(2))
        if major < 17:
            raise KafkaLocalError(
                f"{java} is Java {major}; Kafka {kafka_version()} needs Java 17 or newer (set JAVA_HOME to one)"
            )
    return java


class LocalKafka:
    """One broker+controller node: its jars under `home`, its data and pid under `data_dir`."""

    def __init__(
        self,
        port: int | None = None,
        *,
        controller_port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        home: str | os.PathLike[str] | None = None,
        num_partitions: int = 1,
        topic_partitions: int = DEFAULT_TOPIC_PARTITIONS,
        sasl_users: Mapping[str, str] | None = None,
        sasl_port: int | None = None,
        tls_keystore: str | os.PathLike[str] | None = None,
        tls_password: str | None = None,
        tls_port: int | None = None,
    ) -> None:
        self.port = _check_port(port) if port is not None else default_port()
        # SASL/PLAIN on a listener of its own (SASL_PLAINTEXT), beside the PLAINTEXT one that the
        # broker's own tools and readiness checks use: for testing clients' credentials.
        self.sasl_users = dict(sasl_users or {})
        for name, secret in self.sasl_users.items():
            if not (_SASL_WORD.fullmatch(name) and _SASL_WORD.fullmatch(secret)):
                raise KafkaLocalError(f"SASL user {name!r}: names and passwords take letters, digits, '_' and '-'")
        self.sasl_port = (sasl_port if sasl_port is not None else self.port + 2) if self.sasl_users else None
        # TLS on a listener of its own (SSL), its certificate and key in a PKCS12 keystore.
        self.tls_keystore = Path(tls_keystore).resolve() if tls_keystore is not None else None
        self.tls_password = tls_password
        if self.tls_keystore is not None and not (tls_password and _SASL_WORD.fullmatch(tls_password)):
            raise KafkaLocalError("a TLS keystore needs its password (letters, digits, '_' and '-')")
        self.tls_port = (tls_port if tls_port is not None else self.port + 3) if self.tls_keystore else None
        self.controller_port = controller_port if controller_port is not None else self.port + 1
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.data_dir = (
            Path(data_dir).expanduser() if data_dir is not None else self.home / f"data-{self.port}"
        ).resolve()
        self.num_partitions = num_partitions
        self.topic_partitions = topic_partitions

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def sasl_bootstrap(self) -> str | None:
        """The SASL_PLAINTEXT listener (mechanism PLAIN), when the broker has SASL users."""
        return f"{HOST}:{self.sasl_port}" if self.sasl_port is not None else None

    @property
    def tls_bootstrap(self) -> str | None:
        """The SSL listener, when the broker has a TLS keystore."""
        return f"{HOST}:{self.tls_port}" if self.tls_port is not None else None

    @property
    def libs_dir(self) -> Path:
        return self.home / "libs"

    @property
    def _pid_file(self) -> Path:
        return self.data_dir / "kafka.pid"

    @property
    def _out_file(self) -> Path:
        return self.data_dir / "kafka.out"

    @property
    def _server_log(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    @property
    def _properties(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def _log_dirs(self) -> Path:
        return self.data_dir / "kraft-logs"

    @property
    def _identity_file(self) -> Path:
        return self.data_dir / "cluster.json"

    # -- jars --------------------------------------------------------------------------------

    def ensure_jars(self) -> Path:
        """Fetches Kafka's jars into `libs_dir` unless they are there already; returns it."""
        done = self.libs_dir / ".complete"
        version = kafka_version()

        def cached() -> bool:
            # The marker holds the version: a $FRESHREC_KAFKA_HOME kept across a version bump refetches.
            return done.exists() and done.read_text().strip() == version

        if cached():
            return self.libs_dir
        self.home.mkdir(parents=True, exist_ok=True)
        with _locked(self.home / ".fetch.lock"):
            if cached():  # another process fetched them while we waited
                return self.libs_dir
            mvn = shutil.which("mvn")
            if not mvn:
                raise KafkaLocalError(
                    f"mvn not found: Maven is needed once to fetch Kafka {version}'s jars "
                    f"from Maven Central into {self.libs_dir}"
                )
            # Fetched beside, then renamed: an interrupted download never passes for a cache.
            partial = self.home / "libs.partial"
            shutil.rmtree(partial, ignore_errors=True)
            print(f"fetching Kafka {version} jars into {self.libs_dir} ...", file=sys.stderr)
            proc = subprocess.run(
                [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={partial}"],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0 or not any(partial.glob("kafka_2.13-*.jar")):
                output = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
                raise KafkaLocalError(f"mvn could not fetch Kafka's jars (exit {proc.returncode}):\n{output}")
            (partial / ".complete").write_text(version + "\n")
            shutil.rmtree(self.libs_dir, ignore_errors=True)
            partial.rename(self.libs_dir)
        return self.libs_dir

    # -- process -----------------------------------------------------------------------------

    def _read_pid(self) -> int | None:
        try:
            return int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _alive(self, pid: int) -> bool:
        child = _CHILDREN.get(pid)
        if child is not None:
            if child.poll() is None:
                return True
            del _CHILDREN[pid]
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        proc = Path(f"/proc/{pid}")
        if not proc.exists():  # no procfs (macOS): kill(pid, 0) is all we can know
            return True
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
        # The pid must still be our broker, not a process that reused the number.
        return b"kafka.Kafka" in cmdline and str(self._properties).encode() in cmdline

    def _running_pid(self) -> int | None:
        pid = self._read_pid()
        return pid if pid is not None and self._alive(pid) else None

    def _configured_port(self) -> int | None:
        """The port in the data dir's server.properties: the running broker's, if one runs."""
        try:
            text = self._properties.read_text()
        except OSError:
            return None
        match = re.search(r"^advertised\.listeners=PLAINTEXT://[^:]+:(\d+)", text, re.MULTILINE)
        return int(match.group(1)) if match else None

    def status(self) -> KafkaStatus:
        pid = self._running_pid()
        port = (self._configured_port() if pid is not None else None) or self.port
        return KafkaStatus(pid is not None, pid, f"{HOST}:{port}", self.data_dir)

    def is_running(self) -> bool:
        return self._running_pid() is not None

    def start(self, *, fresh: bool = False, topics: bool = True, timeout: float = START_TIMEOUT_S) -> str:
        """Starts the broker (a no-op if it runs), creates the contract's topics; returns bootstrap."""
        if fresh:
            self.stop()
            shutil.rmtree(self.data_dir, ignore_errors=True)
        if self.is_running():
            running_port = self._configured_port()
            if running_port != self.port:
                raise KafkaLocalError(
                    f"the broker of {self.data_dir} already runs on port {running_port}, "
                    f"not {self.port}: stop it first, or use another --data-dir"
                )
            self._wait_ready(None, timeout)
        else:
            self._launch(timeout)
        if topics:
            create_contract_topics(self.bootstrap, partitions=self.topic_partitions)
        return self.bootstrap

    def _launch(self, timeout: float) -> None:
        java = _java()
        ports = [(self.port, "broker"), (self.controller_port, "controller")]
        if self.sasl_port is not None:
            ports.append((self.sasl_port, "SASL listener"))
        if self.tls_port is not None:
            ports.append((self.tls_port, "TLS listener"))
        for port, role in ports:
            # A moment's wait: the ports are in the ephemeral range, and after a stop a client's
            # reconnect attempt may hold one as its local port for an instant.
            deadline = time.monotonic() + PORT_WAIT_S
            while not _port_free(port) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _port_free(port):
                raise KafkaLocalError(
                    f"port {port} on {HOST} (the {role}'s) is in use: another Kafka? "
                    "Stop it or choose another --port (or FRESHREC_KAFKA_PORT)"
                )
        libs = self.ensure_jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        classpath = ["-cp", str(libs / "*")]
        logging = [
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self._server_log.parent}",
        ]
        self._format(java, classpath, logging)
        cmd = [
            java,
            "-Xmx512m",
            "-Xms128m",
            *JIT_OPTIONS,
            "-Djava.awt.headless=true",
            *logging,
            *classpath,
            "kafka.Kafka",
            str(self._properties),
        ]
        with open(self._out_file, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,  # outlives the shell and Ctrl-C
            )
        _CHILDREN[proc.pid] = proc
        self._pid_file.write_text(f"{proc.pid}\n")
        try:
            self._wait_ready(proc.pid, timeout)
        except BaseException:
            self.stop()
            raise

    def _write_config(self) -> None:
        self._server_log.parent.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            # A dynamic quorum, what `format --standalone` expects, with this node its one voter.
            "controller.quorum.bootstrap.servers": f"{HOST}:{self.controller_port}",
            "log.dirs": str(self._log_dirs),
            "num.partitions": str(self.num_partitions),
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            # One partition instead of 50: a consumer group's first join is seconds faster.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # The cleaner's default 128 MiB buffer would take a quarter of the 512 MiB heap.
            "log.cleaner.dedupe.buffer.size": str(32 * 1024 * 1024),
        }
        if self.sasl_users:
            users = " ".join(f'user_{name}="{secret}"' for name, secret in self.sasl_users.items())
            props.update({
                "listeners": props["listeners"] + f",SASL_PLAINTEXT://{HOST}:{self.sasl_port}",
                "advertised.listeners": props["advertised.listeners"] + f",SASL_PLAINTEXT://{HOST}:{self.sasl_port}",
                "listener.security.protocol.map": props["listener.security.protocol.map"]
                + ",SASL_PLAINTEXT:SASL_PLAINTEXT",
                "sasl.enabled.mechanisms": "PLAIN",
                "listener.name.sasl_plaintext.sasl.enabled.mechanisms": "PLAIN",
                # The listener's server side: the users it accepts (user_<name>="<password>").
                "listener.name.sasl_plaintext.plain.sasl.jaas.config":
                    f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};",
            })
        if self.tls_keystore is not None:
            props.update({
                "listeners": props["listeners"] + f",SSL://{HOST}:{self.tls_port}",
                "advertised.listeners": props["advertised.listeners"] + f",SSL://{HOST}:{self.tls_port}",
                "listener.security.protocol.map": props["listener.security.protocol.map"] + ",SSL:SSL",
                "listener.name.ssl.ssl.keystore.type": "PKCS12",
                "listener.name.ssl.ssl.keystore.location": str(self.tls_keystore),
                "listener.name.ssl.ssl.keystore.password": str(self.tls_password),
                "listener.name.ssl.ssl.key.password": str(self.tls_password),
            })
        self._properties.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        log = self._server_log
        (self.data_dir / "log4j2.properties").write_text(
            "status = warn\n"
            "appender.file.type = RollingFile\n"
            "appender.file.name = file\n"
            f"appender.file.fileName = {log}\n"
            f"appender.file.filePattern = {log}.%i\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "appender.file.policies.type = Policies\n"
            "appender.file.policies.size.type = SizeBasedTriggeringPolicy\n"
            "appender.file.policies.size.size = 50MB\n"
            "appender.file.strategy.type = DefaultRolloverStrategy\n"
            "appender.file.strategy.max = 3\n"
            # Warnings and errors also reach kafka.out, whose tail a failed start shows.
            "appender.console.type = Console\n"
            "appender.console.name = console\n"
            "appender.console.layout.type = PatternLayout\n"
            "appender.console.layout.pattern = [%d] %p %m (%c)%n\n"
            "appender.console.filter.threshold.type = ThresholdFilter\n"
            "appender.console.filter.threshold.level = warn\n"
            "rootLogger.level = info\n"
            "rootLogger.appenderRef.file.ref = file\n"
            "rootLogger.appenderRef.console.ref = console\n"
        )

    def _format(self, java: str, classpath: list[str], logging: list[str]) -> None:
        identity = {}
        if self._identity_file.exists():
            identity = json.loads(self._identity_file.read_text())
        if (self._log_dirs / "meta.properties").exists():
            # The voter's address is written into the log at format time: a broker moved to
            # another controller port would wait for a voter that never answers.
            formatted_for = identity.get("controller_port")
            if formatted_for not in (None, self.controller_port):
                raise KafkaLocalError(
                    f"{self.data_dir} was formatted for controller port {formatted_for}, not "
                    f"{self.controller_port}: use the port it was made with, or --fresh to wipe it"
                )
            return
        cluster_id = identity.get("cluster_id") or _new_cluster_id()
        self._identity_file.write_text(
            json.dumps({"cluster_id": cluster_id, "controller_port": self.controller_port}) + "\n"
        )
        proc = subprocess.run(
            [
                java,
                *JIT_OPTIONS,
                *logging,
                *classpath,
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                f"--cluster-id={cluster_id}",
                f"--config={self._properties}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            raise KafkaLocalError(
                f"formatting {self._log_dirs} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )

    def _wait_ready(self, pid: int | None, timeout: float) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        admin = None
        while True:
            if pid is not None and not self._alive(pid):
                self._pid_file.unlink(missing_ok=True)
                raise KafkaLocalError(
                    f"the Kafka broker exited during start-up; the end of {self._out_file}:\n"
                    f"{_tail(self._out_file)}\n(full log: {self._server_log})"
                )
            # Wait for the listener first: librdkafka logs every refused connection to stderr.
            if _port_answers(self.port):
                admin = admin or AdminClient({"bootstrap.servers": self.bootstrap})
                try:
                    if admin.list_topics(timeout=2).brokers:
                        return
                except KafkaException:
                    pass
            if time.monotonic() > deadline:
                raise KafkaLocalError(
                    f"the Kafka broker did not answer on {self.bootstrap} within {timeout:.0f} s; "
                    f"the end of {self._server_log}:\n{_tail(self._server_log)}"
                )
            time.sleep(0.25)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Stops the broker (SIGTERM, then SIGKILL after `timeout`); False if it was not running."""
        pid = self._running_pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not self._wait_exit(pid, 10.0):
                raise KafkaLocalError(f"the Kafka broker (pid {pid}) survived SIGKILL")
        self._pid_file.unlink(missing_ok=True)
        return True

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


def _new_cluster_id() -> str:
    # What `kafka-storage.sh random-uuid` prints: a random UUID, base64url without padding, and
    # like Kafka's Uuid.randomUuid never starting with "-", which a command line reads as a flag.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _port_arg(text: str) -> int:
    try:
        return _check_port(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65534)") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--port",
        type=_port_arg,
        default=None,
        help=f"broker port on {HOST} (default: $FRESHREC_KAFKA_PORT or {DEFAULT_PORT}); "
        "the controller listens on port + 1",
    )
    common.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="broker data, logs and pid file (default: <cache>/data-<port>; cache is "
        "$FRESHREC_KAFKA_HOME or ~/.cache/freshrec/kafka-<version>)",
    )
    parser = argparse.ArgumentParser(
        prog="freshrec kafka",
        description="A local single-node Apache Kafka broker (KRaft, 127.0.0.1 only), "
        "run from Kafka's own jars without Docker.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{start,stop,status}")
    start = commands.add_parser("start", parents=[common], help="start the broker and create the contract's topics")
    start.add_argument("--fresh", action="store_true", help="wipe the data dir first")
    start.add_argument(
        "--partitions",
        type=_positive_int,
        default=DEFAULT_TOPIC_PARTITIONS,
        help="partitions of features, actions, items and examples (default: %(default)s; "
        "param-deltas and dead-letter get 1)",
    )
    start.add_argument(
        "--num-partitions",
        type=_positive_int,
        default=1,
        help="the broker's num.partitions for other topics (default: %(default)s)",
    )
    start.add_argument(
        "--timeout",
        type=float,
        default=START_TIMEOUT_S,
        help="seconds to wait for the broker to answer (default: %(default)s)",
    )
    commands.add_parser("stop", parents=[common], help="stop the broker")
    commands.add_parser("status", parents=[common], help="say whether it runs (exit 0) or not (exit 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`freshrec kafka start|stop|status`: 0 on success (status: running), 3 if stopped, 1 on error."""
    args = _parser().parse_args(argv)
    try:
        kafka = LocalKafka(
            args.port,
            data_dir=args.data_dir,
            topic_partitions=getattr(args, "partitions", DEFAULT_TOPIC_PARTITIONS),
            num_partitions=getattr(args, "num_partitions", 1),
        )
        if args.command == "start":
            was_running = kafka.is_running()
            bootstrap = kafka.start(fresh=args.fresh, timeout=args.timeout)
            note = "already running" if was_running and not args.fresh else "started"
            print(f"Kafka {kafka_version()} {note} (data: {kafka.data_dir})", file=sys.stderr)
            print(bootstrap)
            return 0
        if args.command == "stop":
            stopped = kafka.stop()
            print("stopped" if stopped else "not running")
            return 0
        status = kafka.status()
        if status.running:
            print(f"running pid={status.pid} bootstrap={status.bootstrap} data={status.data_dir}")
            return 0
        print(f"stopped bootstrap={status.bootstrap} data={status.data_dir}")
        return EXIT_NOT_RUNNING
    except KafkaLocalError as exc:
        print(f"freshrec kafka: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
