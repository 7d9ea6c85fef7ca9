"""TcpServer's accept path: batches, pausing, and every class of accept error.

Errors that Linux can be made to produce for real are produced for real
(EMFILE under a lowered RLIMIT_NOFILE in a subprocess, EINVAL from a
listener that was shut down).  Those it cannot (ECONNABORTED, EPROTO, the
network errors) come from a scripted listener: a real listening socket
whose next accept() calls fail with the errnos given.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from forkserver import EventLoop, HostAddress, SocketError, TcpServer
from forkserver.tcpserver import accepts_queued, listen_queue
from tests.support import poll_until
from tests.test_tcpserver import accept_queue, echo_once, run_until


@pytest.fixture
def server(loop: EventLoop) -> Iterator[TcpServer]:
    with TcpServer(loop=loop) as srv:
        assert srv.listen(HostAddress.LocalHost, 0)
        yield srv


def connect(server: TcpServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.server_port()), timeout=5)


class ScriptedListener(socket.socket):
    """The same listening descriptor; its next accepts fail as scripted."""

    def __init__(self, real: socket.socket, errnos: list[int]) -> None:
        super().__init__(real.family, real.type, real.proto, fileno=real.detach())
        self.errnos = errnos
        self.calls = 0

    def _accept(self) -> tuple[int, object]:
        self.calls += 1
        if self.errnos:
            code = self.errnos.pop(0)
            raise OSError(code, os.strerror(code))
        return super()._accept()  # type: ignore[misc,no-any-return]


def script(server: TcpServer, errnos: list[int]) -> ScriptedListener:
    real = server.listening_socket()
    assert real is not None
    scripted = ScriptedListener(real, errnos)
    server._sock = scripted  # same descriptor, same loop registration
    return scripted


def record_errors(server: TcpServer) -> list[SocketError]:
    errors: list[SocketError] = []
    server.accept_error.connect(errors.append)
    return errors


# -- batches and pausing -----------------------------------------------------


def test_accepts_at_most_the_batch_size_per_wake_up(server: TcpServer, loop: EventLoop) -> None:
    server.set_accept_batch_size(2)
    assert server.accept_batch_size() == 2
    listener = server.listening_socket()
    assert listener is not None
    clients = [connect(server) for _ in range(5)]
    try:
        per_wake: list[int] = []
        while len(server._pending) < 5:
            before = len(server._pending)
            loop.run_once(5)
            per_wake.append(len(server._pending) - before)
            assert len(per_wake) <= 10, per_wake
        assert max(per_wake) == 2, per_wake  # batched, but never more than 2
        assert accept_queue(listener)[0] == 0
    finally:
        for client in clients:
            client.close()


def test_pause_leaves_connections_in_the_kernel_until_resume(
    server: TcpServer, loop: EventLoop
) -> None:
    listener = server.listening_socket()
    assert listener is not None
    server.pause_accepting()
    assert not server.is_accepting()
    with connect(server) as client:
        loop.run_once(0.05)  # would accept now if it were not paused
        assert not server.has_pending_connections()
        assert accept_queue(listener)[0] == 1
        server.resume_accepting()
        assert server.is_accepting()
        run_until(loop, server.has_pending_connections)
        with server.next_pending_connection() as conn:  # type: ignore[union-attr]
            echo_once(conn, client)


# -- errors that are skipped -------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    ],
)
def test_per_connection_errors_are_skipped_within_the_batch(
    server: TcpServer, loop: EventLoop, code: int
) -> None:
    scripted = script(server, [code, code])
    errors = record_errors(server)
    with connect(server) as client:
        run_until(loop, server.has_pending_connections)
        assert scripted.calls >= 3  # two skipped, then the real connection
        assert errors == []
        assert server.is_accepting()
        with server.next_pending_connection() as conn:  # type: ignore[union-attr]
            echo_once(conn, client)


# -- errors that back off ------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected", "reason"),
    [
        (errno.ENOBUFS, SocketError.SocketResourceError, "the kernel is out of buffer space"),
        (errno.ENOMEM, SocketError.SocketResourceError, "the kernel is out of memory"),
        (errno.ENFILE, SocketError.SocketResourceError, "too many open files in the system"),
        (errno.EIO, SocketError.UnknownSocketError, "input/output error (EIO)"),
    ],
)
def test_resource_errors_back_off_then_resume(
    server: TcpServer, loop: EventLoop, code: int, expected: SocketError, reason: str
) -> None:
    scripted = script(server, [code])
    errors = record_errors(server)
    with connect(server) as client:
        run_until(loop, lambda: errors)
        assert errors == [expected]
        assert server.server_error() is expected
        assert server.error_string() == (
            f"accept on {server.describe()} failed: {reason}; retrying in 0.1 s"
        )
        assert server.is_listening()
        assert not server.is_accepting()  # out of the loop during the back-off
        calls_at_failure = scripted.calls
        run_until(loop, server.has_pending_connections)
        # One accept after the back-off, for the one queued: nothing tried
        # during it, and no accept after it to find the queue empty.
        assert scripted.calls == calls_at_failure + 1
        with server.next_pending_connection() as conn:  # type: ignore[union-attr]
            echo_once(conn, client)
        assert errors == [expected]


def test_back_off_doubles_while_failures_last_and_resets_after_success(
    server: TcpServer, loop: EventLoop
) -> None:
    script(server, [errno.ENOBUFS, errno.ENOBUFS, errno.ENOBUFS])
    messages: list[str] = []
    server.accept_error.connect(lambda _: messages.append(server.error_string()))
    with connect(server) as client:
        run_until(loop, server.has_pending_connections)
        assert [m.rsplit("retrying in ", 1)[1] for m in messages] == ["0.1 s", "0.2 s", "0.4 s"]
        server.next_pending_connection().close()  # type: ignore[union-attr]
        client.close()
    script(server, [errno.ENOBUFS])
    with connect(server):
        run_until(loop, server.has_pending_connections)
        assert messages[-1].endswith("retrying in 0.1 s")
        server.next_pending_connection().close()  # type: ignore[union-attr]


def test_close_during_back_off_cancels_it(server: TcpServer, loop: EventLoop) -> None:
    script(server, [errno.ENOBUFS])
    errors = record_errors(server)
    with connect(server):
        run_until(loop, lambda: errors)
        server.close()
        assert server._backoff_timer is None
        assert server.listen(HostAddress.LocalHost, 0)
        assert server.is_accepting()  # the new listener is not held back


EMFILE_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, socket, time
    from forkserver import EventLoop, HostAddress, TcpServer

    loop = EventLoop()
    server = TcpServer(loop=loop)
    assert server.listen(HostAddress.LocalHost, 0)
    errors, failed_at, accepted = [], [], []
    server.accept_error.connect(lambda e: (errors.append(e.name),
                                           failed_at.append(time.monotonic())))
    server.new_connection.connect(lambda: accepted.append(1))
    client = socket.create_connection(("127.0.0.1", server.server_port()), timeout=5)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # accept() -> EMFILE

    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        loop.run_once(0.5)
    first = [server.server_error().name, server.error_string(),
             server.is_listening(), server.is_accepting()]

    # Stay out of descriptors for two more attempts: a spinning accept
    # loop would fail at once, again and again, and burn the CPU.
    cpu = sum(os.times()[:2])
    wakeups = 0
    while len(errors) < 3 and time.monotonic() < deadline:
        loop.run_once(0.5)
        wakeups += 1
    cpu = sum(os.times()[:2]) - cpu
    failures = len(errors)
    gaps = [later - earlier for earlier, later in zip(failed_at, failed_at[1:])]

    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    while not accepted and time.monotonic() < deadline:
        loop.run_once(0.5)
    conn = server.next_pending_connection()
    client.sendall(b"ping")
    conn.settimeout(5)
    echoed = conn.recv(4).decode()
    print(json.dumps({"first": first, "failures": failures, "wakeups": wakeups,
                      "gaps": gaps, "cpu": cpu, "accepted": len(accepted), "echoed": echoed,
                      "errors": sorted(set(errors))}))
    conn.close(); client.close(); server.close(); loop.close()
    """
)


