"""The ``thread`` worker class: up to ``concurrency`` connections on a pool.

Threads never touch the channel's bookkeeping: each finished connection
goes on a queue and a byte on a pipe wakes the main loop, which sends
one DONE for everything that finished since it last looked (batched);
connections it accepted itself from a shared listener are counted for
SERVED instead.
"""

from __future__ import annotations

import contextlib
import os
import queue
from concurrent.futures import ThreadPoolExecutor

from forkserver.channel import HandlerError
from forkserver.workers.core import WorkerContext, serve_blocking
from forkserver.workers.loop import SelectorWorker
from forkserver.workers.timing import LockedConnectionTimes


class ThreadWorker(SelectorWorker):
    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        # Its connections finish in the pool's threads, each observing its duration.
        ctx.durations = LockedConnectionTimes()
        self.pool = ThreadPoolExecutor(ctx.concurrency, thread_name_prefix="forkserver-conn")
        # (what went wrong, accepted by this worker itself) per finished connection
        self.finished: queue.SimpleQueue[tuple[HandlerError | None, bool]] = queue.SimpleQueue()
        self._done_r, self._done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.watch(self._done_r, self._collect)

    def take(self, fds: list[int], listeners: tuple[int, ...]) -> None:
        self.ctx.in_flight += len(fds)
        for fd, listener in zip(fds, listeners, strict=True):
            self.pool.submit(self._serve, fd, listener, False)
        self.update_accepting()

    def take_own(self, fd: int, listener: int, peer: object) -> None:
        self.ctx.in_flight += 1
        self.pool.submit(self._serve, fd, listener, True, peer)

    def _serve(self, fd: int, listener: int, own: bool, peer: object = None) -> None:
        try:
            self.finished.put((serve_blocking(self.ctx, fd, listener, peer), own))
        finally:
            # A full pipe means the main loop is already due to wake.
            with contextlib.suppress(BlockingIOError):
                os.write(self._done_w, b"x")

    def _collect(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._done_r, 4096)
        count = own_count = 0
        while True:
            try:
                error, own = self.finished.get_nowait()
            except queue.Empty:
                break
            if own:
                own_count += 1
            else:
                count += 1
            self.report(error)
        self.ctx.in_flight -= count + own_count
        self.ctx.served += count + own_count
        self.shared.unreported += own_count
        if count:
            self.chan.send_done(count)
        self.update_accepting()

    def finish(self) -> None:
        self.pool.shutdown(wait=True)
        if not self.master_gone:
            self._collect()
