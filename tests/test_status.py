"""One snapshot, every view of it: ctl status, STATUS= and READY= agree (pure)."""

from __future__ import annotations

import os
from typing import Any

from forkserver.lifecycle import Phase
from forkserver.status import Snapshot, take
from forkserver.worker_table import SlotHistory, WorkerTable


class FakeListener:
    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self._address = address

    def describe(self) -> str:
        return self._address

    def socket_descriptor(self) -> int:
        return -1  # closed: no inode to read

    def listen_queue(self) -> tuple[int, int] | None:
        return (2, 2048) if self._address[0].isdigit() else None  # a Unix socket: None


def snapshot(phase: Phase = Phase.SERVING, **changes: Any) -> Snapshot:
    table = WorkerTable()
    table.add(1, 201, 4, now=10.0)
    table.add(0, 200, 4, now=5.0)
    table.mark_ready(200, now=6.0)
    table.assign(table.get(200))  # type: ignore[arg-type]
    table.complete(200, 1, now=7.0)
    table.assign(table.get(200))  # type: ignore[arg-type]
    history = {0: SlotHistory(served=5, deaths=2, replaced=1, handler_errors=3,
                              last_exit="exit code 1", last_error="ValueError: x")}  # fmt: skip
    facts: dict[str, Any] = {
        "records": table, "history": history, "failing": {}, "respawn_in": {},
        "phase": phase, "reloading": False, "generation": 4, "last_reload_error": None,
        "target": 2, "spawned": 7, "pending": 3, "paused": False,
        "listeners": [FakeListener("web", "127.0.0.1:8000"), FakeListener("admin", "unix:/s")],
        "name": "api", "started": 1000.0, "monotonic": 20.0, "wall": 2000.0,
    }  # fmt: skip
    facts.update(changes)
    return take(**facts)


def test_the_totals_count_the_live_workers_and_the_slots_history() -> None:
    snap = snapshot()
    assert (snap.ready, snap.busy, snap.in_flight, snap.pending) == (1, 1, 1, 3)
    assert snap.served == 1 + 5  # the live worker's, and the slot's earlier workers'
    assert (snap.deaths, snap.replaced, snap.handler_errors, snap.spawned) == (2, 1, 3, 7)
    assert [w.slot for w in snap.workers] == [0, 1]  # by slot
    assert snap.workers[0].started == 2000.0 - (20.0 - 5.0)  # on the wall clock
    assert snap.pid == os.getpid()


def test_ctl_status_is_the_documented_shape() -> None:
    reply = snapshot().control()
    master = reply["master"]
    assert master["state"] == "running" and master["generation"] == 4
    assert master["workers_target"] == 2 and master["accepting"] is True
    assert master["totals"] == {"served": 6, "in_flight": 1, "spawned": 7, "restarts": 2,
                                "errors": 3, "deaths": 2, "replaced": 1,
                                "handler_errors": 3}  # fmt: skip
    assert master["listeners"][0] == {"name": "web", "address": "127.0.0.1:8000", "fd": -1,
                                      "inode": 0, "backlog": 2, "backlog_limit": 2048,
                                      "refused": {}, "handshakes": {}}  # fmt: skip
    assert (master["listeners"][1]["backlog"], master["listeners"][1]["backlog_limit"]) == (
        None, None)
    assert (master["draining"], master["health"]) == (False, None)
    tls = snapshot(handshakes={0: {"done": 5, "timeout": 2}}).control()["master"]["listeners"]
    assert tls[0]["handshakes"] == {"done": 5, "timeout": 2}
    assert reply["workers"][0]["last_error"] == "ValueError: x"
    assert reply["workers"][1]["restarts"] == 0  # a slot with no history


def test_status_line_and_ready_text_read_the_same_figures() -> None:
    snap = snapshot()
    assert snap.summary() == ("listening on 127.0.0.1:8000, unix:/s; workers 1 busy/1 ready/2; "
                              "6 served; 3 queued")  # fmt: skip
    assert snap.ready_text("generation 4; ") == (
        "listening on 127.0.0.1:8000, unix:/s; generation 4; 1 of 2 workers ready"
    )


def test_a_failing_slot_is_degraded_unless_stopping_and_reloading_comes_first() -> None:
    failing = snapshot(failing={1: 3}, respawn_in={1: 0.4})
    assert failing.state == "degraded"
    assert failing.summary().endswith("; degraded: slot 1 failing")
    assert failing.control()["master"]["failing"] == [{"slot": 1, "crashes": 3,
                                                       "respawn_in": 0.4}]  # fmt: skip
    assert snapshot(failing={1: 3}, reloading=True).state == "reloading"
    stopping = snapshot(Phase.DRAINING, failing={1: 3})
    assert stopping.state == "stopping" and not stopping.accepting
    assert stopping.summary().startswith("stopping; ") and "degraded" not in stopping.summary()
    assert snapshot(Phase.STARTING).state == "starting"
    assert snapshot(paused=True).accepting is False


def test_room_drain_refusals_and_the_health_address_for_the_balancers() -> None:
    snap = snapshot()
    # One ready worker of capacity 4 holds one connection; 3 wait in the queue.
    assert (snap.capacity, snap.free) == (4, 0)
    assert snapshot(pending=0).free == 3
    assert not snap.draining
    departing = snapshot(Phase.DEPARTING)
    assert (departing.state, departing.draining, departing.stopping) == ("draining", True, False)
    assert departing.accepting  # the listeners still take connections
    assert departing.summary().startswith("draining (drain_delay), listening on ")
    assert snapshot(Phase.DRAINING).draining
    assert snapshot(upgrading=True).draining  # a newer master is starting
    refused = snapshot(refused={1: {"not_allowed": 2}}, health="127.0.0.1:8081").control()
    listeners = refused["master"]["listeners"]
    assert [item["refused"] for item in listeners] == [{}, {"not_allowed": 2}]
    assert refused["master"]["health"] == "127.0.0.1:8081"
