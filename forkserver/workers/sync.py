"""The ``sync`` worker class: one connection at a time, in the main thread.

It reads its channel one message at a time and only when it is free:
the master keeps up to ``PREFETCH`` descriptors queued for a busy sync
worker, so the next connection is already waiting when this one ends,
and whatever is still queued when a worker dies goes back to the
master rather than being lost.

DONE carries a credit window rather than one message per connection:
the worker reports what it finished once ``DONE_EVERY`` connections are
done, or once its channel has had nothing more for it for
``IDLE_REPORT``.  Under load the master is woken once per several
connections and refills the queue before it runs dry (``DONE_EVERY`` <
``PREFETCH``), and a short lull between two refills costs no message.
What it holds back never stops the master: fewer than ``DONE_EVERY``
unreported connections leave room in its window, so the master goes
on sending to it, and a lone connection is served at once; an idle
worker has reported everything within ``IDLE_REPORT``.

Without shared listeners, the one thing a sync worker waits for is its
channel: once it has closed a connection, it waits for the next message
inside ``recvmsg``, for at most ``IDLE_REPORT``
(``WorkerChannel.wait_after_freed``), and only a wait that ends empty
takes it back to its selector (and sends its DONE).  A worker that runs
dry between two refills under load so costs one receive, as a plain
blocking worker, not a failed one, a selector wake-up and the reserve's
two ``setrlimit`` calls.  A signal's flag is seen within ``IDLE_REPORT``.
From a shared listener it accepts one connection when free and serves
it before it looks again.
"""

from __future__ import annotations

import math
import time
from typing import Final

from forkserver import channel
from forkserver.workers.core import ChannelClosed, WorkerContext, reopen_log, serve_blocking
from forkserver.workers.loop import SelectorWorker

#: Descriptors the master may queue for a busy sync worker, beyond the
#: one it serves (``WorkerRecord.prefetch``).
PREFETCH: Final = 7
#: A sync worker sends DONE once this many connections are done (or once its
#: channel has stayed empty for IDLE_REPORT), so the master refills it
#: PREFETCH - DONE_EVERY connections before it runs dry.
DONE_EVERY: Final = 4
#: Seconds an idle sync worker holds back its DONE: a lull shorter than
#: this, as between two refills under load, costs no message.
IDLE_REPORT: Final = 0.002
_CONNECTIONS: Final = channel.Connections


class SyncWorker(SelectorWorker):
    #: Connections finished and not yet reported in a DONE.
    unreported = 0

    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        #: The channel is all there is to watch: wait for it inside the receive.
        self.waits = not self.shared
        if self.waits:
            self.chan.wait_after_freed(IDLE_REPORT)

    def take(self, fds: list[int], listeners: tuple[int, ...]) -> None:
        self.serve(fds, listeners)
        self.unreported = unreported = self.unreported + len(fds)
        if unreported >= DONE_EVERY:
            self.report_done()

    def report_done(self) -> None:
        """DONE for every connection finished since the last one."""
        self.report_at = math.inf
        if self.unreported:
            self.chan.send_done(self.unreported)
            self.unreported = 0

    def report_due(self) -> None:
        self.report_done()  # idle since report_at was set

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
        """Serve message after message while the next one is already queued.

        What the master sends a sync worker, one connection per message,
        is served right here: this loop is every connection's path.
        """
        ctx, receive = self.ctx, self.chan.receive_one
        freed = False  # whatever ran since the last connection may have taken its number
        while not self.stopping:
            try:
                received = receive(freed)
            except ChannelClosed:
                self.stopping = self.master_gone = True
                return
            if received is None:
                if freed and self.waits:  # IDLE_REPORT went by with nothing sent: idle
                    self.report_done()
                elif self.unreported and self.report_at == math.inf:
                    self.report_at = time.monotonic() + IDLE_REPORT  # idle: report soon
                return
            message, fds = received
            if type(message) is _CONNECTIONS and len(fds) == 1:
                ctx.in_flight += 1
                error = serve_blocking(ctx, fds[0], message.listeners[0])
                ctx.in_flight -= 1
                ctx.served += 1
                freed = ctx.number_freed
                if error is not None:
                    self.report(error)
                self.unreported = unreported = self.unreported + 1
                if unreported >= DONE_EVERY:
                    self.report_done()
                # The clock, not the last connection's end: a connection refused
                # by its preamble returns before it is timed.
                if time.monotonic() >= self.next_beat:
                    self.beat_if_due()
                continue
            freed = False
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
        while (received := self.chan.receive_one()) is not None:
            message, fds = received
            if isinstance(message, channel.Connections):
                self.serve(fds, message.listeners)
                self.unreported += len(fds)
            elif isinstance(message, channel.Reopen):
                reopen_log(self.ctx, fds)
        self.report_done()
