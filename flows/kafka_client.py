"""What every confluent-kafka client of freshrec is given besides its own settings, and the checks
that turn a wrong security setting into a `ConfigError` naming the variable, at start-up, instead
of a client that retries for ever (or a flow that hangs listing partitions).

`FRESHREC_KAFKA_CONFIG` (a JSON object of librdkafka settings: SASL, TLS, ...) reaches every
client through `Config.kafka_settings()`: the flow's consumers and producers, its lag monitor,
the trainer's param-deltas producer, the model server's event logs and a replica's consumer.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from flows.config import ConfigError

VAR = "FRESHREC_KAFKA_CONFIG"

# The checks' clients log their failures here, not to stderr: the ConfigError says what matters.
_QUIET = logging.getLogger("freshrec.kafka_check")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False

# A broker that comes back is found within a second, not after librdkafka's default 10 s backoff
# (measured: the flow's first new example 10.6 s after a restarted broker answered). A user's own
# value in FRESHREC_KAFKA_CONFIG wins.
CLIENT_DEFAULTS = {"reconnect.backoff.max.ms": "1000"}

# Settings freshrec decides itself: another value would break what it relies on.
OWNED = {
    "bootstrap.servers": "set FRESHREC_BROKERS instead",
    "metadata.broker.list": "set FRESHREC_BROKERS instead",
    "group.id": "the flow keeps its offsets in Bytewax's recovery state, not in a consumer group",
    "enable.auto.commit": "the flow keeps its offsets in Bytewax's recovery state",
    "enable.partition.eof": "the flow decides where its input ends",
    "auto.offset.reset": "the flow decides where it starts reading",
}
PROTOCOLS = ("plaintext", "ssl", "sasl_plaintext", "sasl_ssl")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER")
FILE_SETTINGS = ("ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "ssl.keystore.location",
                 "ssl.crl.location", "sasl.kerberos.keytab")


def check_settings(settings: Mapping[str, str]) -> None:
    """Raises ConfigError naming FRESHREC_KAFKA_CONFIG when its settings cannot work."""
    for key in settings:
        if key in OWNED:
            raise ConfigError(f"{VAR}: {key!r} is freshrec's own setting ({OWNED[key]})")
    protocol = settings.get("security.protocol", "plaintext").lower()
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{VAR}: security.protocol={settings['security.protocol']!r}: expected one of "
                          f"{', '.join(PROTOCOLS)}")
    mechanism = settings.get("sasl.mechanism", settings.get("sasl.mechanisms"))
    if protocol.startswith("sasl"):
        if mechanism is None:
            raise ConfigError(f"{VAR}: security.protocol={protocol} needs sasl.mechanism "
                              f"({', '.join(MECHANISMS)})")
        if mechanism.upper() not in MECHANISMS:
            raise ConfigError(f"{VAR}: sasl.mechanism={mechanism!r}: expected one of {', '.join(MECHANISMS)}")
        if mechanism.upper() in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            missing = [k for k in ("sasl.username", "sasl.password") if not settings.get(k)]
            if missing:
                raise ConfigError(f"{VAR}: sasl.mechanism={mechanism} needs {' and '.join(missing)}")
    elif mechanism is not None or "sasl.username" in settings:
        raise ConfigError(f"{VAR}: SASL settings are given but security.protocol={protocol}: "
                          "use sasl_plaintext or sasl_ssl")
    for key in FILE_SETTINGS:
        path = settings.get(key)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"{VAR}: {key}={path!r} is not a readable file")
    if settings:
        _librdkafka_accepts(settings)


def _librdkafka_accepts(settings: Mapping[str, str]) -> None:
    """librdkafka's own check of names and values (a TLS key that does not load, a typo), on a
    client that is given no broker, so it connects to nothing."""
    from confluent_kafka import KafkaException, Producer

    try:
        Producer({**settings, "logger": _QUIET})
    except (KafkaException, ValueError, TypeError) as e:
        text = e.args[0].str() if e.args and hasattr(e.args[0], "str") else str(e)
        raise ConfigError(f"{VAR}: librdkafka refuses it: {text}") from None


def check_broker(brokers: str, settings: Mapping[str, str], timeout_s: float = 30.0,
                 unreachable_ok: bool = False) -> bool:
    """Asks the brokers for metadata with the configured security settings. Credentials the broker
    refuses, or a security protocol it does not speak, raise ConfigError naming FRESHREC_KAFKA_CONFIG
    at once; no answer within `timeout_s` raises one naming FRESHREC_BROKERS (or, with
    `unreachable_ok`, returns False: the model server starts while Kafka is down and answers 503)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    refused: list[str] = []
    last: list[str] = []

    def on_error(err: Any) -> None:
        text = err.str()
        if err.code() == KafkaError._AUTHENTICATION or "SASL" in text or "security.protocol" in text \
                or "SSL handshake" in text:
            refused.append(text)
        last.append(text)

    admin = AdminClient({"bootstrap.servers": brokers, **settings, "error_cb": on_error, "logger": _QUIET})
    start = time.monotonic()
    deadline = start + timeout_s
    try:
        while True:
            if refused:
                raise ConfigError(f"{VAR}: the broker at {brokers} refused the connection: {refused[0]} "
                                  "(check security.protocol and the sasl.* or ssl.* settings)")
            try:
                if admin.list_topics(timeout=1.0).brokers:
                    return True
            except KafkaException as e:
                last.append(str(e.args[0].str() if e.args else e))
            now = time.monotonic()
            if now - start > min(SILENT_S, timeout_s) and _accepts_tcp(brokers):
                # A listener that takes the connection and then says nothing to us speaks another
                # protocol: SASL or TLS expected where the client sends plaintext, or the reverse.
                protocol = settings.get("security.protocol", "plaintext")
                raise ConfigError(f"{VAR}: the broker at {brokers} accepts connections but answers no request made "
                                  f"with security.protocol={protocol} within {now - start:.0f} s: does its listener "
                                  "expect SASL or TLS (security.protocol sasl_plaintext, ssl or sasl_ssl)?")
            if now > deadline:
                if unreachable_ok:
                    return False
                raise ConfigError(f"FRESHREC_BROKERS={brokers!r}: no broker answered within {timeout_s:.0f} s"
                                  + (f" ({last[-1]})" if last else ""))
            admin.poll(0.1)  # serves error_cb: the AdminClient reports errors only when polled
    finally:
        # A raised ConfigError's traceback keeps this frame: without this, its client would live on
        # and keep dialling the broker.
        admin = None  # noqa: F841


SILENT_S = 10.0  # a listener that takes connections but answers nothing for this long speaks another protocol


def _accepts_tcp(brokers: str) -> bool:
    for address in brokers.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=1.0):
                return True
        except (OSError, ValueError):
            continue
    return False
