"""Are the workers alive and within their limits: the master's periodic checks.

* Heartbeats: a worker silent for longer than ``timeout`` is stuck.  It
  gets SIGABRT first (``faulthandler`` in the worker writes its stacks
  to the log; event ``worker_timeout``), then SIGKILL ``KILL_GRACE``
  later if it is still there (event ``worker_killed``, stage ``timeout``),
  and is replaced when reaped.  The check runs on the loop's monotonic
  clock; a check that runs late means the master itself was stalled
  (suspended, swapped out), and then every clock restarts instead of
  anyone being killed.
* Memory: every ``recycling.MEMORY_INTERVAL`` seconds each working
  worker's memory is sampled; one over ``max_memory`` is recycled (it
  finishes its connections, a successor starts at once).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING, Final

from forkserver import recycling
from forkserver.worker_table import WorkerState

if TYPE_CHECKING:
    from forkserver.dispatch import WorkerLink
    from forkserver.master import Master

log = logging.getLogger("forkserver.master")

#: Seconds between the stack-dump ABRT and the SIGKILL of a stuck worker.
KILL_GRACE: Final = 1.0


class Health:
    """The master's periodic checks of its workers; ``start()`` arms them."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self._last_check = 0.0

    def start(self) -> None:
        m = self.master
        self._last_check = m.loop.time()
        m.loop.call_later(self._check_interval(), self._check_heartbeats)
        m.loop.call_later(recycling.MEMORY_INTERVAL, self._check_memory)

    def _check_interval(self) -> float:
        return max(0.05, self.master.settings.timeout / 4)

    def _check_heartbeats(self) -> None:
        """Kill workers silent for longer than ``timeout`` (they are replaced when reaped).

        A check that runs late means the master itself was stalled
        (suspended, swapped out): then the workers' silence proves
        nothing, so every clock restarts instead of anyone being killed.
        """
        m = self.master
        now, interval = m.loop.time(), self._check_interval()
        stalled = now - self._last_check > 2 * interval
        self._last_check = now
        m.loop.call_later(interval, self._check_heartbeats)
        for link in tuple(m.dispatcher.links.values()):
            record = link.record
            if stalled:
                record.last_seen = now
            elif not link.killed and now - record.last_seen > m.settings.timeout:
                self._abort(link, f"silent for {now - record.last_seen:.1f} s")

    def _abort(self, link: WorkerLink, reason: str) -> None:
        """A stuck worker: ABRT for a stack dump in its log, SIGKILL ``KILL_GRACE`` later."""
        m = self.master
        record = link.record
        log.error("worker %d (pid %d) %s; dumping its stacks, then killing it",
                  record.slot, record.pid, reason,
                  extra={"event": "worker_timeout", "slot": record.slot, "pid": record.pid,
                         "reason": reason})  # fmt: skip
        link.killed = True
        record.exit_cause = "timeout"
        m.table.mark_stopping(record.pid)
        os.kill(record.pid, signal.SIGABRT)

        def kill() -> None:
            if m.dispatcher.links.get(record.pid) is not link:  # reaped: the pid is not its own
                return
            log.error("worker %d (pid %d) still running %g s after its stack dump: killing it",
                      record.slot, record.pid, KILL_GRACE,
                      extra={"event": "worker_killed", "slot": record.slot, "pid": record.pid,
                             "stage": "timeout", "cause": "timeout"})  # fmt: skip
            os.kill(record.pid, signal.SIGKILL)

        m.loop.call_later(KILL_GRACE, kill)

    def _check_memory(self) -> None:
        """Sample every working worker's memory; recycle those over ``max_memory``."""
        m = self.master
        m.loop.call_later(recycling.MEMORY_INTERVAL, self._check_memory)
        limit, metric = m.settings.max_memory, m.settings.memory_metric
        if limit <= 0 or m.stopping:
            return
        for link in tuple(m.dispatcher.links.values()):
            record = link.record
            if record.state is not WorkerState.READY or record.retired:
                continue
            used = recycling.sample_memory(record.pid, metric)
            excess = recycling.check_memory(used, limit, metric)
            if excess is not None:
                m.recycle(link, excess.describe(), limit="max_memory", metric=metric,
                          used=excess.used, max_memory=limit, excess=excess.excess)  # fmt: skip
