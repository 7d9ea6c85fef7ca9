"""The handler check: the configuration and the handler tried in a child.

Before the master forks a single worker, and before every reload, the
settings are checked as the workers will use them, in a short-lived
child process forked with ``spawn.fork_child``.  The child

1. sets its own signal dispositions (HUP, INT, USR1, USR2, TTIN, TTOU
   ignored as in a worker; TERM and QUIT kill it), then takes the
   signals ``fork_child`` blocked;
2. closes every descriptor but the standard streams and its report
   pipes, so nothing it runs can touch the listeners, the control socket
   or a worker's channel;
3. on a reload only: re-reads and validates the configuration
   (``reload_settings``, our own code, no user code has run yet), sends
   the settings on pipe A and closes it;
4. checks that the configured user and group can be switched to, drops
   privileges exactly as a worker does (``privileges.drop_privileges``,
   with the umask and working directory the workers get), arms its
   parent-death signal, imports the handler and resolves the worker
   class, and reports the handler's kind, or the error, on pipe B.

The handler's code therefore never runs as root when ``user`` is set,
and never sees a descriptor of the master.  The master trusts nothing
the child says beyond its validated shape: pipe A carries a pickle,
which is acceptable only because nothing but our code ran in the child
before it was written; pipe B carries a short kind name (checked against
``HandlerKind``) or bounded error text, never unpickled.  Each report is
bounded in size, and the whole check in time (``reload_timeout``): a
child past its deadline is killed and reaped.

``check_handler(settings)`` is the blocking form, for start-up and
``check-config`` (nothing else runs then).  ``ReloadCheck`` is the form
the master's loop drives: it reads both pipes without blocking, arms a
timer, and learns of the child's exit from the master's SIGCHLD reaping
(``child_exited``); its ``done`` callback gets a ``Checked`` or a
``CheckFailed``, exactly once, and it never raises out of a callback.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import pickle
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NoReturn, Protocol

from forkserver import spawn
from forkserver.config import ConfigError, Settings
from forkserver.errors import ForkserverError
from forkserver.eventloop import EventLoop, TimerHandle
from forkserver.forking import die_with_parent
from forkserver.handler import (
    HandlerKind,
    HandlerLoadError,
    LoadedHandler,
    WorkerClass,
    load_handler,
    resolve_worker_class,
)
from forkserver.privileges import check_can_switch, drop_privileges
from forkserver.workers.boot import close_inherited_fds

__all__ = ["CheckFailed", "Checked", "ProbeError", "ReloadCheck", "check_credentials",
           "check_event_loop", "check_handler"]

#: Bytes of error text the child may report (a traceback fits easily).
MAX_REPORT: Final = 64 * 1024
#: Bytes of pickled settings on pipe A (256 listeners of 4096-character binds fit).
MAX_SETTINGS: Final = 4 << 20
_KIND: Final = b"K"
_ERROR: Final = b"E"
_SETTINGS: Final = b"S"
#: What a child ignores, as a worker does: group-directed signals meant for the master.
_IGNORED: Final = (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH)  # fmt: skip
_DEFAULT: Final = (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD, signal.SIGPIPE)
_EXIT_FAILED: Final = 1


class ProbeError(ForkserverError):
    """The check could not run, or did not finish in time."""


# --------------------------------------------------------------- the rules


def check_credentials(settings: Settings, *, preload: bool) -> None:
    """Refuse a user/group this process cannot switch to, and preload under root
    with a user switch (the master would import the handler as root)."""
    switching = bool(settings.user or settings.group)
    if preload and switching and os.geteuid() == 0:
        raise ProbeError(
            "preload = true with user/group set, under a root master: the master would "
            "import the handler as root, before any privilege drop; turn preload off "
            "(each worker then imports the handler after dropping to the user), or run "
            "the master itself as that user (systemd User=, with socket activation for "
            "privileged ports)"
        )
    check_can_switch(settings.user, settings.group)


def check_event_loop(settings: Settings, worker_class: WorkerClass) -> None:
    """Refuse ``event_loop = "uvloop"`` for asyncio workers that could not import it."""
    wanted = settings.event_loop == "uvloop" and worker_class == "asyncio"
    if wanted and importlib.util.find_spec("uvloop") is None:
        raise ForkserverError(
            "event_loop = \"uvloop\": the uvloop package is not installed "
            "(pip install 'forkserver[uvloop]')"
        )


def enter(settings: Settings) -> None:
    """Take on the umask and the working directory the daemon runs with.

    ``run`` does it in the master first thing (so workers inherit both);
    ``check-config`` has its check child do it.
    """
    os.umask(settings.umask)
    if settings.chdir:
        try:
            os.chdir(settings.chdir)
        except OSError as exc:
            raise ConfigError(f"cannot change to {settings.chdir}: {exc.strerror}",
                              key="chdir") from None


# --------------------------------------------------------------- the child


def _child(
    settings: Settings | Callable[[], Settings],
    preloaded: LoadedHandler | None,
    pipe_a: int | None,
    pipe_b: int,
    loop: EventLoop | None,
    *,
    entering: bool = False,
) -> NoReturn:
    """The check process (see the module docstring); never returns."""
    code = _EXIT_FAILED
    try:
        gc.disable()  # no finalizer of a parent's object may close a reused descriptor
        if loop is not None:
            loop.discard_after_fork()
        for signum in _IGNORED:
            signal.signal(signum, signal.SIG_IGN)
        for signum in _DEFAULT:
            signal.signal(signum, signal.SIG_DFL)
        spawn.unblock_signals()
        keep = {0, 1, 2, pipe_b} | ({pipe_a} if pipe_a is not None else set())
        close_inherited_fds(keep)
        if callable(settings):
            assert pipe_a is not None
            settings = _send_settings(settings, pipe_a)
        if entering:
            enter(settings)
        _write_all(pipe_b, _check_as_worker(settings, preloaded))
        code = 0
    except BaseException as exc:  # reported; nothing may unwind into the master's frames
        with contextlib.suppress(BaseException):
            _write_all(pipe_b, _ERROR + _error_text(exc))
    finally:
        _flush_stdio()
        os._exit(code)


def _send_settings(reload_settings: Callable[[], Settings], pipe_a: int) -> Settings:
    """Re-read the settings (our code only), send them on pipe A, close it."""
    try:
        settings = reload_settings()
        data = _SETTINGS + pickle.dumps(settings, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:
        _write_all(pipe_a, _ERROR + _error_text(exc, traceback_too=False))
        os.close(pipe_a)
        _flush_stdio()
        os._exit(_EXIT_FAILED)
    _write_all(pipe_a, data)
    os.close(pipe_a)
    return settings


def _check_as_worker(settings: Settings, preloaded: LoadedHandler | None) -> bytes:
    """Become what a worker becomes, then load the handler: the report for pipe B."""
    # The preload in effect: a reload keeps the master's (start-up checked it already).
    check_credentials(settings, preload=preloaded is not None)
    drop_privileges(settings.user, settings.group)
    die_with_parent(os.getppid(), _EXIT_FAILED)  # a check stuck in an import dies too
    if preloaded is not None:  # the code in the master is the code
        spec, kind = preloaded.spec, preloaded.kind
    else:
        spec = settings.handler
        kind = load_handler(spec).kind
    check_event_loop(settings, resolve_worker_class(spec, kind, settings.worker_class))
    return _KIND + kind.value.encode("ascii")


def _error_text(exc: BaseException, *, traceback_too: bool = True) -> bytes:
    """What went wrong, for the report: the message first, then the user's traceback."""
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, ForkserverError):
        text = f"{type(exc).__name__}: {text}"
    cause = exc.__cause__
    if traceback_too and cause is not None:
        text += "\n" + "".join(traceback.format_exception(cause))
    return text.rstrip("\n").encode("utf-8", "backslashreplace")[:MAX_REPORT]


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


