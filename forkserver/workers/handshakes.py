"""TLS handshakes done and failed in a worker, per listener: the counts and the log line.

Kept apart from ``workers.tlsstep`` (which imports ``ssl`` and asyncio)
so that the worker context, built in the master, can hold one.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from forkserver.ratelimit import LogLimiter

if TYPE_CHECKING:
    from forkserver.handshake import HandshakeFailure

__all__ = ["DONE", "Handshakes"]

log = logging.getLogger("forkserver.worker")

#: The count of TLS handshakes that completed.
DONE: Final = "done"
#: At most one ``tls_handshake_failed`` line per listener and reason this often.
TLS_LOG_INTERVAL: Final = 10.0


class Handshakes:
    """TLS handshakes per (listener index, ``done`` or failure reason), since start.

    As ``preamble.Refusals``: counts only grow, ``take_changed()`` hands
    what moved since the last call, thread-safe.
    """

    def __init__(self, slot: int = 0, describe: Callable[[object], str] = str) -> None:
        self.slot = slot
        self.describe = describe
        self.counts: dict[tuple[int, str], int] = {}
        self._changed: set[tuple[int, str]] = set()
        self._lock = threading.Lock()
        self._log = LogLimiter(TLS_LOG_INTERVAL)

    def _count(self, key: tuple[int, str]) -> int | None:
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            self._changed.add(key)
            return self._log.check(key) if key[1] != DONE else None

    def done(self, listener: int) -> None:
        self._count((listener, DONE))

    def failed(self, listener: int, name: str, failure: HandshakeFailure,
               peer: object) -> None:  # fmt: skip
        unlogged = self._count((listener, str(failure.reason)))
        if unlogged is None:
            return
        who = self.describe(peer)
        log.info(
            "%s: TLS handshake with %s failed: %s (%s)%s", name, who, failure.reason,
            failure.detail, f"; {unlogged} more like it since the last line" if unlogged else "",
            extra={"event": "tls_handshake_failed", "listener": name,
                   "reason": str(failure.reason), "peer": who, "detail": failure.detail,
                   "slot": self.slot, "pid": os.getpid(), "unlogged": unlogged},
        )  # fmt: skip

    def take_changed(self) -> tuple[tuple[int, str, int], ...]:
        """(listener, reason, total) for every count that moved since the last call."""
        with self._lock:
            if not self._changed:
                return ()
            changed = tuple((index, reason, self.counts[index, reason])
                            for index, reason in sorted(self._changed))  # fmt: skip
            self._changed.clear()
        return changed
