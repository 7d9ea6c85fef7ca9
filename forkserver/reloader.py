"""HUP and ``forkserver ctl reload``: the master's side of a reload.

``Reloader.reload()`` starts a reload in two steps:

1. the check, off the loop: a child process (``probe.ReloadCheck``)
   re-reads and validates the configuration, then drops privileges as a
   worker would and imports the handler; the master's loop reads its
   reports without blocking, under ``reload_timeout``, and keeps serving,
   answering ``forkserver ctl`` and pinging the watchdog meanwhile;
2. once the check passed, a whole new generation of workers starts with
   the new settings (``pool.prepare``: the master's reconciliation
   forks it); the bookkeeping of generations is
   ``forkserver.generations``.  The master then asks:

   * ``commit_if_ready()`` after each loop pass that changed something:
     once every worker of the new generation is ready, it serves and
     every older worker is retired (it finishes its connections, then
     exits); the committed generation is returned;
   * ``abandon(reason)`` when a worker of the new generation died before
     it was ready: the settings go back to what they were (the pool
     forgets the new generation's spec), the new generation is retired,
     the serving one never noticed.

Collaborators, and nothing more: the loop (the check's pipes and
deadline), the pool (as ``ReloadPool``), the notifier (RELOADING=1,
STATUS=), ``Processes`` for the check's child, the lifecycle (read
only: no reload while stopping) and *report* (``ReloadBegun``, so the
master looks again).

Any failure, of any cause (the check cannot be forked, the file is
invalid, the handler does not import, the check dies, says something
malformed or overruns its deadline), is ``reload_failed`` with the
reason, and the running generation keeps serving.  Reloads asked for
while a check runs or a generation starts merge into one more reload
after it.

What a reload cannot change is kept and logged: the listening sockets
(a restart or USR2 changes them), ``preload``, and with ``preload`` the
handler, which lives in the master.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from forkserver import tls_listeners
from forkserver.config import ListenerSettings, Settings
from forkserver.control import AttemptReplies, CommandError, Deferred
from forkserver.errors import ForkserverError
from forkserver.eventloop import EventLoop
from forkserver.generations import Generations
from forkserver.handler import LoadedHandler, WorkerClass
from forkserver.handler import resolve_worker_class as _resolve_class
from forkserver.lifecycle import Lifecycle
from forkserver.pool import WorkerSpec
from forkserver.probe import Checked, CheckFailed, ChildProcesses, ProbeError, ReloadCheck
from forkserver.tls_listeners import ListenerTls
from forkserver.worker_table import WorkerRecord, WorkerState

log = logging.getLogger("forkserver.master")


@dataclass(frozen=True, slots=True)
class ReloadBegun:
    """A new generation was prepared: the master forks its workers."""

    generation: int


class ReloadPool(Protocol):
    """What a reload uses of the pool (``pool.Pool``)."""

    target: int

    @property
    def settings(self) -> Settings: ...
    @property
    def table(self) -> Iterable[WorkerRecord]: ...
    def prepare(self, generation: int, spec: WorkerSpec) -> None: ...
    def forget_generation(self, generation: int) -> None: ...
    def retire_generations(self, which: Callable[[int], bool], cause: str = ...) -> None: ...
    def reset_backoff(self) -> None: ...


class Check(Protocol):
    """A running reload check (``probe.ReloadCheck``)."""

    pid: int | None

    def start(self) -> None: ...
    def owns(self, pid: int) -> bool: ...
    def child_exited(self, code: int) -> None: ...
    def close(self) -> None: ...


class StartCheck(Protocol):
    def __call__(
        self, loop: EventLoop, reload_settings: Callable[[], Settings], *,
        preloaded: LoadedHandler | None, timeout: float,
        done: Callable[[Checked | CheckFailed], None], processes: ChildProcesses,
    ) -> Check: ...


class ReloadNotifier(Protocol):
    def reloading(self) -> None: ...
    def status(self, text: str, *, force: bool = ...) -> None: ...


class Reloader:
    def __init__(
        self,
        loop: EventLoop,
        *,
        pool: ReloadPool,
        notifier: ReloadNotifier,
        processes: ChildProcesses,
        lifecycle: Lifecycle,
        report: Callable[[ReloadBegun], None],
        preloaded: LoadedHandler | None,
        reload_settings: Callable[[], Settings] | None = None,
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.notifier = notifier
        self.processes = processes
        self.lifecycle = lifecycle
        self.report = report
        self.preloaded = preloaded
        self.reload_settings = reload_settings
        #: Makes the check (a test gives a scripted one).
        self.start_check: StartCheck = ReloadCheck
        self.generations = Generations()
        self.last_error: str | None = None
        #: Over the master's life: reloads that committed, and that failed (any way);
        #: the ``time.time()`` of the latest that committed.
        self.completed = 0
        self.failed = 0
        self.last_success: float | None = None
        self._before_target: int | None = None  # to restore if the reload is abandoned
        self._check: Check | None = None
        self.replies = AttemptReplies()  # `ctl reload` answers: one outcome settles them

    @property
    def serving(self) -> int:
        """The generation that serves now."""
        return self.generations.serving

    def serving_target(self, target: int) -> int:
        """How many workers the serving generation keeps: *target*, or during a
        reload the target it had before the reload changed it."""
        return self._before_target if self._before_target is not None else target

    @property
    def reloading(self) -> bool:
        """A check runs, or a new generation starts."""
        return self._check is not None or self.generations.reloading

    @property
    def checking(self) -> bool:
        """A reload's check is running."""
        return self._check is not None

    def reload(self) -> None:
        """Begin a reload with the settings as they are now on disk: start the check."""
        if self.lifecycle.stopping:
            log.warning("reload ignored: the master is stopping", extra={"event": "reload_ignored"})
            return
        if self._check is not None:
            self.generations.again = True
            log.info("reload queued: the check of the previous reload is still running",
                     extra={"event": "reload_queued"})  # fmt: skip
            return
        if not self.generations.request():
            log.info("reload queued: generation %d is still starting", self.generations.starting,
                     extra={"event": "reload_queued"})  # fmt: skip
            return
        current = self.pool.settings
        check = self.start_check(
            self.loop, self.reload_settings or (lambda: current), preloaded=self.preloaded,
            timeout=current.reload_timeout, done=self._checked, processes=self.processes,
        )  # fmt: skip
        try:
            check.start()
        except ProbeError as exc:
            self._failed(str(exc))
            self._again()
            return
        self._check = check
        log.info("reload: checking the configuration and the handler in process %d", check.pid,
                 extra={"event": "reload_checking", "pid": check.pid})  # fmt: skip

    def child_exited(self, pid: int, code: int) -> bool:
        """A reaped child: if it is the check's, the check reads its last words.  Ours?"""
        if self._check is None or not self._check.owns(pid):
            return False
        self._check.child_exited(code)
        return True

    def close(self) -> None:
        """The master is going: a check still running is killed and reaped."""
        check, self._check = self._check, None
        if check is not None:
            check.close()

    def _checked(self, result: Checked | CheckFailed) -> None:
        """The check is over: begin the new generation, or say why not."""
        self._check = None
        if self.lifecycle.stopping:
            return
        if isinstance(result, CheckFailed):
            self._failed(result.reason, detail=result.detail)
            self._again()
            return
        try:
            settings = self._reloadable(result.settings)
            worker_class = _resolve_class(settings.handler, result.kind, settings.worker_class)
            # The new generation's certificates and keys, read here as at start: by
            # the master, not the check child (which has dropped its privileges).
            tls = tls_listeners.load(settings)
        except ForkserverError as exc:
            text = str(exc) or type(exc).__name__
            self._failed(text.splitlines()[0], detail=text)
            self._again()
            return
        self._begin(settings, worker_class, tls)

    def _reloadable(self, settings: Settings) -> Settings:
        """*settings* without the changes a reload cannot make (each one logged)."""
        current = self.pool.settings
        kept: dict[str, Any] = {}
        if _binds(settings.listeners) != _binds(current.listeners):
            kept["listeners"] = current.listeners
            log.warning("the listeners changed in the configuration: a reload keeps the "
                        "listening sockets; restart, or upgrade with USR2, to change them",
                        extra={"event": "reload_listeners_kept"})  # fmt: skip
        if settings.preload != current.preload:
            kept["preload"] = current.preload
            log.warning("preload changed in the configuration: it takes a restart or USR2",
                        extra={"event": "reload_preload_kept"})  # fmt: skip
        if current.preload and settings.handler != current.handler:
            kept["handler"] = current.handler
            log.warning("the handler changed, but with preload it is fixed in the master: "
                        "upgrade with USR2 to change it",
                        extra={"event": "reload_handler_kept"})  # fmt: skip
        return dataclasses.replace(settings, **kept) if kept else settings

    def _begin(self, settings: Settings, worker_class: WorkerClass,
               tls: Mapping[int | None, ListenerTls]) -> None:  # fmt: skip
        pool = self.pool
        self._before_target = pool.target
        if settings.workers != pool.settings.workers:
            pool.target = settings.workers  # else a count set by TTIN/TTOU/scale stands
        generation = self.generations.begin()
        pool.prepare(generation, WorkerSpec.of(settings, worker_class, tls))
        self.notifier.reloading()
        pool.reset_backoff()
        preload = self.preloaded is not None
        if preload:
            what = ("with the configuration as it is now and the handler code as the master "
                    "loaded it (preload): this reloads the configuration only; USR2 loads "
                    "new code")  # fmt: skip
        else:
            what = "with the handler code as it is on disk"
        log.info("reloading: generation %d starts %s", generation, what,
                 extra={"event": "reload_started", "generation": generation,
                        "preload": preload})  # fmt: skip
        self.report(ReloadBegun(generation))

    def commit_if_ready(self) -> int | None:
        """Once the whole new generation is ready it serves and older workers are
        retired: the generation committed, else None."""
        generation = self.generations.starting
        if generation is None:
            return None
        ready = sum(1 for r in self.pool.table
                    if r.generation == generation and r.state is WorkerState.READY)  # fmt: skip
        if ready < self.pool.target:
            return None
        replaced = self.generations.commit()
        self._before_target = None
        self.last_error = None
        self.completed += 1
        self.last_success = time.time()
        self.pool.retire_generations(lambda record_generation: record_generation != generation)
        self.pool.forget_generation(replaced)
        log.info("reload complete: generation %d serves", generation,
                 extra={"event": "reload_completed", "generation": generation})  # fmt: skip
        self.replies.succeeded({"generation": generation})
        self._again()
        return generation

    def abandon(self, reason: str) -> None:
        """A new worker could not start: back to the serving generation, untouched."""
        failed = self.generations.abandon()
        if self._before_target is not None:
            self.pool.target, self._before_target = self._before_target, None
        self.pool.retire_generations(lambda record_generation: record_generation == failed)
        self.pool.forget_generation(failed)  # the settings in force are the serving ones again
        self._failed(reason)
        self._again()

    def _again(self) -> None:
        if self.generations.take_again():
            self.loop.call_soon(self.reload)

    def _failed(self, reason: str, detail: str | None = None) -> None:
        self.last_error = reason
        self.failed += 1
        log.error("reload failed, the running workers keep serving: %s", detail or reason,
                  extra={"event": "reload_failed", "reason": reason})  # fmt: skip
        self.notifier.status(f"reload failed: {reason}", force=True)
        self.replies.failed(f"reload failed: {reason}")

    def control_reload(self) -> Deferred:
        """``forkserver ctl reload``: the reply comes once the reload it asked
        for has completed (the new generation serves) or failed (why)."""
        if self.lifecycle.stopping:
            raise CommandError("the master is stopping")
        reply = self.replies.expect(during_attempt=self.reloading)
        self.reload()
        return reply


def _binds(items: Iterable[ListenerSettings]) -> list[ListenerSettings]:
    """The listeners without their TLS keys, which a reload may change."""
    return [dataclasses.replace(item, tls=()) for item in items]
