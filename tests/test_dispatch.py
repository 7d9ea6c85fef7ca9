"""The dispatcher on real socketpairs and a real event loop, without processes."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
from collections.abc import Callable, Iterator

import pytest

from forkserver import channel, dispatch, fdpass
from forkserver.dispatch import Dispatcher, WorkerLink
from forkserver.eventloop import EventLoop
from forkserver.listeners import Listener, parse_bind
from forkserver.worker_table import WorkerState, WorkerTable

PID = 4242  # bookkeeping only: no process is signalled here


class Rig:
    def __init__(self, capacity: int, max_pending: int = 10) -> None:
        self.loop = EventLoop()
        self.table = WorkerTable()
        self.broken: list[str] = []
        self.dispatcher = Dispatcher(
            self.loop, self.table, max_pending, lambda link, why: self.broken.append(why)
        )
        self.listeners = [Listener(parse_bind("127.0.0.1:0"), 0)]
        self.dispatcher.listeners = self.listeners
        self.master_end, self.worker_end = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET
        )
        self.master_end.setblocking(False)
        record = self.table.add(0, PID, capacity, now=0.0)
        self.link = WorkerLink(record=record, sock=self.master_end, peer=self.worker_end)
        self.dispatcher.add_link(self.link)

    def ready(self) -> None:
        self.table.mark_ready(PID, now=0.0)

    def receive_all(self) -> list[tuple[tuple[int, ...], list[int]]]:
        received = []
        for data, fds in fdpass.drain(self.worker_end, channel.MAX_MESSAGE_SIZE, 253):
            message = channel.decode_master_message(data)
            assert isinstance(message, channel.Connections)
            received.append((message.listeners, fds))
        return received

    def close(self) -> None:
        if PID in self.dispatcher.links:
            fdpass.close_all([fd for fd, _ in self.dispatcher.remove_link(PID)])
        fdpass.close_all([fd for fd, _ in self.dispatcher.pending])
        self.loop.close()


MakeRig = Callable[..., Rig]


@pytest.fixture
def rig() -> Iterator[MakeRig]:
    made: list[Rig] = []

    def make(capacity: int, max_pending: int = 10) -> Rig:
        made.append(Rig(capacity, max_pending))
        return made[-1]

    yield make
    for r in made:
        r.close()


def open_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def open_fds() -> list[int]:
    return [int(name) for name in os.listdir("/proc/self/fd")]


def pipe_ends(count: int) -> list[int]:
    fds = []
    for _ in range(count // 2):
        fds.extend(os.pipe())
    return fds


def test_a_batch_goes_out_253_per_message_and_the_master_copies_close(rig: MakeRig) -> None:
    r = rig(capacity=600)
    r.ready()
    before = open_count()
    fds = pipe_ends(600)
    for i, fd in enumerate(fds):
        r.dispatcher.dispatch(fd, i % 3)
    r.loop.run_once(0)
    assert open_count() == before  # the master's copies are closed once sent
    received = r.receive_all()
    assert [len(fds) for _, fds in received] == [253, 253, 94]
    listeners = [index for indices, _ in received for index in indices]
    assert listeners == [i % 3 for i in range(600)]
    for _, got in received:
        fdpass.close_all(got)
    assert r.link.record.in_flight == 600


def test_a_full_channel_keeps_the_descriptors_and_resumes_when_writable(rig: MakeRig) -> None:
    r = rig(capacity=400)
    r.ready()
    r.master_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel minimum
    r.worker_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    fds = pipe_ends(400)
    got: list[int] = []
    for fd in fds:
        r.dispatcher.dispatch(fd, 0)
        r.loop.run_once(0)
    assert r.link.writer_armed  # EAGAIN: it waits for writability
    assert r.link.out_fds  # and keeps what it could not send
    for _ in range(1000):
        for _, more in r.receive_all():
            got.extend(more)
        if len(got) == 400:
            break
        r.loop.run_once(1.0)
    assert len(got) == 400
    assert not r.link.writer_armed
    fdpass.close_all(got)


def test_with_no_free_worker_connections_wait_and_accepting_pauses(rig: MakeRig) -> None:
    r = rig(capacity=4, max_pending=3)
    fds = pipe_ends(6)
    for fd in fds[:3]:
        r.dispatcher.dispatch(fd, 0)  # the worker is not ready yet
    assert len(r.dispatcher.pending) == 3
    assert r.dispatcher.paused
    r.ready()
    r.dispatcher.drain_pending()
    assert not r.dispatcher.pending
    assert not r.dispatcher.paused
    for fd in fds[3:]:
        r.dispatcher.dispatch(fd, 1)
    assert len(r.dispatcher.pending) == 2  # capacity 4: one got in, two wait
    r.loop.run_once(0)
    received = r.receive_all()
    assert sum(len(fds) for _, fds in received) == 4
    for _, got in received:
        fdpass.close_all(got)


def test_a_dead_workers_undelivered_descriptors_come_back_in_order(rig: MakeRig) -> None:
    r = rig(capacity=8)
    r.ready()
    fds = pipe_ends(6)
    for i, fd in enumerate(fds):
        r.dispatcher.dispatch(fd, i)
        if i == 3:
            r.loop.run_once(0)  # four sent, two still in the outbox
    reclaimed = r.dispatcher.remove_link(PID)
    assert [index for _, index in reclaimed] == [0, 1, 2, 3, 4, 5]
    r.dispatcher.requeue(reclaimed)
    assert [index for _, index in r.dispatcher.pending] == [0, 1, 2, 3, 4, 5]
    assert r.master_end.fileno() == -1
    assert r.worker_end.fileno() == -1


def test_a_send_that_fails_outright_reports_a_broken_channel(rig: MakeRig) -> None:
    r = rig(capacity=2)
    r.ready()
    read_end, write_end = os.pipe()
    os.close(write_end)
    r.master_end.shutdown(socket.SHUT_WR)
    r.dispatcher.dispatch(read_end, 0)
    r.loop.run_once(0)
    assert len(r.broken) == 1
    assert "sending on its channel failed" in r.broken[0]
    assert r.link.out_fds == [read_end]  # kept, to be reclaimed when the worker is reaped


def test_stop_is_sent_after_everything_already_queued(rig: MakeRig) -> None:
    r = rig(capacity=2)
    r.ready()
    fd = os.pipe()
    r.dispatcher.dispatch(fd[0], 0)
    os.close(fd[1])
    r.dispatcher.queue_stop(r.link)
    messages = fdpass.drain(r.worker_end, channel.MAX_MESSAGE_SIZE, 253)
    decoded = [channel.decode_master_message(data) for data, _ in messages]
    assert decoded == [channel.Connections(listeners=(0,)), channel.Stop()]
    fdpass.close_all(messages[0][1])


def prefetching(r: Rig) -> Rig:
    r.link.record.prefetch = 1
    r.ready()
    return r


def test_a_prefetching_worker_gets_one_more_than_its_capacity_one_per_message(
    rig: MakeRig,
) -> None:
    r = prefetching(rig(capacity=1))
    fds = pipe_ends(4)
    for i, fd in enumerate(fds[:3]):
        r.dispatcher.dispatch(fd, i)
    r.loop.run_once(0)
    received = r.receive_all()
    assert [(indices, len(got)) for indices, got in received] == [((0,), 1), ((1,), 1)]
    assert r.link.record.in_flight == 2
    assert [index for _, index in r.dispatcher.pending] == [2]  # never a third
    for _, got in received:
        fdpass.close_all(got)
    os.close(fds[3])


def test_a_prefetching_worker_is_told_each_listener_cached_or_not(rig: MakeRig) -> None:
    r = rig(capacity=2)
    r.link.record.prefetch = 2
    r.ready()
    fds = pipe_ends(4)
    for flush in ([(1,), (40,)], [(2,), (15,)]):  # CONNECTIONS of listener 40 is not cached
        for (index,), fd in zip(flush, fds, strict=False):
            r.dispatcher.dispatch(fd, index)
        del fds[: len(flush)]
        r.loop.run_once(0)
        received = r.receive_all()
        assert [(got, len(sent)) for got, sent in received] == [(index, 1) for index in flush]
        for _, got in received:
            fdpass.close_all(got)


def test_a_prefetched_descriptor_a_dead_worker_never_read_comes_back(rig: MakeRig) -> None:
    r = prefetching(rig(capacity=1))
    for i, fd in enumerate(pipe_ends(2)):
        r.dispatcher.dispatch(fd, i)
    r.loop.run_once(0)
    serving = fdpass.recv(r.worker_end, channel.MAX_MESSAGE_SIZE, 253, nonblocking=True)
    fdpass.close_all(serving[1])  # the worker took the first and died serving it
    reclaimed = r.dispatcher.remove_link(PID)
    assert [index for _, index in reclaimed] == [1]
    r.dispatcher.requeue(reclaimed)


def test_accepting_stops_within_a_batch_as_soon_as_the_queue_is_full(rig: MakeRig) -> None:
    r = rig(capacity=1, max_pending=3)  # never ready: everything queues
    listener = Listener(parse_bind("127.0.0.1:0"), 0, loop=r.loop)
    clients: list[socket.socket] = []
    try:
        assert listener.listen("127.0.0.1", 0)
        listener.dispatch = r.dispatcher.dispatch
        r.dispatcher.listeners = [listener]
        clients = [socket.create_connection(("127.0.0.1", listener.server_port()), timeout=5)
                   for _ in range(6)]  # fmt: skip
        r.loop.run_once(5.0)
        assert len(r.dispatcher.pending) == 3  # the bound holds: three wait in the backlog
        assert not listener.is_accepting()
    finally:
        listener.close()
        for sock in clients:
            sock.close()


def test_while_connections_queue_arrivals_wait_in_the_kernel_and_none_is_lost(
    rig: MakeRig,
) -> None:
    r = rig(capacity=2, max_pending=10)
    r.ready()
    listener = Listener(parse_bind("127.0.0.1:0"), 0, loop=r.loop)
    clients: list[socket.socket] = []
    received: list[tuple[tuple[int, ...], list[int]]] = []
    try:
        assert listener.listen("127.0.0.1", 0)
        listener.dispatch = r.dispatcher.dispatch
        r.dispatcher.listeners = [listener]
        address = ("127.0.0.1", listener.server_port())
        clients = [socket.create_connection(address, timeout=5) for _ in range(3)]
        r.loop.run_once(5.0)  # one batch: two to the worker, the third queues
        assert (r.link.record.in_flight, len(r.dispatcher.pending)) == (2, 1)
        assert r.dispatcher.arrivals_held and not listener.is_accepting()
        late = socket.create_connection(address, timeout=5)
        clients.append(late)
        r.loop.run_once(0)  # it does not wake the loop: it could only queue
        assert len(r.dispatcher.pending) == 1
        r.table.complete(PID, 2, now=0.0)
        r.dispatcher.drain_pending()  # the queue empties: arrivals wake the loop again
        assert not r.dispatcher.arrivals_held and listener.is_accepting()
        r.loop.run_once(5.0)  # ready at once: the late one waited in the kernel's queue
        received = r.receive_all()
        fds = [fd for _, got in received for fd in got]
        assert len(fds) == 4
        with socket.socket(fileno=os.dup(fds[-1])) as last:
            assert last.getpeername() == late.getsockname()  # the late one, served last
    finally:
        listener.close()
        for _, got in received:
            fdpass.close_all(got)
        for sock in clients:
            sock.close()


def test_taken_back_descriptors_hold_arrivals_and_a_fast_stop_releases_them(
    rig: MakeRig,
) -> None:
    r = rig(capacity=1)
    r.ready()
    listener = Listener(parse_bind("127.0.0.1:0"), 0, loop=r.loop)
    try:
        assert listener.listen("127.0.0.1", 0)
        r.dispatcher.listeners = [listener]
        assert listener.is_accepting()
        r.dispatcher.requeue([(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), 0)])
        assert r.dispatcher.arrivals_held and not listener.is_accepting()
        assert r.dispatcher.close_pending() == 1
        assert not r.dispatcher.arrivals_held and listener.is_accepting()
    finally:
        listener.close()


def test_the_pause_warning_is_rate_limited_under_steady_overload(
    rig: MakeRig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = rig(capacity=1, max_pending=1)
    now = [100.0]
    monkeypatch.setattr(r.loop, "time", lambda: now[0])

    def episode() -> None:  # the worker is busy, the queue fills, then the worker takes it
        r.dispatcher.dispatch(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), 0)
        assert r.dispatcher.paused
        if r.link.record.state is WorkerState.STARTING:
            r.ready()
        else:
            r.table.complete(PID, 1, now=now[0])
        r.dispatcher.drain_pending()
        assert not r.dispatcher.paused

    with caplog.at_level("INFO", logger="forkserver.master"):
        for _ in range(5):
            episode()
            now[0] += 1.0
        now[0] += dispatch.PAUSE_LOG_INTERVAL
        episode()
    r.loop.run_once(0)
    for _, got in r.receive_all():
        fdpass.close_all(got)
    events = [(rec.event, getattr(rec, "unlogged", None)) for rec in caplog.records]  # type: ignore[attr-defined]
    assert events == [("accept_paused", 0), ("accept_resumed", None),
                      ("accept_paused", 4), ("accept_resumed", None)]  # fmt: skip
    assert "(4 more in the last 15 s)" in caplog.records[2].getMessage()


def test_a_prefetched_descriptor_moves_to_a_worker_that_has_been_free_a_while(
    rig: MakeRig,
) -> None:
    r = prefetching(rig(capacity=1))
    other_master, other_worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    other_master.setblocking(False)
    second = r.table.add(1, PID + 1, 1, now=0.0)
    second.prefetch = 1
    r.table.mark_ready(PID + 1, now=0.0)
    r.dispatcher.add_link(WorkerLink(record=second, sock=other_master, peer=other_worker))
    try:
        for i, fd in enumerate(pipe_ends(4)[:3]):
            r.dispatcher.dispatch(fd, i)  # slot 0 serves 0, slot 1 serves 1, slot 0 prefetches 2
        r.loop.run_once(0)
        assert (r.link.record.in_flight, second.in_flight) == (2, 1)
        serving = fdpass.recv(r.worker_end, channel.MAX_MESSAGE_SIZE, 253, nonblocking=True)
        for _, got in fdpass.drain(other_worker, channel.MAX_MESSAGE_SIZE, 253):
            fdpass.close_all(got)  # slot 1 finishes its connection...
        r.table.complete(PID + 1, 1, now=1.0)
        r.dispatcher.drain_pending()  # ...while slot 0 is still busy with its first
        start = r.loop.time()
        while second.in_flight == 0 and r.loop.time() - start < 5:
            r.loop.run_once(1.0)
        assert r.loop.time() - start >= dispatch.STEAL_AFTER
        r.loop.run_once(0)  # the flush
        moved = fdpass.drain(other_worker, channel.MAX_MESSAGE_SIZE, 253)
        assert [channel.decode_master_message(data) for data, _ in moved] == [
            channel.Connections(listeners=(2,))
        ]
        assert (r.link.record.in_flight, second.in_flight) == (1, 1)
        assert r.receive_all() == []  # nothing left queued behind the busy worker
        fdpass.close_all(serving[1] + moved[0][1])
    finally:
        fdpass.close_all([fd for fd, _ in r.dispatcher.remove_link(PID + 1)])


def second_worker(r: Rig, prefetch: int) -> tuple[WorkerLink, socket.socket]:
    """A second ready worker on its own socketpair; returns its link and its end."""
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    master.setblocking(False)
    record = r.table.add(1, PID + 1, 1, now=0.0)
    record.prefetch = prefetch
    r.table.mark_ready(PID + 1, now=0.0)
    link = WorkerLink(record=record, sock=master, peer=worker)
    r.dispatcher.add_link(link)
    return link, worker


def run_until(r: Rig, done: Callable[[], bool], limit: float = 5.0) -> float:
    """Run the loop until *done*, at most *limit* s; how long it took."""
    start = r.loop.time()
    while not done() and r.loop.time() - start < limit:
        r.loop.run_once(0.5)
    assert done()
    return r.loop.time() - start


def test_every_prefetched_descriptor_moves_to_a_worker_free_a_while(rig: MakeRig) -> None:
    r = prefetching(rig(capacity=1))
    r.link.record.prefetch = 3
    other, other_end = second_worker(r, prefetch=3)
    try:
        for i, fd in enumerate(pipe_ends(6)[:5]):
            r.dispatcher.dispatch(fd, i)  # 0 to slot 0, 1 to slot 1, then 2 3 4 prefetched
        r.loop.run_once(0)
        assert (r.link.record.in_flight, other.record.in_flight) == (3, 2)
        serving = fdpass.recv(r.worker_end, channel.MAX_MESSAGE_SIZE, 253, nonblocking=True)
        for _, got in fdpass.drain(other_end, channel.MAX_MESSAGE_SIZE, 253):
            fdpass.close_all(got)  # slot 1 finishes both...
        r.table.complete(PID + 1, 2, now=1.0)
        r.dispatcher.drain_pending()  # ...while slot 0 is still busy with its first
        run_until(r, lambda: other.record.in_flight == 2)  # both of slot 0's queued ones
        r.loop.run_once(0)  # the flush
        moved = fdpass.drain(other_end, channel.MAX_MESSAGE_SIZE, 253)
        assert [channel.decode_master_message(data) for data, _ in moved] == [
            channel.Connections(listeners=(2,)), channel.Connections(listeners=(4,))]
        assert r.link.record.in_flight == 1
        assert r.receive_all() == []  # nothing left queued behind the busy worker
        fdpass.close_all(serving[1] + [fd for _, got in moved for fd in got])
    finally:
        fdpass.close_all([fd for fd, _ in r.dispatcher.remove_link(PID + 1)])


def test_what_waits_behind_a_stuck_worker_goes_back_to_the_queue_and_it_gets_no_more(
    rig: MakeRig,
) -> None:
    r = prefetching(rig(capacity=1, max_pending=100))
    r.link.record.prefetch = 3
    other, other_end = second_worker(r, prefetch=3)
    try:
        for i, fd in enumerate(pipe_ends(10)):
            r.dispatcher.dispatch(fd, i)  # both full (4 each), 2 in the master's queue
        r.loop.run_once(0)
        assert (r.link.record.in_flight, other.record.in_flight) == (4, 4)
        serving = fdpass.recv(r.worker_end, channel.MAX_MESSAGE_SIZE, 253, nonblocking=True)
        # Slot 1 keeps finishing connections; slot 0 finishes none.
        def slot_1_serves() -> bool:
            for _, got in fdpass.drain(other_end, channel.MAX_MESSAGE_SIZE, 253):
                fdpass.close_all(got)
                r.table.complete(PID + 1, 1, now=r.loop.time())
                r.dispatcher.drain_pending()
            return r.link.record.in_flight == 1

        took = run_until(r, slot_1_serves)
        assert took >= dispatch.STEAL_AFTER  # one look to see it stuck, the next to act
        assert r.receive_all() == []  # slot 0's queued three were taken back...
        assert r.link.record.held_back
        r.dispatcher.dispatch(os.dup(serving[1][0]), 9)
        r.loop.run_once(0)
        assert r.link.record.in_flight == 1  # ...and it is given none beyond its capacity
        r.table.complete(PID, 1, now=r.loop.time())  # until it reports DONE
        assert not r.link.record.held_back
        fdpass.close_all(serving[1])
    finally:
        fdpass.close_all([fd for fd, _ in r.dispatcher.remove_link(PID + 1)])
        r.link.record.in_flight = 0


def test_a_lone_stuck_worker_keeps_what_is_queued_for_it(rig: MakeRig) -> None:
    """With no other worker ready, the master's queue would serve them no sooner."""
    r = prefetching(rig(capacity=1))
    r.link.record.prefetch = 3
    for i, fd in enumerate(pipe_ends(4)):
        r.dispatcher.dispatch(fd, i)
    r.loop.run_once(0)
    serving = fdpass.recv(r.worker_end, channel.MAX_MESSAGE_SIZE, 253, nonblocking=True)
    start = r.loop.time()
    while r.loop.time() - start < 4 * dispatch.STEAL_AFTER:  # several looks
        r.loop.run_once(dispatch.STEAL_AFTER)
    assert r.link.record.in_flight == 4
    assert not r.link.record.held_back
    queued = r.receive_all()
    assert [indices for indices, _ in queued] == [(1,), (2,), (3,)]
    fdpass.close_all(serving[1] + [fd for _, got in queued for fd in got])
    r.link.record.in_flight = 0


