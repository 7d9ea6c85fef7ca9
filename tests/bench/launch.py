"""Start a server under test on loopback, wait until it answers, stop and reap it.

The benchmark binds the listening socket itself (port 0) and hands the
descriptor to the server, so no port is ever raced and every server
gets the same backlog. Each server runs in its own session; stopping it
signals the whole process group, waits for the root, and then checks
that nothing is left in the group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench import procstat, scrape

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORK = HERE / ".work"
#: gunicorn, matplotlib and py-spy: third-party code kept out of the source
#: tree (a cache, like the container root of the systemd tests).
BENCH_VENV = Path(os.environ.get("FORKSERVER_BENCH_VENV", "/var/tmp/forkserver-bench/venv"))
BACKLOG = 2048
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


# Where forkserver's code comes from: None for the working tree, or a
# directory holding a snapshot of a commit (see snapshot_forkserver).
SOURCE: Path | None = None
#: Snapshots of other commits, by the revision a server name asks for
#: (``fs-sync-inline@REV``: see ``split`` and ``add_revision``).
REVISIONS: dict[str, Path] = {}


def _extract(rev: str, dest: Path) -> str:
    """``forkserver/`` at *rev*, extracted into *dest*; the commit it names."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit,
                              "forkserver"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def snapshot_forkserver(rev: str = "HEAD") -> str:
    """Measure a commit, not a working tree that others may be editing mid-run.

    Extracts ``forkserver/`` at *rev* into the bench's scratch space and
    makes every server start from there; returns the commit measured.
    """
    global SOURCE
    snap = WORK / "snapshot"
    commit = _extract(rev, snap)
    SOURCE = snap
    return commit


def split(name: str) -> tuple[str, str | None]:
    """A server name and the revision it asks for: ``fs-sync@abc123`` -> (fs-sync, abc123).

    A name with ``@REV`` runs that server from a snapshot of *REV*, so one
    interleaved run can put two revisions side by side (a change's before
    and after); a plain name runs the code ``--forkserver-from`` chose.
    """
    base, _, rev = name.partition("@")
    return base, rev or None


def add_revision(rev: str) -> str:
    """Snapshot *rev* for the ``NAME@REV`` servers; the commit it names."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in rev)
    dest = WORK / f"snapshot-{safe}"
    commit = _extract(rev, dest)
    REVISIONS[rev] = dest
    return commit


def source_of(name: str) -> Path | None:
    """Where server *name*'s forkserver comes from (None: the working tree)."""
    _, rev = split(name)
    return SOURCE if rev is None else REVISIONS[rev]


def builder_of(name: str) -> tuple[Builder, str]:
    """``SERVERS`` entry of *name*, whatever revision it asks for."""
    return SERVERS[split(name)[0]]


def project_python() -> str:
    """The interpreter that has forkserver installed: the project's venv."""
    env = os.environ.get("BENCH_PROJECT_PYTHON")
    if env:
        return env
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


