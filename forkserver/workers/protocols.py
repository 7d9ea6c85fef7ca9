"""Running an ``asyncio.Protocol`` handler on one connection.

The worker must know when a protocol's connection is over (to count it
served and to finish before a graceful stop) and what went wrong in its
callbacks (to report it to the master).  asyncio tells neither to the
caller of ``connect_accepted_socket``, so the user's class is subclassed
once per worker: the subclass marks the connection over when
``connection_lost`` has run, and the worker's exception handler records
on the protocol any exception asyncio caught from its callbacks.  The
subclass is a real subclass, so ``isinstance`` checks (asyncio's own
``BufferedProtocol`` test among them) see the user's class, and
``data_received`` is called with nothing in between.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any


class TrackedProtocol(asyncio.BaseProtocol):
    """What the worker adds to the user's protocol (mixed in first)."""

    forkserver_over: asyncio.Future[None]
    forkserver_error: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            super().connection_made(transport)
        except Exception as exc:  # asyncio would only log it and keep the connection
            self.forkserver_error = exc
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        except Exception as error:
            self.forkserver_error = self.forkserver_error or error
        finally:
            if not self.forkserver_over.done():
                self.forkserver_over.set_result(None)


def tracked(cls: type[asyncio.BaseProtocol]) -> type[TrackedProtocol]:
    """The user's protocol class with the worker's tracking mixed in."""
    return type(cls.__name__, (TrackedProtocol, cls), {"__module__": cls.__module__})


def record_callback_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The worker loop's exception handler: a protocol's error goes to its connection.

    asyncio catches an exception from ``data_received``, ``eof_received``
    and the like, closes the transport and hands the exception here with
    the protocol; it is reported when the connection is over.  Anything
    else takes asyncio's default path (a log line).
    """
    protocol = context.get("protocol")
    exc = context.get("exception")
    if isinstance(protocol, TrackedProtocol) and isinstance(exc, BaseException):
        protocol.forkserver_error = protocol.forkserver_error or exc
    else:
        loop.default_exception_handler(context)


async def serve(cls: type[TrackedProtocol], sock: socket.socket) -> BaseException | None:
    """Attach a new *cls* to *sock*; wait until its connection is over; its error, if any."""
    loop = asyncio.get_running_loop()
    try:
        protocol = cls()
        protocol.forkserver_over = loop.create_future()
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
    except BaseException:
        sock.close()
        raise
    try:
        await protocol.forkserver_over
    except asyncio.CancelledError:
        transport.abort()  # the worker is going away at once (the master is gone)
        raise
    return protocol.forkserver_error