def test_workers_all_stuck_keep_what_is_queued_for_them(rig: MakeRig) -> None:
    """Taking back helps only if some worker still serves: otherwise the master
    would just hold the descriptors (numbers it may be short of) in its queue."""
    r = prefetching(rig(capacity=1, max_pending=100))
    r.link.record.prefetch = 3
    other, other_end = second_worker(r, prefetch=3)
    try:
        for i, fd in enumerate(pipe_ends(10)):
            r.dispatcher.dispatch(fd, i)  # both full (4 each), 2 in the master's queue
        r.loop.run_once(0)
        start = r.loop.time()
        while r.loop.time() - start < 4 * dispatch.STEAL_AFTER:  # several looks, no DONE
            r.loop.run_once(dispatch.STEAL_AFTER)
        assert (r.link.record.in_flight, other.record.in_flight) == (4, 4)
        assert not r.link.record.held_back and not other.record.held_back
        assert len(r.dispatcher.pending) == 2
        for end in (r.worker_end, other_end):
            for _, got in fdpass.drain(end, channel.MAX_MESSAGE_SIZE, 253):
                fdpass.close_all(got)
    finally:
        fdpass.close_all([fd for fd, _ in r.dispatcher.remove_link(PID + 1)])
        r.link.record.in_flight = 0


