"""The shared-accept prefork baseline: the simplest Python prefork server.

A master forks N workers that all accept on the one inherited listening
socket, the way unicorn and gunicorn's sync worker do. The kernel picks
which worker gets each connection. Nothing is handed through the master,
so this is the Python limit for a trivial handler, against which the
fd-passing master is measured.

Modes:
  blocking  one connection at a time: accept, read one request, answer
            with ``Connection: close``, close (like gunicorn sync).
  epoll     a non-blocking epoll loop per worker with keep-alive; the
            listener is registered with EPOLLEXCLUSIVE so one worker
            wakes per connection.
  echo      the epoll loop, but echoing bytes back (idle-connection test).

Every response carries ``X-Worker: <pid>`` so a client can count the
connections each worker served (fairness).

``--handler MODULE:FUNC`` (blocking mode only) runs a forkserver-style
handler, ``handle(conn, peer) -> None``, on each accepted connection
instead of the inline responder: with forkserver's own example handler
the baseline does exactly the work a forkserver sync worker does, less
the dispatch.  The handler is imported once, before fork.

``--preload-mb N`` builds N MB of read-only state (``tests/bench/state.py``)
that each request reads a slice of; ``--preload`` builds it in the master
before fork (optionally with ``gc.freeze()``), otherwise each worker
builds its own after fork. Run as ``python -m tests.bench.servers.shared_accept``
from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import os
import select
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, cast

from tests.bench.state import State

MAX_REQUEST = 8192  # bytes of request head we accept before giving up on a client
BODY = b"Hello, world\n"
STATE = State(0)

Handler = Callable[[socket.socket, Any], None]


class HandlerError(ValueError):
    """``--handler`` names nothing callable; the message says what and why."""


def load_handler(spec: str) -> Handler:
    """Import ``MODULE:FUNC`` and return the callable, or say what is wrong with it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerError(f"--handler {spec!r}: expected MODULE:FUNC")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerError(f"--handler {spec!r}: cannot import {module_name}: {exc}") from exc
    if not hasattr(module, attr):
        raise HandlerError(f"--handler {spec!r}: {module_name} has no attribute {attr!r}")
    handler: object = getattr(module, attr)
    if not callable(handler):
        raise HandlerError(f"--handler {spec!r}: {attr} is not callable")
    return cast(Handler, handler)


def response(keep_alive: bool) -> bytes:
    connection = b"keep-alive" if keep_alive else b"close"
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Connection: %s\r\nX-Worker: %d\r\n\r\n%s" % (len(BODY), connection, os.getpid(), BODY)
    )


def set_pdeathsig() -> None:
    """Die with the master, so a killed bench never leaves workers behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk or len(data) > MAX_REQUEST:
            return b""
        data += chunk
    return data


def serve_with(listener: socket.socket, handler: Handler) -> None:
    """Blocking accept, then the handler, as a forkserver sync worker runs it."""
    while True:
        conn, peer = listener.accept()
        # An OSError is a client gone away; the next one is waiting.
        with conn, contextlib.suppress(OSError):
            handler(conn, peer)


def serve_blocking(listener: socket.socket) -> None:
    reply = response(keep_alive=False)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                if read_head(conn):
                    STATE.touch()
                    conn.sendall(reply)
            except OSError:
                pass  # the client went away; the next one is waiting


class EpollWorker:
    """One worker's event loop: accept up to a bound, then serve ready clients."""

    def __init__(self, listener: socket.socket, echo: bool) -> None:
        self.listener = listener
        self.echo = echo
        self.poller = select.epoll()
        self.conns: dict[int, socket.socket] = {}
        self.buffers: dict[int, bytes] = {}
        self.keep = response(keep_alive=True)
        self.close_reply = response(keep_alive=False)
        listener.setblocking(False)
        self.poller.register(listener.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)

    def run(self) -> None:
        lfd = self.listener.fileno()
        while True:
            for fd, _ in self.poller.poll():
                if fd == lfd:
                    self.accept_some()
                else:
                    self.on_readable(fd)

    def accept_some(self) -> None:
        for _ in range(16):  # a bound per wake-up keeps one worker from hoarding
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self.conns[conn.fileno()] = conn
            self.buffers[conn.fileno()] = b""
            self.poller.register(conn.fileno(), select.EPOLLIN)

    def drop(self, fd: int) -> None:
        self.poller.unregister(fd)
        self.conns.pop(fd).close()
        self.buffers.pop(fd, None)

    def on_readable(self, fd: int) -> None:
        conn = self.conns[fd]
        try:
            chunk = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.drop(fd)
            return
        if self.echo:
            self.send_or_drop(fd, chunk)
            return
        data = self.buffers[fd] + chunk
        while b"\r\n\r\n" in data:
            head, data = data.split(b"\r\n\r\n", 1)
            STATE.touch()
            if b"connection: close" in head.lower():
                self.send_or_drop(fd, self.close_reply)
                if fd in self.conns:
                    self.drop(fd)
                return
            if not self.send_or_drop(fd, self.keep):
                return
        if len(data) > MAX_REQUEST:
            self.drop(fd)
            return
        self.buffers[fd] = data

    def send_or_drop(self, fd: int, payload: bytes) -> bool:
        conn = self.conns[fd]
        try:
            # Responses are far smaller than a socket buffer; a short write
            # means a client that does not read, and it is dropped.
            sent = conn.send(payload)
        except OSError:
            sent = -1
        if sent != len(payload):
            self.drop(fd)
            return False
        return True


def worker_main(listener: socket.socket, mode: str, state: State,
                handler: Handler | None) -> None:
    global STATE
    set_pdeathsig()
    STATE = state
    if handler is not None:
        serve_with(listener, handler)
    elif mode == "blocking":
        serve_blocking(listener)
    else:
        EpollWorker(listener, echo=mode == "echo").run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mode", choices=("blocking", "epoll", "echo"), default="blocking")
    parser.add_argument("--preload-mb", type=int, default=0)
    parser.add_argument("--preload", action="store_true")
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() after preloading")
    parser.add_argument("--blob", action="store_true", help="the state as one bytes buffer")
    parser.add_argument("--handler", metavar="MODULE:FUNC",
                        help="blocking mode: run handle(conn, peer) on each connection")
    args = parser.parse_args(argv)
    if args.handler is not None and args.mode != "blocking":
        parser.error(f"--handler runs only in blocking mode, not --mode {args.mode}")
    try:
        # Imported once, before fork, so every worker shares it (as preload does).
        handler = None if args.handler is None else load_handler(args.handler)
    except HandlerError as exc:
        print(f"shared_accept: {exc}", file=sys.stderr)
        return 2
    listener = socket.socket(fileno=args.fd)
    listener.set_inheritable(False)
    if listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
        print(f"shared_accept: fd {args.fd} is not a listening socket", file=sys.stderr)
        return 2
    kind = "blob" if args.blob else "objects"
    preloaded = State(args.preload_mb, kind) if args.preload else None
    if args.freeze:
        gc.freeze()
    # Block the stop signals before forking and wait for them with sigwait:
    # no handler, no race between checking a flag and pausing.
    stop_set = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_set)
    pids = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_set)
                worker_main(listener, args.mode, preloaded or State(args.preload_mb, kind),
                            handler)
            finally:
                os._exit(1)
        pids.append(pid)
    listener.close()
    received = signal.sigwait(stop_set)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        os.waitpid(pid, 0)
    if received == signal.SIGCHLD:
        print("shared_accept: a worker died; stopping", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
