"""The ``thread`` worker class: up to ``concurrency`` connections on a pool.

Threads never touch the channel's bookkeeping: each finished connection
goes on a queue and a byte on a pipe wakes the main loop, which sends
one DONE for everything that finished since it last looked (batched).
"""

from __future__ import annotations

import contextlib
import os
import queue
from concurrent.futures import ThreadPoolExecutor

from forkserver.channel import HandlerError
from forkserver.workers.core import WorkerContext, serve_blocking
from forkserver.workers.loop import SelectorWorker


class ThreadWorker(SelectorWorker):
    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__(ctx)
        self.pool = ThreadPoolExecutor(ctx.concurrency, thread_name_prefix="forkserver-conn")
        self.finished: queue.SimpleQueue[HandlerError | None] = queue.SimpleQueue()
        self._done_r, self._done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.watch(self._done_r, self._collect)

    def take(self, fds: list[int], listeners: tuple[int, ...]) -> None:
        self.ctx.in_flight += len(fds)
        for fd, listener in zip(fds, listeners, strict=True):
            self.pool.submit(self._serve, fd, listener)

    def _serve(self, fd: int, listener: int) -> None:
        try:
            self.finished.put(serve_blocking(self.ctx, fd, listener))
        finally:
            # A full pipe means the main loop is already due to wake.
            with contextlib.suppress(BlockingIOError):
                os.write(self._done_w, b"x")

    def _collect(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._done_r, 4096)
        count = 0
        while True:
            try:
                error = self.finished.get_nowait()
            except queue.Empty:
                break
            count += 1
            self.report(error)
        if count:
            self.ctx.in_flight -= count
            self.ctx.served += count
            self.chan.send_done(count)

    def finish(self) -> None:
        self.pool.shutdown(wait=True)
        if not self.master_gone:
            self._collect()
