"""Qt's own autotests for ``QTcpServer`` (tst_qtcpserver.cpp), ported.

Each test names the Qt test it follows.  Where we differ from Qt on
purpose (docs/qtcpserver.md), the test pins down our behaviour and says
what Qt does.  Real sockets on loopback; the IPv6 link-local test runs
in a network namespace of its own, where it can give ``lo`` the address
``fe80::1``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable

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


# -- getSetCheck and maxPendingConnections ---------------------------------------


def test_max_pending_connections_get_set() -> None:
    server = TcpServer()
    server.set_max_pending_connections(2**31 - 1)
    assert server.max_pending_connections() == 2**31 - 1
    # Qt stores 0 and INT_MIN too, and then never accepts; we refuse them.
    for bad in (0, -(2**31)):
        with pytest.raises(ValueError, match="needs a number >= 1"):
            server.set_max_pending_connections(bad)
    assert server.max_pending_connections() == 2**31 - 1


def test_max_pending_connections_limits_what_a_wait_accepts() -> None:
    with TcpServer() as server, contextlib.ExitStack() as stack:
        server.set_max_pending_connections(2)
        assert server.listen(HostAddress.LocalHost, 0)
        listener = server.listening_socket()
        assert listener is not None
        for _ in range(3):
            stack.enter_context(connect(server))
        poll_until(lambda: accept_queue(listener)[0] == 3, "three connections queued")

        assert server.wait_for_new_connection(5000)
        assert stack.enter_context(server.next_pending_connection())  # type: ignore[arg-type]
        assert stack.enter_context(server.next_pending_connection())  # type: ignore[arg-type]
        assert not server.has_pending_connections()
        assert server.next_pending_connection() is None
        assert accept_queue(listener)[0] == 1  # the third waited in the kernel

        assert server.wait_for_new_connection(5000)
        assert stack.enter_context(server.next_pending_connection())  # type: ignore[arg-type]


def test_a_wait_while_paused_waits_out_its_time_without_spinning() -> None:
    # A paused server accepts nothing, so its readable listener must not
    # turn the wait into a busy loop; a wait forever cannot end, and says so.
    with TcpServer() as server:
        assert server.listen(HostAddress.LocalHost, 0)
        listener = server.listening_socket()
        assert listener is not None
        server.pause_accepting()
        with connect(server):
            poll_until(lambda: accept_queue(listener)[0] == 1, "the client queued")
            cpu = time.thread_time()
            assert server.wait_for_new_connection(300) == WaitResult(False, True)
            assert time.thread_time() - cpu < 0.1, "the wait spun while paused"
            assert server.server_error() is SocketError.SocketTimeoutError
            assert server.wait_for_new_connection(-1) == WaitResult(False, False)
            assert server.server_error() is SocketError.OperationError
            assert "paused" in server.error_string()
            server.resume_accepting()
            assert server.wait_for_new_connection(5000) == WaitResult(True, False)
            with server.next_pending_connection():  # type: ignore[union-attr]
                pass


def test_taking_a_pending_connection_does_not_undo_a_pause(
    server: TcpServer, loop: EventLoop
) -> None:
    # Qt's nextPendingConnection() re-enables accepting even after
    # pauseAccepting(); we keep a pause until resume_accepting().
    assert server.listen(HostAddress.LocalHost, 0)
    with connect(server):
        run_until(loop, server.has_pending_connections)
        server.pause_accepting()
        with server.next_pending_connection():  # type: ignore[union-attr]
            assert not server.is_accepting()
        server.resume_accepting()
        assert server.is_accepting()


def test_a_pause_before_listen_holds_once_listening(loop: EventLoop) -> None:
    # Qt's pauseAccepting() needs a listening server; ours records the pause.
    with TcpServer(loop=loop) as server:
        server.pause_accepting()
        assert server.listen(HostAddress.LocalHost, 0)
        assert not server.is_accepting()
        server.resume_accepting()
        assert server.is_accepting()


# -- qtbug6305, addressReusable, ipv6ServerMapped --------------------------------


@pytest.mark.parametrize(
    "address",
    [
        HostAddress.Any,
        HostAddress.AnyIPv4,
        HostAddress.AnyIPv6,
        HostAddress.LocalHost,
        HostAddress.LocalHostIPv6,
    ],
    ids=repr,
)
def test_a_second_listener_on_the_same_address_and_port_fails(address: HostAddress) -> None:
    with TcpServer() as first, TcpServer() as second:
        assert first.listen(address, 0), first.error_string()
        assert second.listen(address, first.server_port()) is False
        assert second.server_error() is SocketError.AddressInUseError
        assert first.is_listening()


def test_a_restarted_server_binds_while_its_old_connection_is_in_time_wait() -> None:
    # addressReusable: SO_REUSEADDR, as Qt sets on Unix.
    with TcpServer() as first:
        assert first.listen(HostAddress.LocalHost, 0)
        port = first.server_port()
        with connect(first) as client:
            assert first.wait_for_new_connection(5000)
            conn = first.next_pending_connection()
            assert conn is not None
            conn.close()  # the server's end closes first: it is the one left in TIME_WAIT
            assert client.recv(1) == b""
    with TcpServer() as second:
        assert second.listen(HostAddress.LocalHost, port), second.error_string()


def test_an_ipv4_listener_accepts_v4_mapped_clients_and_not_ipv6() -> None:
    # ipv6ServerMapped
    with TcpServer() as server:
        assert server.listen(HostAddress.LocalHost, 0)
        port = server.server_port()
        for mapped in ("::ffff:127.0.0.1", "::ffff:7f00:1"):
            with socket.socket(socket.AF_INET6) as client:
                client.settimeout(5)
                client.connect((mapped, port))
                assert server.wait_for_new_connection(5000)
                with server.next_pending_connection() as conn:  # type: ignore[union-attr]
                    echo_once(conn, client)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("::1", port), timeout=5)


# -- serverAddress / linkLocal -----------------------------------------------------

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_SIOCSIFADDR = 0x8916
_IFF_UP = 0x1
_IFA_F_TENTATIVE = 0x40
_IPV6_ADDR_LINKLOCAL = 0x20
_SKIP = 3  # the child's exit code for "cannot set up here"


def _unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _enter_private_network() -> None:
    """Give this (forked, single-threaded) process a network namespace of its own."""
    try:
        _unshare(_CLONE_NEWNET)  # as root
    except PermissionError:  # otherwise as root of a user namespace of our own
        uid, gid = os.getuid(), os.getgid()
        _unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                           ("gid_map", f"0 {gid} 1")):  # fmt: skip
            with open(f"/proc/self/{name}", "w") as file:
                file.write(text)


def _add_to_loopback(ip: str, prefix: int) -> None:
    """Bring ``lo`` up and give it *ip* (what ``ip addr add`` does, by ioctl)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        (flags,) = struct.unpack_from("H", fcntl.ioctl(sock, _SIOCGIFFLAGS, ifreq), 16)
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        packed = socket.inet_pton(socket.AF_INET6, ip)
        fcntl.ioctl(sock, _SIOCSIFADDR, struct.pack("16sIi", packed, prefix,
                                                    socket.if_nametoindex("lo")))  # fmt: skip


