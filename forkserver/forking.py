"""Every fork with the signals a process group may send blocked across it.

A group-directed signal (``kill -HUP -- -PGID``, ``pkill -USR1
forkserver``, a terminal's HUP or INT) reaches every process of the
group, a child that has just been forked included.  Until that child has
set its own dispositions it has the master's: after ``fork`` the
master's Python handlers (which would act on the master's state), after
the child resets them the default action (which kills it).
``fork_child`` blocks those signals across the fork; the child calls
``unblock_signals`` once its own dispositions are set, and whatever
arrived meanwhile is delivered then, to them.

A blocked mask survives ``execve``: a master re-executed by an upgrade
starts with these signals blocked, and its loop unblocks each one as it
installs a handler for it (``EventLoop.add_signal_handler``).  Signals
it never handles stay blocked, which is as good as ignored.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterable
from typing import Final

__all__ = ["FORK_BLOCKED", "die_with_parent", "flush_stdio", "fork_child", "unblock_signals"]

_PR_SET_PDEATHSIG: Final = 1

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
    flush_stdio()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, FORK_BLOCKED)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        raise
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return pid


def unblock_signals(signals: Iterable[int] = FORK_BLOCKED) -> None:
    """In a child of ``fork_child``: take the signals it blocked (or some of them)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def flush_stdio() -> None:
    """Flush Python's standard streams, so a child does not write them out twice."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            continue


def die_with_parent(parent: int, exit_code: int) -> None:
    """Arm ``PR_SET_PDEATHSIG`` (SIGKILL): this child dies with *parent*.

    If *parent* is gone already (it died before the signal was armed),
    leave at once with *exit_code*.  Raises ``OSError`` if prctl fails.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:
        os._exit(exit_code)
