"""The bundled example handlers, driven in-process over real socketpairs."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

import pytest

from forkserver.examples import echo, hello_http


def run_sync(handler: Callable[[socket.socket, object], None], request: bytes) -> bytes:
    """Run *handler* in a thread as a worker would: it gets the socket, then it is closed."""
    server, client = socket.socketpair()

    def serve() -> None:
        handler(server, "")
        server.shutdown(socket.SHUT_RDWR)

    with server, client:
        client.settimeout(5)
        thread = threading.Thread(target=serve)
        thread.start()
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
        thread.join(timeout=5)
        assert not thread.is_alive()
    return b"".join(chunks)


def run_async(request: bytes) -> bytes:
    async def main() -> bytes:
        server, client = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=server)
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(hello_http.async_handle(reader, writer))
        await loop.sock_sendall(client, request)
        client.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 5)
        writer.close()
        await writer.wait_closed()
        chunks = []
        while chunk := await loop.sock_recv(client, 65536):
            chunks.append(chunk)
        client.close()
        return b"".join(chunks)

    return asyncio.run(main())


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
POST = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
CLOSE = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("run", [lambda r: run_sync(hello_http.handle, r), run_async])
def test_hello_http_keeps_alive_skips_bodies_and_honours_close(run: object) -> None:
    reply = run(GET + POST + GET + CLOSE + GET)  # type: ignore[operator]
    assert reply == hello_http.KEEP_ALIVE * 3 + hello_http.CLOSE


@pytest.mark.parametrize("run", [lambda r: run_sync(hello_http.handle, r), run_async])
@pytest.mark.parametrize(
    "request_",
    [
        b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: lots\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
    ],
)
def test_hello_http_answers_bad_requests_with_400(run: object, request_: bytes) -> None:
    assert run(request_) == hello_http.BAD_REQUEST  # type: ignore[operator]


def test_hello_http_refuses_an_endless_head() -> None:
    assert run_sync(hello_http.handle, b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 5000) == (
        hello_http.BAD_REQUEST
    )


def test_http_1_0_closes_unless_asked_to_keep_alive() -> None:
    assert run_sync(hello_http.handle, b"GET / HTTP/1.0\r\n\r\n") == hello_http.CLOSE
    keep = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    assert run_sync(hello_http.handle, keep + CLOSE) == hello_http.KEEP_ALIVE + hello_http.CLOSE


def test_echo_returns_every_byte() -> None:
    data = bytes(range(256)) * 200  # fits the socket buffers: no need to read while sending
    assert run_sync(echo.handle, data) == data


def test_hello_http_closes_after_its_keepalive_request_limit() -> None:
    many = b"GET / HTTP/1.1\r\n\r\n" * (hello_http.MAX_KEEPALIVE_REQUESTS + 5)
    reply = run_sync(hello_http.handle, many)
    limit = hello_http.MAX_KEEPALIVE_REQUESTS
    assert reply == hello_http.KEEP_ALIVE * (limit - 1) + hello_http.CLOSE


def test_hello_http_lets_a_silent_keepalive_client_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hello_http, "KEEPALIVE_TIMEOUT", 0.2)
    server, client = socket.socketpair()
    with server, client:
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")  # then silence, connection kept open
        hello_http.handle(server, "peer")  # returns instead of waiting forever
        assert client.recv(4096) == hello_http.KEEP_ALIVE
