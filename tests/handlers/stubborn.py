"""Handlers that do not let go: for the tests of the master's deadlines."""

from __future__ import annotations

import os
import signal
import socket
import threading


def ignore_abrt_and_hang(conn: socket.socket, peer: object) -> None:
    """Say so, then hang with SIGABRT ignored: no stack dump ends this worker."""
    signal.signal(signal.SIGABRT, signal.SIG_IGN)
    conn.sendall(b"%d hanging\n" % os.getpid())
    threading.Event().wait()

