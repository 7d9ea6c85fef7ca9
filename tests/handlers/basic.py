"""Small handlers whose replies let a test see which worker served it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import socketserver

from forkserver.channel import MessageType


def pid(conn: socket.socket, peer: object) -> None:
    """Reply with the worker's pid at once."""
    conn.sendall(b"%d\n" % os.getpid())


def gate(conn: socket.socket, peer: object) -> None:
    """Hold the connection until the client sends a line, then reply with the pid."""
    data = conn.recv(100)
    conn.sendall(b"%d %s" % (os.getpid(), data))


def boom(conn: socket.socket, peer: object) -> None:
    """Raise when asked to; otherwise reply with the pid."""
    if conn.recv(100) == b"boom":
        raise ValueError("boom requested by the client")
    conn.sendall(b"%d\n" % os.getpid())


def _send_on_channel(data: bytes) -> None:
    """Send *data* on this worker's supervisor channel, behind its back."""
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with sock:
            if sock.type == socket.SOCK_SEQPACKET:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                sock.send(data)


def corrupt_channel(conn: socket.socket, peer: object) -> None:
    """An unknown message type."""
    _send_on_channel(bytes([1, 0x7F]) + b"garbage")
    conn.sendall(b"sent\n")


def oversized_done(conn: socket.socket, peer: object) -> None:
    """Claim far more connections done than the worker holds."""
    _send_on_channel(bytes([1, MessageType.DONE]) + (1000).to_bytes(4, "little"))
    conn.sendall(b"sent\n")


def oversized_message(conn: socket.socket, peer: object) -> None:
    """A message longer than the protocol allows."""
    _send_on_channel(bytes([1, MessageType.HEARTBEAT]) + b"x" * 70000)
    conn.sendall(b"sent\n")


def fds(conn: socket.socket, peer: object) -> None:
    """Reply with this worker's descriptors: {fd: readlink target}, as JSON."""
    table = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            table[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listdir's own descriptor
    conn.sendall(json.dumps({"pid": os.getpid(), "fds": table, "me": conn.fileno()}).encode())


async def async_boom(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """``boom`` on an asyncio worker: raise when asked to, else reply with the pid."""
    if await reader.read(100) == b"boom":
        raise ValueError("boom requested by the client")
    writer.write(b"%d\n" % os.getpid())
    await writer.drain()
    writer.close()


async def async_pid(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = await reader.readline()
    writer.write(b"%d %s" % (os.getpid(), line))
    await writer.drain()


class PidRequestHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"%d\n" % os.getpid())


def hold(conn: socket.socket, peer: object) -> None:
    """Say "<pid> held" at once, then wait for a line and echo it with the pid."""
    conn.sendall(b"%d held\n" % os.getpid())
    data = conn.recv(100)
    conn.sendall(b"%d %s" % (os.getpid(), data))



def environment(conn: socket.socket, peer: object) -> None:
    """Reply with the worker's environment, as JSON."""
    conn.sendall(json.dumps(dict(os.environ)).encode())


async def async_hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The asyncio twin of ``hold``."""
    writer.write(b"%d held\n" % os.getpid())
    await writer.drain()
    data = await reader.read(100)
    writer.write(b"%d %s" % (os.getpid(), data))
    await writer.drain()