def test_a_descriptor_the_master_has_no_number_for_is_counted_lost_and_the_rest_stay(
    rig: MakeRig, caplog: pytest.LogCaptureFixture,
) -> None:
    r = prefetching(rig(capacity=1))
    r.link.record.prefetch = 3
    for i, fd in enumerate(pipe_ends(4)):
        r.dispatcher.dispatch(fd, i)  # one to serve, three prefetched
    r.loop.run_once(0)
    serving = fdpass.recv(r.worker_end, channel.MAX_MESSAGE_SIZE, 253, nonblocking=True)
    other, other_end = second_worker(r, prefetch=3)  # free: the prefetched ones should move
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(open_fds()) + 1, hard))
        with contextlib.suppress(OSError):  # every number below the limit taken: EMFILE
            while True:
                filler.append(os.dup(0))
        with caplog.at_level(logging.WARNING, logger="forkserver.master"):
            r.dispatcher._steal()  # as the timer would, with no number free
        lost = [rec for rec in caplog.records if getattr(rec, "event", "") == "take_back_lost"]
        assert len(lost) == 1
        assert r.link.record.in_flight == 3  # the one lost no longer counts
        assert other.record.in_flight == 0
    finally:
        fdpass.close_all(filler)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    queued = r.receive_all()
    assert [indices for indices, _ in queued] == [(2,), (3,)]  # still the worker's, in order
    fdpass.close_all(serving[1] + [fd for _, got in queued for fd in got])
    fdpass.close_all([fd for fd, _ in r.dispatcher.remove_link(PID + 1)])
    other_end.close()
    r.link.record.in_flight = 0


