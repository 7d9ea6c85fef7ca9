"""Helpers shared by the multi-process tests.

``wait_pid(pid, timeout)``: reap a child of this process, or kill it
and fail when it does not exit in time.
"""

from __future__ import annotations

import os
import select
import signal


def wait_pid(pid: int, timeout: float = 10.0) -> int:
    """Wait for our child *pid* to exit; return its exit code (-N: signal N).

    Waits on a pidfd, so it wakes on the exit itself.  On timeout the
    child is killed and reaped, then the test fails.
    """
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"process {pid} did not exit within {timeout} s")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
