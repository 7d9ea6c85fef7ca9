"""TcpServer: state, listen(), the pending queue, waiting and closing.

Real sockets on loopback; the loop is driven until an event happens,
with a deadline, never for a fixed time.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
import time
from collections.abc import Callable

import pytest

from forkserver import EventLoop, HostAddress, NetworkProxy, SocketError, TcpServer, WaitResult

# -- helpers shared by the test_tcpserver_* modules ------------------------


def run_until(loop: EventLoop, done: Callable[[], object], timeout: float = 20.0) -> None:
    """Drive *loop* until done() is true; fail after *timeout* seconds."""
    deadline = loop.time() + timeout
    while not done():
        remaining = deadline - loop.time()
        assert remaining > 0, "timed out waiting for the loop"
        loop.run_once(min(remaining, 0.5))


def connect(server: TcpServer, host: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection((host, server.server_port()), timeout=5)


def accept_queue(listener: socket.socket) -> tuple[int, int]:
    """(connections waiting in the kernel accept queue, the listen backlog).

    For a listening socket Linux reports them in TCP_INFO's
    tcpi_unacked and tcpi_sacked fields.
    """
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    queued, backlog = struct.unpack_from("II", info, 24)
    return int(queued), int(backlog)


def echo_once(server_side: socket.socket, client: socket.socket) -> None:
    """Prove the pair is one live connection, both ways."""
    client.sendall(b"ping")
    server_side.settimeout(5)
    assert server_side.recv(4) == b"ping"
    server_side.sendall(b"pong")
    assert client.recv(4) == b"pong"


# -- a fresh server ----------------------------------------------------------


def test_fresh_server_state() -> None:
    server = TcpServer()
    assert server.is_listening() is False
    assert server.socket_descriptor() == -1
    assert server.server_port() == 0
    assert server.server_address().is_null()
    assert server.max_pending_connections() == 30
    assert server.has_pending_connections() is False
    assert server.next_pending_connection() is None
    assert server.proxy() is NetworkProxy.DefaultProxy
    assert server.server_error() is SocketError.UnknownSocketError
    assert server.error_string() == ""
    assert server.listen_backlog_size() == 50
    assert server.listening_socket() is None
    assert server.describe() == "not listening"
    assert server.parent() is None
    assert TcpServer("owner").parent() == "owner"


# -- listen() ----------------------------------------------------------------


def test_port_zero_picks_a_free_port_and_reports_it(server: TcpServer) -> None:
    assert server.listen(HostAddress.LocalHost, 0) is True
    assert server.is_listening()
    port = server.server_port()
    assert 0 < port <= 65535
    listener = server.listening_socket()
    assert listener is not None
    assert listener.getsockname() == ("127.0.0.1", port)
    assert server.socket_descriptor() == listener.fileno()
    assert server.server_address() == HostAddress.LocalHost
    assert server.describe() == f"127.0.0.1:{port}"


def test_any_is_dual_stack(server: TcpServer, loop: EventLoop) -> None:
    assert server.listen() is True  # HostAddress.Any, port 0
    assert server.server_address() == HostAddress.Any
    listener = server.listening_socket()
    assert listener is not None
    assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    for host in ("127.0.0.1", "::1"):
        with connect(server, host) as client:
            run_until(loop, server.has_pending_connections)
            with server.next_pending_connection() as conn:  # type: ignore[union-attr]
                echo_once(conn, client)
                assert conn.getpeername()[1] == client.getsockname()[1]


@pytest.mark.parametrize(
    ("address", "client_host", "family"),
    [
        (HostAddress.LocalHost, "127.0.0.1", socket.AF_INET),
        (HostAddress.LocalHostIPv6, "::1", socket.AF_INET6),
        (HostAddress.AnyIPv4, "127.0.0.1", socket.AF_INET),
        (HostAddress.AnyIPv6, "::1", socket.AF_INET6),
        ("127.0.0.1", "127.0.0.1", socket.AF_INET),
        ("::1", "::1", socket.AF_INET6),
    ],
)
def test_listen_on_each_kind_of_address(
    server: TcpServer,
    loop: EventLoop,
    address: HostAddress | str,
    client_host: str,
    family: socket.AddressFamily,
) -> None:
    assert server.listen(address, 0), server.error_string()
    assert server.server_address() == HostAddress(address)
    listener = server.listening_socket()
    assert listener is not None
    assert listener.family == family
    with connect(server, client_host) as client:
        run_until(loop, server.has_pending_connections)
        with server.next_pending_connection() as conn:  # type: ignore[union-attr]
            echo_once(conn, client)


def test_any_ipv6_is_ipv6_only(server: TcpServer) -> None:
    assert server.listen(HostAddress.AnyIPv6, 0)
    listener = server.listening_socket()
    assert listener is not None
    assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    # So the IPv4 wildcard can share the port, as it can in Qt.
    with TcpServer() as v4:
        assert v4.listen(HostAddress.AnyIPv4, server.server_port()), v4.error_string()


def test_ipv6_describe_uses_brackets(server: TcpServer) -> None:
    assert server.listen(HostAddress.LocalHostIPv6, 0)
    assert server.describe() == f"[::1]:{server.server_port()}"


def test_listen_while_listening_fails_and_keeps_the_first(server: TcpServer) -> None:
    assert server.listen(HostAddress.LocalHost, 0)
    port = server.server_port()
    assert server.listen(HostAddress.LocalHost, 0) is False
    assert server.server_error() is SocketError.OperationError
    assert server.error_string() == (
        "cannot listen on 127.0.0.1:0: the server is already listening"
    )
    assert server.is_listening() and server.server_port() == port


@pytest.mark.parametrize("port", [-1, 65536, 1 << 20])
def test_port_out_of_range_is_a_programming_error(port: int) -> None:
    with pytest.raises(ValueError, match=rf"^port {port} is out of range \(0\.\.65535\)$"):
        TcpServer().listen(HostAddress.LocalHost, port)


def test_port_of_the_wrong_type_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="port must be an int, not str"):
        TcpServer().listen(HostAddress.LocalHost, "80")  # type: ignore[arg-type]


def test_address_in_use(server: TcpServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert server.listen(HostAddress.LocalHost, port) is False
    assert server.server_error() is SocketError.AddressInUseError
    assert server.error_string() == (
        f"cannot listen on 127.0.0.1:{port}: the address is already in use"
    )
    assert not server.is_listening()
    assert server.socket_descriptor() == -1


def test_address_not_available(server: TcpServer) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never assigned to an interface here.
    assert server.listen("192.0.2.1", 0) is False
    assert server.server_error() is SocketError.SocketAddressNotAvailableError
    assert server.error_string() == (
        "cannot listen on 192.0.2.1:0: the address is not available on this machine"
    )


def test_unknown_ipv6_zone_is_not_available(server: TcpServer) -> None:
    assert server.listen("fe80::1%nosuchif0", 0) is False
    assert server.server_error() is SocketError.SocketAddressNotAvailableError
    assert server.error_string() == (
        "cannot listen on [fe80::1%nosuchif0]:0: no network interface is named 'nosuchif0'"
    )


def test_null_address_fails_with_a_clear_error(server: TcpServer) -> None:
    assert server.listen("not an address", 8000) is False
    assert server.server_error() is SocketError.SocketAddressNotAvailableError
    assert server.error_string() == (
        "cannot listen on 'not an address' port 8000: not a numeric IPv4 or IPv6 address"
    )
    assert server.listen(HostAddress.Null, 8000) is False
    assert server.error_string() == (
        "cannot listen on a null address, port 8000: not a numeric IPv4 or IPv6 address"
    )


def _in_child(body: Callable[[], str]) -> str:
    """Run *body* in a forked child and return the text it produced."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.write(w, body().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        out = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out


