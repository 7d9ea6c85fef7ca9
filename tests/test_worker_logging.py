"""What workers write reaches the log as the log's own format, and follows it when rotated.

* With ``log_format = "json"`` every line on stderr is one JSON object:
  a stuck worker's stack dump (ABRT, written by ``faulthandler`` from C)
  comes through the master as one ``worker_stack_dump`` event, and a
  worker that cannot start says why as a ``worker_boot_error`` event,
  one that fails after READY as a ``worker_runtime_error`` (and exits
  with the runtime-failure code).
"""

from __future__ import annotations

import json
import signal

from forkserver.workers.core import EXIT_RUNTIME_ERROR
from tests.support import Daemon, read_line, start_daemon


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
