"""USR2, as the master lives it (the mechanism itself is ``upgrade``).

As the **old** master, ``Upgrader.start()`` runs the new master on the
same listening sockets and watches three things: the ready pipe
("ready": the new master serves, so this one hands systemd the new pid
and reports ``HandedOver``: the master drains and exits), the new
master's exit (reaped by the pool, routed here as ``child_exited``: the
upgrade failed, say why and keep serving), and a deadline
(``upgrade.READY_TIMEOUT``: kill the new master, the upgrade failed).

As the **new** master (*predecessor* is the ``Handover`` it was started
with), ``report_ready()`` is called once all workers are ready: it tells
the old master, then watches it (a pidfd); when it has exited this one
is in charge (``in_charge``), and ``TookOver`` is reported: the master
takes the pid file and the control socket and sends READY=1 (after the
old master's MAINPID=, so systemd, which hears only its main pid,
hears it).

Collaborators: the loop (the pipe, the pidfd, the deadline), the
notifier (MAINPID=, the environment for the new master), ``Processes``
(to kill a new master past its deadline), the lifecycle (read only: no
upgrade while stopping), the listeners to hand over, and *report* for
the two outcomes.  Nothing here changes another object's state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from forkserver import upgrade
from forkserver.eventloop import EventLoop, TimerHandle
from forkserver.lifecycle import Lifecycle
from forkserver.listeners import Listener
from forkserver.upgrade import HandedListener, Handover, Upgrade

log = logging.getLogger("forkserver.master")


@dataclass(frozen=True, slots=True)
class HandedOver:
    """The newer master serves: this one drains and exits."""

    new_pid: int


@dataclass(frozen=True, slots=True)
class TookOver:
    """The older master has exited: this one is in charge."""

    old_pid: int


class UpgradeNotifier(Protocol):
    def handover_environ(self) -> dict[str, str]: ...
    def main_pid(self, pid: int) -> None: ...


class ChildKiller(Protocol):
    def kill(self, pid: int) -> None: ...


class Upgrader:
    def __init__(
        self,
        loop: EventLoop,
        *,
        notifier: UpgradeNotifier,
        processes: ChildKiller,
        lifecycle: Lifecycle,
        listeners: Sequence[Listener],
        inherited: Collection[int],
        report: Callable[[HandedOver | TookOver], None],
        predecessor: Handover | None = None,
    ) -> None:
        self.loop = loop
        self.notifier = notifier
        self.processes = processes
        self.lifecycle = lifecycle
        self.listeners = listeners
        self.inherited = inherited
        self.report = report
        #: The older master that started this one, until it has exited.
        self.predecessor = predecessor
        self.new: Upgrade | None = None  # a newer master we started
        self.done = False  # the newer master took over: drain and exit
        self._problem: str | None = None
        self._timer: TimerHandle | None = None
        self._old_master_fd = -1

    @property
    def in_charge(self) -> bool:
        """No older master holds the pid file, the control socket and systemd's ear."""
        return self.predecessor is None

    # --- the old master's side ------------------------------------------------

    def start(self) -> None:
        """USR2: run a new master on the same listening sockets."""
        stopping = self.lifecycle.stopping
        if stopping or self.new is not None or self.predecessor is not None:
            why = ("the master is stopping" if stopping else
                   "an upgrade is already under way" if self.new is not None else
                   "the previous master has not exited yet")  # fmt: skip
            log.warning("USR2 ignored: %s", why, extra={"event": "upgrade_ignored"})
            return
        handed = [
            HandedListener(fd=listener.socket_descriptor(), name=listener.name,
                           inherited=index in self.inherited, path=listener.created_path)
            for index, listener in enumerate(self.listeners)
        ]  # fmt: skip
        try:
            new = upgrade.start_new_master(
                upgrade.new_master_argv(), handed, self.notifier.handover_environ()
            )
        except OSError as exc:
            log.error("upgrade failed, this master keeps serving: cannot start a new master: %s",
                      exc, extra={"event": "upgrade_failed"})  # fmt: skip
            return
        self.new, self._problem = new, None
        self.loop.add_reader(new.ready_fd, self._on_pipe)
        self._timer = self.loop.call_later(upgrade.READY_TIMEOUT, self._late)
        log.info("upgrading: new master (pid %d) starting on the same sockets", new.pid,
                 extra={"event": "upgrade_started", "new_pid": new.pid})  # fmt: skip

    def _on_pipe(self) -> None:
        new = self.new
        if new is None:
            return
        said = upgrade.read_ready(new)
        if said is None:
            return
        self._close_pipe(new)
        if said:
            self._handed_over(new)
        # else: it gave up; its exit (reaped soon) says why

    def _close_pipe(self, new: Upgrade) -> None:
        if new.ready_fd >= 0:
            self.loop.remove_reader(new.ready_fd)
            os.close(new.ready_fd)
            new.ready_fd = -1

    def _handed_over(self, new: Upgrade) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.done = True
        log.info("upgrade complete: new master (pid %d) serves; this one drains and exits",
                 new.pid, extra={"event": "upgrade_completed", "pid": os.getpid(),
                                 "new_pid": new.pid})  # fmt: skip
        self.notifier.main_pid(new.pid)  # NotifyAccess=main: only the main pid is heard
        for listener in self.listeners:
            listener.created_path = None  # the new master's to remove now
        self.report(HandedOver(new.pid))

    def _late(self) -> None:
        new = self.new
        if new is not None and not self.done:
            self._problem = f"was not ready within {upgrade.READY_TIMEOUT:g} s"
            self.processes.kill(new.pid)  # its workers follow (parent-death signal)

    def child_exited(self, pid: int, how: str) -> bool:
        """A reaped child: if it is the new master, the upgrade is over.  Was it ours?"""
        if self.new is None or self.new.pid != pid:
            return False
        self._new_master_exited(how)
        return True

    def _new_master_exited(self, how: str) -> None:
        new, self.new = self.new, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if new is None:
            return
        self._close_pipe(new)
        if self.done:
            log.warning("the new master (pid %d) exited: %s", new.pid, how,
                        extra={"event": "upgrade_new_master_exited",
                               "new_pid": new.pid})  # fmt: skip
            return
        problem = self._problem or f"exited before it was ready: {how}"
        log.error("upgrade failed, this master keeps serving: new master (pid %d) %s", new.pid,
                  problem, extra={"event": "upgrade_failed", "new_pid": new.pid})  # fmt: skip

    # --- the new master's side ------------------------------------------------

    def report_ready(self) -> None:
        """Every worker is ready: tell the old master, and take over once it has gone."""
        if self.predecessor is None or self._old_master_fd >= 0:
            return
        self.predecessor.report_ready()
        self._await_old_master(self.predecessor.old_pid)

    def _await_old_master(self, old_pid: int) -> None:
        """The pid file and control socket are ours once the old master is gone."""
        try:
            self._old_master_fd = os.pidfd_open(old_pid)
        except ProcessLookupError:
            self._took_over(old_pid)
            return
        self.loop.add_reader(self._old_master_fd, lambda: self._took_over(old_pid))

    def _took_over(self, old_pid: int) -> None:
        self._close_pidfd()
        if self.predecessor is not None:
            self.predecessor.close()
            self.predecessor = None
        self.report(TookOver(old_pid))

    def _close_pidfd(self) -> None:
        if self._old_master_fd >= 0:
            self.loop.remove_reader(self._old_master_fd)
            os.close(self._old_master_fd)
            self._old_master_fd = -1

    def close(self) -> None:
        """On the way out: let go of the pipe, the pidfd and the hand-over."""
        if self.new is not None:
            self._close_pipe(self.new)
        self._close_pidfd()
        if self.predecessor is not None:
            self.predecessor.close()
