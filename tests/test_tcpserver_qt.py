"""Qt's own autotests for ``QTcpServer`` (tst_qtcpserver.cpp), ported.

Each test names the Qt test it follows.  Where we differ from Qt on
purpose (docs/qtcpserver.md), the test pins down our behaviour and says
what Qt does.  Real sockets on loopback.
"""

from __future__ import annotations

import socket
import threading

from forkserver import HostAddress, SocketError, TcpServer, WaitResult
from tests.test_tcpserver import connect, echo_once

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
