"""A handler that registers an ``atexit`` callback at import: a worker runs it on a graceful exit.

The callback records itself through ``hooked.record`` (a file in $HOOK_DIR).
"""

from __future__ import annotations

import atexit
import os
import socket

from tests.handlers.hooked import record


def handle(conn: socket.socket, peer: object) -> None:
    conn.sendall(b"%d\n" % os.getpid())


atexit.register(record, "atexit")
