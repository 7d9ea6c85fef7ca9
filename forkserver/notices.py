"""What the master tells systemd, and when (the wire format is ``systemd.Notifier``).

* STATUS=: the ``status.Snapshot`` summary whenever the master's
  reconciliation saw a change, and every ``STATUS_TICK`` seconds under
  systemd so the load figures stay current; the notifier rate-limits
  it, and a flush timer sends the last word once the limit allows.
* WATCHDOG=1 every half of ``WATCHDOG_USEC``: the loop is turning.
* EXTEND_TIMEOUT_USEC= every ``EXTEND_INTERVAL`` while a graceful stop
  still drains connections, so systemd waits for them (up to the stop's
  deadline and ``EXTEND_MARGIN`` more).
* Nothing at all while an older master is in charge (a master started
  by USR2, until the old one has exited): systemd hears its main pid
  only, and that is the old master's (STATUS=, WATCHDOG=1).

Collaborators: the loop, the notifier, the snapshot and whether this
master is in charge (``upgrader.Upgrader.in_charge``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from forkserver.eventloop import EventLoop, TimerHandle
from forkserver.status import Snapshot
from forkserver.systemd import Notifier

#: Seconds between STATUS= refreshes while the load changes (only under systemd).
STATUS_TICK: Final = 2.0
#: While a stop drains, systemd is asked every this many seconds for more time.
EXTEND_INTERVAL: Final = 5.0
#: Beyond ``graceful_timeout``: time to kill the stragglers and exit.
EXTEND_MARGIN: Final = 10.0


class InCharge(Protocol):
    @property
    def in_charge(self) -> bool: ...


class Notices:
    def __init__(
        self, loop: EventLoop, notifier: Notifier, *, snapshot: Callable[[], Snapshot],
        charge: InCharge,
    ) -> None:  # fmt: skip
        self.loop = loop
        self.notifier = notifier
        self.snapshot = snapshot
        self.charge = charge
        self._flush_timer: TimerHandle | None = None

    def start(self) -> None:
        """Arm the watchdog and, under systemd, the STATUS= tick."""
        self._watchdog()
        if self.notifier.enabled:
            self._status_tick()

    def status(self, *, force: bool = False) -> None:
        """A STATUS= summary (rate-limited by the notifier, unless *force*)."""
        if not self.notifier.enabled or not self.charge.in_charge:
            return
        self.notifier.status(self.snapshot().summary(), force=force)
        deadline = self.notifier.status_deadline()
        if deadline is not None and self._flush_timer is None:
            self._flush_timer = self.loop.call_at(deadline, self._flush)

    def extend_while(self, deadline: float, draining: Callable[[], bool]) -> None:
        """EXTEND_TIMEOUT_USEC until *deadline* (monotonic) while *draining()* holds."""
        if not draining():
            return
        remaining = max(0.0, deadline - self.loop.time())
        self.notifier.extend_timeout(remaining + EXTEND_MARGIN)
        self.loop.call_later(min(EXTEND_INTERVAL, remaining + 1.0),
                             lambda: self.extend_while(deadline, draining))  # fmt: skip

    def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            if self.charge.in_charge:  # until an upgrade completes, the old master pings
                self.notifier.watchdog()
            self.loop.call_later(interval, self._watchdog)

    def _status_tick(self) -> None:
        """Keep STATUS= current under load, when nothing else changes it."""
        self.status()
        self.loop.call_later(STATUS_TICK, self._status_tick)

    def _flush(self) -> None:
        self._flush_timer = None
        self.notifier.flush_status()
