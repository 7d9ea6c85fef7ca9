"""Forking: the primitive every fork of the master goes through, and the worker fork.

``fork_child`` is how the master forks anything: the signals a process
group or ``pkill`` may send (the master's HUP, TERM, USR1, ...) are
blocked across the fork, so a child never runs the master's handlers nor
dies of the default action before it has set its own dispositions; the
child calls ``unblock_signals`` once it has.  (A blocked mask survives
``execve``: a re-executed master unblocks once its loop handles them.)

The handler check, the other child the master forks, is ``forkserver.probe``.
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
from forkserver.workers.boot import worker_main
from forkserver.workers.core import EXIT_BOOT_ERROR, WorkerContext

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


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            continue
