"""The health listener on a real event loop and real sockets.

The loop runs in a thread of the test (as the master's loop would run
it); clients are plain sockets in the test's thread.  Its figures come
from a mutable ``HealthFacts`` the test changes between requests.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from forkserver.eventloop import EventLoop
from forkserver.health_answers import HealthFacts, HttpAnswer, agent_reply, free_percent
from forkserver.health_listener import MAX_REQUEST, HealthError, HealthListener
from tests.support import poll_until, recv_all

READY = HealthFacts(draining=False, ready_workers=2, capacity=4, load=1)


@dataclass
class Running:
    health: HealthListener
    address: object
    facts: list[HealthFacts] = field(default_factory=lambda: [READY])

    def connect(self) -> socket.socket:
        family = socket.AF_UNIX if isinstance(self.address, str) else socket.AF_INET
        sock = socket.socket(family)
        sock.settimeout(10)
        sock.connect(self.address)  # type: ignore[arg-type]
        return sock

    def ask(self, data: bytes) -> bytes:
        with self.connect() as sock:
            sock.sendall(data)
            return recv_all(sock)


@pytest.fixture
def running(request: pytest.FixtureRequest) -> Iterator[Running]:
    options = getattr(request, "param", {})
    bind = options.pop("bind", "127.0.0.1:0")
    loop = EventLoop()
    box: list[HealthFacts] = [READY]
    health = HealthListener(loop, bind, lambda: box[0], **options)
    health.start()
    halt = threading.Event()

    def run() -> None:
        while not halt.is_set():
            loop.run_once(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    where = health.describe()
    if where.startswith("unix:"):
        address: object = where[5:]
    else:
        host, _, port = where.rpartition(":")
        address = (host, int(port))
    state = Running(health, address, box)
    try:
        yield state
    finally:
        halt.set()
        thread.join(timeout=10)
        health.close()
        loop.close()


def test_the_agent_line_with_agent_send(running: Running) -> None:
    assert running.ask(b"agent\n") == b"up ready 75%\n"
    running.facts[0] = HealthFacts(draining=False, ready_workers=2, capacity=4, load=9)
    assert running.ask(b"agent\r\n") == b"up ready 1%\n", "a full host still takes a share"
    running.facts[0] = HealthFacts(draining=True, ready_workers=2, capacity=4, load=0)
    assert running.ask(b"agent\n") == b"up drain\n"
    running.facts[0] = HealthFacts(draining=False, ready_workers=0, capacity=0, load=0,
                                   reason="starting: 0 of 2 workers ready")  # fmt: skip
    assert running.ask(b"agent\n") == b"down #starting: 0 of 2 workers ready\n"


def test_an_agent_that_sends_nothing_is_answered_after_the_wait(running: Running) -> None:
    with running.connect() as sock:
        assert recv_all(sock) == b"up ready 75%\n"


@pytest.mark.parametrize(("request_bytes", "status", "body"), [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"200 OK", b"alive\n"),
    (b"GET /readyz HTTP/1.0\r\n\r\n", b"200 OK", b"ready\n"),
    (b"GET /readyz?verbose=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.30\r\n\r\n",
     b"200 OK", b"ready\n"),
    (b"HEAD /healthz HTTP/1.1\r\n\r\n", b"200 OK", b""),
    (b"GET /nope HTTP/1.1\r\n\r\n", b"404 Not Found", b"not found\n"),
    (b"POST /readyz HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405 Method Not Allowed",
     b"only GET and HEAD\n"),
    (b"GET /readyz HTTP/9.9\r\n\r\n", b"400 Bad Request", b"bad request\n"),
])  # fmt: skip
def test_http_probes(running: Running, request_bytes: bytes, status: bytes,
                     body: bytes) -> None:  # fmt: skip
    answer = running.ask(request_bytes)
    head, _, got = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status + b"\r\n")
    assert b"Connection: close" in head
    assert got == body
    if request_bytes.startswith(b"GET"):
        assert f"Content-Length: {len(body)}".encode() in head


def test_readyz_says_503_while_draining_or_not_ready(running: Running) -> None:
    running.facts[0] = HealthFacts(draining=True, ready_workers=3, capacity=3, load=0)
    answer = running.ask(b"GET /readyz HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b"draining\n")
    assert running.ask(b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    running.facts[0] = HealthFacts(draining=False, ready_workers=0, capacity=0, load=0)
    assert running.ask(b"GET /readyz HTTP/1.1\r\n\r\n").endswith(b"not ready\n")


def test_a_metrics_route_can_be_added(running: Running) -> None:
    running.health.routes.add("/metrics", lambda facts: HttpAnswer(
        200, b"ready_workers %d\n" % facts.ready_workers, "text/plain; version=0.0.4"))
    answer = running.ask(b"GET /metrics HTTP/1.1\r\n\r\n")
    assert b"version=0.0.4" in answer and answer.endswith(b"ready_workers 2\n")
    with pytest.raises(ValueError, match="taken"):
        running.health.routes.add("/readyz", lambda facts: HttpAnswer(200, b""))


def test_an_oversized_request_is_refused(running: Running) -> None:
    answer = running.ask(b"GET /" + b"a" * MAX_REQUEST + b" HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("running", [{"client_timeout": 1.0}], indirect=True)
def test_a_stalled_client_is_dropped_and_never_holds_up_others(running: Running) -> None:
    with running.connect() as slow:
        slow.sendall(b"GET /readyz HTTP/1.1\r\n")  # and never the blank line
        for _ in range(3):  # the loop serves others meanwhile
            assert running.ask(b"agent\n") == b"up ready 75%\n"
        assert recv_all(slow) == b"", "dropped unanswered"
    poll_until(lambda: running.health.clients == 0, "the client forgotten")


@pytest.mark.parametrize("running", [{"max_clients": 2, "client_timeout": 30.0}],
                         indirect=True)  # fmt: skip
def test_clients_beyond_the_cap_are_closed_at_once(running: Running) -> None:
    idle = [running.connect(), running.connect()]
    try:
        for sock in idle:
            sock.sendall(b"GET /")  # held: an HTTP request still coming
        poll_until(lambda: running.health.clients == 2, "two clients held")
        with running.connect() as extra, contextlib.suppress(ConnectionResetError):
            assert recv_all(extra) == b""
        assert running.health.turned_away == 1
    finally:
        for sock in idle:
            sock.close()


def test_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "h.sock"
    loop = EventLoop()
    health = HealthListener(loop, f"unix:{path}", lambda: READY)
    health.start()
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(b"agent\n")
            deadline = time.monotonic() + 10
            data = b""
            while not data.endswith(b"\n") and time.monotonic() < deadline:
                loop.run_once(0.05)
                try:
                    sock.setblocking(False)
                    data += sock.recv(100)
                except BlockingIOError:
                    pass
            assert data == b"up ready 75%\n"
    finally:
        health.close()
        loop.close()
    assert not path.exists()


def test_a_bind_it_cannot_open_is_named() -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    with taken:
        host, port = taken.getsockname()
        loop = EventLoop()
        with pytest.raises(HealthError, match=f"health_bind: bind spec '{host}:{port}'"):
            HealthListener(loop, f"{host}:{port}", lambda: READY).start()
        with pytest.raises(HealthError, match="must be an address to bind"):
            HealthListener(loop, "fd://7", lambda: READY).start()
        # The metrics listener is the same code: its errors name its own setting.
        with pytest.raises(HealthError, match=f"metrics_bind: bind spec '{host}:{port}'"):
            HealthListener(loop, f"{host}:{port}", lambda: READY, agent=False).start()
        with pytest.raises(HealthError, match="metrics_bind 'fd://7': must be an address"):
            HealthListener(loop, "fd://7", lambda: READY, agent=False).start()
        loop.close()


def test_free_percent_rounds_up_and_never_says_zero() -> None:
    assert [free_percent(HealthFacts(False, 1, 3, load)) for load in range(5)] == [
        100, 67, 34, 1, 1]
    assert agent_reply(HealthFacts(False, 1, 0, 0)).startswith(b"down #")
