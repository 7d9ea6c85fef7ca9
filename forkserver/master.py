"""The master: ``serve()``, the wiring, the signal table and the reconciliation.

``serve(settings)`` checks the handler, opens the listeners (or adopts
those an older master handed over on USR2) and runs a ``Master`` until a
stop completes.  Everything happens in the loop's thread: signals arrive
through ``EventLoop`` (the Python handler only records them), and
``_install_signal_handlers`` is the whole of what each one does
(SIGNALS.md is the operator's view).

The parts, each with the few collaborators it uses (docs/architecture.md
draws them): ``pool.Pool`` owns the worker processes and reports what
happens to them as facts; ``reloader``, ``upgrader``, ``health``,
``commands`` and ``notices`` do one job each; ``lifecycle.Lifecycle`` is
the master's phase; ``status.Snapshot`` is every figure at once.  None
of them calls the master.

The master runs the loop one pass at a time, and after each pass that
changed something it *reconciles*, level-triggered: it reads the facts
reported meanwhile, commits a reload whose generation is ready,
announces readiness (READY=1 once every configured worker is ready),
sends STOP once a stop has nothing queued, tells the pool which slots to
keep filled (a dead worker is replaced after its slot's crash back-off,
a retired one at once), follows the *degraded* state, and ends the loop
once the stop is complete.  If no worker at all has been ready
``startup_timeout`` seconds after the start, the master exits 3.

No exception raised in a callback of the loop ends the master: the
loop's exception handler logs it (``master_error``, with the callback
and the traceback) and the loop goes on; the reconciliation runs under
the same boundary.  Only ``SystemExit`` and ``KeyboardInterrupt`` stop
it, and nothing outside the master's own code can raise those in the
loop (SIGINT is one of the loop's signals).

A ``dispatch = "shared"`` listener is never accepted on here: every
worker inherits it and accepts itself (``workers.shared``), and reports
what it served with SERVED, which frees no credit.  The master still
holds it open, so a reload's or an upgrade's new workers get it too.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final

import setproctitle

from forkserver import channel, startup, status
from forkserver.commands import ControlCommands
from forkserver.config import Settings
from forkserver.control import MAX_WORKERS, ControlServer, open_control
from forkserver.errors import ForkserverError
from forkserver.eventloop import EventLoop, TimerHandle
from forkserver.handler import LoadedHandler, WorkerClass
from forkserver.health import Health
from forkserver.health_answers import HealthFacts, HttpAnswer, Routes, health_facts
from forkserver.health_listener import HealthListener
from forkserver.hookrun import HookRunner, run_blocking
from forkserver.hooks import HookTarget
from forkserver.lifecycle import Event, Lifecycle, Phase, finished, may_replace, stop_workers
from forkserver.listeners import Listener
from forkserver.log import reopen as reopen_logs
from forkserver.metrics import CONTENT_TYPE, Exposition
from forkserver.notices import Notices
from forkserver.pool import (
    ChildExited,
    HandlerFailed,
    Pool,
    PoolFact,
    Processes,
    WorkerExited,
    WorkerReady,
    WorkerSpec,
    describe_exit,
)
from forkserver.privileges import PidFile
from forkserver.ratelimit import LogLimiter
from forkserver.reloader import ReloadBegun, Reloader
from forkserver.statsd import StatsdPush
from forkserver.systemd import Notifier, listen_fds
from forkserver.tls_listeners import ListenerTls
from forkserver.upgrade import Handover
from forkserver.upgrader import HandedOver, TookOver, Upgrader
from forkserver.watch import SourceWatcher, watched_files
from forkserver.worker_table import WorkerRecord, WorkerState
from forkserver.workers import preamble

log = logging.getLogger("forkserver.master")

EXIT_OK: Final = 0
EXIT_NO_WORKER: Final = 3  # no worker became ready within startup_timeout (as gunicorn's 3)
EXIT_UNAVAILABLE: Final = 69  # EX_UNAVAILABLE: a listener could not be opened
EXIT_CONFIG: Final = 78  # EX_CONFIG: the handler or the user/group is unusable
#: At most one ``master_error`` line per callback, and one ``accept_failed``
#: line per listener, per this many seconds (the rest are counted).
ERROR_LOG_INTERVAL: Final = 10.0

Fact = PoolFact | ReloadBegun | HandedOver | TookOver


def serve(
    settings: Settings,
    *,
    reload_settings: Callable[[], Settings] | None = None,
    notifier: Notifier | None = None,
    handler: LoadedHandler | None = None,
    hook_objects: Mapping[str, HookTarget] | None = None,
    raise_failures: bool = False,
) -> int:
    """Run the daemon in this process until it stops; the exit code.

    0 after a requested stop, 78 when the handler, a start hook or the
    user/group is unusable, 69 when a listener cannot be opened (or an
    older master's hand-over is unusable); these failures happen before
    any worker is forked, and with *raise_failures* raise
    ``startup.StartupFailed`` (carrying that code) instead.  3 when no
    worker became ready within ``startup_timeout`` (the handler imports
    in the master's check but not in the workers).  *reload_settings*
    re-reads the configuration on HUP.  *handler* is a handler object
    loaded by the caller (the embedding API): it is used as a preloaded
    one.  *hook_objects* are hooks given as callables, in place of their
    settings.
    """
    try:
        return _serve(settings, reload_settings, notifier, handler, hook_objects or {})
    except startup.StartupFailed as failed:
        if raise_failures:
            raise
        return failed.exit_code


def _serve(
    settings: Settings,
    reload_settings: Callable[[], Settings] | None,
    notifier: Notifier | None,
    loaded: LoadedHandler | None,
    hook_objects: Mapping[str, HookTarget],
) -> int:
    try:
        notifier = notifier if notifier is not None else Notifier.from_environ()
    except ForkserverError as exc:  # a malformed WATCHDOG_USEC: nobody to notify
        raise _cannot_start(Notifier(None), exc, EXIT_CONFIG) from exc
    try:
        handover = Handover.from_environ()
    except ForkserverError as exc:
        raise _cannot_start(notifier, exc, EXIT_UNAVAILABLE) from exc
    try:  # before anything opens a descriptor that could take a closed one's number
        claimed = listen_fds() if handover is None else []
    except ForkserverError as exc:
        raise _cannot_start(notifier, exc, EXIT_UNAVAILABLE) from exc
    try:
        handler, worker_class, tls = startup.preflight(settings, loaded=loaded)
        run_blocking("on_starting", settings, hook_objects, settings)
    except ForkserverError as exc:  # the old master sees end of file
        raise _cannot_start(notifier, exc, EXIT_CONFIG) from exc
    loop = EventLoop()
    try:
        try:
            if handover is not None:
                opened = startup.adopt_handover(handover, settings, loop)
            else:
                opened = startup.open_configured(settings, loop, notifier, claimed)
        except ForkserverError as exc:  # ListenerError, or malformed LISTEN_* variables
            raise _cannot_start(notifier, exc, EXIT_UNAVAILABLE) from exc
        master = Master(
            settings, loop, opened, notifier=notifier, handler=handler,
            worker_class=worker_class, reload_settings=reload_settings, handover=handover,
            hook_objects=hook_objects,
            tls=tls,
        )  # fmt: skip
        code = master.run()
        if master.start_failure is not None:
            raise master.start_failure
        try:
            run_blocking("on_exit", master.settings, hook_objects, master.settings)
        except ForkserverError as exc:
            log.error("%s", exc, extra={"event": "hook_failed", "hook": "on_exit",
                                        "error": str(exc)})  # fmt: skip
        return code
    finally:
        loop.close()


def _cannot_start(notifier: Notifier, exc: ForkserverError, code: int) -> startup.StartupFailed:
    """Log why start-up failed (with the user's traceback, if any); the failure to raise."""
    log.error("cannot start: %s", exc, exc_info=exc.__cause__, extra={"event": "master_failed"})
    notifier.fatal(1, f"cannot start: {str(exc).splitlines()[0]}")
    return startup.StartupFailed(exc, code)


class Master:
    """The supervisor: wires the collaborators, runs the loop, reconciles after each pass.

    For ``serve``: ``run()``.  For the control commands (``commands.Controls``):
    ``scale_to``, ``stop``, ``stop_now``, ``reopen_logs``, ``snapshot``.
    Everything else is the master's own.
    """

    def __init__(
        self,
        settings: Settings,
        loop: EventLoop,
        listeners: list[Listener],
        *,
        notifier: Notifier,
        handler: LoadedHandler | None,
        worker_class: WorkerClass,
        reload_settings: Callable[[], Settings] | None = None,
        handover: Handover | None = None,
        pool_class: type[Pool] = Pool,
        processes: Processes | None = None,
        hook_objects: Mapping[str, HookTarget] | None = None,
        tls: Mapping[int | None, ListenerTls] | None = None,
    ) -> None:
        """*pool_class* and *processes* are for tests that script the workers."""
        self.loop = loop
        self.listeners = listeners
        self.notifier = notifier
        self.lifecycle = Lifecycle()
        self.processes = processes if processes is not None else Processes()
        self.facts: deque[Fact] = deque()  # reported by the collaborators, read after each pass
        report = self.facts.append
        # Listeners the workers accept on themselves (dispatch = "shared").
        shared = {index for index, item in enumerate(listeners) if item.shared}
        self.pool = pool_class(
            loop, spec=WorkerSpec.of(settings, worker_class, tls or {}), listeners=listeners,
            shared=shared, handler=handler, processes=self.processes, report=report,
        )  # fmt: skip
        self.pool.hook_objects = dict(hook_objects or {})
        self.hooks = HookRunner(loop, self.processes, self.pool.hook_objects)
        self.dispatcher = self.pool.dispatcher
        self.dispatcher.listeners = [item for index, item in enumerate(listeners)
                                     if index not in shared]  # fmt: skip
        self.shared = shared
        # Listeners given to us (systemd, fd://, an older master's): left open on stop.
        if handover is not None:
            self.inherited = {i for i, item in enumerate(handover.listeners) if item.inherited}
        else:
            self.inherited = {i for i, item in enumerate(listeners)
                              if item.spec.kind in ("systemd", "fd")}  # fmt: skip
        self.reloader = Reloader(
            loop, pool=self.pool, notifier=notifier, processes=self.processes,
            lifecycle=self.lifecycle, report=report, preloaded=handler,
            reload_settings=reload_settings,
        )  # fmt: skip
        self.upgrader = Upgrader(
            loop, notifier=notifier, processes=self.processes, lifecycle=self.lifecycle,
            listeners=listeners, inherited=self.inherited, report=report, predecessor=handover,
        )  # fmt: skip
        self.health = Health(loop, self.pool, self.lifecycle)
        self.notices = Notices(loop, notifier, snapshot=self.snapshot, charge=self.upgrader)
        self.started = time.time()
        self.control: ControlServer | None = None
        self.health_listener: HealthListener | None = None  # health_bind
        self.metrics = Exposition(self.snapshot)  # metrics_bind, ctl metrics, statsd
        self.metrics_listener: HealthListener | None = None  # metrics_bind, if not health_bind's
        self.statsd = StatsdPush(loop, self.metrics.families, lambda: self.settings)
        self.pid_file: PidFile | None = None
        self.watcher: SourceWatcher | None = None  # reload = true
        self._departing: TimerHandle | None = None  # the drain_delay of a graceful stop
        self.degraded = False  # some slot cannot keep a ready worker (CrashBackoff.failing)
        self.exit_code = EXIT_OK
        #: Why ``start()`` failed, if it did (``serve`` raises it).
        self.start_failure: startup.StartupFailed | None = None
        self._dirty = True  # something the facts do not say changed: reconcile
        self._titled: Settings | None = None  # the settings the process title shows
        self._error_log = LogLimiter(ERROR_LOG_INTERVAL, loop.time)
        self._accept_log = LogLimiter(ERROR_LOG_INTERVAL, loop.time)

    @property
    def settings(self) -> Settings:
        """The settings in force (a reload's as soon as it begins)."""
        return self.pool.settings

    # --- the loop ----------------------------------------------------------

    def run(self) -> int:
        """Start, then loop until a stop is complete; the exit code."""
        failed = self.start()
        if failed is not None:
            return failed
        loop, lifecycle, facts = self.loop, self.lifecycle, self.facts
        try:
            while not lifecycle.done:  # as ``step()``, with the names bound once
                loop.run_once()
                if facts or self._dirty or lifecycle.stopping:
                    self._reconcile_guarded()
        finally:
            self.close()
        return self.exit_code

    def step(self, timeout: float | None = None) -> None:
        """One pass of the loop (up to *timeout* s of waiting), then reconcile if need be."""
        self.loop.run_once(timeout)
        if self.facts or self._dirty or self.lifecycle.stopping:
            self._reconcile_guarded()

    def start(self) -> int | None:
        """Wire the listeners, claim the files, install the signals, fork the first
        workers and arm the timers; an exit code if the master cannot start."""
        self.loop.set_exception_handler(self._internal_error)
        for index, listener in enumerate(self.listeners):
            if index in self.shared:
                listener.pause_accepting()  # for good: the workers accept on it
                continue
            listener.dispatch = self.dispatcher.dispatch
            listener.accept_error.connect(self._accept_failed(listener))
        if self.upgrader.in_charge:  # else once the old master, which holds them, is gone
            try:
                self.claim_files()
            except ForkserverError as exc:
                for listener in self.listeners:
                    listener.close()
                self.start_failure = _cannot_start(self.notifier, exc, EXIT_UNAVAILABLE)
                return EXIT_UNAVAILABLE
        self._install_signal_handlers()
        target = self.pool.target
        log.info(
            "master started: listening on %s, starting %d %s worker%s",
            self.where(), target, self.pool.specs[0].worker_class, "" if target == 1 else "s",
            extra={"event": "master_started", "pid": os.getpid()},
        )  # fmt: skip
        self._warn_trusting_everyone()
        self._reconcile()  # forks the first workers
        self.notices.start()
        self.health.start()
        if self.settings.reload:  # development: a changed source file reloads, as HUP
            self.watcher = SourceWatcher(self.loop, lambda: watched_files(self.settings),
                                         self._source_changed)  # fmt: skip
            self.watcher.start()
        self.statsd.start()
        if self.settings.startup_timeout > 0:
            self.loop.call_later(self.settings.startup_timeout, self._startup_deadline)
        return None

    def _warn_trusting_everyone(self) -> None:
        """A PROXY listener whose allow list is 0.0.0.0/0 or ::/0: said once, at start."""
        tables = [item.table for item in self.listeners]
        names = [item.name for item in self.listeners]
        for step in preamble.for_listeners(self.settings, tables, names):
            if step is not None and step.allow is not None and step.allow.trusts_any:
                log.warning("%s: proxy_allow_from %s lets every peer send a PROXY header, "
                            "so any client that reaches it can claim any address",
                            step.listener, ", ".join(step.allow.entries),
                            extra={"event": "proxy_trusts_any",
                                   "listener": step.listener})  # fmt: skip

    def _install_signal_handlers(self) -> None:
        """Every signal's action: SIGNALS.md says what each one means."""
        signals: dict[int, Callable[[], None]] = {
            signal.SIGCHLD: self.pool.reap,
            signal.SIGTERM: self.stop,
            signal.SIGINT: self.stop_fast,
            signal.SIGQUIT: self.stop_fast,
            signal.SIGHUP: self.reloader.reload,
            signal.SIGTTIN: lambda: self.scale_to(self.pool.target + 1),
            signal.SIGTTOU: lambda: self.scale_to(self.pool.target - 1),
            signal.SIGUSR1: self._on_usr1,
            signal.SIGUSR2: self._on_usr2,
        }
        for signum, callback in signals.items():
            self.loop.add_signal_handler(signum, callback)

    def _internal_error(self, callback: Callable[..., object], exc: Exception) -> None:
        """The error boundary: a bug in one callback is logged, and the master goes on."""
        name = getattr(callback, "__qualname__", None) or repr(callback)
        unlogged = self._error_log.check(name)
        if unlogged is None:
            return
        text = "".join(traceback.format_exception(exc)).rstrip("\n")
        more = f" ({unlogged} more since the last report)" if unlogged else ""
        log.error("internal error in %s, the master carries on%s: %s: %s\n%s",
                  name, more, type(exc).__name__, exc, text,
                  extra={"event": "master_error", "callback": name,
                         "exc_type": type(exc).__name__, "error": str(exc),
                         "traceback": text, "unlogged": unlogged})  # fmt: skip

    def _reconcile_guarded(self) -> None:
        try:
            self._reconcile()
        except Exception as exc:  # the loop's boundary covers this pass too
            self._dirty = True  # the rest of the pass runs after the next event
            self._internal_error(self._reconcile, exc)

    # --- the reconciliation pass ---------------------------------------------

    def _reconcile(self) -> None:
        """Make the world what the state says: one pass, level-triggered."""
        changed = self._dirty or bool(self.facts)
        self._dirty = False
        while self.facts:
            self._on_fact(self.facts.popleft())
        lifecycle, pool = self.lifecycle, self.pool
        if not lifecycle.stopping:
            serving = pool.specs.get(self.reloader.generations.serving)
            committed = self.reloader.commit_if_ready()
            if committed is not None:
                for slot in range(pool.target):
                    pool.backoff.ready(slot)
                self.announce(f"generation {committed}; ")
                old = serving.settings if serving is not None else self.settings
                self.hooks.run("on_reload", self.settings, old, self.settings)
            ready = pool.table.count(WorkerState.READY)
            if lifecycle.phase is Phase.STARTING and ready >= pool.target:
                self.announce()
        pending = bool(self.dispatcher.pending)
        if stop_workers(lifecycle.phase, pending=pending):
            pool.stop_all()
        pool.keep(self._wanted(pending))
        if changed:
            self._update_degraded()
            if self._titled is not self.settings:
                self._titled = self.settings
                setproctitle.setproctitle(self._title())
            self.notices.status()
        if finished(lifecycle.phase, workers=len(pool.table), pending=bool(self.dispatcher.pending),
                    respawn_due=pool.respawn_due()):  # fmt: skip
            lifecycle.fire(Event.FINISHED)

    def _wanted(self, pending: bool) -> set[tuple[int, int]]:
        """The (generation, slot) pairs that should have a worker now.

        Every slot of the target in the serving generation, and in the
        starting one during a reload; a reload that raises the target
        forks the new slots in its own generation only.
        """
        if not may_replace(self.lifecycle.phase, pending=pending):
            return set()
        generations, target = self.reloader.generations, self.pool.target
        wanted = {(generations.serving, slot)
                  for slot in range(min(target, self.reloader.serving_target(target)))}  # fmt: skip
        if generations.starting is not None:
            wanted.update((generations.starting, slot) for slot in range(target))
        return wanted

    def _on_fact(self, fact: Fact) -> None:
        generations = self.reloader.generations
        match fact:
            case WorkerReady(record=record):
                if record.generation == generations.serving:
                    self.pool.backoff.ready(record.slot)
            case WorkerExited(record=record, how=how, planned=planned, lifetime=lifetime):
                starting = record.generation == generations.starting
                if starting and record.state is WorkerState.STARTING:
                    reason = f"worker {record.slot} of the new generation {how} before it was ready"
                    self.reloader.abandon(reason)
                    self.notifier.ready(f"listening on {self.where()}; reload failed: {reason}")
                elif not planned and not record.retired and (
                    (record.generation, record.slot) in self._wanted(bool(self.dispatcher.pending))
                ):
                    self.pool.crashed(record, lifetime)
            case HandlerFailed(record=record, error=error):
                self._handler_error(record, error)
            case ChildExited(pid=pid, code=code):
                if self.hooks.child_exited(pid, code):
                    pass
                elif not self.upgrader.child_exited(pid, describe_exit(code)):
                    self.reloader.child_exited(pid, code)  # anything else is not ours to mourn
            case HandedOver():
                self._stop(Event.HANDED_OVER)
            case TookOver(old_pid=old_pid):
                self._took_over(old_pid)
            case _:  # WorkerRetired, RespawnDue, ReloadBegun: the pass itself acts on them
                pass

    def _handler_error(self, record: WorkerRecord, error: channel.HandlerError) -> None:
        names = [listener.name for listener in self.listeners]
        listener = names[error.listener] if error.listener < len(names) else str(error.listener)
        log.error(
            "worker %d (pid %d): handler raised %s: %s (peer %s, listener %s)\n%s",
            record.slot, record.pid, error.exc_type, error.message, error.peer, listener,
            error.traceback.rstrip("\n"),
            extra={"event": "handler_error", "slot": record.slot, "pid": record.pid,
                   "exc_type": error.exc_type, "error": error.message, "peer": error.peer,
                   "listener": listener, "traceback": error.traceback},
        )  # fmt: skip

    def announce(self, detail: str = "") -> None:
        """Every worker is ready (at start, or after a reload): tell systemd.

        A master started by USR2 tells the old master instead; READY=1
        follows once systemd knows its pid (see ``upgrader``).
        """
        text = self.snapshot().ready_text(detail)
        if self.lifecycle.phase is not Phase.STARTING:
            self.notifier.ready(text)  # READY=1 again: a reload is complete
            return
        self.lifecycle.fire(Event.READY)
        ready = self.pool.table.count(WorkerState.READY)
        log.info("%s%d of %d workers ready: serving", detail, ready, self.pool.target,
                 extra={"event": "master_ready", "workers": ready})  # fmt: skip
        if self.upgrader.in_charge:
            self.notifier.ready(text)
        else:
            self.upgrader.report_ready()
        self.hooks.run("when_ready", self.settings, self.snapshot().control())

    def _startup_deadline(self) -> None:
        """No worker ready ``startup_timeout`` after the start: give up, exit 3."""
        if self.pool.ever_ready or self.lifecycle.stopping:
            return
        exits = sorted({h.last_exit for h in self.pool.history.values() if h.last_exit})
        how = f" (workers exited: {', '.join(exits)})" if exits else ""
        timeout = self.settings.startup_timeout
        reason = f"no worker became ready within startup_timeout ({timeout:g} s)"
        log.error("%s%s: giving up, exit status %d", reason, how, EXIT_NO_WORKER,
                  extra={"event": "master_failed", "reason": reason,
                         "exit_code": EXIT_NO_WORKER})  # fmt: skip
        self.exit_code = EXIT_NO_WORKER
        if self.upgrader.in_charge:
            self.notifier.status(f"cannot start: {reason}", force=True)
        self.stop_now()

    def claim_files(self) -> None:
        """The pid file and the control socket; raises ForkserverError."""
        if self.settings.pid_file:
            pid_file = PidFile(self.settings.pid_file)
            pid_file.acquire()
            self.pid_file = pid_file
        commands = ControlCommands(self.loop, controls=self, pool=self.pool,
                                   reloader=self.reloader, lifecycle=self.lifecycle)  # fmt: skip
        self.control = open_control(self.loop, self.settings, commands.table())
        if self.control is not None:
            self.pool.after_fork.append(self.control.discard_after_fork)
        if self.settings.health_bind and self.health_listener is None:
            routes = Routes()
            if self.settings.metrics_bind == self.settings.health_bind:  # one listener for both
                routes.add("/metrics", self._metrics_answer)
            health = HealthListener(self.loop, self.settings.health_bind, self.health_facts,
                                    routes)  # fmt: skip
            health.start()
            self.health_listener = health
            self.pool.after_fork.append(health.discard_after_fork)
        self._open_metrics()

    def _open_metrics(self) -> None:
        """``metrics_bind`` when it is not ``health_bind``: HTTP GET /metrics only."""
        bind = self.settings.metrics_bind
        if not bind or bind == self.settings.health_bind or self.metrics_listener is not None:
            return
        routes = Routes(health=False)
        routes.add("/metrics", self._metrics_answer)
        facts = HealthFacts(draining=False, ready_workers=0, capacity=0, load=0)
        listener = HealthListener(self.loop, bind, lambda: facts, routes, agent=False)
        listener.start()
        self.metrics_listener = listener
        self.pool.after_fork.append(listener.discard_after_fork)

    def _metrics_answer(self, facts: HealthFacts) -> HttpAnswer:
        return HttpAnswer(200, self.metrics.text().encode(), CONTENT_TYPE)

    def metrics_text(self) -> str:
        """``forkserver ctl metrics``: the text ``GET /metrics`` answers."""
        return self.metrics.text()

    def health_facts(self) -> HealthFacts:
        """What the health listener answers from: the snapshot's readiness, room, drain."""
        return health_facts(self.snapshot(), ever_ready=self.pool.ever_ready)

    def _took_over(self, old_pid: int) -> None:
        """The older master has gone: the pid file, the control socket, the health
        listener and systemd are ours."""
        try:
            self.claim_files()
        except ForkserverError as exc:
            log.error("after the upgrade: %s", exc, extra={"event": "takeover_failed"})
        self.notifier.ready(self.snapshot().ready_text())
        log.info("the old master (pid %d) has exited: this master is in charge", old_pid,
                 extra={"event": "master_took_over", "pid": os.getpid(),
                        "old_pid": old_pid})  # fmt: skip

    # --- what the state looks like -------------------------------------------

    def snapshot(self) -> status.Snapshot:
        pool, generations = self.pool, self.reloader.generations
        failing = pool.backoff.failing()
        return status.take(
            records=pool.table, history=pool.history, failing=failing,
            respawn_in={slot: pool.respawn_in(generations.serving, slot) for slot in failing},
            phase=self.lifecycle.phase, reloading=self.reloader.reloading,
            generation=generations.serving, last_reload_error=self.reloader.last_error,
            target=pool.target, spawned=pool.spawned, pending=len(self.dispatcher.pending),
            paused=self.dispatcher.paused, listeners=self.listeners, name=self.settings.name,
            started=self.started, monotonic=self.loop.time(), wall=time.time(),
            upgrading=self.upgrader.new is not None, refused=pool.refusals.by_listener(),
            handshakes=pool.handshakes.by_listener(),
            health=self.health_listener.describe() if self.health_listener else None,
            metrics=self._metrics_where(), tallies=self._tallies(),
            queue=self.dispatcher.pending, max_pending=self.dispatcher.max_pending,
        )  # fmt: skip

    def _metrics_where(self) -> str | None:
        listener = self.metrics_listener
        if listener is None and self.settings.metrics_bind == self.settings.health_bind:
            listener = self.health_listener
        return listener.describe() if listener is not None else None

    def _tallies(self) -> status.Tallies:
        pool, reloader, dispatcher = self.pool, self.reloader, self.dispatcher
        return status.Tallies(
            accepted={item.index: item.accepted_total for item in self.listeners},
            taken_back=dispatcher.taken_back, dropped=dispatcher.dropped,
            durations=pool.durations.by_listener(), accept_pauses=dispatcher.pauses,
            exits=pool.exits, handler_errors=pool.error_types.counts(),
            reloads_completed=reloader.completed, reloads_failed=reloader.failed,
            last_reload=reloader.last_success,
        )  # fmt: skip

    def _update_degraded(self) -> None:
        """Log (and tell systemd) when a slot starts or stops failing to keep a worker."""
        failing = self.pool.backoff.failing()
        degraded = bool(failing) and not self.lifecycle.stopping
        if degraded == self.degraded:
            return
        self.degraded = degraded
        if degraded:
            slots = ", ".join(str(slot) for slot in failing)
            log.warning("degraded: the worker of slot%s %s keeps failing; retrying with back-off",
                        "s" if len(failing) > 1 else "", slots,
                        extra={"event": "master_degraded", "slots": list(failing)})  # fmt: skip
        else:
            log.info("recovered: every slot has a ready worker again",
                     extra={"event": "master_recovered"})  # fmt: skip
        self.notices.status(force=True)

    # --- run-time changes ----------------------------------------------------

    def scale_to(self, workers: int) -> None:
        """Keep *workers* workers: the missing slots fork, the highest ones retire."""
        if self.lifecycle.stopping:
            return
        target = self.pool.target
        if not 1 <= workers <= MAX_WORKERS:
            bound = "at least 1 is needed" if workers < 1 else f"at most {MAX_WORKERS} can run"
            log.warning("not scaling to %d workers: %s", workers, bound,
                        extra={"event": "workers_scaled", "target": target,
                               "refused": True})  # fmt: skip
            return
        log.info("scaling from %d to %d workers", target, workers,
                 extra={"event": "workers_scaled", "target": workers,
                        "previous": target})  # fmt: skip
        self.pool.scale(workers)
        self._dirty = True

    def reopen_logs(self) -> None:
        """USR1 and ``ctl reopen-logs``: reopen the log file, here and in every worker.

        Raises ``ConfigError`` when the new file cannot be opened (nothing changes then).
        """
        reopen_logs()
        self.pool.hand_log_file()

    def _source_changed(self, path: str) -> None:
        if not self.lifecycle.stopping:
            self.reloader.reload()

    def _on_usr2(self) -> None:
        """USR2: the ``pre_exec`` hook (if set), then the upgrade, whatever the hook did."""
        self.hooks.run("pre_exec", self.settings, self.settings, then=self.upgrader.start)

    def _on_usr1(self) -> None:
        try:
            self.reopen_logs()
        except ForkserverError as exc:
            log.error("%s", exc, extra={"event": "reopen_failed"})

    # --- stopping ----------------------------------------------------------

    def stop(self) -> None:
        """TERM, ``ctl stop``: stop accepting, serve what was accepted, let workers finish.

        With ``drain_delay`` the master is DEPARTING first: the health answers
        say drain at once, and the listeners keep accepting that long.
        """
        self._stop(Event.DEPART if self.settings.drain_delay > 0 else Event.STOP)

    def stop_fast(self) -> None:
        """INT/QUIT: drop what no worker holds yet, STOP every worker now; again: kill."""
        self._stop(Event.STOP_FAST)

    def stop_now(self) -> None:
        """Kill every worker: ``ctl stop --now``, and the stop deadlines."""
        self._stop(Event.STOP_NOW)

    def _stop(self, event: Event) -> None:
        """Every stop goes through here: the transition, then what it starts."""
        was_stopping = self.lifecycle.stopping
        if not self.lifecycle.fire(event):
            return
        self._dirty = True
        if self.lifecycle.phase is Phase.DEPARTING:
            self._depart()
            return
        if self._departing is not None:  # the delay is over, or cut short
            self._departing.cancel()
            self._departing = None
        if not was_stopping:
            self._stop_accepting(handed_over=event is Event.HANDED_OVER)
        match self.lifecycle.phase:
            case Phase.HALTING:
                dropped = self.dispatcher.close_pending()
                log.info("fast stop: %d queued connections dropped, workers stop now", dropped,
                         extra={"event": "master_stopping", "dropped": dropped,
                                "fast": True})  # fmt: skip
            case Phase.KILLING:
                self.pool.kill_all()
            case _:
                pass

    def _depart(self) -> None:
        """DEPARTING: drain said at once, the stop itself ``drain_delay`` later."""
        delay = self.settings.drain_delay
        self._departing = self.loop.call_later(delay, lambda: self._stop(Event.STOP))
        log.info("draining: the health answers say drain; the listeners accept %g s more, "
                 "then the stop goes on", delay,
                 extra={"event": "master_draining", "drain_delay": delay})  # fmt: skip
        self.notices.status(force=True)

    def _stop_accepting(self, *, handed_over: bool) -> None:
        log.info("stopping: workers finish their connections", extra={"event": "master_stopping"})
        self.notifier.stopping()
        self.dispatcher.listeners = []  # accepting stays off whatever the queue does
        for index, listener in enumerate(self.listeners):
            if index in self.inherited and not handed_over:
                listener.pause_accepting()  # its owner's: its backlog waits for the next start
            else:
                listener.close()
        timeout = self.settings.graceful_timeout
        self.loop.call_later(timeout, self._graceful_timeout)
        self.notices.extend_while(self.loop.time() + timeout, self._draining)

    def _draining(self) -> bool:
        """Do workers still serve what a graceful stop owes?"""
        if self.lifecycle.forced:
            return False
        return bool(self.dispatcher.pending) or any(r.in_flight for r in self.pool.table)

    def _graceful_timeout(self) -> None:
        if self.pool.table:
            log.warning("workers still busy after %g s: killing them",
                        self.settings.graceful_timeout,
                        extra={"event": "master_stopping"})  # fmt: skip
            self.stop_now()

    def close(self) -> None:
        """On the way out: files, children not ours to keep, listeners, channels."""
        if self.control is not None:
            self.control.close()
        if self.health_listener is not None:
            self.health_listener.close()
        if self.metrics_listener is not None:
            self.metrics_listener.close()
        self.statsd.stop()
        if self.pid_file is not None:
            self.pid_file.release()
        self.upgrader.close()
        self.reloader.close()
        self.hooks.close()
        if self.watcher is not None:
            self.watcher.close()
        for listener in self.listeners:
            listener.close()
        self.pool.close()

    # --- helpers -----------------------------------------------------------

    def _accept_failed(self, listener: Listener) -> Callable[..., None]:
        """The listener backs off by itself (``TcpServer``); the log says so now and then."""

        def report(error: object) -> None:
            unlogged = self._accept_log.check(listener.index)
            if unlogged is None:
                return
            more = f" ({unlogged} more since the last report)" if unlogged else ""
            log.error("%s%s", listener.error_string(), more,
                      extra={"event": "accept_failed", "listener": listener.name,
                             "error": str(error), "unlogged": unlogged})  # fmt: skip

        return report

    def where(self) -> str:
        return ", ".join(listener.describe() for listener in self.listeners)

    def _title(self) -> str:
        name = f" [{self.settings.name}]" if self.settings.name else ""
        return f"forkserver: master{name} listening on {self.where()}"


__all__ = ["Master", "describe_exit", "serve"]
