"""How the master meets systemd at start-up: its environment, the store, the status line."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from tests.support import ROOT, TIMEOUT, poll_until, start_daemon

ECHO = "forkserver.examples.echo:handle"


def test_a_malformed_watchdog_variable_is_a_clear_start_up_error() -> None:
    with tempfile.TemporaryDirectory(prefix="fs-") as scratch:
        env = {
            **os.environ,
            "NOTIFY_SOCKET": os.path.join(scratch, "notify"),
            "WATCHDOG_USEC": "soon",
            "PYTHONPATH": str(ROOT),
        }
        done = subprocess.run(
            [sys.executable, "-m", "forkserver", "run", "--bind", "127.0.0.1:0", ECHO],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
    assert done.returncode == 78, done.stderr
    assert "WATCHDOG_USEC" in done.stderr
    assert "Traceback" not in done.stderr


def test_workers_never_inherit_listen_variables_whatever_the_bind() -> None:
    # LISTEN_PID names another process: the sockets are not ours, and the
    # variables must still be gone before any worker is forked, so nothing
    # the handler starts inherits them either.
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
    with start_daemon("tests.handlers.environ:handle", env=env) as daemon:
        with daemon.connect() as conn:
            conn.shutdown(1)
            shown = b"".join(iter(lambda: conn.recv(65536), b"")).decode()
    names = {line.split("=", 1)[0] for line in shown.splitlines()}
    assert "PATH" in names, shown
    leaked = names & {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"}
    assert leaked == set(), f"a handler's child inherited {leaked}"


def test_the_status_line_counts_workers_connections_and_queue() -> None:
    with start_daemon(ECHO) as daemon:
        for index in range(5):
            with daemon.connect() as conn:
                conn.sendall(b"%d" % index)
                conn.shutdown(1)
                assert conn.recv(10) == b"%d" % index
        # Completions reach the master after the clients have their answer.
        poll_until(
            lambda: any("5 served" in m for m in daemon.notifications)
            or "5 served" in daemon.wait_notify("served"),
            "a status line counting 5 connections served",
        )
        status = next(m for m in reversed(daemon.notifications) if "served" in m)
        assert "workers 0 busy/2 ready/2" in status
        assert "0 queued" in status
