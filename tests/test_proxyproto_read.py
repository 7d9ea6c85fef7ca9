"""Reading PROXY headers off real sockets: deadlines, fragments, and the bytes after.

The slow senders synchronise on what the reader has consumed (a
``socket.socket`` subclass counts it), so every test knows the reader saw
each fragment on its own.  Deadlines are checked on the monotonic clock
with a generous upper bound, never as a speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from forkserver.proxyproto import Command, ProxyInfo, ProxyProtocolError
from forkserver.proxyread import read_header, read_header_blocking
from tests import proxyproto_build as b

V1 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
V2 = b.v2_inet("2001:db8::1", "2001:db8::2", 56324, 443, b.tlv(0x01, b"h2") + b.tlv(0xE0, b"x"),
               crc=True)  # fmt: skip
HEADERS = {1: V1, 2: V2}
PAYLOAD = b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 300  # more than one socket buffer read
LATE = 2.0  # the generous bound on how late a deadline may be noticed on a saturated machine
EARLY = 0.01  # timer slack: the reader must not give up noticeably before its deadline


class Spy(socket.socket):
    """A real socket that counts the bytes the reader consumes (not those it peeks)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.consumed = 0
        self.reads = 0
        self.stopped = False
        self.changed = threading.Condition()

    def recv(self, n: int, flags: int = 0) -> bytes:
        data = super().recv(n, flags)
        if not flags & socket.MSG_PEEK:
            with self.changed:
                self.consumed += len(data)
                self.reads += 1
                self.changed.notify_all()
        return data

    def wait_consumed(self, total: int, timeout: float = 10.0) -> bool:
        """Wait until *total* bytes were consumed; false on timeout or ``stop()``."""
        with self.changed:
            self.changed.wait_for(lambda: self.consumed >= total or self.stopped, timeout)
            return self.consumed >= total and not self.stopped

    def stop(self) -> None:
        with self.changed:
            self.stopped = True
            self.changed.notify_all()


@contextlib.contextmanager
def connection(kind: str) -> Iterator[tuple[socket.socket, Spy]]:
    """(client, server side) over loopback TCP or a Unix socketpair."""
    if kind == "unix":
        client, server = socket.socketpair()
    else:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname(), timeout=5)
            server, _ = listener.accept()
    spy = Spy(server)
    try:
        yield client, spy
    finally:
        client.close()
        spy.close()


@contextlib.contextmanager
def sender(target: Callable[[], None], spy: Spy) -> Iterator[threading.Event]:
    """Run *target* in a thread that the test joins; the event (and ``spy.stop()``)
    tell it to stop."""
    failure: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        try:
            target()
        except OSError:
            if not stop.is_set():
                raise
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        spy.stop()
    thread.join(10)
    assert not thread.is_alive(), "the sender did not finish"
    assert not failure, failure


def read_rest(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def fragments_of(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:z] for a, z in itertools.pairwise(edges)]


def check_v2(info: ProxyInfo) -> None:
    assert info.source == ("2001:db8::1", 56324, 0, 0)
    assert info.destination == ("2001:db8::2", 443, 0, 0)
    assert info.tlvs.alpn == b"h2" and info.tlvs.unknown == ((0xE0, b"x"),)
    assert info.tlvs.crc32c is not None and info.from_header and info.length == len(V2)


def check(version: int, info: ProxyInfo) -> None:
    assert info.version == version and info.command == Command.PROXY
    if version == 1:
        assert info.source == ("192.168.0.1", 56324)
        assert info.destination == ("192.168.0.11", 443)
        assert info.length == len(V1) and info.from_header
    else:
        check_v2(info)


# --- blocking -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest.mark.parametrize("version", [1, 2])
def test_blocking_reader_leaves_every_byte_after_the_header(kind: str, version: int) -> None:
    with connection(kind) as (client, server):
        client.sendall(HEADERS[version] + PAYLOAD)
        client.shutdown(socket.SHUT_WR)
        info = read_header_blocking(server, version, time.monotonic() + 10)  # type: ignore[arg-type]
        check(version, info)
        assert server.consumed == len(HEADERS[version])
        assert server.gettimeout() is None  # the socket's own mode is restored
        assert read_rest(server) == PAYLOAD


@pytest.mark.parametrize("version", [1, 2])
def test_blocking_reader_takes_a_header_in_fragments_and_stops_at_its_end(version: int) -> None:
    header = HEADERS[version]
    cuts = list(range(1, len(header))) if version == 1 else [1, 12, 13, 14, 15, 16, 17, 40, 51]
    pieces = fragments_of(header, cuts)
    pieces[-1] += PAYLOAD  # the rest of the header comes with the client's first bytes

    with connection("tcp") as (client, server):
        def send() -> None:
            sent = 0
            for piece in pieces[:-1]:
                client.sendall(piece)
                sent += len(piece)
                assert server.wait_consumed(sent), "the reader did not take the fragment"
            client.sendall(pieces[-1])
            client.shutdown(socket.SHUT_WR)

        server.setblocking(False)
        with sender(send, server):
            info = read_header_blocking(server, version, time.monotonic() + 20)  # type: ignore[arg-type]
        check(version, info)
        assert server.reads >= len(pieces)  # one round per fragment at least
        assert server.gettimeout() == 0.0
        assert read_rest(server) == PAYLOAD


