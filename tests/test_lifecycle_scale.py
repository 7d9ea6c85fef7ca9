"""TTIN/TTOU and ``forkserver ctl`` against a live daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from forkserver import control
from tests.loadgen import BackgroundLoad
from tests.support import ROOT, TIMEOUT, poll_until, read_line, recv_all, start_daemon

ECHO = "forkserver.examples.echo:handle"


def test_ttin_and_ttou_under_load_answer_every_request_and_the_count_follows() -> None:
    with start_daemon(ECHO, workers=2) as daemon:
        host, port = daemon.address
        with BackgroundLoad(host, port, total=None, concurrency=16) as load:  # until stopped
            load.wait_answered(100)
            daemon.proc.send_signal(signal.SIGTTIN)
            assert daemon.wait_log("workers_scaled", target=3)
            third = daemon.wait_log("worker_ready", slot=2)["pid"]
            assert len(daemon.workers()) == 3
            for target in (2, 1):
                daemon.proc.send_signal(signal.SIGTTOU)
                daemon.wait_log("workers_scaled", target=target)
            daemon.proc.send_signal(signal.SIGTTOU)  # never below 1
            refused = daemon.wait_log("workers_scaled", target=1, refused=True)
            assert "at least 1" in refused["message"]
            assert daemon.wait_log("worker_exited", pid=third)["exit_code"] == 0
            poll_until(lambda: len(daemon.workers()) == 1, "one worker left")
            load.wait_answered(load.answered + 100)  # the one left serves the load alone
            result = load.stop()  # fails if the load ended before the scaling did
        assert result.failures == [], result.failure_summary()
        assert result.answered == result.attempted
        assert len(daemon.workers()) == 1
        assert daemon.stop() == 0


def test_the_worker_ttou_retires_finishes_its_connection_first() -> None:
    with start_daemon("tests.handlers.basic:hold", workers=2) as daemon:
        with daemon.connect() as first, daemon.connect() as second:
            pids = {int(read_line(first).split()[0]), int(read_line(second).split()[0])}
            assert len(pids) == 2  # one connection on each worker
            daemon.proc.send_signal(signal.SIGTTOU)
            retired = daemon.wait_log("worker_retired")["pid"]
            assert retired in pids
            for sock in (first, second):
                sock.sendall(b"bye\n")
            replies = {int(recv_all(first).split()[0]), int(recv_all(second).split()[0])}
            assert replies == pids  # both connections answered by the workers holding them
        assert daemon.wait_log("worker_exited", pid=retired)["exit_code"] == 0
        assert len(daemon.workers()) == 1
        assert daemon.stop() == 0


def ctl(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forkserver", "ctl", "--socket", str(path), *args],
        check=False, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def status(path: Path) -> dict[str, Any]:
    done = ctl(path, "status", "--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_ctl_status_scale_reload_reopen_and_stop_on_a_live_daemon(tmp_path: Path) -> None:
    sock_path = tmp_path / "ctl.sock"
    with start_daemon("tests.handlers.basic:pid", "--control-socket", str(sock_path),
                      workers=2) as daemon:  # fmt: skip
        served_by: dict[int, int] = {}
        for _ in range(25):
            with daemon.connect() as sock:
                pid = int(recv_all(sock))
                served_by[pid] = served_by.get(pid, 0) + 1
        poll_until(lambda: status(sock_path)["master"]["totals"]["served"] == 25,
                   "status counts the 25 connections")  # fmt: skip
        now = status(sock_path)
        master = now["master"]
        assert master["pid"] == daemon.pid
        assert master["state"] == "running"
        assert master["workers_target"] == 2
        assert master["listeners"][0]["inode"] == os.fstat(daemon.listener.fileno()).st_ino
        workers = now["workers"]
        assert sorted(w["pid"] for w in workers) == sorted(p.pid for p in daemon.workers())
        assert {w["pid"]: w["served"] for w in workers if w["served"]} == served_by
        assert sum(w["served"] for w in workers) == 25
        assert all(w["generation"] == 0 and w["state"] == "ready" for w in workers)

        scaled = ctl(sock_path, "scale", "3")
        assert scaled.returncode == 0, scaled.stderr
        daemon.wait_log("worker_ready", slot=2)
        assert status(sock_path)["master"]["workers_target"] == 3

        reloaded = ctl(sock_path, "reload")
        assert reloaded.returncode == 0, reloaded.stderr
        daemon.wait_log("reload_completed", generation=1)
        after = status(sock_path)
        assert after["master"]["generation"] == 1
        poll_until(lambda: {w["generation"] for w in status(sock_path)["workers"]} == {1},
                   "only the new generation left")  # fmt: skip
        assert len(status(sock_path)["workers"]) == 3  # a reload keeps the scaled count
        assert after["master"]["totals"]["served"] == 25  # retired workers still count

        bad = ctl(sock_path, "scale", "0")
        assert bad.returncode != 0
        reopened = ctl(sock_path, "reopen-logs")
        assert reopened.returncode == 0, reopened.stderr

        stopped = ctl(sock_path, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert daemon.proc.wait(timeout=TIMEOUT) == 0
        assert not sock_path.exists()
        gone = ctl(sock_path, "status")
        assert gone.returncode == 69


def test_control_reload_and_scale_answer_the_client_with_what_they_began(tmp_path: Path) -> None:
    sock_path = tmp_path / "ctl.sock"
    with start_daemon(ECHO, "--control-socket", str(sock_path), workers=1) as daemon:
        result = control.request(str(sock_path), "scale", {"workers": 2})
        assert result == {"workers": 2}
        result = control.request(str(sock_path), "reload")
        assert result["generation"] == 1
        daemon.wait_log("reload_completed", generation=1)
        control.request(str(sock_path), "stop", {"mode": "fast"})
        assert daemon.proc.wait(timeout=TIMEOUT) == 0


def test_usr1_reopens_the_log_file_after_rotation(tmp_path: Path) -> None:
    log_file = tmp_path / "forkserver.log"
    rotated = tmp_path / "forkserver.log.1"
    with start_daemon(ECHO, "--log-file", str(log_file), workers=1) as daemon:
        poll_until(lambda: "master_ready" in log_file.read_text(), "the log file is written")
        log_file.rename(rotated)
        daemon.proc.send_signal(signal.SIGUSR1)
        poll_until(log_file.exists, "a new log file after USR1")
        daemon.proc.send_signal(signal.SIGTTIN)  # something to log
        poll_until(lambda: "workers_scaled" in log_file.read_text(), "logging goes to the new file")
        assert "workers_scaled" not in rotated.read_text()
        assert daemon.stop() == 0
