"""The settings model: sources, precedence, and every kind of bad input.

Precedence is checked for every setting through the real command line
(``forkserver check-config``), so the file, the environment and the CLI
options are the ones an operator would use.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from forkserver import cli, config
from forkserver.config import ConfigError, ConfigFileNotFound, ListenerSettings, Settings

# Three distinct valid values per setting, as (TOML text, env/CLI text, CLI text),
# and the values they mean.
SAMPLES: dict[str, tuple[tuple[str, str, str], tuple[object, object, object]]] = {
    "listeners": (('[{bind = "127.0.0.1:7001"}]', "127.0.0.1:7002", "unix:/tmp/x.sock"),
                  ("127.0.0.1:7001", "127.0.0.1:7002", "unix:/tmp/x.sock")),
    "backlog": (("11", "12", "13"), (11, 12, 13)),
    "max_pending_connections": (("5", "6", "7"), (5, 6, 7)),
    "dispatch": (('"shared"', "master", "SHARED"), ("shared", "master", "shared")),
    "defer_accept": (("1", "2", "3"), (1, 2, 3)),
    "handler": (('"a.b:c"', "d:e", "f.g:h.i"), ("a.b:c", "d:e", "f.g:h.i")),
    "workers": (("3", "5", "7"), (3, 5, 7)),
    "worker_class": (('"sync"', "thread", "asyncio"), ("sync", "thread", "asyncio")),
    "event_loop": (('"uvloop"', "asyncio", "uvloop"), ("uvloop", "asyncio", "uvloop")),
    "concurrency": (("2", "3", "4"), (2, 3, 4)),
    "preload": (("true", "false", "true"), (True, False, True)),
    "name": (('"one"', "two", "three"), ("one", "two", "three")),
    "max_requests": (("100", "200", "300"), (100, 200, 300)),
    "max_requests_jitter": (("1", "2", "3"), (1, 2, 3)),
    "max_memory": (('"1K"', "2M", "3G"), (1024, 2 << 20, 3 << 30)),
    "memory_metric": (('"uss"', "rss", "uss"), ("uss", "rss", "uss")),
    "timeout": (("1.5", "2.5", "3.5"), (1.5, 2.5, 3.5)),
    "graceful_timeout": (("0", "1", "2.25"), (0.0, 1.0, 2.25)),
    "startup_timeout": (("0", "60", "0.5"), (0.0, 60.0, 0.5)),
    "pid_file": (('"/run/a.pid"', "/run/b.pid", "/run/c.pid"),
                 ("/run/a.pid", "/run/b.pid", "/run/c.pid")),
    "chdir": (('"/srv/a"', "/srv/b", "/srv/c"), ("/srv/a", "/srv/b", "/srv/c")),
    "control_socket": (('"/run/a.sock"', "/run/b.sock", "/run/c.sock"),
                       ("/run/a.sock", "/run/b.sock", "/run/c.sock")),
    "log_level": (('"debug"', "WARNING", "error"), ("debug", "warning", "error")),
    "log_format": (('"json"', "text", "json"), ("json", "text", "json")),
    "log_file": (('"/var/log/a"', "/var/log/b", "/var/log/c"),
                 ("/var/log/a", "/var/log/b", "/var/log/c")),
    "access_log": (("true", "no", "on"), (True, False, True)),
    "user": (('"nobody"', "daemon", "0"), ("nobody", "daemon", "0")),
    "group": (('"nogroup"', "daemon", "0"), ("nogroup", "daemon", "0")),
    "reload_timeout": (("1.5", "2", "60"), (1.5, 2.0, 60.0)),
    "umask": (("0o077", "027", "0o002"), (0o077, 0o027, 0o002)),
    "proxy_protocol": (('"v1"', "V2", "off"), ("v1", "v2", "off")),
    "proxy_allow_from": (('["127.0.0.1", "::1"]', "10.0.0.0/8,unix", "fd00::/8"),
                         (("127.0.0.1", "::1"), ("10.0.0.0/8", "unix"), ("fd00::/8",))),
    "proxy_header_max": (("232", "4096", "65551"), (232, 4096, 65551)),
    "proxy_header_timeout": (("0.5", "3", "10"), (0.5, 3.0, 10.0)),
    "health_bind": (('"127.0.0.1:9"', "[::1]:9", "unix:/run/h.sock"),
                    ("127.0.0.1:9", "[::1]:9", "unix:/run/h.sock")),
    "drain_delay": (("0", "1.5", "30"), (0.0, 1.5, 30.0)),
    "reload": (("true", "0", "on"), (True, False, True)),
    "reload_extra_files": (('["a.toml", "b c"]', "d,e", "/f"),
                           (("a.toml", "b c"), ("d", "e"), ("/f",))),
    "access_log_format": (('"{peer}"', "{worker} {pid}", "{duration_ms:.3f} {status}"),
                          ("{peer}", "{worker} {pid}", "{duration_ms:.3f} {status}")),
    **{hook: ((f'"h.{hook}:a"', f"h:{hook}", f"h.i:{hook}.b"),
              (f"h.{hook}:a", f"h:{hook}", f"h.i:{hook}.b"))
       for hook in config.MASTER_HOOKS + config.WORKER_HOOKS},
    "hook_timeout": (("0.5", "2", "60"), (0.5, 2.0, 60.0)),
    "metrics_bind": (('"127.0.0.1:9100"', ":9101", "unix:/run/m.sock"),
                     ("127.0.0.1:9100", ":9101", "unix:/run/m.sock")),
    "statsd_host": (('"127.0.0.1:8125"', "[::1]:8125", "10.1.2.3:9"),
                    ("127.0.0.1:8125", "[::1]:8125", "10.1.2.3:9")),
    "statsd_prefix": (('"app"', "app.web", "a-b_c.d"), ("app", "app.web", "a-b_c.d")),
    "statsd_interval": (("0.5", "10", "60"), (0.5, 10.0, 60.0)),
    "tls_certfile": (('"/etc/a.pem"', "/etc/b.pem", "/etc/c.pem"),
                     ("/etc/a.pem", "/etc/b.pem", "/etc/c.pem")),
    "tls_keyfile": (('"/etc/a.key"', "/etc/b.key", "/etc/c.key"),
                    ("/etc/a.key", "/etc/b.key", "/etc/c.key")),
    "tls_password_file": (('"/etc/a.pw"', "/etc/b.pw", "/etc/c.pw"),
                          ("/etc/a.pw", "/etc/b.pw", "/etc/c.pw")),
    "tls_cafile": (('"/etc/ca1"', "/etc/ca2", "/etc/ca3"), ("/etc/ca1", "/etc/ca2", "/etc/ca3")),
    "tls_client_auth": (('"optional"', "REQUIRED", "none"), ("optional", "required", "none")),
    "tls_min_version": (('"TLSv1.3"', "tlsv1.2", "TLSV1.3"), ("TLSv1.3", "TLSv1.2", "TLSv1.3")),
    "tls_ciphers": (('"ECDHE+AESGCM"', "HIGH", "ECDHE+CHACHA20"),
                    ("ECDHE+AESGCM", "HIGH", "ECDHE+CHACHA20")),
    "tls_alpn": (('["h2", "http/1.1"]', "http/1.1", "h2,http/1.1"),
                 (("h2", "http/1.1"), ("http/1.1",), ("h2", "http/1.1"))),
    "tls_handshake_timeout": (("0.5", "3", "10"), (0.5, 3.0, 10.0)),
}
#: Lines a sample needs beside it to be a valid configuration.
SAMPLE_NEEDS: dict[str, str] = {"proxy_protocol": 'proxy_allow_from = ["127.0.0.1"]\n'}


def test_samples_cover_every_setting() -> None:
    assert set(SAMPLES) == set(config.SETTINGS)


def _value(settings: Settings, key: str) -> object:
    value = getattr(settings, key)
    if key == "listeners":
        return value[0].bind
    return value


def _cli_args(key: str, text: str) -> list[str]:
    meta = config.SETTINGS[key]
    if key == "handler":
        return [text]
    if meta.kind == "bool":
        return [("--" if text in ("true", "on") else "--no-") + key.replace("_", "-")]
    return [config.flag_name(key), text]


def _effective(capsys: pytest.CaptureFixture[str], argv: list[str],
               key: str) -> dict[str, str]:
    # What check-config prints, without its checks (these samples need not be usable).
    handler = [] if key == "handler" else ["a:b"]       # run and check-config need one
    ns = cli.build_parser().parse_args(["check-config", *argv, *handler])
    out = cli.format_effective(config.load(ns.config, os.environ, cli._overrides(ns)))
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\w+) = .*  # (.*)$", out, re.M)}


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_precedence_defaults_file_env_cli(key: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (in_file, in_env, in_cli), (v_file, v_env, v_cli) = SAMPLES[key]
    path = tmp_path / "f.toml"
    path.write_text(f"{key} = {in_file}\n" + SAMPLE_NEEDS.get(key, ""))
    env = config.env_name(key)
    for name in list(os.environ):
        if name.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)

    assert config.load(None, {}).origins[key] == "default"
    loaded = config.load(str(path), {})
    assert _value(loaded.settings, key) == v_file
    assert loaded.origins[key] == f"{path}:1"
    assert _effective(capsys, ["-c", str(path)], key)[key] == f"{path}:1"

    monkeypatch.setenv(env, in_env)
    loaded = config.load(str(path), os.environ)
    assert _value(loaded.settings, key) == v_env
    assert _effective(capsys, ["-c", str(path)], key)[key] == f"env {env}"

    parser = cli.build_parser()
    ns = parser.parse_args(["run", "-c", str(path), *_cli_args(key, in_cli)])
    loaded = config.load(str(path), os.environ, cli._overrides(ns))
    assert _value(loaded.settings, key) == v_cli
    origin = _effective(capsys, ["-c", str(path), *_cli_args(key, in_cli)], key)[key]
    assert origin.startswith("command line")


def test_defaults() -> None:
    s = config.load_settings(None, {})
    assert s == Settings()
    assert s.workers == (os.cpu_count() or 1)
    assert s.listeners == ()
    assert (s.worker_class, s.concurrency, s.max_pending_connections) == (None, 16, 30)
    assert (s.backlog, s.timeout, s.umask, s.log_format) == (2048, 30.0, 0o022, "text")


def test_listeners_array_of_tables(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('backlog = 99\ndefer_accept = 2\n[[listeners]]\nbind = "127.0.0.1:0"\n'
                    'name = "web"\n[[listeners]]\nbind = "unix:/tmp/a.sock"\nbacklog = 5\n'
                    '[[listeners]]\nbind = "127.0.0.1:1"\ndefer_accept = 0\n')
    s = config.load_settings(str(path), {})
    assert s.listeners == (
        ListenerSettings(bind="127.0.0.1:0", name="web", backlog=99, dispatch="master",
                         proxy_protocol="off", proxy_allow_from=(), defer_accept=2),
        ListenerSettings(bind="unix:/tmp/a.sock", name="", backlog=5, dispatch="master",
                         proxy_protocol="off", proxy_allow_from=(), defer_accept=2),
        ListenerSettings(bind="127.0.0.1:1", name="", backlog=99, dispatch="master",
                         proxy_protocol="off", proxy_allow_from=(), defer_accept=0))


def test_env_bind_takes_several_specs_and_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('[[listeners]]\nbind = "127.0.0.1:1"\n')
    s = config.load_settings(str(path), {"FORKSERVER_BIND": "127.0.0.1:2, [::1]:3"})
    assert [ls.bind for ls in s.listeners] == ["127.0.0.1:2", "[::1]:3"]


def test_empty_env_value_turns_an_optional_setting_off(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('pid_file = "/run/x.pid"\nworker_class = "thread"\n')
    s = config.load_settings(str(path), {"FORKSERVER_PID_FILE": "",
                                         "FORKSERVER_WORKER_CLASS": "auto"})
    assert (s.pid_file, s.worker_class) == (None, None)


def test_reserved_environment_names_are_not_settings() -> None:
    assert config.load_settings(None, {"FORKSERVER__HANDOVER": "x", "OTHER": "y"}) == Settings()


# ------------------------------------------------------------ bad input

def _error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(str(path), environ or {})
    return info.value


@pytest.mark.parametrize(("text", "key", "line", "expected"), [
    ("workrs = 3\n", "workrs", 1, "unknown setting (did you mean 'workers'?)"),
    ("\n\nworkers = '3'\n", "workers", 3, "expected an integer >= 1 and <= 4096, got a string"),
    ("workers = 0\n", "workers", 1, "expected an integer >= 1 and <= 4096, got 0"),
    ("workers = true\n", "workers", 1, "got a boolean true"),
    ("timeout = 0\n", "timeout", 1, "expected a number > 0 and <= 86400, got 0"),
    ("timeout = nan\n", "timeout", 1, "got nan"),
    ("graceful_timeout = inf\n", "graceful_timeout", 1, "got inf"),
    ("preload = 1\n", "preload", 1, "expected true or false, got an integer 1"),
    ("worker_class = 'fork'\n", "worker_class", 1,
     "expected one of 'sync', 'thread', 'asyncio', 'auto', got 'fork'"),
    ("handler = 'no-colon'\n", "handler", 1, "expected module:attribute"),
    ("umask = 0o1777\n", "umask", 1, "expected an octal mode"),
    ("max_memory = '12Q'\n", "max_memory", 1, "expected a size in bytes"),
    ('name = "x\\ty"\n', "name", 1, "expected printable text"),
    (f"name = '{'n' * 65}'\n", "name", 1, "expected at most 64 characters"),
    ("listeners = 'x'\n", "listeners", 1, "expected an array of tables"),
    ("x = 1\n[[listeners]]\nbind='127.0.0.1:1'\n", "x", 1, "unknown setting"),
    ("[[listeners]]\nbind = '127.0.0.1:99999'\n", "listeners[0].bind", 2, "out of range"),
    ("[[listeners]]\nbind = '127.0.0.1:1'\n[[listeners]]\nbind='1.2.3.4:5'\nbaklog = 3\n",
     "listeners[1].baklog", 5, "unknown listener option (did you mean 'backlog'?)"),
    ("[[listeners]]\nname = 'web'\n", "listeners[0]", 1, "missing 'bind'"),
    ("[[listeners]]\nbind = 7\n", "listeners[0].bind", 2, "expected a string, got an integer"),
    ("[[listeners]]\nbind = ':1'\nbacklog = 0\n", "listeners[0].backlog", 3,
     "expected an integer >= 1"),
    ("[workers]\ncount = 2\n", "workers", 1, "got a table"),
    ("dispatch = 'fanout'\n", "dispatch", 1,
     "expected one of 'master', 'shared', got 'fanout'"),
    ("[[listeners]]\nbind = ':1'\ndispatch = 'fanout'\n", "listeners[0].dispatch", 3,
     "expected one of 'master', 'shared', got 'fanout'"),
    ("[[listeners]]\nbind = ':1'\ndispatch = 1\n", "listeners[0].dispatch", 3,
     "expected a string, got an integer"),
    ("[[listeners]]\nbind = ':1'\ndefer_accept = '5s'\n", "listeners[0].defer_accept", 3,
     "expected an integer"),
    ("[[listeners]]\nbind = ':1'\ndefer_accept = 3601\n", "listeners[0].defer_accept", 3,
     "<= 3600"),
])
def test_bad_file_names_file_key_line_and_expectation(
        tmp_path: Path, text: str, key: str, line: int, expected: str) -> None:
    err = _error(tmp_path, text)
    path = str(tmp_path / "bad.toml")
    assert (err.source, err.key, err.line) == (path, key, line)
    assert str(err).startswith(f"{path}:{line}, key {key!r}: ")
    assert expected in str(err)


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    err = _error(tmp_path, 'workers = 2\nname = "unterminated\n')
    assert err.line == 2
    assert str(err).startswith(f"{tmp_path / 'bad.toml'}:2: TOML syntax error")


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"workers = 2\nname = '\xff'\n")
    with pytest.raises(ConfigError, match=r":2: not UTF-8 text$"):
        config.load(str(path), {})


@pytest.mark.parametrize("value", ["[" * 5000 + "]" * 5000, "{a=" * 5000 + "1" + "}" * 5000])
def test_deep_nesting_is_refused_not_a_crash(tmp_path: Path, value: str) -> None:
    err = _error(tmp_path, f"workers = {value}\n")
    assert str(err) == (f"{tmp_path / 'bad.toml'}:1: arrays and tables nested more than 32 "
                        "deep (the limit); the file is refused before it is parsed")


def test_missing_unreadable_and_huge_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileNotFound, match="config file not found"):
        config.load(str(tmp_path / "nope.toml"), {})
    with pytest.raises(ConfigError, match="is a directory"):
        config.load(str(tmp_path), {})
    huge = tmp_path / "huge.toml"
    huge.write_text("# x\n" * (config.MAX_FILE_BYTES // 4 + 1))
    with pytest.raises(ConfigError, match="larger than"):
        config.load(str(huge), {})


@pytest.mark.parametrize(("environ", "message"), [
    ({"FORKSERVER_WORKRS": "2"},
     "environment, key 'FORKSERVER_WORKRS': unknown setting "
     "(did you mean 'FORKSERVER_WORKERS'?)"),
    ({"FORKSERVER_WORKERS": "two"},
     "environment, key 'FORKSERVER_WORKERS': expected an integer >= 1 and <= 4096, got 'two'"),
    ({"FORKSERVER_PRELOAD": "maybe"}, "expected true or false"),
    ({"FORKSERVER_BIND": "127.0.0.1:x"}, "key 'FORKSERVER_BIND': bind spec"),
    ({"FORKSERVER_UMASK": "9"}, "expected an octal mode"),
])
def test_bad_environment(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, environ)
    assert message in str(info.value)


def test_parse_size() -> None:
    assert config.parse_size("512") == 512
    assert config.parse_size("512M") == 512 << 20
    assert config.parse_size("2GiB") == 2 << 30
    assert config.parse_size("1_000k") == 1000 << 10
    with pytest.raises(ValueError, match="size in bytes"):
        config.parse_size("-1")


def test_listeners_inherit_dispatch_unless_they_set_their_own(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('dispatch = "shared"\n[[listeners]]\nbind = "127.0.0.1:1"\n'
                    '[[listeners]]\nbind = "127.0.0.1:2"\ndispatch = "master"\n')
    s = config.load_settings(str(path), {})
    assert [ls.dispatch for ls in s.listeners] == ["shared", "master"]
    # The environment (and the command line) change the default, not a listener's own choice.
    s = config.load_settings(str(path), {"FORKSERVER_DISPATCH": "master"})
    assert (s.dispatch, [ls.dispatch for ls in s.listeners]) == ("master", ["master", "master"])
    s = config.load_settings(None, {}, {"dispatch": "shared",
                                        "listeners": (ListenerSettings(bind=":1"),)})
    assert s.listeners[0].dispatch == "shared"
    assert config.load_settings(None, {}).dispatch == "master"


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_an_invalid_dispatch_exits_78_naming_the_key(
        command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "f.toml"
    path.write_text('[[listeners]]\nbind = "127.0.0.1:1"\ndispatch = "fanout"\n')
    assert cli.main([command, "-c", str(path), "a:b"]) == 78
    assert "listeners[0].dispatch" in capsys.readouterr().err
    monkeypatch.setenv("FORKSERVER_DISPATCH", "fanout")
    assert cli.main([command, "a:b"]) == 78
    assert "FORKSERVER_DISPATCH" in capsys.readouterr().err
