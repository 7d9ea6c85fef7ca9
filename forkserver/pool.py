"""The workers as processes: fork, read, signal, reap.

``Pool`` is the master's one owner of worker processes.  It forks them
(``spawn``), reads their channels, retires, kills and reaps them, and
keeps the crash-loop back-off, per slot, for unplanned deaths only.
It decides nothing about the master's phase: the master says which
``(generation, slot)`` pairs it wants filled (``keep``), and the pool
forks each one that has no worker, once its back-off is over.

What happens to a worker that the master must act on is reported as a
fact through the *report* callable given to the pool, never by calling
into the master: ``WorkerReady``, ``WorkerExited`` (with its cause and
whether it was planned), ``HandlerFailed`` (a handler exception,
counted), ``WorkerRetired`` (its slot is free: a
successor may start) and ``ChildExited`` for any other child (the
reload check, a newer master).  The master reads them after each loop
pass, in order.

``Processes`` is the one place that signals or reaps a process in the
master's loop: the pool's workers, the reload check's child and a
newer master all go through it.

The per-connection path runs through here too (a DONE message): it
reads the channel, updates the table and drains the dispatcher's queue,
and allocates nothing but the decoded message.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from forkserver import channel, fdpass, recycling, spawn
from forkserver.config import DEFAULT_ACCESS_LOG_FORMAT, WORKER_HOOKS, Settings
from forkserver.dispatch import Dispatcher, WorkerLink
from forkserver.eventloop import EventLoop, TimerHandle
from forkserver.handler import LoadedHandler, WorkerClass
from forkserver.hooks import HookTarget, configured
from forkserver.listeners import Listener
from forkserver.log import log_file_copy
from forkserver.refusals import RefusalTotals
from forkserver.stackdump import StackDumps
from forkserver.tallies import BoundedTally, DurationTotals, Histogram
from forkserver.tls_listeners import ListenerTls
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
    exit_label,
)
from forkserver.workers import preamble
from forkserver.workers.core import EXIT_MEANINGS, HEARTBEAT_INTERVAL, WorkerContext
from forkserver.workers.sync import PREFETCH as SYNC_PREFETCH

log = logging.getLogger("forkserver.master")

#: Messages read from a dead worker's channel: its last words, bounded.
_READ_BATCH: Final = 64
#: ``recvmsg`` arguments for a worker's message (no descriptors: ``fdpass.unpack``).
_RECV_SIZE, _RECV_SPACE, _RECV_FLAGS = fdpass.recv_args(channel.MAX_MESSAGE_SIZE, 0,
                                                         nonblocking=True)  # fmt: skip
_DONE_COUNTS: Final = channel.DONE_COUNTS
_TRUNCATED: Final = fdpass.TRUNCATED
#: Seconds between the stack-dump ABRT and the SIGKILL of a stuck worker.
KILL_GRACE: Final = 1.0
#: Handler exception types counted each under its own name; the rest are "other".
MAX_ERROR_TYPES: Final = 32


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL`` from ``waitstatus_to_exitcode``."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:  # a real-time signal without a name
        return f"killed by signal {-code}"


class Processes:
    """Signals and waits: the only calls in the master's loop that reach a process.

    A pid is signalled only while it is unreaped, so it is still the
    child's own: callers check that (the pool by its links, the reload
    check and the upgrader by their own records of what they started).
    """

    def signal(self, pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # a zombie already: reaped soon
            os.kill(pid, signum)

    def kill(self, pid: int) -> None:
        self.signal(pid, signal.SIGKILL)

    def wait(self, pid: int) -> None:
        """Reap *pid*, blocking: only on the way out, for a child just killed."""
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def reap(self) -> Iterator[tuple[int, int]]:
        """(pid, ``waitstatus_to_exitcode``) of every child that has exited."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            yield pid, os.waitstatus_to_exitcode(status)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What the workers of one generation are forked with, computed once."""

    settings: Settings
    worker_class: WorkerClass
    capacity: int  # connections at once: 1 for sync, else ``concurrency``
    prefetch: int  # descriptors queued beyond capacity: workers.sync.PREFETCH for sync
    heartbeat_interval: float  # several per ``timeout``: one late beat is no death sentence
    #: The TLS listeners' contexts, loaded for this generation (``tls_listeners.load``).
    tls: Mapping[int | None, ListenerTls] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: Settings, worker_class: WorkerClass,
           tls: Mapping[int | None, ListenerTls] | None = None) -> WorkerSpec:  # fmt: skip
        sync = worker_class == "sync"
        return cls(
            settings=settings, worker_class=worker_class,
            capacity=1 if sync else settings.concurrency,
            prefetch=SYNC_PREFETCH if sync else 0,  # a busy sync worker's next ones (dispatch)
            heartbeat_interval=min(HEARTBEAT_INTERVAL, settings.timeout / 4), tls=tls or {},
        )  # fmt: skip


