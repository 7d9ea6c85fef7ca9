"""The health listener and drain_delay in a real daemon.

The daemon answers on ``--health-bind 127.0.0.1:0``; the test learns the
port from the ``health_listening`` log line.  It says ``down`` until a
worker is ready (workers are held at import by ``gated_import``), ``up
ready NN%`` while serving, and ``up drain`` from the moment a graceful
stop begins; with ``drain_delay`` the listeners accept meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any

from tests import proxyproto_build as build
from tests.support import ROOT, Daemon, exchange, poll_until, recv_all, start_daemon, wait_pid

HEALTH = ("--health-bind", "127.0.0.1:0")


def health_address(daemon: Daemon) -> tuple[str, int]:
    host, _, port = daemon.wait_log("health_listening")["address"].rpartition(":")
    return host, int(port)


def ask(daemon: Daemon, data: bytes) -> bytes:
    with socket.create_connection(health_address(daemon), timeout=10) as sock:
        sock.sendall(data)
        return recv_all(sock)


def agent(daemon: Daemon) -> bytes:
    return ask(daemon, b"agent\n")


def http(daemon: Daemon, path: str) -> int:
    answer = ask(daemon, f"GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
    return int(answer.split(b" ", 2)[1])


def ctl_status(daemon: Daemon) -> dict[str, Any]:
    path = os.path.join(os.path.dirname(daemon.notify.getsockname()), "control.sock")
    done = subprocess.run([sys.executable, "-m", "forkserver", "ctl", "--socket", path, "status",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          check=True)  # fmt: skip
    status: dict[str, Any] = json.loads(done.stdout)
    return status


def test_down_until_a_worker_is_ready_then_ready(tmp_path: Any) -> None:
    gate = socket.socket(socket.AF_UNIX)
    gate.bind(str(tmp_path / "gate"))
    gate.listen(16)
    env = {"TEST_GATE": str(tmp_path / "gate")}
    with start_daemon("tests.handlers.gated_import:handle", *HEALTH, workers=2, env=env,
                      wait_ready=False) as daemon:  # fmt: skip
        assert agent(daemon) == b"down #starting: no worker ready yet\n"
        assert http(daemon, "/readyz") == 503
        assert http(daemon, "/healthz") == 200
        gate.close()  # the workers import now
        daemon.wait_notify("READY=1")
        assert agent(daemon) == b"up ready 100%\n"
        assert http(daemon, "/readyz") == 200


def test_a_graceful_stop_drains_first_while_the_listeners_accept() -> None:
    args = (*HEALTH, "--drain-delay", "600")
    with start_daemon("forkserver.examples.echo:handle", *args, workers=1) as daemon:
        assert agent(daemon) == b"up ready 100%\n"
        daemon.proc.send_signal(signal.SIGTERM)
        event = daemon.wait_log("master_draining")
        assert event["drain_delay"] == 600
        assert agent(daemon) == b"up drain\n"
        assert http(daemon, "/readyz") == 503
        assert http(daemon, "/healthz") == 200
        with daemon.connect() as sock:  # still served: the balancer moves traffic first
            assert exchange(sock, b"during the drain") == b"during the drain"
        assert "draining" in daemon.wait_notify("STATUS=draining")
        status = ctl_status(daemon)
        assert (status["master"]["state"], status["master"]["draining"]) == ("draining", True)
        assert status["master"]["health"].startswith("127.0.0.1:")
        # Another graceful stop changes nothing (a preStop's ctl stop, then the TERM)...
        daemon.proc.send_signal(signal.SIGTERM)
        assert ctl_status(daemon)["master"]["state"] == "draining"
        # ...a fast one cuts the drain short, and the stop ends well.
        assert daemon.stop(signal.SIGINT) == 0
        assert daemon.records("master_stopping")


def test_the_drain_delay_ends_by_itself_and_the_stop_exits_0() -> None:
    args = (*HEALTH, "--drain-delay", "0.5")
    with start_daemon("forkserver.examples.echo:handle", *args, workers=1) as daemon:
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_log("master_draining")
        assert daemon.proc.wait(timeout=30) == 0
        draining = daemon.records("master_draining")[0]["time"]
        stopping = daemon.records("master_stopping")[0]["time"]
        assert stopping >= draining


def test_a_fast_stop_does_not_wait_for_the_drain() -> None:
    args = (*HEALTH, "--drain-delay", "600")
    with start_daemon("forkserver.examples.echo:handle", *args, workers=1) as daemon:
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_log("master_draining")
        assert daemon.stop(signal.SIGINT) == 0


def test_ctl_status_counts_refusals_per_listener_and_reason() -> None:
    args = ("--proxy-protocol", "v2", "--proxy-allow-from", "127.0.0.1", "--timeout", "2")
    with start_daemon("tests.handlers.proxied:whoami", *args, workers=1) as daemon:
        for data in (b"GET / HTTP/1.0\r\n\r\n", b"nope\r\n\r\n", build.SIG[:5]):
            with daemon.connect() as sock, contextlib.suppress(ConnectionResetError):
                sock.sendall(data)
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError as exc:  # reset already: the worker read enough to refuse it
                    assert exc.errno == errno.ENOTCONN, exc
                assert recv_all(sock) == b""  # closed (or reset: the rest was unread)

        def counted() -> bool:
            refused = ctl_status(daemon)["master"]["listeners"][0]["refused"]
            return bool(refused == {"bad_signature": 2, "closed": 1})

        poll_until(counted, "the refusals in ctl status", timeout=30)
        # They survive the worker that counted them.
        worker = daemon.workers()[0].pid
        os.kill(worker, signal.SIGKILL)
        daemon.wait_log("worker_exited", pid=worker)
        assert counted()


def _ask_unix(path: str, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(data)
        return recv_all(sock)


def test_an_upgrade_says_drain_until_the_new_master_is_in_charge(tmp_path: Any) -> None:
    """USR2: the old master says drain while it finishes; the new one answers once it is
    in charge, on the same address (here a Unix path, so the address is known)."""
    path = str(tmp_path / "health.sock")
    with start_daemon("forkserver.examples.echo:handle", "--health-bind", f"unix:{path}",
                      workers=1) as daemon:  # fmt: skip
        assert _ask_unix(path, b"agent\n") == b"up ready 100%\n"
        held = daemon.connect(timeout=30)  # keeps the old master's worker, so the old master
        held.sendall(b"held")              # drains until the test lets it go
        daemon.proc.send_signal(signal.SIGUSR2)
        new_pid = daemon.wait_log("upgrade_completed")["new_pid"]
        assert _ask_unix(path, b"agent\n") == b"up drain\n"
        assert exchange(held, b"") == b"held"  # served to the end by the old worker
        held.close()
        assert daemon.proc.wait(timeout=30) == 0
        daemon.wait_log("master_took_over", pid=new_pid)  # its health listener is open then
        assert _ask_unix(path, b"agent\n") == b"up ready 100%\n"
        os.kill(new_pid, signal.SIGTERM)
        assert wait_pid(new_pid, timeout=30) == 0
