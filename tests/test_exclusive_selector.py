"""Shared listeners wake one idle worker per connection (EPOLLEXCLUSIVE).

Real processes block in ``epoll_wait`` on one listening socket; the test
connects once and counts how many of them the kernel woke: once one says
it woke, every wake-up of that connection has happened, so the ones still
asleep in ``epoll_wait`` were not woken, however slow the machine.  The same
test with a plain ``EpollSelector`` is the control: there every waiter
wakes, so the count can tell the two apart.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkserver.workers.shared import EPOLLEXCLUSIVE, ExclusiveSelector
from tests.support import ROOT, TIMEOUT, poll_until

WAITERS = 3

# A waiter: watch the inherited listener, block, say "woke" when
# select() returns, never accept (so the listener stays readable).
WAITER = """
import selectors, sys
from forkserver.workers.shared import ExclusiveSelector
fd = int(sys.argv[1])
sel = ExclusiveSelector([fd]) if sys.argv[2] == "exclusive" else selectors.EpollSelector()
sel.register(fd, selectors.EVENT_READ)
if sel.select(timeout=300):  # the test kills it long before
    sys.stdout.write("woke\\n")
"""

pytestmark = pytest.mark.skipif(not EPOLLEXCLUSIVE, reason="no EPOLLEXCLUSIVE on this kernel")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0), backlog=16) as sock:
        yield sock


#: x86-64 numbers of epoll_wait, epoll_pwait and epoll_pwait2.
EPOLL_WAIT_SYSCALLS = frozenset({"232", "281", "441"})


def _in_epoll_wait(pid: int) -> bool:
    """Is *pid* asleep in epoll_wait?  The kernel says where it sleeps, or in which call."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        if "epoll" in Path(f"/proc/{pid}/wchan").read_text():  # do_epoll_wait / ep_poll
            return True
        # Kernels that hide wchan (it reads "0") still show the blocking call.
        syscall = Path(f"/proc/{pid}/syscall").read_text().split()
        return bool(syscall) and syscall[0] in EPOLL_WAIT_SYSCALLS
    return False


def _asleep_in_epoll_wait(pid: int) -> bool:
    """Sleeping ("S") in epoll_wait: a woken process is runnable, or has gone on."""
    with contextlib.suppress(FileNotFoundError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state == "S" and _in_epoll_wait(pid)
    return False


def _count_woken(listener: socket.socket, kind: str) -> int:
    """Start the waiters, connect once, count the ones that woke."""
    fd = listener.fileno()
    waiters = [
        subprocess.Popen(
            [sys.executable, "-c", WAITER, str(fd), kind],
            pass_fds=(fd,), cwd=ROOT, stdout=subprocess.PIPE,
        )
        for _ in range(WAITERS)
    ]  # fmt: skip
    try:
        for proc in waiters:
            poll_until(lambda p=proc: _in_epoll_wait(p.pid), f"waiter {proc.pid} in epoll_wait")
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        with client:
            outputs = [proc.stdout for proc in waiters if proc.stdout]
            ready, _, _ = select.select(outputs, [], [], TIMEOUT)
            assert ready, f"no waiter woke within {TIMEOUT} s"
            assert ready[0].read() == b"woke\n"
            return sum(not _asleep_in_epoll_wait(proc.pid) for proc in waiters)
    finally:
        for proc in waiters:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()


def test_one_waiter_wakes_per_connection(listener: socket.socket) -> None:
    assert _count_woken(listener, "exclusive") == 1


def test_without_the_flag_every_waiter_wakes(listener: socket.socket) -> None:
    # The control: the count above could not be 1 by accident.
    assert _count_woken(listener, "plain") == WAITERS


def test_exclusive_descriptors_are_watched_for_reading_only(listener: socket.socket) -> None:
    fd = listener.fileno()
    with ExclusiveSelector([fd]) as sel:
        with pytest.raises(ValueError, match=f"fd {fd} can only be watched for reading"):
            sel.register(fd, selectors.EVENT_WRITE)
        assert sel.get_map().get(fd) is None  # the refused registration left nothing behind
        sel.register(fd, selectors.EVENT_READ, "data")
        with pytest.raises(ValueError, match="only be watched for reading"):
            sel.modify(fd, selectors.EVENT_READ | selectors.EVENT_WRITE)
        # the data alone may change
        assert sel.modify(fd, selectors.EVENT_READ, "other").data == "other"
        sel.unregister(fd)
        sel.register(fd, selectors.EVENT_READ)  # and it can come back


def test_other_descriptors_are_ordinary(listener: socket.socket) -> None:
    r, w = os.pipe()
    try:
        with ExclusiveSelector([listener.fileno()]) as sel:
            sel.register(w, selectors.EVENT_WRITE)
            sel.modify(w, selectors.EVENT_READ | selectors.EVENT_WRITE)
            assert [key.fd for key, _ in sel.select(timeout=1)] == [w]
    finally:
        os.close(r)
        os.close(w)
