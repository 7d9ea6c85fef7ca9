"""The master's own state, as one enum and one transition table: pure.

Every change of the master's phase goes through ``Lifecycle.fire``, and
the table below is the whole story: a pair that is not in it is a bug,
and raises ``LifecycleError`` naming the phase and the event.  Nothing
here forks, signals or reads a clock, so every transition is tested
without processes (``tests/test_lifecycle_states.py`` walks the table).

=========  ============================================================
STARTING   the first workers are forked; not every one is ready yet
SERVING    every configured worker was ready once: READY=1 was sent
DEPARTING  a graceful stop with ``drain_delay``: the health answers say
           drain while the listeners still accept, so the balancers move
           new connections away first; DRAINING follows after the delay
DRAINING   a graceful stop (TERM, ``ctl stop``, or a newer master took
           over): no new connections, queued ones still go to workers,
           then every worker gets STOP and finishes what it holds
HALTING    a fast stop (INT, QUIT): queued connections dropped, STOP to
           every worker at once
KILLING    SIGKILL to every worker (a second INT, ``ctl stop --now``, a
           stop past ``graceful_timeout``, no worker ready within
           ``startup_timeout``)
DONE       no worker is left nor due: the loop ends
=========  ============================================================

Two more dimensions are kept apart because they cross every phase:
a reload under way (``generations``, ``reloader``) and *degraded*, a
slot that cannot keep a worker (``CrashBackoff.failing``).  The
predicates that decide what the master does in a phase (may a dead
worker be replaced, is the stop complete, what ``ctl status`` calls the
state) live here too, as functions of plain values.
"""

from __future__ import annotations

import enum
from typing import Final


class Phase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DEPARTING = "departing"
    DRAINING = "draining"
    HALTING = "halting"
    KILLING = "killing"
    DONE = "done"


class Event(enum.Enum):
    READY = "every configured worker is ready"
    STOP = "graceful stop"
    DEPART = "graceful stop after drain_delay"
    HANDED_OVER = "a newer master serves"
    STOP_FAST = "fast stop"
    STOP_NOW = "kill every worker"
    FINISHED = "no worker left nor due"


class LifecycleError(Exception):
    """An event the master's phase does not allow: a bug in the master."""


_P, _E = Phase, Event
#: (phase, event) -> the next phase.  A pair that maps to its own phase is
#: allowed and changes nothing (a second TERM while draining, say).
TRANSITIONS: Final[dict[tuple[Phase, Event], Phase]] = {
    (_P.STARTING, _E.READY): _P.SERVING,
    (_P.STARTING, _E.STOP): _P.DRAINING,
    (_P.STARTING, _E.HANDED_OVER): _P.DRAINING,
    (_P.STARTING, _E.STOP_FAST): _P.HALTING,
    (_P.STARTING, _E.STOP_NOW): _P.KILLING,
    (_P.SERVING, _E.STOP): _P.DRAINING,
    (_P.SERVING, _E.HANDED_OVER): _P.DRAINING,
    (_P.SERVING, _E.STOP_FAST): _P.HALTING,
    (_P.SERVING, _E.STOP_NOW): _P.KILLING,
    (_P.STARTING, _E.DEPART): _P.DEPARTING,
    (_P.SERVING, _E.DEPART): _P.DEPARTING,
    # Leaving: still serving as before; another graceful stop changes nothing
    # (a preStop hook's ``ctl stop``, then the TERM); the delay ends with STOP.
    (_P.DEPARTING, _E.READY): _P.DEPARTING,
    (_P.DEPARTING, _E.DEPART): _P.DEPARTING,
    (_P.DEPARTING, _E.STOP): _P.DRAINING,
    (_P.DEPARTING, _E.HANDED_OVER): _P.DRAINING,
    (_P.DEPARTING, _E.STOP_FAST): _P.HALTING,
    (_P.DEPARTING, _E.STOP_NOW): _P.KILLING,
    (_P.DRAINING, _E.DEPART): _P.DRAINING,
    (_P.HALTING, _E.DEPART): _P.HALTING,
    (_P.KILLING, _E.DEPART): _P.KILLING,
    (_P.DONE, _E.DEPART): _P.DONE,
    # Workers that become ready during a stop are not announced.
    (_P.DRAINING, _E.READY): _P.DRAINING,
    (_P.DRAINING, _E.STOP): _P.DRAINING,
    (_P.DRAINING, _E.HANDED_OVER): _P.DRAINING,
    (_P.DRAINING, _E.STOP_FAST): _P.HALTING,
    (_P.DRAINING, _E.STOP_NOW): _P.KILLING,
    (_P.DRAINING, _E.FINISHED): _P.DONE,
    (_P.HALTING, _E.READY): _P.HALTING,
    (_P.HALTING, _E.STOP): _P.HALTING,
    (_P.HALTING, _E.HANDED_OVER): _P.HALTING,
    (_P.HALTING, _E.STOP_FAST): _P.KILLING,  # INT again: kill them
    (_P.HALTING, _E.STOP_NOW): _P.KILLING,
    (_P.HALTING, _E.FINISHED): _P.DONE,
    (_P.KILLING, _E.READY): _P.KILLING,
    (_P.KILLING, _E.STOP): _P.KILLING,
    (_P.KILLING, _E.HANDED_OVER): _P.KILLING,
    (_P.KILLING, _E.STOP_FAST): _P.KILLING,
    (_P.KILLING, _E.STOP_NOW): _P.KILLING,
    (_P.KILLING, _E.FINISHED): _P.DONE,
    # The loop has ended; a callback of its last pass may still ask.
    (_P.DONE, _E.READY): _P.DONE,
    (_P.DONE, _E.STOP): _P.DONE,
    (_P.DONE, _E.HANDED_OVER): _P.DONE,
    (_P.DONE, _E.STOP_FAST): _P.DONE,
    (_P.DONE, _E.STOP_NOW): _P.DONE,
}

