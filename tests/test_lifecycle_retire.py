"""Retiring workers with real processes: every retirement has a deadline, planned exits
are INFO with their cause, only unasked deaths are warnings, and the counters in
``ctl status`` keep planned replacements, deaths and handler errors apart."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path
from typing import Any

from forkserver import control
from tests.loadgen import run_load
from tests.support import Daemon, poll_until, read_line, recv_all, start_daemon, wait_gone

GATE = "tests.handlers.basic:gate"
ECHO = "forkserver.examples.echo:handle"


def totals(path: str) -> dict[str, Any]:
    return dict(control.request(path, "status")["master"]["totals"])


def holding(path: str, pid: int) -> bool:
    """Does worker *pid* hold a connection, as ``ctl status`` says?"""
    workers = control.request(path, "status")["workers"]
    return any(w["pid"] == pid and w["in_flight"] == 1 for w in workers)


def exits(daemon: Daemon) -> list[dict[str, Any]]:
    return daemon.records("worker_exited")


def test_a_reload_kills_an_old_worker_still_busy_after_graceful_timeout(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    with start_daemon(GATE, "--graceful-timeout", "1", "--control-socket", path,
                      workers=1) as daemon:  # fmt: skip
        (old,) = (w.pid for w in daemon.workers())
        with daemon.connect(timeout=30) as held:  # the handler waits for data that never comes
            poll_until(lambda: holding(path, old), "the old worker holds the connection")
            daemon.proc.send_signal(signal.SIGHUP)
            daemon.wait_log("reload_completed", generation=1)
            killed = daemon.wait_log("worker_killed", pid=old)
            assert (killed["stage"], killed["cause"], killed["level"]) == (
                "graceful_timeout", "reload", "warning")
            wait_gone([old])
            with contextlib.suppress(ConnectionResetError):  # the client sees its end
                assert recv_all(held) == b""
        exited = daemon.wait_log("worker_exited", pid=old)
        assert exited["exit_code"] == -signal.SIGKILL
        assert (exited["cause"], exited["planned"], exited["level"]) == ("reload", True, "info")
        with daemon.connect() as sock:  # the new generation serves
            sock.sendall(b"x")
            new, data = recv_all(sock).split()
        assert int(new) != old and data == b"x"
        assert daemon.stop() == 0


def test_a_scaled_down_worker_is_killed_after_graceful_timeout_too(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    with start_daemon(GATE, "--graceful-timeout", "0.5", "--control-socket", path,
                      workers=2) as daemon:  # fmt: skip
        busy = {w["slot"]: w["pid"] for w in control.request(path, "status")["workers"]}
        held = [daemon.connect(timeout=30) for _ in range(2)]
        try:
            poll_until(lambda: holding(path, busy[1]), "worker 1 holds a connection")
            control.request(path, "scale", {"workers": 1})
            killed = daemon.wait_log("worker_killed", pid=busy[1])
            assert (killed["stage"], killed["cause"]) == ("graceful_timeout", "scale-down")
            wait_gone([busy[1]])
        finally:
            for sock in held:
                sock.close()
        exited = daemon.wait_log("worker_exited", pid=busy[1])
        assert (exited["cause"], exited["planned"], exited["level"]) == ("scale-down", True,
                                                                         "info")  # fmt: skip
        assert daemon.stop() == 0


def test_the_sigkill_after_a_stack_dump_is_logged_as_its_own_stage() -> None:
    with start_daemon("tests.handlers.stubborn:ignore_abrt_and_hang", "--timeout", "0.5",
                      workers=1) as daemon:  # fmt: skip
        with daemon.connect() as sock:
            stuck = int(read_line(sock).split()[0])
            daemon.wait_log("worker_timeout", pid=stuck)  # ABRT: ignored by this handler
            killed = daemon.wait_log("worker_killed", pid=stuck)
            assert (killed["stage"], killed["cause"], killed["level"]) == (
                "timeout", "timeout", "error")
        exited = daemon.wait_log("worker_exited", pid=stuck)
        assert exited["exit_code"] == -signal.SIGKILL
        assert (exited["cause"], exited["planned"], exited["level"]) == ("timeout", False,
                                                                         "warning")  # fmt: skip


def test_planned_exits_are_info_with_their_cause_and_an_unasked_death_is_a_warning(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "ctl.sock")
    with start_daemon(ECHO, "--max-requests", "3", "--control-socket", path,
                      workers=2) as daemon:  # fmt: skip
        host, port = daemon.address
        assert run_load(host, port, total=12, concurrency=2).failures == []
        # Every max_requests recycle settled first: a worker already retiring
        # for it keeps that cause through the reload, and on a loaded machine
        # both could be, leaving no exit caused by the reload at all.
        poll_until(lambda: [w["state"] for w in control.request(path, "status")["workers"]]
                   == ["ready", "ready"], "two ready workers, none retiring")  # fmt: skip
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed", generation=1)
        daemon.wait_log("worker_exited", cause="reload")
        daemon.proc.send_signal(signal.SIGTTOU)
        scaled = daemon.wait_log("worker_retired")
        daemon.wait_log("worker_exited", pid=scaled["pid"])
        poll_until(lambda: len(control.request(path, "status")["workers"]) == 1,
                   "one worker is left")  # fmt: skip
        causes = {r["cause"] for r in exits(daemon)}
        assert causes == {"max_requests", "reload", "scale-down"}, causes
        assert all(r["planned"] and r["level"] == "info" for r in exits(daemon))
        assert not [r for r in daemon.logs.records if r["level"] in ("warning", "error")]
        (victim,) = (w["pid"] for w in control.request(path, "status")["workers"])
        # The victim itself too: its worker_spawned line may not have been read yet.
        known = {r["pid"] for r in daemon.records("worker_spawned")} | {victim}
        os.kill(victim, signal.SIGKILL)
        died = daemon.wait_log("worker_exited", pid=victim)
        assert (died["cause"], died["planned"], died["level"]) == ("died", False, "warning")
        daemon.logs.wait_for(lambda r: r.get("event") == "worker_ready"
                             and r["pid"] not in known, 20, "its successor ready")  # fmt: skip
        last = control.request(path, "status")["master"]["totals"]
        assert daemon.stop() == 0
        assert daemon.wait_log("worker_exited", cause="stop")["level"] == "info"
    assert last["deaths"] == last["restarts"] == 1


def test_reloads_count_as_replacements_and_handler_errors_survive_them(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    with start_daemon("tests.handlers.basic:boom", "--control-socket", path,
                      workers=2) as daemon:  # fmt: skip
        with daemon.connect() as sock:
            sock.sendall(b"boom")
            sock.shutdown(socket.SHUT_WR)
            recv_all(sock)
        daemon.wait_log("handler_error")
        poll_until(lambda: totals(path)["handler_errors"] == 1, "the error is counted")
        assert totals(path)["errors"] == 1
        for generation in (1, 2):
            daemon.proc.send_signal(signal.SIGHUP)
            daemon.wait_log("reload_completed", generation=generation)
        poll_until(lambda: totals(path)["replaced"] == 4, "both generations' workers replaced")
        after = totals(path)
        assert (after["deaths"], after["restarts"]) == (0, 0)
        assert (after["handler_errors"], after["errors"]) == (1, 1)
        workers = control.request(path, "status")["workers"]
        assert sum(w["replaced"] for w in workers) == 4
        assert all(w["deaths"] == w["restarts"] == 0 for w in workers)
        assert daemon.stop() == 0
