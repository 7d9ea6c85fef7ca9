"""Workers' stack dumps: a pipe per worker, read by the master, logged as one event.

A worker's ``faulthandler`` writes every thread's stack on ABRT (the
master's heartbeat timeout, or an operator) and on a crash in C.  It
writes from C, which is what makes it work while the worker is stuck
holding the GIL, and so it cannot go through ``logging``: into the log
stream it would put raw lines in the middle of JSON ones.  So each
worker writes to a pipe of its own, whose read end the master keeps;
once the worker has been reaped, the master reads what is there
(non-blocking, at most ``MAX_DUMP`` bytes) and logs it as one
``worker_stack_dump`` event, with the stack as a field.

The write end is non-blocking: a dump larger than the pipe is cut
short rather than leaving the dying worker blocked in its signal
handler.  The pipe is enlarged to ``MAX_DUMP`` where the system allows.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from typing import Final

log = logging.getLogger("forkserver.master")

#: The most bytes of one worker's stack dump the master reads and logs.
MAX_DUMP: Final = 256 * 1024


class StackDumps:
    """The read ends of the live workers' stack-dump pipes, by pid."""

    def __init__(self) -> None:
        self._pipes: dict[int, int] = {}

    def open(self) -> tuple[int, int]:
        """A new pipe for a worker about to be forked: (read end, write end).

        Both ends close on exec and never block.  Raises OSError (out of
        descriptors, say): the worker cannot be started now.
        """
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Above pipe-max-size for an unprivileged master: keep the default.
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, MAX_DUMP)
        return read_end, write_end

    def started(self, pid: int, read_end: int) -> None:
        """Worker *pid* was forked with the pipe whose read end this is."""
        self._pipes[pid] = read_end

    def collect(self, slot: int, pid: int) -> str:
        """Worker *pid* was reaped: log what it dumped, if anything; the text."""
        read_end = self._pipes.pop(pid, None)
        if read_end is None:
            return ""
        try:
            data = _read_bounded(read_end)
        finally:
            os.close(read_end)
        if not data:
            return ""
        stack = data.decode("utf-8", "replace").rstrip("\n")
        cut = len(data) >= MAX_DUMP
        log.error("worker %d (pid %d) dumped its stacks%s:\n%s", slot, pid,
                  " (cut short)" if cut else "", stack,
                  extra={"event": "worker_stack_dump", "slot": slot, "pid": pid,
                         "stack": stack, "truncated": cut})  # fmt: skip
        return stack

    def close(self) -> None:
        """On the way out: every read end still held."""
        for read_end in self._pipes.values():
            os.close(read_end)
        self._pipes.clear()


def _read_bounded(fd: int) -> bytes:
    """What is in the pipe now, up to ``MAX_DUMP`` bytes, without blocking."""
    chunks: list[bytes] = []
    size = 0
    while size < MAX_DUMP:
        try:
            chunk = os.read(fd, MAX_DUMP - size)
        except BlockingIOError:
            break  # a process the worker forked may still hold the write end
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
