"""Handlers forkserver runs for the benchmark's secondary figures.

The main figures use ``forkserver.examples.hello_http``; these add what
those figures need: ``X-Worker: <pid>`` on every response (fairness),
an echo for the idle-connection test, and 100 MB of read-only state
built at import time (USS with and without ``preload``).
``WorkerProtocol`` is ``hello_http.HelloProtocol`` with that header.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
from typing import Any, cast

# The request parser HelloProtocol uses, so its twin here decides the same way.
from forkserver.examples.hello_http import BAD_REQUEST, MAX_HEAD, _wants_close
from tests.bench.state import State

MAX_REQUEST = 8192
BODY = b"Hello, world\n"


def _reply(keep_alive: bool) -> bytes:
    connection = b"keep-alive" if keep_alive else b"close"
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Connection: %s\r\nX-Worker: %d\r\n\r\n%s" % (len(BODY), connection, os.getpid(), BODY)
    )


def handle(conn: socket.socket, peer: Any) -> None:
    """One request per connection, answered with Connection: close."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk or len(data) > MAX_REQUEST:
            return
        data += chunk
    touch_state()
    conn.sendall(_reply(keep_alive=False))


async def async_handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive HTTP: answer every request until the client closes."""
    keep, close = _reply(keep_alive=True), _reply(keep_alive=False)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            touch_state()
            if b"connection: close" in head.lower():
                writer.write(close)
                await writer.drain()
                return
            writer.write(keep)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return
    finally:
        writer.close()


class WorkerProtocol(asyncio.Protocol):
    """``hello_http.HelloProtocol``, answering with ``X-Worker: <pid>`` too.

    Mirrors it step for step: requests are answered as they are parsed,
    a body is skipped, a bad or oversized head gets 400 and a close, and
    reading pauses while the client does not read its answers.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.skip = 0  # body bytes of the request just answered, still to discard
        self.keep, self.close = _reply(keep_alive=True), _reply(keep_alive=False)

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
                touch_state()
                transport.write(self.close if close else self.keep)
            buffer = buffer[end + 4 :]
            if close:
                transport.close()
                return
        if len(buffer) > MAX_HEAD:
            transport.write(BAD_REQUEST)
            transport.close()
        self.buffer = buffer

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()


async def async_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo whatever arrives until the client closes (idle-connection test)."""
    try:
        while chunk := await reader.read(4096):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        return
    finally:
        writer.close()


STATE = State(int(os.environ.get("BENCH_STATE_MB", "0")),
              os.environ.get("BENCH_STATE_KIND", "objects"))
if STATE.entries and os.environ.get("BENCH_GC_FREEZE") == "1":
    gc.freeze()  # a preloading master freezes before it forks


def touch_state() -> None:
    STATE.touch()
