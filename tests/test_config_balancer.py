"""The settings for running behind a load balancer: PROXY protocol, health, drain.

A listener that requires a PROXY header must say who may send it: a
configuration without ``proxy_allow_from`` is refused (exit 78, by
``run`` and by ``check-config`` alike) naming the listener.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from forkserver import config
from forkserver.config import ConfigError, ListenerSettings
from tests.support import ROOT


def _load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> config.Settings:
    path = tmp_path / "f.toml"
    path.write_text(text)
    return config.load_settings(str(path), environ or {})


def test_listener_settings_fall_back_to_the_global_ones(tmp_path: Path) -> None:
    s = _load(tmp_path, 'proxy_protocol = "v2"\nproxy_allow_from = ["198.18.0.2"]\n'
                        '[[listeners]]\nbind = "127.0.0.1:0"\nname = "lb"\n'
                        '[[listeners]]\nbind = "unix:/tmp/x.sock"\nproxy_protocol = "v1"\n'
                        'proxy_allow_from = ["unix"]\n'
                        '[[listeners]]\nbind = "127.0.0.1:1"\nproxy_protocol = "off"\n')
    lb, local, direct = s.listeners
    assert (lb.proxy_protocol, lb.proxy_allow_from) == ("v2", ("198.18.0.2",))
    assert (local.proxy_protocol, local.proxy_allow_from) == ("v1", ("unix",))
    assert (direct.proxy_protocol, direct.proxy_allow_from) == ("off", ("198.18.0.2",))


def test_a_proxy_listener_without_an_allow_list_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, '[[listeners]]\nbind = "127.0.0.1:0"\nname = "ok"\n'
                        '[[listeners]]\nbind = "127.0.0.1:1"\nname = "edge"\n'
                        'proxy_protocol = "v2"\n')
    assert info.value.key == "listeners[1].proxy_allow_from"
    assert "listener 'edge' requires a PROXY v2 header" in str(info.value)
    assert "proxy_allow_from is not set" in str(info.value)


def test_the_default_listener_is_named_when_the_global_setting_needs_a_list() -> None:
    with pytest.raises(ConfigError) as info:
        config.load_settings(None, {"FORKSERVER_PROXY_PROTOCOL": "v1"})
    assert info.value.key == "proxy_allow_from"
    assert "the default listener" in str(info.value)
    assert "env FORKSERVER_PROXY_PROTOCOL" in str(info.value)


@pytest.mark.parametrize(("entry", "said"), [
    ("10.0.0.1/8", "has host bits set"),
    ("lb.example", "is not an IPv4 or IPv6 address"),
    ("0.0.0.0", "is no peer's address"),
    ("fe80::1%eth0", "a zone"),
])  # fmt: skip
def test_a_bad_allow_entry_is_named_with_its_key(tmp_path: Path, entry: str, said: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f'proxy_allow_from = ["198.18.0.2", "{entry}"]\n')
    assert info.value.key == "proxy_allow_from"
    assert f"proxy_allow_from entry 2 ('{entry}')" in str(info.value)
    assert said in str(info.value)
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f'[[listeners]]\nbind = ":1"\nproxy_allow_from = ["{entry}"]\n')
    assert info.value.key == "listeners[0].proxy_allow_from"


def test_allow_list_and_version_values_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected an array of strings"):
        _load(tmp_path, 'proxy_allow_from = "198.18.0.2"\n')
    with pytest.raises(ConfigError, match="is not a string"):
        _load(tmp_path, "proxy_allow_from = [1]\n")
    with pytest.raises(ConfigError, match="one of 'off', 'v1', 'v2'"):
        _load(tmp_path, 'proxy_protocol = "auto"\n')  # never guessed
    with pytest.raises(ConfigError, match="at most 1024 entries"):
        config.load_settings(None, {"FORKSERVER_PROXY_ALLOW_FROM": ",".join(
            f"10.{i // 256}.{i % 256}.1" for i in range(1025))})
    with pytest.raises(ConfigError, match=">= 232"):
        _load(tmp_path, "proxy_header_max = 100\n")
    assert _load(tmp_path, "proxy_allow_from = []\n").proxy_allow_from == ()


@pytest.mark.parametrize("bind", ["fd://3", "systemd", "systemd:web", "nonsense"])
def test_health_bind_is_an_address_the_master_binds(tmp_path: Path, bind: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f'health_bind = "{bind}"\n')
    assert info.value.key == "health_bind"


def test_the_rendered_listener_shows_the_new_keys() -> None:
    item = ListenerSettings(bind=":1", proxy_protocol="v2", proxy_allow_from=("::1",))
    assert config.toml_value("listeners", (item,)) == (
        '[{ bind = ":1", name = "", proxy_protocol = "v2", proxy_allow_from = ["::1"] }]')


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_run_and_check_config_exit_78_naming_the_listener(tmp_path: Path, command: str) -> None:
    conf = tmp_path / "f.toml"
    conf.write_text('handler = "forkserver.examples.echo:handle"\n'
                    '[[listeners]]\nbind = "127.0.0.1:0"\nname = "edge"\nproxy_protocol = "v1"\n')
    done = subprocess.run([sys.executable, "-m", "forkserver", command, "-c", str(conf)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 78, done.stderr
    assert "listener 'edge' requires a PROXY v1 header" in done.stderr
    assert "proxy_allow_from" in done.stderr
