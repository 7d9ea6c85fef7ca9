"""The worker's side of the channel and its error reports, on real sockets."""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from forkserver import channel, fdpass
from forkserver.handler import HandlerKind, LoadedHandler
from forkserver.workers.core import (
    ChannelClosed,
    WorkerChannel,
    WorkerContext,
    error_report,
    format_peer,
    serve_blocking,
)
from forkserver.workers.reserve import DescriptorReserve
from tests.support import TIMEOUT, wait_pid


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, WorkerChannel]]:
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with master, worker:
        yield master, WorkerChannel(worker)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_connections_arrive_with_their_descriptors(
    pair: tuple[socket.socket, WorkerChannel],
) -> None:
    master, chan = pair
    assert chan.receive() == []  # nothing queued: no blocking
    r, w = os.pipe()
    try:
        assert fdpass.send(master, channel.encode_connections([2, 5]), [r, w])
        assert fdpass.send(master, channel.encode(channel.Stop()), [])
        (first, fds), (second, none) = chan.receive()
        assert first == channel.Connections(listeners=(2, 5))
        assert len(fds) == 2
        assert second == channel.Stop()
        assert none == []
        fdpass.close_all(fds)
    finally:
        os.close(r)
        os.close(w)


def test_a_count_that_does_not_match_the_descriptors_is_refused_and_closes_them(
    pair: tuple[socket.socket, WorkerChannel],
) -> None:
    master, chan = pair
    r, w = os.pipe()
    try:
        assert fdpass.send(master, channel.encode_connections([0, 0, 0]), [r])
        before = open_fds()
        with pytest.raises(channel.ProtocolError, match="came with 1 descriptors, expected 3"):
            chan.receive()
        assert open_fds() == before
    finally:
        os.close(r)
        os.close(w)


def test_the_master_going_away_is_channel_closed(
    pair: tuple[socket.socket, WorkerChannel],
) -> None:
    master, chan = pair
    master.close()
    with pytest.raises(ChannelClosed):
        chan.receive()
    with pytest.raises(ChannelClosed):
        chan.send(channel.Heartbeat())


def test_a_receive_after_a_freed_number_waits_out_its_bound_and_no_other_does(
    pair: tuple[socket.socket, WorkerChannel],
) -> None:
    master, chan = pair
    bound = 0.2
    chan.wait_after_freed(bound)
    started = time.monotonic()
    assert chan.receive_one(freed=True) is None  # nothing came within the bound
    assert time.monotonic() - started >= bound * 0.99  # the kernel's timer, not a fast path
    chan.wait_after_freed(TIMEOUT)  # were a plain receive to wait, it would time out
    started = time.monotonic()
    assert chan.receive_one() is None
    assert chan.receive() == []
    assert time.monotonic() - started < TIMEOUT
    master.close()  # the master going away ends a wait at once
    with pytest.raises(ChannelClosed):
        chan.receive_one(freed=True)


def test_a_waiting_receive_takes_the_message_sent_while_it_waits(
    pair: tuple[socket.socket, WorkerChannel],
) -> None:
    master, chan = pair
    chan.wait_after_freed(TIMEOUT)
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=fdpass.send,
                                  args=(master, channel.encode_connections([0]), [a.fileno()]))
        sender.start()
        try:
            received = chan.receive_one(freed=True)
        finally:
            sender.join(TIMEOUT)
        assert received is not None
        message, fds = received
        assert message == channel.Connections(listeners=(0,))
        with socket.socket(fileno=fds[0]) as copy:
            copy.sendall(b"x")
            assert b.recv(1) == b"x"  # the very socket that was sent


@pytest.mark.parametrize(
    ("peer", "family", "text"),
    [(("127.0.0.1", 80), socket.AF_INET, "127.0.0.1:80"),
     (("::1", 80, 0, 0), socket.AF_INET6, "[::1]:80"),
     ("", socket.AF_UNIX, "unix"), ("/run/client.sock", socket.AF_UNIX, "/run/client.sock"),
     ("", socket.AF_INET, "unknown"), ("", socket.AF_INET6, "unknown"), ("", None, "unknown")],
)  # fmt: skip
def test_peers_are_formatted_for_logs(peer: object, family: int | None, text: str) -> None:
    assert format_peer(peer, family) == text


