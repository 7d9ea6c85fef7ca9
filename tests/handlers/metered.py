"""A handler whose every outcome a metrics test can ask for, by the line it sends.

``pid``: reply with the worker's pid.  ``value``/``key``/``mine``: raise a
ValueError, a KeyError or an exception class of this module's own.
``exit``: the worker exits at once with status 1 (a crash, as far as the
master can tell).  ``hold``: reply, then wait for the client to close.
"""

from __future__ import annotations

import os
import socket


class OwnError(Exception):
    pass


def handle(conn: socket.socket, peer: object) -> None:
    line = conn.recv(100).strip()
    if line == b"value":
        raise ValueError("asked for a ValueError")
    if line == b"key":
        raise KeyError("asked for a KeyError")
    if line == b"mine":
        raise OwnError("asked for an error of the test's own")
    if line == b"exit":
        os._exit(1)
    conn.sendall(b"%d\n" % os.getpid())
    if line == b"hold":
        conn.recv(100)