def test_privileged_port_without_privileges_is_an_access_error() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")

    def body() -> str:
        os.setgid(65534)
        os.setuid(65534)  # nobody: may not bind below 1024
        server = TcpServer()
        ok = server.listen(HostAddress.LocalHost, 1)
        return f"{ok}|{server.server_error().name}|{server.error_string()}"

    ok, error, message = _in_child(body).split("|")
    assert (ok, error) == ("False", "SocketAccessError")
    assert message.startswith("cannot listen on 127.0.0.1:1: permission denied")


def test_out_of_descriptors_is_a_resource_error() -> None:
    def body() -> str:
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, lowest_free))
        server = TcpServer()
        ok = server.listen(HostAddress.LocalHost, 0)
        return f"{ok}|{server.server_error().name}|{server.error_string()}"

    assert _in_child(body).split("|") == [
        "False",
        "SocketResourceError",
        "cannot listen on 127.0.0.1:0: too many open files in this process (see RLIMIT_NOFILE)",
    ]


def test_listen_backlog_size_reaches_the_kernel(server: TcpServer) -> None:
    server.set_listen_backlog_size(7)
    assert server.listen_backlog_size() == 7
    assert server.listen(HostAddress.LocalHost, 0)
    listener = server.listening_socket()
    assert listener is not None
    assert accept_queue(listener) == (0, 7)


@pytest.mark.parametrize(
    "setter",
    ["set_max_pending_connections", "set_listen_backlog_size", "set_accept_batch_size"],
)
def test_counts_below_one_are_rejected(setter: str) -> None:
    with pytest.raises(ValueError, match=rf"^{setter}\(\) needs a number >= 1, got 0$"):
        getattr(TcpServer(), setter)(0)
    with pytest.raises(TypeError, match="takes an int, not float"):
        getattr(TcpServer(), setter)(1.5)


