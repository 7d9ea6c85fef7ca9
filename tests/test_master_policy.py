"""The master's policy (start, stop, reload, crash back-off, health), with no process.

The whole master runs here on a real loop, with real channels
(SEQPACKET socketpairs) and its real ``Pool``, except that ``_fork``
makes no process: each "worker" is the far end of its socketpair, which
the test speaks for (READY, DONE, LEAVING) and reads (CONNECTIONS, STOP).
``FakeProcesses`` records every signal instead of sending it and hands
out the exits the test scripts, so the pids are never real.  The reload
check is scripted the same way.  What the real processes do is
tested elsewhere (tests/test_lifecycle_*.py); this is the policy alone.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import setproctitle

from forkserver import channel, fdpass
from forkserver.config import Settings
from forkserver.eventloop import EventLoop
from forkserver.handler import HandlerKind, LoadedHandler
from forkserver.health import Health
from forkserver.lifecycle import Phase
from forkserver.master import Master
from forkserver.pool import KILL_GRACE, Pool, Processes, WorkerSpec
from forkserver.probe import Checked, CheckFailed, ChildProcesses
from forkserver.systemd import Notifier
from forkserver.worker_table import WorkerRecord, WorkerState
from forkserver.workers.sync import PREFETCH as SYNC_PREFETCH

TIMEOUT = 10.0  # seconds any scripted wait may take; never a pause


class FakeProcesses(Processes):
    """Signals recorded, exits scripted: no pid here is a real process."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []
        self.exits: list[tuple[int, int]] = []

    def signal(self, pid: int, signum: int) -> None:
        self.sent.append((pid, signum))

    def wait(self, pid: int) -> None:
        pass

    def reap(self) -> Iterator[tuple[int, int]]:
        exits, self.exits = self.exits, []
        yield from exits

    def signals_to(self, pid: int) -> list[int]:
        return [signum for target, signum in self.sent if target == pid]


class ScriptedPool(Pool):
    """The real pool, but a worker is the far end of its channel, not a process."""

    next_pid = 40000

    def _fork(self, slot: int, spec: WorkerSpec, worker_end: socket.socket,
              master_end: socket.socket) -> int:  # fmt: skip
        ScriptedPool.next_pid += 1
        return ScriptedPool.next_pid


class ScriptedCheck:
    """A reload check that the test concludes (``probe.ReloadCheck``'s interface)."""

    made: ClassVar[list[ScriptedCheck]] = []

    def __init__(self, loop: EventLoop, reload_settings: Callable[[], Settings], *,
                 preloaded: LoadedHandler | None, timeout: float,
                 done: Callable[[Checked | CheckFailed], None],
                 processes: ChildProcesses) -> None:  # fmt: skip
        self.reload_settings = reload_settings
        self.done = done
        self.pid: int | None = None
        ScriptedCheck.made.append(self)

    def start(self) -> None:
        self.pid = 39999

    def owns(self, pid: int) -> bool:
        return pid == self.pid

    def child_exited(self, code: int) -> None:
        self.pid = None

    def close(self) -> None:
        self.pid = None

    def passes(self) -> None:
        self.done(Checked(self.reload_settings(), HandlerKind.FUNCTION))

    def fails(self, reason: str) -> None:
        self.done(CheckFailed(reason, reason))


