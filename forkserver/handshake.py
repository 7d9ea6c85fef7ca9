"""Server TLS handshakes with a deadline, why they fail, and what they negotiated.

What the workers call for each TLS connection, with a context from
``forkserver.tls.build_context``:

* ``handshake_blocking(sock, ctx, deadline)`` for sync and thread
  workers: non-blocking steps, each wait bounded by the time left, so a
  client that stalls or drips bytes holds a worker no longer than the
  deadline.
* ``handshake_async(sock, ctx, timeout)`` (asyncio streams) and
  ``handshake_async_transport(factory, sock, ctx, timeout)`` (a
  protocol) for asyncio workers, asyncio's loop or uvloop.
* ``classify_handshake_error(exc)``: a bounded ``FailureReason`` code for
  logs and counters, with OpenSSL's reason text.
* ``connection_info(conn)``: protocol, ALPN, cipher, SNI name and peer
  certificate of an ``SSLSocket``, ``SSLObject`` or asyncio transport.

Every helper takes the socket over: on failure it is closed and
``HandshakeError`` (an ``OSError``) is raised with the classification.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import math
import re
import select
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from forkserver import tls
from forkserver.errors import ForkserverError, SocketError

__all__ = [
    "FailureReason",
    "HandshakeError",
    "HandshakeFailure",
    "TlsInfo",
    "classify_handshake_error",
    "connection_info",
    "handshake_async",
    "handshake_async_transport",
    "handshake_blocking",
]

MAX_DETAIL: Final = 200  # characters of OpenSSL's text kept in a HandshakeFailure



class FailureReason(enum.StrEnum):
    """Why a handshake failed, as a short code for logs and counters."""

    PLAINTEXT_HTTP = "plaintext_http"  # an HTTP request sent to a TLS port
    NOT_TLS = "not_tls"  # some other protocol, or noise
    PROTOCOL_VERSION = "protocol_version"  # e.g. TLS 1.0/1.1 against a TLS 1.2 minimum
    NO_SHARED_CIPHER = "no_shared_cipher"  # no common cipher, group or signature scheme
    UNKNOWN_CA = "unknown_ca"  # a certificate from a CA the other side does not trust
    BAD_CERTIFICATE = "bad_certificate"  # expired, wrong purpose, bad signature, ...
    NO_CERTIFICATE = "no_certificate"  # tls_client_auth required, none given
    TOO_LARGE = "too_large"  # a handshake message or record over OpenSSL's limits
    MALFORMED = "malformed"  # a TLS message that does not parse
    TIMEOUT = "timeout"  # not finished before the deadline
    EOF = "eof"  # the peer closed or reset the connection mid-handshake
    OTHER = "other"


_SOCKET_ERRORS: Final = {
    FailureReason.TIMEOUT: SocketError.SocketTimeoutError,
    FailureReason.EOF: SocketError.RemoteHostClosedError,
}


@dataclass(frozen=True)
class HandshakeFailure:
    """A classified handshake failure: ``reason`` (bounded), ``detail`` (OpenSSL's words)."""

    reason: FailureReason
    detail: str

    @property
    def socket_error(self) -> SocketError:
        """Qt's code for it: ``SocketTimeoutError``, ``RemoteHostClosedError``
        or ``SslHandshakeFailedError``."""
        return _SOCKET_ERRORS.get(self.reason, SocketError.SslHandshakeFailedError)

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class HandshakeError(ForkserverError, OSError):
    """A server handshake failed; ``failure`` says why.  The socket is closed."""

    def __init__(self, failure: HandshakeFailure) -> None:
        super().__init__(f"TLS handshake failed ({failure})")
        self.failure = failure


_R = FailureReason
# OpenSSL's reason codes (``SSLError.reason``) -> our reason.
_BY_OPENSSL_REASON: Final[Mapping[str, FailureReason]] = {
    "HTTP_REQUEST": _R.PLAINTEXT_HTTP,
    "HTTPS_PROXY_REQUEST": _R.PLAINTEXT_HTTP,
    "WRONG_VERSION_NUMBER": _R.NOT_TLS,
    "UNKNOWN_PROTOCOL": _R.NOT_TLS,
    "UNSUPPORTED_PROTOCOL": _R.PROTOCOL_VERSION,
    "VERSION_TOO_LOW": _R.PROTOCOL_VERSION,
    "VERSION_TOO_HIGH": _R.PROTOCOL_VERSION,
    "NO_PROTOCOLS_AVAILABLE": _R.PROTOCOL_VERSION,
    "UNSUPPORTED_SSL_VERSION": _R.PROTOCOL_VERSION,
    "INAPPROPRIATE_FALLBACK": _R.PROTOCOL_VERSION,
    "TLSV1_ALERT_PROTOCOL_VERSION": _R.PROTOCOL_VERSION,
    "TLSV1_ALERT_INAPPROPRIATE_FALLBACK": _R.PROTOCOL_VERSION,
    "NO_SHARED_CIPHER": _R.NO_SHARED_CIPHER,
    "NO_CIPHERS_AVAILABLE": _R.NO_SHARED_CIPHER,
    "NO_SHARED_GROUPS": _R.NO_SHARED_CIPHER,
    "NO_SUITABLE_KEY_SHARE": _R.NO_SHARED_CIPHER,
    "NO_SHARED_SIGNATURE_ALGORITHMS": _R.NO_SHARED_CIPHER,
    "NO_SUITABLE_SIGNATURE_ALGORITHM": _R.NO_SHARED_CIPHER,
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": _R.NO_SHARED_CIPHER,
    "TLSV1_ALERT_UNKNOWN_CA": _R.UNKNOWN_CA,
    "SSLV3_ALERT_BAD_CERTIFICATE": _R.BAD_CERTIFICATE,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": _R.BAD_CERTIFICATE,
    "SSLV3_ALERT_CERTIFICATE_REVOKED": _R.BAD_CERTIFICATE,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": _R.BAD_CERTIFICATE,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": _R.BAD_CERTIFICATE,
    "TLSV1_ALERT_DECRYPT_ERROR": _R.BAD_CERTIFICATE,
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": _R.NO_CERTIFICATE,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": _R.NO_CERTIFICATE,
    "EXCESSIVE_MESSAGE_SIZE": _R.TOO_LARGE,
    "PACKET_LENGTH_TOO_LONG": _R.TOO_LARGE,
    "ENCRYPTED_LENGTH_TOO_LONG": _R.TOO_LARGE,
    "DATA_LENGTH_TOO_LONG": _R.TOO_LARGE,
    "TLSV1_ALERT_RECORD_OVERFLOW": _R.TOO_LARGE,
    "LENGTH_MISMATCH": _R.MALFORMED,
    "LENGTH_TOO_SHORT": _R.MALFORMED,
    "BAD_PACKET_LENGTH": _R.MALFORMED,
    "BAD_LENGTH": _R.MALFORMED,
    "RECORD_LENGTH_MISMATCH": _R.MALFORMED,
    "BAD_EXTENSION": _R.MALFORMED,
    "PARSE_TLSEXT": _R.MALFORMED,
    "BAD_RECORD_TYPE": _R.MALFORMED,
    "UNEXPECTED_MESSAGE": _R.MALFORMED,
    "UNEXPECTED_RECORD": _R.MALFORMED,
    "BAD_HANDSHAKE_STATE": _R.MALFORMED,
    "TLSV1_ALERT_DECODE_ERROR": _R.MALFORMED,
    "SSLV3_ALERT_ILLEGAL_PARAMETER": _R.MALFORMED,
    "SSLV3_ALERT_UNEXPECTED_MESSAGE": _R.MALFORMED,
    "UNEXPECTED_EOF_WHILE_READING": _R.EOF,
}
# X509 verify codes for "I do not know who signed this" (x509_vfy.h):
# 2 issuer cert, 18 self-signed leaf, 19 self-signed in chain, 20 local
# issuer, 21 leaf signature, 27 untrusted.
_UNKNOWN_ISSUER_CODES: Final = frozenset({2, 18, 19, 20, 21, 27})
_EOF_ERRNOS: Final = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ECONNABORTED})