def test_a_fast_stop_takes_back_a_prefetched_descriptor_and_leaves_stop_last(
    rig: MakeRig,
) -> None:
    r = prefetching(rig(capacity=1))
    for i, fd in enumerate(pipe_ends(2)):
        r.dispatcher.dispatch(fd, i)
    r.loop.run_once(0)
    serving = fdpass.recv(r.worker_end, channel.MAX_MESSAGE_SIZE, 253, nonblocking=True)
    r.table.mark_stopping(PID)
    r.dispatcher.queue_stop(r.link)  # the channel: the prefetched one, then STOP
    assert r.dispatcher.close_pending() == 1  # the prefetched one, dropped
    assert r.link.record.in_flight == 1  # only the one being served
    left = fdpass.drain(r.worker_end, channel.MAX_MESSAGE_SIZE, 253)
    assert [channel.decode_master_message(data) for data, _ in left] == [channel.Stop()]
    fdpass.close_all(serving[1])


def test_taking_back_from_a_stopping_worker_that_has_only_stop_left_sends_stop_again(
    rig: MakeRig,
) -> None:
    r = prefetching(rig(capacity=1))
    for i, fd in enumerate(pipe_ends(2)):
        r.dispatcher.dispatch(fd, i)
    r.loop.run_once(0)
    taken = [fdpass.recv(r.worker_end, channel.MAX_MESSAGE_SIZE, 253, nonblocking=True)
             for _ in range(2)]  # fmt: skip  # the worker has both already
    r.table.mark_stopping(PID)
    r.dispatcher.queue_stop(r.link)
    assert r.dispatcher.close_pending() == 0
    left = fdpass.drain(r.worker_end, channel.MAX_MESSAGE_SIZE, 253)
    assert [channel.decode_master_message(data) for data, _ in left] == [channel.Stop()]
    for _, got in taken:
        fdpass.close_all(got)