class Harness:
    def __init__(self, master: Master, processes: FakeProcesses) -> None:
        self.master = master
        self.pool = master.pool
        self.processes = processes

    # --- driving the loop -------------------------------------------------------

    def until(self, condition: Callable[[], bool], what: str) -> None:
        """Run loop passes until *condition* holds; fail after ``TIMEOUT`` s."""
        deadline = self.master.loop.time() + TIMEOUT
        while not condition():
            if self.master.loop.time() > deadline:
                raise AssertionError(f"not within {TIMEOUT} s: {what}")
            self.master.step(0.01)

    def settle(self) -> None:
        """Passes until nothing more is due now (facts read, channels drained)."""
        for _ in range(5):
            self.master.step(0)

    # --- speaking for the workers ---------------------------------------------------

    def records(self, generation: int | None = None) -> list[WorkerRecord]:
        return sorted((r for r in self.pool.table
                       if generation is None or r.generation == generation),
                      key=lambda r: r.slot)  # fmt: skip

    def end(self, record: WorkerRecord) -> socket.socket:
        return self.pool.dispatcher.links[record.pid].peer

    def say(self, record: WorkerRecord, message: channel.WorkerMessage) -> None:
        self.end(record).send(channel.encode(message))

    def ready(self, *records: WorkerRecord) -> None:
        for record in records:
            self.say(record, channel.Ready(pid=record.pid))
        self.until(lambda: all(r.state is WorkerState.READY for r in records), "workers ready")

    def heard(self, record: WorkerRecord) -> list[channel.MasterMessage]:
        """Every message the master sent this worker so far (read off its end)."""
        messages = []
        end = self.end(record)
        while True:
            try:  # (socket.recv_fds ignores its flags before 3.12: it would block)
                data, fds = fdpass.recv(end, channel.MAX_MESSAGE_SIZE, fdpass.SCM_MAX_FD,
                                        nonblocking=True)  # fmt: skip
            except BlockingIOError:
                return messages
            fdpass.close_all(fds)
            messages.append(channel.decode_master_message(data))

    def exits(self, record: WorkerRecord, code: int = 0) -> None:
        """The worker exits with *code*: SIGCHLD, as the pool sees it."""
        self.processes.exits.append((record.pid, code))
        self.pool.reap()
        self.settle()


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[tuple[Master, EventLoop]] = []
    title = setproctitle.getproctitle()  # the master sets its own: this process's, here

    def build(**changes: Any) -> Harness:
        settings = dataclasses.replace(
            Settings(), handler="tests.handlers.basic:echo",
            control_socket=str(tmp_path / f"ctl{len(made)}.sock"), **changes,
        )  # fmt: skip
        loop = EventLoop()
        processes = FakeProcesses()
        master = Master(settings, loop, [], notifier=Notifier(None), handler=None,
                        worker_class="sync", pool_class=ScriptedPool,
                        processes=processes)  # fmt: skip
        master.reloader.start_check = ScriptedCheck
        made.append((master, loop))
        assert master.start() is None
        return Harness(master, processes)

    yield build
    for master, loop in made:
        master.close()
        loop.close()
    setproctitle.setproctitle(title)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


# --- start ---------------------------------------------------------------------------


def test_the_master_serves_once_every_configured_worker_is_ready(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "forkserver")
    h = make(workers=3)
    assert [r.slot for r in h.records()] == [0, 1, 2]
    first, second, third = h.records()
    h.ready(first, second)
    h.settle()
    assert h.master.lifecycle.phase is Phase.STARTING
    h.ready(third)
    h.settle()
    assert h.master.lifecycle.phase is Phase.SERVING
    assert len(events(caplog, "master_ready")) == 1
    assert h.master.snapshot().control()["master"]["state"] == "running"


# --- worker deaths --------------------------------------------------------------------


def test_an_unasked_death_is_a_crash_and_its_slot_waits_its_back_off(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "forkserver")
    h = make(workers=2)
    zero, one = h.records()
    h.ready(zero, one)
    h.exits(one, code=1)  # within CRASH_WINDOW of its start: a crash
    (backoff,) = events(caplog, "worker_backoff")
    assert (backoff.slot, backoff.crashes) == (1, 1)  # type: ignore[attr-defined]
    assert [r.slot for r in h.records()] == [0]  # not yet: its back-off runs
    assert h.master.snapshot().state == "degraded"
    h.until(lambda: len(h.records()) == 2, "slot 1 forked again after its back-off")
    successor = h.records()[1]
    assert successor.slot == 1 and successor.pid != one.pid
    h.ready(successor)
    h.settle()
    assert h.master.snapshot().state == "running"
    assert events(caplog, "master_recovered")


def test_a_retired_worker_is_replaced_at_once_and_its_exit_is_planned(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "forkserver")
    h = make(workers=1)
    (worker,) = h.records()
    h.ready(worker)
    h.say(worker, channel.Leaving(reason="out of descriptors"))
    h.settle()
    assert worker.retired and worker.exit_cause == "leaving"
    successor = [r for r in h.records() if r is not worker]
    assert [r.slot for r in successor] == [0]  # started before the first one exits
    assert channel.Stop() in h.heard(worker)
    h.exits(worker)
    assert events(caplog, "worker_backoff") == []
    assert h.pool.backoff.failing() == {}


