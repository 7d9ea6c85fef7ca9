"""Python bytecodes forkserver executes per connection: an exact count.

Usage (from the repository root)::

    python -m tests.bench.bytecodes [REV ...]

Timings on a shared virtual machine move by several per cent from one run
to the next, more than most changes to the per-connection path are worth;
the number of bytecodes the interpreter executes does not move at all.
This counts them, by function, for both processes:

* a real ``SyncWorker`` serving real TCP connections whose descriptors
  arrive over a real SEQPACKET channel, as the master sends them (one per
  message, ``PREFETCH`` at a time), with a handler that does nothing;
* the master's part (``count_master``): a real ``Listener`` accepting into
  a real ``Dispatcher`` for two busy sync workers, the credit a DONE
  returns, and the sends it frees room for.

What is counted is forkserver's own Python; a bytecode is not a unit of
time (a tuple built or a lock taken is one bytecode or none), so this
says where the interpreter's work is, and ``timeit`` or the bench what
it costs.  Each REV (default: the working tree only) is counted from a
snapshot, in a process of its own, so two revisions can be compared
side by side.  System calls are not counted (``--phases profile`` counts
those).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from tests.bench import launch

ROOT = Path(__file__).resolve().parents[2]


#: (bytecodes, Python calls, per function) per connection.
Counts = tuple[float, float, list[tuple[str, float, float]]]


def count(batch: int = 7, batches: int = 4) -> Counts:
    """(bytecodes, Python calls, per function) per connection, in this process.

    The process becomes a worker's: ``SyncWorker`` sets its SIGTERM handler
    and the signal wakeup descriptor.  So it is called only in a process
    of its own (``run_for``), never in one that goes on doing other things.
    """
    from forkserver import channel, fdpass  # noqa: PLC0415 (from the tree on sys.path)
    from forkserver.handler import HandlerKind, LoadedHandler  # noqa: PLC0415
    from forkserver.workers.core import WorkerContext  # noqa: PLC0415
    from forkserver.workers.sync import SyncWorker  # noqa: PLC0415

    def handler(conn: socket.socket, peer: object) -> None:
        pass

    master, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener = socket.create_server(("127.0.0.1", 0))
    ctx = WorkerContext(slot=0, master_pid=os.getpid(), channel=worker_end, handler_spec="bench",
                        worker_class="sync", concurrency=1, listener_names=("bench",),
                        handler=LoadedHandler("bench", HandlerKind.FUNCTION, handler),
                        heartbeat_interval=3600.0)  # fmt: skip
    worker = SyncWorker(ctx)
    worker.next_beat = time.monotonic() + 3600.0
    counter = _Counter()

    def serve_batch(traced: bool) -> None:
        clients, conns = [], []
        for _ in range(batch):
            clients.append(socket.create_connection(listener.getsockname()))
            conns.append(listener.accept()[0])
        for conn in conns:
            assert fdpass.send(master, channel.encode_connections([0]), [conn.fileno()])
            conn.close()
        counter.start(traced)
        try:
            worker._on_channel()  # serves what is queued, then finds the channel empty
        finally:
            counter.stop()
        for client in clients:
            client.close()
        while True:  # its DONEs
            try:
                master.recv(64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break

    with master, worker_end, listener:
        serve_batch(traced=False)  # the first connection learns the socket kind
        for _ in range(batches):
            serve_batch(traced=True)
    assert ctx.served == batch * (batches + 1), "the worker did not serve every connection"
    return counter.per(batch * batches)


class _Counter:
    """Bytecodes and calls by function, counted between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self.opcodes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def _tracer(self, frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
        if frame.f_code is _Counter.stop.__code__:
            return None  # the counting's own end
        frame.f_trace_opcodes = True
        name = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
        self.calls[name] += 1
        opcodes = self.opcodes

        def local(frame: FrameType, event: str, arg: object) -> Callable[..., Any]:
            if event == "opcode":
                opcodes[name] += 1
            return local
        return local

    def start(self, on: bool = True) -> None:
        if on:
            sys.settrace(self._tracer)

    def stop(self) -> None:
        sys.settrace(None)

    def per(self, connections: int) -> tuple[float, float, list[tuple[str, float, float]]]:
        rows = [(name, n / connections, self.calls[name] / connections)
                for name, n in self.opcodes.most_common()]  # fmt: skip
        return (sum(self.opcodes.values()) / connections,
                sum(self.calls.values()) / connections, rows)  # fmt: skip


def count_master(batch: int = 8, batches: int = 4) -> Counts:
    """The master's part per connection: accept, queue, the credit's return, send.

    A real ``Listener`` accepts real connections in a real ``EventLoop``
    and the real ``Dispatcher`` hands them to two sync workers' channels
    (capacity 1, ``PREFETCH`` queued) whose every slot is taken, as under
    steady load: each batch of *batch* arrivals waits in the master's
    queue until each worker has served ``DONE_EVERY`` and says so.  That
    DONE is a real message on the worker's channel, read and handled by a
    real ``Pool`` (``_on_readable``, what the loop calls when the channel
    is readable).  One more pass of the loop sends what the two DONEs
    freed room for.
    """
    from forkserver import channel, fdpass  # noqa: PLC0415 (from the tree on sys.path)
    from forkserver.config import Settings  # noqa: PLC0415
    from forkserver.dispatch import WorkerLink  # noqa: PLC0415
    from forkserver.eventloop import EventLoop  # noqa: PLC0415
    from forkserver.listeners import Listener, parse_bind  # noqa: PLC0415
    from forkserver.pool import Pool, Processes, WorkerSpec  # noqa: PLC0415
    from forkserver.workers.sync import DONE_EVERY, PREFETCH  # noqa: PLC0415

    assert batch == 2 * DONE_EVERY, "each worker reports once per batch"
    loop = EventLoop()
    listener = Listener(parse_bind("127.0.0.1:0"), 0, loop=loop)
    pool = Pool(loop, spec=WorkerSpec.of(Settings(max_pending_connections=30), "sync"),
                listeners=[listener], shared=(), handler=None, processes=Processes(),
                report=lambda fact: None)  # fmt: skip
    table, dispatcher = pool.table, pool.dispatcher
    assert listener.listen("127.0.0.1", 0)
    listener.dispatch = dispatcher.dispatch
    dispatcher.listeners = [listener]
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    links = []
    for pid, (master_end, worker_end) in enumerate(pairs, start=100):
        master_end.setblocking(False)
        record = table.add(pid - 100, pid, 1, now=0.0, prefetch=PREFETCH)
        table.mark_ready(pid, now=0.0)
        links.append(WorkerLink(record=record, sock=master_end, peer=worker_end))
        dispatcher.add_link(links[-1])
    done = channel.encode_done(DONE_EVERY)
    counter = _Counter()
    clients: list[socket.socket] = []

    def connect(count: int) -> None:
        for _ in range(count):
            clients.append(socket.create_connection(("127.0.0.1", listener.server_port())))

    try:
        connect(2 * (1 + PREFETCH))
        loop.run_once(5.0)  # every slot taken
        for traced in (False, *[True] * batches):
            connect(batch)
            counter.start(traced)
            loop.run_once(5.0)  # the batch accepted, into the master's queue
            counter.stop()
            for link, (_, worker_end) in zip(links, pairs, strict=True):
                for _ in range(DONE_EVERY):  # the worker serves its oldest
                    _, fds = fdpass.recv(worker_end, 64, 1, nonblocking=True)
                    fdpass.close_all(fds)
                worker_end.send(done)
                counter.start(traced)
                pool._on_readable(link)
                counter.stop()
            counter.start(traced)
            loop.run_once(0)  # the flush
            counter.stop()
        assert not dispatcher.pending, "a connection was left in the master's queue"
    finally:
        listener.close()
        for client in clients:
            client.close()
        for pid in list(dispatcher.links):
            fdpass.close_all([fd for fd, _ in dispatcher.remove_link(pid)])
        for master_end, worker_end in pairs:
            master_end.close()
            worker_end.close()
        loop.close()
    return counter.per(batch * batches)


def run_for(rev: str | None) -> str:
    """The report of *rev* (None: the working tree), counted in a process of its own."""
    source = ROOT if rev is None else launch.REVISIONS[rev]
    env = {**os.environ, "PYTHONPATH": f"{source}:{ROOT}"}
    argv = [sys.executable, "-m", "tests.bench.bytecodes", "--here"]
    out = subprocess.run(argv, env=env, cwd=source, capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    return out.stdout


def report() -> str:
    lines = []
    for process, counted in (("sync worker", count), ("master", count_master)):
        total, calls, rows = counted()
        lines.append(f"{process}: {total:.1f} bytecodes and {calls:.1f} Python calls "
                     f"per connection")  # fmt: skip
        lines += [f"  {per:7.1f}  {called:5.2f} calls  {name}" for name, per, called in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if argv == ["--here"]:
        print(report())
        return
    print(f"working tree: {run_for(None)}")
    for rev in argv:
        commit = launch.add_revision(rev)
        print(f"{rev} ({commit[:12]}): {run_for(rev)}")


if __name__ == "__main__":
    main(sys.argv[1:])
