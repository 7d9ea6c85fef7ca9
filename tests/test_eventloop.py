"""EventLoop and Signal: real descriptors, real timers, real signals."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from forkserver.eventloop import EventLoop, Signal


def run_until(loop: EventLoop, done: object, timeout: float = 20.0) -> None:
    """Run the loop until done() is true; fail after *timeout* seconds."""
    assert callable(done)
    deadline = loop.time() + timeout
    while not done():
        remaining = deadline - loop.time()
        assert remaining > 0, "timed out waiting for the loop"
        loop.run_once(min(remaining, 0.5))


# -- Signal ----------------------------------------------------------------


def test_signal_calls_slots_in_connect_order_with_arguments() -> None:
    sig = Signal()
    calls: list[tuple[str, tuple[object, ...]]] = []
    sig.connect(lambda *a: calls.append(("first", a)))
    sig.connect(lambda *a: calls.append(("second", a)))
    sig.emit(1, "x")
    assert calls == [("first", (1, "x")), ("second", (1, "x"))]


def test_signal_disconnect_reports_whether_slot_was_connected() -> None:
    sig = Signal()
    calls: list[int] = []

    def slot(n: int) -> None:
        calls.append(n)

    assert sig.disconnect(slot) is False
    sig.connect(slot)
    sig.emit(1)
    assert sig.disconnect(slot) is True
    sig.emit(2)
    assert calls == [1]
    assert sig.disconnect(slot) is False


def test_signal_disconnects_bound_methods_by_equality() -> None:
    class Box:
        def __init__(self) -> None:
            self.got: list[int] = []

        def put(self, n: int) -> None:
            self.got.append(n)

    box = Box()
    sig = Signal()
    sig.connect(box.put)
    assert sig.disconnect(box.put) is True  # a fresh bound method compares equal
    sig.emit(1)
    assert box.got == []


def test_signal_slot_may_disconnect_itself_during_emit() -> None:
    sig = Signal()
    calls: list[str] = []

    def once() -> None:
        calls.append("once")
        sig.disconnect(once)

    sig.connect(once)
    sig.connect(lambda: calls.append("always"))
    sig.emit()
    sig.emit()
    assert calls == ["once", "always", "always"]


def test_signal_rejects_non_callable() -> None:
    with pytest.raises(TypeError, match="needs a callable, not int"):
        Signal().connect(3)  # type: ignore[arg-type]


# -- descriptors -----------------------------------------------------------


def test_reader_fires_when_data_arrives_and_stops_after_removal(loop: EventLoop) -> None:
    a, b = socket.socketpair()
    with a, b:
        got: list[bytes] = []
        loop.add_reader(a, lambda: got.append(a.recv(100)))
        b.send(b"hello")
        run_until(loop, lambda: got)
        assert got == [b"hello"]
        assert loop.remove_reader(a.fileno()) is True
        assert loop.remove_reader(a) is False
        b.send(b"more")
        loop.run_once(0)
        assert got == [b"hello"]


def test_writer_fires_on_writable_socket(loop: EventLoop) -> None:
    a, b = socket.socketpair()
    with a, b:
        fired: list[int] = []

        def on_writable() -> None:
            fired.append(1)
            loop.remove_writer(a)

        loop.add_writer(a, on_writable)
        run_until(loop, lambda: fired)
        assert fired == [1]
        assert loop.remove_writer(a) is False


def test_reader_and_writer_on_one_descriptor_are_independent(loop: EventLoop) -> None:
    a, b = socket.socketpair()
    with a, b:
        events: list[str] = []
        loop.add_reader(a, lambda: events.append("r"))
        loop.add_writer(a, lambda: events.append("w"))
        loop.run_once(0)
        assert events == ["w"]  # writable, nothing to read yet
        loop.remove_writer(a)
        b.send(b"x")
        events.clear()
        loop.run_once(1)
        assert events == ["r"]
        loop.remove_reader(a)


def test_reader_removed_by_earlier_callback_is_not_called(loop: EventLoop) -> None:
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    with a1, b1, a2, b2:
        called: list[str] = []

        def first() -> None:
            called.append("first")
            a1.recv(10)
            loop.remove_reader(a2)
            loop.remove_reader(a1)

        def second() -> None:
            called.append("second")
            a2.recv(10)
            loop.remove_reader(a1)
            loop.remove_reader(a2)

        loop.add_reader(a1, first)
        loop.add_reader(a2, second)
        b1.send(b"x")
        b2.send(b"x")
        loop.run_once(1)
        # Both were ready in the same select(); whichever ran first removed
        # the other, so exactly one callback ran.
        assert len(called) == 1


def test_a_number_reused_in_a_pass_gets_none_of_that_pass_events(loop: EventLoop) -> None:
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    r, w = os.pipe()
    with a1, b1, a2, b2:
        called: list[str] = []

        def reuse(mine: socket.socket, other: socket.socket) -> None:
            called.append("old")
            mine.recv(10)
            loop.remove_reader(mine)
            loop.remove_reader(other)
            # The other's number now names a pipe nobody wrote to: its event
            # of this pass, already polled, is not the pipe's.
            os.dup2(r, other.fileno())
            loop.add_reader(other.fileno(), lambda: called.append("new"))

        loop.add_reader(a1, lambda: reuse(a1, a2))
        loop.add_reader(a2, lambda: reuse(a2, a1))
        b1.send(b"x")
        b2.send(b"x")
        loop.run_once(1)
        assert called == ["old"]
        loop.run_once(0)  # and in the next pass, the pipe is not readable
        assert called == ["old"]
        for fd in (a1.fileno(), a2.fileno()):
            loop.remove_reader(fd)
    os.close(r)
    os.close(w)


def test_negative_descriptor_is_rejected(loop: EventLoop) -> None:
    with pytest.raises(ValueError, match="invalid file descriptor -1"):
        loop.add_reader(-1, lambda: None)


# -- timers ----------------------------------------------------------------


def test_call_later_runs_in_deadline_order_on_the_monotonic_clock(loop: EventLoop) -> None:
    order: list[str] = []
    start = loop.time()
    loop.call_later(0.05, lambda: order.append("b"))
    loop.call_later(0.01, lambda: order.append("a"))
    loop.call_later(0.08, loop.stop)
    loop.run()
    assert order == ["a", "b"]
    assert loop.time() - start >= 0.08


def test_timers_with_equal_deadline_run_in_scheduling_order(loop: EventLoop) -> None:
    order: list[int] = []
    when = loop.time()
    for i in range(5):
        loop.call_at(when, lambda i=i: order.append(i))
    loop.run_once(0)
    assert order == [0, 1, 2, 3, 4]


def test_cancelled_timer_never_runs(loop: EventLoop) -> None:
    ran: list[str] = []
    handle = loop.call_later(0.01, lambda: ran.append("cancelled"))
    handle.cancel()
    loop.call_later(0.02, loop.stop)
    loop.run()
    assert ran == []


def test_call_soon_scheduled_by_a_timer_runs_on_the_next_pass(loop: EventLoop) -> None:
    order: list[str] = []

    def first() -> None:
        order.append("first")
        loop.call_soon(lambda: order.append("soon"))

    loop.call_soon(first)
    loop.run_once(0)
    assert order == ["first"]
    loop.run_once(0)
    assert order == ["first", "soon"]


def test_run_once_returns_after_timeout_with_nothing_ready(loop: EventLoop) -> None:
    a, b = socket.socketpair()
    with a, b:
        loop.add_reader(a, lambda: None)
        start = loop.time()
        loop.run_once(0.05)
        assert loop.time() - start >= 0.04
        loop.remove_reader(a)


def test_run_once_refuses_to_block_forever_on_nothing(loop: EventLoop) -> None:
    with pytest.raises(RuntimeError, match="block forever"):
        loop.run_once()


def test_exception_in_callback_propagates_and_loop_stays_usable(loop: EventLoop) -> None:
    ran: list[str] = []

    def boom() -> None:
        raise KeyError("boom")

    when = loop.time()
    loop.call_at(when, boom)
    loop.call_at(when, lambda: ran.append("after"))
    with pytest.raises(KeyError, match="boom"):
        loop.run()
    loop.run_once(0)
    assert ran == ["after"]  # the timer behind the failing one still runs


def test_the_exception_handler_gets_every_failing_callback_and_the_loop_goes_on(
    loop: EventLoop,
) -> None:
    caught: list[tuple[object, str]] = []
    ran: list[str] = []
    loop.set_exception_handler(lambda callback, exc: caught.append((callback, str(exc))))
    assert loop.get_exception_handler() is not None

    def timer_boom() -> None:
        raise KeyError("timer")

    def signal_boom() -> None:
        raise ValueError("signal")

    a, b = socket.socketpair()
    with a, b:

        def reader_boom() -> None:
            a.recv(1)
            raise RuntimeError("reader")

        def writer_boom() -> None:
            loop.remove_writer(a)
            raise OSError("writer")

        loop.add_reader(a, reader_boom)
        loop.add_writer(a, writer_boom)
        loop.add_signal_handler(signal.SIGUSR2, signal_boom)
        when = loop.time()
        loop.call_at(when, timer_boom)
        loop.call_at(when, lambda: ran.append("after"))  # behind the failing one, same pass
        b.send(b"x")
        os.kill(os.getpid(), signal.SIGUSR2)
        run_until(loop, lambda: len(caught) == 4 and ran)
        loop.remove_reader(a)
        loop.remove_signal_handler(signal.SIGUSR2)
    assert sorted(text for _, text in caught) == ["'timer'", "reader", "signal", "writer"]
    assert {callback for callback, _ in caught} == {timer_boom, reader_boom, writer_boom,
                                                    signal_boom}  # fmt: skip
    assert ran == ["after"]


def test_keyboard_interrupt_and_system_exit_pass_the_exception_handler(loop: EventLoop) -> None:
    caught: list[BaseException] = []
    loop.set_exception_handler(lambda callback, exc: caught.append(exc))
    for exc_type in (KeyboardInterrupt, SystemExit):

        def stop(exc_type: type[BaseException] = exc_type) -> None:
            raise exc_type()

        loop.call_soon(stop)
        with pytest.raises(exc_type):
            loop.run()
    assert caught == []
    loop.set_exception_handler(None)
    loop.call_soon(lambda: {}.pop("missing"))
    with pytest.raises(KeyError):  # no handler: it propagates, as before
        loop.run()


def test_stop_before_run_makes_run_return(loop: EventLoop) -> None:
    loop.stop()
    loop.run()  # returns at once instead of raising "block forever"
    loop.call_soon(loop.stop)
    loop.run()


# -- signals ---------------------------------------------------------------


def test_signal_handler_runs_in_the_loop(loop: EventLoop) -> None:
    got: list[str] = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: got.append("usr1"))
    os.kill(os.getpid(), signal.SIGUSR1)
    run_until(loop, lambda: got)
    assert got == ["usr1"]


def test_repeated_signals_merge_and_different_signals_all_arrive(loop: EventLoop) -> None:
    got: list[str] = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: got.append("usr1"))
    loop.add_signal_handler(signal.SIGUSR2, lambda: got.append("usr2"))
    # All of these are delivered before the loop reads the pipe.
    for _ in range(50):
        os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGUSR1)
    run_until(loop, lambda: "usr2" in got)
    assert got == ["usr1", "usr2"]


def test_signal_survives_a_full_wakeup_pipe(loop: EventLoop) -> None:
    got: list[str] = []
    loop.add_signal_handler(signal.SIGUSR1, lambda: got.append("usr1"))
    loop.add_signal_handler(signal.SIGUSR2, lambda: got.append("usr2"))
    # Fill the wakeup pipe so the C handler's byte for USR2 is dropped.
    filler = b"\x00" * 4096
    try:
        while True:
            os.write(loop._wakeup_w, filler)
    except BlockingIOError:
        pass
    os.kill(os.getpid(), signal.SIGUSR2)
    run_until(loop, lambda: got)
    assert got == ["usr2"]


def test_remove_signal_handler_restores_previous_handler(loop: EventLoop) -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    assert signal.getsignal(signal.SIGUSR1) != previous
    assert loop.remove_signal_handler(signal.SIGUSR1) is True
    assert signal.getsignal(signal.SIGUSR1) == previous
    assert loop.remove_signal_handler(signal.SIGUSR1) is False


def test_close_restores_handlers_and_wakeup_fd() -> None:
    previous_handler = signal.getsignal(signal.SIGUSR2)
    loop = EventLoop()
    loop.add_signal_handler(signal.SIGUSR2, lambda: None)
    wakeup_r, wakeup_w = loop._wakeup_r, loop._wakeup_w
    loop.close()
    assert signal.getsignal(signal.SIGUSR2) == previous_handler
    assert signal.set_wakeup_fd(-1) == -1  # nothing left pointing at our pipe
    for fd in (wakeup_r, wakeup_w):
        with pytest.raises(OSError):
            os.fstat(fd)
    assert loop.is_closed()
    loop.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        loop.call_soon(lambda: None)


def test_loop_descriptors_are_close_on_exec(loop: EventLoop) -> None:
    loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    for fd in (loop._wakeup_r, loop._wakeup_w):
        assert os.get_inheritable(fd) is False
    epoll_fd = loop._selector.fileno()  # type: ignore[union-attr]
    assert os.get_inheritable(epoll_fd) is False


def test_discard_after_fork_leaves_the_parent_loop_working(loop: EventLoop) -> None:
    a, b = socket.socketpair()
    with a, b:
        got: list[bytes] = []
        loop.add_reader(a, lambda: got.append(a.recv(100)))
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)
        pid = os.fork()
        if pid == 0:  # child: report through the exit code only
            code = 1
            try:
                loop.discard_after_fork()
                ok = (
                    signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
                    and signal.set_wakeup_fd(-1) == -1
                    and loop.is_closed()
                )
                code = 0 if ok else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The child closed its copy of the epoll fd without unregistering:
        # the parent's registration still delivers.
        b.send(b"still here")
        run_until(loop, lambda: got)
        assert got == [b"still here"]
        loop.remove_reader(a)