def test_a_protocol_violation_kills_the_worker_and_it_is_replaced_when_reaped(
    make: Callable[..., Harness],
) -> None:
    h = make(workers=1)
    (worker,) = h.records()
    h.ready(worker)
    h.say(worker, channel.Done(count=1))  # it holds nothing: a lie
    h.settle()
    assert worker.killed and worker.exit_cause == "protocol_error"
    assert h.processes.signals_to(worker.pid) == [signal.SIGKILL]
    assert h.records() == [worker]  # its slot is held until it is reaped
    h.exits(worker, code=-9)
    h.until(lambda: len(h.records()) == 1 and h.records()[0] is not worker, "a successor")


def test_a_done_that_carries_a_descriptor_is_a_protocol_violation(
    make: Callable[..., Harness],
) -> None:
    """The master reads a DONE without decoding it: still never one with descriptors."""
    h = make(workers=1)
    (worker,) = h.records()
    h.ready(worker)
    ours, theirs = socket.socketpair()
    theirs.close()
    h.pool.dispatcher.dispatch(ours.detach(), 0)
    h.settle()
    assert worker.in_flight == 1  # so DONE(1) is no lie by its count
    extra, other = socket.socketpair()
    with extra, other:
        assert fdpass.send(h.end(worker), channel.encode(channel.Done(count=1)), [extra.fileno()])
        h.settle()
    assert worker.killed and worker.exit_cause == "protocol_error"
    assert worker.in_flight == 1 and worker.served == 0


# --- scaling ---------------------------------------------------------------------------


def test_scaling_down_retires_the_highest_slots_without_successors(
    make: Callable[..., Harness],
) -> None:
    h = make(workers=3)
    workers = h.records()
    h.ready(*workers)
    h.master.scale_to(1)
    h.settle()
    assert [r.retired for r in workers] == [False, True, True]
    assert all(r.exit_cause == "scale-down" for r in workers[1:])
    for record in workers[1:]:
        assert channel.Stop() in h.heard(record)
        h.exits(record)
    assert h.records() == workers[:1]
    h.master.scale_to(2)
    h.settle()
    assert [r.slot for r in h.records()] == [0, 1]


# --- stopping --------------------------------------------------------------------------


def test_a_graceful_stop_sends_stop_to_each_worker_and_finishes_when_all_have_exited(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "forkserver")
    h = make(workers=2)
    workers = h.records()
    h.ready(*workers)
    h.master.stop()
    h.settle()
    assert h.master.lifecycle.phase is Phase.DRAINING
    for record in workers:
        assert record.exit_cause == "stop" and not record.retired
        assert channel.Stop() in h.heard(record)
    h.exits(workers[0])
    assert h.records() == workers[1:]  # a worker that goes during a stop is not replaced
    assert not h.master.lifecycle.done
    h.exits(workers[1])
    assert h.master.lifecycle.done
    exited = events(caplog, "worker_exited")
    assert [r.planned for r in exited] == [True, True]  # type: ignore[attr-defined]
    assert h.processes.sent == []  # nobody was signalled


def test_a_second_fast_stop_kills_every_worker(make: Callable[..., Harness]) -> None:
    h = make(workers=2)
    workers = h.records()
    h.ready(*workers)
    h.master.stop_fast()
    h.settle()
    assert h.master.lifecycle.phase is Phase.HALTING
    assert all(channel.Stop() in h.heard(r) for r in workers)
    assert h.processes.sent == []
    h.master.stop_fast()
    h.settle()
    assert h.master.lifecycle.phase is Phase.KILLING
    assert sorted(h.processes.sent) == sorted((r.pid, signal.SIGKILL) for r in workers)
    for record in workers:
        h.exits(record, code=-9)
    assert h.master.lifecycle.done


def test_a_drain_replaces_a_dead_worker_while_accepted_connections_wait_for_one(
    make: Callable[..., Harness],
) -> None:
    h = make(workers=1)
    (worker,) = h.records()
    h.ready(worker)
    # One it takes (sync: capacity 1), PREFETCH prefetched on its channel,
    # and one more for which there is no room: it waits in the queue.
    room = 1 + SYNC_PREFETCH
    for _ in range(room + 1):
        ours, theirs = socket.socketpair()
        theirs.close()
        h.pool.dispatcher.dispatch(ours.detach(), 0)
    h.settle()
    assert len(h.pool.dispatcher.pending) == 1
    h.master.stop()
    h.settle()
    assert worker.state is WorkerState.READY  # no STOP while a connection still waits
    h.exits(worker, code=1)  # dies before it read them: they go back to the queue
    assert len(h.pool.dispatcher.pending) == room + 1
    h.until(lambda: len(h.records()) == 1, "a successor for the queued connections")
    (successor,) = h.records()
    assert successor is not worker
    h.ready(successor)
    h.settle()
    assert successor.in_flight == room  # the queue drained into it (one held, the rest prefetched)
    assert len(h.heard(successor)) == room  # it receives them
    h.say(successor, channel.Done(count=1))
    h.settle()
    assert not h.pool.dispatcher.pending and successor.in_flight == room  # the last one too
    h.until(lambda: successor.state is WorkerState.STOPPING, "STOP once nothing is queued")
    heard = h.heard(successor)
    assert isinstance(heard[0], channel.Connections) and heard[-1] == channel.Stop()
    h.say(successor, channel.Done(count=room))
    h.settle()
    h.exits(successor)
    assert h.master.lifecycle.done