@pytest.mark.parametrize("version", [1, 2])
def test_blocking_reader_cuts_off_a_half_header_at_the_deadline(version: int) -> None:
    header = HEADERS[version]
    with connection("tcp") as (client, server):
        client.sendall(header[: len(header) // 2])
        deadline = time.monotonic() + 0.3
        with pytest.raises(ProxyProtocolError) as info:
            read_header_blocking(server, version, deadline)  # type: ignore[arg-type]
        now = time.monotonic()
        assert info.value.reason == "timeout"
        assert f"after {len(header) // 2} header byte(s)" in str(info.value)
        assert deadline - EARLY <= now <= deadline + LATE


def test_blocking_reader_cuts_off_a_trickle_at_the_deadline() -> None:
    """A byte now and then never lets any single wait time out: the deadline still holds."""
    header = b.v2(b.PROXY, b.TCP4, b.inet("1.2.3.4", "5.6.7.8", 1, 2), b.tlv(0xE0, bytes(3000)))
    with connection("tcp") as (client, server):
        def trickle() -> None:
            for sent in range(1, len(header)):
                client.send(header[sent - 1 : sent])
                # sleep-ok: the pause between bytes is the slow client under test
                if not server.wait_consumed(sent) or stopping.wait(0.02):
                    return

        deadline = time.monotonic() + 0.5
        with sender(trickle, server) as stopping, pytest.raises(ProxyProtocolError) as info:
            read_header_blocking(server, 2, deadline)
        now = time.monotonic()
        assert info.value.reason == "timeout"
        assert deadline - EARLY <= now <= deadline + LATE
        assert 0 < server.consumed < len(header)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_blocking_reader_reports_a_peer_gone_mid_header(how: str) -> None:
    with connection("tcp") as (client, server):
        client.sendall(V2[:20])
        if how == "reset":
            linger_zero = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # on, 0 s: close() sends a RST
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
        client.close()
        with pytest.raises(ProxyProtocolError) as info:
            read_header_blocking(server, 2, time.monotonic() + 10)
        assert info.value.reason == "closed"
        assert ("reset" if how == "reset" else "closed after 20 header byte(s)") in str(info.value)


def test_blocking_reader_refuses_a_bad_header_at_once() -> None:
    with connection("tcp") as (client, server):
        client.sendall(b"GET / HTTP/1.1\r\n")  # the client stays connected
        started = time.monotonic()
        with pytest.raises(ProxyProtocolError) as info:
            read_header_blocking(server, 1, started + 30)
        assert info.value.reason == "bad_signature"
        assert time.monotonic() - started < 30 / 2  # refused on the bytes, not at the deadline


def test_blocking_reader_uses_the_socket_addresses_for_local_and_unknown() -> None:
    for version, header in ((2, b.v2(b.LOCAL, b.UNSPEC)), (1, b"PROXY UNKNOWN\r\n")):
        with connection("tcp") as (client, server):
            client.sendall(header + b"ping")
            info = read_header_blocking(server, version, time.monotonic() + 10)  # type: ignore[arg-type]
            assert (info.source, info.destination) == (client.getsockname(), client.getpeername())
            assert not info.from_header and info.length == len(header)
            assert info.command == (Command.LOCAL if version == 2 else Command.PROXY)
            assert server.recv(4) == b"ping"
            given = read_header_blocking  # the addresses accept() returned are used as given
            client.sendall(header)
            info = given(server, version, time.monotonic() + 10,  # type: ignore[arg-type]
                         peer=("192.0.2.1", 7), local=("192.0.2.2", 8))  # fmt: skip
            assert (info.source, info.destination) == (("192.0.2.1", 7), ("192.0.2.2", 8))


def test_blocking_reader_with_the_deadline_gone_refuses_without_reading() -> None:
    with connection("unix") as (client, server):
        client.sendall(V1)
        with pytest.raises(ProxyProtocolError) as info:
            read_header_blocking(server, 1, time.monotonic() - 1)
        assert info.value.reason == "timeout"
        assert server.consumed == 0


def test_readers_refuse_a_bad_version_or_size() -> None:
    with connection("unix") as (_, server):
        with pytest.raises(ValueError, match="version"):
            read_header_blocking(server, 3, time.monotonic() + 1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_size"):
            read_header_blocking(server, 2, time.monotonic() + 1, 100)


# --- asyncio --------------------------------------------------------------------


def run(coro_fn: Callable[[], Coroutine[Any, Any, None]], loop_kind: str) -> None:
    if loop_kind == "uvloop":
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro_fn())
    else:
        asyncio.run(coro_fn())


LOOPS = pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])


