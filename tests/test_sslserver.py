"""``SslServer``: handshakes in the server, with and without an event loop.

Every behaviour is checked both ways: driven by an ``EventLoop``
("loop") and by ``wait_for_new_connection()`` alone ("wait").  Clients
run in threads (Python's ssl) or as ``openssl s_client``; the server is
driven from the test's thread.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from forkserver import (
    AlertLevel,
    AlertType,
    HostAddress,
    SocketError,
    SslError,
    SslServer,
    WaitResult,
)
from forkserver.handshake import FailureReason, HandshakeFailure, connection_info
from forkserver.tls import TlsConfig, build_context
from tests.sslserver_support import (
    SIGNALS,
    Client,
    Driver,
    listening,
    read_until_closed,
    server_context,
    tls_client,
)
from tests.tls_support import TIMEOUT, Issued, Pki, client_context, client_hello, tcp_connect


@pytest.fixture(params=["loop", "wait"])
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    d = Driver(request.param)
    yield d
    d.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("sslserver"))


@pytest.fixture(scope="module")
def leaf(pki: Pki) -> Issued:
    return pki.server()


# -- the API -------------------------------------------------------------------------


def test_defaults_and_setters(leaf: Issued) -> None:
    server = SslServer()
    assert server.handshake_timeout() == 5000  # Qt's default
    default = server.ssl_configuration()
    assert default.protocol is ssl.PROTOCOL_TLS_SERVER
    assert server.ssl_configuration() is default
    ctx = server_context(leaf)
    server.set_ssl_configuration(ctx)
    assert server.ssl_configuration() is ctx
    server.set_handshake_timeout(250)
    assert server.handshake_timeout() == 250
    with pytest.raises(TypeError, match=r"takes an ssl\.SSLContext, not str"):
        server.set_ssl_configuration("cert.pem")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a PROTOCOL_TLS_CLIENT context cannot serve"):
        server.set_ssl_configuration(ssl.create_default_context())
    with pytest.raises(ValueError, match=r">= 0, got -1"):
        server.set_handshake_timeout(-1)
    with pytest.raises(TypeError, match="takes an int, not float"):
        server.set_handshake_timeout(1.5)  # type: ignore[arg-type]
    assert repr(server) == "<SslServer not listening>"


def test_a_pending_connection_is_a_blocking_ssl_socket(
    driver: Driver, leaf: Issued, pki: Pki
) -> None:
    with listening(driver, server_context(leaf)) as (server, spy, address):
        client = tls_client(address, client_context(pki.ca.certfile))
        driver.until(server, server.has_pending_connections)
        conn = server.next_pending_connection()
        assert isinstance(conn, ssl.SSLSocket)
        with conn:
            assert conn.gettimeout() is None
            assert conn.version() == "TLSv1.3"
            conn.settimeout(TIMEOUT)
            assert conn.recv(4) == b"ping"  # sent right after the handshake: not lost
            conn.sendall(b"pong")
        assert client.result() == b"pong"
    assert spy.counts() == {**dict.fromkeys(SIGNALS, 0), "new_connection": 1,
                            "pending_connection_available": 1, "started_encryption_handshake": 1}
    # Accepted first, pending once encrypted, as in Qt 6.4.
    assert [n for n, _ in spy.events] == [
        "new_connection", "started_encryption_handshake", "pending_connection_available",
    ]


def test_a_build_context_context_serves_sni_and_alpn(
    driver: Driver, leaf: Issued, pki: Pki
) -> None:
    ctx = build_context(TlsConfig(tls_certfile=str(leaf.certfile), tls_keyfile=str(leaf.keyfile),
                                  tls_alpn=("h2",)))
    with listening(driver, ctx) as (server, _spy, address):
        client = tls_client(address, client_context(pki.ca.certfile, alpn=("h2",)), send=b"")
        driver.until(server, server.has_pending_connections)
        with server.next_pending_connection() as conn:  # type: ignore[union-attr]
            assert isinstance(conn, ssl.SSLSocket)
            info = connection_info(conn)
        assert client.result() == b""
    assert (info.alpn, info.server_name) == ("h2", "localhost")


def test_a_quiet_client_does_not_hold_up_the_others(
    driver: Driver, leaf: Issued, pki: Pki
) -> None:
    with listening(driver, server_context(leaf)) as (server, spy, address):
        with tcp_connect(address) as quiet:
            driver.until(server, lambda: spy.count("new_connection") == 1)
            client = tls_client(address, client_context(pki.ca.certfile))
            driver.until(server, server.has_pending_connections)
            server.next_pending_connection().close()  # type: ignore[union-attr]
            client.result()
            assert spy.count("error_occurred") == 0  # the quiet one is still waiting
            quiet.setblocking(False)
            with pytest.raises(BlockingIOError):
                quiet.recv(1)


def test_connections_in_their_handshake_count_as_pending(
    driver: Driver, leaf: Issued, pki: Pki
) -> None:
    with listening(driver, server_context(leaf), timeout_ms=300) as (server, spy, address):
        server.set_max_pending_connections(1)
        with tcp_connect(address) as quiet:
            driver.until(server, lambda: spy.count("new_connection") == 1)
            if driver.loop is not None:
                assert not server.is_accepting()
            client = tls_client(address, client_context(pki.ca.certfile), send=b"")
            # The second waits in the kernel until the quiet one times out.
            driver.until(server, server.has_pending_connections)
            assert [n for n, _ in spy.events][:3] == [
                "new_connection", "error_occurred", "handshake_failed",
            ]
            assert read_until_closed(quiet) == b""
        server.next_pending_connection().close()  # type: ignore[union-attr]
        client.result()


def test_close_ends_the_handshakes_in_progress_without_signals(
    driver: Driver, leaf: Issued
) -> None:
    with listening(driver, server_context(leaf)) as (server, spy, address):
        with tcp_connect(address) as quiet, tcp_connect(address) as started:
            started.sendall(client_hello()[:50])
            driver.until(server, lambda: spy.count("started_encryption_handshake") == 1)
            driver.until(server, lambda: spy.count("new_connection") == 2)
            server.close()
            assert read_until_closed(quiet) == b""
            assert read_until_closed(started) == b""
    assert spy.count("error_occurred") == spy.count("handshake_failed") == 0


def test_the_client_leaving_before_a_byte(driver: Driver, leaf: Issued) -> None:
    with listening(driver, server_context(leaf)) as (server, spy, _address):
        tcp_connect(("127.0.0.1", server.server_port())).close()
        driver.until(server, lambda: spy.count("handshake_failed") == 1)
    [(_, error)] = spy.args("error_occurred")
    assert error is SocketError.RemoteHostClosedError
    [(_, failure)] = spy.args("handshake_failed")
    assert failure == HandshakeFailure(
        FailureReason.EOF, "the client closed the connection before sending anything"
    )
    assert spy.open_in_slot == [True]  # still open while the slots run


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", FailureReason.PLAINTEXT_HTTP),
        (b"PRI * HTTP/2.0\r\n", FailureReason.PLAINTEXT_HTTP),
        (b"\x00\x00\x00", FailureReason.NOT_TLS),
    ],
)
def test_plain_text_is_refused_with_its_reason(
    driver: Driver, leaf: Issued, data: bytes, reason: FailureReason
) -> None:
    with listening(driver, server_context(leaf)) as (server, spy, address):
        with tcp_connect(address) as client:
            client.sendall(data)
            driver.until(server, lambda: spy.count("handshake_failed") == 1)
            assert read_until_closed(client) == b""
    [(_, failure)] = spy.args("handshake_failed")
    assert failure.reason is reason
    assert spy.args("error_occurred")[0][1] is SocketError.SslHandshakeFailedError
    assert spy.count("started_encryption_handshake") == 0


def test_a_failed_handshake_after_the_first_byte(driver: Driver, leaf: Issued) -> None:
    with listening(driver, server_context(leaf)) as (server, spy, address):
        with tcp_connect(address) as client:
            client.sendall(b"\x16\x03\x01\x00\x05hello")  # a record, but no ClientHello
            driver.until(server, lambda: spy.count("handshake_failed") == 1)
    assert spy.count("started_encryption_handshake") == 1
    [(sock, failure)] = spy.args("handshake_failed")
    assert isinstance(sock, ssl.SSLSocket) and sock.fileno() == -1
    assert failure.reason in (FailureReason.MALFORMED, FailureReason.OTHER), failure


def test_the_timer_restarts_on_the_first_byte_as_in_qt(driver: Driver, leaf: Issued) -> None:
    timeout = 0.4
    hello = client_hello()
    with listening(driver, server_context(leaf), timeout_ms=int(timeout * 1000)) as (
        server, spy, address
    ):
        with tcp_connect(address) as client:
            connected = time.monotonic()
            driver.until(server, lambda: spy.count("new_connection") == 1)
            driver.serve_for(server, connected + 0.6 * timeout - time.monotonic())
            assert spy.count("handshake_failed") == 0
            client.sendall(hello[:40])  # the first byte: a new period starts
            driver.until(server, lambda: spy.count("handshake_failed") == 1)
            ended = time.monotonic()
    [(_, failure)] = spy.args("handshake_failed")
    assert failure.reason is FailureReason.TIMEOUT
    assert failure.detail == "the client did not finish its handshake within 400 ms"
    assert ended - connected >= 1.6 * timeout - 0.02


def test_a_dripping_client_is_cut_off(driver: Driver, leaf: Issued) -> None:
    hello = client_hello()
    sent = []

    def drip() -> None:
        with tcp_connect(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError):
                for byte in hello:
                    sock.send(bytes([byte]))
                    sent.append(byte)
                    time.sleep(0.02)  # sleep-ok: the drip is the test (len(hello) steps)

    with listening(driver, server_context(leaf), timeout_ms=300) as (server, spy, _address):
        port = server.server_port()
        client = Client(drip)
        driver.until(server, lambda: spy.count("handshake_failed") == 1)
        client.result()
    assert spy.args("handshake_failed")[0][1].reason is FailureReason.TIMEOUT
    assert len(sent) < len(hello)


def test_alerts_are_reported_and_the_hook_removed_after(
    driver: Driver, leaf: Issued, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ctx = server_context(leaf)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(pki.ca.certfile)
    stranger = Pki(tmp_path_factory.mktemp("alerts"), "Stranger CA")
    intruder = stranger.issue("intruder", client=True)
    with listening(driver, ctx) as (server, spy, address):
        client = tls_client(address, client_context(pki.ca.certfile, cert=intruder), send=b"")
        driver.until(server, lambda: spy.count("handshake_failed") == 1)
        with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):
            client.result()
    [(_, level, kind, words)] = spy.args("alert_sent")
    assert (level, kind, words) == (AlertLevel.Fatal, AlertType.UnknownCa, "unknown ca")
    [(_, error)] = spy.args("peer_verify_error")
    assert error.error is SslError.UnableToGetLocalIssuerCertificate
    assert error.verify_code == 20
    assert spy.args("ssl_errors") == [(spy.args("ssl_errors")[0][0], [error])]
    assert [n for n, _ in spy.events][-5:] == [
        "alert_sent", "peer_verify_error", "ssl_errors", "error_occurred", "handshake_failed",
    ]
    assert ctx._msg_callback is None  # type: ignore[attr-defined]


def test_a_message_callback_of_its_own_is_left_alone(driver: Driver, leaf: Issued) -> None:
    ctx = server_context(leaf)
    seen: list[int] = []

    def own(  # noqa: PLR0917 (the signature CPython calls it with)
        conn: object, direction: str, version: object, content_type: int, msg_type: object,
        data: bytes,
    ) -> None:
        seen.append(content_type)

    ctx._msg_callback = own  # type: ignore[attr-defined]
    with listening(driver, ctx) as (server, spy, address):
        client = tls_client(address, client_context(), send=b"")
        driver.until(server, server.has_pending_connections)
        server.next_pending_connection().close()  # type: ignore[union-attr]
        with contextlib.suppress(OSError):
            client.result()
    assert ctx._msg_callback is own  # type: ignore[attr-defined]
    assert seen  # it was called, ours was not installed
    assert spy.count("alert_sent") == spy.count("alert_received") == 0


def test_a_slot_may_close_the_server_mid_handshake(driver: Driver, leaf: Issued) -> None:
    with listening(driver, server_context(leaf)) as (server, spy, address):
        server.started_encryption_handshake.connect(lambda sock: server.close())
        with tcp_connect(address) as client:
            client.sendall(client_hello())
            if driver.loop is not None:
                driver.until(server, lambda: not server.is_listening())
            else:
                assert server.wait_for_new_connection(int(TIMEOUT * 1000)) == (
                    WaitResult(False, False)
                )
            assert read_until_closed(client) == b""
    assert spy.count("error_occurred") == 0


def test_wait_for_new_connection_without_a_handshake(leaf: Issued) -> None:
    server = SslServer()
    assert server.wait_for_new_connection(10) == WaitResult(False, False)  # not listening
    server.set_ssl_configuration(server_context(leaf))
    with server:
        assert server.listen(HostAddress.LocalHost, 0)
        port = server.server_port()
        assert server.wait_for_new_connection(30) == WaitResult(False, True)
        assert server.server_error() is SocketError.SocketTimeoutError
        assert server.error_string() == (
            f"no connection completed its TLS handshake on 127.0.0.1:{port} within 30 ms"
        )
        assert repr(server) == f"<SslServer 127.0.0.1:{port}>"


def test_wait_for_new_connection_while_paused_does_not_accept(
    leaf: Issued, pki: Pki
) -> None:
    with listening(Driver("wait"), server_context(leaf)) as (server, spy, address):
        server.pause_accepting()
        client = tls_client(address, client_context(pki.ca.certfile), send=b"")
        assert server.wait_for_new_connection(100) == WaitResult(False, True)
        assert spy.count("new_connection") == 0
        server.resume_accepting()
        assert server.wait_for_new_connection(int(TIMEOUT * 1000)) == WaitResult(True, False)
        server.next_pending_connection().close()  # type: ignore[union-attr]
        client.result()


def test_importing_the_package_does_not_import_ssl() -> None:
    """The master and the CLI import forkserver; only SslServer's users need ssl."""
    probe = (
        "import sys, forkserver\n"
        "before = sorted(m for m in ('ssl', 'asyncio') if m in sys.modules)\n"
        "forkserver.SslServer\n"
        "print(before, 'ssl' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=TIMEOUT, check=True).stdout
    assert out == "[] True\n"