def classify_handshake_error(exc: BaseException) -> HandshakeFailure:
    """What a handshake exception means, as a ``HandshakeFailure``."""
    if isinstance(exc, HandshakeError):
        return exc.failure
    if isinstance(exc, ssl.SSLError):
        return _classify_ssl(exc)
    if isinstance(exc, TimeoutError):
        return _failure(_R.TIMEOUT, str(exc) or "the handshake timed out")
    if isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc):
        return _failure(_R.TIMEOUT, str(exc))  # asyncio's ssl_handshake_timeout
    if isinstance(exc, ConnectionError) or (
        isinstance(exc, OSError) and exc.errno in _EOF_ERRNOS
    ):
        # asyncio reports a peer's EOF mid-handshake as a bare ConnectionResetError.
        return _failure(_R.EOF, exc.strerror or str(exc) or "the connection was lost")
    return _failure(_R.OTHER, f"{type(exc).__name__}: {exc}")


def _classify_ssl(exc: ssl.SSLError) -> HandshakeFailure:
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        reason = _R.UNKNOWN_CA if code in _UNKNOWN_ISSUER_CODES else _R.BAD_CERTIFICATE
        return _failure(reason, f"CERTIFICATE_VERIFY_FAILED: {exc.verify_message} (code {code})")
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return _failure(_R.EOF, exc.reason or str(exc))
    if "Closed before TLS handshake" in str(exc):  # ssl.py: reset before it was wrapped
        return _failure(_R.EOF, str(exc))
    if exc.reason:
        text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
        found = _BY_OPENSSL_REASON.get(exc.reason, _R.OTHER)
        return _failure(found, f"{exc.reason}: {_openssl_words(text)}")
    return _failure(_R.OTHER, str(exc))


