"""``forkserver.handshake``: server handshakes against real clients.

The server side runs ``handshake_blocking`` (in a thread, as a sync
worker would) or ``handshake_async`` (in asyncio's loop and in uvloop).
Clients are ``openssl s_client``, Python's ssl module, or raw bytes for
what no well-behaved client sends: plain text, a truncated or huge
ClientHello, a client that stalls or drips.  Each failure must come
back with its reason code.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from forkserver.errors import SocketError
from forkserver.handshake import (
    FailureReason,
    HandshakeError,
    HandshakeFailure,
    TlsInfo,
    classify_handshake_error,
    connection_info,
    handshake_async,
    handshake_async_transport,
    handshake_blocking,
)
from forkserver.tls import TlsConfig, build_context
from tests.tls_support import (
    DAY,
    NOW,
    TIMEOUT,
    Issued,
    OneShotServer,
    Pki,
    client_context,
    client_hello,
    s_client,
    tcp_connect,
    tls_connect,
)

R = FailureReason


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("handshake"))


@pytest.fixture(scope="module")
def leaf(pki: Pki) -> Issued:
    return pki.server()


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second CA that nobody trusts."""
    return Pki(tmp_path_factory.mktemp("stranger"), "Stranger CA")


def context(leaf: Issued, **kwargs: Any) -> ssl.SSLContext:
    return build_context(
        TlsConfig(tls_certfile=str(leaf.certfile), tls_keyfile=str(leaf.keyfile), **kwargs)
    )


def blocking_server(ctx: ssl.SSLContext, timeout: float = TIMEOUT) -> OneShotServer:
    """One connection through ``handshake_blocking``; its outcome is a
    ``TlsInfo`` (after greeting the client and reading until it closes)
    or the ``HandshakeError``."""

    def serve(conn: socket.socket) -> TlsInfo | HandshakeError:
        try:
            tls = handshake_blocking(conn, ctx, time.monotonic() + timeout)
        except HandshakeError as exc:
            assert conn.fileno() == -1, "a failed handshake leaves the socket closed"
            return exc
        with tls:
            info = connection_info(tls)
            tls.settimeout(TIMEOUT)
            with contextlib.suppress(OSError):
                tls.sendall(b"hello\n")
                while tls.recv(4096):
                    pass
            return info

    return OneShotServer(serve)


def failure_of(server: OneShotServer) -> HandshakeFailure:
    outcome = server.outcome()
    assert isinstance(outcome, HandshakeError), outcome
    return outcome.failure


def info_of(server: OneShotServer) -> TlsInfo:
    outcome = server.outcome()
    assert isinstance(outcome, TlsInfo), outcome
    return outcome


def send_raw(address: tuple[str, int], data: bytes, *, close: bool = True) -> bytes:
    """Send *data*, half-close if asked, and return what came back until EOF.

    The server may refuse after the first bytes and reset the connection
    (it closes with our bytes unread): that ends the exchange, it is no error.
    """
    with tcp_connect(address) as sock:
        received = b""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            try:
                sock.sendall(data)
                if close:
                    sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:  # shutdown() after a reset
                    raise
            while chunk := sock.recv(4096):
                received += chunk
        return received


# -- successful handshakes ------------------------------------------------------------


def test_a_python_client(leaf: Issued, pki: Pki) -> None:
    with blocking_server(context(leaf)) as server:
        with tls_connect(server.address, client_context(pki.ca.certfile)) as client:
            assert client.recv(6) == b"hello\n"
        info = info_of(server)
    assert info.version == "TLSv1.3"
    assert info.cipher is not None and info.cipher.startswith("TLS_")
    assert info.cipher_bits is not None and info.cipher_bits >= 128
    assert info.alpn is None
    assert info.server_name == "localhost"
    assert info.peer_certificate is None and info.peer_certificate_der is None


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_s_client_at_each_version(leaf: Issued, pki: Pki, version: str) -> None:
    with blocking_server(context(leaf)) as server:
        result = s_client(server.address, version, "-CAfile", str(pki.ca.certfile),
                          "-verify_return_error", "-servername", "localhost")
        info = info_of(server)
    assert info.version == {"-tls1_2": "TLSv1.2", "-tls1_3": "TLSv1.3"}[version]
    assert "Verify return code: 0 (ok)" in result.output
    assert f"Protocol  : {info.version}" in result.output or (
        f"New, {info.version}" in result.output
    )


