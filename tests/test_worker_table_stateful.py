"""``WorkerTable`` under random sequences of what the master does to it.

A rule-based state machine spawns, readies, assigns, completes, retires,
stops, kills and removes workers in any order hypothesis finds, and after
every step checks the invariants the table's docstring states.  An
operation the table must refuse (a READY twice, more DONE than held)
raises ``TableError`` and changes nothing.
"""

from __future__ import annotations

import copy
import dataclasses

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from forkserver.worker_table import TableError, WorkerRecord, WorkerState, WorkerTable

ORDER = [WorkerState.STARTING, WorkerState.READY, WorkerState.STOPPING]
CAUSES = ["reload", "scale-down", "max_requests", "stop", "ctl kill", "leaving"]


class TableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = WorkerTable()
        self.next_pid = 100
        self.now = 0.0
        self.states: dict[int, WorkerState] = {}  # the latest state seen, by pid
        self.served: dict[int, int] = {}
        self.assignments = 0

    # --- helpers ---------------------------------------------------------------

    def _records(self) -> list[WorkerRecord]:
        return list(self.table)

    def _snapshot(self) -> list[tuple[object, ...]]:
        return [dataclasses.astuple(r) for r in self.table]

    def _pick_record(self, index: int) -> WorkerRecord:
        records = self._records()
        return records[index % len(records)]

    def _refused(self, action: object) -> None:
        """*action* must raise TableError and leave the table as it was."""
        before = self._snapshot()
        try:
            action()  # type: ignore[operator]
        except TableError:
            assert self._snapshot() == before
            return
        raise AssertionError("the table accepted an impossible transition")

    # --- rules -----------------------------------------------------------------

    @rule(
        slot=st.integers(0, 3), generation=st.integers(0, 1), capacity=st.integers(1, 3),
        prefetch=st.integers(0, 1), limit=st.none() | st.integers(1, 6),
    )  # fmt: skip
    def spawn(self, slot: int, generation: int, capacity: int, prefetch: int,
              limit: int | None) -> None:  # fmt: skip
        taken = any(r.slot == slot and r.generation == generation
                    and r.state is not WorkerState.STOPPING for r in self.table)  # fmt: skip
        pid = self.next_pid
        if taken:
            self._refused(lambda: self.table.add(slot, pid, capacity, self.now, generation))
            return
        self.next_pid += 1
        record = self.table.add(slot, pid, capacity, self.now, generation,
                                request_limit=limit, prefetch=prefetch)  # fmt: skip
        assert record.state is WorkerState.STARTING and record.in_flight == 0
        self.states[pid] = record.state
        self.served[pid] = 0

    @precondition(lambda self: len(self.table) > 0)
    @rule(index=st.integers(0, 50))
    def ready(self, index: int) -> None:
        record = self._pick_record(index)
        if record.state is not WorkerState.STARTING:
            self._refused(lambda: self.table.mark_ready(record.pid, self.now))
            return
        self.table.mark_ready(record.pid, self.now)
        assert record.was_ready

    @rule()
    def assign(self) -> None:
        record = self.table.pick()
        if record is None:
            for r in self.table:  # nobody with room and under its limit is left out
                room = r.state is WorkerState.READY and r.in_flight < r.capacity + r.prefetch
                under = r.request_limit is None or r.served + r.in_flight < r.request_limit
                assert not (room and under)
            return
        assert record.state is WorkerState.READY
        self.table.assign(record)
        self.assignments += 1
        assert record.last_assigned == self.table.assignments == self.assignments

    @rule(count=st.integers(0, 12))
    def take_runs(self, count: int) -> None:
        """The queue after a DONE: what repeated take() would hand out, in runs."""
        by_take = copy.deepcopy(self.table)
        expected = []
        for _ in range(count):
            record = by_take.take()
            if record is None:
                break
            expected.append(record.pid)
        runs = self.table.take_runs(count)
        assert [record.pid for record, run in runs for _ in range(run)] == expected
        assert self._snapshot() == [dataclasses.astuple(r) for r in by_take]
        self.assignments += len(expected)
        assert self.table.assignments == self.assignments

    @precondition(lambda self: len(self.table) > 0)
    @rule(index=st.integers(0, 50), count=st.integers(1, 4))
    def done(self, index: int, count: int) -> None:
        record = self._pick_record(index)
        if count > record.in_flight:
            self._refused(lambda: self.table.complete(record.pid, count, self.now))
            return
        self.table.complete(record.pid, count, self.now)
        self.served[record.pid] += count

    @precondition(lambda self: len(self.table) > 0)
    @rule(index=st.integers(0, 50), count=st.integers(1, 3))
    def take_back(self, index: int, count: int) -> None:
        record = self._pick_record(index)
        if count > record.in_flight:
            self._refused(lambda: self.table.unassign(record, count))
            return
        held = record.in_flight
        self.table.unassign(record, count)
        assert record.in_flight == held - count

    @precondition(lambda self: len(self.table) > 0)
    @rule(index=st.integers(0, 50), cause=st.sampled_from(CAUSES))
    def retire(self, index: int, cause: str) -> None:
        record = self._pick_record(index)
        before = record.exit_cause
        self.table.retire(record.pid, cause)
        assert record.retired and record.state is WorkerState.STOPPING
        assert record.exit_cause == (before or cause)  # the first cause stands

    @precondition(lambda self: len(self.table) > 0)
    @rule(index=st.integers(0, 50))
    def stop(self, index: int) -> None:
        record = self._pick_record(index)
        self.table.mark_stopping(record.pid, "stop")
        assert record.state is WorkerState.STOPPING

    @precondition(lambda self: len(self.table) > 0)
    @rule(index=st.integers(0, 50), stuck=st.booleans())
    def kill(self, index: int, stuck: bool) -> None:
        record = self._pick_record(index)
        before = record.exit_cause
        cause = "timeout" if stuck else "protocol_error"
        self.table.mark_killed(record.pid, cause, override=stuck)
        assert record.killed
        assert record.exit_cause == (cause if stuck else (before or cause))

    @precondition(lambda self: len(self.table) > 0)
    @rule(index=st.integers(0, 50))
    def exit(self, index: int) -> None:
        record = self._pick_record(index)
        removed = self.table.remove(record.pid)
        assert removed is record
        assert self.table.get(record.pid) is None
        self.states.pop(record.pid)
        self._refused(lambda: self.table.remove(record.pid))

    @rule(pid=st.integers(0, 99))
    def unknown_pid(self, pid: int) -> None:
        self._refused(lambda: self.table.mark_ready(pid, self.now))
        self._refused(lambda: self.table.complete(pid, 1, self.now))

    @rule(step=st.floats(0.0, 5.0))
    def time_passes(self, step: float) -> None:
        self.now += step

    # --- invariants ------------------------------------------------------------

    @invariant()
    def pids_and_slots_are_unique(self) -> None:
        records = self._records()
        assert len({r.pid for r in records}) == len(records) == len(self.table)
        live = [(r.generation, r.slot) for r in records if r.state is not WorkerState.STOPPING]
        assert len(live) == len(set(live))

    @invariant()
    def load_stays_within_capacity_and_prefetch(self) -> None:
        for r in self.table:
            assert 0 <= r.in_flight <= r.capacity + r.prefetch
            assert r.has_capacity() == (
                r.state is WorkerState.READY and r.in_flight < r.capacity + r.prefetch
            )

    @invariant()
    def states_only_move_forward(self) -> None:
        for r in self.table:
            assert ORDER.index(r.state) >= ORDER.index(self.states[r.pid])
            self.states[r.pid] = r.state
            assert r.was_ready or r.state is not WorkerState.READY

    @invariant()
    def a_leaving_worker_is_described_by_its_record(self) -> None:
        for r in self.table:
            if r.state is WorkerState.STOPPING:
                assert r.exit_cause is not None
            if r.retired or r.killed:
                assert r.state is WorkerState.STOPPING

    @invariant()
    def served_counts_only_grow_by_what_was_done(self) -> None:
        for r in self.table:
            assert r.served == self.served[r.pid]

    @invariant()
    def pick_gives_only_ready_workers_with_room_under_their_limit(self) -> None:
        record = self.table.pick()
        if record is not None:
            assert record.state is WorkerState.READY
            assert record.in_flight < record.capacity + record.prefetch
            limit = record.request_limit
            assert limit is None or record.served + record.in_flight < limit


TableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                          deadline=None)  # fmt: skip
test_the_worker_table_keeps_its_invariants = TableMachine.TestCase
