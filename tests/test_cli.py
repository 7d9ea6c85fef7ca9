"""The command line: exit codes in a real process, check-config output,
the reload function handed to the master, and `run -c FILE` alone."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from forkserver import cli, config, master
from forkserver.config import ConfigError, Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def restore_logging_and_cwd(restore_root_logger: None) -> Iterator[None]:
    """`run` configures the root logger and may chdir: undo both."""
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


def forkserver(*argv: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "forkserver", *argv], env=environ,
                          cwd=cwd or ROOT, capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["run", "--workers", "many", "a:b"], 64, "argument --workers: expected an integer"),
    (["run", "--bind", "nowhere", "a:b"], 64, "argument --bind/-b: bind spec 'nowhere'"),
    (["run", "--no-such-option"], 64, "unrecognized arguments: --no-such-option\n"),
    (["run", "--max-request=5", "a:b"], 64, "(did you mean --max-requests?)"),
    (["run"], 64, "no HANDLER given"),
    (["frobnicate"], 64, "invalid choice: 'frobnicate'"),
    (["run", "-c", "/nonexistent/forkserver.toml", "a:b"], 66,
     "/nonexistent/forkserver.toml: config file not found"),
    (["check-config", "-c", "/nonexistent.toml"], 66, "config file not found"),
    (["check-config"], 64, "no HANDLER given"),
])
def test_exit_codes_and_messages(argv: list[str], code: int, message: str) -> None:
    result = forkserver(*argv)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_file_exits_78_naming_file_key_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "f.toml"
    conf.write_text('handler = "a:b"\nmax_requets = 5\n')
    for command in ("run", "check-config"):
        result = forkserver(command, "-c", str(conf))
        assert result.returncode == 78
        assert result.stderr == (f"forkserver: invalid configuration: {conf}:2, key "
                                 "'max_requets': unknown setting (did you mean "
                                 "'max_requests'?)\n")


def test_invalid_environment_exits_78() -> None:
    result = forkserver("check-config", "a:b", env={"FORKSERVER_TIMEOUT": "-1"})
    assert result.returncode == 78
    assert "key 'FORKSERVER_TIMEOUT': expected a number > 0" in result.stderr


def test_file_without_handler_exits_78(tmp_path: Path) -> None:
    conf = tmp_path / "f.toml"
    conf.write_text("workers = 1\n")
    for command in ("run", "check-config"):
        result = forkserver(command, "-c", str(conf))
        assert result.returncode == 78
        assert "key 'handler': no handler" in result.stderr
    echo = "forkserver.examples.echo:handle"
    assert forkserver("check-config", "-c", str(conf), echo).returncode == 0


def test_check_config_prints_every_setting_and_its_origin(tmp_path: Path) -> None:
    conf = tmp_path / "f.toml"
    conf.write_text('handler = "forkserver.examples.echo:handle"\n\nworkers = 3\n'
                    '[[listeners]]\nbind = "127.0.0.1:0"\nname = "web"\n')
    result = forkserver("check-config", "-c", str(conf), "--timeout", "9",
                        env={"FORKSERVER_NAME": "svc"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 'handler = "forkserver.examples.echo:handle"  # ' + f"{conf}:1" in lines
    assert f"workers = 3  # {conf}:3" in lines
    assert 'name = "svc"  # env FORKSERVER_NAME' in lines
    assert "timeout = 9.0  # command line --timeout" in lines
    assert "umask = 0o022  # default" in lines
    assert (f'listeners = [{{ bind = "127.0.0.1:0", name = "web", backlog = 2048, '
            f'dispatch = "master", proxy_protocol = "off", proxy_allow_from = [], '
            f'defer_accept = 0 }}]  '
            f"# {conf}:4") in lines
    keys = [line.split(" = ")[0] for line in lines if not line.startswith("#")]
    assert sorted(keys) == sorted(config.SETTINGS)


def test_version_prints_the_installed_version() -> None:
    import importlib.metadata  # noqa: PLC0415

    expected = f"forkserver {importlib.metadata.version('forkserver')}\n"
    for flag in ("--version", "-V"):
        result = forkserver(flag)
        assert (result.returncode, result.stdout, result.stderr) == (0, expected, ""), flag


def test_check_config_prints_the_control_socket_the_daemon_would_use(tmp_path: Path) -> None:
    handler = "forkserver.examples.echo:handle"
    result = forkserver("check-config", handler, "--name", "api",
                        env={"RUNTIME_DIRECTORY": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert (f'control_socket = "{tmp_path}/control.sock"  '
            "# default: $RUNTIME_DIRECTORY (systemd)") in result.stdout.splitlines()
    environ = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    done = subprocess.run([sys.executable, "-m", "forkserver", "check-config", handler,
                           "--name", "api"], env=environ, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    expected = ('control_socket = "/run/forkserver-api/control.sock"  '
                "# default: /run, for root") if os.geteuid() == 0 else "control_socket = "
    assert any(line.startswith(expected) for line in done.stdout.splitlines()), done.stdout
    result = forkserver("check-config", handler, "--control-socket", "/x.sock")
    assert 'control_socket = "/x.sock"  # command line --control-socket' in result.stdout


def test_help_exits_0() -> None:
    result = forkserver("run", "--help")
    assert result.returncode == 0
    assert "--worker-class sync|thread|asyncio|auto" in result.stdout
    assert forkserver("ctl", "--help").returncode == 0


def test_run_hands_the_master_a_reload_function_that_rereads_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """serve() is where the master takes over; here it only records what it
    was given, so the reload function can be exercised on its own."""
    conf = tmp_path / "f.toml"
    conf.write_text('handler = "forkserver.examples.echo:handle"\nworkers = 2\n')
    got: dict[str, Any] = {}

    def serve(settings: Settings, **kwargs: Any) -> int:
        got.update(settings=settings, **kwargs)
        return 0

    monkeypatch.setattr(master, "serve", serve)
    monkeypatch.setenv("FORKSERVER_CONCURRENCY", "4")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "-c", "f.toml", "--timeout", "7", "--log-level", "error"]) == 0
    first = got["settings"]
    assert (first.workers, first.concurrency, first.timeout) == (2, 4, 7.0)
    reload_settings = got["reload_settings"]

    monkeypatch.chdir("/")                        # the master may chdir; the path holds
    conf.write_text('handler = "forkserver.examples.echo:handle"\nworkers = 5\n'
                    "timeout = 1\n")
    monkeypatch.setenv("FORKSERVER_CONCURRENCY", "6")
    again = reload_settings()
    assert (again.workers, again.concurrency, again.timeout) == (5, 6, 7.0)

    conf.write_text("workers = 0\n")
    with pytest.raises(ConfigError, match=r"f\.toml:1, key 'workers'"):
        reload_settings()


@contextlib.contextmanager
def running_daemon(tmp_path: Path, conf_text: str,
                   env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """`forkserver run -c FILE` and nothing else, in its own session; yields
    once the master has told its (fake) systemd READY=1.  On the way out
    it is stopped with TERM, and must exit 0."""
    conf = tmp_path / "f.toml"
    conf.write_text(conf_text)
    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(30)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")}
        environ.update(env or {}, NOTIFY_SOCKET=notify_path)
        proc = subprocess.Popen([sys.executable, "-m", "forkserver", "run", "-c", str(conf)],
                                env=environ, cwd=tmp_path, start_new_session=True,
                                stderr=subprocess.PIPE, text=True)
        try:
            while b"READY=1" not in notify.recv(4096):
                pass
            yield proc
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate(timeout=10)


def test_run_applies_umask_and_chdir_before_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def serve(settings: Settings, **kwargs: Any) -> int:
        mask = os.umask(0o022)
        seen.update(umask=mask, cwd=os.getcwd())
        return 0

    monkeypatch.setattr(master, "serve", serve)
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        assert cli.main(["run", "--umask", "077", "--chdir", "/", "a:b"]) == 0
        assert seen == {"umask": 0o077, "cwd": "/"}
        assert cli.main(["run", "--chdir", str(tmp_path / "nope"), "a:b"]) == 78
    finally:
        os.umask(old)


def test_run_with_only_a_config_file_serves(tmp_path: Path) -> None:
    """`forkserver run -c FILE` needs nothing else: the echo example answers
    on the file's unix listener, with the environment's worker count."""
    sock_path = tmp_path / "echo.sock"
    conf = ('handler = "forkserver.examples.echo:handle"\n'
            f'[[listeners]]\nbind = "unix:{sock_path}"\n')
    with running_daemon(tmp_path, conf, {"FORKSERVER_WORKERS": "2"}) as proc:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(sock_path))
            client.sendall(b"ping\n")
            assert client.recv(64) == b"ping\n"
        assert len(psutil.Process(proc.pid).children()) == 2
