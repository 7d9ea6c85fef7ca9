"""Connections closed before the handler, per listener and reason, over the master's life.

Workers report running totals (channel ``REFUSALS``: what each closed
since it started); this sums them, and keeps a worker's last totals
once it is gone, so the figures only grow.  Pure bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterable


class RefusalTotals:
    def __init__(self) -> None:
        self._live: dict[int, dict[tuple[int, str], int]] = {}  # by worker pid
        self._gone: dict[tuple[int, str], int] = {}

    def update(self, pid: int, counts: Iterable[tuple[int, str, int]]) -> None:
        """A worker's running totals (a total never goes down: a smaller one is ignored)."""
        mine = self._live.setdefault(pid, {})
        for listener, reason, total in counts:
            key = (listener, reason)
            mine[key] = max(mine.get(key, 0), total)

    def worker_gone(self, pid: int) -> None:
        for key, total in self._live.pop(pid, {}).items():
            self._gone[key] = self._gone.get(key, 0) + total

    def by_listener(self) -> dict[int, dict[str, int]]:
        """listener index -> reason -> connections refused, sorted by reason."""
        out: dict[int, dict[str, int]] = {}
        for counts in (self._gone, *self._live.values()):
            for (listener, reason), total in counts.items():
                reasons = out.setdefault(listener, {})
                reasons[reason] = reasons.get(reason, 0) + total
        return {index: dict(sorted(reasons.items())) for index, reasons in sorted(out.items())}


__all__ = ["RefusalTotals"]