def _loopback_addresses() -> dict[str, tuple[int, int]]:
    """``lo``'s IPv6 addresses here: ip -> (scope, flags), from /proc/net/if_inet6."""
    found: dict[str, tuple[int, int]] = {}
    with contextlib.suppress(OSError), open("/proc/net/if_inet6") as table:
        for line in table:
            hexaddr, _index, _prefix, scope, flags, name = line.split()
            if name == "lo":
                ip = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hexaddr))
                found[ip] = (int(scope, 16), int(flags, 16))
    return found


def _loopback_link_local() -> str | None:
    """A link-local address ``lo`` already has here, if any."""
    for ip, (scope, _flags) in _loopback_addresses().items():
        if scope == _IPV6_ADDR_LINKLOCAL:
            return ip
    return None


def _usable(ip: str) -> bool:
    """Added and no longer tentative: the kernel clears that flag asynchronously."""
    entry = _loopback_addresses().get(ip)
    return entry is not None and not entry[1] & _IFA_F_TENTATIVE


def _with_link_local_on_loopback(body: Callable[[str], None]) -> None:
    """Run body(ip) in a child where ``lo`` has the link-local *ip*."""
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6 support")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"IPv6 is not available here: {exc}")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(r)
            try:
                _enter_private_network()
                _add_to_loopback("fe80::1", 64)
                ip = "fe80::1"
                poll_until(lambda: _usable(ip), "fe80::1 usable on lo")
            except OSError as exc:
                found = _loopback_link_local()
                if found is None:
                    os.write(w, f"no network namespace of our own ({exc}), "
                                "and lo has no link-local address".encode())  # fmt: skip
                    code = _SKIP
                    return
                ip = found
            body(ip)
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        report = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == _SKIP:
        pytest.skip(report)
    assert code == 0, report


def _link_local_listener(ip: str) -> None:
    lo = socket.if_nametoindex("lo")
    given = HostAddress(f"{ip}%lo")
    with TcpServer() as server, TcpServer() as by_index, TcpServer() as rival:
        assert server.listen(given, 0), server.error_string()
        port = server.server_port()
        assert server.server_address() == given  # serverAddress
        assert str(server.server_address()) == f"{ip}%lo"
        assert server.server_address().scope_id() == "lo"
        assert server.describe() == f"[{ip}%lo]:{port}"

        # A zone given by number is the same interface, reported by name as Qt does.
        assert by_index.listen(f"{ip}%{lo}", 0), by_index.error_string()
        assert by_index.server_address() == given
        assert str(by_index.server_address()) == f"{ip}%lo"

        # qtbug6305 on a link-local address.
        assert rival.listen(given, port) is False
        assert rival.server_error() is SocketError.AddressInUseError

        # linkLocal: an unbound and a bound client both reach it.
        with contextlib.ExitStack() as stack:
            unbound = stack.enter_context(socket.create_connection((f"{ip}%lo", port), timeout=5))
            bound = stack.enter_context(socket.socket(socket.AF_INET6))
            bound.settimeout(5)
            bound.bind((ip, 0, 0, lo))
            bound.connect((ip, port, 0, lo))
            for client in (unbound, bound):
                assert server.wait_for_new_connection(5000)
                with server.next_pending_connection() as conn:  # type: ignore[union-attr]
                    assert HostAddress.from_sockaddr(socket.AF_INET6, conn.getsockname()) == given
                    peer = HostAddress.from_sockaddr(socket.AF_INET6, conn.getpeername())
                    assert peer == given
                    echo_once(conn, client)
        assert not server.has_pending_connections()


def test_a_link_local_listener_reports_the_address_it_was_given() -> None:
    _with_link_local_on_loopback(_link_local_listener)
