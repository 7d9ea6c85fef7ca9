"""TLS handshakes done and failed in a worker, per listener: the counts and the log line.

Kept apart from ``workers.tlsstep`` (which imports ``ssl`` and asyncio)
so that the worker context, built in the master, can hold one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from forkserver.workers.counts import ReasonCounts

if TYPE_CHECKING:
    from forkserver.handshake import HandshakeFailure

__all__ = ["DONE", "Handshakes"]

log = logging.getLogger("forkserver.worker")

#: The count of TLS handshakes that completed.
DONE: Final = "done"
#: At most one ``tls_handshake_failed`` line per listener and reason this often.
TLS_LOG_INTERVAL: Final = 10.0


class Handshakes(ReasonCounts):
    """TLS handshakes per (listener index, ``done`` or failure reason), since
    start (see ``workers.counts``)."""

    def __init__(self, slot: int = 0, describe: Callable[[object], str] = str) -> None:
        super().__init__(slot, describe, TLS_LOG_INTERVAL)

    def done(self, listener: int) -> None:
        self.count(listener, DONE, logged=False)

    def failed(self, listener: int, name: str, failure: HandshakeFailure,
               peer: object) -> None:  # fmt: skip
        unlogged = self.count(listener, str(failure.reason))
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
