"""``SslServer``: the semantics of Qt's ``QSslServer`` (Qt 6.4), on ``TcpServer``.

Each accepted connection waits for its client's first byte; a TLS
handshake record (0x16) starts the server handshake, anything else
ends the connection.  The handshake runs on a non-blocking
``ssl.SSLSocket``, one step per readiness event, with a deadline per
connection; only a completed handshake makes the socket pending.

With an ``EventLoop`` nothing blocks: the loop says when a socket is
readable or writable, and a timer ends a handshake that overruns.
Without one, ``wait_for_new_connection()`` drives the listener and every
handshake in progress with ``poll()`` until one completes.

Invariants:

* A socket is pending only after its handshake completed; a failed or
  timed-out one is closed once its signals have been emitted.
* Connections in their handshake count against
  ``max_pending_connections()``, as in Qt, so a crowd of slow clients
  stops accepting rather than growing without bound.
* Every handshake ends by its deadline: a client gets
  ``handshake_timeout()`` ms to send its first byte, and as long again
  from then on (Qt restarts the timer once, on that first byte).
"""

from __future__ import annotations

import enum
import functools
import math
import os
import re
import select
import socket
import ssl
import time
import weakref
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from forkserver.errors import SocketError
from forkserver.eventloop import EventLoop, Signal, TimerHandle
from forkserver.handshake import FailureReason, HandshakeFailure, classify_handshake_error
from forkserver.tcpserver import TcpServer, WaitResult

__all__ = ["AlertLevel", "AlertType", "PeerVerifyError", "SslError", "SslServer"]

DEFAULT_HANDSHAKE_TIMEOUT_MS: Final = 5000  # Qt's default
_TLS_HANDSHAKE_RECORD: Final = 0x16  # the content type a ClientHello arrives in
_PEEK: Final = 8  # bytes looked at to tell plain HTTP from other noise
_HTTP_REQUEST_RE: Final = re.compile(rb"[A-Z]{3,7} ")  # "GET ", "OPTIONS ", "PRI " (h2c)
_TLS_ALERT: Final = 21  # TLS record content type of an alert


class SslError(enum.IntEnum):
    """``QSslError::SslError``: the same names, the same values."""

    NoError = 0
    UnableToGetIssuerCertificate = 1
    UnableToDecryptCertificateSignature = 2
    UnableToDecodeIssuerPublicKey = 3
    CertificateSignatureFailed = 4
    CertificateNotYetValid = 5
    CertificateExpired = 6
    InvalidNotBeforeField = 7
    InvalidNotAfterField = 8
    SelfSignedCertificate = 9
    SelfSignedCertificateInChain = 10
    UnableToGetLocalIssuerCertificate = 11
    UnableToVerifyFirstCertificate = 12
    CertificateRevoked = 13
    InvalidCaCertificate = 14
    PathLengthExceeded = 15
    InvalidPurpose = 16
    CertificateUntrusted = 17
    CertificateRejected = 18
    SubjectIssuerMismatch = 19
    AuthorityIssuerSerialNumberMismatch = 20
    NoPeerCertificate = 21
    HostNameMismatch = 22
    NoSslSupport = 23
    CertificateBlacklisted = 24
    CertificateStatusUnknown = 25
    OcspNoResponseFound = 26
    OcspMalformedRequest = 27
    OcspMalformedResponse = 28
    OcspInternalError = 29
    OcspTryLater = 30
    OcspSigRequred = 31  # sic, as Qt spells it
    OcspUnauthorized = 32
    OcspResponseCannotBeTrusted = 33
    OcspResponseCertIdUnknown = 34
    OcspResponseExpired = 35
    OcspStatusUnknown = 36
    UnspecifiedError = -1


# OpenSSL's X509_V_ERR_* codes -> QSslError, as Qt's OpenSSL backend maps them.
_SSL_ERROR_BY_VERIFY_CODE: Final = {
    2: SslError.UnableToGetIssuerCertificate,
    4: SslError.UnableToDecryptCertificateSignature,
    6: SslError.UnableToDecodeIssuerPublicKey,
    7: SslError.CertificateSignatureFailed,
    9: SslError.CertificateNotYetValid,
    10: SslError.CertificateExpired,
    13: SslError.InvalidNotBeforeField,
    14: SslError.InvalidNotAfterField,
    18: SslError.SelfSignedCertificate,
    19: SslError.SelfSignedCertificateInChain,
    20: SslError.UnableToGetLocalIssuerCertificate,
    21: SslError.UnableToVerifyFirstCertificate,
    23: SslError.CertificateRevoked,
    24: SslError.InvalidCaCertificate,
    25: SslError.PathLengthExceeded,
    26: SslError.InvalidPurpose,
    27: SslError.CertificateUntrusted,
    28: SslError.CertificateRejected,
    62: SslError.HostNameMismatch,
}


