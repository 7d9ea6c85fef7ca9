"""Run-time control of a real daemon: ``forkserver ctl``, TTIN/TTOU, USR1."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from forkserver import control
from tests.support import Daemon, start_daemon


@contextmanager
def controlled(workers: int = 2) -> Iterator[tuple[Daemon, str]]:
    scratch = tempfile.mkdtemp(prefix="fs-")
    path = os.path.join(scratch, "ctl.sock")
    try:
        with start_daemon(
            "tests.handlers.basic:pid", "--control-socket", path, workers=workers
        ) as daemon:
            yield daemon, path
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(scratch)


def test_status_lists_the_master_and_every_worker() -> None:
    with controlled(workers=2) as (daemon, path):
        status = control.request(path, "status")
        master = status["master"]
        assert master["pid"] == daemon.pid
        assert master["state"] == "running"
        assert master["workers_target"] == 2
        assert master["accepting"] is True
        host, port = daemon.address
        assert [listener["address"] for listener in master["listeners"]] == [f"{host}:{port}"]
        assert master["listeners"][0]["inode"] == os.fstat(daemon.listener.fileno()).st_ino
        workers = status["workers"]
        assert [w["slot"] for w in workers] == [0, 1]
        assert {w["pid"] for w in workers} == {p.pid for p in daemon.workers()}
        assert all(w["state"] == "ready" and w["in_flight"] == 0 for w in workers)


def test_a_dead_workers_exit_and_last_error_show_in_status() -> None:
    with controlled(workers=1) as (daemon, path):
        victim = daemon.workers()[0].pid
        os.kill(victim, signal.SIGKILL)
        daemon.wait_log("worker_exited", pid=victim)
        daemon.logs.wait_for(
            lambda r: r.get("event") == "worker_ready" and r.get("pid") != victim,
            20,
            "the replacement ready",
        )
        (worker,) = control.request(path, "status")["workers"]
        assert worker["restarts"] == 1
        assert worker["last_exit"] == "killed by SIGKILL"
        assert worker["pid"] != victim


def test_scale_up_and_down_over_the_control_socket() -> None:
    with controlled(workers=1) as (daemon, path):
        assert control.request(path, "scale", {"workers": 3}) == {"workers": 3}
        for slot in (1, 2):
            daemon.wait_log("worker_ready", slot=slot)
        assert len(daemon.workers()) == 3
        control.request(path, "scale", {"workers": 1})
        for slot in (1, 2):
            assert daemon.wait_log("worker_exited", slot=slot)["exit_code"] == 0
        status = control.request(path, "status")
        assert status["master"]["workers_target"] == 1
        assert [w["slot"] for w in status["workers"]] == [0]


def test_ttin_and_ttou_add_and_remove_one_worker() -> None:
    with start_daemon("tests.handlers.basic:pid", workers=1) as daemon:
        daemon.proc.send_signal(signal.SIGTTIN)
        daemon.wait_log("worker_ready", slot=1)
        daemon.proc.send_signal(signal.SIGTTOU)
        assert daemon.wait_log("worker_exited", slot=1)["exit_code"] == 0
        assert daemon.wait_log("workers_scaled", target=1, previous=2)
        daemon.proc.send_signal(signal.SIGTTOU)  # never below 1
        refused = daemon.wait_log("workers_scaled", refused=True)
        assert "at least 1" in refused["message"]
        assert [w.pid for w in daemon.workers()] == [
            r["pid"] for r in daemon.records("worker_spawned") if r["slot"] == 0
        ]


def test_stop_over_the_control_socket_is_graceful() -> None:
    with controlled(workers=1) as (daemon, path):
        assert control.request(path, "stop") is None
        assert daemon.proc.wait(timeout=20) == 0
        assert not os.path.exists(path)
