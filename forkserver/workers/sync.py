"""The ``sync`` worker class: one connection at a time, in the main thread.

It reads its channel one message at a time and only when it is free:
the master keeps one descriptor queued for a busy sync worker (its
``prefetch``), so the next connection is already waiting when this one
ends, and whatever is still queued when a worker dies goes back to the
master rather than being lost.  DONE goes out after every message, so
the master can queue the next descriptor while this one is served.
From a shared listener it accepts one connection when free and serves
it before it looks again.
"""

from __future__ import annotations

from forkserver import channel
from forkserver.workers.core import ChannelClosed, reopen_log, serve_blocking
from forkserver.workers.loop import SelectorWorker


class SyncWorker(SelectorWorker):
    def take(self, fds: list[int], listeners: tuple[int, ...]) -> None:
        self.serve(fds, listeners)
        self.chan.send_done(len(fds))

    def serve(self, fds: list[int], listeners: tuple[int, ...]) -> None:
        ctx = self.ctx
        ctx.in_flight += len(fds)
        for fd, listener in zip(fds, listeners, strict=True):
            self.report(serve_blocking(ctx, fd, listener))
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
        while not self.stopping:
            try:
                received = self.chan.receive_one()
            except ChannelClosed:
                self.stopping = self.master_gone = True
                return
            if received is None:
                return
            message, fds = received
            if isinstance(message, channel.Connections):
                self.take(fds, message.listeners)
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
        served = 0
        while (received := self.chan.receive_one()) is not None:
            message, fds = received
            if isinstance(message, channel.Connections):
                self.serve(fds, message.listeners)
                served += len(fds)
            elif isinstance(message, channel.Reopen):
                reopen_log(self.ctx, fds)
        if served:
            self.chan.send_done(served)