def test_emfile_backs_off_without_spinning_and_recovers() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", EMFILE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    name, message, listening, accepting = report["first"]
    assert name == "SocketResourceError"
    assert message.startswith("accept on 127.0.0.1:")
    assert message.endswith(
        "failed: too many open files in this process (see RLIMIT_NOFILE); retrying in 0.1 s"
    )
    assert listening is True and accepting is False
    # Back-off of 0.1 s, then 0.2 s: no attempt in between (however slow
    # the machine, a wait is never shorter), nor a burst at once.
    assert report["failures"] == 3, report
    first_gap, second_gap = report["gaps"]
    assert first_gap >= 0.1 and second_gap >= 0.2, report
    assert report["wakeups"] <= 10, report
    assert report["cpu"] < 0.2, report
    assert report["errors"] == ["SocketResourceError"]
    # The connection waited in the kernel and was served once descriptors returned.
    assert report["accepted"] == 1
    assert report["echoed"] == "ping"


# -- errors that stop accepting ------------------------------------------------


@pytest.mark.parametrize("code", [errno.EBADF, errno.ENOTSOCK, errno.EINVAL])
def test_fatal_errors_stop_accepting(server: TcpServer, loop: EventLoop, code: int) -> None:
    scripted = script(server, [code])
    errors = record_errors(server)
    with connect(server) as client:
        run_until(loop, lambda: errors)
        assert errors == [SocketError.UnsupportedSocketOperationError]
        assert server.error_string().endswith("; accepting stopped")
        assert not server.is_accepting()
        assert server.is_listening()
        calls = scripted.calls
        loop.run_once(0.05)  # the listener is readable, yet nothing is tried
        assert scripted.calls == calls
        # resume_accepting() tries again (as Qt's resumeAccepting()).
        server.resume_accepting()
        run_until(loop, server.has_pending_connections)
        with server.next_pending_connection() as conn:  # type: ignore[union-attr]
            echo_once(conn, client)


