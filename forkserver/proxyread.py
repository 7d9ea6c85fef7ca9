"""Reading a PROXY header off a connection, bounded in time and size.

Two readers, one for each kind of worker, both built on
``proxyproto.parse`` and both returning a ``ProxyInfo``:

* ``read_header_blocking(sock, version, deadline, max_size)`` for the
  sync and thread workers;
* ``await read_header(sock_or_reader, version, deadline, max_size)`` for
  the asyncio worker, on a non-blocking socket (before any transport is
  attached to it) or on an ``asyncio.StreamReader``.

*deadline* is a ``time.monotonic()`` value.  Neither reader waits past it,
however the peer spreads its bytes: a client that sends half a header,
or one byte now and then, gets ``ProxyProtocolError`` (reason
``"timeout"``) at the deadline.  The spec suggests allowing at least 3 s,
so that one lost segment can be retransmitted.

Neither reader consumes a byte past the header, so the handler reads the
client's data from the first byte.  On a socket each step peeks at what
has arrived (``MSG_PEEK``), lets ``parse`` say where the header ends,
and then consumes only header bytes: exactly the header when it is
complete, or everything peeked when ``parse`` needs more (all of it is
header then), so the next wait is for new bytes and never spins.  A
header sent at once (as senders must) costs one peek and one read.  On
a ``StreamReader``, whose buffer the handler goes on reading, each step
takes exactly the bytes ``parse`` asks for.

A peer that closes or resets the connection mid-header gives reason
``"closed"``.  Other ``OSError`` are the caller's (a closed descriptor
is a bug, not the peer's doing).
"""

from __future__ import annotations

import asyncio
import socket
import time

from forkserver.proxyproto import (
    DEFAULT_MAX_SIZE,
    V1_MAX_LENGTH,
    Address,
    NeedMore,
    ProxyHeader,
    ProxyInfo,
    ProxyProtocolError,
    Version,
    check_max_size,
    parse,
)

__all__ = ["read_header", "read_header_blocking"]


def read_header_blocking(sock: socket.socket, version: Version, deadline: float,
                         max_size: int = DEFAULT_MAX_SIZE, *, peer: Address | None = None,
                         local: Address | None = None) -> ProxyInfo:  # fmt: skip
    """Read the PROXY header of *version* from *sock*, by *deadline* at the latest.

    *sock* may be blocking, non-blocking or have a timeout: the reader
    sets timeouts from the time left and restores the socket's own
    before returning.  *peer* and *local* are the socket's addresses,
    used when the header has none (``LOCAL``, ``UNKNOWN``); they are asked
    of the socket when not given.  Raises ``ProxyProtocolError``.
    """
    _check_version(version, max_size)
    header = _Header(version, max_size)
    saved = sock.gettimeout()
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise header.timed_out()
            sock.settimeout(remaining)
            try:
                peeked = sock.recv(header.room, socket.MSG_PEEK)
                done = header.advance(peeked)
                header.consumed(sock.recv(header.take))
            except TimeoutError:
                raise header.timed_out() from None
            except ConnectionError as exc:
                raise header.closed(exc) from None
            if done is not None and header.complete(done):
                return _resolve(done, sock, peer, local)
    finally:
        sock.settimeout(saved)


async def read_header(source: socket.socket | asyncio.StreamReader, version: Version,
                      deadline: float, max_size: int = DEFAULT_MAX_SIZE, *,
                      peer: Address | None = None,
                      local: Address | None = None) -> ProxyInfo:  # fmt: skip
    """Read the PROXY header of *version* from *source*, by *deadline* at the latest.

    A socket must be non-blocking (as asyncio wants it) and not yet
    attached to a transport; the reader waits for it with
    ``loop.add_reader`` and leaves it registered with nothing.  A
    ``StreamReader`` needs *peer* and *local* (its transport's
    ``peername`` and ``sockname``), for headers that carry no addresses.
    Raises ``ProxyProtocolError``.
    """
    _check_version(version, max_size)
    if isinstance(source, socket.socket) and source.gettimeout() != 0.0:
        raise ValueError("read_header() needs a non-blocking socket")
    if isinstance(source, asyncio.StreamReader) and (peer is None or local is None):
        raise TypeError("read_header() on a StreamReader needs peer= and local=")
    header = _Header(version, max_size)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise header.timed_out()
    try:
        async with asyncio.timeout(remaining):
            if isinstance(source, asyncio.StreamReader):
                done = await _read_stream(source, header)
            else:
                done = await _read_socket(source, header)
    except TimeoutError:
        raise header.timed_out() from None
    if isinstance(source, asyncio.StreamReader):
        return done.resolve(peer, local)
    return _resolve(done, source, peer, local)


