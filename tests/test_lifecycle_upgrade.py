"""USR2 with real processes: a new master takes the same sockets, nothing is lost."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import psutil

from tests.loadgen import BackgroundLoad
from tests.support import exchange, start_daemon, wait_gone, wait_pid

ECHO = "forkserver.examples.echo:handle"


def echo(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        return exchange(sock, payload)


def listening_inodes(pid: int) -> set[int]:
    """Inodes of the listening TCP sockets process *pid* holds."""
    inodes = set()
    for conn in psutil.Process(pid).net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN:
            for name in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{name}") if name.isdigit() else ""
                if target.startswith("socket:[") and int(name) == conn.fd:
                    inodes.add(int(target[8:-1]))
    return inodes


def test_usr2_under_load_hands_the_same_socket_to_a_new_master(tmp_path: Path) -> None:
    pid_file = tmp_path / "forkserver.pid"
    args = ("--pid-file", str(pid_file))
    with start_daemon(ECHO, *args, workers=2) as daemon:
        old_pid = daemon.pid
        inode = os.fstat(daemon.listener.fileno()).st_ino
        assert pid_file.read_text().strip() == str(old_pid)
        old_workers = [p.pid for p in daemon.workers()]
        host, port = daemon.address
        with BackgroundLoad(host, port, total=None, concurrency=16) as load:  # until stopped
            load.wait_answered(100)
            daemon.proc.send_signal(signal.SIGUSR2)
            completed = daemon.wait_log("upgrade_completed", pid=old_pid)
            new_pid = completed["new_pid"]
            assert daemon.proc.wait(timeout=30) == 0  # the old master drained and left
            load.wait_answered(load.answered + 100)  # the new master alone serves it
            result = load.stop()  # fails if the load ended before the upgrade did
        assert result.failures == [], result.failure_summary()
        assert result.answered == result.attempted
        wait_gone(old_workers)
        assert daemon.wait_notify("MAINPID=").split("MAINPID=")[1].split("\n")[0] == str(new_pid)
        new_master = psutil.Process(new_pid)
        assert "forkserver" in " ".join(new_master.cmdline())
        assert listening_inodes(new_pid) == {inode}  # the very same socket
        assert echo(daemon.address, b"after the upgrade") == b"after the upgrade"
        daemon.wait_log("master_took_over", pid=new_pid)
        assert pid_file.read_text().strip() == str(new_pid)
        os.kill(new_pid, signal.SIGTERM)
        assert wait_pid(new_pid, timeout=30) == 0  # ours now: we are the subreaper
        assert not pid_file.exists()


def test_a_new_master_that_cannot_start_leaves_the_old_one_serving(tmp_path: Path) -> None:
    config = tmp_path / "forkserver.toml"
    config.write_text("max_requests = 0\n")
    with start_daemon(ECHO, "-c", str(config), workers=1) as daemon:
        workers = [p.pid for p in daemon.workers()]
        config.write_text("max_requests = 'many'\n")
        daemon.proc.send_signal(signal.SIGUSR2)
        failed = daemon.wait_log("upgrade_failed")
        assert "exit code 78" in failed["message"]
        assert daemon.proc.poll() is None
        assert [p.pid for p in daemon.workers()] == workers
        assert echo(daemon.address, b"still the old one") == b"still the old one"
        # A later upgrade with the file fixed works.
        config.write_text("max_requests = 0\n")
        daemon.proc.send_signal(signal.SIGUSR2)
        new_pid = daemon.wait_log("upgrade_completed")["new_pid"]
        assert daemon.proc.wait(timeout=30) == 0
        assert echo(daemon.address, b"new") == b"new"
        os.kill(new_pid, signal.SIGTERM)
        assert wait_pid(new_pid, timeout=30) == 0
