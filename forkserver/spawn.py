"""Forking: the primitive every fork of the master goes through, and the worker fork.

``fork_child`` (from ``forking``, re-exported here) is how the master
forks anything: the signals a process group or ``pkill`` may send (the
master's HUP, TERM, USR1, ...) are blocked across the fork, so a child
never runs the master's handlers nor dies of the default action before
it has set its own dispositions; the child calls ``unblock_signals``
once it has (a worker does in ``workers.boot``).  (A blocked mask
survives ``execve``: a re-executed master unblocks once its loop
handles them.)

The handler check, the other child the master forks, is ``forkserver.probe``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from typing import NoReturn

from forkserver.eventloop import EventLoop
from forkserver.forking import FORK_BLOCKED, fork_child, unblock_signals
from forkserver.stackdump import StackDumps
from forkserver.workers.boot import report_failure, worker_main
from forkserver.workers.core import EXIT_BOOT_ERROR, WorkerContext

__all__ = ["FORK_BLOCKED", "fork_child", "fork_worker", "unblock_signals"]


def fork_worker(
    ctx: WorkerContext,
    loop: EventLoop,
    detach: Iterable[socket.socket],
    after_fork: Iterable[Callable[[], None]] = (),
    stack_dumps: StackDumps | None = None,
) -> int:
    """Fork a worker running *ctx*; the child's pid.  Raises OSError.

    In the child, the master's loop is discarded (never unregistered:
    the epoll set is shared with the master), each *after_fork* callback
    lets another master object drop its copies, and the sockets in
    *detach* are detached from their Python objects, so their finalizers
    can never close a descriptor number the worker reuses.  The signals
    a process group may send stay blocked in the child until the worker
    has set its own dispositions (``workers.boot``).  With
    *stack_dumps*, the worker writes its stack dumps to a pipe of its
    own, which *stack_dumps* reads once the worker is reaped.
    """
    read_end = write_end = -1
    if stack_dumps is not None:
        read_end, write_end = stack_dumps.open()
        ctx.stack_dump_fd = write_end
        ctx.keep_fds.add(write_end)
    try:
        pid = fork_child()
    except BaseException:
        if stack_dumps is not None:
            os.close(read_end)
            os.close(write_end)
        raise
    if pid == 0:
        _worker_child(ctx, loop, detach, after_fork)
    if stack_dumps is not None:
        os.close(write_end)
        stack_dumps.started(pid, read_end)
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
    except BaseException as exc:
        report_failure(ctx, exc)
        os._exit(EXIT_BOOT_ERROR)
    worker_main(ctx)
