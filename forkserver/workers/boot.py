"""A worker's first steps after fork, then its worker class's loop.

In order:

1. Signals: HUP, USR1, USR2, TTIN, TTOU and INT are ignored (the master
   drives workers over the channel, and ``pkill -HUP`` or a terminal's
   Ctrl-C must not take them down); TERM is "finish and exit" (recorded
   in ``ctx.term_received`` until the worker loop takes it over); QUIT
   exits at once; ABRT dumps every thread's stack, then the worker dies
   of it.  The master forked with these signals blocked
   (``forking.fork_child``); they are unblocked only now, so one sent to
   the whole process group meanwhile is taken by these dispositions,
   never by the master's handlers or the default action.
2. Descriptors: everything but the standard streams, the channel, the
   stack-dump pipe and the log file is closed.  The master's Python
   objects that owned the closed descriptors were detached before (see
   ``spawn.fork_worker``) or stay referenced from frames this process
   never returns to, so no finalizer can later close a reused number.
3. Privileges are dropped (``privileges.drop_privileges``: the whole
   lock-down), then ``PR_SET_PDEATHSIG(SIGKILL)`` is set (a credential
   change clears it), then ``getppid()`` is checked in case the master
   died before that.
4. The descriptor reserve (``workers.reserve``), the process title,
   the ``post_fork`` hook, then the handler (unless preloaded), the
   ``post_worker_init`` hook, then READY.  A hook that raises is a boot
   failure, as a handler that does not import.

Stacks (ABRT, or a crash in C) are written by ``faulthandler`` from C,
which works even while Python code is stuck holding the GIL, to the
stack-dump pipe whose other end the master reads once this process is
gone (``stackdump``).  Everything else a worker has to say goes through
``logging`` with its slot and pid, so a JSON log stays JSON: a boot
failure (``worker_boot_error``), a failure after READY
(``worker_runtime_error``), an exception a handler's thread did not
catch (``worker_thread_error``), an unraisable one
(``worker_unraisable``), and warnings.

The worker never returns into the master's code: ``worker_main`` ends
with ``os._exit``: ``EXIT_OK``, ``EXIT_BOOT_ERROR`` when it failed
before READY, ``EXIT_RUNTIME_ERROR`` after.  A worker whose class's loop
returned (a stop, TERM, the master gone, out of descriptors) first runs
the ``worker_exit`` hook, then the ``atexit`` callbacks registered in
this process (those the master had registered were dropped at fork:
they are the master's to run), then flushes the log; a worker killed by
a signal, or whose boot failed, runs none of them.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import logging
import os
import resource
import signal
import sys
import threading
from collections.abc import Callable
from typing import Final, NoReturn, Protocol

import setproctitle

from forkserver.fdpass import SCM_MAX_FD
from forkserver.forking import die_with_parent, flush_stdio, unblock_signals
from forkserver.handler import HandlerLoadError, load_handler
from forkserver.hooks import HookError, WorkerInfo, call
from forkserver.privileges import drop_privileges
from forkserver.workers.core import (
    EXIT_BOOT_ERROR,
    EXIT_OK,
    EXIT_RUNTIME_ERROR,
    WorkerContext,
)
from forkserver.workers.reserve import DescriptorReserve

log = logging.getLogger("forkserver.worker")

_IGNORED: Final = (
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGINT,
)


def worker_main(ctx: WorkerContext) -> NoReturn:
    """Run the worker; exit the process with its exit code, whatever happens."""
    code = EXIT_BOOT_ERROR
    try:
        code = _boot_and_run(ctx)
    except BaseException as exc:  # nothing may unwind into the master's frames
        code = EXIT_RUNTIME_ERROR if ctx.serving else EXIT_BOOT_ERROR
        report_failure(ctx, exc)
    finally:
        try:
            flush_stdio()  # a log handler flushes every record it writes
        finally:
            os._exit(code)


def report_failure(ctx: WorkerContext, exc: BaseException, what: str = "") -> None:
    """Log why this worker cannot go on, with the traceback, as one event.

    Before READY it is a boot failure (``worker_boot_error``), after it
    a runtime one (``worker_runtime_error``).  *what* says what failed
    (default: the exception's type).  Never raises: it is the last word.
    """
    stage = "runtime" if ctx.serving else "boot"
    detail = what or f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(BaseException):  # a broken log: the exit code still says it
        log.critical(
            "worker %d (pid %d) %s: %s", ctx.slot, os.getpid(),
            "failed" if ctx.serving else "could not start", detail,
            exc_info=exc,
            extra={"event": f"worker_{stage}_error", "slot": ctx.slot, "pid": os.getpid(),
                   "error": detail},
        )  # fmt: skip


def _boot_and_run(ctx: WorkerContext) -> int:
    atexit._clear()  # the master's callbacks (an embedding program's too) are not ours
    for signum in _IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, lambda *_: os._exit(0))  # at once, dropping what it holds
    signal.signal(signal.SIGTERM, lambda *_: setattr(ctx, "term_received", True))
    # ABRT (sent by the master to a silent worker before SIGKILL), and a crash in C:
    # every thread's stack is written from C, even while Python code is stuck.
    dump_to = ctx.stack_dump_fd if ctx.stack_dump_fd >= 0 else sys.stderr
    faulthandler.enable(file=dump_to, all_threads=True)
    unblock_signals()  # blocked across the fork: what arrived meanwhile comes now
    _log_what_would_print(ctx)
    close_inherited_fds({0, 1, 2, ctx.channel.fileno(), *log_fds(), *ctx.keep_fds})
    # The daemon's own code this worker will run (its class, the PROXY reader, the
    # handshake: asyncio, ssl, threads) is loaded now, while the files are still
    # readable: the workers' user may be unable to read the standard library's.
    worker_type = _worker_class(ctx.worker_class)
    if any(step is not None and step.version is not None for step in ctx.preambles):
        import forkserver.proxyread  # noqa: PLC0415
    if any(step is not None and step.tls is not None for step in ctx.preambles):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # its private keys in no core file
        import forkserver.workers.tlsstep  # noqa: F401, PLC0415
    drop_privileges(ctx.user, ctx.group)
    die_with_parent(ctx.master_pid, 0)  # 0: the master died before it was armed
    # Every descriptor one message can carry here (a worker has at most
    # ``concurrency`` connections in flight, and a REOPEN carries one).
    ctx.reserve = DescriptorReserve(min(ctx.concurrency, SCM_MAX_FD))
    setproctitle.setproctitle(worker_title(ctx))
    info = WorkerInfo(slot=ctx.slot, pid=os.getpid(), master_pid=ctx.master_pid,
                      worker_class=ctx.worker_class, handler=ctx.handler_spec,
                      name=ctx.name)  # fmt: skip
    try:
        if "post_fork" in ctx.hooks:
            call("post_fork", ctx.hooks["post_fork"], info)
        if ctx.handler is None:
            ctx.handler = load_handler(ctx.handler_spec)
        if "post_worker_init" in ctx.hooks:
            call("post_worker_init", ctx.hooks["post_worker_init"], info)
    except (HandlerLoadError, HookError) as exc:
        cause = exc.__cause__
        report_failure(ctx, cause if cause is not None else exc, str(exc))
        return EXIT_BOOT_ERROR
    worker = worker_type(ctx)
    code = worker.run()
    _leave(ctx, info, "master gone" if worker.master_gone
           else "out of descriptors" if code != EXIT_OK else "stopped")  # fmt: skip
    return code


def _leave(ctx: WorkerContext, info: WorkerInfo, reason: str) -> None:
    """A graceful exit: ``worker_exit``, this process's ``atexit`` callbacks, the log.

    Each may fail; none stops the exit.  A callback's exception is
    reported by ``atexit`` through ``sys.unraisablehook`` (``worker_unraisable``).
    """
    if "worker_exit" in ctx.hooks:
        try:
            call("worker_exit", ctx.hooks["worker_exit"], info, reason)
        except HookError as exc:
            with contextlib.suppress(BaseException):
                log.error("worker %d (pid %d): %s", ctx.slot, os.getpid(), exc,
                          exc_info=exc.__cause__,
                          extra={"event": "hook_failed", "hook": "worker_exit",
                                 "slot": ctx.slot, "pid": os.getpid(),
                                 "error": str(exc)})  # fmt: skip
    atexit._run_exitfuncs()
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()


def _log_what_would_print(ctx: WorkerContext) -> None:
    """Send what Python would print raw on stderr through ``logging`` instead."""

    def thread_error(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return  # as the default hook: a thread's sys.exit() ends that thread quietly
        name = args.thread.name if args.thread is not None else "?"
        log.error("worker %d (pid %d): thread %s raised %s: %s", ctx.slot, os.getpid(), name,
                  args.exc_type.__name__, args.exc_value,
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
                  extra={"event": "worker_thread_error", "slot": ctx.slot, "pid": os.getpid(),
                         "thread": name})  # fmt: skip

    def unraisable(args: sys.UnraisableHookArgs) -> None:
        what = args.err_msg or "Exception ignored in"
        log.warning("worker %d (pid %d): %s: %r", ctx.slot, os.getpid(), what, args.object,
                    exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
                    extra={"event": "worker_unraisable", "slot": ctx.slot,
                           "pid": os.getpid()})  # fmt: skip

    threading.excepthook = thread_error
    sys.unraisablehook = unraisable
    logging.captureWarnings(True)


def _worker_class(name: str) -> Callable[[WorkerContext], _Runnable]:
    # Imported here: a sync worker never loads asyncio or threads.
    if name == "asyncio":
        from forkserver.workers.aio import AsyncioWorker  # noqa: PLC0415

        return AsyncioWorker
    if name == "thread":
        from forkserver.workers.thread import ThreadWorker  # noqa: PLC0415

        return ThreadWorker
    from forkserver.workers.sync import SyncWorker  # noqa: PLC0415

    return SyncWorker


class _Runnable(Protocol):
    master_gone: bool

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


def log_fds() -> set[int]:
    """Descriptors of the root logger's streams (a log file is kept open)."""
    fds: set[int] = set()
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        try:
            fds.add(stream.fileno())  # type: ignore[union-attr]
        except (AttributeError, OSError, ValueError):
            continue
    return fds