@LOOPS
@pytest.mark.parametrize("version", [1, 2])
def test_async_reader_on_a_socket_takes_fragments_and_leaves_the_rest(
        loop_kind: str, version: int) -> None:  # fmt: skip
    header = HEADERS[version]
    pieces = fragments_of(header, [1, 5, 13, 16, 30])
    pieces[-1] += PAYLOAD

    async def main() -> None:
        with connection("tcp") as (client, server):
            server.setblocking(False)

            def send() -> None:
                sent = 0
                for piece in pieces[:-1]:
                    client.sendall(piece)
                    sent += len(piece)
                    assert server.wait_consumed(sent)
                client.sendall(pieces[-1])
                client.shutdown(socket.SHUT_WR)

            with sender(send, server):
                info = await read_header(server, version, time.monotonic() + 20)  # type: ignore[arg-type]
            check(version, info)
            assert server.reads >= len(pieces)
            loop = asyncio.get_running_loop()
            assert not loop.remove_reader(server.fileno())  # nothing left registered
            rest = bytearray()
            while chunk := await loop.sock_recv(server, 65536):
                rest += chunk
            assert bytes(rest) == PAYLOAD

    run(main, loop_kind)


@LOOPS
def test_async_reader_cuts_off_a_half_header_at_the_deadline(loop_kind: str) -> None:
    async def main() -> None:
        with connection("tcp") as (client, server):
            server.setblocking(False)
            client.sendall(V2[:10])
            deadline = time.monotonic() + 0.3
            with pytest.raises(ProxyProtocolError) as info:
                await read_header(server, 2, deadline)
            now = time.monotonic()
            assert info.value.reason == "timeout"
            assert "after 10 header byte(s)" in str(info.value)
            assert deadline - EARLY <= now <= deadline + LATE
            assert not asyncio.get_running_loop().remove_reader(server.fileno())

    run(main, loop_kind)


@LOOPS
@pytest.mark.parametrize("version", [1, 2])
def test_async_reader_on_a_stream_leaves_the_rest_to_the_handler(loop_kind: str,
                                                                 version: int) -> None:  # fmt: skip
    async def main() -> None:
        with connection("tcp") as (client, server):
            server.setblocking(False)
            plain = socket.socket(fileno=server.detach())
            reader, writer = await asyncio.open_connection(sock=plain)
            client.sendall(HEADERS[version] + PAYLOAD)
            client.shutdown(socket.SHUT_WR)
            peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
            info = await read_header(reader, version, time.monotonic() + 10,  # type: ignore[arg-type]
                                     peer=peer, local=local)  # fmt: skip
            check(version, info)
            assert await reader.read() == PAYLOAD
            writer.close()
            await writer.wait_closed()

    run(main, loop_kind)


def test_async_reader_on_a_stream_fed_in_fragments() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        pieces = fragments_of(V2, list(range(1, len(V2))))

        async def feed() -> None:
            for piece in pieces:
                reader.feed_data(piece)
                await asyncio.sleep(0)  # sleep-ok: one loop turn, so each piece arrives alone
            reader.feed_data(b"after")
            reader.feed_eof()

        feeding = asyncio.create_task(feed())
        info = await read_header(reader, 2, time.monotonic() + 10, peer="", local="")
        check_v2(info)
        await feeding
        assert await reader.read() == b"after"

        cut = asyncio.StreamReader()
        cut.feed_data(V1[:20])
        cut.feed_eof()
        with pytest.raises(ProxyProtocolError) as exc:
            await read_header(cut, 1, time.monotonic() + 10, peer="", local="")
        assert exc.value.reason == "closed" and "after 20 header byte(s)" in str(exc.value)

        stalled = asyncio.StreamReader()
        stalled.feed_data(V1[:20])
        deadline = time.monotonic() + 0.2
        with pytest.raises(ProxyProtocolError) as exc:
            await read_header(stalled, 1, deadline, peer="", local="")
        assert exc.value.reason == "timeout"
        assert deadline - EARLY <= time.monotonic() <= deadline + LATE

    asyncio.run(main())


def test_async_reader_uses_the_socket_addresses_for_local() -> None:
    async def main() -> None:
        with connection("tcp") as (client, server):
            server.setblocking(False)
            client.sendall(b.v2(b.LOCAL, b.UNSPEC, b"", b.tlv(0x03, b"skipped")))
            info = await read_header(server, 2, time.monotonic() + 10)
            assert (info.source, info.destination) == (client.getsockname(), client.getpeername())
            assert info.command == Command.LOCAL and not info.from_header

    asyncio.run(main())


def test_async_reader_states_what_it_needs() -> None:
    async def main() -> None:
        with connection("unix") as (_, server):
            with pytest.raises(ValueError, match="non-blocking"):
                await read_header(server, 1, time.monotonic() + 1)
            with pytest.raises(TypeError, match="peer= and local="):
                await read_header(asyncio.StreamReader(), 1, time.monotonic() + 1)

    asyncio.run(main())
