"""The ``asyncio`` worker class: connections as tasks on one event loop.

Each received descriptor becomes ``asyncio.open_connection(sock=...)``
and a task running ``await handle(reader, writer)``, or, for an
``asyncio.Protocol`` handler, a new protocol attached to it and a task
that waits until its connection is over (``workers.protocols``).
Finished tasks are counted and one DONE per loop pass reports them
(batched).  The loop is asyncio's own, on an ``ExclusiveSelector``, or
uvloop's (``event_loop = "uvloop"``).
Connections it accepts itself from a shared listener (watched only
while fewer than ``concurrency`` tasks run) are reported with SERVED,
with the heartbeat, never with DONE.  SIGTERM or STOP: stop accepting,
stop taking connections once the ones already queued on the channel
are in, wait for every task, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from forkserver import channel
from forkserver.handler import HandlerKind
from forkserver.workers import preamble, protocols
from forkserver.workers.core import (
    EXIT_OK,
    EXIT_RUNTIME_ERROR,
    ChannelClosed,
    WorkerChannel,
    WorkerContext,
    adopt,
    error_report,
    log_access,
    peer_of,
    reopen_log,
    stats_reports,
)
from forkserver.workers.shared import SharedListeners

AsyncHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, object]]


def _cancelled(exc: BaseException) -> bool:
    """Is *exc* the cancellation of the running task, the one error a handler passes on?

    The worker cancels a connection's task only when it must go at once
    (the master is gone): that ``CancelledError`` is honoured.  One the
    handler raises, or gets from a future someone else cancelled, is its
    error like any other, as is everything else it raises
    (``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``, ...).
    """
    if not isinstance(exc, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class AsyncioWorker:
    def __init__(self, ctx: WorkerContext) -> None:
        assert ctx.handler is not None
        self.ctx = ctx
        self.handle: AsyncHandler = ctx.handler.target  # type: ignore[assignment]
        #: An ``asyncio.Protocol`` handler, subclassed to track its connections.
        self.protocol: type[protocols.TrackedProtocol] | None = None
        if ctx.handler.kind is HandlerKind.PROTOCOL:
            self.protocol = protocols.tracked(ctx.handler.target)  # type: ignore[arg-type]
        self.chan = WorkerChannel(ctx.channel, ctx.reserve, ctx.slot)
        self.tasks: set[asyncio.Task[None]] = set()
        self.done_count = 0
        self.stopped = asyncio.Event()
        self.master_gone = False
        self.shared = SharedListeners(ctx)
        self._rearm_scheduled = False
        self._accepting = False

    def run(self) -> int:
        with asyncio.Runner(loop_factory=self._new_loop) as runner:
            runner.run(self._main())
        return EXIT_RUNTIME_ERROR if self.chan.exhausted else EXIT_OK

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        if self.ctx.event_loop == "uvloop":
            # libuv keeps its own epoll set: shared listeners wake every idle worker.
            import uvloop  # noqa: PLC0415 (optional, and only this worker needs it)

            return uvloop.new_event_loop()
        return asyncio.SelectorEventLoop(self.shared.selector())

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop)
        if self.ctx.term_received:  # a TERM taken while the worker booted
            self._stop()
        loop.set_exception_handler(protocols.record_callback_error)
        self.chan.send(channel.Ready(pid=os.getpid()))
        self.ctx.serving = True
        loop.add_reader(self.chan.fileno(), self._on_channel)
        beat = asyncio.create_task(self._heartbeat())
        self._update_accepting()
        try:
            await self.stopped.wait()
            self._update_accepting()
            self.shared.close()
            loop.remove_reader(self.chan.fileno())
            if not self.master_gone:
                self._on_channel()  # connections already queued are ours to serve
            while self.tasks:
                await asyncio.wait(set(self.tasks))
            self._report_served()
            for report in stats_reports(self.ctx):  # the last counts, before it exits
                self._send(report)
        finally:
            beat.cancel()

    def _stop(self) -> None:
        self.stopped.set()

    def _update_accepting(self) -> None:
        """Watch the shared listeners while there is room, and not once stopped."""
        room = self.ctx.concurrency - self.ctx.in_flight
        backing_off = self.shared.backing_off()
        want = bool(self.shared) and not self.stopped.is_set() and room > 0 and not backing_off
        loop = asyncio.get_running_loop()
        if backing_off and not self._rearm_scheduled:
            # asyncio may run a timer a little early: check again, never give up
            self._rearm_scheduled = True
            loop.call_at(loop.time() + self.shared.resume_at - time.monotonic(), self._rearm)
        if want == self._accepting:
            return
        for index, fd in self.shared.fds().items():
            if want:
                loop.add_reader(fd, partial(self._on_listener, index))
            else:
                loop.remove_reader(fd)
        self._accepting = want

    def _rearm(self) -> None:
        self._rearm_scheduled = False
        self._update_accepting()

    def _on_listener(self, index: int) -> None:
        if not self.stopped.is_set():
            room = self.ctx.concurrency - self.ctx.in_flight
            self.shared.accept(index, room, partial(self._start, own=True))
        self._update_accepting()

    def _report_served(self) -> None:
        count = self.shared.take_unreported()
        if count:
            self._send(channel.Served(count=count))

    def _on_channel(self) -> None:
        try:
            messages = self.chan.receive()
        except ChannelClosed:
            self.master_gone = True
            self._stop()
            return
        for message, fds in messages:
            if isinstance(message, channel.Connections):
                for fd, listener in zip(fds, message.listeners, strict=True):
                    self._start(fd, listener)
            elif isinstance(message, channel.Reopen):
                reopen_log(self.ctx, fds)
            else:
                self._stop()
        if self.chan.exhausted:  # out of descriptors: what is queued is not ours
            asyncio.get_running_loop().remove_reader(self.chan.fileno())
            self._stop()
        self._update_accepting()

    def _start(self, fd: int, listener: int, peer: object = None, *, own: bool = False) -> None:
        self.ctx.in_flight += 1
        task = asyncio.create_task(self._serve(fd, listener, peer))
        self.tasks.add(task)
        task.add_done_callback(self._finished_own if own else self._finished)

    async def _serve(self, fd: int, listener: int, peer: object) -> None:
        started = time.monotonic()
        try:
            sock = adopt(self.ctx, fd, listener, blocking=None)  # asyncio makes it non-blocking
        except OSError as exc:
            self._report(error_report(exc, listener, "", self.ctx.listener_family(listener)))
            return
        if peer is None:
            peer = peer_of(sock)
        step = self.ctx.preambles[listener] if self.ctx.preambles else None
        if step is not None:  # a PROXY listener: who is it, and the header
            admitted = await preamble.admit_async(step, self.ctx.refusals, sock, listener, peer)
            if admitted is None:
                sock.close()
                return
            sock, peer = admitted
        if step is not None and step.tls is not None:  # the handshake, on the loop
            from forkserver.workers import tlsstep  # noqa: PLC0415 (only with TLS)

            error = await tlsstep.serve_tls(self, step.tls, self.ctx.handshakes, sock,
                                            listener=listener, name=step.listener, peer=peer)
        elif self.protocol is not None:
            error = await self._run_protocol(self.protocol, sock)
        else:
            error = await self._run_streams(sock)
        elapsed = time.monotonic() - started
        self.ctx.durations.observe(listener, elapsed)
        if error is not None:
            self._report(error_report(error, listener, peer, self.ctx.listener_family(listener)))
        if self.ctx.access_log:
            log_access(self.ctx, listener, peer, elapsed, failed=error is not None,
                       exc_type=type(error).__name__ if error is not None else "")

    async def _run_streams(self, sock: socket.socket) -> BaseException | None:
        try:
            reader, writer = await asyncio.open_connection(sock=sock)
        except OSError as exc:
            sock.close()
            return exc
        return await self.handle_streams(reader, writer)

    async def handle_streams(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> BaseException | None:  # fmt: skip
        """Run the stream handler on a connection; close it; its error, if any."""
        try:
            await self.handle(reader, writer)
        except BaseException as exc:  # anything but our own cancellation
            if _cancelled(exc):
                raise
            return exc
        finally:
            writer.close()
            # A peer that reset the connection: it is closed either way.
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return None

    @staticmethod
    async def _run_protocol(
        protocol: type[protocols.TrackedProtocol], sock: socket.socket
    ) -> BaseException | None:
        try:
            return await protocols.serve(protocol, sock)
        except BaseException as exc:  # its __init__, or attaching the socket
            if _cancelled(exc):
                raise
            return exc

    def _report(self, error: channel.HandlerError) -> None:
        self.ctx.errors += 1
        self._send(error)

    def _send(self, message: channel.WorkerMessage) -> None:
        if self.master_gone:
            return
        try:
            self.chan.send(message)
        except ChannelClosed:
            self.master_gone = True
            self._stop()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.ctx.in_flight -= 1
        self.ctx.served += 1
        if not self._accepting:
            self._update_accepting()
        if self.done_count == 0:
            asyncio.get_running_loop().call_soon(self._flush_done)
        self.done_count += 1

    def _finished_own(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.ctx.in_flight -= 1
        self.ctx.served += 1
        self.shared.unreported += 1
        if not self._accepting:
            self._update_accepting()

    def _flush_done(self) -> None:
        count, self.done_count = self.done_count, 0
        if count:
            self._send(channel.Done(count=count))

    async def _heartbeat(self) -> None:
        ctx = self.ctx
        while not self.master_gone:
            await asyncio.sleep(ctx.heartbeat_interval)
            self._send(channel.Heartbeat())
            self._send(channel.Stats(served=ctx.served, in_flight=ctx.in_flight, errors=ctx.errors))
            for report in stats_reports(ctx):
                self._send(report)
            self._report_served()
