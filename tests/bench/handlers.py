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
from typing import Any

from forkserver.examples.hello_http import HelloProtocol
from tests.bench.state import State

MAX_REQUEST = 8192
BODY = b"Hello, world\n"


def _reply(keep_alive: bool) -> bytes:
    connection = b"keep-alive" if keep_alive else b"close"
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Connection: %s\r\nX-Worker: %d\r\n\r\n%s" % (len(BODY), connection, os.getpid(), BODY)
    )


_close_reply = b""  # made by each worker's first connection: it names the worker's pid


def _forget_reply() -> None:
    global _close_reply
    _close_reply = b""


os.register_at_fork(after_in_child=_forget_reply)  # a preloading master forks its workers


def handle(conn: socket.socket, peer: Any) -> None:
    """One request per connection, answered with Connection: close.

    The work of the baselines' inline responder
    (``servers.shared_accept.serve_blocking``), as a handler: read to the
    end of the head, one ``sendall`` of a reply made once per worker.
    """
    global _close_reply
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk or len(data) > MAX_REQUEST:
            return
        data += chunk
    touch_state()
    if not _close_reply:
        _close_reply = _reply(keep_alive=False)
    conn.sendall(_close_reply)


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


class WorkerProtocol(HelloProtocol):
    """``hello_http.HelloProtocol``, answering with ``X-Worker: <pid>`` too.

    It parses exactly as HelloProtocol does (it is one); each answer
    also reads the state, as ``handle`` does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.replies = (_reply(keep_alive=True), _reply(keep_alive=False))

    def reply(self, close: bool) -> bytes:
        touch_state()
        return self.replies[close]


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