def test_a_stop_past_graceful_timeout_kills_what_is_left(make: Callable[..., Harness]) -> None:
    h = make(workers=1, graceful_timeout=0.05)
    (worker,) = h.records()
    h.ready(worker)
    h.master.stop()
    h.until(lambda: h.master.lifecycle.phase is Phase.KILLING, "graceful_timeout")
    assert h.processes.signals_to(worker.pid) == [signal.SIGKILL]


# --- reloading -------------------------------------------------------------------------


def test_a_reload_commits_once_the_whole_new_generation_is_ready(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "forkserver")
    h = make(workers=2)
    old = h.records()
    h.ready(*old)
    reply = h.master.reloader.control_reload()
    check = ScriptedCheck.made[-1]
    assert h.master.snapshot().state == "reloading"
    check.passes()
    h.settle()
    new = h.records(generation=1)
    assert [r.slot for r in new] == [0, 1]
    h.ready(new[0])
    h.settle()
    assert not any(r.retired for r in old)  # not until the whole generation is ready
    h.ready(new[1])
    h.settle()
    assert h.master.reloader.generations.serving == 1
    assert all(r.retired and r.exit_cause == "reload" for r in old)
    assert all(channel.Stop() in h.heard(r) for r in old)
    assert reply.reply == {"ok": True, "result": {"generation": 1}}
    for record in old:
        h.exits(record)
    assert h.records() == new  # the old generation is not replaced
    assert [r.generation for r in events(caplog, "reload_completed")] == [1]  # type: ignore[attr-defined]


def test_a_reload_whose_new_worker_dies_before_ready_is_abandoned_untouched(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "forkserver")
    h = make(workers=2, max_requests=0)
    old = h.records()
    h.ready(*old)
    before = h.pool.settings
    h.master.reloader.reload_settings = lambda: dataclasses.replace(
        before, workers=3, max_requests=7, max_pending_connections=99)
    h.master.reloader.reload()
    ScriptedCheck.made[-1].passes()
    h.settle()
    assert h.pool.target == 3 and h.pool.settings.max_requests == 7
    assert h.pool.dispatcher.max_pending == 99
    new = h.records(generation=1)
    h.exits(new[0], code=3)
    (failed,) = events(caplog, "reload_failed")
    assert "before it was ready" in failed.reason  # type: ignore[attr-defined]
    assert h.pool.target == 2 and h.pool.settings is before  # as it was
    assert h.pool.dispatcher.max_pending == before.max_pending_connections
    assert all(r.retired for r in new[1:])
    assert not any(r.retired for r in old)
    assert events(caplog, "worker_backoff") == []  # the new generation's death is no crash
    for record in new[1:]:
        h.exits(record)
    assert h.records() == old


def test_a_failed_check_changes_nothing_and_reloads_asked_meanwhile_merge(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "forkserver")
    h = make(workers=1)
    (worker,) = h.records()
    h.ready(worker)
    ScriptedCheck.made.clear()
    h.master.reloader.reload()
    h.master.reloader.reload()  # during the check: queued
    h.master.reloader.reload()  # merged with the one before
    assert len(ScriptedCheck.made) == 1
    ScriptedCheck.made[0].fails("the handler does not import")
    h.settle()
    assert h.master.reloader.last_error == "the handler does not import"
    assert h.records() == [worker] and not worker.retired
    assert len(ScriptedCheck.made) == 2  # the merged reload began after the failure
    assert len(events(caplog, "reload_queued")) == 2


