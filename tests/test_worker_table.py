"""Worker bookkeeping and crash backoff: pure, no processes."""

import copy
import random

import pytest

from forkserver.worker_table import (
    ALONE_DELAY,
    FIRST_DELAY,
    MAX_DELAY,
    CrashBackoff,
    TableError,
    WorkerRecord,
    WorkerState,
    WorkerTable,
)


def ready_table(*capacities: int) -> WorkerTable:
    table = WorkerTable()
    for slot, capacity in enumerate(capacities):
        table.add(slot, 100 + slot, capacity, now=0.0)
        table.mark_ready(100 + slot, now=0.0)
    return table


def test_a_new_worker_gets_nothing_until_ready() -> None:
    table = WorkerTable()
    table.add(0, 100, 1, now=0.0)
    assert table.pick() is None
    table.mark_ready(100, now=1.0)
    picked = table.pick()
    assert picked is not None
    assert picked.pid == 100


def test_pick_prefers_the_least_loaded_then_the_lowest_slot() -> None:
    table = ready_table(4, 4, 4)
    order = []
    for _ in range(6):
        record = table.pick()
        assert record is not None
        table.assign(record)
        order.append(record.slot)
    assert order == [0, 1, 2, 0, 1, 2]


def test_idle_workers_take_turns() -> None:
    """Equally loaded workers: the one given a connection longest ago goes first.

    Each connection here is done before the next arrives, so every
    worker is idle at each pick; ties broken by slot alone would give
    slot 0 all of them.
    """
    table = ready_table(1, 1, 1)
    order = []
    for now in range(7):
        record = table.pick()
        assert record is not None
        table.assign(record)
        table.complete(record.pid, 1, now=float(now))
        order.append(record.slot)
    assert order == [0, 1, 2, 0, 1, 2, 0]
    assert [record.served for record in table] == [3, 2, 2]


def test_a_full_worker_is_never_picked_and_done_frees_it() -> None:
    table = ready_table(1, 2)
    for _ in range(3):
        record = table.pick()
        assert record is not None
        table.assign(record)
    assert table.pick() is None
    table.complete(101, 1, now=2.0)
    record = table.pick()
    assert record is not None
    assert record.slot == 1
    assert table.get(101).served == 1  # type: ignore[union-attr]


def test_assign_beyond_capacity_is_refused() -> None:
    table = ready_table(2)
    record = table.get(100)
    assert record is not None
    with pytest.raises(TableError, match=r"^worker 0 has 2 free of 2, cannot take 3$"):
        table.assign(record, 3)


def test_a_worker_reporting_more_done_than_it_holds_is_an_error() -> None:
    table = ready_table(2)
    with pytest.raises(TableError, match=r"^worker 0 \(pid 100\) reported 1 done but holds 0$"):
        table.complete(100, 1, now=1.0)


def test_unassign_returns_unsent_credit() -> None:
    table = ready_table(2)
    record = table.get(100)
    assert record is not None
    table.assign(record, 2)
    table.unassign(record, 2)
    assert record.in_flight == 0
    with pytest.raises(TableError, match="cannot return 1"):
        table.unassign(record, 1)


def test_stopping_workers_get_no_connections() -> None:
    table = ready_table(1)
    table.mark_stopping(100)
    assert table.pick() is None
    assert table.count(WorkerState.STOPPING) == 1


def test_ready_twice_is_an_error_naming_the_worker() -> None:
    table = ready_table(1)
    with pytest.raises(TableError, match=r"^worker 0 \(pid 100\) sent READY while ready$"):
        table.mark_ready(100, now=1.0)


def test_pids_and_slots_are_unique() -> None:
    table = ready_table(1)
    with pytest.raises(TableError, match="pid 100 is already worker 0"):
        table.add(1, 100, 1, now=0.0)
    with pytest.raises(TableError, match="slot 0 is already taken"):
        table.add(0, 200, 1, now=0.0)
    with pytest.raises(TableError, match="capacity must be at least 1"):
        table.add(1, 200, 0, now=0.0)


def test_unknown_pids_are_errors() -> None:
    table = WorkerTable()
    with pytest.raises(TableError, match=r"^pid 7 is not a worker$"):
        table.remove(7)
    with pytest.raises(TableError, match=r"^pid 7 is not a worker$"):
        table.complete(7, 1, now=0.0)
    assert table.get(7) is None


def test_free_slot_reuses_the_lowest_gap() -> None:
    table = ready_table(1, 1, 1)
    assert table.free_slot(3) is None
    table.remove(101)
    assert table.free_slot(3) == 1
    assert table.free_slot(1) is None
    assert len(table) == 2
    assert sorted(w.slot for w in table) == [0, 2]


