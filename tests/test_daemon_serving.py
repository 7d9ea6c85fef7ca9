"""The daemon serves: workers forked, load spread, queueing, every handler form."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import socket
from pathlib import Path

import pytest

from forkserver import control
from forkserver.workers.sync import PREFETCH as SYNC_PREFETCH
from tests.support import TIMEOUT, Daemon, poll_until, read_line, recv_all, start_daemon


def request(daemon: Daemon, data: bytes = b"") -> bytes:
    with daemon.connect() as sock:
        if data:
            sock.sendall(data)
        return recv_all(sock)


def test_workers_are_forked_and_titled() -> None:
    with start_daemon("tests.handlers.basic:pid", "--name", "web", workers=3) as daemon:
        workers = daemon.workers()
        assert len(workers) == 3
        titles = sorted(" ".join(w.cmdline()) for w in workers)
        assert [t.split(" (")[0] for t in titles] == [
            f"forkserver: worker {n} [web] tests.handlers.basic:pid" for n in range(3)
        ]
        master = " ".join(daemon.workers()[0].parent().cmdline())
        host, port = daemon.address
        assert master.startswith(f"forkserver: master [web] listening on {host}:{port}")
        daemon.wait_log("master_ready")  # READY=1 may come before the log lines are read
        spawned = {r["pid"] for r in daemon.records("worker_spawned")}
        assert spawned == {w.pid for w in workers}


def test_hundreds_of_concurrent_connections_are_all_served_by_every_worker() -> None:
    count = 400
    with start_daemon("tests.handlers.basic:gate", workers=2) as daemon:
        clients = [daemon.connect(timeout=20) for _ in range(count)]
        try:
            for i, sock in enumerate(clients):
                sock.sendall(b"%d" % i)
            replies = [recv_all(sock).split() for sock in clients]
        finally:
            for sock in clients:
                sock.close()
    assert [int(reply[1]) for reply in replies] == list(range(count))
    pids = {int(reply[0]) for reply in replies}
    assert len(pids) == 2


def test_connections_queue_while_every_worker_is_busy_and_are_served_later() -> None:
    # Each sync worker holds one and has PREFETCH queued; 3 more fill the master's queue,
    # and 4 wait in the kernel's.
    count = 2 * (1 + SYNC_PREFETCH) + 3 + 4
    with start_daemon(
        "tests.handlers.basic:gate", "--max-pending-connections", "3", workers=2
    ) as daemon:
        # One accept batch meets them all (arrivals after the first to queue would
        # wait in the kernel's queue anyway).
        held = daemon.connect_together(count)
        try:
            paused = daemon.wait_log("accept_paused")
            assert paused["pending"] == 3
            assert paused["level"] == "info"  # the kernel backlog holding the rest is normal
            # Nobody has been answered: two are in workers, the rest wait.
            for sock in held:
                sock.setblocking(False)
                with pytest.raises(BlockingIOError):
                    sock.recv(1)
                sock.setblocking(True)
            for i, sock in enumerate(held):
                sock.sendall(b"%d" % i)
            replies = [recv_all(sock).split()[1] for sock in held]
        finally:
            for sock in held:
                sock.close()
        assert replies == [b"%d" % i for i in range(count)]
        daemon.wait_log("accept_resumed")


@pytest.mark.parametrize(
    ("handler", "args"),
    [
        ("forkserver.examples.echo:handle", ()),
        ("forkserver.examples.echo:handle", ("--worker-class", "thread", "--concurrency", "4")),
        ("forkserver.examples.async_echo:handle", ()),
        ("tests.handlers.basic:async_pid", ("--concurrency", "8")),
    ],
)
def test_sync_thread_and_async_handlers_serve(handler: str, args: tuple[str, ...]) -> None:
    with start_daemon(handler, *args, workers=1) as daemon:
        clients = [daemon.connect() for _ in range(6)]
        try:
            for i, sock in enumerate(clients):
                sock.sendall(b"line %d\n" % i)
                sock.shutdown(socket.SHUT_WR)
            replies = [recv_all(sock) for sock in clients]
        finally:
            for sock in clients:
                sock.close()
    for i, reply in enumerate(replies):
        assert reply.endswith(b"line %d\n" % i)


def test_a_request_handler_class_serves_files_with_simple_http_request_handler(
    tmp_path: Path,
) -> None:
    (tmp_path / "hello.txt").write_text("hello from a file\n")
    with start_daemon(
        "http.server:SimpleHTTPRequestHandler", "--worker-class", "thread", workers=1, cwd=tmp_path
    ) as daemon:
        host, port = daemon.address
        for _ in range(3):
            conn = http.client.HTTPConnection(host, port, timeout=5)
            try:
                conn.request("GET", "/hello.txt")
                response = conn.getresponse()
                assert response.status == 200
                assert response.read() == b"hello from a file\n"
                conn.request("GET", "/missing")
                assert conn.getresponse().status == 404
            finally:
                conn.close()


def test_a_socketserver_request_handler_runs_on_sync_workers() -> None:
    with start_daemon("tests.handlers.basic:PidRequestHandler", workers=1) as daemon:
        pid = int(request(daemon))
        assert pid == daemon.workers()[0].pid


def test_hello_http_answers_keep_alive_and_close() -> None:
    for handler in ("handle", "async_handle"):
        with start_daemon(f"forkserver.examples.hello_http:{handler}", workers=1) as daemon:
            host, port = daemon.address
            conn = http.client.HTTPConnection(host, port, timeout=5)
            try:
                for _ in range(3):  # one connection, three requests
                    conn.request("GET", "/")
                    response = conn.getresponse()
                    assert response.status == 200
                    assert response.read() == b"Hello, world!\n"
                conn.request("GET", "/", headers={"Connection": "close"})
                response = conn.getresponse()
                assert response.getheader("Connection") == "close"
                assert response.read() == b"Hello, world!\n"
            finally:
                conn.close()


async def _keep_alive_clients(address: tuple[str, int], count: int, timeout: float) -> set[int]:
    """*count* clients asking over keep-alive, as wrk does, until each had an answer.

    A client whose connection the server closes opens another.  Returns
    the clients answered; the wait ends early only when all of them were.
    """
    answered: set[int] = set()
    everyone = asyncio.Event()

    async def client(index: int) -> None:
        while not everyone.is_set():
            reader, writer = await asyncio.open_connection(*address)
            try:
                while not everyone.is_set():
                    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                    answered.add(index)
                    if len(answered) == count:
                        everyone.set()
                    if b"Connection: close" in head:
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # closed between two requests: connect again
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    tasks = [asyncio.create_task(client(index)) for index in range(count)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(everyone.wait(), timeout)
    everyone.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return answered


def test_more_keep_alive_clients_than_sync_workers_are_each_answered_in_turn() -> None:
    """A keep-alive client holds its sync worker for a bounded number of requests only.

    However slow the machine, every client gets its turn; one that held
    its worker for ever would leave the others unanswered for as long as
    the test waits.
    """
    clients = 20
    with start_daemon("forkserver.examples.hello_http:handle", workers=2) as daemon:
        answered = asyncio.run(_keep_alive_clients(daemon.address, clients, timeout=3 * TIMEOUT))
        assert daemon.stop() == 0
    assert sorted(set(range(clients)) - answered) == [], "clients never answered"


def test_workers_hold_only_their_channel_the_standard_streams_and_connections() -> None:
    with start_daemon("tests.handlers.basic:fds", workers=2) as daemon:
        listener_inode = os.fstat(daemon.listener.fileno()).st_ino
        master_fds = set(os.listdir(f"/proc/{daemon.pid}/fd"))
        master_sockets = {
            os.readlink(f"/proc/{daemon.pid}/fd/{fd}") for fd in master_fds
        } - {f"socket:[{listener_inode}]"}
        seen = {}
        while len(seen) < 2:
            report = json.loads(request(daemon))
            seen[report["pid"]] = report
    channels = set()
    for report in seen.values():
        table = report["fds"]
        me = str(report["me"])
        assert table.pop(me).startswith("socket:")  # the connection being served
        for fd in ("0", "1", "2"):
            table.pop(fd)
        sockets = [target for target in table.values() if target.startswith("socket:")]
        assert len(sockets) == 1, table  # its own channel, nothing else
        assert sockets[0] != f"socket:[{listener_inode}]"
        channels.add(sockets[0])
        # Everything else is the worker's own wake-up machinery, made after fork,
        # and the write end of its stack-dump pipe.
        others = [t for t in table.values() if not t.startswith("socket:")]
        assert all(t.startswith(("pipe:", "anon_inode:[eventpoll]")) for t in others), table
        assert len(others) <= 4, table
    assert len(channels) == 2  # each worker its own
    assert channels <= master_sockets  # the master keeps a copy to take back undelivered fds


def test_workers_inherit_no_systemd_variables() -> None:
    with start_daemon("tests.handlers.basic:environment", workers=1,
                      env={"WATCHDOG_USEC": "60000000", "MARKER": "kept"}) as daemon:  # fmt: skip
        environ = json.loads(request(daemon))
    assert environ["MARKER"] == "kept"
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
        assert name not in environ


@pytest.mark.parametrize(
    ("handler", "worker_class"),
    [("tests.handlers.basic:hold", "thread"), ("tests.handlers.basic:async_hold", "asyncio")],
)
def test_a_worker_serves_up_to_its_concurrency_at_once_and_no_more(
    handler: str, worker_class: str, tmp_path: Path
) -> None:
    path = str(tmp_path / "ctl.sock")
    args = ("--worker-class", worker_class, "--concurrency", "4", "--control-socket", path)
    with start_daemon(handler, *args, workers=1) as daemon:
        clients = [daemon.connect() for _ in range(5)]
        try:
            held = [read_line(sock) for sock in clients[:4]]  # four at once
            assert all(line.endswith(b" held\n") for line in held)
            # The master holds the fifth (it is not merely late on a slow machine).
            poll_until(lambda: control.request(path, "status")["master"]["pending"] == 1,
                       "the master holds the fifth connection")  # fmt: skip
            assert [w["in_flight"] for w in control.request(path, "status")["workers"]] == [4]
            clients[4].setblocking(False)
            with pytest.raises(BlockingIOError):  # the fifth waits in the master
                clients[4].recv(1)
            clients[4].setblocking(True)
            clients[0].sendall(b"done")
            assert recv_all(clients[0]).endswith(b" done")
            assert read_line(clients[4]).endswith(b" held\n")  # its turn came
            for sock in clients[1:]:
                sock.sendall(b"bye")
                assert recv_all(sock).endswith(b" bye")
        finally:
            for sock in clients:
                sock.close()


def test_a_connection_prefetched_behind_a_long_one_moves_to_a_worker_that_frees_up() -> None:
    with start_daemon("tests.handlers.basic:hold", workers=2) as daemon:
        long_one, short_one = daemon.connect(), daemon.connect()
        behind = daemon.connect()  # both workers busy: prefetched to one of them
        try:
            holders = {int(read_line(sock).split()[0]) for sock in (long_one, short_one)}
            assert len(holders) == 2
            short_one.sendall(b"bye")
            short_pid = int(recv_all(short_one).split()[0])
            # The long one still holds its worker; the one behind it is served anyway.
            assert int(read_line(behind).split()[0]) == short_pid
            behind.sendall(b"served")
            assert recv_all(behind).endswith(b" served")
            long_one.sendall(b"done")
            assert recv_all(long_one).endswith(b" done")
        finally:
            for sock in (long_one, short_one, behind):
                sock.close()
        assert short_pid in holders  # and the long one never let go of the other


def test_with_defer_accept_a_silent_client_does_not_hold_the_only_sync_worker() -> None:
    with start_daemon("tests.handlers.basic:gate", "--defer-accept", "30", workers=1) as daemon:
        with daemon.connect() as silent, daemon.connect() as talking:
            # Without defer_accept the worker would be handed the silent one first
            # and wait for its bytes; now the kernel keeps it until it speaks.
            talking.sendall(b"first")
            assert recv_all(talking).endswith(b" first")
            silent.sendall(b"later")
            assert recv_all(silent).endswith(b" later")
