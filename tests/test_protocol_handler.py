"""``asyncio.Protocol`` handlers on asyncio workers, with real daemons and sockets.

The main cases run on both event loops an asyncio worker offers:
asyncio's own and uvloop (``--event-loop uvloop``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.loadgen import run_load
from tests.support import ROOT, read_line, recv_all, start_daemon

LOOPS = pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])

HELLO = "forkserver.examples.hello_http:HelloProtocol"
REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


def _read_response(sock: socket.socket, buffer: bytearray) -> bytes:
    """One response (head and its Content-Length body) from *sock*."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response after {bytes(buffer)!r}"
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(buffer) < end + length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        buffer += chunk
    response = bytes(buffer[: end + length])
    del buffer[: end + length]
    return response


@LOOPS
@pytest.mark.parametrize("dispatch", ["master", "shared"])
def test_hello_protocol_keeps_the_connection_until_asked_to_close(
    dispatch: str, event_loop: str
) -> None:
    args = ("--dispatch", dispatch, "--event-loop", event_loop)
    with start_daemon(HELLO, *args, workers=2) as daemon:
        with daemon.connect() as sock:
            buffer = bytearray()
            for _ in range(3):
                sock.sendall(REQUEST)
                response = _read_response(sock, buffer)
                assert response.startswith(b"HTTP/1.1 200 OK\r\n")
                assert response.endswith(b"\r\n\r\nHello, world!\n")
            sock.sendall(REQUEST * 2)  # pipelined: both answered, in order
            assert _read_response(sock, buffer).startswith(b"HTTP/1.1 200 OK")
            assert _read_response(sock, buffer).startswith(b"HTTP/1.1 200 OK")
            sock.sendall(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            assert b"Connection: close" in _read_response(sock, buffer)
            assert recv_all(sock) == b""  # and the server closed it
        assert daemon.stop(signal.SIGTERM) == 0


def test_a_malformed_request_gets_400_and_the_connection_closes() -> None:
    with start_daemon(HELLO, workers=1) as daemon, daemon.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
        assert recv_all(sock).startswith(b"HTTP/1.1 400 Bad Request")


@LOOPS
def test_a_callback_exception_is_reported_and_the_worker_serves_on(event_loop: str) -> None:
    args = ("--event-loop", event_loop)
    with start_daemon("tests.handlers.protocols:PidLines", *args, workers=1) as daemon:
        worker = daemon.workers()[0].pid
        with daemon.connect() as sock:
            port = sock.getsockname()[1]
            sock.sendall(b"first\n")
            assert read_line(sock) == b"%d first\n" % worker
            sock.sendall(b"boom\n")
            assert recv_all(sock) == b""  # asyncio closed the connection
        error = daemon.wait_log("handler_error")
        assert error["exc_type"] == "ValueError"
        assert error["error"] == "boom requested by the client"
        assert 'raise ValueError("boom requested by the client")' in error["traceback"]
        assert error["peer"] == f"127.0.0.1:{port}"
        assert (error["slot"], error["pid"]) == (0, worker)
        with daemon.connect() as sock:
            sock.sendall(b"again\n")
            assert read_line(sock) == b"%d again\n" % worker
        assert not daemon.records("worker_exited")


@pytest.mark.parametrize(
    ("handler", "send", "exc_type", "message"),
    [
        # nothing sent: the server closes at once, and unread data would make that a reset
        ("BrokenStart", b"", "RuntimeError", "cannot start this connection"),
        ("BrokenEnd", b"quit\n", "RuntimeError", "cannot end this connection"),
    ],
)
def test_errors_in_connection_made_and_lost_are_reported(
    handler: str, send: bytes, exc_type: str, message: str
) -> None:
    with start_daemon(f"tests.handlers.protocols:{handler}", workers=1) as daemon:
        worker = daemon.workers()[0].pid
        with daemon.connect() as sock:
            sock.sendall(send)
            assert recv_all(sock) == b""
        error = daemon.wait_log("handler_error")
        assert (error["exc_type"], error["error"]) == (exc_type, message)
        # The stop reads the log to its end: a worker that died of the error would show.
        assert daemon.stop() == 0
        exits = [(r["pid"], r["exit_code"]) for r in daemon.records("worker_exited")]
        assert exits == [(worker, 0)]


@pytest.mark.parametrize(
    ("handler", "reply"),
    [("SlottedEcho", b"ping\n"), ("BufferedEcho", b"buffered ping\n")],
)
def test_slotted_and_buffered_protocols_run_unchanged(handler: str, reply: bytes) -> None:
    with start_daemon(f"tests.handlers.protocols:{handler}", workers=1) as daemon:
        with daemon.connect() as sock:
            sock.sendall(b"ping\n")
            assert read_line(sock) == reply


@LOOPS
def test_a_connection_counts_as_served_when_it_ends(event_loop: str) -> None:
    """max_requests 2: the worker is replaced after its second connection has closed."""
    args = ("--max-requests", "2", "--event-loop", event_loop)
    with start_daemon("tests.handlers.protocols:PidLines", *args, workers=1) as daemon:
        first = daemon.workers()[0].pid
        with daemon.connect() as one, daemon.connect() as two:
            for sock in (one, two):
                sock.sendall(b"hi\n")
                assert read_line(sock) == b"%d hi\n" % first
            one.sendall(b"quit\n")
            assert recv_all(one) == b""
            # One connection over, one open: nothing to recycle yet.
            two.sendall(b"still\n")
            assert read_line(two) == b"%d still\n" % first
            assert not daemon.records("worker_exited")
            two.sendall(b"quit\n")
            assert recv_all(two) == b""
        assert daemon.wait_log("worker_exited", pid=first)["exit_code"] == 0
        with daemon.connect() as sock:
            sock.sendall(b"new\n")
            assert int(read_line(sock).split()[0]) != first


@LOOPS
def test_graceful_stop_waits_for_an_open_protocol_connection(event_loop: str) -> None:
    args = ("--event-loop", event_loop)
    with start_daemon("tests.handlers.protocols:PidLines", *args, workers=1) as daemon:
        with daemon.connect() as sock:
            sock.sendall(b"before\n")
            worker = int(read_line(sock).split()[0])
            daemon.proc.send_signal(signal.SIGTERM)
            daemon.wait_log("master_stopping")
            sock.sendall(b"during\n")  # still served while the daemon drains
            assert read_line(sock) == b"%d during\n" % worker
            sock.sendall(b"quit\n")
            assert recv_all(sock) == b""
        assert daemon.proc.wait(timeout=20) == 0
        assert daemon.wait_log("worker_exited", pid=worker)["exit_code"] == 0



@pytest.mark.parametrize(("event_loop", "module"), [("asyncio", b"asyncio"), ("uvloop", b"uvloop")])
def test_the_worker_runs_the_event_loop_asked_for(event_loop: str, module: bytes) -> None:
    args = ("--event-loop", event_loop)
    with start_daemon("tests.handlers.protocols:LoopName", *args, workers=1) as daemon:
        with daemon.connect() as sock:
            assert recv_all(sock).strip().split(b".")[0] == module


@pytest.mark.parametrize("dispatch", ["master", "shared"])
def test_stream_handlers_run_on_uvloop_too(dispatch: str) -> None:
    args = ("--event-loop", "uvloop", "--dispatch", dispatch)
    with start_daemon("forkserver.examples.async_echo:handle", *args, workers=2) as daemon:
        result = run_load(*daemon.address, total=400, concurrency=16, deadline=60)
        assert result.failures == [], result.failure_summary()
        assert result.answered == 400
        assert daemon.stop() == 0


def test_uvloop_asked_for_but_not_installed_stops_start_up_with_78() -> None:
    # sys.modules[name] = None is how Python itself marks a module as unimportable.
    code = ("import sys, runpy; sys.modules['uvloop'] = None; sys.argv[0] = 'forkserver'; "
            "runpy.run_module('forkserver', run_name='__main__', alter_sys=True)")
    argv = [sys.executable, "-c", code, "run", "--bind", "127.0.0.1:0", "--log-format", "json",
            "--event-loop", "uvloop", HELLO]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 78, done.stderr
    failure = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")][-1]
    assert failure["event"] == "master_failed"
    assert "the uvloop package is not installed" in failure["message"]
    assert "forkserver[uvloop]" in failure["message"]


@LOOPS
def test_a_worker_keeps_no_descriptor_of_a_finished_connection(event_loop: str) -> None:
    """Attaching a protocol hands the socket to the loop: nothing stays open after it."""
    args = ("--event-loop", event_loop)
    with start_daemon(HELLO, *args, workers=1) as daemon:
        worker = daemon.workers()[0].pid

        def serve(count: int) -> None:
            for _ in range(count):
                with daemon.connect() as sock:
                    sock.sendall(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                    assert recv_all(sock).startswith(b"HTTP/1.1 200 OK")

        serve(20)  # the first connections open what the loop keeps for good
        before = sorted(os.listdir(f"/proc/{worker}/fd"))
        serve(200)
        assert sorted(os.listdir(f"/proc/{worker}/fd")) == before


def test_a_reload_moves_the_workers_to_the_event_loop_in_the_file(tmp_path: Path) -> None:
    config = tmp_path / "forkserver.toml"
    config.write_text('event_loop = "asyncio"\n')
    handler = "tests.handlers.protocols:LoopName"
    with start_daemon(handler, "-c", str(config), workers=1) as daemon:
        with daemon.connect() as sock:
            assert recv_all(sock).strip().split(b".")[0] == b"asyncio"
        config.write_text('event_loop = "uvloop"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed")
        with daemon.connect() as sock:
            assert recv_all(sock).strip() == b"uvloop"
        assert daemon.stop() == 0
