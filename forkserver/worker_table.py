"""Who the workers are, in what state, with what load: pure bookkeeping.

The master owns one ``WorkerTable``.  Nothing here forks, signals or
touches a descriptor, so every transition is tested without processes.

Invariants:

* A pid belongs to at most one live worker; a slot to at most one
  worker of each generation that is not stopping (a retiring worker
  and its replacement share the slot while the first one drains, and
  during a reload both generations fill the same slots).
* ``0 <= in_flight <= capacity + prefetch`` for every worker: the
  master only dispatches to a worker with room, and a worker reporting
  more connections done than it holds is a protocol violation.
  ``prefetch`` lets a busy worker hold that many descriptors beyond its
  concurrency, queued on its channel, so that it never waits for a
  round trip through the master between two connections; ``pick``
  still prefers a worker with free capacity, so idle workers come first.
  A worker ``held_back`` (it seemed stuck with descriptors queued) is
  given none beyond its capacity until its next DONE.
* Only ``READY`` workers receive connections.  States move forward
  only: ``STARTING`` -> ``READY`` -> ``STOPPING``.
* A leaving worker is described by its record alone: ``STOPPING``
  (it gets no more connections), ``exit_cause`` (why: set once, by
  whoever asked first; only a stuck worker's ``timeout`` overrides it),
  ``retired`` (its slot is free for a successor while it drains) and
  ``killed`` (signalled to die for what it did: stuck, past its
  retirement's deadline, or breaking the protocol; nothing more is sent
  to it and its channel is not read again).
  ``STOPPING`` implies a cause; ``retired`` and ``killed`` each imply
  ``STOPPING``.
* Records change only through this table's methods: the rest of the
  master reads them.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


class TableError(Exception):
    """An impossible transition: a bug in the master or a lying worker."""


@dataclass(slots=True)
class WorkerRecord:
    slot: int
    pid: int
    capacity: int
    started_at: float
    state: WorkerState = WorkerState.STARTING
    in_flight: int = 0
    served: int = 0
    errors: int = 0
    last_seen: float = 0.0
    generation: int = 0
    request_limit: int | None = None  # max_requests (with its jitter) for this worker
    retired: bool = False  # asked to finish and exit; not replaced when it does
    #: Why the master asked it to go, or killed it (``PLANNED_CAUSES`` and
    #: ``UNPLANNED_CAUSES``); None while nobody has.
    exit_cause: str | None = None
    was_ready: bool = False  # it reported READY at some point
    killed: bool = False  # killed (or ABRTed) for what it did: its channel is not read again
    prefetch: int = 0  # descriptors it may hold queued beyond its capacity
    held_back: bool = False  # no prefetch until its next DONE
    last_assigned: int = 0  # the table's count of assignments when it last got one

    def room(self) -> int:
        """How many connections it may hold now."""
        return self.capacity if self.held_back else self.capacity + self.prefetch

    def has_capacity(self) -> bool:
        return self.state is WorkerState.READY and self.in_flight < self.room()


#: Why the master retires a worker on purpose: its exit is planned, logged
#: at INFO, and never counts as a crash.
PLANNED_CAUSES: Final = frozenset(
    {"reload", "scale-down", "max_requests", "max_memory", "stop", "ctl kill"}
)
#: Why the master kills a worker nobody asked to go: a stuck worker
#: (``timeout``) or one that broke the channel protocol.  A worker that
#: dies on its own has the cause ``died``.
UNPLANNED_CAUSES: Final = frozenset({"timeout", "protocol_error", "died"})
#: The planned causes that come with a successor (scale-down and stop have none).
REPLACED_CAUSES: Final = frozenset({"reload", "max_requests", "max_memory", "ctl kill"})


def exit_label(cause: str, code: int) -> str:
    """How a worker's exit is counted in the metrics: its cause, with ``died``
    told apart as ``signal`` (killed by one nobody in the master sent) or
    ``crash`` (it exited by itself), and spaces and dashes as underscores."""
    if cause == "died":
        return "signal" if code < 0 else "crash"
    return cause.replace(" ", "_").replace("-", "_")


@dataclass(slots=True)
class SlotHistory:
    """What outlives the workers of one slot: for ``forkserver ctl status``.

    Every count is monotonic for the master's life: a reload or a
    scale-down never lowers one.
    """

    started: float = 0.0  # time.time() of the latest fork
    deaths: int = 0  # workers that died without being asked to
    replaced: int = 0  # workers retired on purpose for a successor (``REPLACED_CAUSES``)
    served: int = 0  # by the slot's earlier workers
    handler_errors: int = 0  # handler exceptions reported by the slot's workers
    last_exit: str | None = None
    last_error: str | None = None

    @property
    def restarts(self) -> int:
        """Kept for ``ctl status``: the unplanned deaths, each followed by a restart."""
        return self.deaths

    def exited(self, how: str, served: int, cause: str) -> None:
        if cause in REPLACED_CAUSES:
            self.replaced += 1
        elif cause not in PLANNED_CAUSES:
            self.deaths += 1
        self.served += served
        self.last_exit = how


class WorkerTable:
    """The live workers, by pid."""

    def __init__(self) -> None:
        self._by_pid: dict[int, WorkerRecord] = {}
        self._assignments = 0  # orders workers by when they last got a connection

    def __len__(self) -> int:
        return len(self._by_pid)

    def __iter__(self) -> Iterator[WorkerRecord]:
        return iter(tuple(self._by_pid.values()))

    @property
    def assignments(self) -> int:
        """Connections handed to workers so far (by ``assign``), for progress checks."""
        return self._assignments

    def get(self, pid: int) -> WorkerRecord | None:
        return self._by_pid.get(pid)

    def add(
        self, slot: int, pid: int, capacity: int, now: float, generation: int = 0, *,
        request_limit: int | None = None, prefetch: int = 0,
    ) -> WorkerRecord:
        if pid in self._by_pid:
            raise TableError(f"pid {pid} is already worker {self._by_pid[pid].slot}")
        if any(
            w.slot == slot and w.generation == generation and w.state is not WorkerState.STOPPING
            for w in self._by_pid.values()
        ):
            raise TableError(f"slot {slot} is already taken")
        if capacity < 1:
            raise TableError(f"worker capacity must be at least 1, not {capacity}")
        record = WorkerRecord(
            slot=slot, pid=pid, capacity=capacity, started_at=now, last_seen=now,
            generation=generation, request_limit=request_limit, prefetch=prefetch,
        )  # fmt: skip
        self._by_pid[pid] = record
        return record

    def remove(self, pid: int) -> WorkerRecord:
        try:
            return self._by_pid.pop(pid)
        except KeyError:
            raise TableError(f"pid {pid} is not a worker") from None

    def mark_ready(self, pid: int, now: float) -> WorkerRecord:
        record = self._require(pid)
        if record.state is not WorkerState.STARTING:
            raise TableError(
                f"worker {record.slot} (pid {pid}) sent READY while {record.state.value}"
            )
        record.state = WorkerState.READY
        record.was_ready = True
        record.last_seen = now
        return record

    def mark_stopping(self, pid: int, cause: str = "stop") -> WorkerRecord:
        """It gets no more connections; *cause* is why, unless one was given before."""
        record = self._require(pid)
        record.state = WorkerState.STOPPING
        if record.exit_cause is None:
            record.exit_cause = cause
        return record

    def retire(self, pid: int, cause: str) -> WorkerRecord:
        """Asked to finish what it holds and exit: its slot is free for a successor."""
        record = self.mark_stopping(pid, cause)
        record.retired = True
        return record

    def mark_killed(self, pid: int, cause: str, *, override: bool = False) -> WorkerRecord:
        """Signalled to die.  *override*: *cause* replaces an earlier one (a stuck worker)."""
        record = self._require(pid)
        if override:
            record.exit_cause = None
        self.mark_stopping(pid, cause)
        record.killed = True
        return record

    def note_cause(self, pid: int, cause: str) -> WorkerRecord:
        """Why it may exit soon (sent a signal on request), unless a cause was given before."""
        record = self._require(pid)
        if record.exit_cause is None:
            record.exit_cause = cause
        return record

    def served(self, pid: int, count: int, now: float) -> WorkerRecord:
        """It served *count* connections it accepted itself (shared listeners): no credit."""
        record = self._require(pid)
        record.served += count
        record.last_seen = now
        return record

    def handler_failed(self, pid: int) -> WorkerRecord:
        record = self._require(pid)
        record.errors += 1
        return record

    def restart_clocks(self, now: float) -> None:
        """The master itself was stalled: every worker's silence starts again from *now*."""
        for record in self._by_pid.values():
            record.last_seen = now

    def pick(self) -> WorkerRecord | None:
        """The least-loaded ready worker with room, if any.

        Least loaded means fewest connections held: a worker with free
        capacity always wins over one that could only prefetch.  Ties go
        to the worker given a connection longest ago, as a queue of idle
        workers blocked in ``accept()`` would have it: when the master
        is the bottleneck, workers are often idle together, and always
        breaking the tie one way would give one worker most of the
        connections.  A worker is never given
        more than its ``request_limit`` allows: what it has served and
        holds counts, so a prefetched connection cannot carry it past
        ``max_requests``.
        """
        # The order is (full, held, last_assigned, slot), compared field by
        # field: this runs once per connection, and a key tuple per worker
        # would cost more than the comparisons.
        best: WorkerRecord | None = None
        best_full, best_held = True, 0
        ready = WorkerState.READY
        for record in self._by_pid.values():
            if record.state is not ready:
                continue
            held = record.in_flight
            capacity = record.capacity
            if held >= (capacity if record.held_back else capacity + record.prefetch):
                continue
            limit = record.request_limit
            if limit is not None and record.served + held >= limit:
                continue
            full = held >= capacity
            if best is not None:
                if full is not best_full:
                    if full:
                        continue  # only prefetch room: any worker with free capacity wins
                elif held != best_held:
                    if held > best_held:
                        continue
                elif (record.last_assigned, record.slot) >= (best.last_assigned, best.slot):
                    continue
            best, best_full, best_held = record, full, held
        return best

    def take(self) -> WorkerRecord | None:
        """``pick()``, and ``assign()`` it one connection: the master's per-connection call."""
        record = self.pick()
        if record is not None:  # pick() found room: nothing left to check
            record.in_flight += 1
            self._assignments += 1
            record.last_assigned = self._assignments
        return record

    def take_runs(self, count: int) -> list[tuple[WorkerRecord, int]]:
        """Up to *count* ``take()`` calls at once: (record, how many) in the order they go.

        Expanded, the runs are what repeated ``take()`` would return,
        stopping where it would first return None (without that failing
        pick).  For the master's queue after a DONE: a run of connections
        to one worker is one step.  A run ends where the next worker in
        ``pick()``'s order wins: the worker just given one was given it
        last, so it loses every tie on (full, held) from then on
        (``last_assigned`` never exceeds ``assignments``).
        """
        # (full, held, last_assigned, slot, order): pick()'s order, with ties
        # broken by iteration order as pick() does; then its room left, the record.
        heap: list[tuple[bool, int, int, int, int, int, WorkerRecord]] = []
        ready = WorkerState.READY
        for record in self._by_pid.values():
            held, capacity = record.in_flight, record.capacity
            left = (capacity if record.held_back else capacity + record.prefetch) - held
            if left <= 0 or record.state is not ready:
                continue  # no room (most workers, under load), or not ready
            limit = record.request_limit
            if limit is not None:
                left = min(left, limit - record.served - held)
                if left <= 0:
                    continue
            heap.append((held >= capacity, held, record.last_assigned, record.slot, len(heap),
                         left, record))  # fmt: skip
        runs: list[tuple[WorkerRecord, int]] = []
        if len(heap) > 1:
            heapq.heapify(heap)
        while heap and count > 0:
            _, held, _, slot, order, left, record = heapq.heappop(heap)
            capacity = record.capacity
            run = min(left, count)
            if heap:
                # It keeps winning while its (full, held) stays below the next one's:
                # below its capacity and that one's held while that one is free;
                # below either while that one is full.
                next_full, next_held = heap[0][0], heap[0][1]
                bound = max(capacity, next_held) if next_full else min(capacity, next_held)
                run = min(run, max(1, bound - held))
            held += run
            record.in_flight = held
            self._assignments += run
            record.last_assigned = self._assignments
            runs.append((record, run))
            count -= run
            if left > run:
                heapq.heappush(heap, (held >= capacity, held, self._assignments, slot, order,
                                      left - run, record))  # fmt: skip
        return runs

    def assign(self, record: WorkerRecord, count: int = 1) -> None:
        """Count *count* connections as sent to *record*."""
        room = record.capacity if record.held_back else record.capacity + record.prefetch
        held = record.in_flight
        if record.state is not WorkerState.READY or held >= room or held + count > room:
            raise TableError(
                f"worker {record.slot} has {max(0, room - record.in_flight)} free of "
                f"{room}{' (held back)' if record.held_back else ''}, cannot take {count}"
            )
        record.in_flight += count
        self._assignments += 1
        record.last_assigned = self._assignments

    def hold_back(self, record: WorkerRecord) -> None:
        """Give *record* nothing beyond its capacity until it reports DONE."""
        record.held_back = True

    def unassign(self, record: WorkerRecord, count: int) -> None:
        """Connections counted by ``assign`` that never reached the worker."""
        if not 0 < count <= record.in_flight:
            raise TableError(
                f"worker {record.slot} holds {record.in_flight}, cannot return {count}"
            )
        record.in_flight -= count

    def complete(self, pid: int, count: int, now: float) -> WorkerRecord:
        """The worker reports *count* connections finished."""
        return self.completed(self._require(pid), count, now)

    def completed(self, record: WorkerRecord, count: int, now: float) -> WorkerRecord:
        """``complete`` for a record of this table in hand: the master's DONE."""
        pid = record.pid
        if not 0 < count <= record.in_flight:
            raise TableError(
                f"worker {record.slot} (pid {pid}) reported {count} done "
                f"but holds {record.in_flight}"
            )
        record.in_flight -= count
        record.served += count
        record.last_seen = now
        record.held_back = False
        return record

    def seen(self, pid: int, now: float) -> None:
        self._require(pid).last_seen = now

    def free_slot(self, slots: int) -> int | None:
        """The lowest slot below *slots* that no live worker holds."""
        taken = {w.slot for w in self._by_pid.values()}
        return next((slot for slot in range(slots) if slot not in taken), None)

    def count(self, state: WorkerState) -> int:
        return sum(1 for w in self._by_pid.values() if w.state is state)

    def _require(self, pid: int) -> WorkerRecord:
        record = self._by_pid.get(pid)
        if record is None:
            raise TableError(f"pid {pid} is not a worker")
        return record


