"""Accepting from ``dispatch = "shared"`` listeners, in the worker itself.

Every worker inherits each shared listening socket (non-blocking,
close-on-exec) and accepts from it only while it has room, at most
``ACCEPT_BATCH`` connections per wake-up, so one worker cannot take a
burst that others could serve.  Accepted descriptors are blocking and
close-on-exec, like the ones the master hands out, so the serving code
is the same.  The master never counts these connections as capacity it
handed out: the worker reports them with SERVED, batched with its
heartbeat, never with DONE.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import Final

from forkserver.workers.core import WorkerContext

#: The most connections one worker accepts per wake-up.
ACCEPT_BATCH: Final = 16
#: After a failed accept (EMFILE and the like) the listener is not
#: watched for this long, doubling up to ``BACKOFF_MAX``: it stays
#: readable, so watching it at once would spin.
BACKOFF_FIRST: Final = 0.1
BACKOFF_MAX: Final = 1.0


class SharedListeners:
    """The worker's copies of the shared listening sockets."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        # index -> socket; the descriptors were kept open across the worker's boot.
        self.sockets: dict[int, socket.socket] = {}
        for index, fd in ctx.shared_listeners:
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            self.sockets[index] = sock
        #: Self-accepted connections finished and not yet reported with SERVED.
        self.unreported = 0
        #: Monotonic time before which the listeners are not watched.
        self.resume_at = 0.0
        self._backoff = BACKOFF_FIRST

    def __bool__(self) -> bool:
        return bool(self.sockets)

    def backing_off(self) -> bool:
        return time.monotonic() < self.resume_at

    def fds(self) -> dict[int, int]:
        """Listener index -> descriptor, to watch for readability."""
        return {index: sock.fileno() for index, sock in self.sockets.items()}

    def accept(self, index: int, room: int, take: Callable[[int, int], None]) -> int:
        """Accept up to min(*room*, ``ACCEPT_BATCH``) from listener *index*; each to *take*.

        *take* gets the connected descriptor, which it now owns, and the
        listener index.  The number accepted.
        """
        sock = self.sockets.get(index)
        if sock is None:
            return 0
        accept: Callable[[], tuple[int, object]] = sock._accept  # type: ignore[attr-defined]
        accepted = 0
        for _ in range(min(room, ACCEPT_BATCH)):
            try:
                fd, _peer = accept()  # accept4(SOCK_CLOEXEC), no socket object
            except BlockingIOError:
                break  # another worker took it, or the backlog is empty
            except (ConnectionAbortedError, PermissionError):
                continue  # the peer reset it before we accepted, or a firewall said no
            except OSError:
                # EMFILE and the like: look again only after a pause
                self.resume_at = time.monotonic() + self._backoff
                self._backoff = min(2 * self._backoff, BACKOFF_MAX)
                break
            self._backoff = BACKOFF_FIRST
            accepted += 1
            take(fd, index)
        return accepted

    def close(self) -> None:
        """Stop accepting for good: the master and the other workers keep theirs."""
        for sock in self.sockets.values():
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets.clear()

    def take_unreported(self) -> int:
        count, self.unreported = self.unreported, 0
        return count