# --------------------------------------------------------------- reading reports


def _kind_of(report: bytes) -> HandlerKind:
    """The kind pipe B names, or ProbeError with the child's error text."""
    if report[:1] == _KIND and 1 < len(report) <= 32 and report[1:].isascii():
        try:
            return HandlerKind(report[1:].decode("ascii"))
        except ValueError:
            pass
    elif report[:1] == _ERROR:
        raise ProbeError(_text(report[1:]))
    raise ProbeError(f"the handler check sent a malformed report ({len(report)} bytes)")


def _settings_of(report: bytes) -> Settings:
    """The settings pipe A carries, or ProbeError with the child's error text."""
    if report[:1] == _SETTINGS:
        try:
            settings = pickle.loads(report[1:])  # noqa: S301 - only our code wrote it
        except Exception:
            settings = None
        if isinstance(settings, Settings):
            return settings
    elif report[:1] == _ERROR:
        raise ProbeError(_text(report[1:]))
    raise ProbeError(f"the reload check sent malformed settings ({len(report)} bytes)")


def _text(data: bytes) -> str:
    """Error text from a child: decoded, without control characters but newlines."""
    text = data[:MAX_REPORT].decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() or ch == "\n" else "?" for ch in text) or "error"


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


# --------------------------------------------------------------- start-up


