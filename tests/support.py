"""Helpers shared by the multi-process tests: start a real daemon, wait on events.

``start_daemon(handler, *args)`` is a context manager that runs
``python -m forkserver run ... HANDLER`` in its own session, on a
listening socket the test bound to 127.0.0.1 port 0 and passes as
``--bind fd://N`` (so tests run in parallel without port races), with
JSON logs and a notify socket standing in for systemd.  While it runs, the test
process is a child subreaper, so workers that outlive their master are
reparented to it and reaped (PID 1 here does not reap).  It waits for
``READY=1`` (all workers ready) and yields a ``Daemon``.  On the way
out, whatever happened, the whole process group is killed and reaped,
and the test fails if any process of the daemon's session is left.

``Daemon`` offers:

* ``connect()``: a client socket to the daemon (``TIMEOUT`` on each call).
* ``wait_log(event, **fields)``: the first JSON log record with that
  ``event`` (and those field values), waiting for it if needed.
* ``workers()``: the live worker processes (``psutil``).
* ``wait_notify("STOPPING=1")``: the first notify datagram with a line
  containing that text (``since=N``: from the N-th on); a thread reads
  every datagram as it arrives, as systemd would.
* ``stop(signal)``: signal the master and wait for its exit code and for
  the end of its log (every record is in ``records()`` afterwards).

``extra_fds`` passes more of the test's descriptors; ``bind=False``
leaves out ``--bind`` (the test's config file names the listeners).

``wait_pid(pid, timeout)`` reaps a child of the test process itself.

Every wait has a timeout and wakes on the event itself (a datagram, a
log line, a pidfd), never on a sleep.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from tests.loadgen import BackgroundLoad, LoadResult

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0


def wait_pid(pid: int, timeout: float = TIMEOUT) -> int:
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


def wait_gone(pids: Sequence[int], timeout: float = TIMEOUT) -> None:
    """Wait until every one of *pids* (not necessarily our children) has exited.

    Each pid is watched through a pidfd, which becomes readable when the
    process exits; the test fails naming the survivors.
    """
    deadline = time.monotonic() + timeout
    alive = []
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(pidfd)
        if not ready:
            alive.append(pid)
    assert not alive, f"still running after {timeout} s: {alive}"


class LogReader(threading.Thread):
    """Collects the daemon's stderr lines; JSON records are parsed."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[str] = []
        self.records: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.eof = False

    def run(self) -> None:
        for raw in self.stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            record = None
            # A worker's raw stderr (a boot traceback) may share the line a record ends.
            start = 0 if line.startswith("{") else line.find('{"time": ')
            if start >= 0:
                with contextlib.suppress(ValueError):
                    record = json.loads(line[start:])
            with self.cond:
                self.lines.append(line)
                if isinstance(record, dict):
                    self.records.append(record)
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for record in self.records[seen:]:
                    if predicate(record):
                        return record
                seen = len(self.records)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.eof:
                    tail = "\n".join(self.lines[-30:])
                    raise AssertionError(f"no {what} in the log within {timeout} s:\n{tail}")
                self.cond.wait(remaining)

    def wait_eof(self, timeout: float) -> None:
        """Wait until every writer has closed the stream: then every line is in."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.eof, timeout):
                raise AssertionError(f"the log is still open after {timeout} s: "
                                     "a process writing to it is left")  # fmt: skip

    def text(self) -> str:
        with self.cond:
            return "\n".join(self.lines)


class NotifyReader(threading.Thread):
    """Reads every sd_notify datagram as it arrives, as systemd would.

    Reading at once matters: an unread datagram socket holds only a few
    messages (``net.unix.max_dgram_qlen``), and a full one would make the
    daemon wait on every notification.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.messages: list[str] = []
        self.cond = threading.Condition()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if ready:
                message = self.sock.recv(4096).decode("utf-8", "replace")
                with self.cond:
                    self.messages.append(message)
                    self.cond.notify_all()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=TIMEOUT)

    def wait_for(self, text: str, timeout: float, since: int = 0) -> str:
        """The first message from index *since* on with a line containing *text*."""
        deadline = time.monotonic() + timeout
        with self.cond:
            seen = since
            while True:
                for message in self.messages[seen:]:
                    if any(text in part for part in message.split("\n")):
                        return message
                seen = max(seen, len(self.messages))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {text!r} notification within {timeout} s: "
                                         f"{self.messages}")  # fmt: skip
                self.cond.wait(remaining)


