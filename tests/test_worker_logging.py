"""What workers write reaches the log as the log's own format, and follows it when rotated.

* With ``log_format = "json"`` every line on stderr is one JSON object:
  a stuck worker's stack dump (ABRT, written by ``faulthandler`` from C)
  comes through the master as one ``worker_stack_dump`` event, and a
  worker that cannot start says why as a ``worker_boot_error`` event,
  one that fails after READY as a ``worker_runtime_error`` (and exits
  with the runtime-failure code).
* USR1 or ``ctl reopen-logs`` after ``mv app.log app.log.1``: the master
  and every worker write to the new ``app.log`` (the master hands each
  worker the new file with REOPEN), and nothing more to the old one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from forkserver import control
from forkserver.workers.core import EXIT_RUNTIME_ERROR
from tests.support import Daemon, exchange, poll_until, read_line, start_daemon

ECHO = "forkserver.examples.echo:handle"
ASYNC_ECHO = "forkserver.examples.async_echo:handle"


def assert_all_json(daemon: Daemon) -> None:
    for line in daemon.logs.text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line in a JSON log: {line!r}") from None
        assert isinstance(record, dict), line


def test_a_stuck_workers_stack_dump_is_one_json_event_with_the_handlers_frame() -> None:
    with start_daemon("tests.handlers.basic:hold", "--timeout", "0.5", workers=1) as daemon:
        with daemon.connect() as sock:
            stuck = int(read_line(sock).split()[0])  # in the handler, silent: ABRT comes
            dump = daemon.wait_log("worker_stack_dump", pid=stuck)
            exited = daemon.wait_log("worker_exited", pid=stuck)
        assert exited["exit_code"] in (-signal.SIGABRT, -signal.SIGKILL)
        assert dump["slot"] == 0
        assert "most recent call first" in dump["stack"]
        assert 'tests/handlers/basic.py", line' in dump["stack"]
        assert " in hold" in dump["stack"]
        daemon.wait_log("worker_ready", slot=0)  # its successor
        assert daemon.stop() == 0
        assert_all_json(daemon)


def test_a_worker_that_cannot_start_says_why_in_one_json_event() -> None:
    with start_daemon("tests.handlers.worker_boot_failure:handle", workers=1,
                      wait_ready=False) as daemon:  # fmt: skip
        failed = daemon.wait_log("worker_boot_error", slot=0)
        exited = daemon.wait_log("worker_exited", pid=failed["pid"])
        assert exited["exit_code"] == 3
        assert "boot failure" in exited["message"]
        assert failed["process"] == failed["pid"]  # logged by the worker itself
        assert "this handler fails in workers" in failed["message"]
        assert "RuntimeError: this handler fails in workers" in failed["exc"]
        daemon.wait_log("worker_backoff")
        assert daemon.stop() == 0
        assert_all_json(daemon)


def test_a_worker_failing_after_ready_is_a_runtime_error_in_one_json_event() -> None:
    with start_daemon("tests.handlers.descriptors:break_the_loop", workers=1) as daemon:
        with daemon.connect() as sock:
            broken = int(read_line(sock))
        failed = daemon.wait_log("worker_runtime_error", pid=broken)
        exited = daemon.wait_log("worker_exited", pid=broken)
        assert exited["exit_code"] == EXIT_RUNTIME_ERROR
        assert "runtime failure" in exited["message"]
        assert failed["slot"] == 0
        assert "Traceback" in failed["exc"]
        daemon.wait_log("worker_ready", slot=0)
        assert daemon.stop() == 0
        assert_all_json(daemon)


def file_records(path: Path, event: str) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == event:
            records.append(record)
    return records


def open_log_files(pid: int) -> set[str]:
    """The paths process *pid* has open that are log files."""
    paths = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if ".log" in target:
                paths.add(target)
    return paths


@pytest.mark.parametrize("how", ["USR1", "ctl reopen-logs"])
@pytest.mark.parametrize(("worker_class", "handler"), [
    ("sync", ECHO), ("thread", ECHO), ("asyncio", ASYNC_ECHO),
])  # fmt: skip
def test_after_rotation_every_worker_writes_its_access_lines_to_the_new_file(
    tmp_path: Path, how: str, worker_class: str, handler: str
) -> None:
    log_file, rotated = tmp_path / "app.log", tmp_path / "app.log.1"
    control_socket = tmp_path / "ctl.sock"
    args = ("--log-file", str(log_file), "--access-log", "--worker-class", worker_class,
            "--control-socket", str(control_socket))  # fmt: skip
    with start_daemon(handler, *args, workers=2) as daemon:
        workers = sorted(p.pid for p in daemon.workers())
        for _ in range(4):
            with daemon.connect() as sock:
                assert exchange(sock, b"before") == b"before"
        poll_until(lambda: len(file_records(log_file, "connection_served")) == 4,
                   "four access lines in the log file")  # fmt: skip
        log_file.rename(rotated)
        if how == "USR1":
            daemon.proc.send_signal(signal.SIGUSR1)
        else:
            assert control.request(str(control_socket), "reopen-logs") is None
        poll_until(lambda: log_file.exists() and sorted(
            r["pid"] for r in file_records(log_file, "worker_log_reopened")) == workers,
            "every worker says it reopened, in the new file")  # fmt: skip
        for pid in (daemon.pid, *workers):
            assert open_log_files(pid) == {str(log_file)}, pid  # the old one is closed
        for _ in range(6):
            with daemon.connect() as sock:
                assert exchange(sock, b"after") == b"after"
        poll_until(lambda: len(file_records(log_file, "connection_served")) == 6,
                   "six access lines in the new file")  # fmt: skip
        assert len(file_records(rotated, "connection_served")) == 4  # nothing more there
        assert {r["process"] for r in file_records(log_file, "connection_served")} <= set(workers)
        assert daemon.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run workers as nobody")
def test_workers_that_may_not_open_the_log_file_still_follow_a_rotation(tmp_path: Path) -> None:
    """Workers as nobody, the log in a directory only root may enter: they get the file."""
    os.chmod(tmp_path, 0o700)
    log_file, rotated = tmp_path / "app.log", tmp_path / "app.log.1"
    args = ("--log-file", str(log_file), "--access-log", "--user", "nobody")
    with start_daemon(ECHO, *args, workers=2) as daemon:
        workers = sorted(p.pid for p in daemon.workers())
        log_file.rename(rotated)
        daemon.proc.send_signal(signal.SIGUSR1)
        poll_until(lambda: log_file.exists() and sorted(
            r["pid"] for r in file_records(log_file, "worker_log_reopened")) == workers,
            "every worker says it reopened, in the new file")  # fmt: skip
        with daemon.connect() as sock:
            assert exchange(sock, b"after") == b"after"
        poll_until(lambda: len(file_records(log_file, "connection_served")) == 1,
                   "the access line in the new file")  # fmt: skip
        assert file_records(rotated, "connection_served") == []
        assert daemon.stop() == 0