def test_reopen_goes_after_the_outbox_and_before_stop_with_its_file(rig: MakeRig) -> None:
    r = rig(capacity=2)
    r.ready()
    conn_r, conn_w = os.pipe()
    log_r, log_w = os.pipe()
    r.dispatcher.dispatch(conn_r, 0)
    r.dispatcher.queue_reopen(r.link, os.dup(log_w))  # the outbox is not flushed yet
    r.dispatcher.queue_stop(r.link)
    messages = fdpass.drain(r.worker_end, channel.MAX_MESSAGE_SIZE, 253)
    decoded = [channel.decode_master_message(data) for data, _ in messages]
    assert decoded == [channel.Connections(listeners=(0,)), channel.Reopen(), channel.Stop()]
    (log_copy,) = messages[1][1]
    os.write(log_copy, b"x")  # the same pipe
    assert os.read(log_r, 1) == b"x"
    fdpass.close_all([*messages[0][1], log_copy, conn_w, log_r, log_w])


def test_a_reopen_met_while_taking_back_a_prefetched_descriptor_is_sent_again(
    rig: MakeRig,
) -> None:
    r = prefetching(rig(capacity=1))
    fds = pipe_ends(2)
    r.dispatcher.dispatch(fds[0], 0)
    r.loop.run_once(0)
    serving = fdpass.recv(r.worker_end, channel.MAX_MESSAGE_SIZE, 253, nonblocking=True)
    log_r, log_w = os.pipe()
    r.dispatcher.queue_reopen(r.link, os.dup(log_w))  # REOPEN, then a prefetched one
    r.dispatcher.dispatch(fds[1], 1)
    r.loop.run_once(0)
    before = open_count()
    assert r.dispatcher.close_pending() == 1  # the one behind REOPEN is taken too
    assert open_count() == before  # the taken one closed, the file sent again and closed
    messages = fdpass.drain(r.worker_end, channel.MAX_MESSAGE_SIZE, 253)
    decoded = [channel.decode_master_message(data) for data, _ in messages]
    assert decoded == [channel.Reopen()]
    (log_copy,) = messages[0][1]
    os.write(log_copy, b"x")  # the same pipe
    assert os.read(log_r, 1) == b"x"
    assert r.link.record.in_flight == 1  # only the one being served
    fdpass.close_all([*serving[1], log_copy, log_r, log_w])
    r.link.record.in_flight = 0


