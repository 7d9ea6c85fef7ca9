"""``TcpServer``: the semantics of Qt's ``QTcpServer``, with no processes.

One listening socket, an optional ``EventLoop`` that tells us when to
accept, and a bounded queue of accepted connections.  The prefork master
subclasses it and overrides ``incoming_connection()`` to pass each
descriptor on instead of queueing it.

Invariants:

* Every descriptor created or accepted here is close-on-exec (CPython
  accepts with ``accept4(SOCK_CLOEXEC)``; adopted descriptors are made
  non-inheritable explicitly).
* A connection is never accepted and then dropped: the server stops
  accepting while the pending queue is full, and the kernel backlog
  holds the rest.
* Accepting never spins: at most ``accept_batch_size()`` accepts per
  wake-up, and a lack of descriptors or memory takes the listener out
  of the loop for a short back-off.
* Programming errors (a port out of range, a wrong type) raise;
  run-time failures return False and set ``server_error()`` and a
  sentence in ``error_string()`` that names the address.
"""

from __future__ import annotations

import collections
import enum
import errno
import math
import os
import select
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, NamedTuple

from forkserver.errors import SocketError, errno_reason, socket_error_from_errno
from forkserver.eventloop import EventLoop, Signal, TimerHandle
from forkserver.hostaddress import HostAddress

__all__ = ["NetworkProxy", "TcpServer", "WaitResult"]

DEFAULT_MAX_PENDING: Final = 30  # Qt's default
DEFAULT_BACKLOG: Final = 50  # Qt 6's listenBacklogSize() default
DEFAULT_ACCEPT_BATCH: Final = 64
BACKOFF_FIRST: Final = 0.1  # seconds; nginx waits 0.5 s, libuv-style spinning waits 0
BACKOFF_MAX: Final = 1.0

# accept(2): "Linux accept() passes already-pending network errors on the
# new socket as an error code from accept() ... should treat them like
# EAGAIN by retrying."  ECONNABORTED: the peer reset before we accepted.
# EPERM: firewall rules forbid the connection.
_SKIP_ERRNOS: Final = frozenset(
    {
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
    }
)
# Out of descriptors or kernel memory: retrying at once would spin (a
# readable listener stays readable), so wait for something to be freed.
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The listener itself is broken; retrying cannot help.
_FATAL_ERRNOS: Final = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK, errno.EFAULT})

#: The start of Linux's ``struct tcp_info``: ``tcpi_state``, then at byte 24
#: ``tcpi_unacked``, for a listening socket the connections its accept queue
#: holds, and at byte 28 ``tcpi_sacked``, the most it may hold.
_TCP_INFO_QUEUE: Final = struct.Struct("=B23xII")
#: ``tcpi_state`` of a listening socket (``TCP_LISTEN`` in the kernel's tcp_states.h).
_TCP_LISTEN: Final = 10

_ADOPTABLE_FAMILIES: Final = {
    socket.AF_INET: "IPv4",
    socket.AF_INET6: "IPv6",
    socket.AF_UNIX: "Unix",
}


class NetworkProxy(enum.IntEnum):
    """``QNetworkProxy::ProxyType``: the same names and values."""

    DefaultProxy = 0
    Socks5Proxy = 1
    NoProxy = 2
    HttpProxy = 3
    HttpCachingProxy = 4
    FtpCachingProxy = 5


class WaitResult(NamedTuple):
    """What ``wait_for_new_connection()`` found; true when a connection is available."""

    available: bool
    timed_out: bool

    def __bool__(self) -> bool:
        return self.available


