"""HUP with real processes: a new generation, zero loss under load, failures harmless."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    exchange,
    read_line,
    recv_all,
    reload_under_load,
    start_daemon,
    wait_gone,
)

ECHO = "forkserver.examples.echo:handle"

# A handler whose answer says which version of its code runs.
VERSIONED = """
import socket
VERSION = b"{version}"

def handle(conn: socket.socket, peer: object) -> None:
    conn.sendall(VERSION + b" held\\n")
    data = conn.recv(100)
    conn.sendall(VERSION + b" " + data)
"""


@pytest.fixture
def code_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fs-code-") as path:
        yield Path(path)


def write_module(directory: Path, version: str) -> None:
    path = directory / "versioned_handler.py"
    path.write_text(VERSIONED.format(version=version))
    # Make sure the new text is not taken for the old by a coarse mtime.
    stamp = time.time() + (1 if version != "1" else 0)
    os.utime(path, (stamp, stamp))


def test_reload_under_load_answers_every_request() -> None:
    reloads = 5
    with start_daemon(ECHO, workers=2) as daemon:
        before = {p.pid for p in daemon.workers()}
        result = reload_under_load(daemon, reloads)
        assert result.failures == [], result.failure_summary()
        assert result.answered == result.attempted
        completed = [r["generation"] for r in daemon.records("reload_completed")]
        assert completed == list(range(1, reloads + 1))
        assert daemon.records("reload_failed") == []
        after = {p.pid for p in daemon.workers()}
        assert not before & after, "the first generation was never retired"
        assert daemon.stop() == 0


def test_reload_runs_the_new_code_and_lets_old_workers_finish(code_dir: Path) -> None:
    write_module(code_dir, "1")
    env = {"PYTHONPATH": f"{code_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with start_daemon("versioned_handler:handle", workers=1, env=env) as daemon:
        old_worker = daemon.workers()[0].pid
        with daemon.connect() as held:
            assert read_line(held) == b"1 held\n"
            write_module(code_dir, "2")
            before = len(daemon.notifications)
            daemon.proc.send_signal(signal.SIGHUP)
            daemon.wait_notify("RELOADING=1", since=before)
            completed = daemon.wait_log("reload_completed")
            assert completed["generation"] == 1
            with daemon.connect() as fresh:
                assert read_line(fresh) == b"2 held\n"  # new code, new generation
                fresh.sendall(b"new\n")
                assert recv_all(fresh) == b"2 new\n"
            assert psutil_alive(old_worker), "an old worker holding a connection was stopped"
            held.sendall(b"old\n")
            assert recv_all(held) == b"1 old\n"  # the old worker finished its connection
        assert daemon.wait_log("worker_exited", pid=old_worker)["exit_code"] == 0
        reloading = daemon.wait_notify("RELOADING=1", since=before)
        after = daemon.notifications.index(reloading) + 1
        ready_again = daemon.wait_notify("READY=1", since=after)  # the new generation is up
        assert "generation 1" in ready_again
        assert daemon.stop() == 0


def psutil_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_invalid_config_file_keeps_the_running_settings_and_workers(tmp_path: Path) -> None:
    config = tmp_path / "forkserver.toml"
    config.write_text("max_requests = 0\n")
    with start_daemon(ECHO, "-c", str(config), workers=2) as daemon:
        before = sorted(p.pid for p in daemon.workers())
        config.write_text("max_requests = -5\n")
        daemon.proc.send_signal(signal.SIGHUP)
        failed = daemon.wait_log("reload_failed")
        assert "max_requests" in failed["message"]
        assert sorted(p.pid for p in daemon.workers()) == before
        with daemon.connect() as sock:
            assert exchange(sock, b"still here") == b"still here"
        # The next good reload works.
        config.write_text("max_requests = 0\n")
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed")
        wait_gone(before)
        assert daemon.stop() == 0


def test_a_handler_that_no_longer_imports_fails_the_reload_and_keeps_serving(
    code_dir: Path,
) -> None:
    write_module(code_dir, "1")
    env = {"PYTHONPATH": f"{code_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with start_daemon("versioned_handler:handle", workers=1, env=env) as daemon:
        before = daemon.workers()[0].pid
        (code_dir / "versioned_handler.py").write_text("raise ImportError('broken on disk')\n")
        daemon.proc.send_signal(signal.SIGHUP)
        failed = daemon.wait_log("reload_failed")
        assert "broken on disk" in failed["message"]
        assert [p.pid for p in daemon.workers()] == [before]
        with daemon.connect() as sock:
            assert read_line(sock) == b"1 held\n"
            sock.sendall(b"x\n")
            assert recv_all(sock) == b"1 x\n"
        assert daemon.stop() == 0


def test_with_preload_a_reload_changes_the_configuration_only(tmp_path: Path) -> None:
    config = tmp_path / "forkserver.toml"
    config.write_text('name = "before"\n')
    with start_daemon(ECHO, "--preload", "-c", str(config), workers=1) as daemon:
        before = [p.pid for p in daemon.workers()]
        config.write_text('name = "after"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        started = daemon.wait_log("reload_started")
        assert started["preload"] is True
        assert started["message"] == (
            "reloading: generation 1 starts with the configuration as it is now and the "
            "handler code as the master loaded it (preload): this reloads the configuration "
            "only; USR2 loads new code"
        )
        daemon.wait_log("reload_completed")
        daemon.wait_log("worker_exited", pid=before[0])  # reaped: no zombie left to list
        titles = [" ".join(p.cmdline()) for p in daemon.workers()]
        assert titles and all("[after]" in title for title in titles), titles
        assert daemon.stop() == 0


CRASHING = """
import os
import setproctitle

if os.path.exists({flag!r}) and setproctitle.getproctitle().startswith("forkserver: worker"):
    raise RuntimeError("broken in workers while the flag file exists")


def handle(conn, peer):
    conn.sendall(b"fixed")
"""


def test_a_reload_with_fixed_code_ends_a_crash_loop(code_dir: Path) -> None:
    flag = code_dir / "broken"
    flag.touch()
    (code_dir / "crashing_handler.py").write_text(CRASHING.format(flag=str(flag)))
    env = {"PYTHONPATH": f"{code_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with start_daemon("crashing_handler:handle", workers=1, env=env, wait_ready=False) as daemon:
        daemon.wait_log("worker_backoff", delay=0.4)  # three crashes in a row
        flag.unlink()
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed", generation=1)
        daemon.wait_notify("READY=1")
        with daemon.connect() as sock:
            assert recv_all(sock) == b"fixed"
        completed = daemon.records("reload_completed")[0]
        after = [r for r in daemon.records("worker_backoff") if r["time"] > completed["time"]]
        assert after == [], "the crash loop went on after the reload"
        assert daemon.stop() == 0