def test_a_listener_shut_down_under_the_server_is_fatal(
    server: TcpServer, loop: EventLoop
) -> None:
    errors = record_errors(server)
    listener = server.listening_socket()
    assert listener is not None
    listener.shutdown(socket.SHUT_RDWR)  # Linux: accept() now fails with EINVAL
    run_until(loop, lambda: errors)
    assert errors == [SocketError.UnsupportedSocketOperationError]
    assert server.error_string() == (
        f"accept on {server.describe()} failed: "
        "the socket is in a state that does not allow this; accepting stopped"
    )
    loop.run_once(0.05)
    assert len(errors) == 1  # no spinning on a broken listener


def test_wait_for_new_connection_reports_an_accept_failure() -> None:
    with TcpServer() as server:
        assert server.listen(HostAddress.LocalHost, 0)
        script(server, [errno.ENOBUFS])
        errors = record_errors(server)
        with connect(server) as client:
            assert server.wait_for_new_connection(5000) == (False, False)
            assert errors == [SocketError.SocketResourceError]
            # The next wait sits out the back-off, then accepts.
            assert server.wait_for_new_connection(5000) == (True, False)
            with server.next_pending_connection() as conn:  # type: ignore[union-attr]
                echo_once(conn, client)


def test_a_batch_takes_what_is_queued_without_a_failing_accept(
    server: TcpServer, loop: EventLoop
) -> None:
    # An accept that finds the queue empty costs the kernel a file it throws away.
    listener = script(server, [])  # counts the accepts
    clients = [connect(server) for _ in range(3)]
    try:
        run_until(loop, lambda: len(server._pending) == 3)
        assert listener.calls == 3
        assert accepts_queued(listener) == 1  # empty: one accept on the next wake-up
    finally:
        for client in clients:
            client.close()


def test_the_queue_count_follows_the_kernel_and_falls_back_without_one() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=8) as listener:
        clients = [socket.create_connection(listener.getsockname(), timeout=5)
                   for _ in range(3)]  # fmt: skip
        try:
            # The server's side of a handshake may complete just after the client's.
            poll_until(lambda: accept_queue(listener)[0] == 3, "three queued connections")
            assert accepts_queued(listener) == 3
            listener.accept()[0].close()
            assert accepts_queued(listener) == 2
            listener.shutdown(socket.SHUT_RDWR)  # no longer listening: no count to trust
            assert accepts_queued(listener) == sys.maxsize
        finally:
            for client in clients:
                client.close()


def ss_queue(port: int) -> tuple[int, int]:
    """What ``ss -lt`` says of a TCP listener: Recv-Q (waiting) and Send-Q (the bound)."""
    out = subprocess.run(["ss", "-Hlnt", f"( sport = :{port} )"], capture_output=True,
                         text=True, check=True, timeout=10).stdout.split()
    return int(out[1]), int(out[2])


def test_the_accept_queue_reads_as_ss_shows_it_and_is_none_for_other_sockets(
    tmp_path: pathlib.Path,
) -> None:
    with TcpServer() as server:
        server.set_listen_backlog_size(7)
        assert server.listen(HostAddress.LocalHost, 0)
        assert server.listen_queue() == (0, 7) == ss_queue(server.server_port())
        clients = [socket.create_connection(("127.0.0.1", server.server_port()), timeout=5)
                   for _ in range(3)]  # fmt: skip
        try:
            # The server's side of a handshake may complete just after the client's.
            poll_until(lambda: server.listen_queue() == (3, 7), "three waiting connections")
            assert ss_queue(server.server_port()) == (3, 7)
            assert listen_queue(clients[0]) is None  # connected, not listening
        finally:
            for client in clients:
                client.close()
        server.close()
        assert server.listen_queue() is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        unix.bind(str(tmp_path / "s"))
        unix.listen(5)
        assert listen_queue(unix) is None  # no TCP_INFO: unknown, not 0