def check_handler(settings: Settings, *, entering: bool = False) -> HandlerKind:
    """Load the handler in a child, as a worker would; its kind.

    Blocks until the child has reported and exited, at most
    ``settings.reload_timeout`` seconds; raises ``ProbeError`` (or
    ``HandlerLoadError``) naming what failed.  With *entering*, the
    child first takes the umask and directory of the settings
    (``enter``), as ``run`` does before it checks.  Nothing else may be
    reaping children meanwhile.
    """
    limit = settings.reload_timeout
    try:
        read_end, write_end = os.pipe()
    except OSError as exc:
        raise ProbeError(f"cannot start the handler check: {exc.strerror or exc}") from None
    try:
        pid = spawn.fork_child()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        raise ProbeError(f"cannot start the handler check: {exc.strerror or exc}") from None
    if pid == 0:
        os.close(read_end)
        _child(settings, None, None, write_end, None, entering=entering)
    os.close(write_end)
    try:
        report, code = _collect(read_end, pid, limit)
    finally:
        os.close(read_end)
    if code is None:
        raise ProbeError(f"the handler import did not finish within {limit:g} s "
                         "(reload_timeout); the check was killed")  # fmt: skip
    if code != 0 and report[:1] != _ERROR:
        raise HandlerLoadError(f"handler {settings.handler!r}: the import check "
                               f"{_describe_exit(code)}")  # fmt: skip
    return _kind_of(report)


def _collect(fd: int, pid: int, limit: float) -> tuple[bytes, int | None]:
    """Read *fd* and reap *pid*, within *limit* seconds; (report, exit code).

    The report is what the pipe held when the child exited (a process the
    handler started may keep the pipe open: its end is not waited for).
    The exit code is None if the deadline passed: the child is then
    killed and reaped.
    """
    deadline = time.monotonic() + limit
    pipe = _Pipe(fd, MAX_REPORT)
    os.set_blocking(fd, False)
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            events = poller.poll(int(remaining * 1000) + 1) if remaining > 0 else []
            if not events:
                os.kill(pid, signal.SIGKILL)  # not reaped yet, so the pid is still ours
                os.waitpid(pid, 0)
                return pipe.data(), None
            if fd >= 0 and pipe.read():
                poller.unregister(fd)
                fd = -1
            exited, status = os.waitpid(pid, os.WNOHANG)
            if exited:
                pipe.read()
                return pipe.data(), os.waitstatus_to_exitcode(status)
    finally:
        os.close(pidfd)


# --------------------------------------------------------------- reload


@dataclass(frozen=True, slots=True)
class Checked:
    """A reload check passed: the new settings, and the kind of their handler."""

    settings: Settings
    kind: HandlerKind


@dataclass(frozen=True, slots=True)
class CheckFailed:
    """A reload check failed: one line for status, and the whole story."""

    reason: str
    detail: str


class _Pipe:
    """One report pipe, read without blocking, to its end or its size limit."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False

    def read(self) -> bool:
        """Read what is there; True once the pipe ended (or overflowed)."""
        while not self.done:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return False
            except OSError:
                chunk = b""
            if not chunk:
                self.done = True
                break
            self.size += len(chunk)
            if self.size > self.limit:
                self.done = True
                break
            self.chunks.append(chunk)
        return True

    @property
    def overflowed(self) -> bool:
        return self.size > self.limit

    def data(self) -> bytes:
        return b"".join(self.chunks)


class ChildProcesses(Protocol):
    """How the check's child is killed and, on the way out, reaped (``pool.Processes``)."""

    def kill(self, pid: int) -> None: ...
    def wait(self, pid: int) -> None: ...


