"""Python bytecodes a sync worker executes per connection: an exact count.

Usage (from the repository root)::

    python -m tests.bench.bytecodes [REV ...]

Timings on a shared virtual machine move by several per cent from one run
to the next, more than most changes to the per-connection path are worth;
the number of bytecodes the interpreter executes does not move at all.
This counts them, by function, while a real ``SyncWorker`` serves real
TCP connections whose descriptors arrive over a real SEQPACKET channel,
as the master sends them (one per message, ``PREFETCH`` at a time), with
a handler that does nothing: what is counted is forkserver's own work.
Each REV (default: the working tree only) is counted from a snapshot, in
a process of its own, so two revisions can be compared side by side.
System calls are not counted (``--phases profile`` counts those).
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


def count(batch: int = 7, batches: int = 4) -> tuple[float, float, list[tuple[str, float, float]]]:
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
    opcodes: Counter[str] = Counter()
    calls: Counter[str] = Counter()

    def tracer(frame: FrameType, event: str, arg: object) -> Callable[..., Any]:
        frame.f_trace_opcodes = True
        name = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
        calls[name] += 1

        def local(frame: FrameType, event: str, arg: object) -> Callable[..., Any]:
            if event == "opcode":
                opcodes[name] += 1
            return local
        return local

    def serve_batch(traced: bool) -> None:
        clients, conns = [], []
        for _ in range(batch):
            clients.append(socket.create_connection(listener.getsockname()))
            conns.append(listener.accept()[0])
        for conn in conns:
            assert fdpass.send(master, channel.encode_connections([0]), [conn.fileno()])
            conn.close()
        if traced:
            sys.settrace(tracer)
        try:
            worker._on_channel()  # serves what is queued, then finds the channel empty
        finally:
            sys.settrace(None)
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
    served = batch * batches
    assert ctx.served == served + batch, "the worker did not serve every connection"
    rows = [(name, opcodes[name] / served, calls[name] / served)
            for name, _ in opcodes.most_common()]  # fmt: skip
    return sum(opcodes.values()) / served, sum(calls.values()) / served, rows


def run_for(rev: str | None) -> str:
    """The report of *rev* (None: the working tree), counted in a process of its own."""
    source = ROOT if rev is None else launch.REVISIONS[rev]
    env = {**os.environ, "PYTHONPATH": f"{source}:{ROOT}"}
    argv = [sys.executable, "-m", "tests.bench.bytecodes", "--here"]
    out = subprocess.run(argv, env=env, cwd=source, capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    return out.stdout


def report() -> str:
    total, calls, rows = count()
    lines = [f"{total:.1f} bytecodes and {calls:.1f} Python calls per connection"]
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
