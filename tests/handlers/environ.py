"""Answers with the environment a program started by the handler inherits."""

import socket
import subprocess


def handle(conn: socket.socket, peer: object) -> None:
    shown = subprocess.run(["env"], capture_output=True, check=True, timeout=10)
    conn.sendall(shown.stdout)
