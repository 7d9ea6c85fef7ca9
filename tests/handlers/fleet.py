"""The fleet's handler: which host served this, and whom it thinks it served.

It reads the request line, works a little (so that connections overlap
and a killed host has some in flight), and answers one JSON line with
``host`` (the daemon's ``name``, from ``FORKSERVER_NAME``) and ``client``
(the address its *peer* says: the client the PROXY header names).
"""

from __future__ import annotations

import json
import os
import socket
import time

HOST = os.environ.get("FORKSERVER_NAME", "")
WORK = 0.002  # seconds per request


def answer(conn: socket.socket, peer: object) -> None:
    data = b""
    while not data.endswith(b"\n") and len(data) < 100 and (chunk := conn.recv(100)):
        data += chunk
    time.sleep(WORK)  # sleep-ok: stands in for the work of a request
    client = peer[0] if isinstance(peer, tuple) else str(peer)
    conn.sendall(json.dumps({"host": HOST, "client": client}).encode() + b"\n")
