"""What a worker and the programs it runs may do: their /proc/self/status.

Only modules the master has loaded already: a worker that runs as
``nobody`` may not be able to read the interpreter's own library.
"""

from __future__ import annotations

import json
import socket
import subprocess


def handle(conn: socket.socket, peer: object) -> None:
    """Reply with this worker's /proc/self/status and that of programs it runs, as JSON.

    The client sends program paths, one per line, then shuts its side;
    each is run as ``PROGRAM /proc/self/status`` (a ``cat``), so the
    reply shows what a process the handler executes ends up with.
    """
    request = b""
    while chunk := conn.recv(4096):
        request += chunk
    with open("/proc/self/status") as f:
        reply = {"worker": f.read(), "programs": []}
    for program in request.decode().split():
        ran = subprocess.run([program, "/proc/self/status"], capture_output=True, text=True,
                             timeout=10, check=False)  # fmt: skip
        reply["programs"].append(ran.stdout or ran.stderr)
    conn.sendall(json.dumps(reply).encode())