def test_no_reload_begins_while_stopping(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "forkserver")
    h = make(workers=1)
    h.ready(*h.records())
    ScriptedCheck.made.clear()
    h.master.stop()
    h.master.reloader.reload()
    assert ScriptedCheck.made == []
    assert events(caplog, "reload_ignored")


# --- health ----------------------------------------------------------------------------


def test_a_silent_worker_is_aborted_then_killed_and_a_stalled_master_restarts_clocks(
    make: Callable[..., Harness],
) -> None:
    h = make(workers=2, timeout=4.0)
    quiet, talkative = h.records()
    h.ready(quiet, talkative)
    health = Health(h.master.loop, h.pool, h.master.lifecycle)
    base = h.master.loop.time()
    h.say(talkative, channel.Heartbeat())  # a heartbeat on the channel is a sign of life
    h.until(lambda: talkative.last_seen > quiet.last_seen, "the heartbeat read")
    health.check_heartbeats(base)  # the first check: nobody has been silent long
    # A check far too late: the master itself stalled, so nobody is judged.
    health.check_heartbeats(base + 60.0)
    assert h.processes.sent == []
    assert quiet.last_seen == talkative.last_seen == base + 60.0
    for step in range(1, 12):  # on time now: a check every timeout / 4
        now = base + 60.0 + step * 0.5
        h.pool.table.seen(talkative.pid, now)
        health.check_heartbeats(now)
    assert h.processes.signals_to(quiet.pid) == [signal.SIGABRT]
    assert quiet.killed and quiet.exit_cause == "timeout"
    assert h.processes.signals_to(talkative.pid) == []
    h.until(lambda: signal.SIGKILL in h.processes.signals_to(quiet.pid),
            f"SIGKILL {KILL_GRACE} s after the stack dump")  # fmt: skip


def test_a_worker_over_max_memory_is_recycled_and_replaced(
    make: Callable[..., Harness],
) -> None:
    h = make(workers=2, max_memory=1000)
    small, big = h.records()
    h.ready(small, big)
    sizes = {small.pid: 900, big.pid: 5000}
    health = Health(h.master.loop, h.pool, h.master.lifecycle,
                    sample=lambda pid, metric: sizes.get(pid))  # fmt: skip
    health.check_memory()
    h.settle()
    assert not small.retired
    assert big.retired and big.exit_cause == "max_memory"
    assert [r.slot for r in h.records() if not r.retired] == [0, 1]  # its successor


# --- the error boundary ------------------------------------------------------------------


def test_an_exception_in_the_reconciliation_is_logged_and_the_next_pass_finishes_it(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, "forkserver")
    h = make(workers=2)
    zero, one = h.records()
    h.ready(zero, one)
    broken = [True]
    commit = h.master.reloader.commit_if_ready

    def commit_once_broken() -> int | None:
        if broken.pop() if broken else False:
            raise RuntimeError("a bug in one pass")
        return commit()

    monkeypatch.setattr(h.master.reloader, "commit_if_ready", commit_once_broken)
    h.exits(one, code=0)  # this pass raises before it replaces the worker
    (error,) = events(caplog, "master_error")
    assert error.callback == "Master._reconcile"  # type: ignore[attr-defined]
    h.until(lambda: len(h.records()) == 2, "the next pass forks the successor")
    assert not h.master.lifecycle.done


def test_a_stop_with_drain_delay_departs_first_still_serving_then_drains(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "forkserver")
    h = make(workers=2, drain_delay=2.0)  # far longer than the successor's back-off
    workers = h.records()
    h.ready(*workers)
    h.master.stop()
    h.settle()
    assert h.master.lifecycle.phase is Phase.DEPARTING
    assert h.master.snapshot().draining and h.master.snapshot().accepting
    draining = events(caplog, "master_draining")
    assert [r.drain_delay for r in draining] == [2.0]  # type: ignore[attr-defined]
    assert events(caplog, "master_stopping") == []
    assert all(channel.Stop() not in h.heard(r) for r in workers)
    h.exits(workers[0], code=1)  # a worker lost meanwhile is replaced: it still serves
    h.until(lambda: len(h.records()) == 2, "a successor for the lost worker")
    h.master.stop()  # another graceful stop changes nothing
    h.settle()
    assert h.master.lifecycle.phase is Phase.DEPARTING
    h.until(lambda: h.master.lifecycle.phase is Phase.DRAINING, "the drain_delay to end")
    assert len(events(caplog, "master_stopping")) == 1
