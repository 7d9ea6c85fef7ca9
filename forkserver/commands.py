"""The master's answers to ``forkserver ctl``: what each control command does.

``ControlCommands(master).table()`` is the mapping ``control.open_control``
takes.  Every command returns at once (``stop`` and ``scale`` start their
work in the loop; ``reload`` returns a ``control.Deferred`` that the
reload's outcome settles); ``status`` is a snapshot in the shape
documented in ``forkserver.control``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from forkserver.control import CommandError, Deferred
from forkserver.worker_table import SlotHistory

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
            "stop": self.stop,
            "reopen-logs": self.master.reopen_logs,
        }

    def reload(self) -> Deferred:
        return self.master.reloader.control_reload()

    def scale(self, workers: int) -> dict[str, int]:
        if self.master.stopping:
            raise CommandError("the master is stopping")
        self.master.loop.call_soon(lambda: self.master.scale_to(workers))
        return {"workers": workers}

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
        return {
            "master": {
                "pid": os.getpid(),
                "name": m.settings.name,
                "started": m.started,
                "generation": 0,
                "state": _state(m.stopping, m.announced),
                "workers_target": m.target,
                "pending": len(m.dispatcher.pending),
                "accepting": not m.stopping and not m.dispatcher.paused,
                "listeners": [_listener(listener) for listener in m.listeners],
                "totals": {
                    "served": served,
                    "in_flight": sum(r.in_flight for r in records),
                    "spawned": m.spawned,
                    "restarts": sum(h.restarts for h in m.history.values()),
                    "errors": sum(r.errors for r in records),
                },
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


def _state(stopping: bool, announced: bool) -> str:
    if stopping:
        return "stopping"
    return "running" if announced else "starting"


def _listener(listener: Any) -> dict[str, Any]:
    fd = listener.socket_descriptor()
    inode = os.fstat(fd).st_ino if fd >= 0 else 0
    return {"name": listener.name, "address": listener.describe(), "fd": fd, "inode": inode}


def _history(history: SlotHistory | None) -> dict[str, Any]:
    if history is None:
        return {"restarts": 0, "last_exit": None, "last_error": None}
    return {
        "restarts": history.restarts,
        "last_exit": history.last_exit,
        "last_error": history.last_error,
    }


__all__ = ["ControlCommands"]
