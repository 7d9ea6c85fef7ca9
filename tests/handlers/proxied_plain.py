"""PROXY handlers that import nothing a worker has not loaded (for workers as
``nobody``, who may not be able to read the standard library's files): the
client's address from the header, one line back."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from forkserver import proxy_info

if TYPE_CHECKING:
    import asyncio


def handle(conn: socket.socket, peer: object) -> None:
    data = b""
    while not data.endswith(b"\n") and (chunk := conn.recv(1)):
        data += chunk
    conn.sendall(f"{peer!r}\n".encode())


async def streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    proxied = proxy_info()
    writer.write(f"{proxied.client if proxied else None!r}\n".encode())
    await writer.drain()
