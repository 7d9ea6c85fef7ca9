"""A TLS handler that imports nothing a worker has not loaded (for workers as ``nobody``,
who may not be able to read the standard library's files): one line back, with the
negotiated version."""

from __future__ import annotations

import socket


def handle(conn: socket.socket, peer: object) -> None:
    data = b""
    while not data.endswith(b"\n") and (chunk := conn.recv(1)):
        data += chunk
    version = getattr(conn, "version", lambda: None)()
    conn.sendall(f"{version} {data.decode().strip()}\n".encode())
