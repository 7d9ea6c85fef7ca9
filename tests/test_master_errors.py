"""The master never dies and never spins: its error boundary, and running out of descriptors."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from forkserver import control
from forkserver.workers.sync import PREFETCH as SYNC_PREFETCH
from tests.support import TIMEOUT, poll_until, recv_all, start_daemon

ECHO = "forkserver.examples.echo:handle"


def in_flight(path: str) -> int:
    return sum(w["in_flight"] for w in control.request(path, "status")["workers"])


def free_descriptors(pid: int, limit: int) -> int:
    """How many descriptor numbers below *limit* process *pid* could still open."""
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    return sum(1 for fd in range(limit) if fd not in used)


def test_the_control_socket_out_of_descriptors_backs_off_and_answers_once_they_free(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "ctl.sock")
    # No notify socket: its socket per message would free a descriptor now and then.
    with start_daemon(ECHO, "--control-socket", path, "--max-pending-connections", "500",
                      workers=2, env={"NOTIFY_SOCKET": ""},
                      wait_ready=False) as daemon:  # fmt: skip
        daemon.wait_log("master_ready")
        master = psutil.Process(daemon.pid)
        workers = daemon.workers()
        held = []
        replies: dict[str, Any] = {}
        asking = threading.Thread(
            target=lambda: replies.update(status=control.request(path, "status", timeout=60))
        )
        for worker in workers:
            worker.suspend()  # nothing is served: accepted descriptors pile up in the master
        try:
            # First fill the workers (one connection each, PREFETCH queued on each
            # channel): the master closes its copies of what it hands out, which
            # would free some.
            room = 2 * (1 + SYNC_PREFETCH)
            held = [daemon.connect() for _ in range(room)]
            poll_until(lambda: in_flight(path) == room, "the workers hold their fill")
            _, hard = master.rlimit(psutil.RLIMIT_NOFILE)
            limit = master.num_fds() + 8
            master.rlimit(psutil.RLIMIT_NOFILE, (limit, hard))
            held += daemon.connect_together(40)  # more than the master can take, in one batch
            daemon.wait_log("accept_failed")  # the master's own listener ran out first
            poll_until(lambda: free_descriptors(daemon.pid, limit) == 0,
                       "the master has no descriptor left")  # fmt: skip
            asking.start()  # one ctl status client waits in the control socket's backlog
            first = daemon.wait_log("accept_failed", listener="control")
            assert "many open files" in first["message"], first
            assert first["level"] == "warning"
            span = 3.0
            time.sleep(span)  # sleep-ok: the span over which the rate of warnings is counted
            warned = daemon.records("accept_failed")
            control_lines = [r for r in warned if r.get("listener") == "control"]
            # One line per ACCEPT_FAILED_LOG_INTERVAL at most, however often accept fails.
            assert len(control_lines) <= 1 + span / control.ACCEPT_FAILED_LOG_INTERVAL + 1
            assert all(r["event"] == "accept_failed" for r in warned)
            assert daemon.proc.poll() is None
            assert asking.is_alive()  # no descriptor for it yet
        finally:
            for worker in workers:
                if worker.is_running():
                    worker.resume()
            for sock in held:
                sock.close()
        asking.join(timeout=TIMEOUT)  # descriptors free up: the waiting client is answered
        assert not asking.is_alive()
        assert replies["status"]["master"]["pid"] == daemon.pid
        assert control.request(path, "status")["master"]["workers_target"] == 2
        assert daemon.stop() == 0


def test_an_exception_in_a_master_callback_is_logged_and_the_master_serves_on(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "ctl.sock")
    with start_daemon("tests.handlers.basic:boom", "--control-socket", path, workers=1,
                      module="tests.faulty_master") as daemon:  # fmt: skip
        for _ in range(2):  # twice: the second report is held back, the master still lives
            with daemon.connect() as sock:
                sock.sendall(b"boom")
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == b""
            daemon.wait_log("handler_error")
        error = daemon.wait_log("master_error")
        assert error["level"] == "error"
        assert error["callback"].startswith("Master.")
        assert error["exc_type"] == "RuntimeError"
        assert "planted" in error["error"]
        assert "Traceback (most recent call last)" in error["traceback"]
        assert "_planted_bug" in error["traceback"]
        with daemon.connect() as sock:  # the master goes on serving
            sock.sendall(b"hi")
            sock.shutdown(socket.SHUT_WR)
            assert int(recv_all(sock)) == daemon.workers()[0].pid
        assert control.request(path, "status")["master"]["pid"] == daemon.pid
        assert daemon.stop() == 0
        assert len(daemon.records("master_error")) == 1  # rate-limited, per callback
    with daemon.logs.cond:  # JSON logs stay JSON: the traceback is inside one record
        assert len(daemon.logs.records) == len(daemon.logs.lines)
