"""Handlers that tell a TLS client what the worker negotiated with it.

Each reads one line and answers one JSON object: the TLS version, cipher,
ALPN protocol, SNI name and client certificate's common name as the
handler form can learn them (``forkserver.tls_info()``; a protocol asks
its transport), whether the handler got an encrypted connection, the
PROXY client if any, the line and the worker's pid.  Every call is also
logged as ``test_handler_called``, so a test can prove that a refused
connection never reached the handler.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import socketserver
import ssl

import forkserver
from forkserver.handshake import TlsInfo, connection_info
from tests.handlers.protocols import FirstLine

log = logging.getLogger("tests.handlers.tls_info")


def _common_name(info: TlsInfo) -> str | None:
    cert = info.peer_certificate
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _answer(info: TlsInfo | None, encrypted: bool, line: bytes, form: str) -> bytes:
    log.info("handler called", extra={"event": "test_handler_called", "form": form})
    proxied = forkserver.proxy_info()
    seen: dict[str, object] = {
        "form": form, "line": line.decode(), "pid": os.getpid(), "encrypted": encrypted,
        "tls": info is not None,
        "client": list(proxied.client) if proxied is not None else None,  # type: ignore[arg-type]
    }  # fmt: skip
    if info is not None:
        seen.update(version=info.version, cipher=info.cipher, alpn=info.alpn,
                    server_name=info.server_name, client_cn=_common_name(info))  # fmt: skip
    return json.dumps(seen).encode() + b"\n"


def _line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n") and (chunk := conn.recv(1)):
        data += chunk
    return data.rstrip(b"\n")


def sync(conn: socket.socket, peer: object) -> None:
    line = _line(conn)
    conn.sendall(_answer(forkserver.tls_info(), isinstance(conn, ssl.SSLSocket), line, "sync"))


async def streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = (await reader.readline()).rstrip(b"\n")
    encrypted = writer.get_extra_info("ssl_object") is not None
    writer.write(_answer(forkserver.tls_info(), encrypted, line, "streams"))
    await writer.drain()


class Protocol(FirstLine):
    """The same from protocol callbacks: the transport says what was negotiated."""

    def reply(self, line: bytes) -> bytes:
        assert self.transport is not None
        return _answer(connection_info(self.transport), True, line, "protocol")


class RequestHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline().rstrip(b"\n")
        encrypted = isinstance(self.request, ssl.SSLSocket)
        self.wfile.write(_answer(forkserver.tls_info(), encrypted, line, "socketserver"))