class AlertLevel(enum.IntEnum):
    """``QSsl::AlertLevel``."""

    Warning = 0
    Fatal = 1
    Unknown = 2


class AlertType(enum.IntEnum):
    """``QSsl::AlertType``: the TLS alert descriptions (their values are the wire codes)."""

    CloseNotify = 0
    UnexpectedMessage = 10
    BadRecordMac = 20
    RecordOverflow = 22
    DecompressionFailure = 30
    HandshakeFailure = 40
    NoCertificate = 41
    BadCertificate = 42
    UnsupportedCertificate = 43
    CertificateRevoked = 44
    CertificateExpired = 45
    CertificateUnknown = 46
    IllegalParameter = 47
    UnknownCa = 48
    AccessDenied = 49
    DecodeError = 50
    DecryptError = 51
    ExportRestriction = 60
    ProtocolVersion = 70
    InsufficientSecurity = 71
    InternalError = 80
    InappropriateFallback = 86
    UserCancelled = 90
    NoRenegotiation = 100
    MissingExtension = 109
    UnsupportedExtension = 110
    CertificateUnobtainable = 111
    UnrecognizedName = 112
    BadCertificateStatusResponse = 113
    BadCertificateHashValue = 114
    UnknownPskIdentity = 115
    CertificateRequired = 116
    NoApplicationProtocol = 120
    UnknownAlertMessageType = 255


class PeerVerifyError(NamedTuple):
    """What ``QSslError`` tells of a failed certificate check (there is no certificate:
    the ssl module gives none for a handshake that failed)."""

    error: SslError
    error_string: str  # OpenSSL's words, e.g. "self-signed certificate"
    verify_code: int  # OpenSSL's X509_V_ERR_* number


@dataclass(eq=False)
class _Handshake:
    """One connection on its way to being pending."""

    sock: socket.socket  # the plain socket until the first byte, then its SSLSocket
    fd: int
    deadline: float  # monotonic
    encrypting: bool = False  # the client sent a handshake record; sock is an SSLSocket
    want_write: bool = False  # the handshake waits to write, not to read
    timer: TimerHandle | None = None
    registered: bool = False  # with the loop
    alerts: list[tuple[bool, int, int]] = field(default_factory=list)  # (sent, level, type)


