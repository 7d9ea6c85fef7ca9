"""``asyncio.Protocol`` handlers whose replies let a test see what ran where."""

from __future__ import annotations

import asyncio
import os
from typing import cast


class PidLines(asyncio.Protocol):
    """Answer each line with "<pid> <line>"; "boom" raises, "quit" closes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are Transports in all but name (not subclasses).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line == b"boom":
                raise ValueError("boom requested by the client")
            if line == b"quit":
                self.transport.close()
                return
            self.transport.write(b"%d %s\n" % (os.getpid(), line))


class FirstLine(asyncio.Protocol):
    """Answer the first line with ``reply(line)``, then close (the connection's
    transport is ``self.transport`` by then)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        if b"\n" in self.buffer:
            self.transport.write(self.reply(self.buffer.split(b"\n", 1)[0]))
            self.transport.close()

    def reply(self, line: bytes) -> bytes:
        raise NotImplementedError


class BrokenStart(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raise RuntimeError("cannot start this connection")


class BrokenEnd(PidLines):
    def connection_lost(self, exc: Exception | None) -> None:
        raise RuntimeError("cannot end this connection")


class SlottedEcho(asyncio.Protocol):
    """Echo, with ``__slots__``: the worker's tracking must not need a ``__dict__``."""

    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class BufferedEcho(asyncio.BufferedProtocol):
    """Echo through ``get_buffer``/``buffer_updated`` (asyncio's zero-copy reads)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.memory = bytearray(4096)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are Transports in all but name (not subclasses).
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.memory

    def buffer_updated(self, nbytes: int) -> None:
        assert self.transport is not None
        self.transport.write(b"buffered " + bytes(self.memory[:nbytes]))


class LoopName(asyncio.Protocol):
    """Reply with the module of the running event loop's class, then close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        transport = cast(asyncio.Transport, transport)
        transport.write(type(loop).__module__.encode() + b"\n")
        transport.close()


class NeedsArguments(asyncio.Protocol):
    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
