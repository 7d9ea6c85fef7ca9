"""SocketError keeps Qt's names and values; errno translation reads as a sentence."""

from __future__ import annotations

import errno

import pytest

from forkserver.errors import (
    ForkserverError,
    SocketError,
    errno_reason,
    socket_error_from_errno,
)

# QAbstractSocket::SocketError, from the Qt documentation.
QT_VALUES = {
    "ConnectionRefusedError": 0,
    "RemoteHostClosedError": 1,
    "HostNotFoundError": 2,
    "SocketAccessError": 3,
    "SocketResourceError": 4,
    "SocketTimeoutError": 5,
    "DatagramTooLargeError": 6,
    "NetworkError": 7,
    "AddressInUseError": 8,
    "SocketAddressNotAvailableError": 9,
    "UnsupportedSocketOperationError": 10,
    "UnfinishedSocketOperationError": 11,
    "ProxyAuthenticationRequiredError": 12,
    "SslHandshakeFailedError": 13,
    "ProxyConnectionRefusedError": 14,
    "ProxyConnectionClosedError": 15,
    "ProxyConnectionTimeoutError": 16,
    "ProxyNotFoundError": 17,
    "ProxyProtocolError": 18,
    "OperationError": 19,
    "SslInternalError": 20,
    "SslInvalidUserDataError": 21,
    "TemporaryError": 22,
    "UnknownSocketError": -1,
}


def test_socket_error_has_exactly_qts_members_and_values() -> None:
    assert {m.name: m.value for m in SocketError} == QT_VALUES


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EADDRINUSE, SocketError.AddressInUseError),
        (errno.EACCES, SocketError.SocketAccessError),
        (errno.EADDRNOTAVAIL, SocketError.SocketAddressNotAvailableError),
        (errno.EMFILE, SocketError.SocketResourceError),
        (errno.ENFILE, SocketError.SocketResourceError),
        (errno.ENOBUFS, SocketError.SocketResourceError),
        (errno.ENOMEM, SocketError.SocketResourceError),
        (errno.EAFNOSUPPORT, SocketError.UnsupportedSocketOperationError),
        (errno.EIO, SocketError.UnknownSocketError),
        (None, SocketError.UnknownSocketError),
    ],
)
def test_errno_maps_to_socket_error(code: int | None, expected: SocketError) -> None:
    assert socket_error_from_errno(code) is expected


def test_reasons_are_phrases_that_follow_a_colon() -> None:
    assert errno_reason(errno.EADDRINUSE) == "the address is already in use"
    assert errno_reason(errno.EMFILE).startswith("too many open files")
    # An errno without a phrase of ours still names itself.
    assert errno_reason(errno.EIO) == "input/output error (EIO)"
    assert errno_reason(None) == "an unknown error occurred"


def test_forkserver_error_is_the_base_other_modules_subclass() -> None:
    class ConfigLikeError(ForkserverError):
        pass

    with pytest.raises(ForkserverError, match="bad key"):
        raise ConfigLikeError("bad key")
    assert issubclass(ForkserverError, Exception)