class SslServer(TcpServer):
    """A ``TcpServer`` whose pending connections are ``ssl.SSLSocket`` objects.

    ``new_connection`` is emitted as each connection is accepted, as in
    Qt; ``pending_connection_available`` once its handshake completed
    and ``next_pending_connection()`` can return it.  Signals (each
    with the socket first; it is closed after a failure's signals):

    * ``started_encryption_handshake(sock)``: the client's first byte was
      a TLS handshake record; the handshake is under way.
    * ``peer_verify_error(sock, PeerVerifyError)`` then
      ``ssl_errors(sock, [PeerVerifyError])``: the client's certificate
      failed verification (reported once the handshake failed).
    * ``error_occurred(sock, SocketError)``: the handshake failed
      (``SslHandshakeFailedError``), timed out (``SocketTimeoutError``) or
      the client left (``RemoteHostClosedError``).
    * ``alert_sent`` / ``alert_received(sock, AlertLevel, AlertType,
      description)``: TLS alerts during the handshake.
    * ``handshake_failed(sock, HandshakeFailure)`` (ours): why, as a
      reason code, after ``error_occurred``.
    """

    def __init__(self, parent: object | None = None, *, loop: EventLoop | None = None) -> None:
        super().__init__(parent, loop=loop)
        self.started_encryption_handshake = Signal()
        self.peer_verify_error = Signal()
        self.ssl_errors = Signal()
        self.error_occurred = Signal()
        self.alert_sent = Signal()
        self.alert_received = Signal()
        self.handshake_failed = Signal()
        self._configuration: ssl.SSLContext | None = None
        self._handshake_timeout = DEFAULT_HANDSHAKE_TIMEOUT_MS
        self._handshakes: dict[int, _Handshake] = {}

    # -- Qt API ---------------------------------------------------------

    def ssl_configuration(self) -> ssl.SSLContext:
        """The context new connections use; by default one with no certificate, as Qt's."""
        if self._configuration is None:
            self._configuration = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        return self._configuration

    def set_ssl_configuration(self, ssl_configuration: ssl.SSLContext) -> None:
        """Use *ssl_configuration* for every connection accepted from now on."""
        ctx = ssl_configuration
        if not isinstance(ctx, ssl.SSLContext):
            raise TypeError(
                f"set_ssl_configuration() takes an ssl.SSLContext, not {type(ctx).__name__}"
            )
        if ctx.protocol == ssl.PROTOCOL_TLS_CLIENT:
            raise ValueError("set_ssl_configuration(): a PROTOCOL_TLS_CLIENT context cannot serve")
        self._configuration = ctx

    def handshake_timeout(self) -> int:
        return self._handshake_timeout

    def set_handshake_timeout(self, timeout: int) -> None:
        """Milliseconds a new connection has for its handshake (see the module docstring)."""
        if isinstance(timeout, bool) or not isinstance(timeout, int):
            raise TypeError(f"set_handshake_timeout() takes an int, not {type(timeout).__name__}")
        if timeout < 0:
            raise ValueError(f"set_handshake_timeout() needs a number >= 0, got {timeout}")
        self._handshake_timeout = timeout

    def close(self) -> None:
        """Stop listening; close the pending connections and those still in their handshake."""
        for hs in list(self._handshakes.values()):
            self._forget(hs)
            hs.sock.close()
        super().close()

    # -- accepting ------------------------------------------------------

    def _total_pending_connections(self) -> int:
        return super()._total_pending_connections() + len(self._handshakes)

    def incoming_connection(self, socket_descriptor: int) -> None:
        """Start the handshake of a new connection: wait for the client's first byte."""
        try:
            sock = socket.socket(fileno=socket_descriptor)
        except BaseException:
            os.close(socket_descriptor)
            raise
        sock.setblocking(False)
        hs = _Handshake(sock, socket_descriptor, self._new_deadline())
        self._handshakes[hs.fd] = hs
        if self._loop is not None:
            hs.timer = self._loop.call_at(hs.deadline, functools.partial(self._on_timeout, hs))
            self._watch(hs)

    def wait_for_new_connection(self, msec: int = 0) -> WaitResult:
        """Block up to *msec* ms (negative: forever) until a handshake completes.

        Drives the listener and every handshake in progress meanwhile.
        ``(True, False)`` once a connection is pending; ``(False, True)``
        on timeout, with ``SocketTimeoutError``; ``(False, False)`` when
        not listening or when accepting failed, as ``TcpServer``'s.
        """
        if self.has_pending_connections():
            return WaitResult(True, False)
        if not self.is_listening():
            return WaitResult(False, False)
        deadline = None if msec < 0 else time.monotonic() + msec / 1000
        errors_before = self._accept_errors
        while True:
            listener = self.listening_socket()
            if listener is None:  # a slot closed the server
                return WaitResult(False, False)
            self._drive_once(listener, deadline)
            if self.has_pending_connections():
                return WaitResult(True, False)
            if self._accept_errors != errors_before:
                return WaitResult(False, False)
            if deadline is not None and time.monotonic() >= deadline:
                self._fail(
                    SocketError.SocketTimeoutError,
                    f"no connection completed its TLS handshake on {self.describe()} "
                    f"within {msec} ms",
                )
                return WaitResult(False, True)

    def _drive_once(self, listener: socket.socket, deadline: float | None) -> None:
        """One ``poll()`` over the listener and the handshakes, and what it found."""
        now = time.monotonic()
        wake = deadline
        poller = select.poll()
        # Paused, or full: only a handshake ending can make room, so the
        # listener is left out (polling it would spin while it is readable).
        can_accept = not self._paused and self._total_pending_connections() < self._max_pending
        if can_accept and now < self._backoff_until:  # out of descriptors: wait it out
            wake = _earliest(wake, self._backoff_until)
        elif can_accept:
            poller.register(listener, select.POLLIN)
        for hs in self._handshakes.values():
            poller.register(hs.fd, select.POLLOUT if hs.want_write else select.POLLIN)
            wake = _earliest(wake, hs.deadline)
        for fd, _events in poller.poll(_poll_ms(wake)):
            if fd == listener.fileno():
                self._accept_batch(listener)
            else:
                ready = self._handshakes.get(fd)
                if ready is not None:
                    self._on_ready(ready)
        now = time.monotonic()
        for hs in [h for h in self._handshakes.values() if h.deadline <= now]:
            self._on_timeout(hs)

    # -- one handshake ----------------------------------------------------

    def _new_deadline(self) -> float:
        return time.monotonic() + self._handshake_timeout / 1000

    def _active(self, hs: _Handshake) -> bool:
        return self._handshakes.get(hs.fd) is hs

    def _watch(self, hs: _Handshake) -> None:
        if self._loop is None:
            return
        callback = functools.partial(self._on_ready, hs)
        if hs.want_write:
            self._loop.remove_reader(hs.fd)
            self._loop.add_writer(hs.fd, callback)
        else:
            self._loop.remove_writer(hs.fd)
            self._loop.add_reader(hs.fd, callback)
        hs.registered = True

    def _forget(self, hs: _Handshake) -> None:
        """Take *hs* out of every table and the loop (before its socket closes)."""
        if self._handshakes.get(hs.fd) is hs:
            del self._handshakes[hs.fd]
        if hs.timer is not None:
            hs.timer.cancel()
            hs.timer = None
        if hs.registered and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(hs.fd)
            self._loop.remove_writer(hs.fd)
        hs.registered = False
        _alert_watch.pop(hs.sock, None)
        _unhook_alerts()

    def _on_ready(self, hs: _Handshake) -> None:
        if not self._active(hs):
            return
        if hs.encrypting:
            self._continue(hs)
        else:
            self._check_client_hello(hs)

    def _check_client_hello(self, hs: _Handshake) -> None:
        # As Qt: look at the first byte before starting TLS on the socket.
        try:
            head = hs.sock.recv(_PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._end(hs, classify_handshake_error(exc))
            return
        if not head:
            self._end(hs, HandshakeFailure(
                FailureReason.EOF, "the client closed the connection before sending anything"
            ))
            return
        if head[0] != _TLS_HANDSHAKE_RECORD:
            self._end(hs, _not_tls(head))
            return
        ctx = self.ssl_configuration()
        watch_alerts = bool(len(self.alert_sent) or len(self.alert_received))
        if watch_alerts:
            _hook_alerts(ctx)
        try:
            tls = ctx.wrap_socket(hs.sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:  # reset before it could be wrapped
            self._end(hs, classify_handshake_error(exc))
            return
        hs.sock, hs.encrypting = tls, True
        if watch_alerts:
            _alert_watch[tls] = hs
        # Some progress was made: as Qt, the timer starts again.
        hs.deadline = self._new_deadline()
        if hs.timer is not None and self._loop is not None:
            hs.timer.cancel()
            hs.timer = self._loop.call_at(hs.deadline, functools.partial(self._on_timeout, hs))
        self.started_encryption_handshake.emit(tls)
        if self._active(hs):  # a slot may have closed the server
            self._continue(hs)

    def _continue(self, hs: _Handshake) -> None:
        assert isinstance(hs.sock, ssl.SSLSocket)
        try:
            hs.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._wait(hs, write=False)
            return
        except ssl.SSLWantWriteError:
            self._wait(hs, write=True)
            return
        except (OSError, ValueError) as exc:
            self._end(hs, classify_handshake_error(exc), exc)
            return
        self._forget(hs)
        hs.sock.setblocking(True)  # as every pending socket of a TcpServer
        self._emit_alerts(hs)
        self.add_pending_connection(hs.sock)

    def _wait(self, hs: _Handshake, *, write: bool) -> None:
        changed = write != hs.want_write
        hs.want_write = write
        if changed or not hs.registered:
            self._watch(hs)
        self._emit_alerts(hs)

    def _on_timeout(self, hs: _Handshake) -> None:
        if self._active(hs):
            hs.timer = None  # it fired
            what = "finish its handshake" if hs.encrypting else "send a byte"
            detail = f"the client did not {what} within {self._handshake_timeout} ms"
            self._end(hs, HandshakeFailure(FailureReason.TIMEOUT, detail))

    def _end(
        self, hs: _Handshake, failure: HandshakeFailure, exc: BaseException | None = None
    ) -> None:
        """A failed handshake: emit its signals, then close its socket."""
        self._forget(hs)
        sock = hs.sock
        try:
            self._emit_alerts(hs)
            if isinstance(exc, ssl.SSLCertVerificationError):
                error = PeerVerifyError(
                    _SSL_ERROR_BY_VERIFY_CODE.get(exc.verify_code, SslError.UnspecifiedError),
                    str(exc.verify_message),
                    int(exc.verify_code),
                )
                self.peer_verify_error.emit(sock, error)
                self.ssl_errors.emit(sock, [error])
            self.error_occurred.emit(sock, failure.socket_error)
            self.handshake_failed.emit(sock, failure)
        finally:
            sock.close()
            self._update_watch()  # room to accept again

    def _emit_alerts(self, hs: _Handshake) -> None:
        # Collected by _alert_hook while OpenSSL ran; emitted here, outside
        # OpenSSL's callback, so a slot may do anything (even raise).
        while hs.alerts:
            sent, level, kind = hs.alerts.pop(0)
            signal = self.alert_sent if sent else self.alert_received
            signal.emit(hs.sock, _alert_level(level), _alert_type(kind), _alert_words(kind))

    def __repr__(self) -> str:
        return f"<SslServer {self.describe()}>"


# -- helpers -------------------------------------------------------------


def _earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def _poll_ms(deadline: float | None) -> int:
    if deadline is None:
        return -1
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))


