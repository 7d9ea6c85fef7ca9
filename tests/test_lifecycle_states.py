"""The master's phase, walked exhaustively from its table: pure, no processes."""

from __future__ import annotations

import itertools

import pytest

from forkserver.lifecycle import (
    FORCED,
    STOPPING,
    TRANSITIONS,
    Event,
    Lifecycle,
    LifecycleError,
    Phase,
    finished,
    may_replace,
    next_phase,
    status_state,
    stop_workers,
)

PAIRS = list(itertools.product(Phase, Event))
LEGAL = [pair for pair in PAIRS if pair in TRANSITIONS]
ILLEGAL = [pair for pair in PAIRS if pair not in TRANSITIONS]


@pytest.mark.parametrize(("phase", "event"), LEGAL, ids=lambda x: x.name)
def test_every_legal_transition_lands_where_the_table_says(phase: Phase, event: Event) -> None:
    lifecycle = Lifecycle(phase)
    changed = lifecycle.fire(event)
    after = TRANSITIONS[phase, event]
    assert lifecycle.phase is after
    assert changed is (after is not phase)
    assert lifecycle.stopping is (after in STOPPING)
    assert lifecycle.forced is (after in FORCED)
    assert lifecycle.done is (after is Phase.DONE)


@pytest.mark.parametrize(("phase", "event"), ILLEGAL, ids=lambda x: x.name)
def test_every_illegal_transition_raises_naming_the_phase_and_the_event(
    phase: Phase, event: Event
) -> None:
    lifecycle = Lifecycle(phase)
    with pytest.raises(LifecycleError) as caught:
        lifecycle.fire(event)
    assert event.name in str(caught.value)
    assert phase.value in str(caught.value)
    assert lifecycle.phase is phase  # nothing changed


def test_the_illegal_set_is_exactly_what_a_bug_would_be() -> None:
    # Readiness twice, or a stop finishing that never began, or twice: all bugs.
    assert set(ILLEGAL) == {
        (Phase.STARTING, Event.FINISHED),
        (Phase.SERVING, Event.READY),
        (Phase.SERVING, Event.FINISHED),
        (Phase.DEPARTING, Event.FINISHED),
        (Phase.DONE, Event.FINISHED),
    }


def test_phases_only_move_forward() -> None:
    order = list(Phase)
    for (phase, _), after in TRANSITIONS.items():
        assert order.index(after) >= order.index(phase)


def test_every_phase_can_reach_done_and_done_is_absorbing() -> None:
    for phase in Phase:
        reached = {phase}
        frontier = [phase]
        while frontier:
            current = frontier.pop()
            for event in Event:
                after = TRANSITIONS.get((current, event))
                if after is not None and after not in reached:
                    reached.add(after)
                    frontier.append(after)
        assert Phase.DONE in reached
    assert {after for (phase, _), after in TRANSITIONS.items() if phase is Phase.DONE} == {
        Phase.DONE
    }


def test_a_second_fast_stop_kills_and_every_stop_is_idempotent() -> None:
    lifecycle = Lifecycle()
    assert lifecycle.fire(Event.STOP_FAST)
    assert lifecycle.phase is Phase.HALTING
    assert lifecycle.fire(Event.STOP_FAST)
    assert lifecycle.phase is Phase.KILLING
    for event in (Event.STOP, Event.STOP_FAST, Event.STOP_NOW, Event.READY):
        assert not lifecycle.fire(event)


def test_next_phase_is_the_table() -> None:
    for (phase, event), after in TRANSITIONS.items():
        assert next_phase(phase, event) is after


# --- the predicates, over every phase --------------------------------------------


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.name)
def test_a_dead_worker_is_replaced_while_serving_or_for_connections_a_drain_still_owes(
    phase: Phase,
) -> None:
    for pending in (False, True):
        expected = phase in (Phase.STARTING, Phase.SERVING, Phase.DEPARTING) or (
            phase is Phase.DRAINING and pending
        )
        assert may_replace(phase, pending=pending) is expected


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.name)
def test_workers_get_stop_once_a_stop_has_nothing_queued(phase: Phase) -> None:
    for pending in (False, True):
        expected = phase in STOPPING and phase is not Phase.DONE and not pending
        assert stop_workers(phase, pending=pending) is expected


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.name)
def test_a_stop_is_finished_with_no_worker_left_nor_one_due_for_what_is_queued(
    phase: Phase,
) -> None:
    for workers, pending, due in itertools.product((0, 1), (False, True), (False, True)):
        result = finished(phase, workers=workers, pending=pending, respawn_due=due)
        if phase not in STOPPING or phase is Phase.DONE or workers:
            assert result is False
        elif phase in FORCED:
            assert result is True  # what is queued is dropped
        else:
            assert result is (not (pending and due))


def test_status_state_names_stopping_then_reloading_then_degraded() -> None:
    for phase, degraded, reloading in itertools.product(Phase, (False, True), (False, True)):
        state = status_state(phase, degraded=degraded, reloading=reloading)
        if phase in STOPPING:
            assert state == "stopping"
        elif phase is Phase.DEPARTING:
            assert state == "draining"
        elif reloading:
            assert state == "reloading"
        elif degraded:
            assert state == "degraded"
        else:
            assert state == ("running" if phase is Phase.SERVING else "starting")


def test_departing_waits_for_its_stop_and_a_second_graceful_stop_changes_nothing() -> None:
    lifecycle = Lifecycle(Phase.SERVING)
    assert lifecycle.fire(Event.DEPART)
    assert (lifecycle.phase, lifecycle.stopping) == (Phase.DEPARTING, False)
    assert not lifecycle.fire(Event.DEPART)
    assert lifecycle.fire(Event.STOP)
    assert lifecycle.phase is Phase.DRAINING
    fast = Lifecycle(Phase.DEPARTING)
    assert fast.fire(Event.STOP_FAST)
    assert fast.phase is Phase.HALTING
