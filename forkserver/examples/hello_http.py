"""A minimal HTTP/1.1 responder for benchmarks: 200 and a short body.

Keeps the connection open between requests (HTTP/1.1 keep-alive) unless
the client sends ``Connection: close`` or speaks HTTP/1.0 without
``Connection: keep-alive``.  A request body (``Content-Length``, at most
``MAX_BODY`` bytes) is read and ignored; a malformed or oversized
request gets ``400 Bad Request`` and the connection is closed.

A sync worker serves one connection at a time, so the sync ``handle``
bounds what one client can hold, as nginx's ``keepalive_requests`` and
``keepalive_timeout`` do: at most ``MAX_KEEPALIVE_REQUESTS`` requests
per connection, and ``KEEPALIVE_TIMEOUT`` seconds of silence, then it
closes.  Without that, a few keep-alive clients would hold every sync
worker and the rest would wait forever.

    forkserver run --bind 127.0.0.1:8000 forkserver.examples.hello_http:handle
    forkserver run --bind 127.0.0.1:8000 forkserver.examples.hello_http:async_handle
    forkserver run --bind 127.0.0.1:8000 forkserver.examples.hello_http:HelloProtocol

``HelloProtocol`` answers as ``async_handle`` does, as an
``asyncio.Protocol``: callbacks instead of a coroutine and stream
buffers per connection, the cheapest form an asyncio worker runs.
"""

from __future__ import annotations

import asyncio
import socket
from typing import cast

BODY = b"Hello, world!\n"
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(BODY)
KEEP_ALIVE = _HEAD + b"\r\n" + BODY
CLOSE = _HEAD + b"Connection: close\r\n\r\n" + BODY
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEAD = 16384
MAX_BODY = 1 << 20
MAX_KEEPALIVE_REQUESTS = 25
KEEPALIVE_TIMEOUT = 5.0


def _wants_close(head: bytes) -> tuple[bool, int]:
    """(close after answering?, body length to skip) for one request head."""
    lines = head.split(b"\r\n")
    close = lines[0].endswith(b"HTTP/1.0")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"connection":
            token = value.strip().lower()
            close = token == b"close" or (close and token != b"keep-alive")
        elif name == b"content-length":
            length = int(value.strip())
            if not 0 <= length <= MAX_BODY:
                raise ValueError(f"Content-Length {length} is out of range")
    return close, length


def handle(conn: socket.socket, peer: object) -> None:
    conn.settimeout(KEEPALIVE_TIMEOUT)
    try:
        _serve(conn)
    except TimeoutError:
        return  # a silent client lets the worker go


def _serve(conn: socket.socket) -> None:
    buffer = b""
    answered = 0
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                conn.sendall(BAD_REQUEST)
                return
            data = conn.recv(65536)
            if not data:
                return
            buffer += data
            continue
        try:
            close, length = _wants_close(buffer[:end])
        except ValueError:
            conn.sendall(BAD_REQUEST)
            return
        while len(buffer) < end + 4 + length:
            data = conn.recv(65536)
            if not data:
                return
            buffer += data
        buffer = buffer[end + 4 + length :]
        answered += 1
        close = close or answered >= MAX_KEEPALIVE_REQUESTS
        conn.sendall(CLOSE if close else KEEP_ALIVE)
        if close:
            return


async def async_handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return
        except asyncio.LimitOverrunError:
            writer.write(BAD_REQUEST)
            return
        try:
            close, length = _wants_close(head[:-4])
        except ValueError:
            writer.write(BAD_REQUEST)
            return
        if length:
            try:
                await reader.readexactly(length)
            except asyncio.IncompleteReadError:
                return
        writer.write(CLOSE if close else KEEP_ALIVE)
        await writer.drain()
        if close:
            return


class HelloProtocol(asyncio.Protocol):
    """``async_handle`` as callbacks.

    Requests are answered as they are parsed, several per read if the
    client pipelines them.  While the client does not read its answers
    (``pause_writing``), no more requests are read from it.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.skip = 0  # body bytes of the request just answered, still to discard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are Transports in all but name (not subclasses).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        buffer = self.buffer + data if self.buffer else data
        while True:
            if self.skip:
                taken = min(self.skip, len(buffer))
                self.skip -= taken
                buffer = buffer[taken:]
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            try:
                close, self.skip = _wants_close(buffer[:end])
            except ValueError:
                close = True
                transport.write(BAD_REQUEST)
            else:
                transport.write(self.reply(close))
            buffer = buffer[end + 4 :]
            if close:
                transport.close()
                return
        if len(buffer) > MAX_HEAD:
            transport.write(BAD_REQUEST)
            transport.close()
        self.buffer = buffer

    def reply(self, close: bool) -> bytes:
        """The answer to one well-formed request; a subclass may say more."""
        return CLOSE if close else KEEP_ALIVE

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()