#: A worker that dies sooner than this after it started has crashed
#: (so has one that dies before it was ever ready).
CRASH_WINDOW: Final = 1.0
#: A slot whose worker has lived this long since it was ready has no crashes.
HEALTHY_LIFETIME: Final = 10.0
FIRST_DELAY: Final = 0.1
MAX_DELAY: Final = 30.0
#: The longest wait while no other worker is ready: the service is never
#: dark for ``MAX_DELAY``, and a broken handler still forks at most once a
#: second per slot.
ALONE_DELAY: Final = 1.0
#: Doublings beyond this one are all ``MAX_DELAY``: the exponent stays small.
_MAX_DOUBLINGS: Final = 16


@dataclass(slots=True)
class SlotCrashes:
    crashes: int = 0  # consecutive crashes, cleared by a healthy worker
    failing: bool = False  # the latest worker crashed and no successor was ready since


def crash_delay(crashes: int) -> float:
    """0 for no crash, then 0.1 s, 0.2 s, 0.4 s ... up to ``MAX_DELAY``."""
    if crashes <= 0:
        return 0.0
    return min(FIRST_DELAY * 2.0 ** min(crashes - 1, _MAX_DOUBLINGS), MAX_DELAY)


class CrashBackoff:
    """How long to wait before replacing a worker that died, slot by slot.

    Only unplanned deaths are judged here: a worker the master retired
    (reload, scale-down, recycling, stop, ``ctl kill``) is never a crash.
    A worker that dies within ``CRASH_WINDOW`` of its start, or before it
    was ever ready, crashed: the slot's consecutive crashes wait 0.1 s,
    0.2 s, 0.4 s ... up to 30 s, so a broken handler cannot fork-bomb the
    machine, but never more than ``ALONE_DELAY`` while no other worker
    is ready, so the service is not dark for 30 s.  Each slot counts for
    itself: one slot's crashes never delay another's.  A slot's count is
    cleared once its worker has lived ``HEALTHY_LIFETIME`` after ready,
    or was retired on purpose after it was ready.

    A slot is *failing* from a crash until a successor is ready: the
    master is degraded while any slot is.
    """

    def __init__(self) -> None:
        self._slots: dict[int, SlotCrashes] = {}

    def died(self, slot: int, lifetime: float, *, was_ready: bool, alone: bool) -> float:
        """An unplanned death in *slot*, *lifetime* s after its fork: the delay
        before its successor.  *alone*: no other worker is ready."""
        state = self._slots.setdefault(slot, SlotCrashes())
        if was_ready and lifetime >= CRASH_WINDOW:
            if lifetime >= HEALTHY_LIFETIME:
                state.crashes = 0
            return 0.0
        state.crashes += 1
        state.failing = True
        delay = crash_delay(state.crashes)
        return min(delay, ALONE_DELAY) if alone else delay

    def ready(self, slot: int) -> None:
        """A worker of *slot* is ready: the slot is no longer failing."""
        state = self._slots.get(slot)
        if state is not None:
            state.failing = False

    def healthy(self, slot: int) -> None:
        """A worker of *slot* lived ``HEALTHY_LIFETIME``, or was retired after ready."""
        state = self._slots.get(slot)
        if state is not None:
            state.crashes = 0

    def forget(self, slot: int) -> None:
        """*slot* is gone (scale-down): nothing to wait for there."""
        self._slots.pop(slot, None)

    def reset(self) -> None:
        """Crashes are history (a reload); slots still failing stay so until ready."""
        for state in self._slots.values():
            state.crashes = 0

    def crashes(self, slot: int) -> int:
        state = self._slots.get(slot)
        return state.crashes if state is not None else 0

    def failing(self) -> dict[int, int]:
        """The failing slots, with their consecutive crashes, by slot."""
        return {slot: state.crashes for slot, state in sorted(self._slots.items())
                if state.failing}  # fmt: skip
