"""``forkserver ctl`` finds a daemon that nobody told where to put its
control socket: the README's quick start, then ``ctl status`` with no
flags (real processes), and two such daemons on one host.

As root the quick start's socket goes to /run/forkserver: the daemon and
ctl run in a private mount namespace with its own tmpfs on /run, so the
test uses the real rule without touching the machine's /run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, TIMEOUT, NotifyReader, recv_all, start_daemon

ROOT_RULE = os.geteuid() == 0


def quick_start_argv() -> list[str]:
    """The README's first command, as `forkserver run ...` with its arguments,
    on port 0 (tests never take a fixed port)."""
    first = re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())[0]
    run = first.split("&&")[-1].strip()
    words = shlex.split(run)
    assert words[0].endswith("bin/forkserver") and words[1] == "run", run
    return [re.sub(r":8000$", ":0", word) for word in words[1:]]


def clean_environ(**extra: str) -> dict[str, str]:
    """The operator's shell: none of the test session's or systemd's variables."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("FORKSERVER_")
               and k not in ("RUNTIME_DIRECTORY", "NOTIFY_SOCKET", "XDG_RUNTIME_DIR")}
    environ["PYTHONPATH"] = str(ROOT)
    environ.update(extra)
    return environ


@contextlib.contextmanager
def quick_start(scratch: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[str]]]:
    """Run the quick start until READY=1; yield it and the command prefix that
    reaches its /run (nsenter into its mount namespace, as root)."""
    notify_path = str(scratch / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    reader = NotifyReader(notify)
    command = [sys.executable, "-m", "forkserver", *quick_start_argv()]
    if ROOT_RULE:
        environ = clean_environ(NOTIFY_SOCKET=notify_path)
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs fs-quick-start /run && exec "$@"', "sh", *command]
    else:
        xdg = scratch / "xdg"
        xdg.mkdir(mode=0o700)
        environ = clean_environ(NOTIFY_SOCKET=notify_path, XDG_RUNTIME_DIR=str(xdg))
    proc = subprocess.Popen(command, env=environ, cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    reader.start()
    try:
        reader.wait_for("READY=1", TIMEOUT)
        inside = (["nsenter", "--target", str(proc.pid), "--mount", "--"] if ROOT_RULE
                  else [])  # fmt: skip
        yield proc, inside
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=TIMEOUT)
        assert proc.stderr is not None
        proc.stderr.close()
        reader.stop()
        notify.close()


def test_the_quick_start_then_ctl_status_with_no_flags() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="fs-qs-"))
    try:
        with quick_start(scratch) as (daemon, inside):
            environ = (clean_environ() if ROOT_RULE
                       else clean_environ(XDG_RUNTIME_DIR=str(scratch / "xdg")))
            status = subprocess.run(
                [*inside, sys.executable, "-m", "forkserver", "ctl", "status"],
                env=environ, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                check=False,
            )  # fmt: skip
            assert status.returncode == 0, status.stderr
            assert f"master pid {daemon.pid} " in status.stdout
            assert re.search(r"workers (\d+)/\1 ", status.stdout), status.stdout
            # check-config names the same socket, by the same rule.
            handler = quick_start_argv()[-1]
            shown = subprocess.run(
                [sys.executable, "-m", "forkserver", "check-config", handler],
                env=environ, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                check=False,
            )  # fmt: skip
            (line,) = [x for x in shown.stdout.splitlines() if x.startswith("control_socket")]
            path = line.split('"')[1]
            if ROOT_RULE:
                assert path == "/run/forkserver/control.sock"
            else:
                assert path == f"{scratch}/xdg/forkserver/control.sock"
            mode = subprocess.run([*inside, "stat", "-c", "%a %F", os.path.dirname(path)],
                                  capture_output=True, text=True, timeout=TIMEOUT,
                                  check=True).stdout.strip()  # fmt: skip
            assert mode == "700 directory"
            # And the quick start serves what it says it serves.
            host, port = _listening_on(daemon.pid)
            with socket.create_connection((host, port), timeout=TIMEOUT) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert recv_all(conn).startswith(b"HTTP/1.")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _listening_on(pid: int) -> tuple[str, int]:
    import psutil  # noqa: PLC0415

    (conn,) = [c for c in psutil.Process(pid).net_connections("tcp")
               if c.status == psutil.CONN_LISTEN]  # fmt: skip
    return conn.laddr.ip, conn.laddr.port


def test_a_second_daemon_without_configuration_runs_without_a_socket(tmp_path: Path) -> None:
    shared = {"RUNTIME_DIRECTORY": str(tmp_path)}
    with start_daemon("tests.handlers.basic:pid", workers=1, env=shared) as first, \
            start_daemon("tests.handlers.basic:pid", workers=1, env=shared) as second:
        warning = second.wait_log("control_unavailable")
        assert warning["level"] == "warning"
        assert f"{tmp_path}/control.sock: another daemon is serving it" in warning["message"]
        assert "set control_socket, or give this daemon a name" in warning["message"]
        with second.connect() as conn:          # the second serves all the same
            assert int(recv_all(conn)) in {p.pid for p in second.workers()}
        status = subprocess.run(
            [sys.executable, "-m", "forkserver", "ctl", "status", "--json"],
            env=clean_environ(**shared), cwd=ROOT, capture_output=True, text=True,
            timeout=TIMEOUT, check=False,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert f'"pid": {first.pid},' in status.stdout
        assert first.records("control_unavailable") == []


def test_a_configured_control_socket_that_is_taken_stops_the_start(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    with start_daemon("tests.handlers.basic:pid", "--control-socket", path, workers=1):
        with start_daemon("tests.handlers.basic:pid", "--control-socket", path, workers=1,
                          wait_ready=False) as second:  # fmt: skip
            assert second.proc.wait(timeout=TIMEOUT) == 69
            failed = second.wait_log("master_failed")
            assert f"control socket {path}: another daemon is serving it" in failed["message"]


@pytest.mark.skipif(ROOT_RULE, reason="the non-root fallback: run as another user")
def test_without_xdg_runtime_dir_a_private_directory_in_tmp() -> None:
    environ = clean_environ()
    shown = subprocess.run([sys.executable, "-m", "forkserver", "check-config",
                            "forkserver.examples.echo:handle"],
                           env=environ, cwd=ROOT, capture_output=True, text=True,
                           timeout=TIMEOUT, check=False)  # fmt: skip
    assert f'control_socket = "/tmp/forkserver-{os.geteuid()}/control.sock"' in shown.stdout
