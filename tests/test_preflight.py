"""check-config refuses exactly what run refuses, with the same words and exit code.

Both call ``startup.preflight``; these tests run the real command line
for each bad configuration, through ``run`` and through
``check-config``, and compare the exit code and the first line of the
reason.  Also: the start-up check's deadline, user switches a non-root
process cannot make, and preload under a root master with a user.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, TIMEOUT, LogReader, exchange

ECHO = "forkserver.examples.echo:handle"


def forkserver(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
               prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """The real CLI; ``run`` gets a listener on port 0 unless the args name one."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        named = "--bind" in args or any(arg.endswith("octet.toml") for arg in args)
        binds = [] if named or args[0] != "run" else ["--bind", f"fd://{listener.fileno()}"]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        return subprocess.run(
            [*prefix, sys.executable, "-m", "forkserver", args[0], *binds, "--log-format", "json",
             "--workers", "1", *args[1:]],
            check=False, pass_fds=[listener.fileno()], cwd=cwd, capture_output=True, text=True,
            timeout=60, env=full_env, start_new_session=True,
        )  # fmt: skip


def reason(result: subprocess.CompletedProcess[str]) -> str:
    """The first line of why the command refused to start, whatever its form."""
    for line in result.stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == "master_failed":
                return str(record["message"]).removeprefix("cannot start: ").splitlines()[0]
        for prefix in ("forkserver: invalid configuration: ", "forkserver: cannot start: "):
            if line.startswith(prefix):
                return line.removeprefix(prefix)
    raise AssertionError(f"no reason given (exit {result.returncode}):\n{result.stderr}")


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    (tmp_path / "top_bind.toml").write_text(f'handler = "{ECHO}"\nbind = "127.0.0.1:0"\n')
    (tmp_path / "twice.toml").write_text(f'handler = "{ECHO}"\nworkers = 1\nworkers = 2\n')
    (tmp_path / "octet.toml").write_text('[[listeners]]\nbind = "999.1.1.1:80"\n')
    os.mkfifo(tmp_path / "fifo.toml")
    (tmp_path / "deep.toml").write_text(".".join(["a"] * 20_000) + " = 1\n")
    return tmp_path


# (arguments, what the reason must say); FILE stands for the fixture's directory.
BAD: list[tuple[list[str], str]] = [
    (["tests.handlers.broken_import:handle"], "this module refuses to be imported"),
    (["tests.handlers.no_such_module:handle"], "no module named 'tests.handlers.no_such_module'"),
    (["tests.handlers.basic:no_such_function"], "has no 'no_such_function'"),
    (["--worker-class", "sync", "forkserver.examples.async_echo:handle"],
     "it needs --worker-class asyncio"),
    (["--user", "no-such-user-x", ECHO], "user 'no-such-user-x' does not exist"),
    (["--group", "no-such-group-x", ECHO], "group 'no-such-group-x' does not exist"),
    (["-c", "FILE/octet.toml", ECHO], "octet 999 of '999.1.1.1' is over 255"),
    (["--preload", "--user", "nobody", ECHO], "preload = true with user/group set, under a root"),
    (["--chdir", "/nonexistent-dir-x", ECHO], "cannot change to /nonexistent-dir-x"),
    (["-c", "FILE/top_bind.toml"], "each listener is a [[listeners]] table"),
    (["-c", "FILE/twice.toml"], "key 'workers' is given a value twice"),
    (["-c", "FILE/fifo.toml"], "is a FIFO (named pipe), expected a regular TOML file"),
    (["-c", "FILE/deep.toml"], "a dotted key of more than 32 parts (the limit)"),
]