class TcpServer:
    """A listening TCP (or Unix stream) socket with Qt's ``QTcpServer`` API.

    With a *loop*, the server accepts whenever the listener is readable
    and emits ``new_connection`` from the loop.  Without one, call
    ``wait_for_new_connection()``, which blocks, as in Qt.
    """

    def __init__(self, parent: object | None = None, *, loop: EventLoop | None = None) -> None:
        self.new_connection = Signal()  # after each accepted connection, whoever took it
        self.pending_connection_available = Signal()  # after each add_pending_connection()
        self.accept_error = Signal()  # emitted with a SocketError
        self._parent = parent
        self._loop = loop
        self._sock: socket.socket | None = None
        self._fd = -1
        self._address = HostAddress.Null
        self._port = 0
        self._pending: collections.deque[socket.socket] = collections.deque()
        # What counts against max_pending, for the accept loop: the queue's own
        # len(), a call into C, unless a subclass counts more (SslServer's
        # handshakes); then None, and its _total_pending_connections() is called.
        self._count_pending: Callable[[], int] | None = (
            self._pending.__len__
            if type(self)._total_pending_connections is TcpServer._total_pending_connections
            else None
        )
        #: The listener says how many connections its accept queue holds (TCP).
        self._counts_queue = False
        self._max_pending = DEFAULT_MAX_PENDING
        self._backlog = DEFAULT_BACKLOG
        self._batch = DEFAULT_ACCEPT_BATCH
        self._proxy = NetworkProxy.DefaultProxy
        self._error = SocketError.UnknownSocketError
        self._error_string = ""
        # Why accepting may be off, each for its own reason.
        self._paused = False  # pause_accepting()
        self._broken = False  # a fatal accept error; resume_accepting() retries
        self._backoff_until = 0.0  # monotonic; out of resources until then
        self._backoff_delay = BACKOFF_FIRST
        self._backoff_timer: TimerHandle | None = None
        self._watching = False  # registered with the loop
        self._accept_errors = 0  # lets wait_for_new_connection() see a failure
        #: Connections accepted over the server's life (counted once per batch).
        self.accepted_total = 0

    # -- Qt API: state ---------------------------------------------------

    def parent(self) -> object | None:
        return self._parent

    def is_listening(self) -> bool:
        return self._sock is not None

    def socket_descriptor(self) -> int:
        return self._fd

    def server_address(self) -> HostAddress:
        return self._address

    def server_port(self) -> int:
        return self._port

    def server_error(self) -> SocketError:
        return self._error

    def error_string(self) -> str:
        return self._error_string

    def proxy(self) -> NetworkProxy:
        return self._proxy

    def set_proxy(self, proxy: NetworkProxy) -> None:
        if not isinstance(proxy, NetworkProxy):
            raise TypeError(f"set_proxy() takes a NetworkProxy, not {type(proxy).__name__}")
        self._proxy = proxy

    def max_pending_connections(self) -> int:
        return self._max_pending

    def set_max_pending_connections(self, num_connections: int) -> None:
        self._max_pending = _positive("set_max_pending_connections", num_connections)
        self._update_watch()

    # -- extensions (docs/internals.md) ---------------------------------

    def listen_backlog_size(self) -> int:
        return self._backlog

    def set_listen_backlog_size(self, size: int) -> None:
        """The ``listen()`` backlog; takes effect at the next ``listen()``."""
        self._backlog = _positive("set_listen_backlog_size", size)

    def accept_batch_size(self) -> int:
        return self._batch

    def set_accept_batch_size(self, size: int) -> None:
        """At most *size* ``accept()`` calls per wake-up."""
        self._batch = _positive("set_accept_batch_size", size)

    def listening_socket(self) -> socket.socket | None:
        return self._sock

    def listen_queue(self) -> tuple[int, int] | None:
        """The kernel's accept queue, ``(waiting, bound)``; see ``listen_queue``."""
        return None if self._sock is None else listen_queue(self._sock)

    def pause_accepting(self) -> None:
        self._paused = True
        self._update_watch()

    def resume_accepting(self) -> None:
        """Undo ``pause_accepting()``; also retries after a fatal accept error."""
        self._paused = False
        self._broken = False
        self._update_watch()

    def is_accepting(self) -> bool:
        """True while the loop would accept the next connection now."""
        return self._watching

    def describe(self) -> str:
        """What this server listens on, for logs: ``127.0.0.1:8000``, ``unix:/x``, ``fd 3``."""
        if self._sock is None:
            return "not listening"
        return _describe_socket(self._sock, self._address, self._port)

    # -- listening ------------------------------------------------------

    def listen(self, address: HostAddress | str = HostAddress.Any, port: int = 0) -> bool:
        """Bind and listen; port 0 picks a free port.  False on failure, see ``error_string()``."""
        _check_port(port)
        host = address if isinstance(address, HostAddress) else HostAddress(address)
        where = _endpoint(address, host, port)
        if not self._can_start(f"cannot listen on {where}"):
            return False
        if host.is_null():
            return self._fail(
                SocketError.SocketAddressNotAvailableError,
                f"cannot listen on {where}: not a numeric IPv4 or IPv6 address",
            )
        try:
            sock = _bind_and_listen(host, port, self._backlog)
        except socket.gaierror as exc:  # the address itself parsed, so: a bad IPv6 zone
            zone = host.scope_id()
            reason = f"no network interface is named {zone!r}" if zone else str(exc.strerror)
            return self._fail(
                SocketError.SocketAddressNotAvailableError, f"cannot listen on {where}: {reason}"
            )
        except OSError as exc:
            code = exc.errno if isinstance(exc.errno, int) else None
            return self._fail(
                socket_error_from_errno(code), f"cannot listen on {where}: {errno_reason(code)}"
            )
        self._start(sock)
        return True

    def set_socket_descriptor(self, socket_descriptor: int) -> bool:
        """Adopt an already-listening TCP or Unix stream socket; the server now owns it.

        It is never bound or listened on again.  On failure the
        descriptor is left open and untouched, and False is returned.
        """
        fd = socket_descriptor
        if isinstance(fd, bool) or not isinstance(fd, int):
            raise TypeError(f"set_socket_descriptor() takes an int, not {type(fd).__name__}")
        if not self._can_start(f"cannot adopt descriptor {fd}"):
            return False
        problem = _adoption_problem(fd)
        if problem is not None:
            error, reason = problem
            return self._fail(error, f"cannot adopt descriptor {fd}: {reason}")
        sock = socket.socket(fileno=fd)
        try:
            sock.setblocking(False)
            sock.set_inheritable(False)
        except OSError as exc:
            sock.detach()  # the caller still owns it
            code = exc.errno if isinstance(exc.errno, int) else None
            return self._fail(
                socket_error_from_errno(code), f"cannot adopt descriptor {fd}: {errno_reason(code)}"
            )
        self._start(sock)
        return True

    def close(self) -> None:
        """Stop listening and close every connection still pending, as Qt does."""
        self._stop_watching()
        if self._backoff_timer is not None:
            self._backoff_timer.cancel()
            self._backoff_timer = None
        sock, self._sock = self._sock, None
        self._fd, self._address, self._port = -1, HostAddress.Null, 0
        self._paused = self._broken = False
        self._backoff_until, self._backoff_delay = 0.0, BACKOFF_FIRST
        if sock is not None:
            sock.close()
        while self._pending:
            self._pending.popleft().close()

    def _can_start(self, doing: str) -> bool:
        if self._sock is not None:
            return self._fail(
                SocketError.OperationError, f"{doing}: the server is already listening"
            )
        if self._proxy not in (NetworkProxy.DefaultProxy, NetworkProxy.NoProxy):
            return self._fail(
                SocketError.UnsupportedSocketOperationError,
                f"{doing}: a {self._proxy.name} cannot listen "
                "(only DefaultProxy and NoProxy are supported)",
            )
        return True

    def _start(self, sock: socket.socket) -> None:
        self._sock, self._fd = sock, sock.fileno()
        self._counts_queue = sock.family in (socket.AF_INET, socket.AF_INET6)
        self._address, self._port = _local_address(sock)
        self._update_watch()

    def _fail(self, error: SocketError, message: str) -> bool:
        self._error, self._error_string = error, message
        return False

    # -- the pending queue ----------------------------------------------

    def has_pending_connections(self) -> bool:
        return bool(self._pending)

    def next_pending_connection(self) -> socket.socket | None:
        """The oldest accepted connection, or None; taking one makes room to accept."""
        if not self._pending:
            return None
        sock = self._pending.popleft()
        self._update_watch()
        return sock

    def _total_pending_connections(self) -> int:
        """What counts against ``max_pending_connections()`` (Qt's totalPendingConnections()).

        A subclass adds the connections it is still setting up, as
        ``SslServer`` does with those in their TLS handshake.
        """
        return len(self._pending)

    def add_pending_connection(self, sock: socket.socket) -> None:
        if not isinstance(sock, socket.socket):
            raise TypeError(
                f"add_pending_connection() takes a socket.socket, not {type(sock).__name__}"
            )
        self._pending.append(sock)
        self._update_watch()
        self.pending_connection_available.emit()

    def _dispatch_to(self) -> tuple[Callable[[int, int], object] | None, int]:
        """``(dispatch, index)`` for the accept loop to call ``dispatch(fd, index)``
        instead of ``incoming_connection(fd)``, or ``(None, 0)``.

        For a subclass whose ``incoming_connection`` only passes the
        descriptor on: a Python frame fewer per connection.  An override
        of its ``incoming_connection`` must still be the one called
        (``Listener``).
        """
        return None, 0

    def incoming_connection(self, socket_descriptor: int) -> None:
        """Called with each accepted descriptor, which the callee now owns.

        Raw, connected, blocking and close-on-exec.  The base
        implementation wraps it in a ``socket.socket`` and queues it with
        ``add_pending_connection()``.  Override to hand it elsewhere;
        ``new_connection`` is emitted when this returns, either way.
        """
        try:
            sock = socket.socket(fileno=socket_descriptor)
        except BaseException:
            os.close(socket_descriptor)
            raise
        self.add_pending_connection(sock)

    def wait_for_new_connection(self, msec: int = 0) -> WaitResult:
        """Block up to *msec* ms (negative: forever, 0: poll) for a connection.

        ``(True, False)`` once one is available; ``(False, True)`` on
        timeout, with ``server_error()`` set to ``SocketTimeoutError`` as
        in Qt; ``(False, False)`` when not listening, or when accept
        failed (see ``server_error()``).
        """
        if self._pending:
            return WaitResult(True, False)
        if self._sock is None:
            return WaitResult(False, False)
        deadline = None if msec < 0 else _now() + msec / 1000
        if self._paused:
            return self._wait_while_paused(deadline, msec)
        return self._wait_and_accept(deadline, msec)

    def _wait_and_accept(self, deadline: float | None, msec: int) -> WaitResult:
        poller = select.poll()  # unlike epoll, costs no descriptor
        poller.register(self._fd, select.POLLIN)
        errors_before = self._accept_errors
        while True:
            sock = self.listening_socket()
            if sock is None:  # a slot closed the server
                return WaitResult(False, False)
            if self._wait_readable(poller, deadline):
                accepted = self._accept_batch(sock)
                if accepted or self._pending:
                    return WaitResult(True, False)
                if self._accept_errors != errors_before:
                    return WaitResult(False, False)
            if deadline is not None and _now() >= deadline:
                return self._timed_out(msec)

    def _wait_while_paused(self, deadline: float | None, msec: int) -> WaitResult:
        """Nothing is accepted while paused, so a readable listener would only
        spin the poll: wait out the time instead.  (Qt's wait accepts
        regardless of a pause; we keep the pause, as everywhere else.)"""
        if deadline is None:
            self._fail(SocketError.OperationError,
                       f"accepting on {self.describe()} is paused: no connection can arrive")
            return WaitResult(False, False)
        time.sleep(max(0.0, deadline - _now()))
        return self._timed_out(msec)

    def _timed_out(self, msec: int) -> WaitResult:
        self._fail(
            SocketError.SocketTimeoutError,
            f"no connection arrived on {self.describe()} within {msec} ms",
        )
        return WaitResult(False, True)

    def _wait_readable(self, poller: select.poll, deadline: float | None) -> bool:
        now = _now()
        if self._backoff_until > now:
            # Out of resources: wait out the back-off rather than fail again at once.
            end = self._backoff_until if deadline is None else min(deadline, self._backoff_until)
            time.sleep(max(0.0, end - now))
            return False
        return bool(poller.poll(_poll_ms(deadline)))

    # -- accepting ------------------------------------------------------

    def _should_watch(self) -> bool:
        return (
            self._loop is not None
            and self._sock is not None
            and not self._paused
            and not self._broken
            and self._backoff_timer is None
            and (self._count_pending or self._total_pending_connections)() < self._max_pending
        )

    def _update_watch(self) -> None:
        should = self._should_watch()  # once: after every accept batch
        if should and not self._watching:
            assert self._loop is not None
            self._loop.add_reader(self._fd, self._on_readable)
            self._watching = True
        elif self._watching and not should:
            self._stop_watching()

    def _stop_watching(self) -> None:
        if self._watching and self._loop is not None:
            self._loop.remove_reader(self._fd)
        self._watching = False

    def _on_readable(self) -> None:
        if self._sock is not None:
            self._accept_batch(self._sock)
        self._update_watch()

    def _accept_batch(self, sock: socket.socket) -> int:
        """Accept up to the batch size; the number handed to ``incoming_connection``."""
        if _now() < self._backoff_until:  # only a failure sets it, and that ends the batch
            return 0
        accept: Callable[[], tuple[int, object]] = sock._accept  # type: ignore[attr-defined]
        total_pending = self._count_pending or self._total_pending_connections
        incoming = self.incoming_connection
        dispatch, index = self._dispatch_to()
        new_connection = self.new_connection
        accepted = 0
        batch = self._batch
        if self._counts_queue:
            # An accept that finds the queue empty costs the kernel a file it then
            # throws away, several microseconds: take what is queued, no more.
            # Level-triggered, the loop wakes again for whatever arrives meanwhile.
            batch = min(batch, accepts_queued(sock))
        for _ in range(batch):
            # incoming_connection() or a slot may fill the queue, pause
            # accepting (a dispatcher whose own queue is full) or close the server.
            if self._sock is not sock or self._paused or total_pending() >= self._max_pending:
                break
            try:
                fd, _peer = accept()  # no socket object per connection
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _SKIP_ERRNOS:
                    continue
                self._on_accept_failure(exc)
                break
            if not accepted:
                self._backoff_delay = BACKOFF_FIRST  # accepting works again
            accepted += 1
            if dispatch is None:
                incoming(fd)
            else:
                dispatch(fd, index)  # what incoming_connection() would call
            # As Qt: also when an override took the descriptor.  The master's
            # listeners connect no slot, so they skip building an empty call.
            if new_connection._slots:
                new_connection.emit()
        self.accepted_total += accepted
        return accepted

    def _on_accept_failure(self, exc: OSError) -> None:
        code = exc.errno if isinstance(exc.errno, int) else None
        error = socket_error_from_errno(code)
        where = self.describe()
        if code in _FATAL_ERRNOS:
            self._broken = True
            message = f"accept on {where} failed: {errno_reason(code)}; accepting stopped"
        else:  # out of resources, or an errno nobody listed: back off and retry
            delay = self._backoff_delay
            self._backoff_delay = min(BACKOFF_MAX, delay * 2)
            self._backoff_until = _now() + delay
            if self._loop is not None:
                self._backoff_timer = self._loop.call_later(delay, self._end_backoff)
            message = f"accept on {where} failed: {errno_reason(code)}; retrying in {delay:g} s"
        self._accept_errors += 1
        self._fail(error, message)
        self._update_watch()
        self.accept_error.emit(error)

    def _end_backoff(self) -> None:
        self._backoff_timer = None
        self._update_watch()

    # -- context manager ------------------------------------------------

    def __enter__(self) -> TcpServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the server and every connection still pending."""
        self.close()

    def __repr__(self) -> str:
        return f"<TcpServer {self.describe()}>"


# -- helpers -------------------------------------------------------------


def _now() -> float:
    return time.monotonic()


def _poll_ms(deadline: float | None) -> int:
    if deadline is None:
        return -1
    return max(0, math.ceil((deadline - _now()) * 1000))


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}() takes an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}() needs a number >= 1, got {value}")
    return value


def _check_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int, not {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (0..65535)")


def _endpoint(given: HostAddress | str, host: HostAddress, port: int) -> str:
    """The address as the caller wrote it, for messages."""
    if not host.is_null():
        return host.with_port(port)
    if isinstance(given, str):
        return f"{given!r} port {port}"
    return f"a null address, port {port}"


def _bind_and_listen(host: HostAddress, port: int, backlog: int) -> socket.socket:
    sockaddr = host.sockaddr(port)
    try:
        sock = socket.socket(host.family(), socket.SOCK_STREAM)  # close-on-exec (PEP 446)
    except OSError as exc:
        if host.is_any() and exc.errno == errno.EAFNOSUPPORT:  # IPv6 is off: as Qt, use IPv4
            return _bind_and_listen(HostAddress.AnyIPv4, port, backlog)
        raise
    try:
        # As Qt on Unix: a restarted server can bind while old connections
        # sit in TIME_WAIT.  (It does not allow two listeners on one port.)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6:
            # Any is dual-stack; every other IPv6 address, "::" included,
            # is IPv6 only, whatever net.ipv6.bindv6only says.
            v6only = 0 if host.is_any() else 1
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _local_address(sock: socket.socket) -> tuple[HostAddress, int]:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return HostAddress.Null, 0
    name = sock.getsockname()
    address = HostAddress.from_sockaddr(sock.family, name)
    if (
        address == HostAddress.AnyIPv6
        and sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    ):
        address = HostAddress.Any
    return address, int(name[1])


def _describe_socket(sock: socket.socket, address: HostAddress, port: int) -> str:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return address.with_port(port)
    try:
        name = sock.getsockname() if sock.family == socket.AF_UNIX else None
    except OSError:
        name = None
    if isinstance(name, str) and name:
        return f"unix:{name}"
    if isinstance(name, bytes) and name.startswith(b"\0"):  # Linux abstract namespace
        return "unix:@" + name[1:].decode("utf-8", "backslashreplace")
    return f"fd {sock.fileno()}"


def accepts_queued(sock: socket.socket) -> int:
    """How many accepts the accept queue of a listening TCP socket is worth.

    Linux reports the queue in its ``TCP_INFO`` (as ``tcpi_unacked``;
    ``ss -lt`` shows it as Recv-Q).  At least 1: a wake-up with nothing
    counted is a socket another process accepted from first, or one no
    longer listening (shut down under the server), whose accept gives
    the error.  A socket that is not listening, or a kernel that does not
    answer, gives ``sys.maxsize``: accept until the queue is empty, as
    without a count.  The count may be stale by the time it is used: an
    accept that finds nothing is handled as ever.
    """
    try:
        state, count, _bound = _TCP_INFO_QUEUE.unpack(
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_QUEUE.size))
    except (OSError, struct.error):
        return sys.maxsize
    return max(1, count) if state == _TCP_LISTEN else sys.maxsize


def listen_queue(sock: socket.socket) -> tuple[int, int] | None:
    """``(waiting, bound)`` of a listening TCP socket's accept queue, or None.

    *waiting*: connections the kernel has completed and nobody has
    accepted yet; *bound*: the most it holds, the ``listen()`` backlog as
    ``net.core.somaxconn`` caps it (``ss -lt`` shows both, as Recv-Q and
    Send-Q).  None for any other socket (a Unix socket has no
    ``TCP_INFO``) or a kernel that does not answer.  One ``getsockopt``:
    read when a status or a scrape asks, never per connection.
    """
    try:
        state, waiting, bound = _TCP_INFO_QUEUE.unpack(
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_QUEUE.size))
    except (OSError, struct.error):
        return None
    return (waiting, bound) if state == _TCP_LISTEN else None


def _adoption_problem(fd: int) -> tuple[SocketError, str] | None:
    """Why *fd* cannot be adopted as a listener, or None if it can."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return SocketError.UnsupportedSocketOperationError, "it is not an open descriptor"
        return socket_error_from_errno(exc.errno), errno_reason(exc.errno)
    if not stat.S_ISSOCK(mode):
        return (
            SocketError.UnsupportedSocketOperationError,
            f"it is not a socket but {_file_kind(mode)}",
        )
    return _socket_problem(fd)


def _socket_problem(fd: int) -> tuple[SocketError, str] | None:
    probe = socket.socket(fileno=fd)
    try:
        family, kind, proto = probe.family, probe.type, probe.proto
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        probe.detach()  # the descriptor stays the caller's
    reason = None
    if family not in _ADOPTABLE_FAMILIES:
        reason = (
            f"it is a {_enum_name(family)} socket; "
            "only IPv4, IPv6 and Unix stream sockets can be adopted"
        )
    elif kind != socket.SOCK_STREAM:
        reason = f"it is a {_enum_name(kind)} socket, not a stream (SOCK_STREAM) socket"
    elif family != socket.AF_UNIX and proto not in (0, socket.IPPROTO_TCP):
        reason = f"it is a stream socket of protocol {proto}, not TCP"
    if reason is not None:
        return SocketError.UnsupportedSocketOperationError, reason
    if not listening:
        return SocketError.OperationError, "the socket is not listening (listen() was not called)"
    return None


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    for test, name in kinds:
        if test(mode):
            return name
    return "some other kind of file"


def _enum_name(value: int) -> str:
    return getattr(value, "name", str(value))
