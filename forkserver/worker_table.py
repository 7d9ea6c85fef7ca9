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
  ``prefetch`` (0 or 1) lets a busy worker hold one descriptor beyond
  its concurrency, queued on its channel, so that it never waits for a
  round trip through the master between two connections; ``pick``
  still prefers a worker with free capacity, so idle workers come first.
* Only ``READY`` workers receive connections.  States move forward
  only: ``STARTING`` -> ``READY`` -> ``STOPPING``.
"""

from __future__ import annotations

import enum
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
    prefetch: int = 0  # descriptors it may hold queued beyond its capacity
    last_assigned: int = 0  # the table's count of assignments when it last got one

    def has_capacity(self) -> bool:
        return self.state is WorkerState.READY and self.in_flight < self.capacity + self.prefetch


@dataclass(slots=True)
class SlotHistory:
    """What outlives the workers of one slot: for ``forkserver ctl status``."""

    started: float = 0.0  # time.time() of the latest fork
    restarts: int = 0
    served: int = 0  # by the slot's earlier workers
    last_exit: str | None = None
    last_error: str | None = None

    def exited(self, how: str, served: int) -> None:
        self.restarts += 1
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

    def get(self, pid: int) -> WorkerRecord | None:
        return self._by_pid.get(pid)

    def add(
        self, slot: int, pid: int, capacity: int, now: float, generation: int = 0
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
            generation=generation,
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
        record.last_seen = now
        return record

    def mark_stopping(self, pid: int) -> WorkerRecord:
        record = self._require(pid)
        record.state = WorkerState.STOPPING
        return record

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
        best: WorkerRecord | None = None
        best_key = (True, 0, 0, 0)
        ready = WorkerState.READY
        for record in self._by_pid.values():
            held = record.in_flight
            limit = record.request_limit
            if limit is not None and record.served + held >= limit:
                continue
            if record.state is ready and held < record.capacity + record.prefetch:
                key = (held >= record.capacity, held, record.last_assigned, record.slot)
                if best is None or key < best_key:
                    best, best_key = record, key
        return best

    def assign(self, record: WorkerRecord, count: int = 1) -> None:
        """Count *count* connections as sent to *record*."""
        room = record.capacity + record.prefetch
        if not record.has_capacity() or record.in_flight + count > room:
            raise TableError(
                f"worker {record.slot} has {room - record.in_flight} free of "
                f"{room}, cannot take {count}"
            )
        record.in_flight += count
        self._assignments += 1
        record.last_assigned = self._assignments

    def unassign(self, record: WorkerRecord, count: int) -> None:
        """Connections counted by ``assign`` that never reached the worker."""
        if not 0 < count <= record.in_flight:
            raise TableError(
                f"worker {record.slot} holds {record.in_flight}, cannot return {count}"
            )
        record.in_flight -= count

    def complete(self, pid: int, count: int, now: float) -> WorkerRecord:
        """The worker reports *count* connections finished."""
        record = self._require(pid)
        if not 0 < count <= record.in_flight:
            raise TableError(
                f"worker {record.slot} (pid {pid}) reported {count} done "
                f"but holds {record.in_flight}"
            )
        record.in_flight -= count
        record.served += count
        record.last_seen = now
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


#: A worker that exits sooner than this after it started has crashed.
CRASH_WINDOW: Final = 1.0
#: A worker that lived this long resets the crash count.
HEALTHY_LIFETIME: Final = 10.0
FIRST_DELAY: Final = 0.1
MAX_DELAY: Final = 30.0


class CrashBackoff:
    """How long to wait before replacing a worker that exited.

    A worker that dies within ``CRASH_WINDOW`` of starting is a crash.
    Consecutive crashes wait 0.1 s, 0.2 s, 0.4 s ... up to 30 s, so a
    broken handler cannot fork-bomb the machine.  A worker that lived
    ``HEALTHY_LIFETIME`` resets the count; other exits leave it as is.
    """

    def __init__(self) -> None:
        self.crashes = 0

    def delay_after_exit(self, lifetime: float) -> float:
        if lifetime >= HEALTHY_LIFETIME:
            self.crashes = 0
        if lifetime >= CRASH_WINDOW:
            return 0.0
        self.crashes += 1
        delay: float = FIRST_DELAY * 2.0 ** (self.crashes - 1)
        return min(delay, MAX_DELAY)

    def reset(self) -> None:
        """A worker has now lived ``HEALTHY_LIFETIME``: crashes are history."""
        self.crashes = 0
