"""The master's answers to ``forkserver ctl``: what each control command does.

``ControlCommands(master).table()`` is the mapping ``control.open_control``
takes.  Every command returns at once (``stop`` and ``scale`` start their
work in the loop; ``reload`` returns a ``control.Deferred`` that the
reload's outcome settles); ``status`` is a snapshot in the shape
documented in ``forkserver.control``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from forkserver.control import MAX_WORKERS, CommandError, Deferred
from forkserver.worker_table import SlotHistory, WorkerState

if TYPE_CHECKING:
    from forkserver.master import Master


class ControlCommands:
    def __init__(self, master: Master) -> None:
        self.master = master

    def table(self) -> dict[str, Callable[..., object]]:
        return {
            "status": self.status,
            "reload": self.reload,
            "scale": self.scale,
            "kill": self.kill,
            "stop": self.stop,
            "reopen-logs": self.master.reopen_logs,
        }

    def reload(self) -> Deferred:
        return self.master.reloader.control_reload()

    def scale(self, workers: int | None = None, by: int | None = None) -> dict[str, int]:
        """``scale N`` sets the count; ``scale +N``/``-N`` (*by*) moves the current
        target, never below 1 nor above ``MAX_WORKERS``."""
        m = self.master
        if m.stopping:
            raise CommandError("the master is stopping")
        if workers is None:
            workers = scaled_target(m.target, by or 0)
        m.loop.call_soon(lambda: m.scale_to(workers))
        return {"workers": workers}

    def kill(self, worker: int, signal_name: str | None = None) -> dict[str, Any]:
        """``ctl kill SLOT|PID``: retire that worker (a successor starts now), or
        send it a signal.  A number that is a worker's pid means that worker;
        otherwise it is a slot of the serving generation."""
        m = self.master
        if m.stopping:
            raise CommandError("the master is stopping")
        link = m.dispatcher.links.get(worker)
        if link is None:
            in_slot = [lk for lk in m.dispatcher.links.values()
                       if lk.record.slot == worker and not lk.record.retired
                       and lk.record.generation == m.generations.serving]  # fmt: skip
            if not in_slot:
                raise CommandError(f"no worker has pid or slot {worker}")
            link = in_slot[0]
        record = link.record
        signum = signal.Signals[f"SIG{signal_name}"] if signal_name else None
        if signum is None and (record.retired or record.state is WorkerState.STOPPING):
            raise CommandError(f"worker {record.slot} (pid {record.pid}) is already stopping "
                               "(--signal KILL ends it at once)")
        m.kill_worker(link, signum)
        return {"slot": record.slot, "pid": record.pid, "signal": signal_name}

    def stop(self, graceful: bool) -> None:
        # Deferred: the reply goes out before the loop can wind down.
        self.master.loop.call_soon(self.master.stop if graceful else self.master.stop_now)

    def status(self) -> dict[str, Any]:
        snapshot = self._snapshot()
        self.master.reloader.add_to_status(snapshot)  # generations, last reload error
        return snapshot

    def _snapshot(self) -> dict[str, Any]:
        m = self.master
        records = sorted(m.table, key=lambda r: r.slot)
        now, wall = m.loop.time(), time.time()
        served = sum(r.served for r in records) + sum(h.served for h in m.history.values())
        deaths = sum(h.deaths for h in m.history.values())
        handler_errors = sum(h.handler_errors for h in m.history.values())
        return {
            "master": {
                "pid": os.getpid(),
                "name": m.settings.name,
                "started": m.started,
                "generation": 0,
                "state": _state(m.stopping, m.announced, m.degraded),
                "workers_target": m.target,
                "pending": len(m.dispatcher.pending),
                "accepting": not m.stopping and not m.dispatcher.paused,
                "listeners": [_listener(listener) for listener in m.listeners],
                "totals": {
                    "served": served,
                    "in_flight": sum(r.in_flight for r in records),
                    "spawned": m.spawned,
                    "restarts": deaths,
                    "errors": handler_errors,
                    "deaths": deaths,
                    "replaced": sum(h.replaced for h in m.history.values()),
                    "handler_errors": handler_errors,
                },
                "failing": [
                    {"slot": slot, "crashes": crashes, "respawn_in": m.respawn_in(slot)}
                    for slot, crashes in m.backoff.failing().items()
                ],
                "last_reload_error": None,
            },
            "workers": [
                {
                    "slot": r.slot,
                    "pid": r.pid,
                    "generation": 0,
                    "state": r.state.value,
                    "started": wall - (now - r.started_at),
                    "served": r.served,
                    "in_flight": r.in_flight,
                    **_history(m.history.get(r.slot)),
                }
                for r in records
            ],
        }


def scaled_target(current: int, by: int) -> int:
    """*current* workers moved by *by*, never below 1 nor above ``MAX_WORKERS``."""
    return min(max(current + by, 1), MAX_WORKERS)


def _state(stopping: bool, announced: bool, degraded: bool) -> str:
    if stopping:
        return "stopping"
    if degraded:
        return "degraded"
    return "running" if announced else "starting"


def _listener(listener: Any) -> dict[str, Any]:
    fd = listener.socket_descriptor()
    inode = os.fstat(fd).st_ino if fd >= 0 else 0
    return {"name": listener.name, "address": listener.describe(), "fd": fd, "inode": inode}


def _history(history: SlotHistory | None) -> dict[str, Any]:
    if history is None:
        return {"restarts": 0, "deaths": 0, "replaced": 0, "last_exit": None,
                "last_error": None}  # fmt: skip
    return {
        "restarts": history.restarts,
        "deaths": history.deaths,
        "replaced": history.replaced,
        "last_exit": history.last_exit,
        "last_error": history.last_error,
    }


__all__ = ["ControlCommands", "scaled_target"]
