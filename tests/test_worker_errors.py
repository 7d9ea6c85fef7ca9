"""What goes wrong in a handler or in a worker's process is reported, and costs one worker at most.

* A handler raising any ``BaseException`` (``KeyboardInterrupt``,
  ``SystemExit``, ``GeneratorExit``, ``asyncio.CancelledError``, its own
  subclass) is a handler error: reported with its traceback, the
  connection closed, the worker serves on.  Every worker class, every
  handler form.
"""

from __future__ import annotations

import socket

import pytest

from tests.support import Daemon, exchange, start_daemon

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
            with daemon.connect(timeout=10) as sock:
                sock.settimeout(10)
                try:
                    assert sock.recv(10) == b""
                except (ConnectionResetError, socket.timeout):
                    pass
            error = daemon.wait_log("handler_error", exc_type="KeyboardInterrupt")
            assert error["pid"] == worker
        assert daemon.records("worker_exited") == []
