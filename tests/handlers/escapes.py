"""Handlers of every form that raise the ``BaseException`` the client names.

The client sends a name from ``RAISE`` and a newline: the handler raises
that exception (``ok`` answers the worker's pid instead).  None of these
may end the worker: each is a handler error like any other.
"""

from __future__ import annotations

import asyncio
import os
import socket
import socketserver
from typing import cast


class Custom(BaseException):
    """A user's own BaseException subclass."""


RAISE: dict[bytes, type[BaseException]] = {
    b"KeyboardInterrupt": KeyboardInterrupt,
    b"SystemExit": SystemExit,
    b"GeneratorExit": GeneratorExit,
    b"CancelledError": asyncio.CancelledError,
    b"Custom": Custom,
}


def _line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n") and (chunk := conn.recv(100)):
        data += chunk
    return data.strip()


def _act(name: bytes) -> bytes:
    if name in RAISE:
        raise RAISE[name](f"{name.decode()} raised by the handler")
    return b"%d\n" % os.getpid()


def handle(conn: socket.socket, peer: object) -> None:
    conn.sendall(_act(_line(conn)))


class RequestHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(_act(_line(self.request)))


async def async_handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(_act((await reader.readline()).strip()))
    await writer.drain()


class Lines(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" in self.buffer:
            self.transport.write(_act(self.buffer.split(b"\n")[0]))
            self.transport.close()


class RaisingStart(asyncio.Protocol):
    """``connection_made`` raises: asyncio calls it from its loop, not from a task."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raise KeyboardInterrupt("KeyboardInterrupt raised by connection_made")
