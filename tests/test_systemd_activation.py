"""``forkserver run`` behind the real ``systemd-socket-activate``, telling a notify socket.

``systemd-socket-activate`` binds (or passes through) the listening
sockets, waits for the first connection, then execs the daemon in its
own process with ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID`` set,
just as systemd does.  A TCP socket the test bound on port 0 reaches it
through ``listen_shim.py`` (it passes inherited sockets through, and
takes no port 0 of its own); Unix sockets it binds itself.

``NotifyReceiver`` stands in for systemd's notify socket, with
``SO_PASSCRED`` so every message is checked to come from the master.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from forkserver.master import EXIT_UNAVAILABLE
from tests.support import LogReader, exchange, poll_until, recv_all, wait_gone
from tests.systemd_e2e.notify_receiver import Notification, NotifyReceiver

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "tests" / "systemd_e2e" / "listen_shim.py"
TIMEOUT = 20.0

pytestmark = pytest.mark.systemd


@dataclass
class Activated:
    proc: subprocess.Popen[bytes]
    logs: LogReader
    notify: NotifyReceiver

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=TIMEOUT)

    def until(self, key: str, timeout: float = TIMEOUT) -> tuple[Notification, list[Notification]]:
        """Up to the first message with *key*; every message must be the master's."""
        found, seen = self.notify.wait_for(key, timeout)
        assert {m.pid for m in seen} == {self.pid}, [(m.pid, m.fields) for m in seen]
        return found, seen


def activate_command(*args: str) -> list[str]:
    if not os.access("/usr/bin/systemd-socket-activate", os.X_OK):
        pytest.fail("systemd-socket-activate is not installed (apt-get install systemd)")
    return [
        "/usr/bin/systemd-socket-activate", "-E", "PYTHONPATH", "-E", "NOTIFY_SOCKET",
        *args,
    ]  # fmt: skip


def daemon_command(*args: str, handler: str = "forkserver.examples.echo:handle") -> list[str]:
    return [
        sys.executable, "-m", "forkserver", "run", "--workers", "2", "--log-format", "json",
        *args, handler,
    ]  # fmt: skip


@contextlib.contextmanager
def started(
    command: list[str], *, pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None
) -> Iterator[Activated]:
    """Run *command* in its own session; on the way out kill and reap all of it."""
    scratch = tempfile.mkdtemp(prefix="fs-sd-")  # short: Unix socket paths hold 107 bytes
    notify = NotifyReceiver(os.path.join(scratch, "notify"))
    proc: subprocess.Popen[bytes] | None = None
    logs: LogReader | None = None
    try:
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT),
            "NOTIFY_SOCKET": notify.env_value,
            **(env or {}),
        }
        proc = subprocess.Popen(
            command,
            pass_fds=pass_fds,
            env=full_env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        logs = LogReader(proc.stderr)
        logs.start()
        yield Activated(proc, logs, notify)
    except BaseException:
        if logs is not None:
            print("--- output of", " ".join(command), "\n" + logs.text())
        raise
    finally:
        if proc is not None:
            _kill_all(proc)
            if logs is not None:
                logs.join(timeout=TIMEOUT)
            if proc.stderr is not None:
                proc.stderr.close()
        notify.close()
        for name in os.listdir(scratch):
            os.unlink(os.path.join(scratch, name))
        os.rmdir(scratch)


def _kill_all(proc: subprocess.Popen[bytes]) -> None:
    children: list[int] = []
    with contextlib.suppress(psutil.Error):
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    wait_gone(children, TIMEOUT)


def echo(address: str | tuple[str, int], payload: bytes) -> bytes:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(address)
        return exchange(sock, payload)


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0), backlog=64) as sock:
        yield sock


def through_shim(sock: socket.socket, *activate_args: str) -> list[str]:
    """systemd-socket-activate receiving *sock* as an already-passed descriptor."""
    return [sys.executable, str(SHIM), str(sock.fileno()), "--", *activate_command(*activate_args)]


# -- TCP -------------------------------------------------------------------