class Daemon:
    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        listener: socket.socket,
        logs: LogReader,
        notify: socket.socket,
        notify_reader: NotifyReader | None = None,
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.listener = listener
        self.address = listener.getsockname()
        self.logs = logs
        self.notify = notify
        self.notify_reader = notify_reader or NotifyReader(notify)

    @property
    def notifications(self) -> list[str]:
        """Every notify datagram so far, oldest first."""
        with self.notify_reader.cond:
            return list(self.notify_reader.messages)

    def wait_notify(self, text: str, timeout: float = TIMEOUT, since: int = 0) -> str:
        """The first sd_notify datagram with a line containing *text*.

        With *since*, only datagrams from that index of ``notifications``
        on count: ``wait_notify("READY=1", since=len(daemon.notifications))``
        waits for the next one.
        """
        return self.notify_reader.wait_for(text, timeout, since)

    def connect(self, timeout: float = TIMEOUT) -> socket.socket:
        return socket.create_connection(self.address, timeout=timeout)

    def connect_together(self, count: int) -> list[socket.socket]:
        """*count* clients connected while the master is stopped (SIGSTOP).

        They wait in the kernel's queue, and the master's next accept
        batch meets them all: the way to fill its own queue, which takes
        arrivals only in the batch that found every worker busy.
        """
        master = psutil.Process(self.pid)
        master.suspend()
        clients: list[socket.socket] = []
        try:
            for _ in range(count):
                clients.append(self.connect())
        except BaseException:
            for sock in clients:
                sock.close()
            raise
        finally:
            master.resume()
        return clients

    def wait_log(self, event: str, timeout: float = TIMEOUT, **fields: object) -> dict[str, Any]:
        def match(record: dict[str, Any]) -> bool:
            return record.get("event") == event and all(
                record.get(k) == v for k, v in fields.items()
            )

        return self.logs.wait_for(match, timeout, f"{event!r} event with {fields}")

    def records(self, event: str) -> list[dict[str, Any]]:
        with self.logs.cond:
            return [r for r in self.logs.records if r.get("event") == event]

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.pid).children()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        """Signal the master; its exit code once it and every worker have closed the log.

        The master's exit does not mean its last lines were read: the log
        reader runs on its own thread.  After ``stop()``, ``records()``
        holds every line the daemon wrote.
        """
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout=timeout)
        self.logs.wait_eof(timeout)
        return code


