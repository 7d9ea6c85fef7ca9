"""Tells which process imported this module: the master (--preload) or the worker."""

import os
import socket

IMPORTED_IN = os.getpid()


def handle(conn: socket.socket, peer: object) -> None:
    conn.sendall(b"%d %d" % (IMPORTED_IN, os.getpid()))