def test_an_error_report_names_the_exception_and_keeps_the_traceback() -> None:
    def fail() -> None:
        raise KeyError("missing")

    try:
        fail()
    except KeyError as exc:
        report = error_report(exc, 1, ("10.0.0.1", 5))
    assert report.exc_type == "KeyError"
    assert report.message == "'missing'"
    assert "in fail" in report.traceback
    assert report.peer == "10.0.0.1:5"
    assert channel.decode_worker_message(channel.encode(report)) == report


def test_reopen_must_bring_exactly_one_descriptor(
    pair: tuple[socket.socket, WorkerChannel],
) -> None:
    master, chan = pair
    assert fdpass.send(master, channel.encode(channel.Reopen()), [])
    with pytest.raises(channel.ProtocolError, match="Reopen came with 0 descriptors, expected 1"):
        chan.receive()


def at_the_limit(worker: socket.socket, reserve: int,
                 receive: Callable[[WorkerChannel], list[object]]) -> bytes:
    """What *receive* reports in a forked worker whose numbers below its reserve are all taken."""
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: fill every number below the reserve, then receive
        code = 1
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, open_fds())) + 8, 4096))
            chan = WorkerChannel(worker, DescriptorReserve(reserve))
            while True:
                try:
                    os.open("/dev/null", os.O_RDONLY)
                except OSError:
                    break
            os.write(report_w, repr(receive(chan)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    with os.fdopen(report_r, "rb") as report:
        reported = report.read()
    assert wait_pid(pid) == 0
    return reported


def left_queued(worker: socket.socket) -> channel.MasterMessage:
    """The next message on the worker's channel, still there for the master to take back."""
    data, fds = fdpass.recv(worker, channel.MAX_MESSAGE_SIZE, 1, nonblocking=True)
    fdpass.close_all(fds)
    return channel.decode_master_message(data)


def test_a_worker_at_its_limit_still_receives_a_whole_message_then_stops_receiving() -> None:
    """The reserve takes a full message when nothing else is left; the next stays queued."""
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pipes = [os.pipe() for _ in range(3)]
    assert fdpass.send(master, channel.encode_connections([0, 0, 0]), [r for r, _ in pipes])
    assert fdpass.send(master, channel.encode_connections([1]), [pipes[0][1]])

    def receive(chan: WorkerChannel) -> list[object]:
        first = chan.receive()
        return [len(first), len(first[0][1]) if first else 0, chan.exhausted,
                chan.receive_one() is None]  # fmt: skip

    try:
        assert at_the_limit(worker, 3, receive) == b"[1, 3, True, True]"
        assert left_queued(worker) == channel.Connections(listeners=(1,))
    finally:
        master.close()
        worker.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_a_lone_descriptor_that_needed_the_reserve_stops_the_receiving() -> None:
    """The one-descriptor shortcut still sees a number taken from the reserve."""
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    assert fdpass.send(master, channel.encode_connections([0]), [r])
    assert fdpass.send(master, channel.encode_connections([1]), [w])

    def receive(chan: WorkerChannel) -> list[object]:
        first = chan.receive_one()
        return [first is not None and first[0] == channel.Connections(listeners=(0,)),
                chan.exhausted, chan.receive_one() is None]  # fmt: skip

    try:
        assert at_the_limit(worker, 1, receive) == b"[True, True, True]"
        assert left_queued(worker) == channel.Connections(listeners=(1,))
    finally:
        master.close()
        worker.close()
        os.close(r)
        os.close(w)


def test_a_descriptor_that_is_no_socket_is_an_error_report_and_is_closed() -> None:
    """Also once the listener's socket kind is known, as for its every later connection."""
    served: list[object] = []
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ctx = WorkerContext(slot=0, master_pid=os.getpid(), channel=worker, handler_spec="t:h",
                        worker_class="sync", concurrency=1, listener_names=("web",),
                        handler=LoadedHandler("t:h", HandlerKind.FUNCTION,
                                              lambda conn, peer: served.append(peer)))  # fmt: skip
    with master, worker, socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as client:
            conn, address = listener.accept()
            assert serve_blocking(ctx, conn.detach(), 0) is None  # learns the kind
            assert served == [client.getsockname()] == [address]
        assert 0 in ctx.socket_kinds
        r, w = os.pipe()
        os.close(w)
        error = serve_blocking(ctx, r, 0)
        assert error is not None and error.exc_type == "OSError", error
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(r)
        assert served == [address]