def test_crash_backoff_doubles_to_thirty_seconds_and_resets() -> None:
    backoff = CrashBackoff()
    delays = [backoff.died(0, 0.5, was_ready=True, alone=False) for _ in range(12)]
    assert delays[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert delays[-1] == 30.0
    assert max(delays) == 30.0
    # not a crash (it was ready and lived past the window), but not healthy either
    assert backoff.died(0, 5.0, was_ready=True, alone=False) == 0.0
    assert backoff.died(0, 0.1, was_ready=True, alone=False) == 30.0
    assert backoff.died(0, 10.0, was_ready=True, alone=False) == 0.0
    assert backoff.died(0, 0.1, was_ready=True, alone=False) == pytest.approx(0.1)
    backoff.reset()
    assert backoff.crashes(0) == 0


def test_thousands_of_crashes_keep_the_delay_at_its_bound() -> None:
    backoff = CrashBackoff()
    delays = {backoff.died(0, 0.01, was_ready=False, alone=False) for _ in range(5000)}
    assert max(delays) == MAX_DELAY
    assert backoff.died(0, 0.01, was_ready=False, alone=False) == MAX_DELAY
    assert backoff.crashes(0) == 5001


def test_each_slot_counts_its_own_crashes() -> None:
    backoff = CrashBackoff()
    for _ in range(8):
        backoff.died(0, 0.1, was_ready=True, alone=False)
    assert backoff.died(1, 0.1, was_ready=True, alone=False) == pytest.approx(FIRST_DELAY)
    assert backoff.crashes(0) == 8
    backoff.healthy(0)
    assert backoff.died(0, 0.1, was_ready=True, alone=False) == pytest.approx(FIRST_DELAY)


def test_a_worker_that_never_became_ready_crashed_however_long_it_took() -> None:
    backoff = CrashBackoff()
    assert backoff.died(0, 5.0, was_ready=False, alone=False) == pytest.approx(0.1)
    assert backoff.died(0, 50.0, was_ready=False, alone=False) == pytest.approx(0.2)


def test_while_no_other_worker_is_ready_the_delay_is_capped() -> None:
    backoff = CrashBackoff()
    for _ in range(10):
        backoff.died(0, 0.1, was_ready=True, alone=False)
    assert backoff.died(0, 0.1, was_ready=True, alone=True) == ALONE_DELAY
    assert backoff.died(0, 0.1, was_ready=True, alone=False) == MAX_DELAY


def test_a_slot_fails_from_a_crash_until_a_successor_is_ready() -> None:
    backoff = CrashBackoff()
    backoff.died(0, 5.0, was_ready=True, alone=False)  # not a crash
    assert backoff.failing() == {}
    backoff.died(1, 0.2, was_ready=False, alone=False)
    backoff.died(1, 0.2, was_ready=False, alone=False)
    assert backoff.failing() == {1: 2}
    backoff.reset()  # a reload forgets the count, not that the slot has no worker
    assert backoff.failing() == {1: 0}
    backoff.ready(1)
    assert backoff.failing() == {}
    backoff.died(2, 0.2, was_ready=False, alone=False)
    backoff.forget(2)  # scaled down: nothing to wait for
    assert backoff.failing() == {}


def prefetching_table(count: int) -> WorkerTable:
    table = WorkerTable()
    for slot in range(count):
        record = table.add(slot, 100 + slot, 1, now=0.0)
        record.prefetch = 1
        table.mark_ready(100 + slot, now=0.0)
    return table


def test_prefetch_goes_to_busy_workers_only_after_every_idle_one() -> None:
    table = prefetching_table(3)
    order = []
    while (record := table.pick()) is not None:
        table.assign(record)
        order.append(record.slot)
    assert order == [0, 1, 2, 0, 1, 2]  # every worker busy before any prefetches
    assert [record.in_flight for record in table] == [2, 2, 2]  # capacity + 1, no more


def test_a_worker_with_free_capacity_wins_over_a_less_loaded_one_that_could_only_prefetch() -> None:
    table = WorkerTable()
    sync = table.add(0, 100, 1, now=0.0)
    sync.prefetch = 1
    roomy = table.add(1, 101, 8, now=0.0)
    for pid in (100, 101):
        table.mark_ready(pid, now=0.0)
    table.assign(sync)
    table.assign(roomy, 5)
    assert table.pick() is roomy


def test_assign_beyond_capacity_and_prefetch_is_refused() -> None:
    table = prefetching_table(1)
    record = table.get(100)
    assert record is not None
    table.assign(record, 2)
    assert table.pick() is None
    with pytest.raises(TableError, match=r"^worker 0 has 0 free of 2, cannot take 1$"):
        table.assign(record)
    table.complete(100, 1, now=1.0)
    assert table.pick() is record


def test_a_worker_is_never_given_more_than_its_request_limit() -> None:
    """Prefetch must not carry a worker past max_requests: served + held counts."""
    table = prefetching_table(2)
    limited, other = table.get(100), table.get(101)
    assert limited is not None and other is not None
    limited.request_limit = 3
    limited.served = 2
    table.assign(limited)  # its third and last connection
    assert table.pick() is other  # idle, so first anyway
    table.assign(other)
    # Both busy: the prefetch would go to slot 0 on the tie, but it has no allowance left.
    assert table.pick() is other
    table.complete(100, 1, now=1.0)
    assert limited.served == 3
    assert table.pick() is other  # idle now, and still never picked again


def test_a_held_back_worker_gets_nothing_beyond_its_capacity_until_it_reports_done() -> None:
    table = WorkerTable()
    record = table.add(0, 100, 1, now=0.0)
    record.prefetch = 3
    table.mark_ready(100, now=0.0)
    table.assign(record, 2)
    table.hold_back(record)
    assert table.pick() is None  # it holds its capacity: no room while held back
    with pytest.raises(TableError, match=r"^worker 0 has 0 free of 1 \(held back\), cannot take 1"):
        table.assign(record)
    table.complete(100, 1, now=1.0)
    assert not record.held_back
    assert table.pick() is record
    table.assign(record, 3)  # its whole window again
    assert record.in_flight == 4


def test_take_picks_the_least_loaded_and_counts_the_connection_to_it() -> None:
    table = WorkerTable()
    first, second = (table.add(slot, 100 + slot, 1, now=0.0) for slot in (0, 1))
    for record in (first, second):
        record.prefetch = 1
        table.mark_ready(record.pid, now=0.0)
    second.request_limit = 1
    taken = [table.take() for _ in range(4)]
    # One each while both are free, then only the first: the second has reached its limit.
    assert taken == [first, second, first, None]
    assert (first.in_flight, second.in_flight) == (2, 1)
    assert table.assignments == 3
    assert first.last_assigned == 3


def _pick_by_key(table: WorkerTable) -> WorkerRecord | None:
    """``pick()``'s order spelt as one key per worker: the specification it is held to."""
    candidates = [
        record for record in table
        if record.state is WorkerState.READY and record.in_flight < record.room()
        and (record.request_limit is None
             or record.served + record.in_flight < record.request_limit)
    ]  # fmt: skip
    return min(candidates, default=None, key=lambda r: (
        r.in_flight >= r.capacity, r.in_flight, r.last_assigned, r.slot))  # fmt: skip


def test_pick_follows_its_order_in_every_state_of_a_random_table() -> None:
    rng = random.Random(14)
    for _ in range(2000):
        table = WorkerTable()
        for slot in range(rng.randint(1, 5)):
            pid = 100 + slot
            record = table.add(slot, pid, rng.randint(1, 3), now=0.0, prefetch=rng.choice((0, 7)),
                               request_limit=rng.choice((None, 5, 50)))  # fmt: skip
            if rng.random() < 0.8:
                table.mark_ready(pid, now=0.0)
            record.in_flight = rng.randint(0, record.room())
            record.served = rng.randint(0, 10)
            record.held_back = rng.random() < 0.2
            record.last_assigned = rng.randint(0, 3)  # ties on purpose
        assert table.pick() is _pick_by_key(table)


def _random_table(rng: random.Random) -> WorkerTable:
    """Workers in any state a live table can be in, ``last_assigned`` from real assigns."""
    table = WorkerTable()
    for index in range(rng.randint(1, 5)):
        pid = 100 + index
        # Now and then a slot taken twice, by two generations: ties down to the slot.
        slot, generation = (index - 1, 1) if index and rng.random() < 0.2 else (index, 0)
        table.add(slot, pid, rng.randint(1, 3), now=0.0, generation=generation,
                  prefetch=rng.choice((0, 7)), request_limit=rng.choice((None, 5, 50)))  # fmt: skip
        if rng.random() < 0.8:
            table.mark_ready(pid, now=0.0)
    records = list(table)
    for _ in range(rng.randint(0, 6)):  # real assignments order the workers
        record = rng.choice(records)
        if record.state is WorkerState.READY and record.in_flight < record.room():
            table.assign(record)
    for record in records:
        record.in_flight = rng.randint(0, record.room())
        record.served = rng.randint(0, 10)
        record.held_back = rng.random() < 0.2
    return table


def test_take_runs_hands_out_what_repeated_take_would_in_every_state_of_a_random_table() -> None:
    rng = random.Random(14)
    for _ in range(3000):
        table = _random_table(rng)
        count = rng.randint(0, 30)
        by_take = copy.deepcopy(table)
        expected = []
        for _ in range(count):
            record = by_take.take()
            if record is None:
                break
            expected.append(record.pid)
        runs = table.take_runs(count)
        assert all(run > 0 for _, run in runs)
        assert [record.pid for record, run in runs for _ in range(run)] == expected
        assert table.assignments == by_take.assignments
        assert [(r.pid, r.in_flight, r.last_assigned) for r in table] == [
            (r.pid, r.in_flight, r.last_assigned) for r in by_take]  # fmt: skip