#: The phases of a stop: nothing new is accepted.
STOPPING: Final = frozenset({Phase.DRAINING, Phase.HALTING, Phase.KILLING, Phase.DONE})
#: The stops that no longer serve what was queued: no replacement, ever.
FORCED: Final = frozenset({Phase.HALTING, Phase.KILLING, Phase.DONE})


def next_phase(phase: Phase, event: Event) -> Phase:
    """The phase after *event*; raises ``LifecycleError`` if the table has no such pair."""
    try:
        return TRANSITIONS[phase, event]
    except KeyError:
        raise LifecycleError(
            f"the master cannot take the event {event.name} ({event.value}) "
            f"while {phase.value}"
        ) from None


class Lifecycle:
    """The master's phase; ``fire`` is the only way it changes."""

    __slots__ = ("done", "forced", "phase", "stopping")

    def __init__(self, phase: Phase = Phase.STARTING) -> None:
        self.phase = phase
        # Plain attributes, not properties: the loop reads them on every pass.
        self.stopping = phase in STOPPING
        self.forced = phase in FORCED
        self.done = phase is Phase.DONE

    def fire(self, event: Event) -> bool:
        """Apply *event*; True if the phase changed (the caller acts on the change)."""
        after = next_phase(self.phase, event)
        if after is self.phase:
            return False
        self.phase = after
        self.stopping = after in STOPPING
        self.forced = after in FORCED
        self.done = after is Phase.DONE
        return True


def may_replace(phase: Phase, *, pending: bool) -> bool:
    """May a dead worker of a live generation get a successor in this phase?

    While draining, only if accepted connections still wait for a worker:
    they were promised service.  Never in a forced stop.
    """
    if phase is Phase.DRAINING:
        return pending
    return phase in (Phase.STARTING, Phase.SERVING, Phase.DEPARTING)


def stop_workers(phase: Phase, *, pending: bool) -> bool:
    """Is it time to send STOP to every worker?  Once a stop has nothing queued."""
    return phase in STOPPING and phase is not Phase.DONE and not pending


def finished(phase: Phase, *, workers: int, pending: bool, respawn_due: bool) -> bool:
    """Is the stop complete?  No worker left, and none coming for what is queued.

    A graceful stop with connections queued and a successor due waits for
    it; a forced one drops what is queued.
    """
    if phase not in STOPPING or phase is Phase.DONE or workers:
        return False
    return phase in FORCED or not (pending and respawn_due)


def status_state(phase: Phase, *, degraded: bool, reloading: bool) -> str:
    """``master.state`` of ``ctl status``: stopping, draining (``drain_delay``),
    reloading, degraded, running, starting."""
    if phase in STOPPING:
        return "stopping"
    if phase is Phase.DEPARTING:
        return "draining"
    if reloading:
        return "reloading"
    if degraded:
        return "degraded"
    return "running" if phase is Phase.SERVING else "starting"


__all__ = [
    "FORCED",
    "STOPPING",
    "TRANSITIONS",
    "Event",
    "Lifecycle",
    "LifecycleError",
    "Phase",
    "finished",
    "may_replace",
    "next_phase",
    "status_state",
]
