"""A handler that leaks descriptors until the worker has none left, when asked to.

"hog" opens /dev/null until EMFILE, so that no number is left, then
answers one line.  The function form leaks the connection and closes its
own number first (not even the one the worker frees after the handler
returns is left; the client never sees an end of file); the coroutine
holds its connection until the client closes it.  Anything else: the
pid.
"""

from __future__ import annotations

import asyncio
import os
import socket

#: What ``hog`` took, kept open for the worker's whole life: a leak.
_LEAKED: list[int] = []


def _fill() -> bytes:
    """Open /dev/null until EMFILE; the answer to give."""
    while True:
        try:
            _LEAKED.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return b"%d leaked %d\n" % (os.getpid(), len(_LEAKED))


def handle(conn: socket.socket, peer: object) -> None:
    request = b""
    while not request.endswith(b"\n") and (chunk := conn.recv(100)):
        request += chunk
    if request.strip() != b"hog":
        conn.sendall(b"%d\n" % os.getpid())
        return
    kept = os.dup(conn.fileno())
    _LEAKED.append(kept)
    conn.close()  # its number is taken by the leak too
    os.write(kept, _fill())


async def async_handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if (await reader.readline()).strip() != b"hog":
        writer.write(b"%d\n" % os.getpid())
        await writer.drain()
        return
    writer.write(_fill())
    await writer.drain()
    await reader.read()  # held, its number with it, until the client closes


def break_the_loop(conn: socket.socket, peer: object) -> None:
    """Close the worker's own epoll descriptor: its loop fails after this connection."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventpoll]":
                os.close(int(name))
        except OSError:
            continue  # the listdir's own descriptor
    conn.sendall(b"%d\n" % os.getpid())
