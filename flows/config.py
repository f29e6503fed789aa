"""The one configuration object: read once from the environment, validated, passed down.

A bad value stops start-up with a `ConfigError` naming the variable. The state directory records
the settings its data depends on, and refuses to start with others.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A setting is invalid; the message names the variable and what it accepts."""


def _number(kind: Callable[[str], Any], lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> Callable[[str, str], Any]:
    def parse(name: str, raw: str) -> Any:
        try:
            value = kind(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={raw!r}: expected a finite number")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise ConfigError(f"{name}={raw!r}: must be {'>' if lo_open else '>='} {lo:g}")
        if hi is not None and value > hi:
            raise ConfigError(f"{name}={raw!r}: must be <= {hi:g}")
        return value
    return parse


def _choice(*options: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(options)}")
        return value
    return parse


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={raw!r}: expected 0 or 1")


def _text(name: str, raw: str) -> str:
    if not raw.strip():
        raise ConfigError(f"{name} is empty")
    return raw.strip()


def _topic_prefix(name: str, raw: str) -> str:
    value = raw.strip()
    if value and not all(c.isalnum() or c in "._-" for c in value):
        raise ConfigError(f"{name}={raw!r}: topic names take only letters, digits, '.', '_' and '-'")
    return value


def _optional_number(name: str, raw: str) -> Optional[float]:
    if raw.strip().lower() in ("", "off", "none"):
        return None
    return _number(float, 0)(name, raw)


def _port(name: str, raw: str) -> Optional[int]:
    """A TCP port, or None for `off`/`0`."""
    if raw.strip().lower() in ("off", "0", "none", ""):
        return None
    return _number(int, 1, 65535)(name, raw)


def _names(name: str, raw: str) -> tuple:
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    bad = [n for n in names if not n.replace("_", "").replace("-", "").isalnum()]
    if bad:
        raise ConfigError(f"{name}={raw!r}: field names take letters, digits, '_' and '-' ({bad[0]!r})")
    if len(set(names)) != len(names):
        raise ConfigError(f"{name}={raw!r}: a field is named twice")
    return names


def _token(name: str, raw: str) -> str:
    value = raw.strip()
    if value and not all(33 <= ord(c) < 127 for c in value):
        raise ConfigError(f"{name}: a bearer token takes printable ASCII characters without spaces")
    return value


def _bytes_cap(name: str, raw: str) -> Optional[int]:
    """A size in bytes (at least 1 MiB: LMDB needs room for its own pages), or None for `off`."""
    if raw.strip().lower() in ("", "off", "none", "0"):
        return None
    return _number(int, 1 << 20)(name, raw)


def _path(name: str, raw: str) -> Path:
    return Path(_text(name, raw))


def _setting(env: str, default: str, parse: Callable[[str, str], Any], doc: str,
             state: bool = False) -> Any:
    """A dataclass field read from `env`; `state=True` if data in the state directory depends on it."""
    return field(default=None, metadata={"env": env, "default": default, "parse": parse,
                                         "doc": doc, "state": state})


@dataclass(frozen=True)
class Config:
    """Every setting of freshrec; `Config.from_env()` reads and validates them all."""

    source: str = _setting("FRESHREC_SOURCE", "files", _choice("files", "kafka"),
                           "`files` or `kafka`: where the flow reads and writes streams")
    data_dir: Path = _setting("FRESHREC_DATA_DIR", "./data", _path, "root of the file streams")
    state_dir: Path = _setting("FRESHREC_STATE_DIR", "./state", _path,
                               "LMDB join state, parameter checkpoints, serving store")
    brokers: str = _setting("FRESHREC_BROKERS", "localhost:9092", _text, "Kafka bootstrap servers")
    follow: bool = _setting("FRESHREC_FOLLOW", "0", _flag,
                            "`1`: the sources keep reading as input grows and never end")
    join_window_s: float = _setting("FRESHREC_JOIN_WINDOW_S", "3600", _number(float, 0, lo_open=True),
                                    "how long (event time) an impression waits for a positive action")
    lateness_s: float = _setting("FRESHREC_LATENESS_S", "5", _number(float, 0),
                                 "how far the watermark stays behind the inputs (event time)")
    neg_sample_rate: float = _setting("FRESHREC_NEG_SAMPLE_RATE", "1.0", _number(float, 0, 1, lo_open=True),
                                      "fraction of expired negatives kept (kept ones carry weight 1/rate)")
    validation_sample: float = _setting("FRESHREC_VALIDATION_SAMPLE", "1.0", _number(float, 0, 1, lo_open=True),
                                        "fraction of join keys progressive validation takes where the model "
                                        "server logged no score, drawn from those `FRESHREC_NEG_SAMPLE_RATE` "
                                        "keeps (so at most that): the trainer scores only these on arrival")
    orphan_hold_s: float = _setting("FRESHREC_ORPHAN_HOLD_S", "60", _number(float, 0),
                                    "an action whose impression has not come when the watermark passes its ts "
                                    "plus this is dead-lettered as an orphan")
    watch_positive_s: Optional[float] = _setting("FRESHREC_WATCH_POSITIVE_S", "off", _optional_number,
                                                 "`off` (watch is neutral) or seconds: a watch of at least this "
                                                 "value is positive")
    join_cache: int = _setting("FRESHREC_JOIN_CACHE", "50000", _number(int, 1),
                               "join keys held in memory per bucket; the rest wait in LMDB")
    undo_keep: int = _setting("FRESHREC_UNDO_KEEP", "12", _number(int, 3),
                              "flushes of undo records kept per bucket (and snapshots of count history per catalog "
                              "entry); at least ceil(-b / -s) + 2 of Bytewax's recovery intervals")
    train: bool = _setting("FRESHREC_TRAIN", "1", _flag, "`1`: the online trainer step trains on the examples")
    trained_keys_log: bool = _setting("FRESHREC_TRAINED_KEYS_LOG", "0", _flag,
                                      "`1`: the trainer lists the join keys each checkpoint covers in "
                                      "`$FRESHREC_STATE_DIR/trainer/trained-keys.log`, to check that each example "
                                      "trained once (about 40 bytes an example, never pruned: for tests and audits)")
    user_recent: int = _setting("FRESHREC_USER_RECENT", "50", _number(int, 1, 100_000),
                                "actions kept per user (the newest) in the serving store's `user/<id>` entries")
    train_batch: int = _setting("FRESHREC_TRAIN_BATCH", "256", _number(int, 1, 1 << 16),
                                "examples per training mini-batch")
    train_max_wait_ms: float = _setting("FRESHREC_TRAIN_MAX_WAIT_MS", "50", _number(float, 0),
                                        "a mini-batch trains once its first example waited this long")
    user_slots: tuple = _setting("FRESHREC_USER_SLOTS", "", _names,
                                 "sparse fields describing the user (user tower), comma-separated; the model "
                                 "server fills `recent_<item field>` (e.g. `recent_author`) from the user's "
                                 "recent positive actions",
                                 state=True)
    item_slots: tuple = _setting("FRESHREC_ITEM_SLOTS", "author,tags", _names,
                                 "sparse fields describing the item (item tower), comma-separated", state=True)
    dense_features: tuple = _setting("FRESHREC_DENSE_FEATURES", "", _names,
                                     "dense fields the item tower reads, comma-separated", state=True)
    embedding_dim: int = _setting("FRESHREC_EMBEDDING_DIM", "16", _number(int, 1, 1024),
                                  "embedding width of every sparse slot", state=True)
    sync_interval_ms: float = _setting("FRESHREC_SYNC_INTERVAL_MS", "50", _number(float, 1),
                                       "touched embedding rows go to the serving store this often (the item tower's "
                                       "at `FRESHREC_ITEM_SYNC_INTERVAL_MS`)")
    item_sync_interval_ms: float = _setting("FRESHREC_ITEM_SYNC_INTERVAL_MS", "500", _number(float, 1),
                                            "the item tower's touched rows (item id and item slots, the "
                                            "item's bias) go to the serving store this often (never more "
                                            "often than `FRESHREC_SYNC_INTERVAL_MS`), the user tower's "
                                            "at every sync")
    dense_sync_s: float = _setting("FRESHREC_DENSE_SYNC_S", "10", _number(float, 0.1),
                                   "dense weights go to the serving store this often")
    max_future_s: float = _setting("FRESHREC_MAX_FUTURE_S", "86400", _number(float, 0, lo_open=True),
                                   "an event whose ts is this far ahead of its arrival is dead-lettered")
    idle_s: float = _setting("FRESHREC_IDLE_S", "5", _number(float, 0, lo_open=True),
                             "wall seconds without new input after which a partition stops holding the watermark")
    buckets: int = _setting("FRESHREC_BUCKETS", "8", _number(int, 1, 4096),
                            "join state buckets (hash of the join key modulo this)", state=True)
    file_partitions: int = _setting("FRESHREC_FILE_PARTITIONS", "2", _number(int, 1, 256),
                                    "partitions per stream of the files source", state=True)
    source_batch_bytes: int = _setting("FRESHREC_SOURCE_BATCH_BYTES", "1048576", _number(int, 1024),
                                       "at most this many bytes read per source batch")
    source_max_lead_s: float = _setting("FRESHREC_SOURCE_MAX_LEAD_S", "1", _number(float, 0),
                                        "a join stream's partition that has read this many event-time seconds "
                                        "past the slowest one still reading pauses (0: never)")
    rotate_bytes: int = _setting("FRESHREC_ROTATE_BYTES", "67108864", _number(int, 1024),
                                 "a file sink starts a new file past this size")
    topic_prefix: str = _setting("FRESHREC_TOPIC_PREFIX", "", _topic_prefix,
                                 "prefix of every Kafka topic name (several deployments on one cluster)")
    kafka_lag_s: float = _setting("FRESHREC_KAFKA_LAG_S", "5", _number(float, 0.05),
                                  "each flow process reads its Kafka partitions' high watermarks this often "
                                  "for `freshrec_source_kafka_lag`")
    kafka_config: str = _setting("FRESHREC_KAFKA_CONFIG", "{}", _text,
                                 "JSON object of librdkafka settings (SASL, TLS) given to every Kafka client; checked "
                                 "at start-up")
    lmdb_max_bytes: Optional[int] = _setting("FRESHREC_LMDB_MAX_BYTES", "off", _bytes_cap,
                                             "each LMDB store (a join bucket's spill store, the training "
                                             "checkpoints, a serving store) grows its map up to this many bytes; "
                                             "a write past it stops the process with an error naming the store, "
                                             "and nothing of it is written. `off`: up to what the disk holds")
    serve_refresh_ms: float = _setting("FRESHREC_SERVE_REFRESH_MS", "100", _number(float, 1),
                                       "the model server brings its item vectors up to the serving store this often")
    serve_threads: int = _setting("FRESHREC_SERVE_THREADS", "0", _number(int, 0, 64),
                                  "threads of a model server process that compute recommendations; 0: its "
                                  "event loop computes each one itself, with no hand-off between threads")
    serve_processes: int = _setting("FRESHREC_SERVE_PROCESSES", "1", _number(int, 1, 64),
                                    "`freshrec serve` runs this many server processes on one port (SO_REUSEPORT), "
                                    "each with its own item index and feature-event file")
    serve_read_timeout_s: float = _setting("FRESHREC_SERVE_READ_TIMEOUT_S", "30", _number(float, 0, 3600, lo_open=True),
                                           "the model server closes a connection whose request headers have not "
                                           "all come within this long (an idle keep-alive connection too), and "
                                           "answers 408 to a request body not all read within it: slow clients "
                                           "cannot hold its connections")
    serve_delivery_timeout_ms: int = _setting("FRESHREC_SERVE_DELIVERY_TIMEOUT_MS", "5000", _number(int, 100, 600_000),
                                              "the model server answers 503 when Kafka has not acknowledged a "
                                              "write within this long")
    serve_feature_buffer_s: float = _setting("FRESHREC_SERVE_FEATURE_BUFFER_S", "300", _number(float, 1, 3600),
                                             "the model server keeps feature events Kafka has not taken yet (a "
                                             "broker down) this long before counting them lost")
    api_token: str = _setting("FRESHREC_API_TOKEN", "", _token,
                              "a bearer token that `POST /actions` and the dashboard require (empty: none)")
    metrics_port: Optional[int] = _setting("FRESHREC_METRICS_PORT", "9464", _port,
                                           "each flow process serves /metrics and /graph on 127.0.0.1 at this "
                                           "port plus its Bytewax process id (`-i`); `off` or `0`: none")
    metrics_host: str = _setting("FRESHREC_METRICS_HOST", "127.0.0.1", _text,
                                 "address the flow's metrics servers bind (`0.0.0.0` in a container only)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Read every setting from `env` (default `os.environ`); `overrides` are raw strings by field."""
        env = os.environ if env is None else env
        values = {}
        for f in dataclasses.fields(cls):
            meta = f.metadata
            raw = overrides.get(f.name, env.get(meta["env"], meta["default"]))
            values[f.name] = meta["parse"](meta["env"], str(raw))
        config = cls(**values)
        from flows.kafka_client import check_settings

        check_settings(config._kafka_extra())  # validate now, not when the first consumer starts
        return config

    def kafka_settings(self) -> dict[str, str]:
        """What every Kafka client of freshrec gets besides its own settings: the clients' defaults
        (flows/kafka_client.py), then FRESHREC_KAFKA_CONFIG's librdkafka settings (SASL, TLS)."""
        from flows.kafka_client import CLIENT_DEFAULTS

        return {**CLIENT_DEFAULTS, **self._kafka_extra()}

    def _kafka_extra(self) -> dict[str, str]:
        try:
            extra = json.loads(self.kafka_config)
        except json.JSONDecodeError as e:
            raise ConfigError(f"FRESHREC_KAFKA_CONFIG: not a JSON object ({e})") from None
        if not isinstance(extra, dict) or not all(isinstance(v, (str, int, float, bool)) for v in extra.values()):
            raise ConfigError("FRESHREC_KAFKA_CONFIG: expected a JSON object of settings to values")
        return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in extra.items()}

    def topic(self, stream: str) -> str:
        return self.topic_prefix + stream

    def stream_dir(self, stream: str) -> Path:
        return self.data_dir / stream

    def state_settings(self) -> dict[str, Any]:
        return {f.metadata["env"]: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self) if f.metadata["state"]}

    @classmethod
    def documented(cls) -> list[tuple[str, str, str]]:
        """(variable, default, meaning) for the README and `--help`."""
        return [(f.metadata["env"], f.metadata["default"], f.metadata["doc"]) for f in dataclasses.fields(cls)]


SETTINGS_FILE = "settings.json"
LMDB_CAP = "FRESHREC_LMDB_MAX_BYTES"  # named by the error of a store that reaches it


def ensure_state_dir(config: Config) -> Path:
    """Create the state directory, or check that its data was made with today's settings."""
    state = config.state_dir
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"FRESHREC_STATE_DIR={str(state)!r}: cannot create it ({e.strerror})") from None
    path = state / SETTINGS_FILE
    wanted = config.state_settings()
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"FRESHREC_STATE_DIR={str(state)!r}: unreadable {SETTINGS_FILE} ({e})") from None
        changed = [k for k in wanted if k in recorded and recorded[k] != wanted[k]]
        if changed:
            was = ", ".join(f"{k}={recorded[k]}" for k in changed)
            now = ", ".join(f"{k}={wanted[k]}" for k in changed)
            raise ConfigError(
                f"FRESHREC_STATE_DIR={str(state)!r} holds data made with {was}, not {now}. "
                f"Start with the settings it was made with, or reset it: remove {state} "
                "(and the Bytewax recovery directory, if you use -r) and start again."
            )
        if all(k in recorded for k in wanted):
            return state
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes of one cluster may race here
    tmp.write_text(json.dumps(wanted, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return state
