"""The crash back-off with real processes: only unplanned deaths count, slot by slot,
the service is never dark for long, a slot that cannot keep a worker degrades the
master, and a master none of whose workers ever boots gives up with exit status 3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from forkserver import control
from forkserver.worker_table import ALONE_DELAY, FIRST_DELAY
from tests.loadgen import run_load
from tests.support import ROOT, TIMEOUT, Daemon, poll_until, recv_all, start_daemon

ECHO = "forkserver.examples.echo:handle"
MARKED = "tests.handlers.fail_when_marked:handle"


def spawned(daemon: Daemon, *running: dict[int, int]) -> set[int]:
    """Every worker pid forked so far: those logged, and those *running* (their
    worker_spawned line may be still unread when the control socket shows them)."""
    return {r["pid"] for r in daemon.records("worker_spawned")}.union(
        *(workers.values() for workers in running))


def successor(daemon: Daemon, slot: int, known: set[int]) -> dict[str, Any]:
    """The worker_ready in *slot* of a worker that is none of *known* (forked later)."""
    return daemon.logs.wait_for(
        lambda r: r.get("event") == "worker_ready" and r.get("slot") == slot
        and r.get("pid") not in known,
        TIMEOUT,  # well below the 30 s a shared crash count used to impose
        f"a new worker ready in slot {slot}",
    )


def ready_workers(path: str, count: int = 2, max_requests: int | None = None) -> dict[int, int]:
    """slot -> pid of the ready workers, from ``ctl status``, once *count* slots have one.

    With *max_requests*, only workers that hold nothing and are below the
    limit count: one whose last DONE is still on its way may yet be
    retired for max_requests, and then a kill would not be a death.
    """
    found: dict[int, int] = {}

    def settled(worker: dict[str, Any]) -> bool:
        if max_requests is None:
            return True
        return worker["in_flight"] == 0 and worker["served"] < max_requests

    def ready() -> bool:
        status = control.request(path, "status")
        found.clear()
        found.update((w["slot"], w["pid"]) for w in status["workers"]
                     if w["state"] == "ready" and settled(w))  # fmt: skip
        return len(found) == count

    poll_until(ready, f"{count} workers ready")  # a recycled slot's successor may be starting
    return dict(found)


def test_recycled_workers_do_not_count_as_crashes_and_a_killed_one_is_replaced_at_once(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "ctl.sock")
    with start_daemon(ECHO, "--max-requests", "2", "--control-socket", path,
                      workers=2) as daemon:  # fmt: skip
        host, port = daemon.address
        result = run_load(host, port, total=120, concurrency=4)
        assert result.failures == [], result.failure_summary()

        def recycled() -> list[dict[str, Any]]:
            return [r for r in daemon.records("worker_exited") if r["cause"] == "max_requests"]

        # A recycled worker exits after its last answer: its exit may come later.
        poll_until(lambda: len(recycled()) >= 20, "20 workers recycled by max_requests")
        assert all(r["planned"] and r["level"] == "info" for r in recycled())
        assert daemon.records("worker_backoff") == []
        # One SIGKILL: a death nobody asked for, replaced at once.
        workers = ready_workers(path, max_requests=2)
        known = spawned(daemon, workers)
        os.kill(workers[0], signal.SIGKILL)
        died = daemon.wait_log("worker_exited", pid=workers[0])
        assert (died["cause"], died["planned"], died["level"]) == ("died", False, "warning")
        successor(daemon, 0, known)
        # Both: the service is back as soon as their successors are ready.
        workers = ready_workers(path, max_requests=2)
        known = spawned(daemon, workers)
        for pid in workers.values():
            os.kill(pid, signal.SIGKILL)
        for slot, pid in workers.items():
            daemon.wait_log("worker_exited", pid=pid)
            successor(daemon, slot, known)
        # Only the kills count: slot 0 at most twice (two young workers killed in a row).
        backoffs = daemon.records("worker_backoff")
        assert all(r["crashes"] <= 2 and r["delay"] <= 2 * FIRST_DELAY for r in backoffs)
        assert run_load(host, port, total=10).failures == []
        assert daemon.stop() == 0


def test_with_no_worker_ready_a_slot_in_a_long_back_off_is_tried_again_within_a_second(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "fail"
    path = str(tmp_path / "ctl.sock")
    env = {"TEST_FAIL_MARKER": str(marker)}
    with start_daemon(MARKED, "--control-socket", path, workers=2, env=env) as daemon:
        workers = ready_workers(path)
        marker.touch()  # from now on no worker can boot
        known = spawned(daemon, workers)
        os.kill(workers[0], signal.SIGKILL)
        # Slot 1 still serves, so slot 0's back-off grows well past ALONE_DELAY.
        daemon.wait_log("worker_backoff", slot=0, delay=3.2)
        os.kill(workers[1], signal.SIGKILL)
        daemon.wait_log("worker_exited", pid=workers[1])
        # No worker is ready: slot 0's pending try is brought forward to ALONE_DELAY.
        daemon.wait_log("worker_backoff", slot=0, delay=ALONE_DELAY)
        marker.unlink()
        for slot in workers:
            successor(daemon, slot, known)
        assert daemon.stop() == 0


def test_a_slot_that_cannot_keep_a_worker_degrades_the_master_until_one_is_ready(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "fail"
    path = str(tmp_path / "ctl.sock")
    env = {"TEST_FAIL_MARKER": str(marker)}
    with start_daemon(MARKED, "--control-socket", path, "--startup-timeout", "0.2",
                      workers=2, env=env) as daemon:  # fmt: skip
        status = control.request(path, "status")["master"]
        assert (status["state"], status["failing"]) == ("running", [])
        workers = ready_workers(path)
        marker.touch()  # its replacement cannot boot
        os.kill(workers[1], signal.SIGKILL)
        degraded = daemon.wait_log("master_degraded")
        assert (degraded["level"], degraded["slots"]) == ("warning", [1])
        daemon.wait_log("worker_backoff", slot=1, delay=0.4)  # past startup_timeout, too
        status = control.request(path, "status")["master"]
        assert status["state"] == "degraded"
        assert [f["slot"] for f in status["failing"]] == [1]
        assert status["failing"][0]["crashes"] >= 2
        text = subprocess.run(
            [sys.executable, "-m", "forkserver", "ctl", "--socket", path, "status"],
            capture_output=True, text=True, check=True, timeout=TIMEOUT, cwd=ROOT,
        ).stdout  # fmt: skip
        assert "state degraded" in text
        assert "degraded: slot 1 has no ready worker" in text
        daemon.wait_notify("degraded: slot 1 failing")
        with daemon.connect() as sock:  # slot 0 serves on meanwhile
            assert int(recv_all(sock)) == workers[0]
        marker.unlink()
        recovered = daemon.wait_log("master_recovered")
        assert recovered["level"] == "info"
        assert control.request(path, "status")["master"]["state"] == "running"
        assert daemon.proc.poll() is None  # it was ready before startup_timeout: no exit
        assert daemon.stop() == 0


def test_a_master_whose_workers_never_boot_exits_3_after_startup_timeout() -> None:
    with start_daemon("tests.handlers.worker_boot_failure:handle", "--startup-timeout", "1",
                      workers=2, wait_ready=False) as daemon:  # fmt: skip
        daemon.wait_log("master_degraded")
        assert daemon.proc.wait(timeout=TIMEOUT) == 3
        failed = daemon.wait_log("master_failed")
        assert failed["exit_code"] == 3
        assert "startup_timeout" in failed["message"]
        assert "exit code 3" in failed["message"]  # how the workers ended
        assert daemon.records("worker_ready") == []
        daemon.wait_notify("STATUS=cannot start: no worker became ready")
