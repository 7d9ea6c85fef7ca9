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
import select
import selectors
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from forkserver.workers.core import WorkerContext

#: The most connections one worker accepts per wake-up.
ACCEPT_BATCH: Final = 16
#: After a failed accept (EMFILE and the like) the listener is not
#: watched for this long, doubling up to ``BACKOFF_MAX``: it stays
#: readable, so watching it at once would spin.
BACKOFF_FIRST: Final = 0.1
BACKOFF_MAX: Final = 1.0
#: 0 where the kernel or Python lacks it (Linux < 4.5): every waiter wakes.
EPOLLEXCLUSIVE: Final[int] = getattr(select, "EPOLLEXCLUSIVE", 0)

#: What a worker does with a connection it accepted: (descriptor, listener, peer).
Take = Callable[[int, int, object], None]


class ExclusiveSelector(selectors.EpollSelector):
    """An epoll selector that wakes one idle worker per connection.

    The descriptors in *exclusive* (shared listeners) are registered with
    ``EPOLLEXCLUSIVE``: when a connection arrives the kernel wakes one of
    the workers blocked in ``epoll_wait`` on that listener, as it does for
    workers blocked in ``accept()``, instead of every idle one, each loser
    paying a wake-up and a failed ``accept4``.  A worker busy elsewhere is
    not in ``epoll_wait``, and the kernel passes the wake-up on to one
    that is, so a connection is never left to a busy worker.

    The kernel refuses ``EPOLL_CTL_MOD`` on such a registration, so these
    descriptors are only ever registered for reading and unregistered;
    asyncio's ``add_reader``/``remove_reader`` and our loops do just that.
    """

    def __init__(self, exclusive: Iterable[int] = ()) -> None:
        super().__init__()
        self.exclusive = frozenset(exclusive) if EPOLLEXCLUSIVE else frozenset()

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = super().register(fileobj, events, data)
        if key.fd in self.exclusive:
            if events != selectors.EVENT_READ:
                super().unregister(fileobj)
                raise ValueError(f"shared listener fd {key.fd} can only be watched for reading")
            # selectors has no way to pass the flag: register again under it.
            epoll: select.epoll = self._selector  # type: ignore[attr-defined]
            epoll.unregister(key.fd)
            epoll.register(key.fd, select.EPOLLIN | EPOLLEXCLUSIVE)
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = self.get_key(fileobj)
        if key.fd in self.exclusive and events != key.events:
            raise ValueError(f"shared listener fd {key.fd} can only be watched for reading")
        return super().modify(fileobj, events, data)


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

    def selector(self) -> ExclusiveSelector:
        """A selector for the worker's loop that wakes one worker per connection."""
        return ExclusiveSelector(sock.fileno() for sock in self.sockets.values())

    def accept(self, index: int, room: int, take: Take) -> int:
        """Accept up to min(*room*, ``ACCEPT_BATCH``) from listener *index*; each to *take*.

        *take* gets the connected descriptor, which it now owns, the
        listener index and the peer's address as ``accept()`` returned it
        (so serving it needs no ``getpeername``).  The number accepted.
        """
        sock = self.sockets.get(index)
        if sock is None:
            return 0
        accept: Callable[[], tuple[int, object]] = sock._accept  # type: ignore[attr-defined]
        accepted = 0
        for _ in range(min(room, ACCEPT_BATCH)):
            try:
                fd, peer = accept()  # accept4(SOCK_CLOEXEC), no socket object
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
            take(fd, index, peer)
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
