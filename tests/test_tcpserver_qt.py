"""Qt's own autotests for ``QTcpServer`` (tst_qtcpserver.cpp), ported.

Each test names the Qt test it follows.  Where we differ from Qt on
purpose (docs/qtcpserver.md), the test pins down our behaviour and says
what Qt does.  Real sockets on loopback.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from forkserver import EventLoop, HostAddress, SocketError, TcpServer, WaitResult
from tests.support import poll_until
from tests.test_tcpserver import accept_queue, connect, echo_once, run_until

# -- waitForConnectionTest -------------------------------------------------------


def test_a_wait_that_times_out_sets_socket_timeout_error() -> None:
    with TcpServer() as server:
        assert server.listen(HostAddress.LocalHost, 0)
        port = server.server_port()
        assert server.wait_for_new_connection(50) == WaitResult(False, True)
        assert server.server_error() is SocketError.SocketTimeoutError
        assert server.error_string() == f"no connection arrived on 127.0.0.1:{port} within 50 ms"
        assert server.wait_for_new_connection(0) == WaitResult(False, True)  # a poll, the same
        assert server.error_string() == f"no connection arrived on 127.0.0.1:{port} within 0 ms"

        # A client that connects while we wait ends the wait, not timed out.
        clients: list[socket.socket] = []
        connector = threading.Thread(target=lambda: clients.append(connect(server)))
        connector.start()
        try:
            assert server.wait_for_new_connection(5000) == WaitResult(True, False)
        finally:
            connector.join(5)
        assert not connector.is_alive()
        with clients[0] as client, server.next_pending_connection() as conn:  # type: ignore[union-attr]
            echo_once(conn, client)
        # As in Qt, success does not clear the last error.
        assert server.server_error() is SocketError.SocketTimeoutError


def test_a_wait_that_is_not_listening_leaves_the_error_alone() -> None:
    server = TcpServer()
    assert server.wait_for_new_connection(10) == WaitResult(False, False)
    assert server.server_error() is SocketError.UnknownSocketError
    assert server.error_string() == ""


# -- pendingConnectionAvailable (Qt 6.4) and newConnection ---------------------


class QtStyleServer(TcpServer):
    """Overrides incoming_connection() the Qt way: makes the socket, queues it."""

    def __init__(self, loop: EventLoop) -> None:
        super().__init__(loop=loop)
        self.made = 0

    def incoming_connection(self, socket_descriptor: int) -> None:
        sock = socket.socket(fileno=socket_descriptor)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.made += 1
        self.add_pending_connection(sock)


@pytest.mark.parametrize("derived", [False, True], ids=["TcpServer", "DerivedServer"])
def test_both_signals_follow_each_connection(loop: EventLoop, derived: bool) -> None:
    with QtStyleServer(loop) if derived else TcpServer(loop=loop) as server:
        events: list[str] = []
        server.pending_connection_available.connect(lambda: events.append("pending"))
        server.new_connection.connect(lambda: events.append("new"))
        assert server.listen(HostAddress.LocalHost, 0)
        with connect(server) as c1, connect(server) as c2:
            run_until(loop, lambda: events.count("new") == 2)
            # Queued first, then announced: a slot on either finds the socket.
            assert events == ["pending", "new", "pending", "new"]
            for client in (c1, c2):
                with server.next_pending_connection() as conn:  # type: ignore[union-attr]
                    echo_once(conn, client)
        if isinstance(server, QtStyleServer):
            assert server.made == 2


def test_a_slot_on_new_connection_serves_a_qt_style_subclass(loop: EventLoop) -> None:
    with QtStyleServer(loop) as server:
        served: list[bytes] = []

        def serve() -> None:
            conn = server.next_pending_connection()
            assert conn is not None
            with conn:
                conn.settimeout(5)
                served.append(conn.recv(4))
                conn.sendall(b"pong")

        server.new_connection.connect(serve)
        assert server.listen(HostAddress.LocalHost, 0)
        with connect(server) as client:
            client.sendall(b"ping")
            run_until(loop, lambda: served)
            assert client.recv(4) == b"pong"
        assert served == [b"ping"]


class Handoff(TcpServer):
    """Takes each raw descriptor, as the master does; queues nothing."""

    def __init__(self, loop: EventLoop) -> None:
        super().__init__(loop=loop)
        self.fds: list[int] = []

    def incoming_connection(self, socket_descriptor: int) -> None:
        self.fds.append(socket_descriptor)

    def close(self) -> None:
        super().close()
        while self.fds:
            os.close(self.fds.pop())


def test_new_connection_is_emitted_when_an_override_takes_the_descriptor(
    loop: EventLoop,
) -> None:
    with Handoff(loop) as server:
        handed: list[int] = []
        queued: list[None] = []
        server.new_connection.connect(lambda: handed.append(len(server.fds)))
        server.pending_connection_available.connect(lambda: queued.append(None))
        assert server.listen(HostAddress.LocalHost, 0)
        with connect(server), connect(server):
            run_until(loop, lambda: len(handed) == 2)
        assert handed == [1, 2]  # each after incoming_connection() returned
        assert queued == []  # nothing was added to the pending queue


def test_a_slot_that_closes_the_server_ends_the_accept_batch(loop: EventLoop) -> None:
    with Handoff(loop) as server:
        assert server.listen(HostAddress.LocalHost, 0)
        listener = server.listening_socket()
        assert listener is not None
        handed: list[int] = []

        def close_after_first() -> None:
            handed.append(len(server.fds))
            server.close()

        server.new_connection.connect(close_after_first)
        with connect(server), connect(server):
            poll_until(lambda: accept_queue(listener)[0] == 2, "two connections queued")
            run_until(loop, lambda: handed)
            # As Qt's readNotification(): stop once a slot stopped listening.
            assert handed == [1]
            assert not server.is_listening()


def test_add_pending_connection_while_not_listening_is_takeable() -> None:
    # canAccessPendingConnectionsWhileNotListening
    server = TcpServer()
    announced: list[None] = []
    server.pending_connection_available.connect(lambda: announced.append(None))
    a, b = socket.socketpair()
    with a, b:
        server.add_pending_connection(a)
        assert announced == [None]
        assert server.has_pending_connections()
        assert server.next_pending_connection() is a


def test_each_connection_after_eagain_is_accepted(server: TcpServer, loop: EventLoop) -> None:
    # eagainBlockingAccept: the EAGAIN that ends a batch does not pause accepting.
    emitted: list[None] = []
    server.new_connection.connect(lambda: emitted.append(None))
    assert server.listen(HostAddress.LocalHost, 0)
    for count in (1, 2):
        with connect(server) as client:
            run_until(loop, lambda count=count: len(emitted) == count)  # type: ignore[misc]
            with server.next_pending_connection() as conn:  # type: ignore[union-attr]
                echo_once(conn, client)
        assert server.is_accepting()


# -- close (qDeleteAll(pendingConnections)) and crashTests ---------------------


def test_close_on_a_fresh_server_then_listen() -> None:
    # crashTests
    with TcpServer() as server:
        server.close()
        assert server.listen(HostAddress.LocalHost, 0)