def _session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session *sid*."""
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError, OSError):
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
    return members


def _wait_ready(reader: NotifyReader, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for READY=1 (or fail at once if the daemon exits first)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the daemon sent no READY=1 within {timeout} s")
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {proc.returncode} before READY=1")
        with contextlib.suppress(AssertionError):
            reader.wait_for("READY=1", min(remaining, 0.5))
            return


@contextlib.contextmanager
def start_daemon(
    handler: str,
    *args: str,
    workers: int = 2,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    cwd: Path | None = None,
    extra_fds: Sequence[int] = (),
    bind: bool = True,
    module: str = "forkserver",
) -> Iterator[Daemon]:
    """Run ``forkserver run --bind fd://N --workers W ARGS HANDLER``; see the module docstring.

    *module* is what ``python -m`` runs (a test's wrapper around ``forkserver.cli``).
    """
    scratch = tempfile.mkdtemp(prefix="fs-")  # short: a Unix socket path holds 107 bytes
    notify_path = os.path.join(scratch, "notify")
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    proc: subprocess.Popen[bytes] | None = None
    logs: LogReader | None = None
    reader: NotifyReader | None = None
    _set_subreaper(True)
    try:
        notify.bind(notify_path)
        full_env = {
            **os.environ,
            "NOTIFY_SOCKET": notify_path,
            "RUNTIME_DIRECTORY": scratch,  # its default control socket: its own
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **(env or {}),
        }
        fd = listener.fileno()
        binds = ["--bind", f"fd://{fd}"] if bind else []  # else the test's config file says
        command = [
            sys.executable, "-m", module, "run", *binds,
            "--workers", str(workers), "--log-format", "json", *args, handler,
        ]  # fmt: skip
        proc = subprocess.Popen(
            command,
            pass_fds=[fd, *extra_fds],
            env=full_env,
            cwd=cwd or ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        logs = LogReader(proc.stderr)
        logs.start()
        reader = NotifyReader(notify)
        reader.start()
        daemon = Daemon(proc, listener, logs, notify, reader)
        if wait_ready:
            _wait_ready(reader, proc, TIMEOUT)
        yield daemon
    finally:
        try:
            if proc is not None:
                _kill_session(proc)
        finally:
            if logs is not None:
                logs.join(timeout=TIMEOUT)
            if reader is not None:
                reader.stop()
            if proc is not None and proc.stderr is not None:
                proc.stderr.close()
            listener.close()
            notify.close()
            shutil.rmtree(scratch, ignore_errors=True)
            _set_subreaper(False)


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    sid = proc.pid
    members = _session_members(sid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)
    for pid in members:  # a worker may have left the group, never the session
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    wait_gone([pid for pid in members if pid != sid])
    _reap_orphans(sid)
    left = _session_members(sid)
    assert not left, f"processes of the daemon's session are left: {left}"


_PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> None:
    """Orphans of the daemon (workers outliving their master) become ours to reap."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _reap_orphans(sid: int) -> None:
    for child in psutil.Process().children():
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getsid(child.pid) == sid:
                wait_pid(child.pid, TIMEOUT)


def reload_under_load(daemon: Daemon, reloads: int) -> LoadResult:
    """Reload *reloads* times, one after another, while one-request connections flow.

    The load runs until the last reload has completed, however fast or
    slow the machine.  Each reload waits until the load has answered 50
    more connections, sends HUP, waits for its generation's
    ``reload_completed`` and then for every worker of the generation
    before to exit 0 (retired, it finished what it held).  After the last
    one, once the new generation has answered 50 more, the load is
    stopped (what is in flight finishes) and its result returned;
    ``BackgroundLoad.stop`` fails the test if a cap ended the load first.
    """
    daemon.wait_log("master_ready")  # every worker_spawned of the start is read
    with BackgroundLoad(*daemon.address, total=None, concurrency=16) as load:
        for generation in range(1, reloads + 1):
            serving = [r["pid"] for r in daemon.records("worker_spawned")
                       if r["generation"] == generation - 1]  # fmt: skip
            load.wait_answered(load.answered + 50)  # flowing when the reload begins
            daemon.proc.send_signal(signal.SIGHUP)
            outcome = daemon.logs.wait_for(
                lambda r, g=generation: (r.get("event") == "reload_completed"
                                         and r.get("generation") == g)
                or r.get("event") == "reload_failed",
                TIMEOUT, f"reload_completed of generation {generation}",
            )  # fmt: skip
            assert outcome["event"] == "reload_completed", f"reload {generation}: {outcome}"
            for pid in serving:
                exited = daemon.wait_log("worker_exited", pid=pid)
                assert exited["exit_code"] == 0, f"generation {generation - 1}: {exited}"
        load.wait_answered(load.answered + 50)  # the last generation serves it too
        return load.stop()


def recv_all(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (the socket's own timeout applies)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send *payload*, end the sending side, and return everything the peer answers."""
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    return recv_all(sock)


def read_line(sock: socket.socket) -> bytes:
    """One line, newline included (less at end of file)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def poll_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """For states that can only be polled: retry with a growing pause, then fail."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(pause)  # sleep-ok: bounded, backing-off poll of a state with no event
        pause = min(pause * 2, 0.05)


def channel_backlog(pid: int) -> int:
    """Bytes queued for process *pid* on its SEQPACKET sockets (``ss -x``)."""
    out = subprocess.run(
        ["ss", "-x", "-a", "-p"], capture_output=True, text=True, check=True, timeout=TIMEOUT
    ).stdout
    total = 0
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == "u_seq" and f"pid={pid}," in line:
            total += int(fields[2])
    return total
