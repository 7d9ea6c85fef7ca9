"""``forkserver ctl scale +N/-N`` and ``forkserver ctl kill``, through the real CLI
against a real daemon."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from forkserver import control
from forkserver.commands import scaled_target
from tests.support import ROOT, TIMEOUT, Daemon, poll_until, recv_all, start_daemon

GATE = "tests.handlers.basic:gate"


def ctl(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forkserver", "ctl", "--socket", path, *args],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, check=False,
    )  # fmt: skip


@contextmanager
def controlled(tmp_path: Path, workers: int) -> Iterator[tuple[Daemon, str]]:
    path = str(tmp_path / "ctl.sock")
    with start_daemon(GATE, "--control-socket", path, workers=workers) as daemon:
        yield daemon, path


def target(path: str) -> int:
    return int(control.request(path, "status")["master"]["workers_target"])


def running(path: str) -> dict[int, int]:
    """slot -> pid of each worker not stopping."""
    workers = control.request(path, "status")["workers"]
    return {w["slot"]: w["pid"] for w in workers if w["state"] != "stopping"}


def test_scale_by_a_relative_count_moves_the_current_target(tmp_path: Path) -> None:
    with controlled(tmp_path, workers=3) as (daemon, path):
        done = ctl(path, "scale", "+1")
        assert (done.returncode, done.stdout) == (0, "workers: 4\n"), done.stderr
        daemon.wait_log("worker_ready", slot=3)
        assert target(path) == 4
        assert ctl(path, "scale", "-2").stdout == "workers: 2\n"
        poll_until(lambda: len(running(path)) == 2, "two workers left")
        assert ctl(path, "scale", "-10").stdout == "workers: 1\n"  # never below 1
        poll_until(lambda: target(path) == 1, "one worker wanted")
        for bad in ("+", "1x", "+-1", "two"):
            refused = ctl(path, "scale", bad)
            assert refused.returncode == 64, bad
            assert "expected a worker count N, or +N / -N" in refused.stderr
        assert target(path) == 1
        assert daemon.stop() == 0


def test_a_relative_count_never_goes_past_the_bounds() -> None:
    assert scaled_target(3, +1) == 4
    assert scaled_target(3, -5) == 1
    assert scaled_target(4000, +200) == control.MAX_WORKERS


def test_kill_retires_a_worker_that_finishes_its_connection_while_a_successor_serves(
    tmp_path: Path,
) -> None:
    with controlled(tmp_path, workers=1) as (daemon, path):
        (old,) = running(path).values()
        with daemon.connect() as held:
            poll_until(lambda: control.request(path, "status")["workers"][0]["in_flight"] == 1,
                       "the worker holds the connection")  # fmt: skip
            done = ctl(path, "kill", "0")  # by slot
            assert done.returncode == 0, done.stderr
            assert f"pid: {old}" in done.stdout
            ready = daemon.logs.wait_for(
                lambda r: r.get("event") == "worker_ready" and r["pid"] != old, TIMEOUT,
                "a successor ready",
            )  # fmt: skip
            with daemon.connect() as sock:  # the successor serves meanwhile
                sock.sendall(b"new")
                assert recv_all(sock) == b"%d new" % ready["pid"]
            held.sendall(b"old")  # the retired worker finishes what it held
            assert recv_all(held) == b"%d old" % old
        exited = daemon.wait_log("worker_exited", pid=old)
        assert (exited["exit_code"], exited["cause"], exited["planned"], exited["level"]) == (
            0, "ctl kill", True, "info")
        again = ctl(path, "kill", str(ready["pid"]))  # by pid
        assert again.returncode == 0, again.stderr
        daemon.wait_log("worker_exited", pid=ready["pid"], cause="ctl kill")
        assert control.request(path, "status")["master"]["totals"]["deaths"] == 0
        assert daemon.stop() == 0


def test_kill_with_a_signal_sends_it_and_the_worker_is_replaced_at_once(tmp_path: Path) -> None:
    with controlled(tmp_path, workers=2) as (daemon, path):
        victim = running(path)[1]
        done = ctl(path, "kill", str(victim), "--signal", "kill")
        assert done.returncode == 0, done.stderr
        assert "signal: KILL" in done.stdout
        exited = daemon.wait_log("worker_exited", pid=victim)
        assert exited["exit_code"] == -signal.SIGKILL
        assert (exited["cause"], exited["planned"], exited["level"]) == ("ctl kill", True, "info")
        assert daemon.records("worker_backoff") == []  # asked for: not a crash
        daemon.logs.wait_for(lambda r: r.get("event") == "worker_ready" and r["slot"] == 1
                             and r["pid"] != victim, TIMEOUT,
                             "its successor")  # fmt: skip
        assert daemon.stop() == 0


def test_kill_refuses_an_unknown_worker_and_an_unknown_signal(tmp_path: Path) -> None:
    with controlled(tmp_path, workers=1) as (daemon, path):
        unknown = ctl(path, "kill", "7")
        assert unknown.returncode == 1
        assert "no worker has pid or slot 7" in unknown.stderr
        for bad in ("HUP", "SIGSTOP", "9"):
            refused = ctl(path, "kill", "0", "--signal", bad)
            assert refused.returncode == 64, bad
            assert "expected one of TERM, QUIT, ABRT, KILL" in refused.stderr
        assert ctl(path, "kill", "slot0").returncode == 64
        assert len(running(path)) == 1
        assert daemon.records("worker_exited") == []
        assert daemon.stop() == 0
