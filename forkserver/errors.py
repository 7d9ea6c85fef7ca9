"""Error types: ``SocketError`` (Qt's codes), errno translation, messages.

``SocketError`` keeps Qt's member names *and* values
(``QAbstractSocket::SocketError``), so numbers logged by either side
mean the same thing.  ``ForkserverError`` is the base of every exception
the library raises on purpose; modules subclass it.
"""

from __future__ import annotations

import enum
import errno
import os

__all__ = [
    "ForkserverError",
    "SocketError",
    "errno_reason",
    "socket_error_from_errno",
]


class ForkserverError(Exception):
    """Base class of the exceptions forkserver raises deliberately."""


class SocketError(enum.IntEnum):
    """``QAbstractSocket::SocketError``: the same names, the same values."""

    ConnectionRefusedError = 0
    RemoteHostClosedError = 1
    HostNotFoundError = 2
    SocketAccessError = 3
    SocketResourceError = 4
    SocketTimeoutError = 5
    DatagramTooLargeError = 6
    NetworkError = 7
    AddressInUseError = 8
    SocketAddressNotAvailableError = 9
    UnsupportedSocketOperationError = 10
    UnfinishedSocketOperationError = 11
    ProxyAuthenticationRequiredError = 12
    SslHandshakeFailedError = 13
    ProxyConnectionRefusedError = 14
    ProxyConnectionClosedError = 15
    ProxyConnectionTimeoutError = 16
    ProxyNotFoundError = 17
    ProxyProtocolError = 18
    OperationError = 19
    SslInternalError = 20
    SslInvalidUserDataError = 21
    TemporaryError = 22
    UnknownSocketError = -1


# errno -> (SocketError, a phrase that completes "cannot listen on X: ...").
# The phrases are ours, not strerror(), so they read as a sentence and
# say what a person can do about it.
_ERRNO_TABLE: dict[int, tuple[SocketError, str]] = {
    errno.EADDRINUSE: (SocketError.AddressInUseError, "the address is already in use"),
    errno.EACCES: (
        SocketError.SocketAccessError,
        "permission denied (ports below 1024 need privileges)",
    ),
    errno.EPERM: (SocketError.SocketAccessError, "the operation is not permitted"),
    errno.EADDRNOTAVAIL: (
        SocketError.SocketAddressNotAvailableError,
        "the address is not available on this machine",
    ),
    errno.EMFILE: (
        SocketError.SocketResourceError,
        "too many open files in this process (see RLIMIT_NOFILE)",
    ),
    errno.ENFILE: (SocketError.SocketResourceError, "too many open files in the system"),
    errno.ENOBUFS: (SocketError.SocketResourceError, "the kernel is out of buffer space"),
    errno.ENOMEM: (SocketError.SocketResourceError, "the kernel is out of memory"),
    errno.EAFNOSUPPORT: (
        SocketError.UnsupportedSocketOperationError,
        "the address family is not supported here",
    ),
    errno.EPROTONOSUPPORT: (
        SocketError.UnsupportedSocketOperationError,
        "the protocol is not supported here",
    ),
    errno.EOPNOTSUPP: (
        SocketError.UnsupportedSocketOperationError,
        "the socket does not support this operation",
    ),
    errno.EBADF: (SocketError.UnsupportedSocketOperationError, "the descriptor is not open"),
    errno.ENOTSOCK: (
        SocketError.UnsupportedSocketOperationError,
        "the descriptor is not a socket",
    ),
    errno.EINVAL: (
        SocketError.UnsupportedSocketOperationError,
        "the socket is in a state that does not allow this",
    ),
    errno.ENETDOWN: (SocketError.NetworkError, "the network is down"),
    errno.ENETUNREACH: (SocketError.NetworkError, "the network is unreachable"),
    errno.EAGAIN: (SocketError.TemporaryError, "the resource is temporarily unavailable"),
}


def socket_error_from_errno(code: int | None) -> SocketError:
    """The ``SocketError`` for an errno; ``UnknownSocketError`` if unmapped."""
    if code is None:
        return SocketError.UnknownSocketError
    entry = _ERRNO_TABLE.get(code)
    return entry[0] if entry else SocketError.UnknownSocketError


def errno_reason(code: int | None) -> str:
    """A lower-case phrase for an errno, fit to follow a colon."""
    if code is None:
        return "an unknown error occurred"
    entry = _ERRNO_TABLE.get(code)
    if entry:
        return entry[1]
    name = errno.errorcode.get(code, str(code))
    return f"{_lower_first(os.strerror(code))} ({name})"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]
