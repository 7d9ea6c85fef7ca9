"""The loop shared by the ``sync`` and ``thread`` worker classes.

One selector waits on the channel and on a signal wake-up pipe.  An
idle loop sends a heartbeat and stats every ``ctx.heartbeat_interval``.
SIGTERM or a STOP message means: stop accepting from shared listeners,
take whatever connections are already queued on the channel, finish
everything held, exit 0.  Shared listeners (``workers.shared``) are
watched only while the worker has room for one more connection.  End of file on
the channel means the master is gone: exit at once.
"""

from __future__ import annotations

import math
import os
import selectors
import signal
import time
from collections.abc import Callable
from functools import partial

from forkserver import channel
from forkserver.workers.core import (
    EXIT_OK,
    EXIT_RUNTIME_ERROR,
    ChannelClosed,
    WorkerChannel,
    WorkerContext,
    reopen_log,
    stats_reports,
)
from forkserver.workers.shared import SharedListeners


class SelectorWorker:
    """Subclasses implement ``take`` (connections arrived) and ``finish``."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.chan = WorkerChannel(ctx.channel, ctx.reserve, ctx.slot)
        self.stopping = False
        self.master_gone = False
        self.shared = SharedListeners(ctx)
        self.selector = self.shared.selector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        # The flag, not just the wake-up pipe: a sync worker under steady
        # load may serve connection after connection without selecting.
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if ctx.term_received:  # a TERM taken while the worker booted
            self.stopping = True
        self.next_beat = 0.0
        self.watch(self.chan.fileno(), self._on_channel)
        self.watch(self._wake_r, self._on_signal)
        self._accepting = False
        self.update_accepting()

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self.selector.register(fd, selectors.EVENT_READ, callback)

    def take(self, fds: list[int], listeners: tuple[int, ...]) -> None:
        raise NotImplementedError

    def take_own(self, fd: int, listener: int, peer: object) -> None:
        """Serve *fd*, accepted by this worker from shared *listener*."""
        raise NotImplementedError

    def room(self) -> int:
        return self.ctx.concurrency - self.ctx.in_flight

    def update_accepting(self) -> None:
        """Watch the shared listeners while there is room, and not while stopping."""
        want = (
            bool(self.shared)
            and not self.stopping
            and self.room() > 0
            and not self.shared.backing_off()
        )
        if want == self._accepting:
            return
        for index, fd in self.shared.fds().items():
            if want:
                self.watch(fd, partial(self._on_listener, index))
            else:
                self.selector.unregister(fd)
        self._accepting = want

    def stop_accepting(self) -> None:
        self.stopping = True
        self.update_accepting()
        self.shared.close()

    def _on_listener(self, index: int) -> None:
        if not self.stopping:
            self.shared.accept(index, self.room(), self.take_own)
        self.update_accepting()

    def finish(self) -> None:
        """Wait for the connections still held (thread workers)."""

    #: When ``report_due`` is to be called (``time.monotonic``); inf: never.
    report_at = math.inf

    def report_due(self) -> None:
        """``report_at`` has come (sync workers: the DONE they held back while idle)."""
        self.report_at = math.inf

    def run(self) -> int:
        self.chan.send(channel.Ready(pid=os.getpid()))
        self.ctx.serving = True
        self.next_beat = time.monotonic() + self.ctx.heartbeat_interval
        try:
            while not self.stopping:
                wake_at = min(self.next_beat, self.report_at)
                if self.shared.backing_off():
                    wake_at = min(wake_at, self.shared.resume_at)
                for key, _ in self.selector.select(max(0.0, wake_at - time.monotonic())):
                    key.data()
                if self.chan.exhausted:
                    self.stopping = True  # out of descriptors: what is queued is not ours
                self.update_accepting()  # a back-off may have ended
                if self.report_at <= time.monotonic():
                    self.report_due()
                self.beat_if_due()
            self.stop_accepting()
            if not self.master_gone:
                self.drain()  # connections already queued are ours to serve
            self.finish()
            if not self.master_gone:
                self.report_served()
                for report in stats_reports(self.ctx):  # the last counts, before it exits
                    self.chan.send(report)
        except ChannelClosed:
            pass
        return EXIT_RUNTIME_ERROR if self.chan.exhausted else EXIT_OK

    def drain(self) -> None:
        """On the way out: serve what is queued on the channel."""
        self._on_channel()

    def beat_if_due(self) -> None:
        if time.monotonic() >= self.next_beat and not self.master_gone:
            self.beat()
            self.next_beat = time.monotonic() + self.ctx.heartbeat_interval

    def beat(self) -> None:
        ctx = self.ctx
        self.chan.send(channel.Heartbeat())
        self.chan.send(
            channel.Stats(served=ctx.served, in_flight=ctx.in_flight, errors=ctx.errors)
        )
        for report in stats_reports(ctx):
            self.chan.send(report)
        self.report_served()

    def report_served(self) -> None:
        """SERVED for the self-accepted connections finished since the last report."""
        count = self.shared.take_unreported()
        if count:
            self.chan.send(channel.Served(count=count))

    def _on_channel(self) -> None:
        try:
            messages = self.chan.receive()
        except ChannelClosed:
            self.stopping = self.master_gone = True
            return
        for message, fds in messages:
            if isinstance(message, channel.Connections):
                self.take(fds, message.listeners)
            elif isinstance(message, channel.Reopen):
                reopen_log(self.ctx, fds)
            else:
                self.stopping = True

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_signal(self) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        if signal.SIGTERM in data:
            self.stopping = True

    def report(self, error: channel.HandlerError | None) -> None:
        if error is not None:
            self.ctx.errors += 1
            self.chan.send(error)
