"""Running an ``asyncio.Protocol`` handler on one connection.

The worker must know when a protocol's connection is over (to count it
served and to finish before a graceful stop) and what went wrong in its
callbacks (to report it to the master).  asyncio tells neither to the
caller of ``connect_accepted_socket``, so the user's class is subclassed
once per worker: the subclass marks the connection over when
``connection_lost`` has run, and the worker's exception handler records
on the protocol any exception asyncio caught from its callbacks.  The
subclass is a real subclass, so ``isinstance`` checks (asyncio's own
``BufferedProtocol`` test among them) see the user's class.

asyncio (and uvloop) catch what a protocol callback raises, except
``SystemExit`` and ``KeyboardInterrupt``, which they let end the event
loop, and with it the worker.  So each data-path callback the user's
class defines (``data_received``, ``eof_received``, ``get_buffer``,
``buffer_updated``, ``pause_writing``, ``resume_writing``) is wrapped:
those two come out as ``HandlerEscape``, an ``Exception`` that asyncio
handles like any other (it closes the transport and hands it to the
worker's exception handler), and the original is what gets reported.
The wrapper is one more Python call per callback, nothing else.
``connection_made`` and ``connection_lost`` record anything they raise.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, Final

#: Callbacks asyncio calls with one argument, and with none.
_ONE_ARGUMENT: Final = ("data_received", "get_buffer", "buffer_updated")
_NO_ARGUMENT: Final = ("eof_received", "pause_writing", "resume_writing")


class HandlerEscape(Exception):
    """Carries a protocol's ``SystemExit`` or ``KeyboardInterrupt`` past asyncio."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"{type(original).__name__}: {original}")
        self.original = original


class TrackedProtocol(asyncio.BaseProtocol):
    """What the worker adds to the user's protocol (mixed in first)."""

    forkserver_over: asyncio.Future[None]
    forkserver_error: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            super().connection_made(transport)
        except BaseException as exc:  # asyncio would log it, or end its loop
            self.forkserver_error = exc
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        except BaseException as error:  # as in connection_made
            self.forkserver_error = self.forkserver_error or error
        finally:
            if not self.forkserver_over.done():
                self.forkserver_over.set_result(None)


def tracked(cls: type[asyncio.BaseProtocol]) -> type[TrackedProtocol]:
    """The user's protocol class with the worker's tracking mixed in."""
    namespace: dict[str, object] = {"__module__": cls.__module__}
    for name in (*_ONE_ARGUMENT, *_NO_ARGUMENT):
        method = _user_method(cls, name)
        if method is not None:
            namespace[name] = (_guard_one if name in _ONE_ARGUMENT else _guard_none)(method)
    return type(cls.__name__, (TrackedProtocol, cls), namespace)


def _user_method(cls: type, name: str) -> Callable[..., Any] | None:
    """*cls*'s own *name* (from it or a base of its own), not asyncio's no-op."""
    for klass in cls.__mro__:
        if name in vars(klass):
            method: Callable[..., Any] = vars(klass)[name]
            return None if klass.__module__.startswith("asyncio") else method
    return None


def _guard_one(method: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def guarded(self: Any, arg: Any) -> Any:
        try:
            return method(self, arg)
        except (SystemExit, KeyboardInterrupt) as exc:
            raise HandlerEscape(exc) from None

    guarded.__name__ = guarded.__qualname__ = method.__name__
    return guarded


def _guard_none(method: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def guarded(self: Any) -> Any:
        try:
            return method(self)
        except (SystemExit, KeyboardInterrupt) as exc:
            raise HandlerEscape(exc) from None

    guarded.__name__ = guarded.__qualname__ = method.__name__
    return guarded


def record_callback_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The worker loop's exception handler: a protocol's error goes to its connection.

    asyncio catches an exception from ``data_received``, ``eof_received``
    and the like, closes the transport and hands the exception here with
    the protocol; it is reported when the connection is over.  Anything
    else takes asyncio's default path (a log line).
    """
    protocol = context.get("protocol")
    exc = context.get("exception")
    if isinstance(exc, HandlerEscape):
        exc = exc.original
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
    return await wait_over(protocol, transport)


async def wait_over(protocol: TrackedProtocol,
                    transport: asyncio.BaseTransport) -> BaseException | None:  # fmt: skip
    """Wait until *protocol*'s connection is over; its error, if any."""
    try:
        await protocol.forkserver_over
    except asyncio.CancelledError:
        transport.abort()  # type: ignore[attr-defined]  # the worker goes at once (master gone)
        raise
    return protocol.forkserver_error
