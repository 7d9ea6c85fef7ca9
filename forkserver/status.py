"""What the master is doing, in numbers: one snapshot for every reader.

``take(...)`` reads the pool, the lifecycle, the reload state and the
listeners once and returns a frozen ``Snapshot``; every view comes from
it: ``control()`` is the ``forkserver ctl status`` reply (its shape is
documented in ``forkserver.control``), ``summary()`` the STATUS= line
for systemd, ``ready_text()`` the status sent with READY=1.  Every
counter and gauge the master keeps is a field here, so one more view
(metrics, say) reads this object and nothing else.

Pure but for ``os.getpid`` and, of each listener, an ``fstat`` (its
inode, for ``ctl status``) and a ``getsockopt`` (the kernel's accept
queue): nothing here changes state.  The metrics
(``forkserver.metrics``) read a snapshot too, with what only they need
(per-listener flow, exits by cause, the duration histograms) from the
``Tallies`` the master passes in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from forkserver.lifecycle import STOPPING, Phase, status_state
from forkserver.tallies import EMPTY, Histogram
from forkserver.worker_table import SlotHistory, WorkerRecord, WorkerState


class DescribedListener(Protocol):
    """What the status reads of a ``Listener``."""

    @property
    def name(self) -> str: ...
    def describe(self) -> str: ...
    def socket_descriptor(self) -> int: ...
    def listen_queue(self) -> tuple[int, int] | None: ...


@dataclass(frozen=True, slots=True)
class ListenerStatus:
    name: str
    address: str
    fd: int
    inode: int
    #: Connections the workers closed before the handler, by reason (the preamble).
    refused: Mapping[str, int] = field(default_factory=dict)
    # Over the master's life (the metrics): accepted by the master; taken back from
    # a worker to be dispatched again; closed unserved (a fast stop, the exit).
    accepted: int = 0
    taken_back: int = 0
    dropped: int = 0
    queued: int = 0  # now, in the master's queue
    #: Now, in the kernel's accept queue, and the most it holds (the listen
    #: backlog); None where the kernel does not say (a Unix socket).
    backlog: int | None = None
    backlog_limit: int | None = None
    #: Connections whose handler ran, and how long they took (the workers' reports).
    durations: Histogram = EMPTY
    #: TLS handshakes: ``done``, and each failure reason (empty: no TLS handshake yet).
    handshakes: Mapping[str, int] = field(default_factory=dict)

    @property
    def dispatched(self) -> int:
        """Handed to a worker, over the master's life (again after a take-back):
        every descriptor accepted or taken back is queued, dropped or dispatched."""
        return self.accepted + self.taken_back - self.queued - self.dropped


@dataclass(frozen=True, slots=True)
class Tallies:
    """What the master counted over its life, as its parts keep it (for ``take``)."""

    accepted: Mapping[int, int] = field(default_factory=dict)  # by listener index
    taken_back: Mapping[int, int] = field(default_factory=dict)
    dropped: Mapping[int, int] = field(default_factory=dict)
    durations: Mapping[int, Histogram] = field(default_factory=dict)
    accept_pauses: int = 0
    exits: Mapping[tuple[bool, str], int] = field(default_factory=dict)  # (planned, cause)
    handler_errors: Mapping[str, int] = field(default_factory=dict)
    reloads_completed: int = 0
    reloads_failed: int = 0
    last_reload: float | None = None


@dataclass(frozen=True, slots=True)
class SlotFailing:
    slot: int
    crashes: int  # consecutive crashes
    respawn_in: float | None  # seconds until its next fork, if one waits


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    slot: int
    pid: int
    generation: int
    state: str
    started: float  # time.time() of its fork
    served: int
    in_flight: int
    deaths: int  # the slot's, over the master's life
    replaced: int
    last_exit: str | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every figure of the master at one moment."""

    pid: int
    name: str
    started: float  # time.time() of the master's start
    state: str  # starting, running, reloading, degraded, draining, stopping
    stopping: bool
    #: The health answers say drain: a stop (with its drain_delay) or an upgrade began.
    draining: bool
    generation: int  # the serving one
    target: int  # workers to keep
    ready: int  # workers ready now
    busy: int  # workers holding a connection now
    capacity: int  # connections the ready workers can hold at once
    free: int  # of which not taken, less what waits in the master's queue
    pending: int  # accepted connections waiting for a worker
    accepting: bool
    listeners: tuple[ListenerStatus, ...]
    served: int  # over the master's life, by every worker
    in_flight: int
    spawned: int
    deaths: int  # workers that died without being asked to
    replaced: int  # workers retired on purpose for a successor
    handler_errors: int
    failing: tuple[SlotFailing, ...]
    last_reload_error: str | None
    workers: tuple[WorkerStatus, ...]
    health: str | None = None  # where the health listener answers
    metrics: str | None = None  # where the metrics listener answers
    max_pending: int = 0  # max_pending_connections in force
    accept_pauses: int = 0  # times accepting paused on a full queue, over the master's life
    #: Workers that exited, over the master's life, by cause: unasked (``crash``,
    #: ``signal``, ``timeout``, ``protocol_error``, ``leaving``) and retired on
    #: purpose (``reload``, ``scale_down``, ``max_requests``, ``max_memory``,
    #: ``ctl_kill``, ``stop``).
    deaths_by_cause: Mapping[str, int] = field(default_factory=dict)
    retired_by_cause: Mapping[str, int] = field(default_factory=dict)
    #: Handler exceptions by type (a bounded set of types, then "other").
    handler_errors_by_type: Mapping[str, int] = field(default_factory=dict)
    reloads_completed: int = 0
    reloads_failed: int = 0
    last_reload: float | None = None  # time.time() of the latest reload that committed

    @property
    def where(self) -> str:
        return ", ".join(listener.address for listener in self.listeners)

    def control(self) -> dict[str, Any]:
        """The ``forkserver ctl status`` reply."""
        return {
            "master": {
                "pid": self.pid,
                "name": self.name,
                "started": self.started,
                "generation": self.generation,
                "state": self.state,
                "draining": self.draining,
                "health": self.health,
                "metrics": self.metrics,
                "workers_target": self.target,
                "pending": self.pending,
                "accepting": self.accepting,
                "listeners": [
                    {"name": item.name, "address": item.address, "fd": item.fd,
                     "inode": item.inode, "backlog": item.backlog,
                     "backlog_limit": item.backlog_limit, "refused": dict(item.refused),
                     "handshakes": dict(item.handshakes)}
                    for item in self.listeners
                ],
                "totals": {
                    "served": self.served,
                    "in_flight": self.in_flight,
                    "spawned": self.spawned,
                    "restarts": self.deaths,
                    "errors": self.handler_errors,
                    "deaths": self.deaths,
                    "replaced": self.replaced,
                    "handler_errors": self.handler_errors,
                },
                "failing": [
                    {"slot": item.slot, "crashes": item.crashes, "respawn_in": item.respawn_in}
                    for item in self.failing
                ],
                "last_reload_error": self.last_reload_error,
            },
            "workers": [
                {
                    "slot": w.slot,
                    "pid": w.pid,
                    "generation": w.generation,
                    "state": w.state,
                    "started": w.started,
                    "served": w.served,
                    "in_flight": w.in_flight,
                    "restarts": w.deaths,
                    "deaths": w.deaths,
                    "replaced": w.replaced,
                    "last_exit": w.last_exit,
                    "last_error": w.last_error,
                }
                for w in self.workers
            ],
        }

    def summary(self) -> str:
        """One line for STATUS=: what the service is doing, in numbers."""
        state = "stopping" if self.stopping else f"listening on {self.where}"
        if self.state == "draining":
            state = f"draining (drain_delay), {state}"
        line = (
            f"{state}; workers {self.busy} busy/{self.ready} ready/{self.target}; "
            f"{self.served} served; {self.pending} queued"
        )
        if self.failing and not self.stopping:
            slots = ", ".join(str(item.slot) for item in self.failing)
            line += f"; degraded: slot{'s' if len(self.failing) > 1 else ''} {slots} failing"
        return line

    def ready_text(self, detail: str = "") -> str:
        """The status sent with READY=1; *detail* says what just happened."""
        return f"listening on {self.where}; {detail}{self.ready} of {self.target} workers ready"


