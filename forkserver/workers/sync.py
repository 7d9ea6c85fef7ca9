"""The ``sync`` worker class: one connection at a time, in the main thread.

It reads its channel one message at a time and only when it is free:
the master keeps up to ``PREFETCH`` descriptors queued for a busy sync
worker, so the next connection is already waiting when this one ends,
and whatever is still queued when a worker dies goes back to the
master rather than being lost.

DONE carries a credit window rather than one message per connection:
the worker reports what it finished once ``DONE_EVERY`` connections are
done, or as soon as its channel has nothing more for it.  Under load
the master is woken once per several connections, and refills the
queue before it runs dry (``DONE_EVERY`` < ``PREFETCH``); a worker that
goes idle has always reported everything, so the master never takes an
idle worker for a busy one, and a lone connection is served at once.
From a shared listener it accepts one connection when free and serves
it before it looks again.
"""

from __future__ import annotations

import time
from typing import Final

from forkserver import channel
from forkserver.workers.core import ChannelClosed, reopen_log, serve_blocking
from forkserver.workers.loop import SelectorWorker

#: Descriptors the master may queue for a busy sync worker, beyond the
#: one it serves (``WorkerRecord.prefetch``).
PREFETCH: Final = 7
#: A sync worker sends DONE once this many connections are done (or when
#: its channel is empty), so the master refills it PREFETCH - DONE_EVERY
#: connections before it runs dry.
DONE_EVERY: Final = 4


class SyncWorker(SelectorWorker):
    #: Connections finished and not yet reported in a DONE.
    unreported = 0

    def take(self, fds: list[int], listeners: tuple[int, ...]) -> None:
        self.serve(fds, listeners)
        self.unreported = unreported = self.unreported + len(fds)
        if unreported >= DONE_EVERY:
            self.report_done()

    def take_one(self, fd: int, listener: int) -> None:
        """``take([fd], [listener])``, without the loop: every connection comes here."""
        ctx = self.ctx
        ctx.in_flight += 1
        error = serve_blocking(ctx, fd, listener)
        ctx.in_flight -= 1
        ctx.served += 1
        if error is not None:
            self.report(error)
        self.unreported = unreported = self.unreported + 1
        if unreported >= DONE_EVERY:
            self.report_done()

    def report_done(self) -> None:
        """DONE for every connection finished since the last one."""
        if self.unreported:
            self.chan.send_done(self.unreported)
            self.unreported = 0

    def serve(self, fds: list[int], listeners: tuple[int, ...]) -> None:
        ctx = self.ctx
        ctx.in_flight += len(fds)
        for fd, listener in zip(fds, listeners, strict=True):
            error = serve_blocking(ctx, fd, listener)
            if error is not None:
                self.report(error)
            ctx.in_flight -= 1
            ctx.served += 1

    def take_own(self, fd: int, listener: int, peer: object) -> None:
        ctx = self.ctx
        ctx.in_flight += 1
        self.report(serve_blocking(ctx, fd, listener, peer))
        ctx.in_flight -= 1
        ctx.served += 1
        self.shared.unreported += 1
        self.beat_if_due()

    def _on_channel(self) -> None:
        """Serve message after message while the next one is already queued."""
        ctx = self.ctx
        ctx.number_freed = False  # whatever ran since the last connection may have taken it
        while not self.stopping:
            try:
                received = self.chan.receive_one(ctx.number_freed)
            except ChannelClosed:
                self.stopping = self.master_gone = True
                return
            ctx.number_freed = False
            if received is None:
                self.report_done()  # idle from now: the master must know it has room
                return
            message, fds = received
            if type(message) is channel.Connections:
                if len(fds) == 1:  # what the master sends a sync worker: one per message
                    self.take_one(fds[0], message.listeners[0])
                else:
                    self.take(fds, message.listeners)
                if time.monotonic() >= self.next_beat:
                    self.beat_if_due()
            elif isinstance(message, channel.Reopen):
                reopen_log(self.ctx, fds)
            else:
                self.stopping = True

    def drain(self) -> None:
        """Serve everything queued, with one DONE at the end.

        Holding back DONE keeps the master from queueing more behind
        what is drained (it sees no free room), so the drain ends.
        """
        while (received := self.chan.receive_one()) is not None:
            message, fds = received
            if isinstance(message, channel.Connections):
                self.serve(fds, message.listeners)
                self.unreported += len(fds)
            elif isinstance(message, channel.Reopen):
                reopen_log(self.ctx, fds)
        self.report_done()
