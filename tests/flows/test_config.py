import subprocess
import sys

import pytest

from flows.config import Config, ConfigError, ensure_state_dir
from tests.helpers import config_for


def test_defaults_are_the_contracts():
    c = Config.from_env({})
    assert (c.source, str(c.data_dir), str(c.state_dir), c.brokers, c.follow) == \
        ("files", "data", "state", "localhost:9092", False)
    assert (c.join_window_s, c.lateness_s, c.neg_sample_rate) == (3600, 5, 1.0)


@pytest.mark.parametrize("env, value", [
    ("FRESHREC_SOURCE", "rabbit"), ("FRESHREC_FOLLOW", "maybe"), ("FRESHREC_JOIN_WINDOW_S", "-1"),
    ("FRESHREC_JOIN_WINDOW_S", "nan"), ("FRESHREC_LATENESS_S", "soon"), ("FRESHREC_NEG_SAMPLE_RATE", "0"),
    ("FRESHREC_NEG_SAMPLE_RATE", "1.5"), ("FRESHREC_BUCKETS", "0"), ("FRESHREC_BUCKETS", "2.5"),
    ("FRESHREC_DATA_DIR", " "), ("FRESHREC_KAFKA_CONFIG", "[1]"), ("FRESHREC_KAFKA_CONFIG", "{bad"),
    ("FRESHREC_TOPIC_PREFIX", "a b"),
])
def test_a_bad_value_is_refused_naming_its_variable(env, value):
    with pytest.raises(ConfigError, match=env):
        Config.from_env({env: value})


def test_a_flag_wins_over_its_variable():
    assert Config.from_env({"FRESHREC_BUCKETS": "4"}, buckets="16").buckets == 16


def test_a_state_dir_refuses_other_settings_its_data_depends_on(tmp_path):
    ensure_state_dir(config_for(tmp_path, buckets=8))
    ensure_state_dir(config_for(tmp_path, buckets=8, lateness_s=9))  # lateness: no data depends on it
    with pytest.raises(ConfigError, match=r"FRESHREC_BUCKETS=8, not FRESHREC_BUCKETS=16.*reset"):
        ensure_state_dir(config_for(tmp_path, buckets=16))


def test_the_flow_stops_at_start_up_naming_the_bad_setting(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bytewax.run", "flows.pipeline:flow"], cwd=tmp_path,
                       env={"FRESHREC_LATENESS_S": "-3", "PATH": "/usr/bin:/bin",
                            "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[2])},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "FRESHREC_LATENESS_S='-3': must be >= 0" in r.stderr
