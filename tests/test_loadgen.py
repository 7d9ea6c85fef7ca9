"""The load generator counts answers and failures honestly."""

import socket
import socketserver
import threading

import pytest

from tests.loadgen import BackgroundLoad, run_load


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read())


def _serve_echo() -> tuple[socketserver.ThreadingTCPServer, threading.Thread]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def test_every_connection_answered_is_counted() -> None:
    server, thread = _serve_echo()
    try:
        port = server.server_address[1]
        result = run_load("127.0.0.1", port, total=200, concurrency=10, deadline=30)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert result.failures == []
    assert (result.attempted, result.answered) == (200, 200)


def test_a_closed_port_counts_every_connection_as_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        # bound but not listening: connects are refused
        result = run_load("127.0.0.1", port, total=5, concurrency=2, deadline=10)
    assert result.answered == 0
    assert result.failures == ["refused"] * 5
    assert result.failure_summary() == "refused x5"


def test_background_load_reports_progress() -> None:
    server, thread = _serve_echo()
    try:
        port = server.server_address[1]
        with BackgroundLoad("127.0.0.1", port, total=100, concurrency=5, deadline=30) as load:
            load.wait_answered(10, timeout=20)
            result = load.join()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert result.answered == 100


def test_an_open_ended_load_runs_until_stopped_and_answers_what_it_started() -> None:
    server, thread = _serve_echo()
    try:
        port = server.server_address[1]
        with BackgroundLoad("127.0.0.1", port, total=None, concurrency=5) as load:
            load.wait_answered(300, timeout=30)
            assert load.running()  # 300 answered, and it goes on: no count ends it
            load.wait_answered(load.answered + 100, timeout=30)
            result = load.stop()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert result.ended_by == "stopped"
    assert result.failures == []
    assert result.answered == result.attempted >= 400


def test_stopping_a_load_that_a_cap_ended_first_fails_the_test() -> None:
    server, thread = _serve_echo()
    try:
        port = server.server_address[1]
        with BackgroundLoad("127.0.0.1", port, total=None, deadline=0) as load:
            with pytest.raises(AssertionError, match="the load ended by itself"):
                load.stop()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_waiting_on_a_load_that_ended_fails_at_once_saying_so() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        with BackgroundLoad("127.0.0.1", port, total=5, concurrency=2, deadline=30) as load:
            with pytest.raises(AssertionError, match=r"the load ended \(by total\) with 0 of 1"):
                load.wait_answered(1, timeout=60)
            assert load.join().failures == ["refused"] * 5
