"""What goes wrong in a handler or in a worker's process is reported, and costs one worker at most.

* A handler raising any ``BaseException`` (``KeyboardInterrupt``,
  ``SystemExit``, ``GeneratorExit``, ``asyncio.CancelledError``, its own
  subclass) is a handler error: reported with its traceback, the
  connection closed, the worker serves on.  Every worker class, every
  handler form.
* A worker out of descriptors (a handler that leaks them) takes no
  connection it cannot hold: it finishes what it received, says why it
  goes and exits with the runtime-failure code, and what was queued for
  it is served by its successor.
"""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest

from forkserver.workers.core import EXIT_RUNTIME_ERROR
from tests.support import Daemon, exchange, read_line, start_daemon

NAMES = ("KeyboardInterrupt", "SystemExit", "GeneratorExit", "CancelledError", "Custom")
EXC_TYPES = {
    "KeyboardInterrupt": "KeyboardInterrupt",
    "SystemExit": "SystemExit",
    "GeneratorExit": "GeneratorExit",
    "CancelledError": "asyncio.exceptions.CancelledError",
    "Custom": "tests.handlers.escapes.Custom",
}
FORMS = [
    ("sync", "handle", ()),
    ("sync", "RequestHandler", ()),
    ("thread", "handle", ()),
    ("thread", "RequestHandler", ()),
    ("asyncio", "async_handle", ()),
    ("asyncio", "Lines", ()),
    ("asyncio", "async_handle", ("--event-loop", "uvloop")),
    ("asyncio", "Lines", ("--event-loop", "uvloop")),
]


def ask(daemon: Daemon, line: bytes) -> bytes:
    with daemon.connect(timeout=10) as sock:
        try:
            return exchange(sock, line + b"\n")
        except ConnectionResetError:
            return b""


@pytest.mark.parametrize(("worker_class", "handler", "args"), FORMS)
def test_a_handler_raising_any_base_exception_is_reported_and_the_worker_serves_on(
    worker_class: str, handler: str, args: tuple[str, ...]
) -> None:
    spec = f"tests.handlers.escapes:{handler}"
    with start_daemon(spec, "--worker-class", worker_class, *args, workers=1) as daemon:
        (worker,) = [p.pid for p in daemon.workers()]
        for name in NAMES:
            assert ask(daemon, name.encode()) == b""  # closed, nothing answered
            error = daemon.wait_log("handler_error", exc_type=EXC_TYPES[name])
            assert error["pid"] == worker
            assert f"{name} raised by the handler" in error["traceback"]
        assert ask(daemon, b"ok") == b"%d\n" % worker
        assert daemon.records("worker_exited") == []
        assert [p.pid for p in daemon.workers()] == [worker]


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_a_protocol_raising_keyboard_interrupt_in_connection_made_is_reported(
    event_loop: str,
) -> None:
    spec = "tests.handlers.escapes:RaisingStart"
    with start_daemon(spec, "--event-loop", event_loop, workers=1) as daemon:
        (worker,) = [p.pid for p in daemon.workers()]
        for _ in range(2):
            with daemon.connect(timeout=10) as sock, contextlib.suppress(ConnectionResetError):
                assert sock.recv(10) == b""  # closed at once
            error = daemon.wait_log("handler_error", exc_type="KeyboardInterrupt")
            assert error["pid"] == worker
        assert daemon.records("worker_exited") == []


@pytest.mark.parametrize(("worker_class", "handler"), [
    ("sync", "handle"), ("thread", "handle"), ("asyncio", "async_handle"),
])  # fmt: skip
def test_a_worker_out_of_descriptors_hands_its_queue_back_and_every_client_is_answered(
    worker_class: str, handler: str
) -> None:
    """A leak takes every descriptor: the worker serves what it received, then leaves.

    It names the cause and says LEAVING, so the master takes back what is
    queued for it at once and starts its successor, which serves the
    rest while the leaky worker still holds a connection (the coroutine
    form); it exits with the runtime-failure code once that is over.
    """
    spec = f"tests.handlers.descriptors:{handler}"
    args = ("--worker-class", worker_class, "--concurrency", "4")
    with start_daemon(spec, *args, workers=1) as daemon:
        (leaky,) = [p.pid for p in daemon.workers()]
        hog = daemon.connect(timeout=20)
        try:
            hog.sendall(b"hog\n")
            assert read_line(hog).startswith(b"%d leaked " % leaky)
            clients = [daemon.connect(timeout=20) for _ in range(12)]
            try:
                for sock in clients:
                    sock.sendall(b"pid\n")
                answers = [int(exchange(sock, b"")) for sock in clients]
            finally:
                for sock in clients:
                    sock.close()
            assert leaky in answers  # it served what reached it before it saw its limit
            assert len(set(answers)) == 2  # and its successor served the rest
            cause = daemon.wait_log("worker_out_of_descriptors", pid=leaky)
            assert "out of descriptors" in cause["message"]
            assert cause["lost"] == 0
            recycled = daemon.wait_log("worker_recycled", pid=leaky)
            assert "is out of descriptors (RLIMIT_NOFILE" in recycled["reason"]
        finally:
            hog.close()
        exited = daemon.wait_log("worker_exited", pid=leaky)
        assert exited["exit_code"] == EXIT_RUNTIME_ERROR
        assert "runtime failure" in exited["message"]
        assert daemon.records("worker_exited") == [exited]


def test_a_tcp_peer_that_reset_before_it_was_served_is_unknown_not_unix() -> None:
    """getpeername fails on a connection already reset: the peer is unknown, not "unix"."""
    with start_daemon("tests.handlers.basic:gate", "--access-log", workers=1) as daemon:
        with daemon.connect() as first:  # holds the only worker until it sends a line
            second = daemon.connect()
            second.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            second.close()  # a reset, before the worker has looked at it
            first.sendall(b"go")
            assert exchange(first, b"").endswith(b" go")
        error = daemon.wait_log("handler_error", exc_type="ConnectionResetError")
        assert error["peer"] == "unknown"
        assert "(peer unknown," in error["message"]
        served = daemon.wait_log("connection_served", ok=False)
        assert served["peer"] == "unknown"
