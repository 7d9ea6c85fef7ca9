"""Master hooks, each run in a short-lived child that drops privileges first.

The master never imports or calls a hook: that would put user code in a
process that may be root and that must never block.  A master hook
(``on_starting``, ``when_ready``, ``on_reload``, ``pre_exec``,
``on_exit``) runs in a child forked with ``forking.fork_child`` that,
as the handler check does (``probe``),

1. sets its signal dispositions (the group's signals meant for the
   master ignored; TERM and QUIT kill it) and takes the blocked ones;
2. closes every descriptor but the standard streams, the log file and
   its report pipe (with the garbage collector off, so no inherited
   object's finalizer closes a reused number);
3. drops to ``user``/``group`` exactly as a worker does
   (``privileges.drop_privileges``) and arms its parent-death signal;
4. imports the hook, calls it with its arguments (inherited through the
   fork: nothing is pickled), and writes the error, if any, as bounded
   text on the pipe before it exits.

So a hook observes: it can log, notify, write files as the workers'
user; it cannot change the master.  ``hook_timeout`` bounds every one:
past it the child is killed.

``run_blocking`` is the form for the moments no loop runs (``on_starting``
before the listeners open, ``on_exit`` after the loop ended): it waits
for the child itself, at most ``hook_timeout``.  ``HookRunner`` is the
loop's form: it forks and returns; the master's SIGCHLD reaping tells it
the child's end (``child_exited``), a timer kills a child past its
deadline, and ``then`` (what was waiting for the hook: a USR2 upgrade
for ``pre_exec``) runs once the hook is over, however it ended.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, NoReturn, Protocol

from forkserver.config import Settings
from forkserver.eventloop import EventLoop, TimerHandle
from forkserver.forking import die_with_parent, flush_stdio, fork_child, unblock_signals
from forkserver.hooks import HookError, HookTarget, call, configured, describe
from forkserver.privileges import drop_privileges
from forkserver.workers.boot import close_inherited_fds, log_fds

__all__ = ["HookRunner", "run_blocking"]

log = logging.getLogger("forkserver.master")

#: Bytes of error text a hook's child reports: less than a pipe holds, so
#: the child never blocks on it and the master reads it once, after the reap.
MAX_REPORT: Final = 16 * 1024
#: After a kill, how long the blocking form waits for the reap.
KILL_GRACE: Final = 5.0
_IGNORED: Final = (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH)  # fmt: skip
_DEFAULT: Final = (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD, signal.SIGPIPE)
_EXIT_FAILED: Final = 1


def _child(name: str, target: HookTarget, args: tuple[object, ...], settings: Settings,
           report: int) -> NoReturn:
    """The hook's process (see the module docstring); never returns."""
    code = _EXIT_FAILED
    try:
        gc.disable()
        for signum in _IGNORED:
            signal.signal(signum, signal.SIG_IGN)
        for signum in _DEFAULT:
            signal.signal(signum, signal.SIG_DFL)
        unblock_signals()
        close_inherited_fds({0, 1, 2, report, *log_fds()})
        drop_privileges(settings.user, settings.group)
        die_with_parent(os.getppid(), _EXIT_FAILED)
        call(name, target, *args)
        code = 0
    except BaseException as exc:  # reported; nothing may unwind into the master's frames
        with contextlib.suppress(BaseException):
            text = str(exc) if isinstance(exc, HookError) else f"{type(exc).__name__}: {exc}"
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            tb = "".join(traceback.format_exception(cause))
            os.write(report, f"{text}\n{tb}".encode("utf-8", "replace")[:MAX_REPORT])
    finally:
        flush_stdio()
        os._exit(code)


def _fork(name: str, target: HookTarget, args: tuple[object, ...],
          settings: Settings) -> tuple[int, int]:
    """Fork the hook's child: (pid, read end of its report pipe).  Raises OSError."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        pid = fork_child()
    except BaseException:
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:
        os.close(read_end)
        _child(name, target, args, settings, write_end)
    os.close(write_end)
    return pid, read_end


def _read_report(fd: int) -> str:
    """What the child wrote (it has exited, so this never blocks for long)."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    size = 0
    with contextlib.suppress(BlockingIOError):
        while size < MAX_REPORT and (chunk := os.read(fd, MAX_REPORT - size)):
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _failure(name: str, target: HookTarget, code: int | None, report: str,
             timeout: float) -> str | None:
    """Why the hook failed, in one sentence and its traceback; None if it did not."""
    if code is None:
        return (f"{name} hook {describe(target)} did not finish within {timeout:g} s "
                "(hook_timeout): it was killed")  # fmt: skip
    if code == 0:
        return None
    if report:
        return report.rstrip("\n")
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    return f"{name} hook {describe(target)}: its process {how}"


