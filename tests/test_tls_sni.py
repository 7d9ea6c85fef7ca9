"""SNI: ``tls_certificates`` entries chosen by the server name a client asks for.

The selection rules are tested on ``SniSelector`` directly; then real
clients (``openssl s_client -servername`` and Python's ssl, which checks
the host name against the certificate it gets) show that each name
gets its certificate, and that the settings of the listener (ALPN,
client certificates) hold on every context.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from typing import Any

import pytest

from forkserver.handshake import (
    FailureReason,
    HandshakeError,
    TlsInfo,
    connection_info,
    handshake_async,
    handshake_blocking,
)
from forkserver.tls import SniSelector, TlsCertificate, TlsConfig, build_context
from tests.tls_support import (
    TIMEOUT,
    Issued,
    OneShotServer,
    Pki,
    client_context,
    s_client,
    tls_connect,
)


def test_selection_rules() -> None:
    default, www, wild, deep = (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) for _ in range(4))
    selector = SniSelector(default, {
        "www.example.com": www,
        "*.example.com": wild,
        "*.api.example.com": deep,
    })
    cases = {
        "www.example.com": www,  # exact beats the wildcard
        "WWW.Example.Com": www,  # case does not matter
        "www.example.com.": www,  # nor a trailing dot
        "shop.example.com": wild,
        "v1.api.example.com": deep,
        "a.b.example.com": default,  # a wildcard covers one label only
        "example.com": default,  # and not the domain itself
        "other.test": default,
        "": default,
        None: default,
    }
    for name, expected in cases.items():
        assert selector.context_for(name) is expected, name


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("sni"))


@pytest.fixture(scope="module")
def certs(pki: Pki) -> dict[str, Issued]:
    return {
        "default": pki.server("localhost"),
        "www": pki.server("www.example.com", sans=("www.example.com",)),
        "wild": pki.server("wild.example.com", sans=("*.example.com",)),
    }


def sni_config(certs: dict[str, Issued], **kwargs: Any) -> TlsConfig:
    def entry(name: str, *server_names: str) -> TlsCertificate:
        return TlsCertificate(server_names=server_names, certfile=str(certs[name].certfile),
                              keyfile=str(certs[name].keyfile))

    return TlsConfig(
        tls_certfile=str(certs["default"].certfile),
        tls_keyfile=str(certs["default"].keyfile),
        tls_certificates=(entry("www", "www.example.com"), entry("wild", "*.example.com")),
        **kwargs,
    )


def serve_blocking(ctx: ssl.SSLContext) -> OneShotServer:
    def serve(conn: socket.socket) -> TlsInfo | HandshakeError:
        try:
            tls = handshake_blocking(conn, ctx, time.monotonic() + TIMEOUT)
        except HandshakeError as exc:
            return exc
        with tls:
            info = connection_info(tls)  # now: after an error OpenSSL no longer says
            tls.settimeout(TIMEOUT)
            with contextlib.suppress(OSError):
                while tls.recv(4096):
                    pass
            return info

    return OneShotServer(serve)


@pytest.mark.parametrize(
    ("server_name", "served"),
    [
        ("www.example.com", "www.example.com"),
        ("WWW.EXAMPLE.COM", "www.example.com"),
        ("shop.example.com", "wild.example.com"),
        ("a.b.example.com", "localhost"),
        ("other.test", "localhost"),
        (None, "localhost"),
    ],
)
def test_s_client_gets_the_certificate_for_its_name(
    certs: dict[str, Issued], pki: Pki, server_name: str | None, served: str
) -> None:
    ctx = build_context(sni_config(certs))
    args = ["-servername", server_name] if server_name else ["-noservername"]
    with serve_blocking(ctx) as server:
        result = s_client(server.address, *args, "-CAfile", str(pki.ca.certfile))
        info = server.outcome()
    assert f"subject=CN = {served}\n" in result.output
    assert isinstance(info, TlsInfo)
    assert info.server_name == server_name


@pytest.mark.parametrize("name", ["www.example.com", "shop.example.com", "localhost"])
def test_a_verifying_python_client_accepts_what_it_gets(
    certs: dict[str, Issued], pki: Pki, name: str
) -> None:
    ctx = build_context(sni_config(certs))
    with serve_blocking(ctx) as server:
        with tls_connect(server.address, client_context(pki.ca.certfile), name) as client:
            cert = client.getpeercert()
        info = server.outcome()
    assert isinstance(info, TlsInfo) and info.server_name == name
    assert cert["subject"][0][0][1] in {"www.example.com", "wild.example.com", "localhost"}


def test_alpn_holds_on_a_chosen_context(certs: dict[str, Issued]) -> None:
    ctx = build_context(sni_config(certs, tls_alpn=("h2", "http/1.1")))
    with serve_blocking(ctx) as server:
        result = s_client(server.address, "-servername", "www.example.com", "-alpn", "h2")
        info = server.outcome()
    assert "subject=CN = www.example.com\n" in result.output
    assert isinstance(info, TlsInfo) and info.alpn == "h2"


def test_client_certificates_are_checked_on_a_chosen_context(
    certs: dict[str, Issued], pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ctx = build_context(sni_config(certs, tls_client_auth="required",
                                   tls_cafile=str(pki.ca.certfile)))
    stranger = Pki(tmp_path_factory.mktemp("sni-stranger"), "Stranger CA")
    intruder = stranger.issue("intruder", client=True)
    with serve_blocking(ctx) as server:
        s_client(server.address, "-servername", "www.example.com", "-cert",
                 str(intruder.certfile), "-key", str(intruder.keyfile))
        refused = server.outcome()
    assert isinstance(refused, HandshakeError)
    assert refused.failure.reason is FailureReason.UNKNOWN_CA
    alice = pki.issue("alice", client=True)
    with serve_blocking(ctx) as server:
        s_client(server.address, "-servername", "shop.example.com", "-cert",
                 str(alice.certfile), "-key", str(alice.keyfile))
        info = server.outcome()
    assert isinstance(info, TlsInfo)
    assert info.peer_certificate is not None
    assert info.peer_certificate["subject"] == ((("commonName", "alice"),),)


def test_the_server_name_reaches_an_asyncio_handler(certs: dict[str, Issued], pki: Pki) -> None:
    ctx = build_context(sni_config(certs))

    async def main() -> tuple[TlsInfo, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.setblocking(False)
            address = listener.getsockname()[:2]

            def client() -> dict[str, Any]:
                with tls_connect(address, client_context(pki.ca.certfile),
                                 "shop.example.com") as tls:
                    tls.recv(1)
                    return tls.getpeercert()

            peer = asyncio.ensure_future(asyncio.to_thread(client))
            conn, _ = await loop.sock_accept(listener)
            _reader, writer = await handshake_async(conn, ctx, TIMEOUT)
            info = connection_info(writer)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return info, await peer

    info, cert = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert info.server_name == "shop.example.com"
    assert cert["subject"] == ((("commonName", "wild.example.com"),),)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_server_name_that_is_not_ascii_is_refused(certs: dict[str, Issued]) -> None:
    """RFC 6066 host names are ASCII.  CPython cannot decode another one
    for the callback: it reports that as unraisable (stderr) and fails the
    handshake, which must end cleanly, as any other failure."""
    ctx = build_context(sni_config(certs))
    with serve_blocking(ctx) as server:
        s_client(server.address, "-servername", "b\u00fccher.example")
        refused = server.outcome()
    assert isinstance(refused, HandshakeError)
    assert refused.failure.detail == "CALLBACK_FAILED: callback failed"
    # An A-label is the way to say it, and works.
    with serve_blocking(ctx) as server:
        s_client(server.address, "-servername", "xn--bcher-kva.example")
        info = server.outcome()
    assert isinstance(info, TlsInfo) and info.server_name == "xn--bcher-kva.example"
