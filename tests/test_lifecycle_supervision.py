"""Supervision limits and stops with real processes: timeout, recycling, EMFILE, TERM/INT."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from forkserver import control
from forkserver.workers.sync import PREFETCH as SYNC_PREFETCH
from tests.loadgen import BackgroundLoad, run_load
from tests.support import TIMEOUT, Daemon, poll_until, read_line, recv_all, start_daemon

ECHO = "forkserver.examples.echo:handle"
LIFE = "tests.handlers.lifecycle"


def wait_text(daemon: Daemon, text: str, timeout: float = TIMEOUT) -> None:
    """Wait for a raw (not JSON) line of the daemon's stderr containing *text*."""
    deadline = time.monotonic() + timeout
    with daemon.logs.cond:
        while not any(text in line for line in daemon.logs.lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or daemon.logs.eof:
                raise AssertionError(f"no {text!r} in the log within {timeout} s")
            daemon.logs.cond.wait(remaining)


def wait_successor(daemon: Daemon, slot: int, gone: int) -> int:
    """The pid of the next worker ready in *slot* that is not *gone*."""
    record = daemon.logs.wait_for(
        lambda r: (
            r.get("event") == "worker_ready" and r.get("slot") == slot and r.get("pid") != gone
        ),
        TIMEOUT,
        f"a successor of worker {gone} in slot {slot}",
    )
    return int(record["pid"])


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


# --- heartbeat timeout ------------------------------------------------------


def test_a_worker_stuck_in_its_handler_dumps_its_stack_then_is_killed_and_replaced() -> None:
    with start_daemon(f"{LIFE}:block_forever_in_the_handler", "--timeout", "1",
                      workers=1) as daemon:  # fmt: skip
        with daemon.connect() as sock:
            stuck = int(read_line(sock).split()[0])
            timeout = daemon.wait_log("worker_timeout", pid=stuck)
            assert "silent for" in timeout["reason"]
            exited = daemon.wait_log("worker_exited", pid=stuck)
            # ABRT kills it once the stack is written, else SIGKILL does KILL_GRACE later.
            assert exited["exit_code"] in (-signal.SIGABRT, -signal.SIGKILL)
        text = daemon.logs.text()
        assert "most recent call first" in text  # faulthandler's dump, in the log
        assert "in block_forever_in_the_handler" in text
        assert wait_successor(daemon, 0, stuck) != stuck


def test_abrt_to_a_worker_dumps_its_stack_and_it_is_replaced() -> None:
    with start_daemon("tests.handlers.basic:hold", workers=1) as daemon:
        with daemon.connect() as sock:
            worker = int(read_line(sock).split()[0])
            os.kill(worker, signal.SIGABRT)
            wait_text(daemon, "in hold")
            assert daemon.wait_log("worker_exited", pid=worker)["exit_code"] == -signal.SIGABRT
        successor = wait_successor(daemon, 0, worker)
        with daemon.connect() as sock:
            assert int(read_line(sock).split()[0]) == successor
            sock.sendall(b"x\n")
            assert recv_all(sock) == b"%d x\n" % successor
        assert daemon.stop() == 0


def test_term_to_a_worker_makes_it_finish_and_be_replaced() -> None:
    with start_daemon("tests.handlers.basic:hold", workers=1) as daemon:
        with daemon.connect() as sock:
            worker = int(read_line(sock).split()[0])
            os.kill(worker, signal.SIGTERM)
            sock.sendall(b"finish\n")
            assert recv_all(sock) == b"%d finish\n" % worker
        assert daemon.wait_log("worker_exited", pid=worker)["exit_code"] == 0
        wait_successor(daemon, 0, worker)


# --- max_requests -----------------------------------------------------------


def test_a_worker_that_served_max_requests_is_retired_and_replaced() -> None:
    with start_daemon("tests.handlers.basic:pid", "--max-requests", "5",
                      workers=1) as daemon:  # fmt: skip
        pids = []
        for _ in range(12):
            with daemon.connect() as sock:
                pids.append(int(recv_all(sock)))
        runs = [pids[0:5], pids[5:10], pids[10:12]]
        assert all(len(set(run)) == 1 for run in runs), pids
        assert len({run[0] for run in runs}) == 3, pids
        recycled = daemon.wait_log("worker_recycled", pid=pids[0])
        assert "max_requests" in recycled["message"]
        assert daemon.wait_log("worker_exited", pid=pids[0])["exit_code"] == 0


def test_jitter_gives_each_worker_its_own_limit() -> None:
    args = ("--max-requests", "1000", "--max-requests-jitter", "1000")
    with start_daemon(ECHO, *args, workers=4) as daemon:
        daemon.wait_log("master_ready")  # READY=1 may come before the log lines are read
        limits = [r["request_limit"] for r in daemon.records("worker_spawned")]
        assert len(limits) == 4
        assert all(1000 <= limit <= 2000 for limit in limits)
        assert len(set(limits)) > 1, limits


# --- max_memory -------------------------------------------------------------


@pytest.mark.parametrize("metric", ["rss", "uss"])
def test_a_worker_over_max_memory_is_replaced_without_losing_its_connection(metric: str) -> None:
    args = ("--max-memory", str(96 << 20), "--memory-metric", metric)
    with start_daemon(f"{LIFE}:hog", *args, workers=1) as daemon:
        with daemon.connect() as sock:
            sock.sendall(b"160\n")
            hog = int(read_line(sock).split()[0])
            recycled = daemon.wait_log("worker_recycled", pid=hog)
            assert f"{metric.upper()} " in recycled["message"]
            assert "over max_memory 96.0 MiB by" in recycled["message"]
            assert recycled["excess"] > 0
            replacement = wait_successor(daemon, 0, hog)  # ready while the hog still serves
            sock.sendall(b"done\n")
            assert recv_all(sock) == b"%d 160 done\n" % hog  # its in-flight connection
        assert daemon.wait_log("worker_exited", pid=hog)["exit_code"] == 0
        with daemon.connect() as sock:
            sock.sendall(b"0\n")
            assert int(read_line(sock).split()[0]) == replacement
            sock.sendall(b"x\n")
            assert recv_all(sock).endswith(b" x\n")


# --- EMFILE -------------------------------------------------------------------


def _lowest_free_fd(pid: int) -> int:
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(used) + 1)) - used)


