"""Handlers that tell the client who they think it is, behind a PROXY balancer.

Each reads one line and answers one JSON object: the ``peer`` the worker
gave the handler, what ``forkserver.proxy_info()`` says (the client, the
address it connected to, the balancer, the header's version, command
and AUTHORITY TLV), the line, and the worker's pid.  ``fail`` raises
after reading, for the error report.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import socketserver

import forkserver
from tests.handlers.protocols import FirstLine


def _answer(peer: object, line: bytes) -> bytes:
    info = forkserver.proxy_info()
    seen: dict[str, object] = {"peer": peer, "line": line.decode(), "pid": os.getpid(),
                               "proxied": info is not None}  # fmt: skip
    if info is not None:
        seen.update(client=info.client, server=info.server, proxy=info.proxy,
                    version=info.header.version, command=info.header.command.name,
                    from_header=info.header.from_header, authority=info.header.tlvs.authority,
                    listener=info.listener)  # fmt: skip
    return json.dumps(seen).encode() + b"\n"


def _line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n") and (chunk := conn.recv(1)):
        data += chunk
    return data.rstrip(b"\n")


def whoami(conn: socket.socket, peer: object) -> None:
    line = _line(conn)
    if line == b"fail":
        raise ValueError("failure requested by the client")
    conn.sendall(_answer(peer, line))


async def whoami_streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = (await reader.readline()).rstrip(b"\n")
    if line == b"fail":
        raise ValueError("failure requested by the client")
    writer.write(_answer(writer.get_extra_info("peername"), line))
    await writer.drain()


class WhoamiProtocol(FirstLine):
    """The same from protocol callbacks: ``proxy_info()`` in ``data_received``."""

    def reply(self, line: bytes) -> bytes:
        assert self.transport is not None
        return _answer(self.transport.get_extra_info("peername"), line)


class WhoamiRequestHandler(socketserver.StreamRequestHandler):
    """``client_address`` is the client the header names."""

    def handle(self) -> None:
        line = self.rfile.readline().rstrip(b"\n")
        self.wfile.write(_answer(self.client_address, line))
