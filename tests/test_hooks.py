"""Hooks with real processes: each runs where the docs say, with what they say, once.

Master hooks run in a child of the master that dropped privileges; worker
hooks in the worker after its drop; failures and hangs are bounded and
reported.  The hooks (tests/handlers/hooked.py) record each call as a
file, so the test sees which process ran it and as whom.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, TIMEOUT, poll_until, read_line, start_daemon, wait_pid

HOOKS = "tests.handlers.hooked"
PID = "tests.handlers.hooked_app:handle"
ROOTED = os.geteuid() == 0


def records(directory: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(directory.glob(f"{name}.*"))
            if path.stat().st_size]  # fmt: skip


def wait_records(directory: Path, name: str, count: int = 1) -> list[dict[str, Any]]:
    poll_until(lambda: len(records(directory, name)) >= count, f"{count} {name} record(s)")
    return records(directory, name)


def hook_args(*names: str, target: str = "") -> list[str]:
    args: list[str] = []
    for name in names:
        args += [f"--{name.replace('_', '-')}", target or f"{HOOKS}:{name}"]
    return args


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory user nobody can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="fs-hooks-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def hook_dir(scratch: Path) -> Path:
    directory = scratch / "records"
    directory.mkdir()
    directory.chmod(0o777)  # the hooks run as the workers' user
    return directory


def test_every_hook_runs_in_its_process_after_the_privilege_drop(hook_dir: Path,
                                                                  scratch: Path) -> None:
    user = ["--user", "nobody"] if ROOTED else []
    uid = pwd.getpwnam("nobody").pw_uid if ROOTED else os.getuid()
    config = scratch / "forkserver.toml"
    config.write_text('name = "first"\n')
    config.chmod(0o644)
    names = ("on_starting", "when_ready", "on_reload", "on_exit", "post_fork",
             "post_worker_init", "worker_exit")
    env = {"HOOK_DIR": str(hook_dir)}
    with start_daemon(PID, "-c", str(config), *user, *hook_args(*names), env=env,
                      workers=2) as daemon:
        [starting] = records(hook_dir, "on_starting")  # before READY=1: it ran first
        assert starting["ppid"] == daemon.pid and starting["workers"] == 2
        forks = wait_records(hook_dir, "post_fork", 2)
        inits = wait_records(hook_dir, "post_worker_init", 2)
        # The workers by their own records: the master's children include a hook's
        # child while one runs (when_ready's may still be alive now).
        workers = {r["pid"] for r in forks}
        assert {r["pid"] for r in inits} == workers
        assert workers <= {p.pid for p in daemon.workers()}
        assert {r["slot"] for r in forks} == {0, 1}
        assert all(r["master"] == daemon.pid for r in forks)
        assert not any(r["handler_loaded"] for r in forks)  # post_fork: before the import
        assert all(r["handler_loaded"] for r in inits)      # post_worker_init: after it
        [ready] = wait_records(hook_dir, "when_ready")
        assert ready["target"] == 2 and ready["ppid"] == daemon.pid
        assert ready["pid"] not in workers  # a child of its own, not a worker

        config.write_text('name = "second"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed")
        [reloaded] = wait_records(hook_dir, "on_reload")
        assert (reloaded["old"], reloaded["new"]) == ("first", "second")
        new_workers = {r["pid"] for r in wait_records(hook_dir, "post_worker_init", 4)} - workers
        assert len(new_workers) == 2 and new_workers <= {p.pid for p in daemon.workers()}
        with daemon.connect() as sock:
            assert int(read_line(sock)) in new_workers | workers
        assert daemon.stop() == 0
    every = [r for name in (*names, "atexit") for r in records(hook_dir, name)]
    assert {r["uid"] for r in every} == {uid}  # none ran as root
    exits = records(hook_dir, "worker_exit")
    assert {r["pid"] for r in exits} == workers | new_workers
    assert {r["reason"] for r in exits} == {"stopped"}
    assert len(records(hook_dir, "on_exit")) == 1
    # atexit ran in every worker that left gracefully, and only there: not in the
    # hooks' own children, which import the module too but end with os._exit.
    assert {r["pid"] for r in records(hook_dir, "atexit")} == workers | new_workers


def _run(*args: str, env: dict[str, str],
         timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forkserver", "run", "--bind", "127.0.0.1:0", "--workers", "1",
         *args, PID], env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_a_failing_on_starting_hook_stops_the_start_with_78(hook_dir: Path) -> None:
    done = _run(*hook_args("on_starting", target=f"{HOOKS}:failing"),
                *hook_args("post_fork"), env={"HOOK_DIR": str(hook_dir)})
    assert done.returncode == 78, done.stderr
    assert "on_starting hook tests.handlers.hooked:failing raised RuntimeError" in done.stderr
    assert "this hook fails on purpose" in done.stderr
    assert records(hook_dir, "post_fork") == []  # no worker was ever forked


def test_a_hanging_on_starting_hook_is_killed_at_hook_timeout(hook_dir: Path) -> None:
    done = _run(*hook_args("on_starting", target=f"{HOOKS}:hanging"), "--hook-timeout", "0.5",
                env={"HOOK_DIR": str(hook_dir)})
    assert done.returncode == 78, done.stderr
    assert "did not finish within 0.5 s (hook_timeout)" in done.stderr


def test_a_failing_post_fork_is_a_boot_failure_with_back_off(hook_dir: Path) -> None:
    env = {"HOOK_DIR": str(hook_dir)}
    with start_daemon(PID, *hook_args("post_fork", target=f"{HOOKS}:failing"), env=env,
                      workers=1, wait_ready=False) as daemon:
        boot = daemon.wait_log("worker_boot_error")
        assert "post_fork hook tests.handlers.hooked:failing raised RuntimeError" in boot["error"]
        exited = daemon.wait_log("worker_exited")
        assert exited["exit_code"] == 3 and not exited["planned"]
        daemon.wait_log("worker_backoff")


def test_a_failing_worker_exit_is_logged_and_the_worker_still_exits(hook_dir: Path) -> None:
    env = {"HOOK_DIR": str(hook_dir)}
    with start_daemon(PID, *hook_args("worker_exit", target=f"{HOOKS}:failing"), env=env,
                      workers=1) as daemon:
        [worker] = daemon.workers()
        assert daemon.stop() == 0
        failed = [r for r in daemon.records("hook_failed") if r.get("hook") == "worker_exit"]
        assert len(failed) == 1 and failed[0]["pid"] == worker.pid
        assert "this hook fails on purpose" in failed[0]["message"]
        [exited] = daemon.records("worker_exited")
        assert exited["exit_code"] == 0 and exited["planned"]


def test_a_hanging_master_hook_never_stalls_the_master(hook_dir: Path) -> None:
    env = {"HOOK_DIR": str(hook_dir)}
    args = (*hook_args("when_ready", target=f"{HOOKS}:hanging"), "--hook-timeout", "2")
    with start_daemon(PID, *args, env=env, workers=1) as daemon:
        # From the log, not the master's children: the hanging hook is one of them.
        worker = daemon.wait_log("worker_ready")["pid"]
        with daemon.connect() as sock:  # while the hook hangs
            assert int(read_line(sock)) == worker
        failed = daemon.wait_log("hook_failed", hook="when_ready")
        assert "did not finish within 2 s (hook_timeout)" in failed["message"]
        with daemon.connect() as sock:
            assert int(read_line(sock)) == worker
        assert daemon.stop() == 0


def test_pre_exec_runs_before_the_new_master_starts(hook_dir: Path) -> None:
    env = {"HOOK_DIR": str(hook_dir)}
    with start_daemon(PID, *hook_args("pre_exec"), env=env, workers=1) as daemon:
        daemon.proc.send_signal(signal.SIGUSR2)
        started = daemon.wait_log("upgrade_started")
        [record] = records(hook_dir, "pre_exec")  # written before the upgrade began
        assert record["ppid"] == daemon.pid
        assert daemon.proc.wait(timeout=TIMEOUT) == 0  # the old master handed over
        os.kill(started["new_pid"], signal.SIGTERM)
        assert wait_pid(started["new_pid"]) == 0


def test_a_hanging_post_fork_is_killed_after_timeout(hook_dir: Path) -> None:
    env = {"HOOK_DIR": str(hook_dir)}
    args = (*hook_args("post_fork", target=f"{HOOKS}:hanging"), "--timeout", "1")
    with start_daemon(PID, *args, env=env, workers=1, wait_ready=False) as daemon:
        daemon.wait_log("worker_timeout")
        exited = daemon.wait_log("worker_exited")
        assert exited["cause"] == "timeout" and not exited["planned"]
