"""The master: one loop that forks, signals, reaps and supervises.

``serve(settings)`` checks the handler, opens the listeners (or adopts
those an older master handed over on USR2), forks the workers and runs
the loop until a stop completes.  Everything happens in the loop's
thread: signals arrive through ``EventLoop`` (the Python signal handler
only records them), children are reaped on SIGCHLD.  SIGNALS.md at the
top of the repository says what every signal does; in short:

========  ==========================================================
TERM      graceful stop: stop accepting (inherited listeners stay
          open for their owner), hand out what was accepted, workers
          finish, ``graceful_timeout`` caps it, exit 0
INT/QUIT  fast stop: queued connections dropped, STOP to every worker
          at once; a second INT or QUIT kills them
HUP       reload: a new generation of workers, the old one retired
          once the new one is ready (``reloader``)
TTIN/TTOU one worker more / fewer (never below 1)
USR1      reopen the log file
USR2      re-execute the master, handing it the listeners (``upgrader``)
CHLD      reap every exited child; unknown children are reaped quietly
========  ==========================================================

Workers report over their channel (see ``channel``): a malformed,
oversized or out-of-place message gets that worker killed and replaced,
never the master.  A worker that dies without being asked to is logged
(WARNING) with its exit code or signal and replaced, after its slot's
crash-loop back-off (``CrashBackoff``); while that keeps a slot without
a ready worker the master is *degraded* (``ctl status``, STATUS=, the
log).  If no worker at all has been ready ``startup_timeout`` seconds
after the start, the master gives up and exits 3.
A healthy worker over ``max_requests`` or ``max_memory`` is retired
(it finishes what it holds) and replaced at once (``recycling``).
Every retirement (reload, scale-down, recycling, ``ctl kill``) is
planned: its exit is logged at INFO with its cause, never counts as a
crash, and a retired worker still running ``graceful_timeout`` seconds
after it was asked to stop is killed.
READY=1 goes to systemd once every configured worker has reported ready.

No exception raised in a callback of the loop ends the master: the
loop's exception handler logs it (``master_error``, with the callback
and the traceback) and the loop goes on.  Only ``SystemExit`` and
``KeyboardInterrupt`` stop it, and nothing outside the master's own
code can raise those in the loop (SIGINT is one of the loop's signals).

A ``dispatch = "shared"`` listener is never accepted on here: every
worker inherits it and accepts itself (``workers.shared``), and reports
what it served with SERVED, which frees no credit.  The master still
holds it open, so a reload's or an upgrade's new workers get it too.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Final

import setproctitle

from forkserver import channel, fdpass, recycling, spawn, startup
from forkserver.commands import ControlCommands
from forkserver.config import Settings
from forkserver.control import MAX_WORKERS, ControlServer, open_control
from forkserver.dispatch import Dispatcher, WorkerLink
from forkserver.errors import ForkserverError
from forkserver.eventloop import EventLoop, TimerHandle
from forkserver.generations import Generations
from forkserver.handler import LoadedHandler, WorkerClass
from forkserver.health import Health
from forkserver.listeners import Listener
from forkserver.log import log_file_copy
from forkserver.log import reopen as reopen_logs
from forkserver.privileges import PidFile
from forkserver.ratelimit import LogLimiter
from forkserver.reloader import Reloader
from forkserver.stackdump import StackDumps
from forkserver.systemd import Notifier, listen_fds
from forkserver.upgrade import Handover
from forkserver.upgrader import Upgrader
from forkserver.worker_table import (
    ALONE_DELAY,
    HEALTHY_LIFETIME,
    PLANNED_CAUSES,
    CrashBackoff,
    SlotHistory,
    TableError,
    WorkerRecord,
    WorkerState,
    WorkerTable,
)
from forkserver.workers.core import EXIT_MEANINGS, HEARTBEAT_INTERVAL, WorkerContext

log = logging.getLogger("forkserver.master")

EXIT_OK: Final = 0
EXIT_NO_WORKER: Final = 3  # no worker became ready within startup_timeout (as gunicorn's 3)
EXIT_UNAVAILABLE: Final = 69  # EX_UNAVAILABLE: a listener could not be opened
EXIT_CONFIG: Final = 78  # EX_CONFIG: the handler or the user/group is unusable
#: Messages read from a dead worker's channel: its last words, bounded.
_READ_BATCH: Final = 64
#: Seconds between STATUS= refreshes while the load changes (only under systemd).
STATUS_TICK: Final = 2.0
#: While a stop drains, systemd is asked every this many seconds for more time.
EXTEND_INTERVAL: Final = 5.0
#: Beyond ``graceful_timeout``: time to kill the stragglers and exit.
EXTEND_MARGIN: Final = 10.0
#: At most one ``master_error`` line per callback, and one ``accept_failed``
#: line per listener, per this many seconds (the rest are counted).
ERROR_LOG_INTERVAL: Final = 10.0


def serve(
    settings: Settings,
    *,
    reload_settings: Callable[[], Settings] | None = None,
    notifier: Notifier | None = None,
) -> int:
    """Run the daemon in this process until it stops; the exit code.

    0 after a requested stop, 78 when the handler or the user/group is
    unusable, 69 when a listener cannot be opened (or an older master's
    hand-over is unusable); these failures happen before any worker is
    forked.  3 when no worker became ready within ``startup_timeout``
    (the handler imports in the master's check but not in the workers).
    *reload_settings* re-reads the configuration on HUP.
    """
    try:
        notifier = notifier if notifier is not None else Notifier.from_environ()
    except ForkserverError as exc:  # a malformed WATCHDOG_USEC: nobody to notify
        return _cannot_start(Notifier(None), exc, EXIT_CONFIG)
    try:
        handover = Handover.from_environ()
    except ForkserverError as exc:
        return _cannot_start(notifier, exc, EXIT_UNAVAILABLE)
    try:  # before anything opens a descriptor that could take a closed one's number
        claimed = listen_fds() if handover is None else []
    except ForkserverError as exc:
        return _cannot_start(notifier, exc, EXIT_UNAVAILABLE)
    try:
        handler, worker_class = startup.preflight(settings)
    except ForkserverError as exc:
        return _cannot_start(notifier, exc, EXIT_CONFIG)  # the old master sees end of file
    loop = EventLoop()
    try:
        try:
            if handover is not None:
                opened = startup.adopt_handover(handover, settings, loop)
            else:
                opened = startup.open_configured(settings, loop, notifier, claimed)
        except ForkserverError as exc:  # ListenerError, or malformed LISTEN_* variables
            return _cannot_start(notifier, exc, EXIT_UNAVAILABLE)
        master = Master(
            settings, loop, opened, notifier=notifier, handler=handler, worker_class=worker_class
        )
        master.reload_settings = reload_settings
        master.handover = handover
        if handover is not None:
            master.inherited = {i for i, item in enumerate(handover.listeners) if item.inherited}
        return master.run()
    finally:
        loop.close()


def _cannot_start(notifier: Notifier, exc: ForkserverError, code: int) -> int:
    """Log why start-up failed (with the user's traceback, if any); the exit code."""
    log.error("cannot start: %s", exc, exc_info=exc.__cause__, extra={"event": "master_failed"})
    notifier.fatal(1, f"cannot start: {str(exc).splitlines()[0]}")
    return code


class Master:
    """The supervisor: owns the loop, the listeners and the workers."""

    def __init__(
        self,
        settings: Settings,
        loop: EventLoop,
        listeners: list[Listener],
        *,
        notifier: Notifier,
        handler: LoadedHandler | None,
        worker_class: WorkerClass,
    ) -> None:
        self.settings = settings
        self.reload_settings: Callable[[], Settings] | None = None
        self.loop = loop
        self.listeners = listeners
        self.notifier = notifier
        self.handler = handler
        self.worker_class = worker_class
        self.capacity = 1 if worker_class == "sync" else settings.concurrency
        self.table = WorkerTable()
        self.backoff = CrashBackoff()
        self.dispatcher = Dispatcher(
            loop, self.table, settings.max_pending_connections, self._violation
        )
        # Listeners the workers accept on themselves (dispatch = "shared").
        self.shared = {index for index, item in enumerate(listeners) if item.shared}
        self.dispatcher.listeners = [item for index, item in enumerate(listeners)
                                     if index not in self.shared]  # fmt: skip
        self.target = settings.workers  # how many workers to keep; TTIN/TTOU/scale change it
        self.started = time.time()
        self.history: dict[int, SlotHistory] = {}
        self.spawned = 0
        self.control: ControlServer | None = None
        self.pid_file: PidFile | None = None
        self.stopping = False
        self.forced = False  # stop at once: no more respawns, pending connections dropped
        self.announced = False
        self.ever_ready = False  # some worker has been ready (startup_timeout is over)
        self.degraded = False  # some slot cannot keep a ready worker (CrashBackoff.failing)
        self.exit_code = EXIT_OK
        # Listeners given to us (systemd, fd://): left open on stop for their owner.
        self.inherited = {i for i, item in enumerate(listeners)
                          if item.spec.kind in ("systemd", "fd")}  # fmt: skip
        self.reloader = Reloader(self)
        self.upgrader = Upgrader(self)
        self.handover: Handover | None = None  # set when an older master started us (USR2)
        self._rng = random.Random()
        # Pending re-forks, by (generation, slot).
        self._respawns: dict[tuple[int, int], TimerHandle] = {}
        self._status_timer: TimerHandle | None = None
        self.health = Health(self)
        self.stack_dumps = StackDumps()  # read when a worker is reaped
        self._deadline = 0.0  # monotonic: when a graceful stop turns into killing
        # Several heartbeats per timeout, so one late beat is not a death sentence.
        self._heartbeat_interval = min(HEARTBEAT_INTERVAL, settings.timeout / 4)
        self._listener_names = tuple(listener.name for listener in listeners)
        self._error_log = LogLimiter(ERROR_LOG_INTERVAL, loop.time)
        self._accept_log = LogLimiter(ERROR_LOG_INTERVAL, loop.time)

    @property
    def generations(self) -> Generations:
        return self.reloader.generations

    @property
    def upgraded(self) -> bool:
        """A newer master took over (USR2): this one drains and exits."""
        return self.upgrader.done

    # --- the loop ----------------------------------------------------------

    def run(self) -> int:
        self.loop.set_exception_handler(self._internal_error)
        for index, listener in enumerate(self.listeners):
            if index in self.shared:
                listener.pause_accepting()  # for good: the workers accept on it
                continue
            listener.dispatch = self.dispatcher.dispatch
            listener.accept_error.connect(self._accept_failed(listener))
        if self.handover is None:  # else once the old master, which holds them, is gone
            try:
                self.claim_files()
            except ForkserverError as exc:
                for listener in self.listeners:
                    listener.close()
                return _cannot_start(self.notifier, exc, EXIT_UNAVAILABLE)
        self._install_signal_handlers()
        setproctitle.setproctitle(self._title())
        log.info(
            "master started: listening on %s, starting %d %s worker%s",
            self.where(), self.target, self.worker_class, "" if self.target == 1 else "s",
            extra={"event": "master_started", "pid": os.getpid()},
        )  # fmt: skip
        for slot in range(self.target):
            self.spawn(slot)
        self._watchdog()
        if self.notifier.enabled:
            self._status_tick()
        self.health.start()
        if self.settings.startup_timeout > 0:
            self.loop.call_later(self.settings.startup_timeout, self._startup_deadline)
        try:
            self.loop.run()
        finally:
            self._shutdown()
        return self.exit_code

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

    def _startup_deadline(self) -> None:
        """No worker ready ``startup_timeout`` after the start: give up, exit 3."""
        if self.ever_ready or self.stopping:
            return
        exits = sorted({h.last_exit for h in self.history.values() if h.last_exit})
        how = f" (workers exited: {', '.join(exits)})" if exits else ""
        timeout = self.settings.startup_timeout
        reason = f"no worker became ready within startup_timeout ({timeout:g} s)"
        log.error("%s%s: giving up, exit status %d", reason, how, EXIT_NO_WORKER,
                  extra={"event": "master_failed", "reason": reason,
                         "exit_code": EXIT_NO_WORKER})  # fmt: skip
        self.exit_code = EXIT_NO_WORKER
        if self.handover is None:
            self.notifier.status(f"cannot start: {reason}", force=True)
        self.stop_now()

    def claim_files(self) -> None:
        """The pid file and the control socket; raises ForkserverError."""
        if self.settings.pid_file:
            pid_file = PidFile(self.settings.pid_file)
            pid_file.acquire()
            self.pid_file = pid_file
        self.control = open_control(self.loop, self.settings, ControlCommands(self).table())

    def _install_signal_handlers(self) -> None:
        signals: dict[int, Callable[[], None]] = {
            signal.SIGCHLD: self._reap,
            signal.SIGTERM: self.stop,
            signal.SIGINT: self.stop_fast,
            signal.SIGQUIT: self.stop_fast,
            signal.SIGHUP: self.reloader.reload,
            signal.SIGTTIN: lambda: self.scale_to(self.target + 1),
            signal.SIGTTOU: lambda: self.scale_to(self.target - 1),
            signal.SIGUSR1: self._on_usr1,
            signal.SIGUSR2: self.upgrader.start,
        }
        for signum, callback in signals.items():
            self.loop.add_signal_handler(signum, callback)

    def _watchdog(self) -> None:
        """WATCHDOG=1 every half of WATCHDOG_USEC: the loop is turning."""
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            if self.handover is None:  # until an upgrade completes, the old master pings
                self.notifier.watchdog()
            self.loop.call_later(interval, self._watchdog)

    def _update_status(self, *, force: bool = False) -> None:
        """A STATUS= summary for systemd (rate-limited by the notifier, unless *force*).

        A master started by USR2 keeps quiet until the old one has gone:
        systemd takes notifications from the main pid only.
        """
        if self.handover is not None:
            return
        self.notifier.status(self._summary(), force=force)
        deadline = self.notifier.status_deadline()
        if deadline is not None and self._status_timer is None:
            self._status_timer = self.loop.call_at(deadline, self._flush_status)

    def _summary(self) -> str:
        """One line for STATUS=: what the service is doing, in numbers."""
        ready = self.table.count(WorkerState.READY)
        busy = sum(1 for record in self.table if record.in_flight)
        served = sum(record.served for record in self.table)
        served += sum(history.served for history in self.history.values())
        state = "stopping" if self.stopping else f"listening on {self.where()}"
        summary = (
            f"{state}; workers {busy} busy/{ready} ready/{self.target}; "
            f"{served} served; {len(self.dispatcher.pending)} queued"
        )
        failing = self.backoff.failing()
        if failing and not self.stopping:
            slots = ", ".join(str(slot) for slot in failing)
            summary += f"; degraded: slot{'s' if len(failing) > 1 else ''} {slots} failing"
        return summary

    def _status_tick(self) -> None:
        """Keep STATUS= current under load, when nothing else changes it."""
        self._update_status()
        self.loop.call_later(STATUS_TICK, self._status_tick)

    def _flush_status(self) -> None:
        self._status_timer = None
        self.notifier.flush_status()

    def _shutdown(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.pid_file is not None:
            self.pid_file.release()
        if self.handover is not None:
            self.handover.close()
        self.upgrader.close()
        self.reloader.close()
        self.stack_dumps.close()
        for listener in self.listeners:
            listener.close()
        for timer in self._respawns.values():
            timer.cancel()
        for pid in tuple(self.dispatcher.links):
            self._requeue(self.dispatcher.remove_link(pid))
        dropped = self.dispatcher.close_pending()
        if dropped:
            log.warning(
                "%d accepted connections were never served",
                dropped,
                extra={"event": "master_stopped", "dropped": dropped},
            )

    def _requeue(self, items: list[tuple[int, int]]) -> None:
        if items:
            self.dispatcher.requeue(items)

    # --- workers -----------------------------------------------------------

    def spawn(self, slot: int, generation: int | None = None) -> None:
        generation = self.generations.serving if generation is None else generation
        self._respawns.pop((generation, slot), None)
        if self.stopping and (self.forced or not self.dispatcher.pending):
            self._finish_if_done()
            return
        if not self.generations.is_live(generation) or slot >= self.target:
            return  # a reload or a scale-down overtook this re-fork
        try:
            master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:  # out of descriptors: try again later, never crash
            self._spawn_failed(slot, exc, generation)
            return
        ctx = WorkerContext(
            slot=slot, master_pid=os.getpid(), channel=worker_end,
            handler_spec=self.settings.handler, worker_class=self.worker_class,
            concurrency=self.capacity, listener_names=self._listener_names,
            name=self.settings.name, user=self.settings.user, group=self.settings.group,
            handler=self.handler, heartbeat_interval=self._heartbeat_interval,
            access_log=self.settings.access_log, shared_listeners=self._shared_fds(),
            event_loop=self.settings.event_loop,
        )  # fmt: skip
        ctx.keep_fds.update(fd for _, fd in ctx.shared_listeners)
        try:
            after_fork = [self.control.discard_after_fork] if self.control else []
            pid = spawn.fork_worker(ctx, self.loop, self._owned_sockets(master_end), after_fork,
                                    self.stack_dumps)  # fmt: skip
        except OSError as exc:
            master_end.close()
            worker_end.close()
            self._spawn_failed(slot, exc, generation)
            return
        master_end.setblocking(False)
        record = self.table.add(slot, pid, self.capacity, self.loop.time(), generation)
        settings = self.settings
        record.request_limit = recycling.request_limit(
            settings.max_requests, settings.max_requests_jitter, self._rng
        )
        # A busy sync worker keeps its next connection queued (see dispatch).
        record.prefetch = 1 if self.worker_class == "sync" else 0
        link = WorkerLink(record=record, sock=master_end, peer=worker_end)
        self.dispatcher.add_link(link)
        self.loop.add_reader(master_end, lambda: self._on_readable(link))
        self.spawned += 1
        history = self.history.setdefault(slot, SlotHistory())
        history.started = time.time()
        log.info("worker %d (pid %d) spawned", slot, pid,
                 extra={"event": "worker_spawned", "slot": slot, "pid": pid,
                        "generation": generation,
                        "request_limit": record.request_limit})  # fmt: skip

    def _spawn_failed(self, slot: int, exc: OSError, generation: int) -> None:
        log.error("cannot start worker %d: %s", slot, exc,
                  extra={"event": "worker_failed", "slot": slot})  # fmt: skip
        delay = self.backoff.died(slot, 0.0, was_ready=False, alone=self._alone())
        self._schedule_respawn(slot, delay, generation)
        self._update_degraded()

    def _shared_fds(self) -> tuple[tuple[int, int], ...]:
        """(index, descriptor) of each shared listener still open, for a new worker."""
        return tuple((index, listener.socket_descriptor())
                     for index, listener in enumerate(self.listeners)
                     if index in self.shared and listener.socket_descriptor() >= 0)  # fmt: skip

    def _owned_sockets(self, master_end: socket.socket) -> list[socket.socket]:
        owned = [master_end]
        for link in self.dispatcher.links.values():
            owned += (link.sock, link.peer)
        for listener in self.listeners:
            sock = listener.listening_socket()
            if sock is not None:
                owned.append(sock)
        return owned

    def _schedule_respawn(self, slot: int, delay: float, generation: int) -> None:
        if delay > 0:
            crashes = self.backoff.crashes(slot)
            log.warning(
                "worker %d crashed (%d in a row): replacing it in %g s",
                slot, crashes, delay,
                extra={"event": "worker_backoff", "slot": slot, "delay": delay,
                       "crashes": crashes},
            )  # fmt: skip
        self._respawns[(generation, slot)] = self.loop.call_later(
            delay, lambda: self.spawn(slot, generation)
        )

    def respawn_in(self, slot: int) -> float | None:
        """Seconds until *slot* of the serving generation is forked again, if it waits."""
        timer = self._respawns.get((self.generations.serving, slot))
        return None if timer is None else round(max(0.0, timer.when - self.loop.time()), 3)

    def _alone(self) -> bool:
        """Is no worker ready to serve?"""
        return self.table.count(WorkerState.READY) == 0

    def _keep_service_up(self) -> None:
        """While no worker is ready, no slot waits more than ``ALONE_DELAY`` for its successor."""
        if not self._alone():
            return
        latest = self.loop.time() + ALONE_DELAY
        for (generation, slot), timer in tuple(self._respawns.items()):
            if timer.when > latest:
                timer.cancel()
                self._schedule_respawn(slot, ALONE_DELAY, generation)

    def _update_degraded(self) -> None:
        """Log (and tell systemd) when a slot starts or stops failing to keep a worker."""
        failing = self.backoff.failing()
        degraded = bool(failing) and not self.stopping
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
        self._update_status(force=True)

    def _cancel_respawns(self, keep: Callable[[int, int], bool] = lambda gen, slot: False) -> None:
        for key in [key for key in self._respawns if not keep(*key)]:
            self._respawns.pop(key).cancel()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            link = self.dispatcher.links.get(pid)
            if link is not None:
                self._worker_exited(link, os.waitstatus_to_exitcode(status))
            elif self.upgrader.is_new_master(pid):
                self.upgrader.new_master_exited(describe_exit(os.waitstatus_to_exitcode(status)))
            elif self.reloader.owns_child(pid):
                self.reloader.check_exited(os.waitstatus_to_exitcode(status))
            # anything else is not ours to mourn

    def _worker_exited(self, link: WorkerLink, code: int) -> None:
        record = link.record
        if not link.killed:
            self._on_readable(link, _READ_BATCH)  # its last words: an error report, say
        self.loop.remove_reader(link.sock)
        self.stack_dumps.collect(record.slot, record.pid)
        reclaimed = self.dispatcher.remove_link(record.pid)
        self._requeue(reclaimed)
        self.table.remove(record.pid)
        lifetime = self.loop.time() - record.started_at
        how = describe_exit(code)
        if code in EXIT_MEANINGS:  # a worker's own failure, boot or runtime
            how += f" ({EXIT_MEANINGS[code]})"
        cause = record.exit_cause or "died"
        planned = cause in PLANNED_CAUSES
        # Planned exits are routine; a death nobody asked for is worth a look.
        level = logging.INFO if planned else logging.WARNING
        log.log(level, "worker %d (pid %d) exited: %s%s", record.slot, record.pid, how,
                "" if cause == "died" else f" ({cause})",
                extra={"event": "worker_exited", "slot": record.slot, "pid": record.pid,
                       "exit_code": code, "cause": cause, "planned": planned,
                       "lifetime": round(lifetime, 3), "served": record.served,
                       "reclaimed": len(reclaimed)})  # fmt: skip
        history = self.history.setdefault(record.slot, SlotHistory())
        history.exited(how, record.served, cause)
        if planned and record.was_ready:
            self.backoff.healthy(record.slot)  # it served until it was retired
        if record.generation == self.generations.starting and record.state is WorkerState.STARTING:
            self.reloader.abandon(f"worker {record.slot} of the new generation {how} "
                                 "before it was ready")  # fmt: skip
        elif self._replaceable(record):
            delay = 0.0
            if not planned:
                delay = self.backoff.died(record.slot, lifetime, was_ready=record.was_ready,
                                          alone=self._alone())  # fmt: skip
            self._schedule_respawn(record.slot, delay, record.generation)
        self._keep_service_up()
        self._update_degraded()
        self.dispatcher.drain_pending()
        self._stop_workers_when_drained()
        self._update_status()
        self._finish_if_done()

    def _replaceable(self, record: WorkerRecord) -> bool:
        """Does this worker, now dead, need a successor?"""
        if record.retired or not self.generations.is_live(record.generation):
            return False  # its successor exists already, or it was meant to go
        # While stopping, a worker is replaced only if accepted connections still need one.
        needed = not self.stopping or (self.dispatcher.pending and not self.forced)
        return bool(needed) and record.slot < self.target

    def _retire(self, link: WorkerLink, cause: str) -> None:
        """Ask a worker to finish what it holds and exit, without a successor.

        *cause* (one of ``PLANNED_CAUSES``) is logged when it exits.  One
        still running ``graceful_timeout`` seconds later is killed.
        """
        record = link.record
        record.retired = True
        if record.exit_cause is None:
            record.exit_cause = cause
        if record.state is not WorkerState.STOPPING and not link.killed:
            self.table.mark_stopping(record.pid)
            self.dispatcher.queue_stop(link)
            timeout = self.settings.graceful_timeout
            self.loop.call_later(timeout, lambda: self._retirement_overdue(link, timeout))

    def _retirement_overdue(self, link: WorkerLink, timeout: float) -> None:
        record = link.record
        if self.dispatcher.links.get(record.pid) is not link or link.killed:
            return  # gone already (reaped: the pid may be someone else's now), or being killed
        log.warning("worker %d (pid %d) still running %g s after it was retired (%s): "
                    "killing it", record.slot, record.pid, timeout, record.exit_cause,
                    extra={"event": "worker_killed", "slot": record.slot, "pid": record.pid,
                           "stage": "graceful_timeout", "cause": record.exit_cause,
                           "in_flight": record.in_flight})  # fmt: skip
        link.killed = True
        os.kill(record.pid, signal.SIGKILL)

    def retire_all(self, generations: Callable[[int], bool], cause: str = "reload") -> None:
        """Retire every worker of the generations chosen, and forget their re-forks."""
        for link in tuple(self.dispatcher.links.values()):
            if generations(link.record.generation):
                self._retire(link, cause)  # it finishes its connections, then exits
        self._cancel_respawns(keep=lambda gen, slot: not generations(gen))

    def apply_settings(self, settings: Settings, worker_class: WorkerClass) -> None:
        """Settings from a reload (or back from a failed one) for the workers to come."""
        self.settings, self.worker_class = settings, worker_class
        self.capacity = 1 if worker_class == "sync" else settings.concurrency
        self.dispatcher.max_pending = settings.max_pending_connections
        self._heartbeat_interval = min(HEARTBEAT_INTERVAL, settings.timeout / 4)
        setproctitle.setproctitle(self._title())

    def _finish_if_done(self) -> None:
        """A stop is complete once no worker is left or due (pending ones are lost)."""
        if not self.stopping or self.table:
            return
        if self.forced or not (self.dispatcher.pending and self._respawns):
            self.loop.stop()

    # --- the channel -------------------------------------------------------

    def _on_readable(self, link: WorkerLink, limit: int = 1) -> None:
        # One message per wake-up: the channel is level-triggered, so more
        # wake the loop again, and a chatty worker cannot starve the rest;
        # reading on to EAGAIN would cost a failed recvmsg per connection.
        for _ in range(limit):
            if self.dispatcher.links.get(link.record.pid) is not link:
                return
            try:
                data, _ = fdpass.recv(link.sock, channel.MAX_MESSAGE_SIZE, 0, nonblocking=True)
                if not data:
                    return
                self._handle(link, channel.decode_worker_message(data))
            except BlockingIOError:
                return
            except (fdpass.FdPassError, channel.ProtocolError, TableError) as exc:
                self._violation(link, str(exc))
                return

    def _handle(self, link: WorkerLink, message: channel.WorkerMessage) -> None:
        record, now = link.record, self.loop.time()
        match message:
            case channel.Done(count=count):
                self.table.complete(record.pid, count, now)
                self._check_requests(link)
                self.dispatcher.drain_pending()
                self._stop_workers_when_drained()
            case channel.Served(count=count):
                self.table.seen(record.pid, now)
                record.served += count  # never credit: the master did not hand these out
                self._check_requests(link)
            case channel.Ready(pid=pid):
                if pid != record.pid:
                    raise channel.ProtocolError(f"READY names pid {pid}")
                self._worker_ready(link)
            case channel.HandlerError():
                self._handler_error(link, message)
            case channel.Leaving(reason=reason):  # it reads its channel no more
                self._requeue(self.dispatcher.take_back_queued(link))
                self.recycle(link, reason, limit="leaving")
                self.dispatcher.drain_pending()
            case channel.Heartbeat() | channel.Stats():
                self.table.seen(record.pid, now)

    def _check_requests(self, link: WorkerLink) -> None:
        record = link.record
        if recycling.served_enough(record.served, record.request_limit):
            self.recycle(link, f"served {record.served} connections, its "
                                f"max_requests limit of {record.request_limit}",
                          limit="max_requests")  # fmt: skip

    def _worker_ready(self, link: WorkerLink) -> None:
        record = link.record
        if record.state is WorkerState.STOPPING:
            return
        self.table.mark_ready(record.pid, self.loop.time())
        self.ever_ready = True
        log.info("worker %d (pid %d) ready", record.slot, record.pid,
                 extra={"event": "worker_ready", "slot": record.slot, "pid": record.pid,
                        "generation": record.generation})  # fmt: skip
        pid = record.pid
        self.loop.call_later(HEALTHY_LIFETIME, lambda: self._healthy(pid))
        ready = self.table.count(WorkerState.READY)
        if record.generation == self.generations.serving:
            self.backoff.ready(record.slot)
        if record.generation == self.generations.starting:
            self.reloader.commit_when_ready()
            if record.generation == self.generations.serving:  # committed: all slots are ready
                for slot in range(self.target):
                    self.backoff.ready(slot)
        elif not self.announced and ready >= self.target:
            self.announce(ready)
        elif self.announced:
            self._update_status()
        self._update_degraded()
        self.dispatcher.drain_pending()

    def announce(self, ready: int, detail: str = "") -> None:
        """Every worker is ready (at start, or after a reload): tell systemd.

        A master started by USR2 tells the old master instead; READY=1
        follows once systemd knows its pid (see ``upgrader``).
        """
        status = self.ready_status(detail)
        if self.announced:
            self.notifier.ready(status)
            return
        self.announced = True
        log.info("%s%d of %d workers ready: serving", detail, ready, self.target,
                 extra={"event": "master_ready", "workers": ready})  # fmt: skip
        if self.handover is None:
            self.notifier.ready(status)
        else:
            self.handover.report_ready()
            self.upgrader.await_old_master(self.handover.old_pid)

    def ready_status(self, detail: str = "") -> str:
        ready = self.table.count(WorkerState.READY)
        return f"listening on {self.where()}; {detail}{ready} of {self.target} workers ready"

    def _healthy(self, pid: int) -> None:
        record = self.table.get(pid)
        if record is not None:
            self.backoff.healthy(record.slot)

    def _handler_error(self, link: WorkerLink, error: channel.HandlerError) -> None:
        record = link.record
        record.errors += 1
        history = self.history.setdefault(record.slot, SlotHistory())
        history.handler_errors += 1
        history.last_error = f"{error.exc_type}: {error.message}"
        names = self._listener_names
        listener = names[error.listener] if error.listener < len(names) else str(error.listener)
        log.error(
            "worker %d (pid %d): handler raised %s: %s (peer %s, listener %s)\n%s",
            record.slot, record.pid, error.exc_type, error.message, error.peer, listener,
            error.traceback.rstrip("\n"),
            extra={"event": "handler_error", "slot": record.slot, "pid": record.pid,
                   "exc_type": error.exc_type, "error": error.message, "peer": error.peer,
                   "listener": listener, "traceback": error.traceback},
        )  # fmt: skip

    def _violation(self, link: WorkerLink, reason: str) -> None:
        """A worker broke the protocol: kill it (it is replaced when reaped)."""
        if not link.killed:
            link.record.exit_cause = "protocol_error"
            self._kill(link, "protocol_error", f"broke the channel protocol: {reason}")

    def _kill(self, link: WorkerLink, event: str, reason: str) -> None:
        record = link.record
        link.killed = True
        log.error("worker %d (pid %d) %s; killing it", record.slot, record.pid, reason,
                  extra={"event": event, "slot": record.slot, "pid": record.pid,
                         "reason": reason})  # fmt: skip
        self.table.mark_stopping(record.pid)
        self.loop.remove_reader(link.sock)
        os.kill(record.pid, signal.SIGKILL)  # not reaped yet, so the pid is still its own

    # --- run-time changes ----------------------------------------------------

    def scale_to(self, workers: int) -> None:
        """Keep *workers* workers: fork the missing slots, retire the highest ones."""
        if self.stopping:
            return
        if not 1 <= workers <= MAX_WORKERS:
            bound = "at least 1 is needed" if workers < 1 else f"at most {MAX_WORKERS} can run"
            log.warning("not scaling to %d workers: %s", workers, bound,
                        extra={"event": "workers_scaled", "target": self.target,
                               "refused": True})  # fmt: skip
            return
        old, self.target = self.target, workers
        log.info("scaling from %d to %d workers", old, workers,
                 extra={"event": "workers_scaled", "target": workers, "previous": old})  # fmt: skip
        # A retiring worker's slot is free again: its successor starts now.
        taken = {(r.generation, r.slot) for r in self.table if not r.retired}
        for generation in (self.generations.serving, self.generations.starting):
            for slot in range(workers):
                key = (generation, slot)
                if generation is not None and key not in taken and key not in self._respawns:
                    self.spawn(slot, generation)
        for link in tuple(self.dispatcher.links.values()):
            record = link.record
            if record.slot >= workers and not record.retired:
                log.info("worker %d (pid %d) retired: it finishes what it holds, then exits",
                         record.slot, record.pid,
                         extra={"event": "worker_retired", "slot": record.slot,
                                "pid": record.pid, "cause": "scale-down"})  # fmt: skip
                self._retire(link, "scale-down")
        self._cancel_respawns(keep=lambda gen, slot: slot < workers)
        for slot in range(workers, old):
            self.backoff.forget(slot)
        self._update_degraded()
        if self.generations.reloading:
            self.reloader.commit_when_ready()  # fewer workers may be enough now
        self._update_status()

    # --- recycling -------------------------------------------------------------

    def recycle(self, link: WorkerLink, reason: str, *, limit: str, **extra: object) -> None:
        """Retire a healthy worker over a limit, and start its successor at once.

        *limit* is the cause of its exit: ``max_requests``, ``max_memory``
        or ``ctl kill``.
        """
        record = link.record
        if record.retired or link.killed:
            return
        log.info("worker %d (pid %d) %s: retiring it after its connections and replacing it",
                 record.slot, record.pid, reason,
                 extra={"event": "worker_recycled", "slot": record.slot, "pid": record.pid,
                        "reason": reason, "limit": limit, **extra})  # fmt: skip
        successor = self._replaceable(record)
        self._retire(link, limit)
        if successor:
            self.spawn(record.slot, record.generation)

    def kill_worker(self, link: WorkerLink, signum: signal.Signals | None) -> None:
        """``ctl kill``: retire one worker (a successor starts now), or send it *signum*.

        Either way its exit is planned (cause ``ctl kill``): it is replaced
        at once and never counted as a crash.
        """
        record = link.record
        if signum is None:
            self.recycle(link, "asked to stop (ctl kill)", limit="ctl kill")
            return
        log.info("worker %d (pid %d): sending it %s (ctl kill)", record.slot, record.pid,
                 signum.name, extra={"event": "worker_signalled", "slot": record.slot,
                                     "pid": record.pid, "signal": signum.name})  # fmt: skip
        if record.exit_cause is None:
            record.exit_cause = "ctl kill"
        if self.dispatcher.links.get(record.pid) is link:  # not reaped: still its pid
            os.kill(record.pid, signum)

    def reopen_logs(self) -> None:
        """USR1 and ``ctl reopen-logs``: reopen the log file, here and in every worker.

        Raises ``ConfigError`` when the new file cannot be opened (nothing changes then).
        """
        reopen_logs()
        try:
            for link in tuple(self.dispatcher.links.values()):
                fd = log_file_copy()
                if fd is None:
                    return  # no log file: nothing to hand over
                self.dispatcher.queue_reopen(link, fd)
        except OSError as exc:  # out of descriptors: the rest keep the old file for now
            log.error("cannot hand the reopened log file to every worker: %s", exc,
                      extra={"event": "reopen_failed"})  # fmt: skip

    def _on_usr1(self) -> None:
        try:
            self.reopen_logs()
        except ForkserverError as exc:
            log.error("%s", exc, extra={"event": "reopen_failed"})

    # --- stopping ----------------------------------------------------------

    def stop(self) -> None:
        """Graceful: stop accepting, serve what was accepted, let workers finish."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: workers finish their connections", extra={"event": "master_stopping"})
        self.notifier.stopping()
        self.dispatcher.listeners = []  # accepting stays off whatever the queue does
        for index, listener in enumerate(self.listeners):
            if index in self.inherited and not self.upgraded:
                listener.pause_accepting()  # its owner's: its backlog waits for the next start
            else:
                listener.close()
        if not self.dispatcher.pending:  # otherwise a replacement may still be needed
            self._cancel_respawns()
        self._deadline = self.loop.time() + self.settings.graceful_timeout
        self.loop.call_later(self.settings.graceful_timeout, self._graceful_timeout)
        self._extend_stop_timeout()
        self._stop_workers_when_drained()

    def _extend_stop_timeout(self) -> None:
        """EXTEND_TIMEOUT_USEC while workers drain connections, so systemd waits for them."""
        busy = self.dispatcher.pending or any(record.in_flight for record in self.table)
        if not busy or self.forced:
            return
        remaining = max(0.0, self._deadline - self.loop.time())
        self.notifier.extend_timeout(remaining + EXTEND_MARGIN)
        self.loop.call_later(min(EXTEND_INTERVAL, remaining + 1.0), self._extend_stop_timeout)

    def stop_fast(self) -> None:
        """INT/QUIT: drop what no worker holds yet, STOP every worker now; again: kill."""
        if self.forced:
            self.stop_now()
            return
        self.stop()
        self.forced = True
        self._cancel_respawns()
        dropped = self.dispatcher.close_pending()
        log.info("fast stop: %d queued connections dropped, workers stop now", dropped,
                 extra={"event": "master_stopping", "dropped": dropped, "fast": True})  # fmt: skip
        self._stop_workers_when_drained()

    def stop_now(self) -> None:
        self.stop()
        self.forced = True
        self._cancel_respawns()
        for record in self.table:
            if record.exit_cause is None:
                record.exit_cause = "stop"
            os.kill(record.pid, signal.SIGKILL)
        self._finish_if_done()

    def _graceful_timeout(self) -> None:
        if self.table:
            log.warning(
                "workers still busy after %g s: killing them",
                self.settings.graceful_timeout,
                extra={"event": "master_stopping"},
            )
            self.stop_now()

    def _stop_workers_when_drained(self) -> None:
        if not self.stopping or self.dispatcher.pending:
            return
        for link in tuple(self.dispatcher.links.values()):
            record = link.record
            if record.exit_cause is None:
                record.exit_cause = "stop"
            if record.state is not WorkerState.STOPPING:
                self.table.mark_stopping(record.pid)
                self.dispatcher.queue_stop(link)
        self._finish_if_done()

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


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL`` from ``waitstatus_to_exitcode``."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:  # a real-time signal without a name
        return f"killed by signal {-code}"


__all__ = ["Master", "describe_exit", "serve"]