def run_blocking(name: str, settings: Settings, objects: Mapping[str, HookTarget],
                 *args: object) -> None:
    """Run hook *name* if it is set, waiting at most ``hook_timeout``; raises ``HookError``.

    Only where nothing else reaps children (before the loop, or after it).
    """
    target = configured(settings, objects, (name,)).get(name)
    if target is None:
        return
    timeout = settings.hook_timeout
    try:
        pid, read_end = _fork(name, target, args, settings)
    except OSError as exc:
        raise HookError(f"{name} hook: cannot start its process: {exc.strerror or exc}",
                        hook=name) from None  # fmt: skip
    try:
        code = _wait(pid, timeout)
        failure = _failure(name, target, code, _read_report(read_end), timeout)
    finally:
        os.close(read_end)
    if failure is not None:
        raise HookError(failure, hook=name)


def _wait(pid: int, timeout: float) -> int | None:
    """Reap *pid* within *timeout*: its exit code, or None (then it was killed and reaped)."""
    pidfd = os.pidfd_open(pid)
    try:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([pidfd], [], [], remaining)[0]:
                os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still ours
                select.select([pidfd], [], [], KILL_GRACE)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                return None
            exited, status = os.waitpid(pid, os.WNOHANG)
            if exited:
                return os.waitstatus_to_exitcode(status)
    finally:
        os.close(pidfd)


class ChildProcesses(Protocol):
    """How a hook's child is killed, and reaped on the way out (``pool.Processes``)."""

    def kill(self, pid: int) -> None: ...
    def wait(self, pid: int) -> None: ...


@dataclass(slots=True)
class _Running:
    name: str
    target: HookTarget
    report: int
    timeout: float
    then: Callable[[], None] | None
    timer: TimerHandle | None = None
    timed_out: bool = field(default=False)


class HookRunner:
    """Master hooks from the loop: fork, and hear of the end from the master's reaping."""

    def __init__(self, loop: EventLoop, processes: ChildProcesses,
                 objects: Mapping[str, HookTarget]) -> None:
        self.loop = loop
        self.processes = processes
        self.objects = objects
        self.running: dict[int, _Running] = {}

    def run(self, name: str, settings: Settings, *args: object,
            then: Callable[[], None] | None = None) -> None:
        """Start hook *name* (if it is set) with *args*; *then* once it is over.

        Never raises: a hook that cannot start is logged (``hook_failed``)
        and *then* runs at once, as when no hook is set.
        """
        target = configured(settings, self.objects, (name,)).get(name)
        if target is None:
            if then is not None:
                then()
            return
        try:
            pid, read_end = _fork(name, target, args, settings)
        except OSError as exc:
            _log_failure(name, f"{name} hook: cannot start its process: {exc.strerror or exc}")
            if then is not None:
                then()
            return
        running = _Running(name, target, read_end, settings.hook_timeout, then)
        running.timer = self.loop.call_later(settings.hook_timeout,
                                             lambda: self._timed_out(pid))  # fmt: skip
        self.running[pid] = running
        log.debug("%s hook started (pid %d)", name, pid,
                  extra={"event": "hook_started", "hook": name, "pid": pid})  # fmt: skip

    def _timed_out(self, pid: int) -> None:
        running = self.running.get(pid)
        if running is not None:
            running.timed_out = True
            running.timer = None
            self.processes.kill(pid)  # the reap reports it

    def child_exited(self, pid: int, code: int) -> bool:
        """The master reaped *pid*: True if it was a hook's (then it is logged, *then* runs)."""
        running = self.running.pop(pid, None)
        if running is None:
            return False
        if running.timer is not None:
            running.timer.cancel()
        try:
            report = _read_report(running.report)
        finally:
            os.close(running.report)
        failure = _failure(running.name, running.target, None if running.timed_out else code,
                           report, running.timeout)  # fmt: skip
        if failure is not None:
            _log_failure(running.name, failure)
        if running.then is not None:
            running.then()
        return True

    def close(self) -> None:
        """On the master's way out: kill and reap every hook still running (no *then*)."""
        for pid, running in list(self.running.items()):
            if running.timer is not None:
                running.timer.cancel()
            self.processes.kill(pid)
            self.processes.wait(pid)
            os.close(running.report)
        self.running.clear()


def _log_failure(name: str, text: str) -> None:
    first, _, rest = text.partition("\n")
    log.error("%s", first, extra={"event": "hook_failed", "hook": name, "error": first,
                                  "traceback": rest})  # fmt: skip
