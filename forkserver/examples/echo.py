"""Echo every byte back until the client closes (a ``sync`` handler).

    forkserver run --bind 127.0.0.1:7000 forkserver.examples.echo:handle
"""

import socket


def handle(conn: socket.socket, peer: object) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
