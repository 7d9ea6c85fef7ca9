"""A real sync worker process on a channel the test holds, serving real connections."""

from __future__ import annotations

import os
import resource
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from forkserver import channel, fdpass
from forkserver.handler import HandlerKind, LoadedHandler
from forkserver.workers.core import EXIT_RUNTIME_ERROR, WorkerContext
from forkserver.workers.reserve import DescriptorReserve
from forkserver.workers.sync import DONE_EVERY, PREFETCH, SyncWorker
from tests.support import TIMEOUT, wait_pid


def answer(conn: socket.socket, peer: object) -> None:
    conn.sendall(b"served %s" % conn.recv(64))


Handler = Callable[[socket.socket, object], None]


@contextmanager
def sync_worker(
    queued: int, handler: Handler = answer, *, nofile: int = 0, exit_code: int = 0
) -> Iterator[tuple[socket.socket, list[socket.socket], socket.socket]]:
    """A sync worker started with *queued* connections already on its channel.

    Yields the master's end of the channel, the client sockets in the
    order their descriptors were queued, and a copy of the worker's end
    (what the worker never read stays there).  *nofile*: the worker's
    soft RLIMIT_NOFILE, with a reserve of one descriptor below it.
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
                slot=0, master_pid=os.getppid(), channel=worker_end, handler_spec="test",
                worker_class="sync", concurrency=1, listener_names=("test",),
                handler=LoadedHandler("test", HandlerKind.FUNCTION, handler),
                heartbeat_interval=3600.0,
            )  # fmt: skip
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE,
                                   (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
                ctx.reserve = DescriptorReserve(1)
            code = SyncWorker(ctx).run()
        finally:
            os._exit(code)
    try:
        yield master, clients, worker_end
    finally:
        master.close()  # end of file: a worker still running exits at once
        worker_end.close()
        assert wait_pid(pid) == exit_code
        for client in clients:
            client.close()


@contextmanager
def sent_one(master: socket.socket, request: bytes) -> Iterator[socket.socket]:
    """One more connection, its *request* written, sent on the worker's channel: its client."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as client:
            client.sendall(request)
            conn, _ = listener.accept()
            assert fdpass.send(master, channel.encode_connections([0]), [conn.fileno()])
            conn.close()
            yield client


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


def test_done_comes_once_per_few_connections_and_when_the_queue_stays_dry() -> None:
    assert DONE_EVERY < PREFETCH  # the master refills before the worker runs dry
    queued = DONE_EVERY + 2
    with sync_worker(queued) as (master, clients, _):
        got = reports(master, queued)
        assert got[0] == channel.Ready(pid=got[0].pid)  # type: ignore[union-attr]
        assert got[1:] == [channel.Done(count=DONE_EVERY), channel.Done(count=2)]
        assert [c.recv(64) for c in clients] == [b"served %d" % i for i in range(queued)]
        # A lone connection is served at once, and reported once the worker has been
        # idle for IDLE_REPORT.
        with sent_one(master, b"alone") as client:
            assert reports(master, 1) == [channel.Done(count=1)]
            assert client.recv(64) == b"served alone"


def test_a_stopping_sync_worker_serves_what_is_queued_and_reports_it_all() -> None:
    with sync_worker(3) as (master, clients, _):
        assert fdpass.send(master, channel.encode(channel.Stop()), [])
        got = reports(master, 3)
        assert isinstance(got[0], channel.Ready)
        assert sum(m.count for m in got[1:] if isinstance(m, channel.Done)) == 3
        assert [c.recv(64) for c in clients] == [b"served %d" % i for i in range(3)]


HELD: list[int] = []  # what the hogs below keep open, in the worker process


def fill_descriptors() -> None:
    """Take every descriptor number left below the soft limit, and keep them."""
    while True:
        try:
            HELD.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return


def hog(conn: socket.socket, peer: object) -> None:
    answer(conn, peer)
    fill_descriptors()


def hog_and_keep(conn: socket.socket, peer: object) -> None:
    answer(conn, peer)
    HELD.append(conn.detach())  # the connection's number stays taken
    fill_descriptors()


def test_a_worker_at_its_limit_serves_on_while_it_frees_each_connection_it_is_sent() -> None:
    """Each connection closed frees the number the next one is received into."""
    with sync_worker(3, hog, nofile=64) as (master, clients, _):
        got = reports(master, 3)
        assert not any(isinstance(m, channel.Leaving) for m in got)
        assert [c.recv(64) for c in clients] == [b"served %d" % i for i in range(3)]


def test_a_worker_whose_handler_keeps_its_connection_leaves_and_loses_none() -> None:
    """No number was freed: the next message is received into the reserve, then none."""
    with sync_worker(3, hog_and_keep, nofile=64, exit_code=EXIT_RUNTIME_ERROR) as (
        master, clients, worker_end,
    ):
        got = reports(master, 2)
        assert any(isinstance(m, channel.Leaving) for m in got)
        # The second was received into the reserve and served; the third stays queued.
        assert [c.recv(64) for c in clients[:2]] == [b"served 0", b"served 1"]
        left = fdpass.drain(worker_end, channel.MAX_MESSAGE_SIZE, fdpass.SCM_MAX_FD)
        assert [channel.decode_master_message(data) for data, _ in left] == [
            channel.Connections(listeners=(0,))]
        fdpass.close_all([fd for _, fds in left for fd in fds])


def test_a_sync_worker_stops_on_sigterm_right_after_a_connection_as_it_waits_for_more() -> None:
    """The TERM lands while the worker waits in its receive (or just before)."""
    with sync_worker(0) as (master, _, worker_end):
        worker_end.close()  # the worker's copy is then the only one: its exit is end of file
        ready = channel.decode_worker_message(master.recv(channel.MAX_MESSAGE_SIZE))
        assert isinstance(ready, channel.Ready)
        with sent_one(master, b"last") as client:
            assert client.recv(64) == b"served last"
            os.kill(ready.pid, signal.SIGTERM)
        got = []
        while data := master.recv(channel.MAX_MESSAGE_SIZE):  # until it exits, by itself
            got.append(channel.decode_worker_message(data))
        assert channel.Done(count=1) in got
