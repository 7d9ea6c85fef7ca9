"""Are the workers alive and within their limits: the master's periodic checks.

* Heartbeats: a worker silent for longer than ``timeout`` is stuck: the
  pool aborts it (SIGABRT for a stack dump, SIGKILL ``pool.KILL_GRACE``
  later; events ``worker_timeout``, ``worker_killed``) and it is
  replaced when reaped.  The check runs on the loop's monotonic clock;
  a check that runs late means the master itself was stalled
  (suspended, swapped out), and then every clock restarts instead of
  anyone being killed.
* Memory: every ``recycling.MEMORY_INTERVAL`` seconds each working
  worker's memory is sampled; one over ``max_memory`` is recycled (it
  finishes its connections, a successor starts at once).

``Health`` decides; the pool (as ``HealthPool``) acts.  ``start()`` arms
both checks on the loop; each check also runs on its own with an
explicit clock, which is how the policy is tested without processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from forkserver import recycling
from forkserver.config import Settings
from forkserver.eventloop import EventLoop
from forkserver.lifecycle import Lifecycle
from forkserver.worker_table import WorkerRecord, WorkerState, WorkerTable


class HealthPool(Protocol):
    """What the checks use of the pool (``pool.Pool``)."""

    @property
    def table(self) -> WorkerTable: ...
    @property
    def settings(self) -> Settings: ...
    def abort(self, record: WorkerRecord, reason: str) -> None: ...
    def recycle(self, record: WorkerRecord, reason: str, *, limit: str,
                **extra: object) -> None: ...  # fmt: skip


class Health:
    """The master's periodic checks of its workers; ``start()`` arms them."""

    def __init__(
        self,
        loop: EventLoop,
        pool: HealthPool,
        lifecycle: Lifecycle,
        *,
        sample: Callable[[int, recycling.MemoryMetric], int | None] = recycling.sample_memory,
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.lifecycle = lifecycle
        self.sample = sample
        self._last_check = 0.0

    def start(self) -> None:
        self._last_check = self.loop.time()
        self.loop.call_later(self.check_interval(), self._heartbeat_tick)
        self.loop.call_later(recycling.MEMORY_INTERVAL, self._memory_tick)

    def check_interval(self) -> float:
        return max(0.05, self.pool.settings.timeout / 4)

    def _heartbeat_tick(self) -> None:
        self.loop.call_later(self.check_interval(), self._heartbeat_tick)
        self.check_heartbeats(self.loop.time())

    def _memory_tick(self) -> None:
        self.loop.call_later(recycling.MEMORY_INTERVAL, self._memory_tick)
        self.check_memory()

    def check_heartbeats(self, now: float) -> None:
        """Abort workers silent for longer than ``timeout`` (they are replaced when reaped).

        A check that runs late means the master itself was stalled
        (suspended, swapped out): then the workers' silence proves
        nothing, so every clock restarts instead of anyone being killed.
        """
        table, timeout = self.pool.table, self.pool.settings.timeout
        stalled = now - self._last_check > 2 * self.check_interval()
        self._last_check = now
        if stalled:
            table.restart_clocks(now)
            return
        for record in table:
            if not record.killed and now - record.last_seen > timeout:
                self.pool.abort(record, f"silent for {now - record.last_seen:.1f} s")

    def check_memory(self) -> None:
        """Sample every working worker's memory; recycle those over ``max_memory``."""
        settings = self.pool.settings
        limit, metric = settings.max_memory, settings.memory_metric
        if limit <= 0 or self.lifecycle.stopping:
            return
        for record in self.pool.table:
            if record.state is not WorkerState.READY or record.retired:
                continue
            excess = recycling.check_memory(self.sample(record.pid, metric), limit, metric)
            if excess is not None:
                self.pool.recycle(record, excess.describe(), limit="max_memory", metric=metric,
                                  used=excess.used, max_memory=limit,
                                  excess=excess.excess)  # fmt: skip