def test_a_leaving_worker_gives_back_its_queue_and_its_outbox_with_their_credit(
    rig: MakeRig,
) -> None:
    r = rig(capacity=4)
    r.ready()
    fds = pipe_ends(6)
    for i, fd in enumerate(fds[:3]):
        r.dispatcher.dispatch(fd, i)
    r.loop.run_once(0)  # three on the channel
    r.dispatcher.dispatch(fds[3], 3)  # one in the outbox
    assert r.link.record.in_flight == 4
    taken = r.dispatcher.take_back_queued(r.link)
    assert [index for _, index in taken] == [0, 1, 2, 3]
    assert r.link.record.in_flight == 0
    assert r.receive_all() == []
    fdpass.close_all([fd for fd, _ in taken] + fds[4:])


def test_a_pause_is_info_and_only_a_queue_that_does_not_move_is_a_warning(
    rig: MakeRig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = rig(capacity=1, max_pending=1)
    now = [100.0]
    monkeypatch.setattr(r.loop, "time", lambda: now[0])
    r.ready()

    def connection() -> None:
        r.dispatcher.dispatch(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), 0)

    with caplog.at_level("INFO", logger="forkserver.master"):
        connection()  # the worker's
        connection()  # queued: the queue is full, accepting pauses
        assert r.dispatcher.paused
        now[0] += dispatch.STALL_AFTER
        r.loop.run_once(0)  # nothing reached a worker meanwhile
        # The worker finishes one: the queued one reaches it, a new one queues.
        r.table.complete(PID, 1, now=now[0])
        r.dispatcher.drain_pending()
        connection()
        assert r.dispatcher.paused
        now[0] += dispatch.STALL_AFTER
        r.loop.run_once(0)  # it moved: no warning this time
    for _, got in r.receive_all():
        fdpass.close_all(got)
    levels = [(rec.event, rec.levelname) for rec in caplog.records]  # type: ignore[attr-defined]
    assert levels == [("accept_paused", "INFO"), ("accept_stalled", "WARNING"),
                      ("accept_resumed", "INFO"), ("accept_paused", "INFO")]  # fmt: skip
    assert "no queued connection reached a worker" in caplog.records[1].getMessage()
