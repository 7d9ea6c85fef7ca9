"""Handlers for the lifecycle tests: one stuck for ever, one that grows on request."""

from __future__ import annotations

import os
import socket
import threading

from tests.support import read_line


def block_forever_in_the_handler(conn: socket.socket, peer: object) -> None:
    """Say so, then never return (a stuck handler: no heartbeat)."""
    conn.sendall(b"%d blocked\n" % os.getpid())
    threading.Event().wait()


def hog(conn: socket.socket, peer: object) -> None:
    """Grow by the MiB asked for on the first line, then hold until a second line."""
    mib = int(read_line(conn) or b"0")
    ballast = bytearray(mib << 20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: resident and unique
    conn.sendall(b"%d held\n" % os.getpid())
    data = read_line(conn)
    conn.sendall(b"%d %d %s" % (os.getpid(), len(ballast) >> 20, data))