def test_tcp_first_connection_activates_and_the_socket_outlives_the_daemon(
    tcp_listener: socket.socket,
) -> None:
    address = tcp_listener.getsockname()
    fd = tcp_listener.fileno()
    command = through_shim(tcp_listener, "--fdname=web", *daemon_command("--bind", "systemd:web"))
    with started(command, pass_fds=(fd,)) as daemon:
        # Nothing runs the daemon until a client arrives: this connection
        # waits in the backlog, starts it, and is served by it.
        assert echo(address, b"first") == b"first"
        ready, _ = daemon.until("READY")
        assert ready.get("STATUS"), "READY=1 comes with a status line"
        workers = psutil.Process(daemon.pid).children()
        assert len(workers) == 2
        for worker in workers:
            assert not {"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} & set(
                worker.environ()
            ), "a worker inherited the systemd variables"
        record = daemon.logs.wait_for(
            lambda r: r.get("event") == "master_started", TIMEOUT, "master_started"
        )
        assert str(address[1]) in record["message"]
        assert daemon.stop() == 0
        stopping, _ = daemon.until("STOPPING")
        assert stopping.pid == daemon.pid
    # The daemon is gone but the socket is systemd's (here: ours): it still
    # listens, a client that arrives now waits in the backlog ...
    with socket.create_connection(address, timeout=TIMEOUT) as waiting:
        waiting.sendall(b"queued while stopped")
        waiting.shutdown(socket.SHUT_WR)
        # ... and the next start serves it.
        with started(command, pass_fds=(fd,)) as again:
            assert recv_all(waiting) == b"queued while stopped"
            again.until("READY")
            assert again.stop() == 0


def test_with_no_bind_every_passed_socket_is_used(
    tcp_listener: socket.socket, tmp_path: Path
) -> None:
    path = str(tmp_path / "admin.sock")
    command = through_shim(tcp_listener, "--fdname=web:admin", "-l", path, *daemon_command())
    with started(command, pass_fds=(tcp_listener.fileno(),)) as daemon:
        assert echo(tcp_listener.getsockname(), b"over tcp") == b"over tcp"
        daemon.until("READY")
        assert echo(path, b"over unix") == b"over unix"
        assert daemon.stop() == 0
    assert os.path.exists(path), "the master unlinked a socket that systemd owns"


# -- Unix ------------------------------------------------------------------


