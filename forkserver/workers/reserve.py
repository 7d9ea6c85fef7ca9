"""Descriptor numbers a worker keeps free for what the master sends it.

A worker at its ``RLIMIT_NOFILE`` (a handler that leaks files, a limit
set too low) cannot take the descriptors of the next CONNECTIONS
message: the kernel installs none and closes them, and those
connections are lost.  So the worker never lets the rest of the process
reach the limit: at boot it lowers its soft limit by ``size`` (the most
descriptors one message can carry to it), and raises it back only
around its own receives.  ``RLIMIT_NOFILE`` bounds descriptor *numbers*,
so the top ``size`` numbers stay free for the channel: a message always
fits.

Nothing but a receive may take a number at or above ``floor``.  When a
received descriptor lands there, the numbers below are all taken:
the process is at its limit, and the next message might not fit, so
the worker must not read it (``exhausted_by``).  It says LEAVING (the
master takes back what is queued on its channel and gives it to another
worker), finishes what it holds and exits.

The cost is two ``setrlimit`` calls per receive (a sync worker skips
them when it has just closed a connection of its own, whose number is
then free: ``WorkerChannel.receive_one``).  Handler code sees a
soft limit ``size`` lower than the worker was given (so do the
programs it starts); one that changes the limit itself has its soft
limit reset at the next receive.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable
from typing import Final

_NOFILE: Final = resource.RLIMIT_NOFILE


class DescriptorReserve:
    """The top *size* descriptor numbers below the soft limit, kept for receives."""

    def __init__(self, size: int) -> None:
        soft, hard = resource.getrlimit(_NOFILE)
        if soft == resource.RLIM_INFINITY:
            size = 0  # no limit to run into
        #: How many numbers are kept (never more than half the limit); 0: none.
        self.size = max(0, min(size, soft // 2))
        #: The soft limit the worker was given: receives may use every number below it.
        self.limit = soft
        #: The soft limit everything else runs with.
        self.floor = soft - self.size
        self._open: Final = (soft, hard)
        self._closed: Final = (self.floor, hard)
        if self.size:
            resource.setrlimit(_NOFILE, self._closed)

    def open(self) -> None:
        """Just before a receive: the reserved numbers may be taken."""
        if self.size:
            resource.setrlimit(_NOFILE, self._open)

    def close(self) -> None:
        """Just after it: nothing else may take them."""
        if self.size:
            resource.setrlimit(_NOFILE, self._closed)

    def exhausted_by(self, fds: Iterable[int]) -> bool:
        """Did a receive need the reserve?  Then every number below it is taken."""
        return self.size > 0 and max(fds, default=-1) >= self.floor
