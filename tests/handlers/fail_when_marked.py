"""Workers fail to boot once the file named by $TEST_FAIL_MARKER exists."""

import os
import socket

if os.path.exists(os.environ.get("TEST_FAIL_MARKER", "/nonexistent")):
    raise RuntimeError("the marker file says: fail")


def handle(conn: socket.socket, peer: object) -> None:
    conn.sendall(b"%d\n" % os.getpid())