def _not_tls(head: bytes) -> HandshakeFailure:
    if _HTTP_REQUEST_RE.match(head):
        return HandshakeFailure(
            FailureReason.PLAINTEXT_HTTP, f"the client sent plain HTTP ({head!r}...)"
        )
    return HandshakeFailure(
        FailureReason.NOT_TLS,
        f"the first byte is 0x{head[0]:02x}, not a TLS handshake record (0x16)",
    )


# -- TLS alerts ----------------------------------------------------------
#
# The ssl module has no public view of alerts.  CPython's SSLContext has
# an undocumented ``_msg_callback`` (its own tests use it), called with
# every TLS message; while an alert slot is connected we set it on the
# context, keep only the alerts of sockets in their handshake, and clear
# it again when no handshake is watched.  Where the hook is missing, or
# the context already has a callback of its own, no alert is reported.

_alert_watch: weakref.WeakKeyDictionary[socket.socket, _Handshake] = weakref.WeakKeyDictionary()
_hooked: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()


def _alert_hook(  # noqa: PLR0917 (the signature CPython calls it with)
    conn: object, direction: str, version: object, content_type: int, msg_type: object, data: bytes
) -> None:
    if content_type != _TLS_ALERT or len(data) < 2 or not isinstance(conn, socket.socket):
        return
    hs = _alert_watch.get(conn)
    if hs is not None:
        hs.alerts.append((direction == "write", data[0], data[1]))


