"""The statsd push of a real daemon, received on a real UDP socket.

The test binds a UDP socket on loopback (port 0), starts the daemon with
``--statsd-host`` pointing at it and a short interval, and reads the
datagrams as they come: counters arrive as changes (their sum is the
total), gauges as values.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from forkserver import statsd
from tests.support import TIMEOUT, recv_all, start_daemon

METERED = "tests.handlers.metered:handle"


class Received:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lines: list[str] = []

    def until(self, done: Callable[[], bool], what: str) -> None:
        """Read datagrams as they arrive until *done*, for ``TIMEOUT`` s at most."""
        deadline = time.monotonic() + TIMEOUT
        while not done():
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.sock], [], [], max(0.0, remaining))
            if not ready:
                raise AssertionError(f"no datagram with {what} within {TIMEOUT} s: "
                                     f"{self.lines[-20:]}")  # fmt: skip
            data = self.sock.recv(65536)
            assert len(data) <= statsd.MAX_DATAGRAM
            self.lines.extend(data.decode().split("\n"))

    def counted(self, name: str) -> float:
        return sum(float(line.split(":", 1)[1].removesuffix("|c"))
                   for line in self.lines if line.startswith(name + ":"))  # fmt: skip

    def gauge(self, name: str) -> float | None:
        values = [line.split(":", 1)[1].removesuffix("|g") for line in self.lines
                  if line.startswith(name + ":") and line.endswith("|g")]  # fmt: skip
        return float(values[-1]) if values else None


def udp_sockets(pid: int) -> set[str]:
    """The socket inodes of *pid*'s descriptors that are UDP sockets."""
    udp = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as lines:
            udp |= {line.split()[9] for line in list(lines)[1:]}
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # one the process closed meanwhile
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                held.add(target.removeprefix("socket:[").removesuffix("]"))
    return held & udp


def test_a_daemon_pushes_its_counters_and_gauges_to_statsd() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    port = receiver.getsockname()[1]
    args = ("--statsd-host", f"127.0.0.1:{port}", "--statsd-prefix", "app.web",
            "--statsd-interval", "0.2")  # fmt: skip
    try:
        with start_daemon(METERED, *args, workers=2) as daemon:
            received = Received(receiver)
            listener = f"fd___{daemon.listener.fileno()}"  # fd://N, made safe for a name
            for _ in range(7):
                with daemon.connect() as sock:
                    sock.sendall(b"pid\n")
                    assert recv_all(sock).strip().isdigit()
            accepted = f"app.web.connections_accepted_total.{listener}"
            served = f"app.web.connections_served_total.{listener}"
            received.until(lambda: received.counted(accepted) == 7, accepted)
            received.until(lambda: received.counted(served) == 7, served)
            assert received.gauge("app.web.workers_target") == 2
            assert received.gauge("app.web.master_state.running") == 1
            assert received.gauge("app.web.worker_capacity") is not None
            pids = {str(worker.pid) for worker in daemon.workers()}
            # No series per worker process: none is named after a pid.
            assert not [line for line in received.lines
                        if pids & set(line.split(":", 1)[0].split("."))]  # fmt: skip
            victim = daemon.workers()[0].pid
            os.kill(victim, signal.SIGKILL)
            deaths = "app.web.worker_deaths_total.signal"
            received.until(lambda: received.counted(deaths) == 1, deaths)
            assert received.counted(accepted) == 7  # only changes are sent: no double count
            # The replacement was forked while the master's statsd socket was open:
            # it is the master's alone.
            replacement = daemon.logs.wait_for(
                lambda r: r.get("event") == "worker_ready" and str(r.get("pid")) not in pids,
                TIMEOUT, "the replacement's worker_ready")  # fmt: skip
            pushing = udp_sockets(daemon.pid)
            assert pushing, "the master has no UDP socket"
            assert not pushing & udp_sockets(replacement["pid"])
            assert daemon.stop() == 0
    finally:
        receiver.close()


def test_a_push_that_cannot_be_sent_is_logged_and_the_daemon_serves_on() -> None:
    # The broadcast address without SO_BROADCAST: the kernel refuses every
    # send (EACCES) before anything leaves the machine.
    args = ("--statsd-host", "255.255.255.255:9", "--statsd-interval", "0.1")
    with start_daemon(METERED, *args, workers=1) as daemon:
        record = daemon.wait_log("statsd_failed")
        assert "Permission denied" in record["error"]
        for _ in range(3):
            with daemon.connect() as sock:
                sock.sendall(b"pid\n")
                assert recv_all(sock).strip().isdigit()
        assert not daemon.records("master_error")
        assert daemon.stop() == 0
    assert len(daemon.records("statsd_failed")) == 1  # at most once a minute