class ReloadCheck:
    """One reload's check, in a child, driven by the master's loop.

    The outcome is decided once the child has exited (so it is reaped
    before ``done`` is called) or, if a SIGKILLed child does not go
    within ``KILL_GRACE``, then.  A failure seen earlier (a deadline
    passed, a pipe overflowed, refused settings) kills the child at once
    and is the reason given.
    """

    #: Seconds a killed child may take to be reaped before the check gives up on it.
    KILL_GRACE: Final = 5.0

    def __init__(
        self,
        loop: EventLoop,
        reload_settings: Callable[[], Settings],
        *,
        preloaded: LoadedHandler | None,
        timeout: float,
        done: Callable[[Checked | CheckFailed], None],
        processes: ChildProcesses,
    ) -> None:
        self.loop = loop
        self.processes = processes
        self.reload_settings = reload_settings
        self.preloaded = preloaded
        self.timeout = timeout
        self.done = done
        self.pid: int | None = None
        self._pipes: list[_Pipe] = []
        self._exit: int | None = None
        self._failure: str | None = None
        self._timer: TimerHandle | None = None
        self._finished = False

    def start(self) -> None:
        """Fork the check; raises ``ProbeError`` if it cannot even start."""
        opened: list[int] = []
        try:
            for _ in range(2):
                opened += os.pipe()
            pid = spawn.fork_child()
        except OSError as exc:
            for fd in opened:
                os.close(fd)
            raise ProbeError(f"cannot start the reload check: {exc.strerror or exc}") from None
        read_a, write_a, read_b, write_b = opened
        if pid == 0:
            os.close(read_a)
            os.close(read_b)
            _child(self.reload_settings, self.preloaded, write_a, write_b, self.loop)
        os.close(write_a)
        os.close(write_b)
        self.pid = pid
        self._pipes = [_Pipe(read_a, MAX_SETTINGS), _Pipe(read_b, MAX_REPORT)]
        for pipe in self._pipes:
            os.set_blocking(pipe.fd, False)
            self.loop.add_reader(pipe.fd, self._reader(pipe))
        self._timer = self.loop.call_later(self.timeout, self._timed_out)

    def owns(self, pid: int) -> bool:
        return self.pid is not None and pid == self.pid

    def child_exited(self, code: int) -> None:
        """The master reaped our child (its ``waitstatus_to_exitcode``)."""
        self._exit = code
        self.pid = None
        for pipe in self._pipes:  # what they hold now is the whole report
            pipe.read()
            pipe.done = True
        self._conclude()

    def close(self) -> None:
        """The master is going: kill the child, reap it, drop the pipes; no callback."""
        self._finished = True
        self._release()
        pid, self.pid = self.pid, None
        if pid is not None:
            self.processes.kill(pid)
            self.processes.wait(pid)

    def _reader(self, pipe: _Pipe) -> Callable[[], None]:
        def readable() -> None:
            if pipe.read():
                self._close_pipe(pipe)
            if pipe.overflowed:
                self._abort(f"the reload check sent more than {pipe.limit} bytes")
            elif pipe is self._pipes[0] and pipe.done and pipe.data():
                try:
                    _settings_of(pipe.data())
                except ProbeError as exc:  # refused: no need to wait for the import
                    self._abort(str(exc))

        return readable

    def _close_pipe(self, pipe: _Pipe) -> None:
        if pipe.fd >= 0:
            self.loop.remove_reader(pipe.fd)
            os.close(pipe.fd)
            pipe.fd = -1

    def _timed_out(self) -> None:
        self._timer = None
        if self._failure is not None:  # killed, and still not reaped
            self._conclude(gave_up=True)
            return
        self._abort(f"the reload check did not finish within {self.timeout:g} s "
                    "(reload_timeout); it was killed")  # fmt: skip

    def _abort(self, reason: str) -> None:
        """Fail with *reason* once the child, killed now, has been reaped."""
        if self._failure is not None or self._finished:
            return
        self._failure = reason
        if self.pid is not None:  # not reaped yet, so the pid is still ours
            self.processes.kill(self.pid)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self.KILL_GRACE, self._timed_out)
        self._conclude()

    def _conclude(self, *, gave_up: bool = False) -> None:
        if self._finished or (self._exit is None and not gave_up):
            return
        if self._failure is not None:
            self._finish(CheckFailed(self._failure.splitlines()[0], self._failure))
            return
        settings_data, kind_data = (pipe.data() for pipe in self._pipes)
        how = _describe_exit(self._exit or 0) if self._exit else ""
        try:
            if how and not settings_data:
                raise ProbeError(f"the reload check {how} before it sent the settings")
            settings = _settings_of(settings_data)
            if how and not kind_data:
                raise ProbeError(f"the reload check {how} while it checked the handler")
            kind = _kind_of(kind_data)
            if how:
                raise ProbeError(f"the reload check {how}")
        except ProbeError as exc:
            detail = str(exc)
            self._finish(CheckFailed(detail.splitlines()[0], detail))
            return
        self._finish(Checked(settings, kind))

    def _finish(self, result: Checked | CheckFailed) -> None:
        self._finished = True
        self._release()
        self.pid = None  # if it was never reaped, the master's reaping takes it quietly
        self.done(result)

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for pipe in self._pipes:
            self._close_pipe(pipe)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            continue
