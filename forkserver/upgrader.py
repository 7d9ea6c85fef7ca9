"""USR2, as the master lives it (the mechanism itself is ``upgrade``).

As the **old** master, ``Upgrader.start()`` runs the new master on the
same listening sockets and watches three things: the ready pipe
("ready": the new master serves, so this one hands systemd the new pid
and stops gracefully), the new master's exit (reaped by the master,
which calls ``new_master_exited``: the upgrade failed, say why and keep
serving), and a deadline (``upgrade.READY_TIMEOUT``: kill the new master,
the upgrade failed).

As the **new** master, ``await_old_master(pid)`` is called once all
workers are ready and the old master has been told: when the old master
has exited, this one takes the pid file and the control socket and sends
READY=1 (after the old master's MAINPID=, so systemd, which hears only
its main pid, hears it).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING

from forkserver import upgrade
from forkserver.errors import ForkserverError
from forkserver.eventloop import TimerHandle
from forkserver.upgrade import HandedListener, Upgrade

if TYPE_CHECKING:
    from forkserver.master import Master

log = logging.getLogger("forkserver.master")


class Upgrader:
    def __init__(self, master: Master) -> None:
        self.master = master
        self.new: Upgrade | None = None  # a newer master we started
        self.done = False  # the newer master took over: drain and exit
        self._problem: str | None = None
        self._timer: TimerHandle | None = None
        self._old_master_fd = -1

    # --- the old master's side ------------------------------------------------

    def start(self) -> None:
        """USR2: run a new master on the same listening sockets."""
        m = self.master
        if m.stopping or self.new is not None or m.handover is not None:
            why = ("the master is stopping" if m.stopping else
                   "an upgrade is already under way" if self.new is not None else
                   "the previous master has not exited yet")  # fmt: skip
            log.warning("USR2 ignored: %s", why, extra={"event": "upgrade_ignored"})
            return
        handed = [
            HandedListener(fd=listener.socket_descriptor(), name=listener.name,
                           inherited=index in m.inherited, path=listener.created_path)
            for index, listener in enumerate(m.listeners)
        ]  # fmt: skip
        try:
            new = upgrade.start_new_master(
                upgrade.new_master_argv(), handed, m.notifier.handover_environ()
            )
        except OSError as exc:
            log.error("upgrade failed, this master keeps serving: cannot start a new master: %s",
                      exc, extra={"event": "upgrade_failed"})  # fmt: skip
            return
        self.new, self._problem = new, None
        m.loop.add_reader(new.ready_fd, self._on_pipe)
        self._timer = m.loop.call_later(upgrade.READY_TIMEOUT, self._late)
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
            self.master.loop.remove_reader(new.ready_fd)
            os.close(new.ready_fd)
            new.ready_fd = -1

    def _handed_over(self, new: Upgrade) -> None:
        m = self.master
        if self._timer is not None:
            self._timer.cancel()
        self.done = True
        log.info("upgrade complete: new master (pid %d) serves; this one drains and exits",
                 new.pid, extra={"event": "upgrade_completed", "pid": os.getpid(),
                                 "new_pid": new.pid})  # fmt: skip
        m.notifier.main_pid(new.pid)  # NotifyAccess=main: only the main pid is heard
        for listener in m.listeners:
            listener.created_path = None  # the new master's to remove now
        m.stop()

    def _late(self) -> None:
        new = self.new
        if new is not None and not self.done:
            self._problem = f"was not ready within {upgrade.READY_TIMEOUT:g} s"
            os.kill(new.pid, signal.SIGKILL)  # its workers follow (parent-death signal)

    def is_new_master(self, pid: int) -> bool:
        return self.new is not None and self.new.pid == pid

    def new_master_exited(self, how: str) -> None:
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

    def await_old_master(self, old_pid: int) -> None:
        """The pid file and control socket are ours once the old master is gone."""
        try:
            self._old_master_fd = os.pidfd_open(old_pid)
        except ProcessLookupError:
            self._took_over(old_pid)
            return
        self.master.loop.add_reader(self._old_master_fd, lambda: self._took_over(old_pid))

    def _took_over(self, old_pid: int) -> None:
        m = self.master
        self._close_pidfd()
        m.handover = None
        try:
            m.claim_files()
        except ForkserverError as exc:
            log.error("after the upgrade: %s", exc, extra={"event": "takeover_failed"})
        m.notifier.ready(m.ready_status())
        log.info("the old master (pid %d) has exited: this master is in charge", old_pid,
                 extra={"event": "master_took_over", "pid": os.getpid(),
                        "old_pid": old_pid})  # fmt: skip

    def _close_pidfd(self) -> None:
        if self._old_master_fd >= 0:
            self.master.loop.remove_reader(self._old_master_fd)
            os.close(self._old_master_fd)
            self._old_master_fd = -1

    def close(self) -> None:
        """On the way out: let go of the pipe and the pidfd."""
        if self.new is not None:
            self._close_pipe(self.new)
        self._close_pidfd()
