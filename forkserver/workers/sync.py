"""The ``sync`` worker class: one connection at a time, in the main thread."""

from __future__ import annotations

from forkserver import channel
from forkserver.workers.core import serve_blocking
from forkserver.workers.loop import SelectorWorker


class SyncWorker(SelectorWorker):
    def take(self, fds: list[int], listeners: tuple[int, ...]) -> None:
        ctx = self.ctx
        ctx.in_flight += len(fds)
        for fd, listener in zip(fds, listeners, strict=True):
            self.report(serve_blocking(ctx, fd, listener))
            ctx.in_flight -= 1
            ctx.served += 1
        self.chan.send(channel.Done(count=len(fds)))
