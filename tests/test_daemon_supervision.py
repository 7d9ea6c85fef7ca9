"""Supervision with real processes: deaths, errors, bad messages, parent death."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests.support import (
    ROOT,
    channel_backlog,
    poll_until,
    read_line,
    recv_all,
    start_daemon,
    wait_gone,
)


def test_a_worker_killed_mid_connection_is_reported_and_replaced_and_queued_ones_served() -> None:
    with start_daemon("tests.handlers.basic:hold", workers=1) as daemon:
        first = daemon.connect()
        queued = []
        try:
            old_pid = int(read_line(first).split()[0])  # the worker holds it now
            queued = [daemon.connect() for _ in range(5)]
            os.kill(old_pid, signal.SIGKILL)
            exited = daemon.wait_log("worker_exited", pid=old_pid)
            assert exited["exit_code"] == -signal.SIGKILL
            assert "killed by SIGKILL" in exited["message"]
            assert exited["slot"] == 0
            try:  # the worker died holding it: end of file or a reset
                leftover = recv_all(first)
            except ConnectionResetError:
                leftover = b""
            assert leftover == b""
            replies = []
            for i, sock in enumerate(queued):
                held = read_line(sock).split()
                sock.sendall(b"%d" % i)
                replies.append((int(held[0]), recv_all(sock).split()[1]))
        finally:
            first.close()
            for sock in queued:
                sock.close()
        new_pids = {pid for pid, _ in replies}
        assert len(new_pids) == 1
        assert old_pid not in new_pids
        assert [data for _, data in replies] == [b"%d" % i for i in range(5)]
        spawned = daemon.wait_log("worker_spawned", slot=0, pid=new_pids.pop())
        assert spawned["pid"] != old_pid


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to see channel queues")
def test_descriptors_queued_to_a_worker_that_dies_go_to_its_replacement() -> None:
    args = ("--worker-class", "thread", "--concurrency", "4")
    with start_daemon("tests.handlers.basic:gate", *args, workers=1) as daemon:
        worker = daemon.workers()[0].pid
        os.kill(worker, signal.SIGSTOP)  # alive, but not receiving
        clients = [daemon.connect() for _ in range(4)]
        try:
            poll_until(lambda: channel_backlog(worker) > 0, "descriptors queued to the worker")
            os.kill(worker, signal.SIGKILL)
            exited = daemon.wait_log("worker_exited", pid=worker)
            assert exited["reclaimed"] == 4
            for i, sock in enumerate(clients):
                sock.sendall(b"%d" % i)
            replies = [recv_all(sock).split() for sock in clients]
        finally:
            for sock in clients:
                sock.close()
        assert [reply[1] for reply in replies] == [b"%d" % i for i in range(4)]
        assert {int(reply[0]) for reply in replies} != {worker}


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to see channel queues")
def test_a_sync_worker_that_dies_with_a_prefetched_connection_loses_nothing() -> None:
    with start_daemon("tests.handlers.basic:hold", workers=1) as daemon:
        busy = daemon.connect()
        prefetched = daemon.connect()
        try:
            worker = int(read_line(busy).split()[0])  # it serves the first
            poll_until(lambda: channel_backlog(worker) > 0, "the next one queued to the worker")
            os.kill(worker, signal.SIGKILL)
            exited = daemon.wait_log("worker_exited", pid=worker)
            assert exited["reclaimed"] == 1
            replacement = int(read_line(prefetched).split()[0])
            prefetched.sendall(b"still here")
            assert recv_all(prefetched) == b"%d still here" % replacement
        finally:
            busy.close()
            prefetched.close()
        assert replacement != worker


def test_a_handler_exception_is_reported_with_its_traceback_and_the_worker_serves_on() -> None:
    with start_daemon("tests.handlers.basic:boom", workers=1) as daemon:
        worker = daemon.workers()[0].pid
        with daemon.connect() as sock:
            port = sock.getsockname()[1]
            sock.sendall(b"boom")
            assert recv_all(sock) == b""
        error = daemon.wait_log("handler_error")
        assert error["exc_type"] == "ValueError"
        assert error["error"] == "boom requested by the client"
        assert 'raise ValueError("boom requested by the client")' in error["traceback"]
        assert error["traceback"].startswith("Traceback (most recent call last):")
        assert error["peer"] == f"127.0.0.1:{port}"
        assert error["listener"].startswith("fd://")
        assert (error["slot"], error["pid"]) == (0, worker)
        with daemon.connect() as sock:
            sock.sendall(b"fine")
            assert int(recv_all(sock)) == worker
        assert not daemon.records("worker_exited")


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        ("corrupt_channel", "unknown message type 0x7f"),
        ("oversized_done", "reported 1000 done but holds 1"),
        ("oversized_message", "message longer than 65536 bytes"),
    ],
)
def test_a_worker_breaking_the_channel_protocol_is_replaced_and_the_master_lives(
    handler: str, reason: str
) -> None:
    with start_daemon(f"tests.handlers.basic:{handler}", workers=1) as daemon:
        worker = daemon.workers()[0].pid
        with daemon.connect() as sock:
            recv_all(sock)
        error = daemon.wait_log("protocol_error", pid=worker)
        assert reason in error["reason"]
        exited = daemon.wait_log("worker_exited", pid=worker)
        assert exited["exit_code"] == -signal.SIGKILL
        replacement = daemon.logs.wait_for(
            lambda r: r.get("event") == "worker_ready" and r.get("pid") != worker,
            20,
            "a replacement worker ready",
        )
        assert daemon.proc.poll() is None
        assert [w.pid for w in daemon.workers()] == [replacement["pid"]]


def run_handler(handler: str, *args: str) -> subprocess.CompletedProcess[str]:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        fd = listener.fileno()
        return subprocess.run(
            [sys.executable, "-m", "forkserver", "run", "--bind", f"fd://{fd}",
             "--log-format", "json", "--workers", "2", *args, handler],
            check=False, pass_fds=[fd], cwd=ROOT, capture_output=True, text=True, timeout=60,
            start_new_session=True,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        ("tests.handlers.broken_import:handle", "this module refuses to be imported"),
        ("tests.handlers.no_such_module:handle", "no module named 'tests.handlers.no_such_module'"),
        ("tests.handlers.basic:no_such_function", "has no 'no_such_function'"),
        ("tests.handlers.basic:MessageType", "neither a socketserver.BaseRequestHandler nor"),
    ],
)
def test_a_handler_that_cannot_be_loaded_stops_start_up_before_any_fork(
    handler: str, message: str
) -> None:
    result = run_handler(handler)
    assert result.returncode == 78, result.stderr
    assert message in result.stderr
    assert "cannot start" in result.stderr
    assert "worker_spawned" not in result.stderr


def test_with_preload_an_import_error_is_logged_with_its_traceback_before_any_fork() -> None:
    result = run_handler("tests.handlers.broken_import:handle", "--preload")
    assert result.returncode == 78, result.stderr
    record = json.loads(result.stderr.strip().splitlines()[-1])
    assert record["event"] == "master_failed"
    assert "RuntimeError: this module refuses to be imported" in record["exc"]
    assert "worker_spawned" not in result.stderr


def test_a_worker_class_that_cannot_run_the_handler_is_refused() -> None:
    result = run_handler("forkserver.examples.async_echo:handle", "--worker-class", "sync")
    assert result.returncode == 78, result.stderr
    assert "needs --worker-class asyncio, not sync" in result.stderr


def test_killing_the_master_with_sigkill_leaves_no_worker_behind() -> None:
    with start_daemon("tests.handlers.basic:pid", workers=3) as daemon:
        workers = [w.pid for w in daemon.workers()]
        assert len(workers) == 3
        os.kill(daemon.pid, signal.SIGKILL)
        wait_gone(workers)


def test_the_master_descriptor_count_does_not_grow_over_thousands_of_connections() -> None:
    def serve(count: int) -> None:
        for start in range(0, count, 50):
            batch = [daemon.connect() for _ in range(min(50, count - start))]
            try:
                for sock in batch:
                    assert recv_all(sock)
            finally:
                for sock in batch:
                    sock.close()

    with start_daemon("tests.handlers.basic:pid", workers=2) as daemon:
        serve(100)
        before = sorted(os.listdir(f"/proc/{daemon.pid}/fd"))
        serve(3000)
        after = sorted(os.listdir(f"/proc/{daemon.pid}/fd"))
    assert after == before


def test_sigterm_lets_workers_finish_what_they_hold_then_exits_zero() -> None:
    with start_daemon("tests.handlers.basic:hold", workers=1) as daemon:
        with daemon.connect() as sock:
            worker = int(read_line(sock).split()[0])
            daemon.proc.send_signal(signal.SIGTERM)
            daemon.wait_log("master_stopping")
            sock.sendall(b"finish")
            assert recv_all(sock) == b"%d finish" % worker
        assert daemon.proc.wait(timeout=20) == 0
        assert daemon.wait_log("worker_exited", pid=worker)["exit_code"] == 0


def test_a_second_sigint_stops_at_once() -> None:
    with start_daemon("tests.handlers.basic:hold", workers=1) as daemon:
        with daemon.connect() as sock:
            worker = int(read_line(sock).split()[0])
            daemon.proc.send_signal(signal.SIGINT)
            daemon.wait_log("master_stopping")
            assert daemon.proc.poll() is None  # still waiting for the held connection
            daemon.proc.send_signal(signal.SIGINT)
            assert daemon.proc.wait(timeout=20) == 0
            exited = daemon.wait_log("worker_exited", pid=worker)
            assert exited["exit_code"] == -signal.SIGKILL


def test_a_worker_that_keeps_crashing_is_replaced_with_a_doubling_delay() -> None:
    with start_daemon("tests.handlers.worker_boot_failure:handle", workers=1,
                      wait_ready=False) as daemon:  # fmt: skip
        delays = [daemon.wait_log("worker_backoff", delay=d)["delay"] for d in (0.1, 0.2, 0.4)]
        assert delays == [0.1, 0.2, 0.4]
        exits = daemon.records("worker_exited")
        assert all(r["exit_code"] == 3 for r in exits)
        assert "this handler fails in workers" in daemon.logs.text()
        assert daemon.proc.poll() is None


def test_a_worker_silent_for_longer_than_the_timeout_is_killed_and_replaced() -> None:
    with start_daemon("tests.handlers.basic:hold", "--timeout", "0.5", workers=1) as daemon:
        with daemon.connect() as sock:
            stuck = int(read_line(sock).split()[0])  # busy in a handler: no heartbeats
            timeout = daemon.wait_log("worker_timeout", pid=stuck)
            assert "silent for" in timeout["reason"]
            exited = daemon.wait_log("worker_exited", pid=stuck)
            assert exited["exit_code"] in (-signal.SIGABRT, -signal.SIGKILL)
            dump = daemon.wait_log("worker_stack_dump", pid=stuck)["stack"]  # on ABRT
            assert "most recent call first" in dump
            assert 'tests/handlers/basic.py", line' in dump
            assert " in hold" in dump
        with daemon.connect() as sock:
            # Sent before the handler asks: a handler waiting on this test for
            # longer than the 0.5 s timeout would be taken for stuck too.
            sock.sendall(b"quick")
            replacement = int(read_line(sock).split()[0])
            assert recv_all(sock) == b"%d quick" % replacement
        assert replacement != stuck