def test_unix_socket_named_by_fdname(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    command = activate_command("-l", path, "--fdname=admin") + daemon_command(
        "--bind", "systemd:admin"
    )
    with started(command) as daemon:
        _wait_listening(daemon, path)
        assert echo(path, b"hello") == b"hello"
        daemon.until("READY")
        for _ in range(5):
            assert echo(path, b"again") == b"again"
        assert daemon.stop() == 0
    assert os.path.exists(path), "the master unlinked a socket that systemd owns"


def wait_line(logs: LogReader, text: str, timeout: float = TIMEOUT) -> str:
    """The first stderr line containing *text* (JSON or not), waiting for it."""
    deadline = time.monotonic() + timeout
    with logs.cond:
        while True:
            for line in logs.lines:
                if text in line:
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0 or logs.eof:
                tail = "\n".join(logs.lines[-30:])
                raise AssertionError(f"no line with {text!r} within {timeout} s:\n{tail}")
            logs.cond.wait(remaining)


def _wait_listening(daemon: Activated, path: str) -> None:
    """systemd-socket-activate logs once it has bound *path*."""
    wait_line(daemon.logs, f"Listening on {path}")


# -- refusals --------------------------------------------------------------


def test_a_name_that_was_not_passed_is_a_clear_error(tcp_listener: socket.socket) -> None:
    command = through_shim(tcp_listener, "--fdname=web", *daemon_command("--bind", "systemd:api"))
    with started(command, pass_fds=(tcp_listener.fileno(),)) as daemon:
        # The connection starts the daemon; nobody will serve it.
        socket.create_connection(tcp_listener.getsockname(), timeout=TIMEOUT).close()
        assert daemon.proc.wait(timeout=TIMEOUT) == EXIT_UNAVAILABLE
        assert "systemd:api" in daemon.logs.text()
        assert "ERRNO" in daemon.notify.next().names()


def test_a_datagram_socket_is_refused_naming_the_unit_setting(tmp_path: Path) -> None:
    path = str(tmp_path / "dgram.sock")
    command = activate_command("--datagram", "-l", path) + daemon_command()
    with started(command) as daemon:
        _wait_listening(daemon, path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.sendto(b"wake up", path)
        assert daemon.proc.wait(timeout=TIMEOUT) != 0
        assert "use ListenStream=" in daemon.logs.text()


def test_accept_yes_is_refused_naming_the_unit_setting(tmp_path: Path) -> None:
    path = str(tmp_path / "accept.sock")
    command = activate_command("--accept", "-l", path) + daemon_command()
    with started(command) as daemon:
        _wait_listening(daemon, path)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(TIMEOUT)
            client.connect(path)
            assert client.recv(100) == b"", "the per-connection daemon refused and closed it"
        wait_line(daemon.logs, "set Accept=no")


def test_sockets_for_another_pid_are_not_adopted(tcp_listener: socket.socket) -> None:
    fd = tcp_listener.fileno()
    command = [sys.executable, str(SHIM), "--listen-pid", "1", str(fd), "--"]
    command += daemon_command("--bind", "systemd")
    with started(command, pass_fds=(fd,)) as daemon:
        assert daemon.proc.wait(timeout=TIMEOUT) == EXIT_UNAVAILABLE
        text = daemon.logs.text()
        assert "LISTEN_PID=1 is not this process" in text


# -- the notify protocol over a whole life ---------------------------------


def test_watchdog_pings_from_the_master_and_stop_when_it_is_wedged(
    tcp_listener: socket.socket,
) -> None:
    fd = tcp_listener.fileno()
    # -E NAME passes NAME on, empty if unset: only this test sets it.
    command = through_shim(
        tcp_listener, "-E", "WATCHDOG_USEC", "--fdname=web", *daemon_command("--bind", "systemd")
    )
    with started(command, pass_fds=(fd,), env={"WATCHDOG_USEC": "400000"}) as daemon:
        assert echo(tcp_listener.getsockname(), b"go") == b"go"
        daemon.until("READY")
        for _ in range(3):
            daemon.until("WATCHDOG")  # every 0.2 s, from the master
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            master = psutil.Process(daemon.pid)
            poll_until(lambda: master.status() == psutil.STATUS_STOPPED, "master stopped")
            # Whatever was sent before the stop is drained; then silence.
            while daemon.notify.pending():
                daemon.notify.next()
            with pytest.raises(AssertionError, match="no notification within"):
                # Five watchdog intervals: a healthy loop would have pinged.
                daemon.notify.next(timeout=1.0)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        message, _ = daemon.until("WATCHDOG")
        assert message.pid == daemon.pid
        assert daemon.stop() == 0


def _mono_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_reload_is_bracketed_by_reloading_and_ready(tcp_listener: socket.socket) -> None:
    fd = tcp_listener.fileno()
    command = through_shim(tcp_listener, "--fdname=web", *daemon_command("--bind", "systemd"))
    with started(command, pass_fds=(fd,)) as daemon:
        assert echo(tcp_listener.getsockname(), b"go") == b"go"
        daemon.until("READY")
        before = _mono_usec()
        os.kill(daemon.pid, signal.SIGHUP)
        reloading, _ = daemon.until("RELOADING")
        assert before <= int(reloading.get("MONOTONIC_USEC") or 0) <= _mono_usec()
        daemon.until("READY")  # the new generation is up
        assert echo(tcp_listener.getsockname(), b"after") == b"after"
        assert daemon.stop() == 0


def test_a_long_drain_extends_the_stop_timeout(tcp_listener: socket.socket) -> None:
    fd = tcp_listener.fileno()
    command = through_shim(
        tcp_listener,
        "--fdname=web",
        *daemon_command(
            "--bind", "systemd", "--graceful-timeout", "15", handler="tests.handlers.basic:hold"
        ),
    )
    with started(command, pass_fds=(fd,)) as daemon:
        held = socket.create_connection(tcp_listener.getsockname(), timeout=TIMEOUT)
        with held:
            assert held.recv(100).endswith(b"held\n")
            daemon.until("READY")
            daemon.proc.send_signal(signal.SIGTERM)
            daemon.until("STOPPING")
            extend, _ = daemon.until("EXTEND_TIMEOUT_USEC")
            assert int(extend.get("EXTEND_TIMEOUT_USEC") or 0) > 0
            held.sendall(b"done\n")
            assert held.recv(100).endswith(b" done\n")
        assert daemon.proc.wait(timeout=TIMEOUT) == 0


def test_sockets_the_master_bound_are_stored_and_adopted_by_name_after_restart(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "own.sock")
    inode = 0
    with started(daemon_command("--bind", f"unix:{path}")) as first:
        stored, _ = first.until("FDSTORE")
        first.until("READY")
        try:
            assert len(stored.fds) == 1
            name = stored.get("FDNAME") or ""
            assert name, "FDSTORE=1 comes with FDNAME="
            kept = socket.socket(fileno=os.dup(stored.fds[0]))
        finally:
            stored.close_fds()
        inode = os.stat(path).st_ino
        assert first.stop() == 0
    with kept:
        assert kept.getsockname() == path
        # Between the two runs systemd holds the socket: a client waits.
        waiting = socket.socket(socket.AF_UNIX)
        with waiting:
            waiting.settimeout(TIMEOUT)
            waiting.connect(path)
            waiting.sendall(b"across the restart")
            waiting.shutdown(socket.SHUT_WR)
            command = [sys.executable, str(SHIM), "--names", name, str(kept.fileno()), "--"]
            command += daemon_command("--bind", f"unix:{path}")
            with started(command, pass_fds=(kept.fileno(),)) as second:
                assert recv_all(waiting) == b"across the restart"
                second.until("READY")
                assert os.stat(path).st_ino == inode, "the socket was bound again"
                assert second.stop() == 0


def test_notifications_follow_the_life_of_the_master(tcp_listener: socket.socket) -> None:
    """From start to exit: READY once workers are up, pings, STOPPING, nothing after."""
    fd = tcp_listener.fileno()
    command = through_shim(
        tcp_listener, "-E", "WATCHDOG_USEC", "--fdname=web", *daemon_command("--bind", "systemd")
    )
    with started(command, pass_fds=(fd,), env={"WATCHDOG_USEC": "1000000"}) as daemon:
        assert echo(tcp_listener.getsockname(), b"go") == b"go"
        _, life = daemon.until("READY")
        for _ in range(2):
            life += daemon.until("WATCHDOG")[1]
        assert daemon.stop() == 0
        while daemon.notify.pending():
            life.append(daemon.notify.next())
    assert {m.pid for m in life} == {daemon.pid}
    keys = [key for m in life for key in m.names()]
    assert keys.count("READY") == 1
    assert keys.count("STOPPING") == 1
    # Pings may start before READY=1 (the watchdog runs from the start);
    # they must go on while serving, and STOPPING=1 comes after READY=1.
    serving = keys[keys.index("READY") + 1 : keys.index("STOPPING")]
    assert "WATCHDOG" in serving, keys
    after_stop = keys[keys.index("STOPPING") + 1 :]
    assert set(after_stop) <= {"STATUS"}, f"after STOPPING=1: {after_stop}"
    assert all(m.get("STATUS") != "" for m in life), "an empty status line"


def test_an_upgrade_hands_the_main_pid_to_the_new_master(tcp_listener: socket.socket) -> None:
    fd = tcp_listener.fileno()
    command = through_shim(tcp_listener, "--fdname=web", *daemon_command("--bind", "systemd"))
    with started(command, pass_fds=(fd,)) as daemon:
        assert echo(tcp_listener.getsockname(), b"go") == b"go"
        daemon.until("READY")
        os.kill(daemon.pid, signal.SIGUSR2)
        handover, _ = daemon.until("MAINPID")
        new_pid = int(handover.get("MAINPID") or 0)
        assert new_pid not in (0, daemon.pid)
        # setproctitle rewrote its arguments: the title says what it is
        assert "forkserver: master" in " ".join(psutil.Process(new_pid).cmdline())
        ready, _ = daemon.notify.wait_for("READY", TIMEOUT)
        assert ready.pid == new_pid, "READY=1 of the new generation comes from the new master"
