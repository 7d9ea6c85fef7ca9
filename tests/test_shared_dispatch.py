"""``dispatch = "shared"`` with real processes: workers accept on the listener themselves."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.loadgen import BackgroundLoad, run_load
from tests.support import read_line, recv_all, reload_under_load, start_daemon

ECHO = "forkserver.examples.echo:handle"


@pytest.mark.parametrize(
    ("worker_class", "handler", "concurrency"),
    [
        ("sync", "tests.handlers.basic:hold", 1),
        ("thread", "tests.handlers.basic:hold", 2),
        ("asyncio", "tests.handlers.basic:async_hold", 2),
    ],
)
def test_each_worker_accepts_up_to_its_capacity_and_no_more(
    worker_class: str, handler: str, concurrency: int
) -> None:
    """2 workers x concurrency held connections: each worker holds exactly its share.

    A worker at capacity stops watching the listener, so the rest can
    only go to the other worker; each answers once it is released.
    """
    args = ("--dispatch", "shared", "--worker-class", worker_class,
            "--concurrency", str(concurrency))  # fmt: skip
    with start_daemon(handler, *args, workers=2) as daemon, contextlib.ExitStack() as stack:
        held = []
        for _ in range(2 * concurrency):
            conn = stack.enter_context(daemon.connect())
            held.append((conn, int(read_line(conn).split()[0])))
        by_worker = Counter(pid for _, pid in held)
        assert set(by_worker.values()) == {concurrency}, by_worker
        assert set(by_worker) == {p.pid for p in daemon.workers()}
        for i, (conn, pid) in enumerate(held):
            conn.sendall(b"go %d\n" % i)
            assert recv_all(conn) == b"%d go %d\n" % (pid, i)
        assert daemon.stop() == 0


@pytest.mark.parametrize("worker_class", ["sync", "thread", "asyncio"])
def test_a_shared_listener_serves_many_connections(worker_class: str) -> None:
    handler = "forkserver.examples.async_echo:handle" if worker_class == "asyncio" else ECHO
    args = ("--dispatch", "shared", "--worker-class", worker_class)
    with start_daemon(handler, *args, workers=2) as daemon:
        result = run_load(*daemon.address, total=600, concurrency=16, deadline=60)
        assert result.failures == [], result.failure_summary()
        assert result.answered == 600
        assert daemon.stop() == 0


def test_served_counts_reach_the_master_without_touching_its_credit() -> None:
    """max_requests recycles shared-listener workers: SERVED is counted as served."""
    with start_daemon(ECHO, "--dispatch", "shared", "--max-requests", "40", workers=2) as daemon:
        first = {p.pid for p in daemon.workers()}
        result = run_load(*daemon.address, total=400, concurrency=8, deadline=60)
        assert result.failures == [], result.failure_summary()
        record = daemon.wait_log("worker_recycled", limit="max_requests")
        assert record["pid"] in first
        # A DONE the master never handed out would be a protocol error: none.
        assert daemon.records("protocol_error") == []
        assert daemon.stop() == 0


@pytest.fixture
def two_listeners(tmp_path: Path) -> Iterator[tuple[socket.socket, socket.socket, Path]]:
    dispatched = socket.create_server(("127.0.0.1", 0), backlog=256)
    shared = socket.create_server(("127.0.0.1", 0), backlog=256)
    path = tmp_path / "forkserver.toml"
    path.write_text(
        f'[[listeners]]\nbind = "fd://{dispatched.fileno()}"\nname = "dispatched"\n\n'
        f'[[listeners]]\nbind = "fd://{shared.fileno()}"\nname = "shared"\n'
        'dispatch = "shared"\n'
    )
    with dispatched, shared:
        yield dispatched, shared, path


def ask_fds(address: tuple[str, int]) -> dict[str, object]:
    with socket.create_connection(address, timeout=5) as conn:
        report: dict[str, object] = json.loads(recv_all(conn))
    return report


def test_master_and_shared_listeners_side_by_side(
    two_listeners: tuple[socket.socket, socket.socket, Path],
) -> None:
    dispatched, shared, config = two_listeners
    fds = [dispatched.fileno(), shared.fileno()]
    with start_daemon(ECHO, "-c", str(config), extra_fds=fds, bind=False) as daemon:
        with BackgroundLoad(*dispatched.getsockname(), total=300, concurrency=8,
                            deadline=60) as other:  # fmt: skip
            result = run_load(*shared.getsockname(), total=300, concurrency=8, deadline=60)
            other_result = other.join()
        assert result.failures == [], result.failure_summary()
        assert other_result.failures == [], other_result.failure_summary()
        assert result.answered == other_result.answered == 300
        assert daemon.stop() == 0


def test_workers_hold_the_shared_listener_and_nothing_else_unexpected(
    two_listeners: tuple[socket.socket, socket.socket, Path],
) -> None:
    dispatched, shared, config = two_listeners
    fds = [dispatched.fileno(), shared.fileno()]
    inode = {sock: f"socket:[{os.fstat(sock.fileno()).st_ino}]" for sock in (dispatched, shared)}
    with start_daemon("tests.handlers.basic:fds", "-c", str(config), extra_fds=fds,
                      bind=False) as daemon:  # fmt: skip
        reports = [ask_fds(sock.getsockname()) for sock in (dispatched, shared)]
        assert daemon.stop() == 0
    for report in reports:
        table = dict(report["fds"])  # type: ignore[call-overload]
        assert str(table.pop(str(report["me"]))).startswith("socket:")  # being served
        for fd in ("0", "1", "2"):
            table.pop(fd)
        sockets = sorted(str(t) for t in table.values() if str(t).startswith("socket:"))
        assert len(sockets) == 2, table  # its channel and the shared listener
        assert inode[shared] in sockets
        assert inode[dispatched] not in sockets  # the master accepts there
        others = [str(t) for t in table.values() if not str(t).startswith("socket:")]
        assert all(t.startswith(("pipe:", "anon_inode:[eventpoll]")) for t in others), table
        assert len(others) <= 4, table  # the loop's epoll and wake-up pipe, the stack-dump pipe


def test_the_shared_listener_stays_non_blocking_and_close_on_exec(
    two_listeners: tuple[socket.socket, socket.socket, Path],
) -> None:
    dispatched, shared, config = two_listeners
    fds = [dispatched.fileno(), shared.fileno()]
    inode = f"socket:[{os.fstat(shared.fileno()).st_ino}]"
    with start_daemon(ECHO, "-c", str(config), extra_fds=fds, bind=False) as daemon:
        for worker in daemon.workers():
            held = [name for name in os.listdir(f"/proc/{worker.pid}/fd")
                    if _readlink(f"/proc/{worker.pid}/fd/{name}") == inode]  # fmt: skip
            assert len(held) == 1, held
            flags = _fdinfo_flags(worker.pid, held[0])
            assert flags & os.O_NONBLOCK
            assert flags & 0o2000000  # O_CLOEXEC as /proc shows it
        assert daemon.stop() == 0


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _fdinfo_flags(pid: int, fd: str) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError(f"no flags in /proc/{pid}/fdinfo/{fd}")


def test_reload_under_load_on_a_shared_listener_loses_nothing() -> None:
    reloads = 5
    with start_daemon(ECHO, "--dispatch", "shared", workers=2) as daemon:
        before = {p.pid for p in daemon.workers()}
        result = reload_under_load(daemon, reloads)
        assert result.failures == [], result.failure_summary()
        assert result.answered == result.attempted
        completed = [r["generation"] for r in daemon.records("reload_completed")]
        assert completed == list(range(1, reloads + 1))
        assert daemon.records("reload_failed") == []
        assert not before & {p.pid for p in daemon.workers()}
        assert daemon.stop() == 0


def test_a_graceful_stop_lets_shared_workers_finish_what_they_hold() -> None:
    with start_daemon("tests.handlers.basic:hold", "--dispatch", "shared", workers=1) as daemon:
        with daemon.connect() as conn:
            pid = int(read_line(conn).split()[0])
            daemon.proc.send_signal(signal.SIGTERM)
            daemon.wait_log("master_stopping")
            conn.sendall(b"bye\n")
            assert recv_all(conn) == b"%d bye\n" % pid
        assert daemon.proc.wait(timeout=20) == 0


@pytest.mark.parametrize(
    ("worker_class", "handler"),
    [("thread", "tests.handlers.basic:hold"), ("asyncio", "tests.handlers.basic:async_hold")],
)
def test_a_worker_out_of_descriptors_backs_off_instead_of_spinning(
    worker_class: str, handler: str
) -> None:
    """EMFILE on a shared listener: the worker pauses watching it, then serves the rest.

    The listener stays readable while the worker cannot accept, so a
    worker that kept watching it would burn a CPU until descriptors free up.
    """
    args = ("--dispatch", "shared", "--worker-class", worker_class, "--concurrency", "32")
    with start_daemon(handler, *args, workers=1) as daemon, contextlib.ExitStack() as stack:
        (worker,) = daemon.workers()
        _, hard = worker.rlimit(psutil.RLIMIT_NOFILE)
        # New descriptors take the lowest free numbers: below the limit,
        # the holes left by closing the master's descriptors, plus 2.
        in_use = {int(fd) for fd in os.listdir(f"/proc/{worker.pid}/fd")}
        limit = max(in_use) + 3
        free = limit - len(in_use)
        worker.rlimit(psutil.RLIMIT_NOFILE, (limit, hard))
        clients = [stack.enter_context(daemon.connect()) for _ in range(free + 3)]
        held = [c for c in clients[:free] if read_line(c).endswith(b" held\n")]
        assert len(held) == free
        waiting = clients[free]
        before = sum(worker.cpu_times()[:2])
        # The observation window is a wait that must time out: nobody is served.
        ready, _, _ = select.select([waiting], [], [], 1.0)
        spent = sum(worker.cpu_times()[:2]) - before
        assert ready == [], "a connection was served beyond the descriptor limit"
        assert spent < 0.3, f"the worker spun on EMFILE: {spent:.2f} s of CPU in 1 s"
        worker.rlimit(psutil.RLIMIT_NOFILE, (hard, hard))
        for index, conn in enumerate(clients):
            if conn not in held:
                assert read_line(conn).endswith(b" held\n")
            conn.sendall(b"go %d\n" % index)
            assert recv_all(conn).endswith(b" go %d\n" % index)
        assert daemon.stop() == 0