# -- proxies -----------------------------------------------------------------


@pytest.mark.parametrize("proxy", [NetworkProxy.DefaultProxy, NetworkProxy.NoProxy])
def test_default_and_no_proxy_listen_normally(proxy: NetworkProxy) -> None:
    with TcpServer() as server:
        server.set_proxy(proxy)
        assert server.proxy() is proxy
        assert server.listen(HostAddress.LocalHost, 0)


@pytest.mark.parametrize(
    "proxy",
    [
        NetworkProxy.Socks5Proxy,
        NetworkProxy.HttpProxy,
        NetworkProxy.HttpCachingProxy,
        NetworkProxy.FtpCachingProxy,
    ],
)
def test_other_proxies_cannot_listen(proxy: NetworkProxy) -> None:
    with TcpServer() as server:
        server.set_proxy(proxy)
        assert server.listen(HostAddress.LocalHost, 0) is False
        assert server.server_error() is SocketError.UnsupportedSocketOperationError
        assert server.error_string() == (
            f"cannot listen on 127.0.0.1:0: a {proxy.name} cannot listen "
            "(only DefaultProxy and NoProxy are supported)"
        )
        assert not server.is_listening()


def test_set_proxy_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="takes a NetworkProxy, not str"):
        TcpServer().set_proxy("socks5://x")  # type: ignore[arg-type]


# -- the pending queue -------------------------------------------------------


def test_new_connection_is_emitted_from_the_loop_once_per_connection(
    server: TcpServer, loop: EventLoop
) -> None:
    emitted: list[int] = []
    server.new_connection.connect(lambda: emitted.append(len(emitted)))
    assert server.listen(HostAddress.LocalHost, 0)
    with connect(server) as c1, connect(server) as c2:
        run_until(loop, lambda: len(emitted) == 2)
        assert server.has_pending_connections()
        first = server.next_pending_connection()
        second = server.next_pending_connection()
        assert server.next_pending_connection() is None
        assert first is not None and second is not None
        with first, second:
            # In arrival order, each a connected, close-on-exec socket.socket.
            assert first.getpeername() == c1.getsockname()
            assert second.getpeername() == c2.getsockname()
            for conn, client in ((first, c1), (second, c2)):
                assert isinstance(conn, socket.socket)
                assert conn.get_inheritable() is False
                echo_once(conn, client)


def test_full_queue_stops_accepting_and_the_kernel_holds_the_rest(
    server: TcpServer, loop: EventLoop
) -> None:
    server.set_max_pending_connections(2)
    assert server.listen(HostAddress.LocalHost, 0)
    listener = server.listening_socket()
    assert listener is not None
    clients = [connect(server) for _ in range(5)]
    try:
        run_until(loop, lambda: not server.is_accepting())
        assert not server.is_accepting()
        assert len(server._pending) == 2
        # The other three wait in the kernel, not accepted by us.
        assert accept_queue(listener)[0] == 3
        # Every client is served in turn: nothing accepted was dropped.
        for client in clients:
            run_until(loop, server.has_pending_connections)
            conn = server.next_pending_connection()
            assert conn is not None
            with conn:
                assert conn.getpeername() == client.getsockname()
                echo_once(conn, client)
        assert accept_queue(listener)[0] == 0
        assert server.is_accepting()
    finally:
        for client in clients:
            client.close()


def test_raising_the_limit_resumes_accepting(server: TcpServer, loop: EventLoop) -> None:
    server.set_max_pending_connections(1)
    assert server.listen(HostAddress.LocalHost, 0)
    with connect(server) as c1, connect(server) as c2:
        run_until(loop, lambda: not server.is_accepting())
        server.set_max_pending_connections(5)
        run_until(loop, lambda: len(server._pending) == 2)
        for client in (c1, c2):
            with server.next_pending_connection() as conn:  # type: ignore[union-attr]
                echo_once(conn, client)


def test_add_pending_connection_queues_a_socket(server: TcpServer) -> None:
    a, b = socket.socketpair()
    with b:
        server.add_pending_connection(a)
        assert server.has_pending_connections()
        assert server.next_pending_connection() is a
        a.close()
    with pytest.raises(TypeError, match=r"takes a socket\.socket, not int"):
        server.add_pending_connection(3)  # type: ignore[arg-type]


class Handoff(TcpServer):
    """Overrides the hook, as the master does: takes the raw descriptor."""

    def __init__(self, loop: EventLoop) -> None:
        super().__init__(loop=loop)
        self.fds: list[int] = []

    def incoming_connection(self, socket_descriptor: int) -> None:
        self.fds.append(socket_descriptor)


