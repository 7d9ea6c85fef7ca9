"""Workers (not the master's import check) may be held at import, or made
to fail there, so a test decides when a reload's new generation is ready.

* ``$TEST_GATE`` names a Unix socket: while a listener is there, a worker
  importing this module waits on it; the test opens the gate by closing
  the listener (the waiting connections are reset, later ones refused).
* ``$TEST_FAIL_MARKER`` names a file: while it exists, workers fail to
  import this module (the master's check in its own child still passes).
"""

import os
import socket

import setproctitle

if setproctitle.getproctitle().startswith("forkserver: worker"):
    if os.path.exists(os.environ.get("TEST_FAIL_MARKER", "/nonexistent")):
        raise RuntimeError("the marker file says: fail")
    gate = os.environ.get("TEST_GATE", "")
    if gate and os.path.exists(gate):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waiting:
            waiting.settimeout(60)  # a forgotten gate must not hold a worker for ever
            try:
                waiting.connect(gate)
                waiting.recv(1)
            except OSError:
                pass  # reset or refused: the gate is open


def handle(conn: socket.socket, peer: object) -> None:
    conn.sendall(b"%d\n" % os.getpid())
