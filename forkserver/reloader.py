"""HUP and ``forkserver ctl reload``: the master's side of a reload.

``Reloader(master).reload()`` re-reads the settings, checks that the
handler still imports (in a short-lived child, as at start-up) and
starts a whole new generation of workers with them; the bookkeeping of
generations is ``forkserver.generations``.  The master calls back:

* ``commit_when_ready()`` each time a worker of the new generation is
  ready: once all are, the new generation serves and every older worker
  is retired (it finishes its connections, then exits);
* ``abandon(reason)`` when a worker of the new generation dies before it
  was ready: the settings go back to what they were, the new
  generation is retired, the serving one never noticed.

What a reload cannot change is kept and logged: the listening sockets
(a restart or USR2 changes them), ``preload``, and with ``preload`` the
handler, which lives in the master.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from forkserver import spawn, startup
from forkserver.config import Settings
from forkserver.control import CommandError
from forkserver.errors import ForkserverError
from forkserver.generations import Generations
from forkserver.handler import WorkerClass
from forkserver.handler import resolve_worker_class as _resolve_class
from forkserver.privileges import resolve as resolve_credentials
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

    def reload(self) -> None:
        """Start a new generation with the settings as they are now on disk."""
        m = self.master
        if m.stopping or m.upgraded:
            log.warning("reload ignored: the master is stopping", extra={"event": "reload_ignored"})
            return
        if not self.generations.request():
            log.info("reload queued: generation %d is still starting", self.generations.starting,
                     extra={"event": "reload_queued"})  # fmt: skip
            return
        try:
            settings = m.reload_settings() if m.reload_settings else m.settings
            settings = self._reloadable(settings)
            worker_class = self._worker_class(settings)
            startup.check_event_loop(settings, worker_class)
            resolve_credentials(settings.user, settings.group)
        except ForkserverError as exc:
            text = str(exc) or type(exc).__name__
            self._failed(text.splitlines()[0], detail=text)
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

    def _worker_class(self, settings: Settings) -> WorkerClass:
        handler = self.master.handler
        if handler is not None:  # preloaded: the code in the master is the code
            kind = handler.kind
        else:
            kind = spawn.probe_handler(settings.handler)  # the code on disk now
        return _resolve_class(settings.handler, kind, settings.worker_class)

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
            what = ("with preload the handler code stays as loaded, so this reloads the "
                    "configuration only (USR2 loads new code)")  # fmt: skip
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

    def control_reload(self) -> dict[str, Any]:
        """``forkserver ctl reload``: begin, and say which generation is starting."""
        if self.master.stopping:
            raise CommandError("the master is stopping")
        before, self.last_error = self.last_error, None
        self.reload()
        if self.last_error is not None:
            raise CommandError(f"reload failed: {self.last_error}")
        if not self.generations.reloading:  # nothing began: keep the previous error on show
            self.last_error = before
        starting = self.generations.starting
        return {"generation": starting if starting is not None else self.generations.serving}

    def add_to_status(self, status: dict[str, Any]) -> None:
        """Fill in the generations of ``forkserver ctl status``."""
        m = self.master
        master = status["master"]
        master["generation"] = self.generations.serving
        if self.generations.reloading and not m.stopping:
            master["state"] = "reloading"
        master["last_reload_error"] = self.last_error
        generation = {record.pid: record.generation for record in m.table}
        for worker in status["workers"]:
            worker["generation"] = generation.get(worker["pid"], 0)
