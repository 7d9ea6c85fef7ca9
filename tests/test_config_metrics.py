"""The metrics settings: what they accept, and the clear errors for what they refuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from forkserver import config
from forkserver.config import ConfigError


@pytest.mark.parametrize(("text", "expected"), [
    ("statsd_host = 'statsd.example:8125'\n", "no host name: the master never waits on DNS"),
    ("statsd_host = '127.0.0.1'\n", "expected an IP address and a port"),
    ("statsd_host = '127.0.0.1:0'\n", "expected an IP address and a port"),
    ("statsd_host = '127.0.0.1:65536'\n", "expected an IP address and a port"),
    ("statsd_host = '::1:8125'\n", "expected an IP address and a port"),
    ("statsd_prefix = 'a b'\n", "letters, digits, _ and -, in parts joined by dots"),
    ("statsd_prefix = 'a..b'\n", "in parts joined by dots"),
    ("statsd_prefix = ''\n", "in parts joined by dots"),
    (f"statsd_prefix = '{'a' * 65}'\n", "at most 64"),
    ("statsd_interval = 0\n", "expected a number >= 0.1"),
    ("metrics_bind = 'fd://3'\n", "expected a bind spec: HOST:PORT"),
    ("metrics_bind = 'systemd'\n", "expected a bind spec: HOST:PORT"),
])
def test_a_bad_metrics_setting_names_the_file_key_and_what_was_expected(
        tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(str(path), {})
    key = text.split(" ", 1)[0]
    assert str(info.value).startswith(f"{path}:1, key {key!r}: ")
    assert expected in str(info.value)


def test_the_metrics_are_off_by_default_and_an_empty_value_turns_them_off() -> None:
    settings = config.load_settings(None, {})
    assert (settings.metrics_bind, settings.statsd_host) == (None, None)
    assert (settings.statsd_prefix, settings.statsd_interval) == ("forkserver", 10.0)
    off = config.load_settings(None, {"FORKSERVER_METRICS_BIND": "",
                                      "FORKSERVER_STATSD_HOST": " "})
    assert (off.metrics_bind, off.statsd_host) == (None, None)