def test_overridden_incoming_connection_gets_raw_close_on_exec_descriptors(
    loop: EventLoop,
) -> None:
    with Handoff(loop) as server:
        emitted: list[None] = []
        server.new_connection.connect(lambda: emitted.append(None))
        assert server.listen(HostAddress.LocalHost, 0)
        with connect(server) as client:
            run_until(loop, lambda: server.fds)
            (fd,) = server.fds
            try:
                assert os.get_inheritable(fd) is False
                assert os.get_blocking(fd) is True
                with socket.socket(fileno=os.dup(fd)) as conn:
                    assert conn.getpeername() == client.getsockname()
                    echo_once(conn, client)
            finally:
                os.close(fd)
            assert not server.has_pending_connections()
            assert emitted == [None]  # as Qt: emitted whoever took the descriptor


def test_listener_is_close_on_exec_and_non_blocking(server: TcpServer) -> None:
    assert server.listen(HostAddress.LocalHost, 0)
    fd = server.socket_descriptor()
    assert os.get_inheritable(fd) is False
    assert os.get_blocking(fd) is False


# -- wait_for_new_connection ---------------------------------------------------


def test_wait_without_a_loop_times_out_then_finds_a_connection() -> None:
    with TcpServer() as server:
        assert server.listen(HostAddress.LocalHost, 0)
        assert server.wait_for_new_connection(0) == WaitResult(False, True)
        result = server.wait_for_new_connection(30)
        assert not result
        ok, timed_out = result
        assert (ok, timed_out) == (False, True)
        with connect(server) as client:
            result = server.wait_for_new_connection(-1)  # the client is already queued
            assert result and result == WaitResult(True, False)
            with server.next_pending_connection() as conn:  # type: ignore[union-attr]
                echo_once(conn, client)


def test_wait_blocks_for_about_msec() -> None:
    with TcpServer() as server:
        assert server.listen(HostAddress.LocalHost, 0)
        start = time.monotonic()
        assert server.wait_for_new_connection(120) == WaitResult(False, True)
        assert 0.11 <= time.monotonic() - start < 2.0


def test_wait_returns_at_once_when_something_is_pending(server: TcpServer) -> None:
    a, b = socket.socketpair()
    with b:
        server.add_pending_connection(a)
        assert server.wait_for_new_connection(-1) == WaitResult(True, False)
    server.next_pending_connection()
    a.close()


def test_wait_when_not_listening_is_neither_available_nor_timed_out() -> None:
    assert TcpServer().wait_for_new_connection(10) == WaitResult(False, False)


def test_wait_counts_connections_handed_to_an_override(loop: EventLoop) -> None:
    with Handoff(loop) as server:
        assert server.listen(HostAddress.LocalHost, 0)
        with connect(server):
            assert server.wait_for_new_connection(5000) == WaitResult(True, False)
            assert len(server.fds) == 1
            os.close(server.fds[0])


# -- close and the context manager -------------------------------------------


def test_close_stops_listening_and_closes_pending(server: TcpServer, loop: EventLoop) -> None:
    # As Qt's close(), which deletes the pending sockets.
    assert server.listen(HostAddress.LocalHost, 0)
    port = server.server_port()
    with connect(server) as client:
        run_until(loop, server.has_pending_connections)
        pending = server._pending[0]
        server.close()
        assert not server.is_listening()
        assert server.socket_descriptor() == -1
        assert server.server_port() == 0
        assert server.server_address().is_null()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        assert pending.fileno() == -1
        assert not server.has_pending_connections()
        assert server.next_pending_connection() is None
        assert client.recv(1) == b""  # the client sees the connection end
    server.close()  # closing twice is harmless
    assert server.listen(HostAddress.LocalHost, 0)  # and the server is reusable


def test_context_manager_closes_the_listener_and_pending_sockets(loop: EventLoop) -> None:
    with TcpServer(loop=loop) as server:
        assert server.listen(HostAddress.LocalHost, 0)
        listener = server.listening_socket()
        with connect(server):
            run_until(loop, server.has_pending_connections)
            pending = server._pending[0]
    assert listener is not None and listener.fileno() == -1
    assert pending.fileno() == -1
    assert not server.has_pending_connections()


def test_closed_server_leaves_the_loop(server: TcpServer, loop: EventLoop) -> None:
    assert server.listen(HostAddress.LocalHost, 0)
    fd = server.socket_descriptor()
    server.close()
    assert loop.remove_reader(fd) is False  # nothing of ours is registered


def test_error_is_kept_after_a_later_success(server: TcpServer) -> None:
    # As Qt: server_error() is the *last error*, not the last call's result.
    assert server.listen("bogus", 0) is False
    assert server.listen(HostAddress.LocalHost, 0) is True
    assert server.server_error() is SocketError.SocketAddressNotAvailableError