def test_alpn_picks_the_servers_first_choice_the_client_offers(leaf: Issued) -> None:
    ctx = context(leaf, tls_alpn=("h2", "http/1.1"))
    with blocking_server(ctx) as server:
        result = s_client(server.address, "-alpn", "spdy/3,http/1.1")
        assert info_of(server).alpn == "http/1.1"
    assert "ALPN protocol: http/1.1" in result.output
    with blocking_server(ctx) as server:  # no common protocol: no ALPN, not a failure
        result = s_client(server.address, "-alpn", "spdy/3")
        assert info_of(server).alpn is None
    assert "No ALPN negotiated" in result.output


def test_the_configured_cipher_is_used(leaf: Issued) -> None:
    ctx = context(leaf, tls_ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    with blocking_server(ctx) as server:
        s_client(server.address, "-tls1_2")
        info = info_of(server)
    assert (info.version, info.cipher) == ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")


def test_the_socket_keeps_its_timeout(leaf: Issued, pki: Pki) -> None:
    ctx = context(leaf)

    def serve(conn: socket.socket) -> tuple[float | None, float | None]:
        conn.settimeout(7.5)
        with handshake_blocking(conn, ctx, time.monotonic() + TIMEOUT) as tls:
            return (tls.gettimeout(), None)

    with OneShotServer(serve) as server:
        with tls_connect(server.address, client_context(pki.ca.certfile)):
            pass
        assert server.outcome() == (7.5, None)


# -- refused, with the reason ---------------------------------------------------------


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_tls_1_0_and_1_1_are_refused_by_default(leaf: Issued, version: str) -> None:
    with blocking_server(context(leaf)) as server:
        # SECLEVEL=0: this OpenSSL would not even offer TLS 1.0/1.1 otherwise.
        result = s_client(server.address, version, "-cipher", "DEFAULT@SECLEVEL=0")
        failure = failure_of(server)
    assert failure.reason is R.PROTOCOL_VERSION
    assert failure.detail == "UNSUPPORTED_PROTOCOL: unsupported protocol"
    assert failure.socket_error is SocketError.SslHandshakeFailedError
    assert "alert protocol version" in result.output
    assert result.returncode != 0


def test_a_tls_1_3_minimum_refuses_tls_1_2(leaf: Issued) -> None:
    with blocking_server(context(leaf, tls_min_version="TLSv1.3")) as server:
        s_client(server.address, "-tls1_2")
        assert failure_of(server).reason is R.PROTOCOL_VERSION


def test_no_shared_cipher(leaf: Issued) -> None:
    ctx = context(leaf, tls_ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    with blocking_server(ctx) as server:
        result = s_client(server.address, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384")
        failure = failure_of(server)
    assert failure == HandshakeFailure(R.NO_SHARED_CIPHER, "NO_SHARED_CIPHER: no shared cipher")
    assert "alert handshake failure" in result.output


def test_plain_http_on_the_tls_port(leaf: Issued) -> None:
    with blocking_server(context(leaf)) as server:
        send_raw(server.address, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert failure_of(server) == HandshakeFailure(R.PLAINTEXT_HTTP,
                                                      "HTTP_REQUEST: http request")


@pytest.mark.parametrize("data", [b"SSH-2.0-OpenSSH_9.6\r\n", b"\x00\x01\x02\x03hello"])
def test_other_plain_text_is_not_tls(leaf: Issued, data: bytes) -> None:
    with blocking_server(context(leaf)) as server:
        send_raw(server.address, data)
        failure = failure_of(server)
    assert failure == HandshakeFailure(R.NOT_TLS, "WRONG_VERSION_NUMBER: wrong version number")


def test_a_truncated_client_hello(leaf: Issued) -> None:
    hello = client_hello()
    with blocking_server(context(leaf)) as server:
        send_raw(server.address, hello[: len(hello) // 2])  # then EOF
        failure = failure_of(server)
    assert failure.reason is R.EOF
    assert failure.socket_error is SocketError.RemoteHostClosedError


def test_an_empty_connection(leaf: Issued) -> None:
    with blocking_server(context(leaf)) as server:
        send_raw(server.address, b"")
        assert failure_of(server).reason is R.EOF


def test_a_huge_client_hello_is_cut_off_early(leaf: Issued) -> None:
    # A ClientHello that claims 200 000 bytes: OpenSSL allows about 128 KiB.
    body = b"\x03\x03" + os.urandom(32) + b"\x00" * 16000
    message = b"\x01" + (200_000).to_bytes(3, "big") + body
    records = b"".join(
        b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
        for chunk in (message[i : i + 16000] for i in range(0, len(message), 16000))
    )
    with blocking_server(context(leaf)) as server:
        reply = send_raw(server.address, records, close=False)
        failure = failure_of(server)
    assert failure == HandshakeFailure(
        R.TOO_LARGE, "EXCESSIVE_MESSAGE_SIZE: excessive message size"
    )
    assert reply[:1] == b"\x15"  # a TLS alert record, then the close


def test_a_record_over_the_size_limit(leaf: Issued) -> None:
    with blocking_server(context(leaf)) as server:
        send_raw(server.address, b"\x16\x03\x01\xff\xff" + b"\x01" * 600, close=False)
        assert failure_of(server).reason is R.TOO_LARGE


def test_a_silent_client_is_cut_off_at_the_deadline(leaf: Issued) -> None:
    with blocking_server(context(leaf), timeout=0.3) as server, tcp_connect(server.address) as c:
        started = time.monotonic()
        assert c.recv(1) == b""  # the server closed it: we never sent a byte
        failure = failure_of(server)
        assert time.monotonic() - started >= 0.3 - 0.01
    assert failure.reason is R.TIMEOUT
    assert failure.socket_error is SocketError.SocketTimeoutError


def test_a_client_that_stops_mid_handshake_is_cut_off(leaf: Issued) -> None:
    hello = client_hello()
    with blocking_server(context(leaf), timeout=0.3) as server, tcp_connect(server.address) as c:
        c.sendall(hello[:100])
        assert c.recv(1) == b""
        assert failure_of(server).reason is R.TIMEOUT


def test_a_client_that_drips_its_hello_is_cut_off_at_the_deadline(leaf: Issued) -> None:
    """One byte at a time keeps every single wait short: only a deadline
    over the whole handshake ends it before the hello is complete."""
    hello = client_hello()
    sent = 0
    with blocking_server(context(leaf), timeout=0.5) as server, tcp_connect(server.address) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for byte in hello:
                if server.finished():
                    break
                c.send(bytes([byte]))
                sent += 1
                time.sleep(0.02)  # sleep-ok: the drip is the test (bounded: len(hello) steps)
        except OSError as exc:  # the server hung up on us
            assert exc.errno in (errno.EPIPE, errno.ECONNRESET)
        failure = failure_of(server)
    assert failure.reason is R.TIMEOUT
    assert sent < len(hello), "the whole hello went through before the deadline"


def test_client_certificate_required_but_none_given(leaf: Issued, pki: Pki) -> None:
    ctx = context(leaf, tls_client_auth="required", tls_cafile=str(pki.ca.certfile))
    with blocking_server(ctx) as server:
        s_client(server.address)
        failure = failure_of(server)
    assert failure == HandshakeFailure(
        R.NO_CERTIFICATE, "PEER_DID_NOT_RETURN_A_CERTIFICATE: peer did not return a certificate"
    )


def test_a_client_certificate_from_an_unknown_ca(leaf: Issued, pki: Pki, stranger: Pki) -> None:
    ctx = context(leaf, tls_client_auth="required", tls_cafile=str(pki.ca.certfile))
    them = stranger.issue("intruder", client=True)
    with blocking_server(ctx) as server:
        # TLS 1.2: the client waits for our Finished, so it surely reads the alert
        # (in TLS 1.3 its handshake may be over before our alert arrives).
        result = s_client(server.address, "-tls1_2", "-cert", str(them.certfile), "-key",
                          str(them.keyfile))
        failure = failure_of(server)
    assert failure == HandshakeFailure(
        R.UNKNOWN_CA,
        "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate (code 20)",
    )
    assert "alert unknown ca" in result.output


def test_an_expired_client_certificate(leaf: Issued, pki: Pki) -> None:
    ctx = context(leaf, tls_client_auth="optional", tls_cafile=str(pki.ca.certfile))
    old = pki.issue("old client", client=True, not_before=NOW - 9 * DAY, not_after=NOW - DAY)
    with blocking_server(ctx) as server:
        s_client(server.address, "-cert", str(old.certfile), "-key", str(old.keyfile))
        failure = failure_of(server)
    assert failure == HandshakeFailure(
        R.BAD_CERTIFICATE, "CERTIFICATE_VERIFY_FAILED: certificate has expired (code 10)"
    )


@pytest.mark.parametrize("client_auth", ["optional", "required"])
def test_a_good_client_certificate_is_seen_by_the_handler(
    leaf: Issued, pki: Pki, client_auth: str
) -> None:
    ctx = context(leaf, tls_client_auth=client_auth, tls_cafile=str(pki.ca.certfile))
    alice = pki.issue("alice", client=True)
    with blocking_server(ctx) as server:
        s_client(server.address, "-cert", str(alice.certfile), "-key", str(alice.keyfile))
        info = info_of(server)
    assert info.peer_certificate is not None
    assert info.peer_certificate["subject"] == ((("commonName", "alice"),),)
    assert info.peer_certificate_der == alice.der


def test_optional_client_auth_lets_a_client_without_one_in(leaf: Issued, pki: Pki) -> None:
    ctx = context(leaf, tls_client_auth="optional", tls_cafile=str(pki.ca.certfile))
    with blocking_server(ctx) as server:
        with tls_connect(server.address, client_context(pki.ca.certfile)) as client:
            assert client.recv(6) == b"hello\n"
        info = info_of(server)
    assert info.peer_certificate is None and info.peer_certificate_der is None


def test_a_client_that_rejects_our_certificate(leaf: Issued, stranger: Pki) -> None:
    with blocking_server(context(leaf)) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_connect(server.address, client_context(stranger.ca.certfile)).__enter__()
        failure = failure_of(server)
    assert failure == HandshakeFailure(
        R.UNKNOWN_CA, "TLSV1_ALERT_UNKNOWN_CA: tlsv1 alert unknown ca"
    )


# -- asyncio and uvloop -------------------------------------------------------------

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run_async(make_loop: Callable[[], asyncio.AbstractEventLoop],
              main: Coroutine[Any, Any, Any]) -> Any:
    loop = make_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(main, TIMEOUT))
    finally:
        loop.close()


async def accept_one(
    client: Callable[[tuple[str, int]], object],
    serve: Callable[[socket.socket], Coroutine[Any, Any, Any]],
) -> tuple[Any, Any]:
    """Accept one connection from *client* (run in a thread); (served, client's result)."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        address = listener.getsockname()[:2]
        result: list[object] = []
        thread = threading.Thread(target=lambda: result.append(client(address)), daemon=True)
        thread.start()
        try:
            conn, _ = await loop.sock_accept(listener)
            served = await serve(conn)
        finally:
            await asyncio.to_thread(thread.join, TIMEOUT)
        assert not thread.is_alive()
        return served, result[0]


def python_client(pki: Pki, alpn: tuple[str, ...] = ()) -> Callable[[tuple[str, int]], bytes]:
    def run(address: tuple[str, int]) -> bytes:
        with tls_connect(address, client_context(pki.ca.certfile, alpn=alpn)) as tls:
            tls.sendall(b"ping\n")
            return tls.recv(100)

    return run


@pytest.mark.parametrize("make_loop", LOOPS.values(), ids=LOOPS.keys())
def test_async_streams(
    leaf: Issued, pki: Pki, make_loop: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    ctx = context(leaf, tls_alpn=("h2", "http/1.1"))

    async def serve(conn: socket.socket) -> TlsInfo:
        reader, writer = await handshake_async(conn, ctx, TIMEOUT)
        line = await reader.readline()
        writer.write(b"pong " + line)
        await writer.drain()
        info = connection_info(writer)
        assert connection_info(writer.transport) == info
        writer.close()
        with contextlib.suppress(ConnectionResetError):  # the client may close first
            await writer.wait_closed()
        return info

    info, reply = run_async(make_loop, accept_one(python_client(pki, ("http/1.1",)), serve))
    assert reply == b"pong ping\n"
    assert (info.version, info.alpn, info.server_name) == ("TLSv1.3", "http/1.1", "localhost")


@pytest.mark.parametrize("make_loop", LOOPS.values(), ids=LOOPS.keys())
def test_async_protocol(
    leaf: Issued, pki: Pki, make_loop: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    ctx = context(leaf)

    class Echo(asyncio.Protocol):
        def __init__(self) -> None:
            self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def connection_made(self, transport: Any) -> None:  # uvloop's is no asyncio class
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(b"pong " + data)
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self.done.set_result(None)

    async def serve(conn: socket.socket) -> str | None:
        transport, protocol = await handshake_async_transport(Echo, conn, ctx, TIMEOUT)
        assert protocol.transport is transport
        await protocol.done
        return connection_info(transport).version

    version, reply = run_async(make_loop, accept_one(python_client(pki), serve))
    assert (version, reply) == ("TLSv1.3", b"pong ping\n")


@pytest.mark.parametrize("make_loop", LOOPS.values(), ids=LOOPS.keys())
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", R.PLAINTEXT_HTTP),
        (b"SSH-2.0-x\r\n", R.NOT_TLS),
        (b"", R.EOF),
        (None, R.TIMEOUT),  # a client that sends nothing and waits
    ],
    ids=["http", "ssh", "eof", "silent"],
)
def test_async_failures(
    leaf: Issued,
    make_loop: Callable[[], asyncio.AbstractEventLoop],
    data: bytes | None,
    reason: FailureReason,
) -> None:
    ctx = context(leaf)

    def client(address: tuple[str, int]) -> bytes:
        with tcp_connect(address) as sock:
            if data is not None:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(ConnectionResetError):
                return sock.recv(100)  # until the server closes
            return b""

    async def serve(conn: socket.socket) -> HandshakeFailure:
        with pytest.raises(HandshakeError) as info:
            await handshake_async(conn, ctx, 0.3)
        assert conn.fileno() == -1
        return info.value.failure

    failure, _ = run_async(make_loop, accept_one(client, serve))
    assert failure.reason is reason, failure


# -- the classification itself ------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "reason", "socket_error"),
    [
        (TimeoutError("timed out"), R.TIMEOUT, SocketError.SocketTimeoutError),
        (ConnectionAbortedError("SSL handshake is taking longer than 1.0 seconds"), R.TIMEOUT,
         SocketError.SocketTimeoutError),
        (ConnectionResetError(), R.EOF, SocketError.RemoteHostClosedError),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), R.EOF, SocketError.RemoteHostClosedError),
        (OSError(errno.ENOTCONN, "not connected"), R.EOF, SocketError.RemoteHostClosedError),
        (OSError(errno.EMFILE, "too many"), R.OTHER, SocketError.SslHandshakeFailedError),
        (ValueError("closed"), R.OTHER, SocketError.SslHandshakeFailedError),
    ],
)
def test_classification_of_plain_exceptions(
    exc: BaseException, reason: FailureReason, socket_error: SocketError
) -> None:
    failure = classify_handshake_error(exc)
    assert failure.reason is reason
    assert failure.socket_error is socket_error
    assert classify_handshake_error(HandshakeError(failure)) is failure


def test_an_unknown_openssl_reason_is_other_and_the_detail_is_bounded() -> None:
    exc = ssl.SSLError(1, "[SSL: SOMETHING_NEW] " + "x" * 500 + " (_ssl.c:1006)")
    exc.reason = "SOMETHING_NEW"
    failure = classify_handshake_error(exc)
    assert failure.reason is R.OTHER
    assert failure.detail.startswith("SOMETHING_NEW: xxx")
    assert len(failure.detail) == 200
    assert str(HandshakeError(failure)).startswith("TLS handshake failed (other: SOMETHING_NEW")


def test_reason_codes_are_a_small_fixed_set() -> None:
    assert {r.value for r in FailureReason} == {
        "plaintext_http", "not_tls", "protocol_version", "no_shared_cipher", "unknown_ca",
        "bad_certificate", "no_certificate", "too_large", "malformed", "timeout", "eof", "other",
    }


def test_connection_info_refuses_what_is_not_tls() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(TypeError, match=r"not socket$"):
            connection_info(a)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"not _SelectorSocketTransport$"):
            asyncio.run(_plain_transport(b))


async def _plain_transport(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, sock)
    try:
        connection_info(transport)
    finally:
        transport.close()
