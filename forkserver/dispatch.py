"""Getting each accepted descriptor to a worker, and never losing one.

``Dispatcher.dispatch(fd, listener)`` is the master's per-connection
path (each ``Listener``'s accept loop calls it).  It is hot, so it
works on raw descriptors and does no logging:

* The least-loaded ready worker with free capacity gets the descriptor:
  it goes into that worker's outbox and its credit is taken at once.
  One flush per loop pass sends every outbox, several descriptors per
  ``sendmsg`` (at most SCM_MAX_FD), then closes the master's copies.
* A worker with ``prefetch`` (sync) may get that many descriptors
  beyond its capacity when no worker has free capacity.  Each goes in a
  message of its own, and the worker reads one message at a time, so a
  prefetched descriptor stays on the channel (and comes back if the
  worker dies) until the worker is free to serve it.  A connection that
  holds its worker long must not hold the ones queued behind it: every
  ``STEAL_AFTER`` while descriptors are prefetched, the master takes
  back those still unread (receiving a SEQPACKET message is atomic:
  either the worker has it or the master does) from a worker that
  reported nothing done since the last look while another is ready,
  and from every worker when another is free and nothing is pending.
  A worker they were taken from for being stuck gets no more beyond
  its capacity until it reports DONE.
* No worker free: the descriptor waits in the pending queue.  From
  then until the queue is empty again, the listeners stop waking the
  loop for new arrivals (``Listener.wake_for_arrivals``): the master
  could only queue them, and each wake-up of a sleeping master costs a
  context switch here and a cross-CPU wake-up on the CPU the client's
  packets arrive on.  They wait in the kernel's queue, and the next
  accept batch, once the queue has drained, takes them in order.  The
  batch under way goes on filling the queue.  At ``max_pending`` every
  listener pauses accepting (the kernel backlog holds the rest) until
  the queue has drained.  Under a prefork master
  that is ordinary operation whenever every worker is busy, so it is
  logged at INFO, at most once per ``PAUSE_LOG_INTERVAL``.  What
  deserves a warning is a queue that does not move: accepting paused
  for ``STALL_AFTER`` seconds with no queued connection handed to a
  worker meanwhile (``accept_stalled``).
* A channel that cannot take more (``EAGAIN``) keeps its outbox and the
  flush resumes when it is writable; ``ETOOMANYREFS``/``ENOBUFS`` retry
  on a short timer, since writability does not signal their end.

No descriptor is lost when a worker dies: the master keeps its own copy
of the worker's end of each socketpair and reads it while the worker
lives only to take back a prefetched descriptor.  Once the worker is
reaped, ``remove_link`` returns the outbox and every descriptor still
queued on that end, and they go back to the front of the pending queue.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from forkserver import channel, fdpass
from forkserver.eventloop import EventLoop, TimerHandle
from forkserver.listeners import Listener
from forkserver.tallies import counts_by
from forkserver.worker_table import WorkerRecord, WorkerState, WorkerTable

log = logging.getLogger("forkserver.master")

#: Seconds before retrying a send that failed for lack of kernel resources.
RESOURCE_RETRY: Final = 0.05
_STOP: Final = channel.encode(channel.Stop())
_REOPEN: Final = channel.encode(channel.Reopen())
#: Seconds a worker stays free before prefetched descriptors move to it.
STEAL_AFTER: Final = 0.05
#: At most one ``accept_paused`` line per this many seconds.
PAUSE_LOG_INTERVAL: Final = 10.0
#: Paused this long with no queued connection handed to a worker: a warning.
STALL_AFTER: Final = 10.0
_RESOURCE_ERRNOS: Final = frozenset({errno.ETOOMANYREFS, errno.ENOBUFS, errno.ENOMEM})


@dataclass(eq=False)
class WorkerLink:
    """The master's side of one worker's channel."""

    record: WorkerRecord
    sock: socket.socket  # the master's end: sends descriptors, reads reports
    peer: socket.socket  # the worker's end, kept to take back undelivered descriptors
    out_fds: list[int] = field(default_factory=list)
    out_listeners: list[int] = field(default_factory=list)
    stop_queued: bool = False
    reopen_fd: int = -1  # a log file to send with REOPEN (ours to close), or -1
    #: ``record.served`` when the steal check last saw descriptors prefetched
    #: to it, or -1: unchanged at the next check means it is stuck.
    served_mark: int = -1
    writer_armed: bool = False
    retry_armed: bool = False


class Dispatcher:
    def __init__(
        self,
        loop: EventLoop,
        table: WorkerTable,
        max_pending: int,
        on_broken: Callable[[WorkerLink, str], None],
    ) -> None:
        self.loop = loop
        self.table = table
        self.max_pending = max_pending
        self.on_broken = on_broken
        self.links: dict[int, WorkerLink] = {}
        self.pending: deque[tuple[int, int]] = deque()
        self.listeners: list[Listener] = []
        self.paused = False
        #: The queue holds what no worker can take yet: the listeners do not wake
        #: the loop for new arrivals until it is empty (``_hold_arrivals``).
        self.arrivals_held = False
        self._flush_scheduled = False
        self._steal_timer: TimerHandle | None = None
        self._pause_logged_at: float | None = None
        self._pauses_unlogged = 0  # pauses since the last warning
        self._pause_logged = False  # so is its end, "accepting resumed"
        self._stall_timer: TimerHandle | None = None
        self._stall_mark = 0  # the table's assignments when the stall check was armed
        #: By listener, over the master's life (not on the per-connection path):
        #: descriptors taken back from a worker to be dispatched again, and
        #: accepted ones closed unserved.  ``pauses``: times accepting paused.
        self.taken_back: dict[int, int] = {}
        self.dropped: dict[int, int] = {}
        self.pauses = 0

    # --- the hot path ------------------------------------------------------

    def dispatch(self, fd: int, listener: int) -> None:
        """Take ownership of the accepted descriptor *fd*."""
        pending = self.pending
        if not pending:  # nobody waits ahead of it
            record = self.table.take()
            if record is not None:  # into its outbox, already counted to it
                if record.in_flight > record.capacity and self._steal_timer is None:
                    self._steal_timer = self.loop.call_later(STEAL_AFTER, self._steal)
                link = self.links[record.pid]
                link.out_fds.append(fd)
                link.out_listeners.append(listener)
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    self.loop.call_soon(self.flush)
                return
            self._hold_arrivals(True)  # the first to wait: no worker can take another
        pending.append((fd, listener))
        if len(pending) >= self.max_pending and not self.paused:
            self._pause()

    def drain_pending(self) -> None:
        """Give queued descriptors to workers that have capacity now."""
        pending = self.pending
        if pending:
            # One table call for all of them, and what ``dispatch`` does per
            # descriptor once per run to one worker: the hot path after a DONE.
            links, popleft = self.links, pending.popleft
            prefetched = False
            for record, run in self.table.take_runs(len(pending)):
                link = links[record.pid]
                out_fds, out_listeners = link.out_fds, link.out_listeners
                for _ in range(run):
                    fd, listener = popleft()
                    out_fds.append(fd)
                    out_listeners.append(listener)
                prefetched = prefetched or record.in_flight > record.capacity
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    self.loop.call_soon(self.flush)
            if prefetched and self._steal_timer is None:
                self._steal_timer = self.loop.call_later(STEAL_AFTER, self._steal)
        if not pending and self.arrivals_held:
            self._hold_arrivals(False)
        if self.paused and not pending:
            self._resume()
        if not pending and self._steal_timer is None and self._prefetch_waits():
            self._steal_timer = self.loop.call_later(STEAL_AFTER, self._steal)

    # --- prefetched descriptors back to a free worker ---------------------

    def _prefetch_waits(self) -> bool:
        """Is a descriptor prefetched while some worker has free capacity?"""
        prefetched = free = False
        for link in self.links.values():
            record = link.record
            if record.in_flight > record.capacity:
                prefetched = True
            elif record.in_flight < record.capacity and record.state is WorkerState.READY:
                free = True
        return prefetched and free

    def _steal(self) -> None:
        """Take back what waits behind a stuck worker, or while another is free.

        A worker is stuck when it has descriptors prefetched and reported
        nothing done since the last look.  What waits behind it goes back
        to the master's queue only while another ready worker is not
        stuck: with every one stuck the queue would serve them no sooner,
        and the master would hold their descriptors meanwhile.
        """
        self._steal_timer = None
        free = not self.pending and self._prefetch_waits()
        ready = WorkerState.READY
        stuck: set[int] = set()
        serving = 0  # ready workers not stuck: somewhere else to serve them
        for pid, link in self.links.items():
            record = link.record
            if record.in_flight > record.capacity and link.served_mark == record.served:
                stuck.add(pid)
            elif record.state is ready:
                serving += 1
        taken: list[tuple[int, int]] = []
        still_prefetched = False
        for pid, link in tuple(self.links.items()):
            record = link.record
            if record.in_flight <= record.capacity:
                link.served_mark = -1
                continue
            # Nothing done since the last look: what waits behind it is better
            # off in the master's queue, for whichever worker frees up first.
            behind_stuck = serving > 0 and pid in stuck
            if free or behind_stuck:
                taken += self._take_back(link)
                if behind_stuck:
                    self.table.hold_back(record)  # no more queued behind it until DONE
            link.served_mark = record.served
            still_prefetched = still_prefetched or record.in_flight > record.capacity
        if still_prefetched:
            self._steal_timer = self.loop.call_later(STEAL_AFTER, self._steal)
        if taken:
            self.requeue(taken)
            self.drain_pending()

    def _take_back(self, link: WorkerLink) -> list[tuple[int, int]]:
        """The prefetched descriptors still unread on a live worker's channel, oldest first.

        A stopping worker's STOP may come first: it is sent again, and is
        still the last message on the channel (a stopping worker is sent
        no more connections).  A REOPEN met on the way is sent again once
        the rest are taken.
        """
        record = link.record
        if record.killed or link.stop_queued:
            return []  # being killed, or its STOP is not on the channel yet
        taken: list[tuple[int, int]] = []
        reopen = -1
        lost = 0
        while len(taken) + lost < record.in_flight - record.capacity:
            try:
                data, fds = fdpass.recv(
                    link.peer, channel.MAX_MESSAGE_SIZE, fdpass.SCM_MAX_FD, nonblocking=True
                )
            except BlockingIOError:
                break  # the worker has the rest
            except fdpass.FdPassError as exc:
                # Closed: most likely the master is out of descriptor numbers and
                # the kernel could not install it.  Its credit goes with it, and
                # the rest stay with the worker, which has the numbers to serve them.
                lost += 1  # a prefetching worker is sent one descriptor per message
                log.warning(
                    "a connection queued for worker %d (pid %d) was lost taking it back: %s",
                    record.slot, record.pid, exc,
                    extra={"event": "take_back_lost", "slot": record.slot, "pid": record.pid,
                           "error": str(exc)},
                )  # fmt: skip
                break
            if data == _STOP and not fds:
                self.queue_stop(link)
                break
            if data == _REOPEN and len(fds) == 1:
                if reopen >= 0:
                    fdpass.close_all((reopen,))  # only the newest file counts
                reopen = fds[0]
                continue
            taken += _undelivered(data, fds)
        if reopen >= 0:
            self.queue_reopen(link, reopen)  # behind what is queued now, as good
        if taken or lost:
            self.table.unassign(record, len(taken) + lost)
        return taken

    def take_back_queued(self, link: WorkerLink) -> list[tuple[int, int]]:
        """Every descriptor a live worker that reads its channel no more was sent.

        For a worker that said LEAVING: it never receives again, so
        what is queued on its channel, and what is still in its outbox,
        is taken back now (its credit with it) instead of when it is
        reaped, which may be long after: it finishes its connections
        first.
        """
        taken: list[tuple[int, int]] = []
        for data, fds in fdpass.drain(link.peer, channel.MAX_MESSAGE_SIZE, fdpass.SCM_MAX_FD):
            taken.extend(_undelivered(data, fds))
        taken.extend(zip(link.out_fds, link.out_listeners, strict=True))
        link.out_fds.clear()
        link.out_listeners.clear()
        if taken:
            self.table.unassign(link.record, len(taken))
        return taken

    def requeue(self, items: Sequence[tuple[int, int]]) -> None:
        """Descriptors taken back from a worker go first in line."""
        counts_by(items, self.taken_back)
        self.pending.extendleft(reversed(items))
        if self.pending and not self.arrivals_held:
            self._hold_arrivals(True)
        if len(self.pending) >= self.max_pending and not self.paused:
            self._pause()

    # --- sending -----------------------------------------------------------

    def flush(self) -> None:
        self._flush_scheduled = False
        sent: list[int] = []  # the master's copies, closed together at the end
        for link in tuple(self.links.values()):
            if link.out_fds or link.stop_queued:
                self._flush_link(link, sent)
        fdpass.close_many(sent)

    def _flush_link(self, link: WorkerLink, sent: list[int] | None = None) -> None:
        """Send the outbox, then REOPEN, then STOP, as far as the channel takes them.

        The master's copies of what went out are closed, or added to
        *sent* for the caller to close.
        """
        if link.retry_armed:
            return
        out_fds = link.out_fds
        if out_fds:
            done = [] if sent is None else sent
            if link.record.prefetch:
                # A prefetched descriptor must stay on the channel until the
                # worker is free, so a worker that prefetches gets one per message.
                self._send_each(link, done)
            while out_fds and not link.record.prefetch:
                count = min(len(out_fds), fdpass.SCM_MAX_FD)
                fds = out_fds[:count]
                data = channel.encode_connections(link.out_listeners[:count])
                if not self._send(link, data, fds):
                    break
                del out_fds[:count]
                del link.out_listeners[:count]
                done += fds
            if sent is None:
                fdpass.close_many(done)
            if out_fds:
                return  # the channel is full, or broken: the rest waits
        if link.reopen_fd >= 0:
            if not self._send(link, _REOPEN, (link.reopen_fd,)):
                return
            fdpass.close_all((link.reopen_fd,))
            link.reopen_fd = -1
        if link.stop_queued:
            if not self._send(link, channel.encode(channel.Stop()), ()):
                return
            link.stop_queued = False
        if link.writer_armed:
            self.loop.remove_writer(link.sock)
            link.writer_armed = False

    def _send_each(self, link: WorkerLink, done: list[int]) -> None:
        """The outbox one descriptor per message, as far as the channel takes it.

        What went out moves to *done*.  The hot path of sync workers: one
        ``fdpass.send_each`` for the whole outbox, not a call per message.
        """
        out_fds, listeners = link.out_fds, link.out_listeners
        encoded = channel.ONE_CONNECTION_BYTES
        messages: Iterable[bytes]
        if max(listeners) < len(encoded):  # every message cached: looked up in C
            messages = map(encoded.__getitem__, listeners)
        else:
            messages = [channel.encode_connections((index,)) for index in listeners]
        count, error = fdpass.send_each(link.sock, messages, out_fds)
        if error is not None:
            self._send_failed(link, error)
        elif count < len(out_fds):
            self._wait_writable(link)
        if count:
            done += out_fds[:count]
            del out_fds[:count]
            del listeners[:count]

    def _send(self, link: WorkerLink, data: bytes, fds: Sequence[int]) -> bool:
        try:
            if fdpass.send(link.sock, data, fds):
                return True
        except OSError as exc:
            self._send_failed(link, exc)
            return False
        self._wait_writable(link)
        return False

    def _send_failed(self, link: WorkerLink, exc: OSError) -> None:
        """A send raised: out of kernel resources (retry soon), or a broken channel."""
        if exc.errno not in _RESOURCE_ERRNOS:
            self.on_broken(link, f"sending on its channel failed: {exc.strerror or exc}")
            return
        link.retry_armed = True
        self.loop.call_later(RESOURCE_RETRY, lambda: self._retry(link))

    def _wait_writable(self, link: WorkerLink) -> None:
        """The channel is full: flush again once it can take more."""
        if not link.writer_armed:
            link.writer_armed = True
            self.loop.add_writer(link.sock, lambda: self._flush_link(link))

    def _retry(self, link: WorkerLink) -> None:
        link.retry_armed = False
        if self.links.get(link.record.pid) is link:
            self._flush_link(link)

    def queue_stop(self, link: WorkerLink) -> None:
        """Send STOP after everything already in the worker's outbox."""
        link.stop_queued = True
        self._flush_link(link)

    def queue_reopen(self, link: WorkerLink, log_fd: int) -> None:
        """Send REOPEN with *log_fd* (now ours) after the worker's outbox, before a STOP.

        A REOPEN not sent yet is replaced: only the newest file counts.
        """
        if link.reopen_fd >= 0:
            fdpass.close_all((link.reopen_fd,))
        link.reopen_fd = log_fd
        self._flush_link(link)

    # --- workers coming and going --------------------------------------

    def add_link(self, link: WorkerLink) -> None:
        self.links[link.record.pid] = link

    def remove_link(self, pid: int) -> list[tuple[int, int]]:
        """Forget a reaped worker; every descriptor it never received."""
        link = self.links.pop(pid)
        if link.writer_armed:
            self.loop.remove_writer(link.sock)
        reclaimed: list[tuple[int, int]] = []
        # Oldest first: what was sent but never received, then what was never sent.
        for data, fds in fdpass.drain(link.peer, channel.MAX_MESSAGE_SIZE, fdpass.SCM_MAX_FD):
            reclaimed.extend(_undelivered(data, fds))
        reclaimed.extend(zip(link.out_fds, link.out_listeners, strict=True))
        link.out_fds.clear()
        link.out_listeners.clear()
        if link.reopen_fd >= 0:
            fdpass.close_all((link.reopen_fd,))
            link.reopen_fd = -1
        link.sock.close()
        link.peer.close()
        return reclaimed

    # --- accepting on and off --------------------------------------------

    def _pause(self) -> None:
        self.paused = True
        self.pauses += 1
        for listener in self.listeners:
            listener.pause_accepting()
        if self._stall_timer is None:
            self._stall_mark = self.table.assignments
            self._stall_timer = self.loop.call_later(STALL_AFTER, self._check_stall)
        now = self.loop.time()
        last = self._pause_logged_at
        self._pause_logged = last is None or now - last >= PAUSE_LOG_INTERVAL
        if not self._pause_logged:
            self._pauses_unlogged += 1
            return
        since = ""
        if last is not None:
            since = f" ({self._pauses_unlogged} more in the last {now - last:.0f} s)"
        log.info(
            "%d connections wait for a free worker: accepting paused, the kernel backlog "
            "holds the rest%s",
            len(self.pending), since,
            extra={"event": "accept_paused", "pending": len(self.pending),
                   "unlogged": self._pauses_unlogged},
        )  # fmt: skip
        self._pause_logged_at = now
        self._pauses_unlogged = 0

    def _check_stall(self) -> None:
        """Still paused, and nothing queued went to a worker since the last check?"""
        self._stall_timer = None
        if not self.paused:
            return
        if self.table.assignments == self._stall_mark:
            busy = sum(1 for record in self.table if record.in_flight)
            log.warning(
                "accepting paused for %g s and no queued connection reached a worker: "
                "%d workers hold connections and none finished one; %d queued",
                STALL_AFTER, busy, len(self.pending),
                extra={"event": "accept_stalled", "pending": len(self.pending),
                       "busy": busy, "seconds": STALL_AFTER},
            )  # fmt: skip
        self._stall_mark = self.table.assignments
        self._stall_timer = self.loop.call_later(STALL_AFTER, self._check_stall)

    def _hold_arrivals(self, hold: bool) -> None:
        """Whether the listeners leave new arrivals in the kernel's queue (*hold*).

        Held exactly while the queue is not empty: it becomes so only in
        ``dispatch`` and ``requeue``, and empty only in ``drain_pending``
        and ``close_pending``, which release it.  A worker that gets room
        while connections wait always leads to ``drain_pending``.
        """
        self.arrivals_held = hold
        for listener in self.listeners:
            listener.wake_for_arrivals(not hold)

    def _resume(self) -> None:
        self.paused = False
        for listener in self.listeners:
            listener.resume_accepting()
        if self._pause_logged:
            log.info("accepting resumed", extra={"event": "accept_resumed"})

    def close_pending(self) -> int:
        """Close what no worker is serving yet, prefetched ones too; how many.

        For a fast stop and at exit: a prefetched descriptor would be
        served only after the connection ahead of it, so it is taken
        back from the worker's channel and dropped with the rest.
        """
        for link in tuple(self.links.values()):
            if link.record.in_flight > link.record.capacity:
                taken = self._take_back(link)
                counts_by(taken, self.taken_back)
                self.pending.extend(taken)
        count = len(self.pending)
        counts_by(self.pending, self.dropped)
        while self.pending:
            fd, _ = self.pending.popleft()
            os.close(fd)
        if self.arrivals_held:
            self._hold_arrivals(False)
        return count


def _undelivered(data: bytes, fds: list[int]) -> list[tuple[int, int]]:
    """The descriptors of one message the master itself queued."""
    try:
        message = channel.decode_master_message(data)
    except channel.ProtocolError:
        message = None
    if isinstance(message, channel.Connections) and len(message.listeners) == len(fds):
        return list(zip(fds, message.listeners, strict=True))
    fdpass.close_all(fds)
    return []
