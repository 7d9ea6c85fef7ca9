"""What a worker counts per (listener, reason) and sends with its stats.

``ReasonCounts`` is the shared part of ``preamble.Refusals`` (connections
closed before the handler) and ``handshakes.Handshakes`` (TLS handshakes
done and failed): counts only grow, ``take_changed()`` hands what moved
since the last call (for the channel), each count has its own
rate-limited log line, and every method is thread-safe (a thread
worker counts from its pool's threads).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from forkserver.ratelimit import LogLimiter

__all__ = ["ReasonCounts"]


class ReasonCounts:
    def __init__(self, slot: int, describe: Callable[[object], str], log_interval: float) -> None:
        self.slot = slot
        self.describe = describe  # a peer for the log (``core.format_peer`` in a worker)
        self.counts: dict[tuple[int, str], int] = {}
        self._changed: set[tuple[int, str]] = set()
        self._lock = threading.Lock()
        self._log = LogLimiter(log_interval)

    def count(self, listener: int, reason: str, *, logged: bool = True) -> int | None:
        """Count one; if *logged* and a log line is due, how many went unlogged
        since the last one (else None: no line now)."""
        key = (listener, reason)
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            self._changed.add(key)
            return self._log.check(key) if logged else None

    def take_changed(self) -> tuple[tuple[int, str, int], ...]:
        """(listener, reason, total) for every count that moved since the last call."""
        with self._lock:
            if not self._changed:
                return ()
            changed = tuple((index, reason, self.counts[index, reason])
                            for index, reason in sorted(self._changed))  # fmt: skip
            self._changed.clear()
        return changed
