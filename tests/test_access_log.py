"""``access_log``: one line per connection, from the worker that served it."""

from __future__ import annotations

import signal

import pytest

from tests.support import exchange, start_daemon


@pytest.mark.parametrize("dispatch", ["master", "shared"])
@pytest.mark.parametrize(
    ("worker_class", "handler"),
    [
        ("sync", "forkserver.examples.echo:handle"),
        ("thread", "forkserver.examples.echo:handle"),
        ("asyncio", "forkserver.examples.async_echo:handle"),
    ],
)
def test_each_connection_gets_one_access_line(
    worker_class: str, handler: str, dispatch: str
) -> None:
    """The peer is the client's address, from the master's descriptor or the worker's accept."""
    args = ("--access-log", "--worker-class", worker_class, "--dispatch", dispatch)
    with start_daemon(handler, *args, workers=1) as daemon:
        peers = []
        for index in range(3):
            with daemon.connect() as sock:
                host, port = sock.getsockname()[:2]
                peers.append(f"{host}:{port}")
                assert exchange(sock, b"hello %d" % index) == b"hello %d" % index
        for peer in peers:
            line = daemon.wait_log("connection_served", peer=peer)
            assert line["slot"] == 0
            assert line["ok"] is True
            assert line["duration_ms"] >= 0
            assert line["listener"].startswith("fd://")
        assert daemon.stop(signal.SIGTERM) == 0
        assert len(daemon.records("connection_served")) == 3


def test_a_handler_error_is_marked_in_the_access_line() -> None:
    with start_daemon("tests.handlers.basic:boom", "--access-log", workers=1) as daemon:
        with daemon.connect() as sock:
            host, port = sock.getsockname()[:2]
            peer = f"{host}:{port}"
            exchange(sock, b"boom")
        line = daemon.wait_log("connection_served", peer=peer)
        assert line["ok"] is False


def test_no_access_lines_unless_asked() -> None:
    with start_daemon("forkserver.examples.echo:handle", workers=1) as daemon:
        for _ in range(3):
            with daemon.connect() as sock:
                assert exchange(sock, b"quiet") == b"quiet"
        # the stop waits for the worker to exit, so every line it wrote is in
        assert daemon.stop(signal.SIGTERM) == 0
        assert daemon.records("worker_exited"), "the logs were read to the end"
        assert daemon.records("connection_served") == []


@pytest.mark.parametrize(
    ("worker_class", "handler"),
    [("sync", "tests.handlers.basic:boom"), ("asyncio", "tests.handlers.basic:async_boom")],
)
def test_the_access_line_follows_access_log_format(worker_class: str, handler: str) -> None:
    fmt = "{status} {exc_type} peer={peer} worker={worker} pid={pid} {duration_ms:.0f}ms {{x}}"
    args = ("--access-log", "--access-log-format", fmt, "--worker-class", worker_class)
    with start_daemon(handler, *args, workers=1) as daemon:
        [worker] = daemon.workers()
        lines = {}
        for payload in (b"fine", b"boom"):
            with daemon.connect() as sock:
                host, port = sock.getsockname()[:2]
                exchange(sock, payload)
            lines[payload] = daemon.wait_log("connection_served", peer=f"{host}:{port}")
        ok, failed = lines[b"fine"], lines[b"boom"]
        assert ok["message"].startswith(f"ok - peer={ok['peer']} worker=0 pid={worker.pid} ")
        assert ok["message"].endswith("ms {x}")
        assert failed["message"].startswith("error ValueError peer=")
        assert (ok["ok"], failed["ok"]) == (True, False)  # the JSON fields are as always
        assert daemon.stop(signal.SIGTERM) == 0


def test_the_default_access_line_is_unchanged() -> None:
    with start_daemon("tests.handlers.basic:boom", "--access-log", workers=1) as daemon:
        with daemon.connect() as sock:
            host, port = sock.getsockname()[:2]
            exchange(sock, b"boom")
        line = daemon.wait_log("connection_served", peer=f"{host}:{port}")
        assert line["message"].startswith(f"{line['listener']} {host}:{port} worker 0 ")
        assert line["message"].endswith(" ms (handler error)")


def test_an_unknown_access_log_field_is_refused_at_load() -> None:
    with start_daemon("forkserver.examples.echo:handle", "--access-log-format", "{peer} {bytes}",
                      wait_ready=False) as daemon:
        assert daemon.proc.wait(timeout=20) == 64
        daemon.logs.wait_eof(20)
        assert "unknown field 'bytes'" in daemon.logs.text()
