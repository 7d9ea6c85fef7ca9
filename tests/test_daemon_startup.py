"""Start-up and shut-down paths: preload, readiness, Unix sockets, socket activation."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support import ROOT, TIMEOUT, exchange, recv_all, start_daemon


def test_without_preload_each_worker_imports_the_handler() -> None:
    with start_daemon("tests.handlers.import_pid:handle", workers=1) as daemon:
        with daemon.connect() as sock:
            imported_in, worker = map(int, recv_all(sock).split())
        assert imported_in == worker
        assert worker != daemon.pid


def test_with_preload_the_master_imports_the_handler_before_forking() -> None:
    with start_daemon("tests.handlers.import_pid:handle", "--preload", workers=1) as daemon:
        with daemon.connect() as sock:
            imported_in, worker = map(int, recv_all(sock).split())
        assert imported_in == daemon.pid
        assert worker != daemon.pid


def test_ready_is_announced_only_after_every_worker_is_ready() -> None:
    with start_daemon("tests.handlers.basic:pid", workers=3) as daemon:
        ready = daemon.wait_log("master_ready")
        wanted = ("worker_ready", "master_ready")
        events = [r for r in daemon.logs.records if r.get("event") in wanted]
        assert [r["event"] for r in events] == ["worker_ready"] * 3 + ["master_ready"]
        assert ready["workers"] == 3
        assert "3 of 3 workers ready" in ready["message"]


def _serve_over_unix(path: str, env: dict[str, str] | None = None) -> None:
    with start_daemon(
        "forkserver.examples.echo:handle", "--bind", f"unix:{path}", env=env, wait_ready=not env
    ) as daemon:
        if env:
            daemon.wait_log("master_ready")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(path)
            assert exchange(client, b"over unix") == b"over unix"
        with daemon.connect() as sock:  # the TCP listener still works beside it
            assert exchange(sock, b"over tcp") == b"over tcp"
        assert daemon.stop(signal.SIGTERM) == 0


def test_a_unix_listener_serves_and_its_file_is_removed_on_stop() -> None:
    scratch = tempfile.mkdtemp(prefix="fs-")
    path = os.path.join(scratch, "echo.sock")
    try:
        _serve_over_unix(path, env={"NOTIFY_SOCKET": ""})  # not under systemd
        assert not os.path.exists(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(scratch)


def test_under_systemd_a_unix_socket_file_outlives_the_master_for_the_store() -> None:
    # The socket went to systemd's descriptor store: the next start adopts
    # it, and clients must still find it by its path meanwhile.
    scratch = tempfile.mkdtemp(prefix="fs-")
    path = os.path.join(scratch, "echo.sock")
    try:
        _serve_over_unix(path)
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(scratch)


SHIM = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="web")
os.execv(sys.executable, [sys.executable, "-m", "forkserver", *sys.argv[2:]])
"""


def test_with_no_bind_the_sockets_systemd_passed_are_used(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        fd = listener.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-c", SHIM, str(fd), "run", "--workers", "1",
             "forkserver.examples.echo:handle"],
            pass_fds=[fd], cwd=ROOT, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        try:
            # The answer waits for the whole start-up: as long as any other wait.
            with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as client:
                client.sendall(b"activated")
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == b"activated"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=TIMEOUT)
            assert proc.stderr is not None
            log = proc.stderr.read().decode()
            proc.stderr.close()
    assert "listening on 127.0.0.1:" in log


def test_systemd_hears_ready_status_and_stopping_from_the_master(tmp_path: Path) -> None:
    marker = tmp_path / "fail"
    env = {"TEST_FAIL_MARKER": str(marker)}
    with start_daemon("tests.handlers.fail_when_marked:handle", workers=2, env=env) as daemon:
        ready = daemon.wait_notify("READY=1")
        host, port = daemon.address
        assert f"STATUS=listening on {host}:{port}; 2 of 2 workers ready" in ready.split("\n")
        marker.touch()  # from now on a replacement cannot boot
        victim = daemon.workers()[0].pid
        os.kill(victim, signal.SIGKILL)
        daemon.wait_log("worker_exited", pid=victim)
        status = daemon.wait_notify("1 ready/2")
        # Its replacement cannot boot: the slot keeps failing, and STATUS= says so.
        summary = "workers 0 busy/1 ready/2; 0 served; 0 queued; degraded: slot 0 failing"
        expected = f"STATUS=listening on {host}:{port}; {summary}"
        assert expected in status.split("\n")
        assert daemon.stop(signal.SIGTERM) == 0
        daemon.wait_notify("STOPPING=1")