def _failure(reason: FailureReason, detail: str) -> HandshakeFailure:
    return HandshakeFailure(reason, detail[:MAX_DETAIL])


def _openssl_words(text: str) -> str:
    """``[SSL: HTTP_REQUEST] http request (_ssl.c:1006)`` -> ``http request``."""
    words = text.split("] ", 1)[-1]
    return re.sub(r" \(_ssl\.c:\d+\)$", "", words)


# -- handshakes -----------------------------------------------------------------


def handshake_blocking(
    sock: socket.socket, ctx: ssl.SSLContext, deadline: float
) -> ssl.SSLSocket:
    """Run the server handshake on a connected socket by *deadline* (``time.monotonic()``).

    *sock* is taken over: the ``SSLSocket`` returned replaces it (with
    *sock*'s blocking mode and timeout restored), and on failure it is
    closed and ``HandshakeError`` raised.  A client that stalls, or drips
    its bytes one at a time, is cut off at the deadline: the handshake
    runs non-blocking, and each wait for the peer gets only the time left.
    """
    previous = sock.gettimeout()
    try:
        tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except (OSError, ValueError) as exc:
        sock.close()
        raise HandshakeError(classify_handshake_error(exc)) from exc
    try:
        tls.setblocking(False)
        poller = select.poll()  # unlike epoll, costs no descriptor
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                events = select.POLLIN
            except ssl.SSLWantWriteError:
                events = select.POLLOUT
            # Checked before each wait, so a client that keeps a byte
            # ready at every step is still cut off at the deadline.
            if time.monotonic() >= deadline:
                raise TimeoutError("the client did not finish its handshake in time")
            poller.register(tls, events)
            ready = poller.poll(_poll_ms(deadline))
            poller.unregister(tls)
            if not ready:
                raise TimeoutError("the client did not finish its handshake in time")
        tls.settimeout(previous)
    except (OSError, ValueError) as exc:
        tls.close()
        raise HandshakeError(classify_handshake_error(exc)) from exc
    except BaseException:
        tls.close()
        raise
    return tls


