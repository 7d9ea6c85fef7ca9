"""The load generator counts answers and failures honestly."""

import socket
import socketserver
import threading

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
