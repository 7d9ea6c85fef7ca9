"""The embedding API (``forkserver.serve``, ``Daemon``, ``settings``), through its public names.

A program that embeds the daemon (tests/embedded.py) runs as a real
process: it serves, answers ctl, reloads on HUP and stops on TERM as
``forkserver run`` does.  Invalid settings raise ``ConfigError`` naming
the key before anything starts; a daemon that cannot start raises
``StartupFailed`` with the exit code the command line would use.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import forkserver
from forkserver.examples import echo
from tests.support import ROOT, TIMEOUT, poll_until, read_line, start_daemon

APP = "tests.handlers.hooked_app:handle"


def ctl(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forkserver", "ctl", "--socket", str(path),
                           *args], capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)  # fmt: skip


def test_an_embedded_daemon_serves_reloads_and_stops_like_the_command(tmp_path: Path) -> None:
    records = tmp_path / "records"
    records.mkdir()
    env = {"HOOK_DIR": str(records)}
    socket_path = tmp_path / "control.sock"
    setting = f"control_socket={json.dumps(str(socket_path))}"
    with start_daemon(APP, "--object", "--post-fork-object", "--setting", setting, env=env,
                      workers=2, module="tests.embedded") as daemon:
        workers = {p.pid for p in daemon.workers()}
        with daemon.connect() as sock:
            assert int(read_line(sock)) in workers
        # the post_fork object ran in each worker
        poll_until(lambda: len(list(records.glob("embedded_post_fork.*"))) == 2, "post_fork")
        ran = [json.loads(p.read_text()) for p in records.glob("embedded_post_fork.*")]
        assert {r["pid"] for r in ran} == workers
        status = ctl(socket_path, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["master"]["pid"] == daemon.pid
        # HUP: the handler object cannot be imported again, so only the settings reload
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed", generation=1)
        reloaded = ctl(socket_path, "reload")
        assert reloaded.returncode == 0, reloaded.stderr
        daemon.wait_log("reload_completed", generation=2)
        poll_until(lambda: not workers & {p.pid for p in daemon.workers()}, "the old workers gone")
        new = {p.pid for p in daemon.workers()}
        with daemon.connect() as sock:
            assert int(read_line(sock)) in new
        assert daemon.stop() == 0
    generations = [r["pid"] for r in daemon.records("worker_spawned")]
    assert len(generations) == 6  # 2 workers, 3 generations
    # The handler object's module registered its atexit callback when this program
    # imported it: it is the program's, run once as the program exits, never by the
    # workers that inherited it (they drop the master's callbacks at fork).
    atexits = {json.loads(p.read_text())["pid"] for p in records.glob("atexit.*")}
    assert atexits == {daemon.pid}
    assert not set(generations) & atexits


def test_a_daemon_that_cannot_start_raises_startup_failed() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.embedded", "run", "--bind", "127.0.0.1:0",
         "tests.handlers.broken_import:handle"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True,
        timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 78, done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("startup failed:")]
    assert line.startswith("startup failed: 78 ProbeError: handler 'tests.handlers.broken_import")
    assert line.endswith("this module refuses to be imported")


@pytest.mark.parametrize(("values", "key", "text"), [
    ({"workers": 0}, "workers", "expected an integer >= 1"),
    ({"wrkers": 2}, "wrkers", "did you mean 'workers'"),
    ({"bind": 8000}, "bind", "expected a bind spec"),
    ({"bind": ["127.0.0.1:99999"]}, "bind", "99999"),
    ({"access_log_format": "{peer} {bytes}"}, "access_log_format", "unknown field 'bytes'"),
    ({"timeout": True}, "timeout", "got a boolean"),
    ({"reload": True, "preload": True}, "reload", "with preload = true"),
])
def test_invalid_settings_raise_config_error_naming_the_key(values: dict[str, object],
                                                            key: str, text: str) -> None:
    with pytest.raises(forkserver.ConfigError) as caught:
        forkserver.serve("tests.handlers.hooked_app:handle", **values)
    assert caught.value.key == key
    assert text in str(caught.value)


def test_a_listener_from_python_is_the_listener_a_file_gives(tmp_path: Path) -> None:
    conf = tmp_path / "forkserver.toml"
    conf.write_text('[[listeners]]\nbind = "127.0.0.1:0"\nname = "edge"\nproxy_protocol = "v1"\n'
                    'proxy_allow_from = ["127.0.0.1"]\ntls_certfile = "/etc/x.pem"\n'
                    'tls_keyfile = "/etc/x.key"\ntls_alpn = ["h2"]\n'
                    '[[listeners.tls_certificates]]\nserver_names = ["a.example"]\n'
                    'certfile = "/etc/a.pem"\n')
    from_file = forkserver.settings(config_file=str(conf)).listeners
    from_python = forkserver.settings(bind=[{
        "bind": "127.0.0.1:0", "name": "edge", "proxy_protocol": "v1",
        "proxy_allow_from": ["127.0.0.1"], "tls_certfile": "/etc/x.pem",
        "tls_keyfile": "/etc/x.key", "tls_alpn": ("h2",),
        "tls_certificates": [{"server_names": ["a.example"], "certfile": "/etc/a.pem"}],
    }]).listeners  # fmt: skip
    assert from_python == from_file
    assert dict(from_file[0].tls)["tls_alpn"] == ("h2",)
    # Settings a program holds can be given back as they are.
    assert forkserver.settings(bind=list(from_file)).listeners == from_file
    with pytest.raises(forkserver.ConfigError) as caught:
        forkserver.settings(bind=[{"bind": "127.0.0.1:0", "tls_min_version": "SSLv3"}])
    assert "listener 0, tls_min_version" in str(caught.value)


def test_settings_are_checked_as_a_file_is_and_objects_as_preload() -> None:
    settings = forkserver.settings(bind=["127.0.0.1:0", {"bind": "unix:/tmp/x.sock",
                                                         "backlog": 5}], workers=3)
    assert [item.bind for item in settings.listeners] == ["127.0.0.1:0", "unix:/tmp/x.sock"]
    assert settings.listeners[1].backlog == 5 and settings.workers == 3
    with pytest.raises(forkserver.ConfigError) as caught:
        forkserver.Daemon(forkserver.settings(reload=True), handler=echo.handle)
    assert caught.value.key == "reload"
    with pytest.raises(forkserver.ConfigError) as caught:
        forkserver.Daemon(forkserver.settings(), handler=echo.handle,
                          hooks={"post_frok": print})
    assert "did you mean 'post_fork'" in str(caught.value)
    with pytest.raises(forkserver.ConfigError) as caught:
        forkserver.Daemon(forkserver.settings(), handler=42)
    assert caught.value.key == "handler" and "not callable" in str(caught.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule is about a root master")
def test_objects_are_refused_with_a_user_switch_under_root() -> None:
    with pytest.raises(forkserver.ConfigError) as caught:
        forkserver.Daemon(forkserver.settings(user="nobody"), handler=echo.handle)
    assert caught.value.key == "handler"
    assert "imported by this process as root" in str(caught.value)
    with pytest.raises(forkserver.ConfigError) as caught:
        forkserver.Daemon(forkserver.settings(user="nobody", handler=APP),
                          hooks={"post_fork": print})
    assert caught.value.key == "post_fork"