@pytest.mark.parametrize(("args", "expected"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_check_config_refuses_what_run_refuses_with_the_same_words(
    args: list[str], expected: str, bad_files: Path
) -> None:
    if "--preload" in args and os.geteuid() != 0:
        pytest.skip("the preload rule is for a root master")
    args = [arg.replace("FILE", str(bad_files)) for arg in args]
    ran = forkserver("run", *args)
    checked = forkserver("check-config", *args)
    assert ran.returncode == 78, ran.stderr
    assert checked.returncode == 78, checked.stderr
    assert expected in reason(ran)
    assert reason(checked) == reason(ran)


def test_check_config_passes_what_run_accepts(tmp_path: Path) -> None:
    checked = forkserver("check-config", "--user", "nobody", "--bind", "127.0.0.1:9", ECHO)
    assert checked.returncode == 0, checked.stderr
    assert 'user = "nobody"' in checked.stdout


STUCK = "import threading\nthreading.Event().wait()\n\ndef handle(conn, peer):\n    pass\n"


def test_a_handler_import_that_never_returns_stops_start_up_at_the_deadline(
    tmp_path: Path,
) -> None:
    (tmp_path / "stuck_at_start.py").write_text(STUCK)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    for command in ("run", "check-config"):
        result = forkserver(command, "--reload-timeout", "1", "stuck_at_start:handle", env=env)
        assert result.returncode == 78, result.stderr
        assert reason(result) == ("the handler import did not finish within 1 s "
                                  "(reload_timeout); the check was killed")  # fmt: skip


@pytest.fixture
def readable_dir() -> Iterator[Path]:
    """A scratch directory user nobody can read and write."""
    path = Path(tempfile.mkdtemp(prefix="fs-nobody-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


@pytest.mark.skipif(os.geteuid() != 0, reason="running the CLI as another user needs root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_a_user_a_non_root_master_cannot_switch_to_is_refused_before_any_fork(
    readable_dir: Path,
) -> None:
    daemon = pwd.getpwnam("daemon")
    for command in ("run", "check-config"):
        result = forkserver(command, "--user", "daemon", ECHO, cwd=readable_dir,
                            prefix=AS_NOBODY)  # fmt: skip
        assert result.returncode == 78, result.stderr
        assert reason(result) == (
            f"cannot switch to user 'daemon' (uid {daemon.pw_uid}): this process runs as "
            f"uid {pwd.getpwnam('nobody').pw_uid} without the right to change it "
            "(CAP_SETUID); start it as root, or leave `user` unset to run the workers as "
            "this user"
        )
        assert '"worker_spawned"' not in result.stderr
    # Switching to the user it already is needs no privilege.
    own = forkserver("check-config", "--user", "nobody", "--group", "nogroup", ECHO,
                     cwd=readable_dir, prefix=AS_NOBODY)  # fmt: skip
    assert own.returncode == 0, own.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="running the daemon as another user needs root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_a_reload_to_a_user_a_non_root_master_cannot_switch_to_fails(readable_dir: Path) -> None:
    config = readable_dir / "f.toml"
    config.write_text(f'handler = "{ECHO}"\n')
    config.chmod(0o644)
    listener = socket.create_server(("127.0.0.1", 0))
    fd = listener.fileno()
    proc = subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-m", "forkserver", "run", "--bind", f"fd://{fd}",
         "--workers", "1", "--log-format", "json", "-c", str(config)],
        pass_fds=[fd], cwd=readable_dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )  # fmt: skip
    logs = LogReader(proc.stderr)
    logs.start()
    try:
        logs.wait_for(lambda r: r.get("event") == "master_ready", TIMEOUT, "master_ready")
        config.write_text(f'handler = "{ECHO}"\nuser = "daemon"\n')
        proc.send_signal(signal.SIGHUP)
        failed = logs.wait_for(lambda r: r.get("event") == "reload_failed", TIMEOUT,
                               "reload_failed")  # fmt: skip
        assert failed["reason"].startswith("cannot switch to user 'daemon' (uid 1): this "
                                           "process runs as uid 65534 without")  # fmt: skip
        with socket.create_connection(listener.getsockname(), timeout=5) as client:
            assert exchange(client, b"still") == b"still"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=TIMEOUT)
        logs.join(timeout=TIMEOUT)
        assert proc.stderr is not None
        proc.stderr.close()
        listener.close()