# --- facts the pool reports ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerReady:
    record: WorkerRecord


@dataclass(frozen=True, slots=True)
class HandlerFailed:
    """A worker reported a handler exception (counted already): the master logs it."""

    record: WorkerRecord
    error: channel.HandlerError


@dataclass(frozen=True, slots=True)
class WorkerRetired:
    """A worker was retired by the pool itself (a limit, LEAVING): its slot is free."""

    record: WorkerRecord


@dataclass(frozen=True, slots=True)
class WorkerExited:
    record: WorkerRecord  # as it was when reaped (no longer in the table)
    how: str  # "exit code 0", "killed by SIGKILL (...)"
    cause: str  # ``exit_cause``, or "died"
    planned: bool
    lifetime: float


@dataclass(frozen=True, slots=True)
class ChildExited:
    """A child that is not a worker was reaped: the reload check, a newer master."""

    pid: int
    code: int


@dataclass(frozen=True, slots=True)
class RespawnDue:
    """A slot's back-off is over: ``keep`` forks it now."""


RESPAWN_DUE: Final = RespawnDue()

PoolFact = WorkerReady | HandlerFailed | WorkerRetired | WorkerExited | ChildExited | RespawnDue


class Pool:
    """The worker processes, their channels and their slots' back-off.

    For the master: ``keep``, ``reap``, ``retire``, ``retire_generations``,
    ``recycle``, ``stop_all``, ``kill_all``, ``abort``, ``send_signal``,
    ``scale``, ``close``; read ``table``, ``dispatcher``, ``history``,
    ``backoff``, ``target``.  The rest is the pool's own.
    """

    def __init__(
        self,
        loop: EventLoop,
        *,
        spec: WorkerSpec,
        listeners: Sequence[Listener],
        shared: Collection[int],
        handler: LoadedHandler | None,
        processes: Processes,
        report: Callable[[PoolFact], None],
        stack_dumps: StackDumps | None = None,
    ) -> None:
        self.loop = loop
        self.processes = processes
        self.report = report
        self.table = WorkerTable()
        self.dispatcher = Dispatcher(
            loop, self.table, spec.settings.max_pending_connections, self._broken
        )
        self.backoff = CrashBackoff()
        self.history: dict[int, SlotHistory] = {}
        #: Connections the workers' preambles closed, over the master's life.
        self.refusals = RefusalTotals()
        #: Over the master's life, for the metrics: how long connections took (the
        #: workers' reports), workers that exited by (planned, cause), handler
        #: exceptions by type.
        self.durations = DurationTotals()
        self.exits: dict[tuple[bool, str], int] = {}
        self.error_types = BoundedTally(MAX_ERROR_TYPES)
        #: TLS handshakes the workers did and refused, the same way.
        self.handshakes = RefusalTotals()
        self.target = spec.settings.workers  # how many workers to keep
        self.spawned = 0
        self.ever_ready = False  # some worker has been ready (startup_timeout is over)
        #: The spec of each generation that may still fork (see ``prepare``).
        self.specs: dict[int, WorkerSpec] = {0: spec}
        #: Called in each forked worker before it boots (the control socket's copy).
        self.after_fork: list[Callable[[], None]] = []
        #: Hooks given as callables (embedding): they take their setting's place.
        self.hook_objects: dict[str, HookTarget] = {}
        self.stack_dumps = stack_dumps if stack_dumps is not None else StackDumps()
        self._listeners = listeners
        self._listener_names = tuple(listener.name for listener in listeners)
        self._tables = tuple(listener.table for listener in listeners)  # for the preambles
        self._shared = frozenset(shared)
        self._handler = handler
        self._rng = random.Random()
        #: When a wanted slot that lost its worker may fork again, by (generation, slot).
        self._due: dict[tuple[int, int], float] = {}
        self._wake: TimerHandle | None = None

    # --- generations ---------------------------------------------------------

    def prepare(self, generation: int, spec: WorkerSpec) -> None:
        """Workers of *generation* will be forked with *spec*: its settings are in force."""
        self.specs[generation] = spec
        self.dispatcher.max_pending = self.settings.max_pending_connections

    def forget_generation(self, generation: int) -> None:
        """*generation* forks no more (replaced, or abandoned)."""
        if len(self.specs) > 1:
            self.specs.pop(generation, None)
        for key in [key for key in self._due if key[0] == generation]:
            del self._due[key]
        self.dispatcher.max_pending = self.settings.max_pending_connections

    # --- keeping the wanted slots filled ------------------------------------

    def keep(self, wanted: set[tuple[int, int]]) -> None:
        """Fork every wanted (generation, slot) that has no worker, once it is due.

        A retired worker does not hold its slot: its successor starts
        now.  A slot whose worker crashed waits out its back-off; while
        no worker is ready none waits more than ``ALONE_DELAY``.  Wanted
        no more, a slot's pending re-fork is forgotten.
        """
        missing = wanted.difference(
            (record.generation, record.slot) for record in self.table if not record.retired
        )
        for key in [key for key in self._due if key not in missing]:
            del self._due[key]
        if not missing:
            return
        now = self.loop.time()
        if self._due and self.table.count(WorkerState.READY) == 0:
            self._keep_service_up(now)
        for key in sorted(missing):
            due = self._due.get(key)
            if due is None or due <= now:
                self._due.pop(key, None)
                self.spawn(key[1], key[0])
        self._arm_wake()

    def respawn_due(self) -> bool:
        """Is some slot waiting out its back-off?"""
        return bool(self._due)

    def respawn_in(self, generation: int, slot: int) -> float | None:
        """Seconds until *slot* of *generation* is forked again, if it waits."""
        due = self._due.get((generation, slot))
        return None if due is None else round(max(0.0, due - self.loop.time()), 3)

    def _keep_service_up(self, now: float) -> None:
        latest = now + ALONE_DELAY
        for (generation, slot), due in tuple(self._due.items()):
            if due > latest:
                self._delay(slot, generation, ALONE_DELAY)

    def _delay(self, slot: int, generation: int, delay: float) -> None:
        if delay > 0:
            crashes = self.backoff.crashes(slot)
            log.warning(
                "worker %d crashed (%d in a row): replacing it in %g s",
                slot, crashes, delay,
                extra={"event": "worker_backoff", "slot": slot, "delay": delay,
                       "crashes": crashes},
            )  # fmt: skip
        self._due[(generation, slot)] = self.loop.time() + delay

    def _arm_wake(self) -> None:
        """One timer for the soonest re-fork: when it fires, the master looks again."""
        soonest = min(self._due.values(), default=None)
        if self._wake is not None:
            if soonest is not None and self._wake.when <= soonest:
                return
            self._wake.cancel()
            self._wake = None
        if soonest is not None:
            self._wake = self.loop.call_at(soonest, self._woken)

    def _woken(self) -> None:
        self._wake = None
        self.report(RESPAWN_DUE)

    def reset_backoff(self) -> None:
        """Crashes are history (a reload)."""
        self.backoff.reset()

    def crashed(self, record: WorkerRecord, lifetime: float) -> None:
        """An unplanned death of a worker the master wants replaced: wait its back-off."""
        delay = self.backoff.died(record.slot, lifetime, was_ready=record.was_ready,
                                  alone=self.table.count(WorkerState.READY) == 0)  # fmt: skip
        self._delay(record.slot, record.generation, delay)

    def scale(self, workers: int) -> None:
        """Keep *workers* workers: the highest slots are retired (``keep`` forks the rest)."""
        old, self.target = self.target, workers
        for record in self.table:
            if record.slot >= workers and not record.retired:
                log.info("worker %d (pid %d) retired: it finishes what it holds, then exits",
                         record.slot, record.pid,
                         extra={"event": "worker_retired", "slot": record.slot,
                                "pid": record.pid, "cause": "scale-down"})  # fmt: skip
                self.retire(record, "scale-down")
        for slot in range(workers, old):
            self.backoff.forget(slot)

    # --- forking ---------------------------------------------------------------

    def spawn(self, slot: int, generation: int) -> None:
        """Fork the worker of *slot* in *generation*; a failure waits its back-off."""
        spec = self.specs[generation]
        settings = spec.settings
        try:
            master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:  # out of descriptors: try again later, never crash
            self._spawn_failed(slot, exc, generation)
            return
        try:
            pid = self._fork(slot, spec, worker_end, master_end)
        except OSError as exc:
            master_end.close()
            worker_end.close()
            self._spawn_failed(slot, exc, generation)
            return
        master_end.setblocking(False)
        limit = recycling.request_limit(settings.max_requests, settings.max_requests_jitter,
                                        self._rng)  # fmt: skip
        record = self.table.add(slot, pid, spec.capacity, self.loop.time(), generation,
                                request_limit=limit, prefetch=spec.prefetch)  # fmt: skip
        link = WorkerLink(record=record, sock=master_end, peer=worker_end)
        self.dispatcher.add_link(link)
        self.loop.add_reader(master_end, functools.partial(self._on_readable, link))
        self.spawned += 1
        self.history.setdefault(slot, SlotHistory()).started = time.time()
        log.info("worker %d (pid %d) spawned", slot, pid,
                 extra={"event": "worker_spawned", "slot": slot, "pid": pid,
                        "generation": generation, "request_limit": limit})  # fmt: skip

    def _fork(
        self, slot: int, spec: WorkerSpec, worker_end: socket.socket, master_end: socket.socket
    ) -> int:
        """The worker process itself, speaking on *worker_end*: its pid.  Raises OSError."""
        settings = spec.settings
        ctx = WorkerContext(
            slot=slot, master_pid=os.getpid(), channel=worker_end,
            handler_spec=settings.handler, worker_class=spec.worker_class,
            concurrency=spec.capacity, listener_names=self._listener_names,
            name=settings.name, user=settings.user, group=settings.group,
            handler=self._handler, heartbeat_interval=spec.heartbeat_interval,
            access_log=settings.access_log, shared_listeners=self._shared_fds(),
            event_loop=settings.event_loop,
            preambles=preamble.for_listeners(settings, self._tables, self._listener_names,
                                             spec.tls),
            hooks=configured(settings, self.hook_objects, WORKER_HOOKS),
            access_log_format=(None if settings.access_log_format == DEFAULT_ACCESS_LOG_FORMAT
                               else settings.access_log_format),
        )  # fmt: skip
        ctx.keep_fds.update(fd for _, fd in ctx.shared_listeners)
        return spawn.fork_worker(ctx, self.loop, self._owned_sockets(master_end),
                                 self.after_fork, self.stack_dumps)  # fmt: skip

    def _spawn_failed(self, slot: int, exc: OSError, generation: int) -> None:
        log.error("cannot start worker %d: %s", slot, exc,
                  extra={"event": "worker_failed", "slot": slot})  # fmt: skip
        delay = self.backoff.died(slot, 0.0, was_ready=False,
                                  alone=self.table.count(WorkerState.READY) == 0)  # fmt: skip
        self._delay(slot, generation, delay)

    def _shared_fds(self) -> tuple[tuple[int, int], ...]:
        """(index, descriptor) of each shared listener still open, for a new worker."""
        return tuple((index, listener.socket_descriptor())
                     for index, listener in enumerate(self._listeners)
                     if index in self._shared and listener.socket_descriptor() >= 0)  # fmt: skip

    def _owned_sockets(self, master_end: socket.socket) -> list[socket.socket]:
        owned = [master_end]
        for link in self.dispatcher.links.values():
            owned += (link.sock, link.peer)
        for listener in self._listeners:
            sock = listener.listening_socket()
            if sock is not None:
                owned.append(sock)
        return owned

    # --- the channel -------------------------------------------------------------

    def _on_readable(self, link: WorkerLink, limit: int = 1) -> None:
        # One message per wake-up: the channel is level-triggered, so more
        # wake the loop again, and a chatty worker cannot starve the rest;
        # reading on to EAGAIN would cost a failed recvmsg per connection.
        links, recvmsg = self.dispatcher.links, link.sock.recvmsg
        for _ in range(limit):
            if links.get(link.record.pid) is not link:
                return
            try:
                data, ancillary, msg_flags, _ = recvmsg(_RECV_SIZE, _RECV_SPACE, _RECV_FLAGS)
                count = _DONE_COUNTS.get(data)
                if count is not None and not msg_flags & _TRUNCATED:
                    self._done(link.record, count)  # the per-connection message, undecoded
                    continue
                data, _ = fdpass.unpack(data, ancillary, msg_flags, channel.MAX_MESSAGE_SIZE, 0)
                if not data:
                    return
                self._handle(link, channel.decode_worker_message(data))
            except BlockingIOError:
                return
            except (fdpass.FdPassError, channel.ProtocolError, TableError) as exc:
                self._broken(link, str(exc))
                return

    def _done(self, record: WorkerRecord, count: int) -> None:
        """DONE: *count* connections finished, their credit back, the queue drained."""
        self.table.completed(record, count, self.loop.time())
        if recycling.served_enough(record.served, record.request_limit):
            self._over_requests(record)
        self.dispatcher.drain_pending()

    def _handle(self, link: WorkerLink, message: channel.WorkerMessage) -> None:
        record, now = link.record, self.loop.time()
        match message:
            case channel.Done(count=count):
                self._done(record, count)
            case channel.Served(count=count):  # never credit: the master did not hand these out
                self.table.served(record.pid, count, now)
                if recycling.served_enough(record.served, record.request_limit):
                    self._over_requests(record)
            case channel.Ready(pid=pid):
                if pid != record.pid:
                    raise channel.ProtocolError(f"READY names pid {pid}")
                self._worker_ready(record)
            case channel.HandlerError():
                self._handler_error(record, message)
            case channel.Leaving(reason=reason):  # it reads its channel no more
                self._requeue(self.dispatcher.take_back_queued(link))
                self.recycle(record, reason, limit="leaving")
                self.dispatcher.drain_pending()
            case channel.Heartbeat() | channel.Stats():
                self.table.seen(record.pid, now)
            case channel.Refusals(counts=counts):  # its preamble closed these
                self.table.seen(record.pid, now)
                self.refusals.update(record.pid, counts)
            case channel.Durations(entries=entries):
                self.table.seen(record.pid, now)
                self.durations.update(record.pid, [
                    (listener, Histogram(buckets=buckets, sum_us=sum_us))
                    for listener, sum_us, buckets in entries])  # fmt: skip
            case channel.Handshakes(counts=counts):
                self.table.seen(record.pid, now)
                self.handshakes.update(record.pid, counts)

    def _over_requests(self, record: WorkerRecord) -> None:
        self.recycle(record, f"served {record.served} connections, its max_requests "
                             f"limit of {record.request_limit}", limit="max_requests")  # fmt: skip

    def _worker_ready(self, record: WorkerRecord) -> None:
        if record.state is WorkerState.STOPPING:
            return
        self.table.mark_ready(record.pid, self.loop.time())
        self.ever_ready = True
        log.info("worker %d (pid %d) ready", record.slot, record.pid,
                 extra={"event": "worker_ready", "slot": record.slot, "pid": record.pid,
                        "generation": record.generation})  # fmt: skip
        self.loop.call_later(HEALTHY_LIFETIME, lambda: self._healthy(record))
        self.report(WorkerReady(record))
        self.dispatcher.drain_pending()

    def _healthy(self, record: WorkerRecord) -> None:
        if self.table.get(record.pid) is record:
            self.backoff.healthy(record.slot)

    def _handler_error(self, record: WorkerRecord, error: channel.HandlerError) -> None:
        self.table.handler_failed(record.pid)
        history = self.history.setdefault(record.slot, SlotHistory())
        history.handler_errors += 1
        self.error_types.count(error.exc_type)
        history.last_error = f"{error.exc_type}: {error.message}"
        self.report(HandlerFailed(record, error))

    def hand_log_file(self) -> None:
        """A reopened log file: a copy to every worker, sent with REOPEN after its outbox."""
        try:
            for link in tuple(self.dispatcher.links.values()):
                fd = log_file_copy()
                if fd is None:
                    return  # no log file: nothing to hand over
                self.dispatcher.queue_reopen(link, fd)
        except OSError as exc:  # out of descriptors: the rest keep the old file for now
            log.error("cannot hand the reopened log file to every worker: %s", exc,
                      extra={"event": "reopen_failed"})  # fmt: skip

    # --- asking workers to go ------------------------------------------------------

    def _link(self, record: WorkerRecord) -> WorkerLink | None:
        """The live link of *record*; None once reaped (its pid may be someone else's)."""
        link = self.dispatcher.links.get(record.pid)
        return link if link is not None and link.record is record else None

    def retire(self, record: WorkerRecord, cause: str) -> None:
        """Ask a worker to finish what it holds and exit; its slot is free at once.

        *cause* (one of ``PLANNED_CAUSES``) is logged when it exits.  One
        still running ``graceful_timeout`` seconds later is killed.
        """
        link = self._link(record)
        if link is None:
            return
        asked = record.state is WorkerState.STOPPING or record.killed
        self.table.retire(record.pid, cause)
        if not asked:
            self.dispatcher.queue_stop(link)
            timeout = self.settings.graceful_timeout
            self.loop.call_later(timeout, lambda: self._retirement_overdue(record, timeout))

    @property
    def settings(self) -> Settings:
        """The settings in force: the newest generation's."""
        return self.specs[max(self.specs)].settings

    def _retirement_overdue(self, record: WorkerRecord, timeout: float) -> None:
        if self._link(record) is None or record.killed:
            return  # gone already (reaped: the pid may be someone else's now), or being killed
        log.warning("worker %d (pid %d) still running %g s after it was retired (%s): "
                    "killing it", record.slot, record.pid, timeout, record.exit_cause,
                    extra={"event": "worker_killed", "slot": record.slot, "pid": record.pid,
                           "stage": "graceful_timeout", "cause": record.exit_cause,
                           "in_flight": record.in_flight})  # fmt: skip
        self.table.mark_killed(record.pid, "stop")
        self.processes.kill(record.pid)

    def retire_generations(self, which: Callable[[int], bool], cause: str = "reload") -> None:
        """Retire every worker of the generations chosen, and forget their re-forks."""
        for record in self.table:
            if which(record.generation):
                self.retire(record, cause)  # it finishes its connections, then exits
        for key in [key for key in self._due if which(key[0])]:
            del self._due[key]

    def recycle(self, record: WorkerRecord, reason: str, *, limit: str, **extra: object) -> None:
        """Retire a healthy worker over a limit; a successor starts at once.

        *limit* is the cause of its exit: ``max_requests``, ``max_memory``,
        ``ctl kill`` or ``leaving``.
        """
        if record.retired or record.killed or self._link(record) is None:
            return
        log.info("worker %d (pid %d) %s: retiring it after its connections and replacing it",
                 record.slot, record.pid, reason,
                 extra={"event": "worker_recycled", "slot": record.slot, "pid": record.pid,
                        "reason": reason, "limit": limit, **extra})  # fmt: skip
        self.retire(record, limit)
        self.report(WorkerRetired(record))

    def send_signal(self, record: WorkerRecord, signum: signal.Signals) -> None:
        """``ctl kill --signal``: its exit, whenever it comes, is planned (``ctl kill``)."""
        log.info("worker %d (pid %d): sending it %s (ctl kill)", record.slot, record.pid,
                 signum.name, extra={"event": "worker_signalled", "slot": record.slot,
                                     "pid": record.pid, "signal": signum.name})  # fmt: skip
        if self._link(record) is not None:  # not reaped: still its pid
            self.table.note_cause(record.pid, "ctl kill")
            self.processes.signal(record.pid, signum)

    def stop_all(self) -> None:
        """STOP to every worker not asked yet: part of a stop, so no successor."""
        for link in tuple(self.dispatcher.links.values()):
            record = link.record
            if record.state is not WorkerState.STOPPING:
                self.table.mark_stopping(record.pid, "stop")
                self.dispatcher.queue_stop(link)
            elif record.exit_cause is None:
                self.table.note_cause(record.pid, "stop")

    def kill_all(self) -> None:
        """SIGKILL to every worker (a forced stop's last word).

        Not ``mark_killed``: they did nothing wrong, so what they said
        before they died (a handler error, say) is still read when reaped.
        """
        for record in self.table:
            self.table.mark_stopping(record.pid, "stop")
            self.processes.kill(record.pid)

    def abort(self, record: WorkerRecord, reason: str) -> None:
        """A stuck worker: ABRT for a stack dump in its log, SIGKILL ``KILL_GRACE`` later."""
        link = self._link(record)
        if link is None or record.killed:
            return
        log.error("worker %d (pid %d) %s; dumping its stacks, then killing it",
                  record.slot, record.pid, reason,
                  extra={"event": "worker_timeout", "slot": record.slot, "pid": record.pid,
                         "reason": reason})  # fmt: skip
        self.table.mark_killed(record.pid, "timeout", override=True)
        self.processes.signal(record.pid, signal.SIGABRT)

        def kill() -> None:
            if self._link(record) is None:  # reaped: the pid is not its own
                return
            log.error("worker %d (pid %d) still running %g s after its stack dump: killing it",
                      record.slot, record.pid, KILL_GRACE,
                      extra={"event": "worker_killed", "slot": record.slot, "pid": record.pid,
                             "stage": "timeout", "cause": "timeout"})  # fmt: skip
            self.processes.kill(record.pid)

        self.loop.call_later(KILL_GRACE, kill)

    def _broken(self, link: WorkerLink, reason: str) -> None:
        """A worker broke the protocol: kill it (it is replaced when reaped)."""
        record = link.record
        if record.killed or self._link(record) is not link:
            return
        reason = f"broke the channel protocol: {reason}"
        log.error("worker %d (pid %d) %s; killing it", record.slot, record.pid, reason,
                  extra={"event": "protocol_error", "slot": record.slot, "pid": record.pid,
                         "reason": reason})  # fmt: skip
        self.table.mark_killed(record.pid, "protocol_error", override=True)
        self.loop.remove_reader(link.sock)
        self.processes.kill(record.pid)

    # --- reaping ---------------------------------------------------------------------

    def reap(self) -> None:
        """SIGCHLD: reap every exited child; each becomes a fact."""
        for pid, code in self.processes.reap():
            link = self.dispatcher.links.get(pid)
            if link is None:
                self.report(ChildExited(pid, code))
            else:
                self._exited(link, code)

    def _exited(self, link: WorkerLink, code: int) -> None:
        record = link.record
        if not record.killed:
            self._on_readable(link, _READ_BATCH)  # its last words: an error report, say
        self.loop.remove_reader(link.sock)
        self.stack_dumps.collect(record.slot, record.pid)
        reclaimed = self.dispatcher.remove_link(record.pid)
        self._requeue(reclaimed)
        self.table.remove(record.pid)
        self.refusals.worker_gone(record.pid)
        self.durations.worker_gone(record.pid)
        self.handshakes.worker_gone(record.pid)
        lifetime = self.loop.time() - record.started_at
        how = describe_exit(code)
        if code in EXIT_MEANINGS:  # a worker's own failure, boot or runtime
            how += f" ({EXIT_MEANINGS[code]})"
        cause = record.exit_cause or "died"
        planned = cause in PLANNED_CAUSES
        key = (planned, exit_label(cause, code))
        self.exits[key] = self.exits.get(key, 0) + 1
        # Planned exits are routine; a death nobody asked for is worth a look.
        level = logging.INFO if planned else logging.WARNING
        log.log(level, "worker %d (pid %d) exited: %s%s", record.slot, record.pid, how,
                "" if cause == "died" else f" ({cause})",
                extra={"event": "worker_exited", "slot": record.slot, "pid": record.pid,
                       "exit_code": code, "cause": cause, "planned": planned,
                       "lifetime": round(lifetime, 3), "served": record.served,
                       "reclaimed": len(reclaimed)})  # fmt: skip
        self.history.setdefault(record.slot, SlotHistory()).exited(how, record.served, cause)
        if planned and record.was_ready:
            self.backoff.healthy(record.slot)  # it served until it was retired
        self.dispatcher.drain_pending()
        self.report(WorkerExited(record, how, cause, planned, lifetime))

    def _requeue(self, items: list[tuple[int, int]]) -> None:
        if items:
            self.dispatcher.requeue(items)

    def close(self) -> None:
        """On the way out: every channel closed, what no worker got is counted and closed."""
        if self._wake is not None:
            self._wake.cancel()
        self._due.clear()
        self.stack_dumps.close()
        for pid in tuple(self.dispatcher.links):
            self._requeue(self.dispatcher.remove_link(pid))
        dropped = self.dispatcher.close_pending()
        if dropped:
            log.warning("%d accepted connections were never served", dropped,
                        extra={"event": "master_stopped", "dropped": dropped})  # fmt: skip