def take(
    *,
    records: Iterable[WorkerRecord],
    history: Mapping[int, SlotHistory],
    failing: Mapping[int, int],
    respawn_in: Mapping[int, float | None],
    phase: Phase,
    reloading: bool,
    generation: int,
    last_reload_error: str | None,
    target: int,
    spawned: int,
    pending: int,
    paused: bool,
    listeners: Sequence[DescribedListener],
    name: str,
    started: float,
    monotonic: float,
    wall: float,
    upgrading: bool = False,
    refused: Mapping[int, Mapping[str, int]] | None = None,
    health: str | None = None,
    metrics: str | None = None,
    tallies: Tallies | None = None,
    queue: Iterable[tuple[int, int]] = (),
    max_pending: int = 0,
    handshakes: Mapping[int, Mapping[str, int]] | None = None,
) -> Snapshot:
    """The snapshot of these facts; *monotonic* and *wall* are now on each clock.

    *upgrading*: a newer master is starting (USR2); *refused*: by listener
    index, what the workers closed before the handler; *health*: the
    health listener's address, *metrics* the metrics listener's; *tallies*
    what the master counted, *queue* the (descriptor, listener) pairs in
    its queue (counted by listener: at most the queue's bound, and a
    snapshot is taken on events, never per connection); *handshakes*: by
    listener index, TLS handshakes ``done`` and failed by reason.
    """
    workers = sorted(records, key=lambda r: r.slot)
    stopping = phase in STOPPING
    degraded = bool(failing) and not stopping
    ready = [r for r in workers if r.state is WorkerState.READY]
    capacity = sum(r.capacity for r in ready)
    free = sum(max(0, r.capacity - r.in_flight) for r in ready)
    refused = refused or {}
    tallies = tallies or Tallies()
    queued: dict[int, int] = {}
    for _, index in queue:
        queued[index] = queued.get(index, 0) + 1
    return Snapshot(
        pid=os.getpid(),
        name=name,
        started=started,
        state=status_state(phase, degraded=degraded, reloading=reloading),
        stopping=stopping,
        draining=stopping or phase is Phase.DEPARTING or upgrading,
        generation=generation,
        target=target,
        ready=len(ready),
        busy=sum(1 for r in workers if r.in_flight),
        capacity=capacity,
        free=max(0, free - pending),
        pending=pending,
        accepting=not stopping and not paused,
        listeners=tuple(_listener(listener, index, refused.get(index, {}), tallies, queued,
                                  handshakes=(handshakes or {}).get(index, {}))
                        for index, listener in enumerate(listeners)),
        served=sum(r.served for r in workers) + sum(h.served for h in history.values()),
        in_flight=sum(r.in_flight for r in workers),
        spawned=spawned,
        deaths=sum(h.deaths for h in history.values()),
        replaced=sum(h.replaced for h in history.values()),
        handler_errors=sum(h.handler_errors for h in history.values()),
        failing=tuple(SlotFailing(slot, crashes, respawn_in.get(slot))
                      for slot, crashes in failing.items()),
        last_reload_error=last_reload_error,
        workers=tuple(_worker(r, history.get(r.slot), monotonic, wall) for r in workers),
        health=health,
        metrics=metrics,
        max_pending=max_pending,
        accept_pauses=tallies.accept_pauses,
        deaths_by_cause=dict(sorted((cause, n) for (planned, cause), n in tallies.exits.items()
                                    if not planned)),
        retired_by_cause=dict(sorted((cause, n) for (planned, cause), n in tallies.exits.items()
                                     if planned)),
        handler_errors_by_type=dict(tallies.handler_errors),
        reloads_completed=tallies.reloads_completed,
        reloads_failed=tallies.reloads_failed,
        last_reload=tallies.last_reload,
    )  # fmt: skip


