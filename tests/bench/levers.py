"""The price of each step on the per-connection path, measured in isolation.

The profile says which system calls the master and a worker make per
connection; this prices them, and the alternatives the requirement lists
as levers, on this machine with real sockets::

    python -m tests.bench.levers

Each figure is the median of several timed batches, in µs per call
(per descriptor where descriptors are passed).
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from forkserver import fdpass

BATCHES = 7


def per_call(body: Callable[[], None], calls: int) -> float:
    """Median µs per call of *body*, which performs *calls* calls."""
    samples = []
    for _ in range(BATCHES):
        started = time.perf_counter()
        body()
        samples.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(samples)


@contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair; its descriptors stand in for accepted ones."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
    try:
        yield client, conn
    finally:
        client.close()
        conn.close()


def adopt_costs(n: int = 5000) -> dict[str, float]:
    """socket.socket(fileno=fd) probes the descriptor; naming family and type does not."""
    with tcp_pair() as (_, conn):
        fds = [os.dup(conn.fileno()) for _ in range(n)]
        try:
            def probe() -> None:
                for fd in fds:
                    socket.socket(fileno=fd).detach()

            def named() -> None:
                for fd in fds:
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd).detach()

            def named_blocking() -> None:
                for fd in fds:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
                    s.setblocking(True)
                    s.detach()

            return {
                "socket(fileno=fd): family/type/proto probed": per_call(probe, n),
                "socket(AF_INET, SOCK_STREAM, 0, fileno=fd)": per_call(named, n),
                "... + setblocking(True) (one ioctl)": per_call(named_blocking, n),
            }
        finally:
            fdpass.close_all(fds)


def empty_read_costs(n: int = 20000) -> dict[str, float]:
    """What reading a channel until EAGAIN costs once it is empty."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        def drained() -> None:
            for _ in range(n):
                try:  # noqa: SIM105 - the shape the master's read loop has, timed as is
                    fdpass.recv(a, 64, 0, nonblocking=True)
                except BlockingIOError:
                    pass

        return {"recvmsg on an empty channel (EAGAIN, caught)": per_call(drained, n)}


def pass_costs(n: int = 4000) -> dict[str, float]:
    """Send + receive + close both copies, per descriptor, by message size."""
    out = {}
    with tcp_pair() as (_, conn):
        for batch in (1, 4, 16):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with a, b:
                def run(batch: int = batch, a: socket.socket = a,
                        b: socket.socket = b) -> None:
                    for _ in range(n // batch):
                        fds = [os.dup(conn.fileno()) for _ in range(batch)]
                        if not fdpass.send(a, b"c" * batch, fds):
                            raise RuntimeError("the channel is full")
                        fdpass.close_all(fds)
                        _, got = fdpass.recv(b, 64, fdpass.SCM_MAX_FD)
                        fdpass.close_all(got)

                out[f"pass {batch} fd(s) per message: per fd (incl. dup)"] = per_call(
                    run, n // batch * batch)
        def dup_only() -> None:
            for _ in range(n):
                os.close(os.dup(conn.fileno()))

        out["... of which dup + close (to subtract)"] = per_call(dup_only, n)
    return out


def exception_cost(n: int = 100000) -> dict[str, float]:
    """A raised-and-caught exception, which every EAGAIN in Python is."""
    def raising() -> None:
        for _ in range(n):
            try:
                raise BlockingIOError
            except BlockingIOError:
                pass

    return {"raise + catch BlockingIOError (no syscall)": per_call(raising, n)}


def measure() -> dict[str, float]:
    return {**adopt_costs(), **empty_read_costs(), **pass_costs(), **exception_cost()}


def main() -> None:
    for name, us in measure().items():
        print(f"{us:8.2f} µs  {name}")


if __name__ == "__main__":
    main()
