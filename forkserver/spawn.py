"""Forking: the handler probe and the worker fork.

``fork_child`` is how the master forks anything: the signals a process
group or ``pkill`` may send (the master's HUP, TERM, USR1, ...) are
blocked across the fork, so a child never runs the master's handlers nor
dies of the default action before it has set its own dispositions; the
child calls ``unblock_signals`` once it has.  (A blocked mask survives
``execve``: a re-executed master unblocks once its loop handles them.)

``probe_handler`` imports the handler in a short-lived child so that a
handler that cannot be imported stops start-up before any worker is
forked, while the master itself stays free of the handler's modules
(without ``--preload`` each worker imports the handler fresh, so a
later reload picks up new code).  The cost is one extra import at
start-up.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Final, NoReturn

from forkserver.eventloop import EventLoop
from forkserver.handler import HandlerKind, HandlerLoadError, load_handler
from forkserver.workers.boot import worker_main
from forkserver.workers.core import EXIT_BOOT_ERROR, WorkerContext

_MAX_PROBE_REPORT = 1 << 20
#: What a group-directed signal (``kill -HUP -- -PGID``, a terminal, ``pkill``)
#: may deliver to a child that has not set its own dispositions yet.
FORK_BLOCKED: Final = frozenset({
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH, signal.SIGCHLD,
})  # fmt: skip


def fork_child() -> int:
    """``os.fork()`` with ``FORK_BLOCKED`` blocked in the child; 0 in the child.

    The parent's mask is restored at once; the child must call
    ``unblock_signals()`` once its dispositions are set (signals that
    arrived meanwhile are delivered then, to the child's own handlers).
    """
    _flush_stdio()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, FORK_BLOCKED)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        raise
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return pid


def unblock_signals() -> None:
    """In a child of ``fork_child``: take the signals it blocked."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_BLOCKED)


def fork_worker(
    ctx: WorkerContext,
    loop: EventLoop,
    detach: Iterable[socket.socket],
    after_fork: Iterable[Callable[[], None]] = (),
) -> int:
    """Fork a worker running *ctx*; the child's pid.

    In the child, the master's loop is discarded (never unregistered:
    the epoll set is shared with the master), each *after_fork* callback
    lets another master object drop its copies, and the sockets in
    *detach* are detached from their Python objects, so their finalizers
    can never close a descriptor number the worker reuses.
    """
    _flush_stdio()
    pid = os.fork()
    if pid == 0:
        _worker_child(ctx, loop, detach, after_fork)
    return pid


def _worker_child(
    ctx: WorkerContext,
    loop: EventLoop,
    detach: Iterable[socket.socket],
    after_fork: Iterable[Callable[[], None]],
) -> NoReturn:
    try:
        loop.discard_after_fork()
        for callback in after_fork:
            callback()
        for sock in detach:
            if sock is not ctx.channel:
                sock.detach()
    except BaseException:
        traceback.print_exc()
        os._exit(EXIT_BOOT_ERROR)
    worker_main(ctx)


def probe_handler(spec: str) -> HandlerKind:
    """Import *spec* in a child process; its kind, or ``HandlerLoadError``."""
    _flush_stdio()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _probe_child(spec, write_end)
    os.close(write_end)
    try:
        report = _read_all(read_end)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    kind, _, detail = report.partition("\n")
    try:
        return HandlerKind(kind)
    except ValueError:
        raise HandlerLoadError(detail or f"handler {spec!r}: the import check died") from None


def _probe_child(spec: str, write_end: int) -> NoReturn:
    code = 1
    try:
        try:
            report = load_handler(spec).kind.value + "\n"
            code = 0
        except HandlerLoadError as exc:
            cause = exc.__cause__
            detail = "".join(traceback.format_exception(cause)) if cause is not None else ""
            report = f"error\n{exc}\n{detail}".rstrip("\n")
        data = report.encode("utf-8", "backslashreplace")[:_MAX_PROBE_REPORT]
        while data:
            data = data[os.write(write_end, data) :]
    finally:
        _flush_stdio()
        os._exit(code)


def _read_all(fd: int) -> str:
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(fd, 65536):
        size += len(chunk)
        if size <= _MAX_PROBE_REPORT:
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            continue