def _listener(listener: DescribedListener, index: int, refused: Mapping[str, int],
              tallies: Tallies, queued: Mapping[int, int], *,
              handshakes: Mapping[str, int]) -> ListenerStatus:
    fd = listener.socket_descriptor()
    inode = os.fstat(fd).st_ino if fd >= 0 else 0
    waiting, bound = listener.listen_queue() or (None, None)
    return ListenerStatus(name=listener.name, address=listener.describe(), fd=fd, inode=inode,
                          backlog=waiting, backlog_limit=bound,
                          refused=dict(refused), accepted=tallies.accepted.get(index, 0),
                          taken_back=tallies.taken_back.get(index, 0),
                          dropped=tallies.dropped.get(index, 0), queued=queued.get(index, 0),
                          durations=tallies.durations.get(index, EMPTY),
                          handshakes=dict(handshakes))  # fmt: skip


def _worker(
    record: WorkerRecord, history: SlotHistory | None, monotonic: float, wall: float
) -> WorkerStatus:
    history = history if history is not None else SlotHistory()
    return WorkerStatus(
        slot=record.slot, pid=record.pid, generation=record.generation,
        state=record.state.value, started=wall - (monotonic - record.started_at),
        served=record.served, in_flight=record.in_flight, deaths=history.deaths,
        replaced=history.replaced, last_exit=history.last_exit, last_error=history.last_error,
    )  # fmt: skip


__all__ = ["ListenerStatus", "SlotFailing", "Snapshot", "Tallies", "WorkerStatus", "take"]