def test_the_master_out_of_descriptors_pauses_accepting_and_serves_every_client() -> None:
    with start_daemon(ECHO, workers=2) as daemon:
        master = psutil.Process(daemon.pid)
        workers = daemon.workers()
        for worker in workers:
            worker.suspend()  # nothing is served while the master is out of descriptors
        soft, hard = master.rlimit(psutil.RLIMIT_NOFILE)
        try:
            # Not one number left: its next accept fails, whatever the batch.
            master.rlimit(psutil.RLIMIT_NOFILE, (_lowest_free_fd(daemon.pid), hard))
            host, port = daemon.address
            with BackgroundLoad(host, port, total=200, concurrency=200, deadline=60,
                                per_connection_timeout=30) as load:  # fmt: skip
                failed = daemon.wait_log("accept_failed")
                assert "many open files" in failed["message"], failed
                assert daemon.proc.poll() is None
                master.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))  # it backs off, then retries
                for worker in workers:
                    worker.resume()
                result = load.join()
        finally:
            master.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
            for worker in workers:
                if worker.is_running():
                    worker.resume()
        assert result.failures == [], result.failure_summary()
        assert result.answered == 200
        assert master.cpu_times().user < 30  # it backed off instead of spinning
        assert daemon.proc.poll() is None
        assert run_load(host, port, total=20).failures == []
        assert daemon.stop() == 0


# --- stopping -------------------------------------------------------------------


