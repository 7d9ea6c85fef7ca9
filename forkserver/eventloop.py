"""A small single-threaded event loop: descriptors, timers and signals.

The master runs one of these; ``TcpServer`` emits its signals from it.

Invariants:

* One thread.  Callbacks run one at a time, in the loop, never inside a
  signal handler: the Python-level handler only records the signal
  number in a set, and ``signal.set_wakeup_fd`` wakes the selector.
* Repeats of one signal that arrive before the loop handles them merge
  into one callback (two HUPs = one reload).  Different signals are
  never dropped, even if the wakeup pipe overflows, because the set, not
  the pipe, is the record of what arrived.
* Timers use the monotonic clock.
* An ``Exception`` raised by a callback goes to the exception handler
  (``set_exception_handler``), with the callback, and the loop carries
  on with the next one; without a handler it propagates out of
  ``run()`` / ``run_once()``, and the loop stays usable.  Other
  ``BaseException`` subclasses (``KeyboardInterrupt``, ``SystemExit``) always
  propagate: they are requests to stop, not errors.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import select
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Protocol

__all__ = ["EventLoop", "HasFileno", "Signal", "TimerHandle"]

Callback = Callable[[], None]
#: Called with the callback that raised and its exception; must not raise.
ExceptionHandler = Callable[[Callable[..., object], Exception], None]
_SignalHandler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


class HasFileno(Protocol):
    """Anything with a ``fileno()``, such as a socket."""

    def fileno(self) -> int: ...


def _fd_of(fileobj: int | HasFileno) -> int:
    fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
    if fd < 0:
        raise ValueError(f"invalid file descriptor {fd}")
    return fd


class Signal:
    """A Qt-style signal: slots are called in the order they connected.

    A slot connected twice is called twice, as in Qt.  ``emit`` works on
    a snapshot, so a slot may connect or disconnect slots while it runs.
    """

    def __init__(self) -> None:
        self._slots: list[Callable[..., object]] = []

    def connect(self, slot: Callable[..., object]) -> None:
        if not callable(slot):
            raise TypeError(f"Signal.connect() needs a callable, not {type(slot).__name__}")
        self._slots.append(slot)

    def disconnect(self, slot: Callable[..., object]) -> bool:
        """Remove every connection of *slot*; False if it had none."""
        kept = [s for s in self._slots if s != slot]
        removed = len(kept) != len(self._slots)
        self._slots = kept
        return removed

    def emit(self, *args: object) -> None:
        for slot in tuple(self._slots):
            slot(*args)

    def __len__(self) -> int:
        return len(self._slots)


@dataclass(eq=False)
class TimerHandle:
    """A scheduled call; ``when`` is on the monotonic clock."""

    when: float
    callback: Callback
    cancelled: bool = field(default=False, init=False)

    def cancel(self) -> None:
        self.cancelled = True


_EPOLLIN = int(select.EPOLLIN)
_EPOLLOUT = int(select.EPOLLOUT)
#: An event that wakes the reader (input, an error, a hang-up) or the
#: writer (output, an error, a hang-up), as ``selectors`` reads epoll's.
_FOR_READER = ~_EPOLLOUT
_FOR_WRITER = ~_EPOLLIN


@dataclass(eq=False)
class _Handlers:
    """What to call when one descriptor is ready.

    Removal clears its fields, so an event already polled for a removed
    reader is ignored rather than delivered to a stale callback; and one
    made in the pass that polled it (the descriptor's number reused) is
    given none of that poll's events.
    """

    made_in: int  # the loop pass it was made in
    reader: Callback | None = None
    writer: Callback | None = None

    def mask(self) -> int:
        return (_EPOLLIN if self.reader else 0) | (_EPOLLOUT if self.writer else 0)


class EventLoop:
    """An epoll loop with readers, writers, timers and signals."""

    def __init__(self) -> None:
        # epoll itself rather than selectors, whose select() alone is some
        # sixty bytecodes a pass: the master makes a few passes per connection.
        self._selector: select.epoll | None = select.epoll()  # close-on-exec
        self._handlers: dict[int, _Handlers] = {}  # what epoll watches, by descriptor
        self._passes = 0  # run_once() calls so far
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._ready: deque[TimerHandle] = deque()  # call_soon: due now, no heap needed
        self._timer_seq = 0
        self._stopping = False
        # Signals: our handlers, what they replaced, and what has arrived.
        self._signal_callbacks: dict[int, Callback] = {}
        self._previous_handlers: dict[int, _SignalHandler] = {}
        self._tripped: set[int] = set()
        self._wakeup_r = -1
        self._wakeup_w = -1
        self._previous_wakeup_fd = -1
        self._exception_handler: ExceptionHandler | None = None

    # -- clock and state ------------------------------------------------

    def time(self) -> float:
        return time.monotonic()

    def is_closed(self) -> bool:
        return self._selector is None

    def set_exception_handler(self, handler: ExceptionHandler | None) -> None:
        """Give each ``Exception`` a callback raises to *handler*; None: let it propagate.

        The error boundary of a program that must not die of a bug in one
        callback (asyncio's ``set_exception_handler``, unicorn's ``rescue``
        in its main loop): *handler* reports it, and the loop goes on.
        """
        self._exception_handler = handler

    def get_exception_handler(self) -> ExceptionHandler | None:
        return self._exception_handler

    def _sel(self) -> select.epoll:
        if self._selector is None:
            raise RuntimeError("the event loop is closed")
        return self._selector

    # -- descriptors ----------------------------------------------------

    def add_reader(self, fd: int | HasFileno, callback: Callback) -> None:
        self._set_handler(_fd_of(fd), callback, reading=True)

    def remove_reader(self, fd: int | HasFileno) -> bool:
        return self._clear_handler(_fd_of(fd), reading=True)

    def add_writer(self, fd: int | HasFileno, callback: Callback) -> None:
        self._set_handler(_fd_of(fd), callback, reading=False)

    def remove_writer(self, fd: int | HasFileno) -> bool:
        return self._clear_handler(_fd_of(fd), reading=False)

    def _set_handler(self, fd: int, callback: Callback, *, reading: bool) -> None:
        sel = self._sel()
        handlers = self._handlers.get(fd)
        if handlers is None:
            handlers = _Handlers(self._passes)
            if reading:
                handlers.reader = callback
            else:
                handlers.writer = callback
            sel.register(fd, handlers.mask())
            self._handlers[fd] = handlers
            return
        mask = handlers.mask()
        if reading:
            handlers.reader = callback
        else:
            handlers.writer = callback
        if handlers.mask() != mask:
            self._modify(fd, handlers)

    def _modify(self, fd: int, handlers: _Handlers) -> None:
        try:
            self._sel().modify(fd, handlers.mask())
        except BaseException:
            del self._handlers[fd]  # as selectors does: a descriptor epoll refused is forgotten
            raise

    def _clear_handler(self, fd: int, *, reading: bool) -> bool:
        if self._selector is None:
            return False
        handlers = self._handlers.get(fd)
        if handlers is None:
            return False
        had = handlers.reader if reading else handlers.writer
        if had is None:
            return False
        if reading:
            handlers.reader = None
        else:
            handlers.writer = None
        if handlers.mask():
            self._modify(fd, handlers)
        else:
            self._unregister(fd)
        return True

    def _unregister(self, fd: int) -> None:
        assert self._selector is not None
        del self._handlers[fd]
        with contextlib.suppress(OSError):  # closed since: epoll has forgotten it already
            self._selector.unregister(fd)

    # -- timers ---------------------------------------------------------

    def call_soon(self, callback: Callback) -> TimerHandle:
        # The master calls this once per loop pass that dispatches: a
        # plain queue, run after the timers due in the same pass.
        if self._selector is None:
            self._sel()  # raises
        handle = TimerHandle(self.time(), callback)
        self._ready.append(handle)
        return handle

    def call_later(self, delay: float, callback: Callback) -> TimerHandle:
        return self.call_at(self.time() + max(0.0, delay), callback)

    def call_at(self, when: float, callback: Callback) -> TimerHandle:
        self._sel()
        handle = TimerHandle(when, callback)
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, handle))
        return handle

    def _next_timeout(self, limit: float | None) -> float | None:
        if self._ready:
            return 0.0
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return limit
        due_in = max(0.0, self._timers[0][0] - self.time())
        return due_in if limit is None else min(limit, due_in)

    def _run_due_timers(self) -> None:
        # Only timers due now run in this pass; a timer scheduled by one of
        # them runs in the next pass, so call_soon() cannot starve I/O.
        timers, ready = self._timers, self._ready
        due: list[TimerHandle] = []
        if timers:
            now = self.time()
            while timers and timers[0][0] <= now:
                due.append(heapq.heappop(timers)[2])
        if ready:
            due += ready  # what is there now: a callback's call_soon() waits for the next pass
            ready.clear()
        elif not due:
            return  # most passes that handle I/O
        for index, handle in enumerate(due):
            if handle.cancelled:
                continue
            handle.cancelled = True  # a handle fires once
            try:
                handle.callback()
            except Exception as exc:
                if self._exception_handler is not None:
                    self._exception_handler(handle.callback, exc)
                    continue
                self._keep_timers(due[index + 1 :])
                raise
            except BaseException:
                self._keep_timers(due[index + 1 :])
                raise

    def _keep_timers(self, handles: list[TimerHandle]) -> None:
        """Put back timers that were due but not run (a callback raised)."""
        for handle in handles:
            self._timer_seq += 1
            heapq.heappush(self._timers, (handle.when, self._timer_seq, handle))

    # -- signals --------------------------------------------------------

    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        """Call *callback* in the loop whenever *signum* arrives.

        Must be called from the main thread (as ``signal.signal``).
        """
        self._sel()
        self._ensure_wakeup_pipe()
        if signum not in self._signal_callbacks:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        self._signal_callbacks[signum] = callback
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})  # blocked across an upgrade's exec

    def remove_signal_handler(self, signum: int) -> bool:
        if signum not in self._signal_callbacks:
            return False
        del self._signal_callbacks[signum]
        self._tripped.discard(signum)
        previous = self._previous_handlers.pop(signum)
        # None means a handler installed outside Python: the best we can do
        # is the default disposition.
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        return True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs between bytecodes of the main thread: record, nothing more.
        self._tripped.add(signum)

    def _ensure_wakeup_pipe(self) -> None:
        if self._wakeup_r >= 0:
            return
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except BaseException:
            os.close(r)
            os.close(w)
            raise
        self._wakeup_r, self._wakeup_w, self._previous_wakeup_fd = r, w, previous
        self._set_handler(r, self._on_wakeup, reading=True)

    def _on_wakeup(self) -> None:
        order = self._drain_wakeup_pipe()
        arrived: set[int] = set()
        while self._tripped:
            arrived.add(self._tripped.pop())  # set.pop is atomic w.r.t. handlers
        # Arrival order where the pipe kept it, then anything it lost.
        ordered = [s for s in dict.fromkeys(order) if s in arrived]
        ordered += sorted(arrived.difference(ordered))
        for signum in ordered:
            callback = self._signal_callbacks.get(signum)
            if callback is None:
                continue
            try:
                callback()
            except Exception as exc:
                if self._exception_handler is None:
                    raise
                self._exception_handler(callback, exc)

    def _drain_wakeup_pipe(self) -> list[int]:
        data = bytearray()
        while True:
            try:
                chunk = os.read(self._wakeup_r, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        return list(data)

    # -- running --------------------------------------------------------

    def run(self) -> None:
        """Run until ``stop()``; a ``stop()`` before ``run()`` makes it return at once."""
        try:
            while not self._stopping:
                self.run_once()
        finally:
            self._stopping = False

    def run_once(self, timeout: float | None = None) -> None:
        """Wait up to *timeout* seconds (None: until something is due) and dispatch."""
        sel = self._selector
        if sel is None:
            sel = self._sel()  # raises
        wait = self._next_timeout(timeout)
        if self._tripped:
            wait = 0.0
        registered = self._handlers
        if wait is None and not registered:
            raise RuntimeError("run_once() would block forever: nothing is registered")
        self._passes = polled = self._passes + 1
        # epoll.poll() waits forever for any negative timeout; here, as with
        # selectors, only None does, and a negative one polls.
        events = sel.poll(-1 if wait is None else wait if wait > 0 else 0, len(registered) or 1)
        for fd, event in events:
            handlers = registered.get(fd)
            if handlers is None or handlers.made_in == polled:
                continue  # unregistered by an earlier callback of this pass, or new since the poll
            # A reader or writer removed by an earlier callback is None by now.
            if event & _FOR_READER and (reader := handlers.reader) is not None:
                try:
                    reader()
                except Exception as exc:
                    if self._exception_handler is None:
                        raise
                    self._exception_handler(reader, exc)
            if event & _FOR_WRITER and (writer := handlers.writer) is not None:
                try:
                    writer()
                except Exception as exc:
                    if self._exception_handler is None:
                        raise
                    self._exception_handler(writer, exc)
        if self._tripped and self._wakeup_r >= 0:
            self._on_wakeup()
        self._run_due_timers()

    def stop(self) -> None:
        self._stopping = True

    # -- teardown -------------------------------------------------------

    def close(self) -> None:
        """Unregister everything, restore signal handlers and the wakeup fd."""
        if self._selector is None:
            return
        for signum in list(self._signal_callbacks):
            self.remove_signal_handler(signum)
        if self._wakeup_r >= 0:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
        for fd in list(self._handlers):
            self._unregister(fd)
        self._release()

    def discard_after_fork(self) -> None:
        """In a forked child: drop the parent's loop without touching it.

        The epoll set is shared with the parent across fork, so nothing
        is unregistered; our copies of the selector and the wakeup pipe
        are closed, signals go back to their default dispositions and the
        wakeup fd is unset.
        """
        if self._selector is None:
            return
        for signum in self._signal_callbacks:
            signal.signal(signum, signal.SIG_DFL)
        self._signal_callbacks.clear()
        self._previous_handlers.clear()
        if self._wakeup_r >= 0:
            signal.set_wakeup_fd(-1)
        self._release()

    def _release(self) -> None:
        assert self._selector is not None
        self._selector.close()
        self._selector = None
        self._handlers.clear()
        for fd in (self._wakeup_r, self._wakeup_w):
            if fd >= 0:
                os.close(fd)
        self._wakeup_r = self._wakeup_w = -1
        self._timers.clear()
        self._ready.clear()
        self._tripped.clear()

    def __enter__(self) -> EventLoop:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
