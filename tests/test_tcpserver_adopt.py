"""TcpServer.set_socket_descriptor(): adopting listeners, refusing the rest."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from forkserver import EventLoop, HostAddress, SocketError, TcpServer
from tests.test_tcpserver import accept_queue, echo_once, run_until


def inherited_listener(
    family: socket.AddressFamily, address: object, *, v6only: int | None = None
) -> int:
    """A listening descriptor as a parent or systemd would pass it:
    inheritable, blocking, with an unusual backlog (7)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    if v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    sock.bind(address)
    sock.listen(7)
    sock.set_inheritable(True)
    return sock.detach()


def test_adopts_a_tcp_ipv4_listener(server: TcpServer, loop: EventLoop) -> None:
    fd = inherited_listener(socket.AF_INET, ("127.0.0.1", 0))
    assert server.set_socket_descriptor(fd) is True, server.error_string()
    assert server.is_listening()
    assert server.socket_descriptor() == fd
    port = server.server_port()
    assert port > 0
    assert server.server_address() == HostAddress.LocalHost
    assert server.describe() == f"127.0.0.1:{port}"
    # Made safe for us: close-on-exec and non-blocking.
    assert os.get_inheritable(fd) is False
    assert os.get_blocking(fd) is False
    # Never listened on again: the backlog is still the one it came with.
    listener = server.listening_socket()
    assert listener is not None
    assert accept_queue(listener) == (0, 7)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        run_until(loop, server.has_pending_connections)
        with server.next_pending_connection() as conn:  # type: ignore[union-attr]
            echo_once(conn, client)


def test_adopts_a_tcp_ipv6_listener(server: TcpServer, loop: EventLoop) -> None:
    fd = inherited_listener(socket.AF_INET6, ("::1", 0))
    assert server.set_socket_descriptor(fd), server.error_string()
    assert server.server_address() == HostAddress.LocalHostIPv6
    assert server.describe() == f"[::1]:{server.server_port()}"
    with socket.create_connection(("::1", server.server_port()), timeout=5) as client:
        run_until(loop, server.has_pending_connections)
        with server.next_pending_connection() as conn:  # type: ignore[union-attr]
            echo_once(conn, client)


@pytest.mark.parametrize(("v6only", "expected"), [(0, "Any"), (1, "AnyIPv6")])
def test_adopted_wildcard_reports_whether_it_is_dual_stack(
    server: TcpServer, v6only: int, expected: str
) -> None:
    fd = inherited_listener(socket.AF_INET6, ("::", 0), v6only=v6only)
    assert server.set_socket_descriptor(fd)
    assert server.server_address() == getattr(HostAddress, expected)


def test_adopts_a_unix_stream_listener(
    server: TcpServer, loop: EventLoop, tmp_path: Path
) -> None:
    path = str(tmp_path / "s.sock")
    fd = inherited_listener(socket.AF_UNIX, path)
    assert server.set_socket_descriptor(fd), server.error_string()
    assert server.describe() == f"unix:{path}"
    assert server.server_address().is_null()
    assert server.server_port() == 0
    assert server.socket_descriptor() == fd
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(path)
        run_until(loop, server.has_pending_connections)
        with server.next_pending_connection() as conn:  # type: ignore[union-attr]
            assert conn.family == socket.AF_UNIX
            assert conn.get_inheritable() is False
            echo_once(conn, client)


def test_describes_an_abstract_unix_listener(server: TcpServer) -> None:
    name = f"forkserver-test-{uuid.uuid4().hex}"
    fd = inherited_listener(socket.AF_UNIX, "\0" + name)
    assert server.set_socket_descriptor(fd)
    assert server.describe() == f"unix:@{name}"


def test_close_closes_the_adopted_descriptor(server: TcpServer) -> None:
    fd = inherited_listener(socket.AF_INET, ("127.0.0.1", 0))
    assert server.set_socket_descriptor(fd)
    server.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


# -- refusals: False, a reason, and the descriptor left as it was ------------


def assert_refused(server: TcpServer, fd: int, error: SocketError, reason: str) -> None:
    before = (os.get_inheritable(fd), os.get_blocking(fd))
    assert server.set_socket_descriptor(fd) is False
    assert server.server_error() is error
    assert server.error_string() == f"cannot adopt descriptor {fd}: {reason}"
    assert not server.is_listening()
    assert server.socket_descriptor() == -1
    os.fstat(fd)  # still open: the caller still owns it
    assert (os.get_inheritable(fd), os.get_blocking(fd)) == before


def test_refuses_a_descriptor_that_is_not_open(server: TcpServer) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert server.set_socket_descriptor(r) is False
    assert server.server_error() is SocketError.UnsupportedSocketOperationError
    assert server.error_string() == f"cannot adopt descriptor {r}: it is not an open descriptor"
    assert server.set_socket_descriptor(-1) is False
    assert server.error_string() == "cannot adopt descriptor -1: it is not an open descriptor"


def test_refuses_a_regular_file(server: TcpServer, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT)
    try:
        assert_refused(
            server,
            fd,
            SocketError.UnsupportedSocketOperationError,
            "it is not a socket but a regular file",
        )
    finally:
        os.close(fd)


def test_refuses_a_pipe(server: TcpServer) -> None:
    r, w = os.pipe()
    try:
        assert_refused(
            server, r, SocketError.UnsupportedSocketOperationError, "it is not a socket but a pipe"
        )
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(
    ("family", "address"),
    [(socket.AF_INET, ("127.0.0.1", 0)), (socket.AF_INET6, ("::1", 0)), (socket.AF_UNIX, None)],
)
def test_refuses_a_datagram_socket(
    server: TcpServer, family: socket.AddressFamily, address: object
) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as udp:
        if address is not None:
            udp.bind(address)
        assert_refused(
            server,
            udp.fileno(),
            SocketError.UnsupportedSocketOperationError,
            "it is a SOCK_DGRAM socket, not a stream (SOCK_STREAM) socket",
        )


def test_refuses_a_socket_of_another_family(server: TcpServer) -> None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as netlink:
        assert_refused(
            server,
            netlink.fileno(),
            SocketError.UnsupportedSocketOperationError,
            "it is a AF_NETLINK socket; only IPv4, IPv6 and Unix stream sockets can be adopted",
        )


@pytest.mark.parametrize("bound", [True, False])
def test_refuses_a_stream_socket_that_is_not_listening(server: TcpServer, bound: bool) -> None:
    with socket.socket() as tcp:
        if bound:
            tcp.bind(("127.0.0.1", 0))
        assert_refused(
            server,
            tcp.fileno(),
            SocketError.OperationError,
            "the socket is not listening (listen() was not called)",
        )


def test_refuses_a_connected_socket(server: TcpServer) -> None:
    a, b = socket.socketpair()
    with a, b:
        assert_refused(
            server,
            a.fileno(),
            SocketError.OperationError,
            "the socket is not listening (listen() was not called)",
        )


def test_refuses_while_already_listening(server: TcpServer) -> None:
    assert server.listen(HostAddress.LocalHost, 0)
    fd = inherited_listener(socket.AF_INET, ("127.0.0.1", 0))
    try:
        assert server.set_socket_descriptor(fd) is False
        assert server.server_error() is SocketError.OperationError
        assert server.error_string() == (
            f"cannot adopt descriptor {fd}: the server is already listening"
        )
    finally:
        os.close(fd)


def test_rejects_a_descriptor_of_the_wrong_type(server: TcpServer) -> None:
    with socket.socket() as sock, pytest.raises(TypeError, match="takes an int, not socket"):
        server.set_socket_descriptor(sock)  # type: ignore[arg-type]
