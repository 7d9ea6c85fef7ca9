"""Driving an ``SslServer`` in tests: a signal spy, a driver, clients in threads.

``Driver("loop")`` runs the server's ``EventLoop``; ``Driver("wait")``
has no loop and drives it by ``wait_for_new_connection()`` alone, so
each test can run both ways.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from forkserver import EventLoop, HostAddress, SslServer
from tests.tls_support import TIMEOUT, Issued

SIGNALS = (
    "new_connection",
    "pending_connection_available",
    "started_encryption_handshake",
    "peer_verify_error",
    "ssl_errors",
    "error_occurred",
    "alert_sent",
    "alert_received",
    "handshake_failed",
)


@dataclass
class Spy:
    """Every signal an ``SslServer`` emits, in order, as (name, args)."""

    server: SslServer
    events: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    open_in_slot: list[bool] = field(default_factory=list)  # error_occurred's socket

    def __post_init__(self) -> None:
        for name in SIGNALS:
            getattr(self.server, name).connect(self._recorder(name))

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            if name == "error_occurred":
                self.open_in_slot.append(args[0].fileno() != -1)
            self.events.append((name, args))

        return record

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.events if n == name)

    def args(self, name: str) -> list[tuple[Any, ...]]:
        return [a for n, a in self.events if n == name]

    def counts(self) -> dict[str, int]:
        return {name: self.count(name) for name in SIGNALS}


class Driver:
    """Runs the server until something is true, by its loop or by waiting."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.loop = EventLoop() if mode == "loop" else None

    def server(self) -> SslServer:
        return SslServer(loop=self.loop)

    def until(self, server: SslServer, done: Callable[[], object], timeout: float = TIMEOUT,
              ) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            assert remaining > 0, "timed out driving the server"
            if self.loop is not None:
                self.loop.run_once(min(remaining, 0.05))
            else:
                server.wait_for_new_connection(min(int(remaining * 1000), 50))

    def serve_for(self, server: SslServer, seconds: float) -> None:
        """Keep serving for *seconds* (a deliberate pause that still drives the server)."""
        until = time.monotonic() + seconds
        self.until(server, lambda: time.monotonic() >= until)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()


def server_context(leaf: Issued) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(leaf.certfile, leaf.keyfile)
    return ctx


@contextlib.contextmanager
def listening(driver: Driver, ctx: ssl.SSLContext, timeout_ms: int | None = None,
              ) -> Iterator[tuple[SslServer, Spy, tuple[str, int]]]:
    with driver.server() as server:
        server.set_ssl_configuration(ctx)
        if timeout_ms is not None:
            server.set_handshake_timeout(timeout_ms)
        spy = Spy(server)
        assert server.listen(HostAddress.LocalHost, 0), server.error_string()
        yield server, spy, ("127.0.0.1", server.server_port())


class Client(threading.Thread):
    """A client in a thread; ``result()`` is what *run* returned or raised (bounded)."""

    def __init__(self, run: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._run = run
        self.value: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.value = self._run()
        except BaseException as exc:
            self.error = exc

    def result(self) -> Any:
        self.join(TIMEOUT)
        assert not self.is_alive(), "the client thread did not finish"
        if self.error is not None:
            raise self.error
        return self.value


def tls_client(address: tuple[str, int], ctx: ssl.SSLContext, send: bytes = b"ping",
               ) -> Client:
    """Handshake, send *send*, return what the server answers (until EOF)."""

    def run() -> bytes:
        with socket.create_connection(address, timeout=TIMEOUT) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(send)
                data = b""
                while chunk := tls.recv(4096):
                    data += chunk
                return data

    return Client(run)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            data += chunk
    return data