async def _read_socket(sock: socket.socket, header: _Header) -> ProxyHeader:
    loop = asyncio.get_running_loop()
    while True:
        try:
            peeked = sock.recv(header.room, socket.MSG_PEEK)
        except BlockingIOError:
            await _readable(loop, sock)
            continue
        except ConnectionError as exc:
            raise header.closed(exc) from None
        done = header.advance(peeked)
        try:
            header.consumed(sock.recv(header.take))
        except ConnectionError as exc:
            raise header.closed(exc) from None
        if done is not None and header.complete(done):
            return done


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def _read_stream(reader: asyncio.StreamReader, header: _Header) -> ProxyHeader:
    while True:
        result = parse(header.data, header.version, max_size=header.max_size)
        if isinstance(result, ProxyHeader):
            return result
        try:
            header.consumed(await reader.readexactly(result.n))
        except asyncio.IncompleteReadError as exc:
            header.consumed(exc.partial)
            raise header.closed(None) from None
        except ConnectionError as exc:
            raise header.closed(exc) from None


class _Header:
    """The bytes of one header consumed so far, and what to consume next."""

    def __init__(self, version: Version, max_size: int) -> None:
        self.version: Version = version
        self.max_size = max_size
        self.limit = V1_MAX_LENGTH if version == 1 else max_size
        self.data = bytearray()
        self.take = 0  # how many of the peeked bytes are header bytes

    @property
    def room(self) -> int:
        """How much to peek: never more than a header can be."""
        return self.limit - len(self.data)

    def advance(self, peeked: bytes) -> ProxyHeader | None:
        """Parse what is consumed plus *peeked*; set ``take``; the header if complete."""
        if not peeked:
            raise self.closed(None)
        result = parse(self.data + peeked, self.version, max_size=self.max_size)
        if isinstance(result, NeedMore):
            self.take = len(peeked)
            return None
        self.take = result.length - len(self.data)
        return result

    def consumed(self, data: bytes) -> None:
        self.data += data

    def complete(self, header: ProxyHeader) -> bool:
        # The kernel hands back what it let us peek, so this holds; a short
        # read would only mean another round.
        return len(self.data) == header.length

    def _progress(self) -> str:
        return f"after {len(self.data)} header byte(s)"

    def timed_out(self) -> ProxyProtocolError:
        return ProxyProtocolError("timeout", f"v{self.version} header: not complete by the "
                                             f"deadline, {self._progress()}")  # fmt: skip

    def closed(self, exc: OSError | None) -> ProxyProtocolError:
        how = "closed" if exc is None else f"reset ({type(exc).__name__})"
        return ProxyProtocolError("closed", f"v{self.version} header: connection {how} "
                                            f"{self._progress()}")  # fmt: skip


def _check_version(version: Version, max_size: int) -> None:
    if version not in (1, 2):
        raise ValueError(f"PROXY protocol version must be 1 or 2, not {version!r}")
    check_max_size(max_size)


def _resolve(header: ProxyHeader, sock: socket.socket, peer: Address | None,
             local: Address | None) -> ProxyInfo:  # fmt: skip
    if header.source is None:  # no addresses in the header: the socket's stand
        peer = sock.getpeername() if peer is None else peer
        local = sock.getsockname() if local is None else local
    return header.resolve(peer, local)