def test_term_leaves_an_inherited_listener_open_and_its_backlog_for_the_next_start() -> None:
    with start_daemon("tests.handlers.basic:hold", "--bind", "127.0.0.1:0",
                      "--graceful-timeout", "15", workers=1) as daemon:  # fmt: skip
        inherited = os.fstat(daemon.listener.fileno()).st_ino
        before = socket_inodes(daemon.pid)
        assert inherited in before
        with daemon.connect() as held:
            worker = int(read_line(held).split()[0])
            daemon.proc.send_signal(signal.SIGTERM)
            daemon.wait_log("master_stopping")
            daemon.wait_notify("STOPPING=1")
            extend = daemon.wait_notify("EXTEND_TIMEOUT_USEC=")
            assert int(extend.split("EXTEND_TIMEOUT_USEC=")[1].split("\n")[0]) > 0
            own = before - socket_inodes(daemon.pid)
            assert inherited in socket_inodes(daemon.pid)  # left open for its owner
            assert own, "the listener the master bound itself is still open"
            waiting = daemon.connect()  # lands in the inherited socket's backlog
            held.sendall(b"bye\n")
            assert recv_all(held) == b"%d bye\n" % worker
        assert daemon.proc.wait(timeout=TIMEOUT) == 0
        with waiting:
            conn, _ = daemon.listener.accept()  # still there for the next start
            conn.close()


def test_graceful_timeout_kills_workers_still_busy() -> None:
    with start_daemon("tests.handlers.basic:hold", "--graceful-timeout", "0.5",
                      workers=1) as daemon:  # fmt: skip
        with daemon.connect() as held:
            worker = int(read_line(held).split()[0])
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(timeout=TIMEOUT) == 0
        assert daemon.wait_log("worker_exited", pid=worker)["exit_code"] == -signal.SIGKILL


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT])
def test_a_fast_stop_drops_queued_connections_and_a_second_one_kills(
    signum: int, tmp_path: Path
) -> None:
    path = str(tmp_path / "ctl.sock")
    with start_daemon("tests.handlers.basic:hold", "--control-socket", path,
                      workers=1) as daemon:  # fmt: skip
        held = daemon.connect()
        queued = []
        try:
            worker = int(read_line(held).split()[0])
            queued = daemon.connect_together(SYNC_PREFETCH + 2)
            # PREFETCH wait on the busy worker's channel, two in the master.
            poll_until(lambda: control.request(path, "status")["master"]["pending"] == 2,
                       "the master holds the other queued connections")  # fmt: skip
            daemon.proc.send_signal(signum)
            daemon.wait_log("master_stopping")
            for sock in queued:  # dropped, never served
                with contextlib.suppress(ConnectionResetError):
                    assert recv_all(sock) == b""
            assert daemon.proc.poll() is None  # the held one is still being finished
            daemon.proc.send_signal(signum)
            assert daemon.proc.wait(timeout=TIMEOUT) == 0
        finally:
            held.close()
            for sock in queued:
                sock.close()
        assert daemon.wait_log("worker_exited", pid=worker)["exit_code"] == -signal.SIGKILL


def test_a_suspended_master_kills_no_healthy_worker_when_it_resumes() -> None:
    with start_daemon("tests.handlers.basic:pid", "--timeout", "1", workers=2) as daemon:
        workers = sorted(p.pid for p in daemon.workers())
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            # the master must stay suspended for several timeouts; there is nothing to wait on
            time.sleep(3.0)  # sleep-ok
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        for _ in range(10):  # the loop has resumed and checked the clocks many times over
            with daemon.connect() as sock:
                assert int(recv_all(sock)) in workers
        assert sorted(p.pid for p in daemon.workers()) == workers
        # The stop reads the log to its end: a worker killed after the resume would show.
        assert daemon.stop() == 0
        assert daemon.records("worker_timeout") == []
        exits = sorted((r["pid"], r["exit_code"]) for r in daemon.records("worker_exited"))
        assert exits == [(pid, 0) for pid in workers]