def _poll_ms(deadline: float) -> int:
    """Milliseconds left until *deadline*, rounded up so a wait never ends early."""
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))


_P = TypeVar("_P", bound=asyncio.BaseProtocol)


async def handshake_async_transport(
    protocol_factory: Callable[[], _P], sock: socket.socket, ctx: ssl.SSLContext, timeout: float
) -> tuple[asyncio.Transport, _P]:
    """The server handshake on an accepted socket in the running loop; ``(transport, protocol)``.

    The protocol's ``connection_made`` runs once the handshake is done.
    Failure (including *timeout* seconds passing) closes *sock* and
    raises ``HandshakeError``.  Works with asyncio's loop and uvloop.
    """
    loop = asyncio.get_running_loop()
    made: list[_P] = []

    def make_protocol() -> _P:
        # uvloop returns its own SSL protocol, not ours: keep ours here.
        protocol = protocol_factory()
        made.append(protocol)
        return protocol

    try:
        sock.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(
            make_protocol, sock, ssl=ctx, ssl_handshake_timeout=timeout
        )
    except (OSError, ValueError) as exc:
        sock.close()  # the loop closed its transport; this covers a refusal before one existed
        raise HandshakeError(classify_handshake_error(exc)) from exc
    except BaseException:
        sock.close()
        raise
    return transport, made[0]


async def handshake_async(
    sock: socket.socket, ctx: ssl.SSLContext, timeout: float, *, limit: int = 2**16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """As ``handshake_async_transport``, as asyncio streams (what ``open_connection`` gives)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await handshake_async_transport(lambda: protocol, sock, ctx, timeout)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


# -- what the handler sees ------------------------------------------------------


@dataclass(frozen=True)
class TlsInfo:
    """A TLS connection as negotiated.

    ``server_name`` is the SNI name the client asked for (known when the
    context came from ``build_context``).  ``peer_certificate`` is the
    ``getpeercert()`` dict of a verified client certificate and
    ``peer_certificate_der`` its DER bytes; both None without one.
    """

    version: str | None
    alpn: str | None
    cipher: str | None
    cipher_bits: int | None
    server_name: str | None
    peer_certificate: dict[str, Any] | None
    peer_certificate_der: bytes | None


def connection_info(
    conn: ssl.SSLSocket | ssl.SSLObject | asyncio.BaseTransport | asyncio.StreamWriter,
) -> TlsInfo:
    """``TlsInfo`` for an ``SSLSocket``, an ``SSLObject``, or an asyncio TLS transport or writer.

    Call it once the handshake is done and before the connection fails:
    after a TLS error OpenSSL reports the handshake as not done, and the
    ssl module raises ``ValueError``.
    """
    if isinstance(conn, asyncio.StreamWriter):
        conn = conn.transport
    if not isinstance(conn, (ssl.SSLSocket, ssl.SSLObject)):
        # A transport: asyncio's, or uvloop's (which is no asyncio.BaseTransport).
        get_extra_info = getattr(conn, "get_extra_info", None)
        found = get_extra_info("ssl_object") if callable(get_extra_info) else None
        if not isinstance(found, (ssl.SSLObject, ssl.SSLSocket)):
            raise TypeError(
                "connection_info() takes an SSLSocket, an SSLObject or an asyncio TLS "
                f"transport, not {type(conn).__name__}"
            )
        conn = found
    cipher = conn.cipher()
    der = conn.getpeercert(binary_form=True)
    cert = conn.getpeercert() if der else None
    return TlsInfo(
        version=conn.version(),
        alpn=conn.selected_alpn_protocol(),
        cipher=cipher[0] if cipher else None,
        cipher_bits=cipher[2] if cipher else None,
        server_name=tls.requested_server_name(conn),
        peer_certificate=cert or None,  # {}: received but not verified
        peer_certificate_der=der or None,
    )
