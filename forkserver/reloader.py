"""HUP and ``forkserver ctl reload``: the master's side of a reload.

``Reloader(master).reload()`` starts a reload in two steps:

1. the check, off the loop: a child process (``probe.ReloadCheck``)
   re-reads and validates the configuration, then drops privileges as a
   worker would and imports the handler; the master's loop reads its
   reports without blocking, under ``reload_timeout``, and keeps serving,
   answering ``forkserver ctl`` and pinging the watchdog meanwhile;
2. once the check passed, a whole new generation of workers starts with
   the new settings; the bookkeeping of generations is
   ``forkserver.generations``.  The master calls back:

   * ``commit_when_ready()`` each time a worker of the new generation is
     ready: once all are, the new generation serves and every older
     worker is retired (it finishes its connections, then exits);
   * ``abandon(reason)`` when a worker of the new generation dies before
     it was ready: the settings go back to what they were, the new
     generation is retired, the serving one never noticed.

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
from typing import TYPE_CHECKING, Any

from forkserver.config import Settings
from forkserver.control import AttemptReplies, CommandError, Deferred
from forkserver.errors import ForkserverError
from forkserver.generations import Generations
from forkserver.handler import WorkerClass
from forkserver.handler import resolve_worker_class as _resolve_class
from forkserver.probe import Checked, CheckFailed, ProbeError, ReloadCheck
from forkserver.worker_table import WorkerState

if TYPE_CHECKING:
    from forkserver.master import Master

log = logging.getLogger("forkserver.master")


class Reloader:
    def __init__(self, master: Master) -> None:
        self.master = master
        self.generations = Generations()
        self.last_error: str | None = None
        self._before: tuple[Settings, WorkerClass, int] | None = None
        self._check: ReloadCheck | None = None
        self.replies = AttemptReplies()  # `ctl reload` answers: one outcome settles them

    @property
    def checking(self) -> bool:
        """A reload's check is running."""
        return self._check is not None

    def reload(self) -> None:
        """Begin a reload with the settings as they are now on disk: start the check."""
        m = self.master
        if m.stopping or m.upgraded:
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
        current = m.settings
        check = ReloadCheck(
            m.loop, m.reload_settings or (lambda: current), preloaded=m.handler,
            timeout=current.reload_timeout, done=self._checked,
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

    def owns_child(self, pid: int) -> bool:
        """Is *pid* the reload check's process (for the master's reaping)?"""
        return self._check is not None and self._check.owns(pid)

    def check_exited(self, code: int) -> None:
        """The master reaped the check's process."""
        if self._check is not None:
            self._check.child_exited(code)

    def close(self) -> None:
        """The master is going: a check still running is killed and reaped."""
        check, self._check = self._check, None
        if check is not None:
            check.close()

    def _checked(self, result: Checked | CheckFailed) -> None:
        """The check is over: begin the new generation, or say why not."""
        self._check = None
        m = self.master
        if m.stopping or m.upgraded:
            return
        if isinstance(result, CheckFailed):
            self._failed(result.reason, detail=result.detail)
            self._again()
            return
        try:
            settings = self._reloadable(result.settings)
            worker_class = _resolve_class(settings.handler, result.kind, settings.worker_class)
        except ForkserverError as exc:
            text = str(exc) or type(exc).__name__
            self._failed(text.splitlines()[0], detail=text)
            self._again()
            return
        self._begin(settings, worker_class)

    def _reloadable(self, settings: Settings) -> Settings:
        """*settings* without the changes a reload cannot make (each one logged)."""
        current = self.master.settings
        kept: dict[str, Any] = {}
        if settings.listeners != current.listeners:
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

    def _begin(self, settings: Settings, worker_class: WorkerClass) -> None:
        m = self.master
        self._before = (m.settings, m.worker_class, m.target)
        if settings.workers != m.settings.workers:
            m.target = settings.workers  # else a count set by TTIN/TTOU/scale stands
        m.apply_settings(settings, worker_class)
        generation = self.generations.begin()
        m.notifier.reloading()
        m.backoff.reset()
        preload = m.handler is not None
        if preload:
            what = ("with the configuration as it is now and the handler code as the master "
                    "loaded it (preload): this reloads the configuration only; USR2 loads "
                    "new code")  # fmt: skip
        else:
            what = "with the handler code as it is on disk"
        log.info("reloading: generation %d starts %s", generation, what,
                 extra={"event": "reload_started", "generation": generation,
                        "preload": preload})  # fmt: skip
        for slot in range(m.target):
            m.spawn(slot, generation)

    def commit_when_ready(self) -> None:
        """Once the whole new generation is ready it serves; older workers are retired."""
        m = self.master
        generation = self.generations.starting
        ready = sum(1 for r in m.table
                    if r.generation == generation and r.state is WorkerState.READY)  # fmt: skip
        if generation is None or ready < m.target:
            return
        self.generations.commit()
        self._before = None
        self.last_error = None
        m.retire_all(lambda record_generation: record_generation != generation)
        log.info("reload complete: generation %d serves", generation,
                 extra={"event": "reload_completed", "generation": generation})  # fmt: skip
        self.replies.succeeded({"generation": generation})
        m.announce(ready, f"generation {generation}; ")
        self._again()

    def abandon(self, reason: str) -> None:
        """A new worker could not start: back to the serving generation, untouched."""
        m = self.master
        failed = self.generations.abandon()
        if self._before is not None:
            settings, worker_class, m.target = self._before
            self._before = None
            m.apply_settings(settings, worker_class)
        m.retire_all(lambda record_generation: record_generation == failed)
        self._failed(reason)
        m.notifier.ready(f"listening on {m.where()}; reload failed: {reason}")
        self._again()

    def _again(self) -> None:
        if self.generations.take_again():
            self.master.loop.call_soon(self.reload)

    def _failed(self, reason: str, detail: str | None = None) -> None:
        self.last_error = reason
        log.error("reload failed, the running workers keep serving: %s", detail or reason,
                  extra={"event": "reload_failed", "reason": reason})  # fmt: skip
        self.master.notifier.status(f"reload failed: {reason}", force=True)
        self.replies.failed(f"reload failed: {reason}")

    def control_reload(self) -> Deferred:
        """``forkserver ctl reload``: the reply comes once the reload it asked
        for has completed (the new generation serves) or failed (why)."""
        if self.master.stopping:
            raise CommandError("the master is stopping")
        reply = self.replies.expect(during_attempt=self.checking or self.generations.reloading)
        self.reload()
        return reply

    def add_to_status(self, status: dict[str, Any]) -> None:
        """Fill in the generations of ``forkserver ctl status``."""
        m = self.master
        master = status["master"]
        master["generation"] = self.generations.serving
        if (self.generations.reloading or self.checking) and not m.stopping:
            master["state"] = "reloading"
        master["last_reload_error"] = self.last_error
        generation = {record.pid: record.generation for record in m.table}
        for worker in status["workers"]:
            worker["generation"] = generation.get(worker["pid"], 0)
