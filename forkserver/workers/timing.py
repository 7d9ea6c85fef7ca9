"""How long a worker's connections take: the histogram it sends the master.

``ConnectionTimes.observe(listener, seconds)`` counts one connection
whose handler ran into its bucket of ``channel.DURATION_BOUNDS``; it is
the whole cost per connection (a bisect and two additions), so it takes
no lock: sync and asyncio workers observe from one thread only.  A
thread worker's connections finish in its pool's threads, and it keeps
``LockedConnectionTimes`` instead.  ``reports()`` gives the running
totals as DURATIONS messages, only when something moved since the last
call: the worker's loop sends them with its stats, and once more before
it exits.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Final

from forkserver import channel

_BOUNDS: Final = channel.DURATION_BOUNDS
_SLOTS: Final = len(_BOUNDS) + 2  # the sum in microseconds, then one count per bucket


class ConnectionTimes:
    """Connection durations observed by one thread (the worker's own)."""

    def __init__(self) -> None:
        #: Per listener: the sum in seconds, then one count per bucket.
        self._by_listener: dict[int, list[float]] = {}
        self._moved = False

    def observe(self, listener: int, seconds: float) -> None:
        """Count one connection of *seconds* (a difference of ``time.monotonic()``: ≥ 0)."""
        counts = self._by_listener.get(listener)
        if counts is None:
            counts = self._by_listener[listener] = [0.0] * _SLOTS
        # The sum stays in seconds until reported: rounding it once is both
        # more exact and cheaper than truncating each observation.
        counts[0] += seconds
        counts[bisect_left(_BOUNDS, seconds) + 1] += 1  # observations at or below each bound
        self._moved = True

    def reports(self) -> list[channel.Durations]:
        """DURATIONS for every listener, if a count moved since the last call."""
        if not self._moved:
            return []
        self._moved = False
        entries = [(listener, round(counts[0] * 1e6), tuple(int(n) for n in counts[1:]))
                   for listener, counts in sorted(self._by_listener.items())]  # fmt: skip
        step = channel.MAX_DURATION_ENTRIES
        return [channel.Durations(tuple(entries[at : at + step]))
                for at in range(0, len(entries), step)]  # fmt: skip


class LockedConnectionTimes(ConnectionTimes):
    """``ConnectionTimes`` for a thread worker: observed from its pool's threads."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def observe(self, listener: int, seconds: float) -> None:
        with self._lock:
            super().observe(listener, seconds)

    def reports(self) -> list[channel.Durations]:
        with self._lock:
            return super().reports()


__all__ = ["ConnectionTimes", "LockedConnectionTimes"]
