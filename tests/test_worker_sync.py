"""A real sync worker process on a channel the test holds, serving real connections."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from forkserver import channel, fdpass
from forkserver.handler import HandlerKind, LoadedHandler
from forkserver.workers.core import WorkerContext
from forkserver.workers.sync import DONE_EVERY, PREFETCH, SyncWorker
from tests.support import TIMEOUT, wait_pid


def answer(conn: socket.socket, peer: object) -> None:
    conn.sendall(b"served %s" % conn.recv(64))


@contextmanager
def sync_worker(queued: int) -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A sync worker started with *queued* connections already on its channel.

    Yields the master's end of the channel and the client sockets, in the
    order their descriptors were queued.
    """
    master, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    master.settimeout(TIMEOUT)
    clients: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for i in range(queued):
            clients.append(socket.create_connection(listener.getsockname(), timeout=TIMEOUT))
            clients[-1].sendall(b"%d" % i)
            conn, _ = listener.accept()
            assert fdpass.send(master, channel.encode_connections([0]), [conn.fileno()])
            conn.close()
    pid = os.fork()
    if pid == 0:  # the worker
        code = 1
        try:
            master.close()
            ctx = WorkerContext(
                slot=0, master_pid=os.getppid(), channel=worker_end, handler_spec="answer",
                worker_class="sync", concurrency=1, listener_names=("test",),
                handler=LoadedHandler("answer", HandlerKind.FUNCTION, answer),
                heartbeat_interval=3600.0,
            )  # fmt: skip
            code = SyncWorker(ctx).run()
        finally:
            os._exit(code)
    worker_end.close()
    try:
        yield master, clients
    finally:
        master.close()  # end of file: a worker still running exits at once
        assert wait_pid(pid) == 0
        for client in clients:
            client.close()


def reports(master: socket.socket, until: int) -> list[channel.WorkerMessage]:
    """The worker's messages, heartbeats aside, until DONEs add up to *until*."""
    got: list[channel.WorkerMessage] = []
    done = 0
    while done < until:
        message = channel.decode_worker_message(master.recv(channel.MAX_MESSAGE_SIZE))
        if isinstance(message, channel.Heartbeat | channel.Stats):
            continue
        got.append(message)
        if isinstance(message, channel.Done):
            done += message.count
    return got


def test_done_comes_once_per_few_connections_and_when_the_queue_runs_dry() -> None:
    assert DONE_EVERY < PREFETCH  # the master refills before the worker runs dry
    queued = DONE_EVERY + 2
    with sync_worker(queued) as (master, clients):
        got = reports(master, queued)
        assert got[0] == channel.Ready(pid=got[0].pid)  # type: ignore[union-attr]
        assert got[1:] == [channel.Done(count=DONE_EVERY), channel.Done(count=2)]
        assert [c.recv(64) for c in clients] == [b"served %d" % i for i in range(queued)]
        # A lone connection is reported as soon as it is done: the worker is idle again.
        with socket.create_server(("127.0.0.1", 0)) as listener:
            with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as client:
                client.sendall(b"alone")
                conn, _ = listener.accept()
                assert fdpass.send(master, channel.encode_connections([0]), [conn.fileno()])
                conn.close()
                assert reports(master, 1) == [channel.Done(count=1)]
                assert client.recv(64) == b"served alone"


def test_a_stopping_sync_worker_serves_what_is_queued_and_reports_it_all() -> None:
    with sync_worker(3) as (master, clients):
        assert fdpass.send(master, channel.encode(channel.Stop()), [])
        got = reports(master, 3)
        assert isinstance(got[0], channel.Ready)
        assert sum(m.count for m in got[1:] if isinstance(m, channel.Done)) == 3
        assert [c.recv(64) for c in clients] == [b"served %d" % i for i in range(3)]
