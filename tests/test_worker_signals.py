"""Signals sent to the daemon's whole process group never kill a worker or a new master.

``kill -HUP -- -PGID``, ``pkill -USR1 forkserver`` or a terminal reach
every process of the group, including a child between its fork and the
moment it sets its own dispositions (and a new master between its exec
and its loop's handlers).  Those signals are blocked across the fork
and taken only once the child handles or ignores them.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.loadgen import BackgroundLoad
from tests.support import Daemon, exchange, poll_until, start_daemon, wait_pid

ECHO = "forkserver.examples.echo:handle"
#: One full cycle keeps as many TTIN as TTOU, so the worker count stays near its start.
STORM = (signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN, signal.SIGUSR1, signal.SIGTTOU,
         signal.SIGUSR1)  # fmt: skip


class Storm:
    """How many signals were sent, and whether the storm is over."""

    def __init__(self) -> None:
        self.sent = 0
        self.over = threading.Event()


@contextmanager
def group_storm(pgid: int, *, count: int, seconds: float) -> Iterator[Storm]:
    """Send the ``STORM`` signals to process group *pgid*, one every 3 ms, on a thread.

    At most *count* signals and at most *seconds*; leaving the block ends
    it early.
    """
    storm = Storm()
    halt = threading.Event()

    def run() -> None:
        deadline = time.monotonic() + seconds
        try:
            while storm.sent < count and time.monotonic() < deadline and not halt.is_set():
                os.killpg(pgid, STORM[storm.sent % len(STORM)])
                storm.sent += 1
                halt.wait(0.003)  # sleep-ok: the storm's cadence, not a synchronisation
        except ProcessLookupError:
            pass
        finally:
            storm.over.set()

    thread = threading.Thread(target=run, name="signal-storm", daemon=True)
    thread.start()
    try:
        yield storm
    finally:
        halt.set()
        thread.join(timeout=10)


def killed_by_a_signal(daemon: Daemon) -> list[dict[str, object]]:
    return [r for r in daemon.records("worker_exited") if int(r["exit_code"]) < 0]


def all_reloads_settled(daemon: Daemon) -> bool:
    started = {r["generation"] for r in daemon.records("reload_started")}
    completed = {r["generation"] for r in daemon.records("reload_completed")}
    return started <= completed or bool(daemon.records("reload_failed"))


def test_a_group_signal_storm_during_reloads_and_recycles_kills_no_worker() -> None:
    with start_daemon(ECHO, "--max-requests", "15", "--timeout", "10", workers=2) as daemon:
        with BackgroundLoad(*daemon.address, total=None, concurrency=8) as load:  # until stopped
            load.wait_answered(20)
            with group_storm(daemon.pid, count=1500, seconds=6) as storm:
                assert storm.over.wait(timeout=30)
            # The storm leaves workers little time to serve 15: the load goes on
            # until max_requests has recycled some, however fast the machine.
            poll_until(lambda: len(daemon.records("worker_recycled")) >= 3,
                       "max_requests recycling three workers under the load")  # fmt: skip
            load.wait_answered(load.answered + 20)  # still served after the storm
            result = load.stop()  # fails if the load ended before the storm did
        assert storm.sent >= 300, f"only {storm.sent} signals were sent: it proves nothing"
        poll_until(lambda: all_reloads_settled(daemon), "the last reload settles")
        assert killed_by_a_signal(daemon) == []
        assert daemon.records("reload_failed") == []
        assert len(daemon.records("reload_completed")) >= 3
        assert result.failures == [], result.failure_summary()
        assert daemon.proc.poll() is None
        with daemon.connect() as sock:
            assert exchange(sock, b"still here") == b"still here"


def test_a_group_signal_storm_during_an_upgrade_kills_neither_the_new_master_nor_its_workers(
) -> None:
    with start_daemon(ECHO, workers=2) as daemon:
        old_pid = daemon.pid
        with group_storm(daemon.pid, count=2000, seconds=10) as storm:
            daemon.proc.send_signal(signal.SIGUSR2)
            started = daemon.wait_log("upgrade_started")
            new_pid = int(started["new_pid"])
            # The new master stays in the group, so the storm reaches it from its exec on.
            assert os.getpgid(new_pid) == old_pid
            daemon.wait_log("upgrade_completed", new_pid=new_pid)
        assert storm.sent >= 50, f"only {storm.sent} signals were sent: it proves nothing"
        assert daemon.records("upgrade_failed") == []
        assert daemon.proc.wait(timeout=30) == 0
        daemon.wait_log("master_took_over", pid=new_pid)
        # The new master handles every signal it was handed blocked across its exec.
        with open(f"/proc/{new_pid}/status") as f:
            blocked = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
        handled = (signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD)
        assert [s.name for s in handled if blocked & (1 << (s - 1))] == []
        assert killed_by_a_signal(daemon) == []
        with daemon.connect() as sock:
            assert exchange(sock, b"the new one") == b"the new one"
        os.kill(new_pid, signal.SIGTERM)
        assert wait_pid(new_pid, timeout=30) == 0


def test_a_term_that_reaches_a_booting_worker_is_honoured_once_it_serves(tmp_path: Path) -> None:
    """TERM during the handler's import: the worker comes up, then finishes and exits 0."""
    env = {"SLOW_BOOT_DIR": str(tmp_path)}
    with start_daemon("tests.handlers.slow_boot:handle", workers=1, env=env,
                      wait_ready=False) as daemon:  # fmt: skip
        poll_until(lambda: any(tmp_path.glob("*.importing")), "a worker imports the handler")
        booting = int(next(tmp_path.glob("*.importing")).name.split(".")[0])
        os.kill(booting, signal.SIGTERM)
        (tmp_path / "go").touch()
        exited = daemon.wait_log("worker_exited", pid=booting)
        assert exited["exit_code"] == 0
        daemon.wait_log("worker_ready", pid=booting)  # it booted before it left