_MSG_CALLBACK: Final = "_msg_callback"


def _hook_alerts(ctx: ssl.SSLContext) -> None:
    if ctx in _hooked or not hasattr(ctx, _MSG_CALLBACK):
        return
    if getattr(ctx, _MSG_CALLBACK) is None:  # never replace a callback someone else set
        setattr(ctx, _MSG_CALLBACK, _alert_hook)
        _hooked.add(ctx)


def _unhook_alerts() -> None:
    if not _hooked or len(_alert_watch):
        return
    for ctx in list(_hooked):  # nothing is watched any more: OpenSSL need not call us
        if getattr(ctx, _MSG_CALLBACK) is _alert_hook:
            setattr(ctx, _MSG_CALLBACK, None)
        _hooked.discard(ctx)


def _alert_level(wire: int) -> AlertLevel:
    return {1: AlertLevel.Warning, 2: AlertLevel.Fatal}.get(wire, AlertLevel.Unknown)


def _alert_type(wire: int) -> AlertType:
    try:
        return AlertType(wire)
    except ValueError:
        return AlertType.UnknownAlertMessageType


def _alert_words(wire: int) -> str:
    """"unknown ca", from the ssl module's ``ALERT_DESCRIPTION_UNKNOWN_CA``."""
    try:
        name = ssl.AlertDescription(wire).name
    except ValueError:
        return f"alert {wire}"
    return name.removeprefix("ALERT_DESCRIPTION_").replace("_", " ").lower()
