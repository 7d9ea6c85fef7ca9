"""Keeping a recurring log line to a bounded rate: pure, no I/O.

A condition that can recur thousands of times a second (accept failing
for lack of descriptors, a callback that keeps raising, accepting paused
under load) is logged at most once per ``interval`` seconds for each
key; the lines in between are counted, and the next line says how many
were left out (its ``unlogged`` field).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


class LogLimiter:
    """At most one log line per *interval* seconds for each key."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        if interval < 0:
            raise ValueError(f"LogLimiter: interval {interval!r} is negative")
        self.interval = interval
        self._clock = clock
        self._logged_at: dict[Hashable, float] = {}
        self._unlogged: dict[Hashable, int] = {}

    def check(self, key: Hashable = None) -> int | None:
        """None to stay quiet; else log now, and this many were left out since the last line."""
        now = self._clock()
        last = self._logged_at.get(key)
        if last is not None and now - last < self.interval:
            self._unlogged[key] = self._unlogged.get(key, 0) + 1
            return None
        self._logged_at[key] = now
        return self._unlogged.pop(key, 0)

    def since(self, key: Hashable = None) -> float | None:
        """Seconds since the last line for *key*, or None if it has none."""
        last = self._logged_at.get(key)
        return None if last is None else self._clock() - last


__all__ = ["LogLimiter"]
