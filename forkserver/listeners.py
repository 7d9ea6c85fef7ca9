"""Bind specs and the listening sockets they name.

A bind spec is one ``--bind`` value (or a ``listeners`` entry in the
config file).  The accepted forms:

=================  ==============================================
``HOST:PORT``      TCP on a host name or IPv4 address
``[V6]:PORT``      TCP on an IPv6 address
``:PORT``          TCP on every address, IPv4 and IPv6 (dual stack)
``unix:PATH``      a Unix stream socket at PATH (``@NAME``: abstract)
``fd://N``         an already listening socket inherited as fd N
``systemd``        every socket systemd passed (LISTEN_FDS)
``systemd:NAME``   the systemd socket(s) named NAME (LISTEN_FDNAMES)
=================  ==============================================

``parse_bind`` is pure: it checks the text and names what is wrong.
``open_listeners`` turns parsed specs into listening sockets.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import socket
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from forkserver.errors import ForkserverError
from forkserver.eventloop import EventLoop
from forkserver.hostaddress import HostAddress
from forkserver.systemd import InheritedSocket, SystemdError, check_listening, listen_fds
from forkserver.tcpserver import TcpServer

#: Longer bind specs are refused before any parsing.
MAX_SPEC_LENGTH: Final = 4096
#: ``sun_path`` holds 108 bytes including the terminating NUL.
MAX_UNIX_PATH_BYTES: Final = 107

BindKind = Literal["tcp", "unix", "fd", "systemd"]

_PORT_RE: Final = re.compile(r"[0-9]{1,5}")
_HOST_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,253}")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,255}")
_NUMERIC_HOST_RE: Final = re.compile(r"[0-9.]+")


class ListenerError(ForkserverError, ValueError):
    """A bind spec is malformed, or its socket cannot be opened."""


@dataclass(frozen=True, slots=True)
class BindSpec:
    """One parsed bind spec; fields that do not apply to ``kind`` are empty."""

    kind: BindKind
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1
    name: str = ""
    text: str = ""


def parse_bind(text: str) -> BindSpec:
    """Parse one bind spec, raising ``ListenerError`` naming it when invalid."""
    if not isinstance(text, str):
        raise ListenerError(f"bind spec must be a string, not {type(text).__name__}")
    if len(text) > MAX_SPEC_LENGTH:
        raise ListenerError(f"bind spec {text[:40]!r}... is too long: {len(text)} characters, "
                            f"the limit is {MAX_SPEC_LENGTH}")  # fmt: skip
    if text != text.strip() or not text:
        raise ListenerError(f"bind spec {text!r}: empty or surrounded by whitespace")
    if text.startswith("unix:"):
        return _parse_unix(text)
    if text.startswith("fd://"):
        return _parse_fd(text)
    if text == "systemd" or text.startswith("systemd:"):
        return _parse_systemd(text)
    return _parse_tcp(text)


def _parse_unix(text: str) -> BindSpec:
    path = text[len("unix:") :]
    if not path:
        raise ListenerError(f"bind spec {text!r}: no path after 'unix:'")
    if "\0" in path:
        raise ListenerError(f"bind spec {text!r}: the path contains a NUL byte")
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > MAX_UNIX_PATH_BYTES:
        raise ListenerError(
            f"bind spec {text!r}: the path is {size} bytes, more than a Unix socket "
            f"address holds ({MAX_UNIX_PATH_BYTES})"
        )
    return BindSpec(kind="unix", path=path, text=text)


def _parse_fd(text: str) -> BindSpec:
    number = text[len("fd://") :]
    if not number.isascii() or not number.isdigit() or len(number) > 9:
        raise ListenerError(f"bind spec {text!r}: 'fd://' needs a descriptor number")
    fd = int(number)
    if fd < 3:
        raise ListenerError(f"bind spec {text!r}: fd {fd} is a standard stream, not a socket")
    return BindSpec(kind="fd", fd=fd, text=text)


def _parse_systemd(text: str) -> BindSpec:
    if text == "systemd":
        return BindSpec(kind="systemd", text=text)
    name = text[len("systemd:") :]
    if not _NAME_RE.fullmatch(name):
        raise ListenerError(
            f"bind spec {text!r}: a systemd socket name is 1 to 255 of A-Z a-z 0-9 . _ : -"
        )
    return BindSpec(kind="systemd", name=name, text=text)


def _parse_tcp(text: str) -> BindSpec:
    host_part, sep, port_text = text.rpartition(":")
    if not sep:
        raise ListenerError(
            f"bind spec {text!r}: expected HOST:PORT, [V6]:PORT, :PORT, unix:PATH, "
            "fd://N or systemd[:NAME]"
        )
    port = _parse_port(text, port_text)
    if host_part.startswith("["):
        if not host_part.endswith("]"):
            raise ListenerError(f"bind spec {text!r}: unbalanced '[' in the IPv6 address")
        host = host_part[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ListenerError(f"bind spec {text!r}: {host!r} is not an IPv6 address") from None
        return BindSpec(kind="tcp", host=host, port=port, text=text)
    if ":" in host_part:
        raise ListenerError(
            f"bind spec {text!r}: an IPv6 address must be in brackets, as in [::1]:{port}"
        )
    if host_part and not _HOST_RE.fullmatch(host_part):
        raise ListenerError(f"bind spec {text!r}: {host_part!r} is not a host name or address")
    if _NUMERIC_HOST_RE.fullmatch(host_part):
        _check_ipv4(text, host_part)
    return BindSpec(kind="tcp", host=host_part, port=port, text=text)


def _check_ipv4(text: str, host: str) -> None:
    """An all-numeric dotted host is an IPv4 address, never a name to resolve.

    (The resolver would take ``999.1.1.1`` for a host name and fail at
    run time, or read ``127.1`` the inet_aton way.)
    """
    octets = host.split(".")
    if len(octets) != 4:
        raise ListenerError(f"bind spec {text!r}: {host!r} has {len(octets)} parts; "
                            "an IPv4 address has 4, as in 127.0.0.1")  # fmt: skip
    for octet in octets:
        if not octet:
            raise ListenerError(f"bind spec {text!r}: {host!r} has an empty octet")
        if len(octet) > 1 and octet.startswith("0"):
            raise ListenerError(f"bind spec {text!r}: octet {octet!r} of {host!r} has a "
                                "leading zero (ambiguous: octal or decimal)")  # fmt: skip
        if int(octet) > 255:
            raise ListenerError(f"bind spec {text!r}: octet {octet} of {host!r} is over 255, "
                                "so it is not an IPv4 address")  # fmt: skip


def _parse_port(text: str, port_text: str) -> int:
    if not _PORT_RE.fullmatch(port_text):
        raise ListenerError(f"bind spec {text!r}: port {port_text!r} is not a number 0-65535")
    port = int(port_text)
    if port > 65535:
        raise ListenerError(f"bind spec {text!r}: port {port} is out of range 0-65535")
    return port


# --- opening listeners ---------------------------------------------------

#: Called with each accepted descriptor and the listener's index.
Dispatch = Callable[[int, int], None]


class Listener(TcpServer):
    """A ``TcpServer`` that hands each accepted descriptor to ``dispatch``.

    Without a ``dispatch`` it behaves as a plain ``TcpServer`` (queues).
    A Unix socket it created itself is unlinked by ``close()``; one it
    adopted (``fd://``, systemd) never is.
    """

    def __init__(self, spec: BindSpec, index: int, *, loop: EventLoop | None = None) -> None:
        super().__init__(loop=loop)
        self.spec = spec
        self.index = index
        self.name = spec.name or spec.text
        self.dispatch: Dispatch | None = None
        self.created_path: str | None = None
        #: ``dispatch = "shared"``: the workers accept on it, never the master.
        self.shared = False
        #: The ``Settings.listeners`` table it was opened from (None: the global settings).
        self.table: int | None = None
        #: False while the master's queue holds connections no worker can take:
        #: the loop is not woken for arrivals it could only queue.
        self._wakes_for_arrivals = True

    def wake_for_arrivals(self, wake: bool) -> None:
        """Whether a new connection wakes the loop; without, it waits in the kernel's queue.

        Unlike ``pause_accepting()``, an accept batch under way goes on:
        what the kernel counted as queued is taken.  Level-triggered, a
        listener watched again is ready at once if connections wait.
        """
        self._wakes_for_arrivals = wake
        self._update_watch()

    def _should_watch(self) -> bool:
        return self._wakes_for_arrivals and super()._should_watch()

    def incoming_connection(self, socket_descriptor: int) -> None:
        dispatch = self.dispatch
        if dispatch is None:
            super().incoming_connection(socket_descriptor)
        else:
            dispatch(socket_descriptor, self.index)

    def _dispatch_to(self) -> tuple[Dispatch | None, int]:
        # The master's per-connection path: the accept loop calls dispatch
        # itself, unless a subclass overrides incoming_connection (Qt's way).
        if type(self).incoming_connection is not Listener.incoming_connection:
            return None, 0
        return self.dispatch, self.index

    def defer_accept(self, seconds: int) -> None:
        """``TCP_DEFER_ACCEPT``: accept a TCP connection only once its client has spoken.

        The kernel keeps a new connection out of the accept queue until
        data arrives on it, or for about *seconds* (rounded up to its
        SYN-ACK retransmission schedule).  0 leaves the socket as it is:
        off for one bound here, whatever its owner chose for an inherited
        one (systemd's ``DeferAcceptSec=``).  Unix sockets have no such
        option and are left alone.
        """
        sock = self.listening_socket()
        if seconds <= 0 or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, seconds)
        except OSError as exc:
            raise ListenerError(f"bind spec {self.spec.text!r}: cannot defer accepting "
                                f"(TCP_DEFER_ACCEPT): {exc.strerror or exc}") from None

    def close(self) -> None:
        super().close()
        path, self.created_path = self.created_path, None
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def open_listeners(
    specs: Sequence[BindSpec],
    *,
    backlog: int,
    loop: EventLoop | None = None,
    inherited: Sequence[InheritedSocket] | None = None,
) -> list[Listener]:
    """Open one listener per spec (a ``systemd`` spec may give several).

    *inherited* are the systemd sockets; when None and a spec needs them
    they are claimed with ``systemd.listen_fds()``.  On any failure the
    listeners already opened are closed and ``ListenerError`` names the
    spec and the reason.
    """
    opened: list[Listener] = []
    try:
        for spec in specs:
            if spec.kind == "systemd":
                if inherited is None:
                    inherited = _claim_systemd(spec)
                opened.extend(_open_systemd(spec, inherited, len(opened), loop))
            else:
                opened.append(open_listener(spec, len(opened), backlog=backlog, loop=loop))
    except BaseException:
        for listener in opened:
            listener.close()
        raise
    return opened


def open_listener(
    spec: BindSpec, index: int, *, backlog: int, loop: EventLoop | None = None
) -> Listener:
    """Open the listener for one ``tcp``, ``unix`` or ``fd`` spec."""
    listener = Listener(spec, index, loop=loop)
    listener.set_listen_backlog_size(backlog)
    if spec.kind == "tcp":
        ok = listener.listen(_resolve(spec), spec.port)
    elif spec.kind == "fd":
        ok = listener.set_socket_descriptor(spec.fd)
    elif spec.kind == "unix":
        fd, created = _bind_unix(spec, backlog)
        ok = listener.set_socket_descriptor(fd)
        if ok:
            listener.created_path = created
        else:
            os.close(fd)
    else:
        raise ListenerError(f"bind spec {spec.text!r}: open it with open_listeners()")
    if not ok:
        raise ListenerError(f"bind spec {spec.text!r}: {listener.error_string()}")
    return listener


def _resolve(spec: BindSpec) -> HostAddress:
    if not spec.host:
        return HostAddress.Any
    try:
        return HostAddress(str(ipaddress.ip_address(spec.host)))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(
            spec.host, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenerError(
            f"bind spec {spec.text!r}: cannot resolve {spec.host!r}: {exc.strerror}"
        ) from None
    return HostAddress(str(infos[0][4][0]))


def _bind_unix(spec: BindSpec, backlog: int) -> tuple[int, str | None]:
    """A listening Unix socket's descriptor, and the path to unlink later (if any)."""
    abstract = spec.path.startswith("@")
    address = "\0" + spec.path[1:] if abstract else spec.path
    if not abstract:
        _remove_stale(spec)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"bind spec {spec.text!r}: {exc.strerror or exc}") from None
    return sock.detach(), None if abstract else spec.path


def _remove_stale(spec: BindSpec) -> None:
    """Unlink a socket file nobody listens on; refuse anything else in the way."""
    try:
        mode = os.lstat(spec.path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenerError(f"bind spec {spec.text!r}: {spec.path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(spec.path)
    except OSError as exc:
        if exc.errno != errno.ECONNREFUSED:
            raise ListenerError(f"bind spec {spec.text!r}: {exc.strerror}") from None
        os.unlink(spec.path)  # a leftover from a server that is gone
        return
    finally:
        probe.close()
    raise ListenerError(f"bind spec {spec.text!r}: another process listens on {spec.path}")


def _claim_systemd(spec: BindSpec) -> list[InheritedSocket]:
    try:
        return listen_fds()
    except SystemdError as exc:
        raise ListenerError(f"bind spec {spec.text!r}: {exc}") from None


def _open_systemd(
    spec: BindSpec, inherited: Sequence[InheritedSocket], first: int, loop: EventLoop | None
) -> list[Listener]:
    chosen = [s for s in inherited if not spec.name or s.name == spec.name]
    if not chosen:
        what = f"named {spec.name!r}" if spec.name else "at all"
        raise ListenerError(
            f"bind spec {spec.text!r}: systemd passed no socket {what} (LISTEN_FDS/LISTEN_FDNAMES)"
        )
    opened: list[Listener] = []
    for offset, sock in enumerate(chosen):
        try:
            check_listening(sock)
        except SystemdError as exc:
            raise ListenerError(f"bind spec {spec.text!r}: {exc}") from None
        named = BindSpec(kind="systemd", fd=sock.fd, name=sock.name, text=spec.text)
        listener = Listener(named, first + offset, loop=loop)
        if not listener.set_socket_descriptor(sock.fd):
            raise ListenerError(f"bind spec {spec.text!r}: {listener.error_string()}")
        opened.append(listener)
    return opened
