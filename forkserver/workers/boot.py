"""A worker's first steps after fork, then its worker class's loop.

In order:

1. Signals: HUP, USR1, USR2, TTIN, TTOU and INT are ignored (the master
   drives workers over the channel, and ``pkill -HUP`` or a terminal's
   Ctrl-C must not take them down); TERM is "finish and exit" (recorded
   in ``ctx.term_received`` until the worker loop takes it over); QUIT
   exits at once; ABRT dumps every thread's stack to stderr, then the
   worker dies of it.  The master forked with these signals blocked
   (``forking.fork_child``); they are unblocked only now, so one sent to
   the whole process group meanwhile is taken by these dispositions,
   never by the master's handlers or the default action.
2. Descriptors: everything but the standard streams, the channel and
   the log file is closed.  The master's Python objects that owned the
   closed descriptors were detached before (see ``spawn.fork_worker``)
   or stay referenced from frames this process never returns to, so no
   finalizer can later close a reused number.
3. Privileges are dropped, then ``PR_SET_PDEATHSIG(SIGKILL)`` is set
   (a credential change clears it), then ``getppid()`` is checked in
   case the master died before that.
4. The process title, then the handler (unless preloaded), then READY.

The worker never returns into the master's code: ``worker_main`` ends
with ``os._exit``.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import logging
import os
import signal
import sys
import traceback
from typing import Final, NoReturn, Protocol

import setproctitle

from forkserver.forking import unblock_signals
from forkserver.handler import HandlerLoadError, load_handler
from forkserver.privileges import drop_privileges
from forkserver.workers.core import EXIT_BOOT_ERROR, WorkerContext

_IGNORED: Final = (
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGINT,
)
_PR_SET_PDEATHSIG: Final = 1


def worker_main(ctx: WorkerContext) -> NoReturn:
    """Run the worker; exit the process with its exit code, whatever happens."""
    code = EXIT_BOOT_ERROR
    try:
        code = _boot_and_run(ctx)
    except BaseException:  # nothing may unwind into the master's frames
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                code = code or EXIT_BOOT_ERROR
        os._exit(code)


def _boot_and_run(ctx: WorkerContext) -> int:
    for signum in _IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, lambda *_: os._exit(0))  # at once, dropping what it holds
    signal.signal(signal.SIGTERM, lambda *_: setattr(ctx, "term_received", True))
    # ABRT (sent by the master to a silent worker before SIGKILL), and a crash in C:
    # every thread's stack goes to stderr from C, even while Python code is stuck.
    faulthandler.enable(all_threads=True)
    unblock_signals()  # blocked across the fork: what arrived meanwhile comes now
    close_inherited_fds({0, 1, 2, ctx.channel.fileno(), *_log_fds(), *ctx.keep_fds})
    drop_privileges(ctx.user, ctx.group)
    _die_with_master(ctx.master_pid)
    setproctitle.setproctitle(worker_title(ctx))
    if ctx.handler is None:
        try:
            ctx.handler = load_handler(ctx.handler_spec)
        except HandlerLoadError as exc:
            print(f"forkserver worker {ctx.slot}: {exc}", file=sys.stderr)
            if exc.__cause__ is not None:
                traceback.print_exception(exc.__cause__)
            return EXIT_BOOT_ERROR
    return _worker_class(ctx).run()


def _worker_class(ctx: WorkerContext) -> _Runnable:
    # Imported here: a sync worker never loads asyncio or threads.
    if ctx.worker_class == "asyncio":
        from forkserver.workers.aio import AsyncioWorker  # noqa: PLC0415

        return AsyncioWorker(ctx)
    if ctx.worker_class == "thread":
        from forkserver.workers.thread import ThreadWorker  # noqa: PLC0415

        return ThreadWorker(ctx)
    from forkserver.workers.sync import SyncWorker  # noqa: PLC0415

    return SyncWorker(ctx)


class _Runnable(Protocol):
    def run(self) -> int: ...


def worker_title(ctx: WorkerContext) -> str:
    name = f" [{ctx.name}]" if ctx.name else ""
    return f"forkserver: worker {ctx.slot}{name} {ctx.handler_spec} ({ctx.worker_class})"


def close_inherited_fds(keep: set[int]) -> None:
    """Close every open descriptor not in *keep*."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            # EBADF: the descriptor of the listdir() itself, already closed.
            with contextlib.suppress(OSError):
                os.close(fd)


def _log_fds() -> set[int]:
    """Descriptors of the root logger's streams (a log file is kept open)."""
    fds: set[int] = set()
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        try:
            fds.add(stream.fileno())  # type: ignore[union-attr]
        except (AttributeError, OSError, ValueError):
            continue
    return fds


def _die_with_master(master_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != master_pid:
        os._exit(0)  # the master died before the death signal was armed