@dataclass(frozen=True)
class Launch:
    """How to start one server: its argv and environment, given the listening fd."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stop_signal: int = signal.SIGTERM
    scrape: Path | None = None  # metrics_bind's Unix socket, to scrape while it runs


Builder = Callable[[int, int, int, Path], Launch]  # (fd, port, workers, scratch dir)


def shared_accept(mode: str, *extra: str) -> Builder:
    def build(fd: int, port: int, workers: int, scratch: Path) -> Launch:
        return Launch([project_python(), "-m", "tests.bench.servers.shared_accept",
                       "--fd", str(fd), "--workers", str(workers), "--mode", mode, *extra])
    return build


def fd_passing(mode: str) -> Builder:
    def build(fd: int, port: int, workers: int, scratch: Path) -> Launch:
        return Launch([project_python(), "-m", "tests.bench.servers.fd_passing",
                       "--fd", str(fd), "--workers", str(workers), "--mode", mode])
    return build


def gunicorn(fd: int, port: int, workers: int, scratch: Path) -> Launch:
    return Launch([str(BENCH_VENV / "bin" / "gunicorn"), "--bind", f"fd://{fd}",
                   "--workers", str(workers), "--worker-class", "sync",
                   "--chdir", str(HERE / "servers"), "--log-level", "warning",
                   "wsgi_app:app"])


def nginx(fd: int, port: int, workers: int, scratch: Path) -> Launch:
    template = (HERE / "servers" / "nginx.conf.in").read_text()
    conf = scratch / "nginx.conf"
    conf.write_text(template.format(port=port, workers=workers, work=scratch))
    # QUIT is nginx's graceful stop; the NGINX variable passes the socket.
    return Launch(["nginx", "-p", str(scratch), "-c", str(conf)],
                  env={"NGINX": f"{fd};"}, stop_signal=signal.SIGQUIT)


def forkserver(worker_class: str, handler: str, *extra: str) -> Builder:
    def build(fd: int, port: int, workers: int, scratch: Path) -> Launch:
        return Launch([project_python(), "-m", "forkserver", "run", "--bind", f"fd://{fd}",
                       "--workers", str(workers), "--worker-class", worker_class,
                       *extra, handler])
    return build


def scraped(worker_class: str, handler: str, *extra: str) -> Builder:
    """forkserver with ``metrics_bind`` on a Unix socket, scraped once a second."""
    def build(fd: int, port: int, workers: int, scratch: Path) -> Launch:
        where = scratch / "metrics.sock"
        with contextlib.suppress(FileNotFoundError):
            where.unlink()  # a previous run's
        launch = forkserver(worker_class, handler, *extra, "--metrics-bind",
                            f"unix:{where}")(fd, port, workers, scratch)  # fmt: skip
        return dataclasses.replace(launch, scrape=where)
    return build


HELLO = "forkserver.examples.hello_http:handle"
# Thread and asyncio workers default to 16 connections each; 2 x 16 would
# leave 18 of wrk's 50 keep-alive clients unserved, where every other
# server here serves them all.
ROOMY = ("--concurrency", "64")
HELLO_ASYNC = "forkserver.examples.hello_http:async_handle"
HELLO_PROTOCOL = "forkserver.examples.hello_http:HelloProtocol"
SHARED = ("--dispatch", "shared")
UVLOOP = ("--event-loop", "uvloop")
FAIR = "tests.bench.handlers:handle"
FAIR_ASYNC = "tests.bench.handlers:async_handle"
FAIR_PROTOCOL = "tests.bench.handlers:WorkerProtocol"

# name -> (builder, what it needs installed)
SERVERS: dict[str, tuple[Builder, str]] = {
    "shared-blocking": (shared_accept("blocking"), "python"),
    # The same prefork, running forkserver's own example handler: what
    # fs-sync does, less the dispatch (see report.SAME_HANDLER).
    "shared-blocking-hello": (shared_accept("blocking", "--handler", HELLO), "forkserver"),
    "shared-epoll": (shared_accept("epoll"), "python"),
    # The bare mechanism of master dispatch, answering as shared-blocking does:
    # forkserver's floor (see report.FD_PASSING).
    "fdpass-rr": (fd_passing("round-robin"), "python"),
    "fdpass-least": (fd_passing("least-loaded"), "python"),
    # The floor again, under another name: run beside it, the two measure
    # how far apart one run puts a server and itself (report.CONTROL).
    "fdpass-least-again": (fd_passing("least-loaded"), "python"),
    "gunicorn-sync": (gunicorn, "gunicorn"),
    "nginx": (nginx, "nginx"),
    "fs-sync": (forkserver("sync", HELLO), "forkserver"),
    # fs-sync with metrics_bind set and scraped once a second (scrape.py).
    "fs-sync-metrics": (scraped("sync", HELLO), "forkserver"),
    "fs-thread": (forkserver("thread", HELLO, *ROOMY), "forkserver"),
    "fs-asyncio": (forkserver("asyncio", HELLO_ASYNC, *ROOMY), "forkserver"),
    "fs-asyncio-protocol": (forkserver("asyncio", HELLO_PROTOCOL, *ROOMY),
                            "forkserver-protocol"),
    # event_loop = "uvloop": the same handlers on uvloop.
    "fs-asyncio-uvloop": (forkserver("asyncio", HELLO_ASYNC, *ROOMY, *UVLOOP), "forkserver-uvloop"),
    "fs-asyncio-protocol-uvloop": (forkserver("asyncio", HELLO_PROTOCOL, *ROOMY, *UVLOOP),
                                   "forkserver-uvloop"),
    # dispatch = "shared": the workers accept themselves, the master only supervises.
    "fs-sync-shared": (forkserver("sync", HELLO, *SHARED), "forkserver"),
    "fs-asyncio-shared": (forkserver("asyncio", HELLO_ASYNC, *ROOMY, *SHARED), "forkserver"),
    # The baselines' inline responder as a handler (tests/bench/handlers.py):
    # against fdpass-least, what forkserver adds to the mechanism.
    "fs-sync-inline": (forkserver("sync", FAIR), "forkserver"),
    "fs-thread-inline": (forkserver("thread", FAIR, *ROOMY), "forkserver"),
    "fs-asyncio-inline": (forkserver("asyncio", FAIR_ASYNC, *ROOMY), "forkserver"),
    # defer_accept = 1 (TCP_DEFER_ACCEPT): the kernel hands over a connection
    # only once its request has arrived.
    "fs-sync-inline-defer": (forkserver("sync", FAIR, "--defer-accept", "1"), "forkserver"),
    # The master's own queue (max_pending_connections, 30 by default) at its
    # least and much deeper: what queueing in the master rather than the
    # kernel backlog costs per connection.
    "fs-sync-inline-queue1": (forkserver("sync", FAIR, "--max-pending-connections", "1"),
                              "forkserver"),
    "fs-sync-inline-queue200": (forkserver("sync", FAIR, "--max-pending-connections", "200"),
                                "forkserver"),
}

# The same servers with the bench's own handlers, which name the worker.
FAIRNESS_SERVERS: dict[str, tuple[Builder, str]] = {
    "shared-blocking": SERVERS["shared-blocking"],
    "shared-blocking-hello": (shared_accept("blocking", "--handler", FAIR), "python"),
    "shared-epoll": SERVERS["shared-epoll"],
    "fdpass-rr": SERVERS["fdpass-rr"],
    "fdpass-least": SERVERS["fdpass-least"],
    "gunicorn-sync": SERVERS["gunicorn-sync"],
    "nginx": SERVERS["nginx"],
    "fs-sync": (forkserver("sync", FAIR), "forkserver"),
    "fs-thread": (forkserver("thread", FAIR, *ROOMY), "forkserver"),
    "fs-asyncio": (forkserver("asyncio", FAIR_ASYNC, *ROOMY), "forkserver"),
    "fs-asyncio-protocol": (forkserver("asyncio", FAIR_PROTOCOL, *ROOMY), "forkserver-protocol"),
    "fs-asyncio-uvloop": (forkserver("asyncio", FAIR_ASYNC, *ROOMY, *UVLOOP), "forkserver-uvloop"),
    "fs-asyncio-protocol-uvloop": (forkserver("asyncio", FAIR_PROTOCOL, *ROOMY, *UVLOOP),
                                   "forkserver-uvloop"),
    "fs-sync-shared": (forkserver("sync", FAIR, *SHARED), "forkserver"),
    "fs-asyncio-shared": (forkserver("asyncio", FAIR_ASYNC, *ROOMY, *SHARED), "forkserver"),
    "fs-sync-inline": SERVERS["fs-sync-inline"],
    "fs-thread-inline": SERVERS["fs-thread-inline"],
    "fs-asyncio-inline": SERVERS["fs-asyncio-inline"],
}


class ServerFailed(RuntimeError):
    """A server did not come up, or did not go away cleanly."""


def http_get(port: int, timeout: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
            if len(data) > 65536:
                break
        return data


def http_ok(port: int, timeout: float) -> bool:
    reply = http_get(port, timeout)
    return reply.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))


class Server:
    """A running server; use as a context manager so it is always reaped."""

    def __init__(self, name: str, builder: Builder, *, workers: int = 2,
                 cpu: int | None = None, env: dict[str, str] | None = None,
                 source: Path | None = None) -> None:
        """*source*: a snapshot to run forkserver from (default: ``source_of(name)``)."""
        self.name = name
        source = source_of(name) if source is None else source
        self.workers = workers
        self.scratch = WORK / "run" / name.replace("@", "-at-")
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.listener.bind(("127.0.0.1", 0))
            self.listener.listen(BACKLOG)
            self.port: int = self.listener.getsockname()[1]
            fd = self.listener.fileno()
            self.launch = builder(fd, self.port, workers, self.scratch)
            argv = self.launch.argv if cpu is None else ["taskset", "-c", str(cpu),
                                                         *self.launch.argv]
            self.log = (self.scratch / "server.log").open("wb")
            self.started = time.monotonic()
            # With a snapshot, ``-m forkserver`` finds it first (the working
            # directory leads sys.path) and the bench's own modules come from ROOT.
            source_env = {} if source is None else {"PYTHONPATH": f"{source}:{ROOT}"}
            self.proc = subprocess.Popen(
                argv, pass_fds=[fd],
                env={**os.environ, **source_env, **self.launch.env, **(env or {})},
                cwd=ROOT if source is None else source, stdin=subprocess.DEVNULL,
                stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            self.listener.close()
            raise
        # The server has its copy; ours would keep the port open after it dies.
        self.listener.close()
        self.start_to_ready: float | None = None
        self.scraper: scrape.Scraper | None = None  # from ready on, if launch.scrape

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = READY_TIMEOUT,
                   probe: Callable[[int, float], bool] | None = None) -> float:
        """Seconds from start until the first good answer; a bounded, backing-off poll.

        The listening socket exists before the server does, so a connection
        alone proves nothing: readiness is an answer (HTTP 200, or what
        ``probe`` accepts).
        """
        probe = probe or http_ok
        deadline = time.monotonic() + timeout
        delay = 0.005
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.name} exited {self.proc.returncode} before it was "
                                   f"ready; log: {self.log_tail()}")
            try:
                if probe(self.port, max(0.01, min(2.0, deadline - time.monotonic()))):
                    self.start_to_ready = time.monotonic() - self.started
                    if self.launch.scrape is not None and self.scraper is None:
                        self.scraper = scrape.Scraper(self.launch.scrape)
                        self.scraper.start()
                    return self.start_to_ready
                last = ServerFailed("the readiness probe got a wrong answer")
            except OSError as exc:
                last = exc
            time.sleep(delay)  # sleep-ok: bounded back-off between readiness probes
            delay = min(delay * 2, 0.2)
        raise ServerFailed(f"{self.name} not ready after {timeout}s ({last}); "
                           f"log: {self.log_tail()}")

    def log_tail(self, limit: int | None = 2000) -> str:
        """The end of the server's output (all of it with ``limit=None``)."""
        if not self.log.closed:
            self.log.flush()
        text = (self.scratch / "server.log").read_text(errors="replace")
        return text if limit is None else text[-limit:]

    def stop(self) -> None:
        """Stop gracefully, then by force; reap; check nothing is left behind."""
        if self.scraper is not None:
            self.scraper.stop()
        pgid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, self.launch.stop_signal)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        # Workers are children of the root, not ours: wait for the group to empty.
        deadline = time.monotonic() + STOP_TIMEOUT
        delay = 0.005
        while (left := procstat.group_members(pgid)) and time.monotonic() < deadline:
            time.sleep(delay)  # sleep-ok: bounded back-off while the group exits
            delay = min(delay * 2, 0.2)
        if left:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise ServerFailed(f"{self.name} left processes {left} after it stopped")
        self.log.close()
        if self.scraper is not None and self.scraper.failures > self.scraper.scrapes:
            raise ServerFailed(f"{self.name}: {self.scraper.failures} of its metrics scrapes "
                               f"failed, {self.scraper.scrapes} answered")  # fmt: skip

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
