"""The PROXY protocol in a real daemon: the worker reads the header before the handler.

Each test runs ``forkserver run`` with ``--proxy-protocol`` on the
test's listener (127.0.0.1) and sends what a balancer would, built by
``tests.proxyproto_build`` (independent of the parser).  The client
addresses in the headers are documentation addresses: they are only
data, no traffic goes there.  Every failure kind closes the connection
before the handler runs, is logged as ``proxy_refused`` with its reason,
and leaves the worker serving the next connection.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

import pytest

from tests import proxyproto_build as build
from tests.support import Daemon, recv_all, start_daemon

CLIENT = ("203.0.113.7", 40001)
SERVER = ("198.51.100.1", 443)
V2_CLIENT = build.v2(addresses=build.inet(CLIENT[0], SERVER[0], CLIENT[1], SERVER[1]),
                     tlvs=build.tlv(0x02, b"app.example"))  # fmt: skip
V1_CLIENT = build.v1("TCP6", "2001:db8::7", "2001:db8::1", 40002, 8443)


def proxy_args(version: str, *more: str) -> tuple[str, ...]:
    return ("--proxy-protocol", version, "--proxy-allow-from", "127.0.0.1", *more)


def ask(daemon: Daemon, header: bytes, line: bytes = b"hello", *,
        source: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Send *header* and *line*; the handler's JSON answer."""
    with _client(daemon, source) as sock:
        sock.sendall(header + line + b"\n")
        answer = recv_all(sock)
    assert answer, "the connection was closed without an answer"
    result: dict[str, Any] = json.loads(answer)
    return result


def _client(daemon: Daemon, source: str | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET)
    sock.settimeout(20)
    if source is not None:
        sock.bind((source, 0))
    sock.connect(daemon.address)
    return sock


def refused(daemon: Daemon, data: bytes, *, source: str | None = None,
            shut: bool = True) -> bytes:  # fmt: skip
    """Send *data* (and end it, with *shut*); what came back before the close."""
    with _client(daemon, source) as sock:
        try:
            sock.sendall(data)
            if shut:
                sock.shutdown(socket.SHUT_WR)
            return recv_all(sock)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        except OSError as exc:  # reset already: the worker closed with bytes unread
            assert exc.errno == errno.ENOTCONN, exc
            return b""


@pytest.mark.parametrize(("worker_class", "handler", "dispatch"), [
    ("sync", "tests.handlers.proxied:whoami", "master"),
    ("sync", "tests.handlers.proxied:whoami", "shared"),
    ("thread", "tests.handlers.proxied:whoami", "master"),
    ("thread", "tests.handlers.proxied:whoami", "shared"),
    ("sync", "tests.handlers.proxied:WhoamiRequestHandler", "master"),
    ("asyncio", "tests.handlers.proxied:whoami_streams", "master"),
    ("asyncio", "tests.handlers.proxied:whoami_streams", "shared"),
    ("asyncio", "tests.handlers.proxied:WhoamiProtocol", "master"),
    ("uvloop", "tests.handlers.proxied:whoami_streams", "master"),
    ("uvloop", "tests.handlers.proxied:WhoamiProtocol", "shared"),
])  # fmt: skip
def test_the_handler_sees_the_client_the_header_names(worker_class: str, handler: str,
                                                      dispatch: str) -> None:  # fmt: skip
    loop = ("--event-loop", "uvloop") if worker_class == "uvloop" else ()
    args = proxy_args("v2", "--worker-class", "asyncio" if loop else worker_class,
                      "--dispatch", dispatch, "--access-log", *loop)  # fmt: skip
    with start_daemon(handler, *args, workers=1) as daemon:
        seen = ask(daemon, V2_CLIENT)
        assert seen["proxied"] is True
        assert tuple(seen["client"]) == CLIENT
        assert tuple(seen["server"]) == SERVER
        assert seen["proxy"][0] == "127.0.0.1"  # the balancer: the socket's own peer
        assert (seen["version"], seen["command"], seen["from_header"]) == (2, "PROXY", True)
        assert seen["authority"] == "app.example"
        assert seen["line"] == "hello", "the client's bytes follow the header intact"
        if handler.endswith(("whoami", "RequestHandler")):
            assert tuple(seen["peer"]) == CLIENT  # peer / client_address
        line = daemon.wait_log("connection_served", peer="203.0.113.7:40001")
        assert line["ok"] is True
        assert daemon.stop() == 0  # the whole log is in
        assert daemon.records("proxy_refused") == []


def test_v1_and_a_v2_local_header() -> None:
    """v1 TCP6; v2 LOCAL (a balancer's health check) keeps the socket's addresses."""
    with start_daemon("tests.handlers.proxied:whoami", *proxy_args("v1"), workers=1) as daemon:
        seen = ask(daemon, V1_CLIENT)
        assert tuple(seen["peer"]) == ("2001:db8::7", 40002, 0, 0)
        assert seen["version"] == 1
    with start_daemon("tests.handlers.proxied:whoami", *proxy_args("v2"), workers=1) as daemon:
        with _client(daemon) as sock:
            mine = sock.getsockname()
            sock.sendall(build.v2(command=build.LOCAL, family=build.UNSPEC) + b"check\n")
            seen = json.loads(recv_all(sock))
        assert (seen["command"], seen["from_header"]) == ("LOCAL", False)
        assert tuple(seen["peer"]) == mine
        assert tuple(seen["server"]) == daemon.address


def test_a_handler_error_names_the_real_client() -> None:
    with start_daemon("tests.handlers.proxied:whoami", *proxy_args("v2"), workers=1) as daemon:
        assert refused(daemon, V2_CLIENT + b"fail\n") == b""
        error = daemon.wait_log("handler_error")
        assert error["peer"] == "203.0.113.7:40001"


def _too_large() -> bytes:
    addresses = build.inet(CLIENT[0], SERVER[0], CLIENT[1], SERVER[1])
    return build.v2(addresses=addresses, tlvs=build.tlv(0xE0, b"x" * 300))


# (what is sent, the reason); all against a v2 listener trusting 127.0.0.1
FAILURES = [
    (b"GET / HTTP/1.0\r\n\r\n", "bad_signature"),  # no header at all
    (V1_CLIENT, "bad_signature"),  # the wrong version
    (build.SIG + b"\x11\x11\x00\x0c" + b"\x00" * 12, "bad_version"),
    (V2_CLIENT[:20], "closed"),  # truncated: the peer ends mid-header
    (_too_large(), "too_large"),  # over proxy_header_max
    (build.v2(family=build.UDP4, addresses=b"\x00" * 12), "unsupported_family"),
    (build.v2(addresses=build.inet(CLIENT[0], SERVER[0], 1, 2), tlvs=build.tlv(0x03, b"\0" * 4)),
     "bad_checksum"),
]  # fmt: skip


@pytest.mark.parametrize("worker_class", ["sync", "thread", "asyncio"])
def test_every_bad_header_is_closed_counted_and_the_worker_serves_on(worker_class: str) -> None:
    handler = ("tests.handlers.proxied:whoami_streams" if worker_class == "asyncio"
               else "tests.handlers.proxied:whoami")  # fmt: skip
    args = proxy_args("v2", "--proxy-header-max", "300", "--worker-class", worker_class)
    with start_daemon(handler, *args, workers=1) as daemon:
        pid = ask(daemon, V2_CLIENT)["pid"]
        for data, reason in FAILURES:
            assert refused(daemon, data) == b"", f"{reason}: the handler answered"
            event = daemon.wait_log("proxy_refused", reason=reason)
            assert event["peer"].startswith("127.0.0.1:")
            assert ask(daemon, V2_CLIENT)["pid"] == pid, f"after {reason}: another worker"
        # A peer not in proxy_allow_from: closed before a byte is read.
        assert refused(daemon, V2_CLIENT + b"x\n", source="127.0.0.2") == b""
        event = daemon.wait_log("proxy_refused", reason="not_allowed")
        assert event["peer"].startswith("127.0.0.2:")
        assert ask(daemon, V2_CLIENT)["pid"] == pid
        assert daemon.stop(signal.SIGTERM) == 0  # the whole log is in
        assert daemon.records("handler_error") == []
        # bad_signature twice within LOG_INTERVAL: one line, the next one counts it.
        assert len(daemon.records("proxy_refused")) == len(FAILURES)
        # The counts went to the master with the stats, and it took them.
        assert daemon.records("protocol_error") == []


@pytest.mark.parametrize("worker_class", ["sync", "asyncio"])
def test_a_slowloris_header_is_cut_at_the_deadline(worker_class: str) -> None:
    """Half a header, then nothing: closed at proxy_header_timeout, and the
    one worker then serves the connection that waited behind it."""
    handler = ("tests.handlers.proxied:whoami_streams" if worker_class == "asyncio"
               else "tests.handlers.proxied:whoami")  # fmt: skip
    timeout = 1.0
    args = proxy_args("v2", "--proxy-header-timeout", str(timeout), "--worker-class",
                      worker_class, "--concurrency", "1")  # fmt: skip
    with start_daemon(handler, *args, workers=1) as daemon, _client(daemon) as slow:
        started = time.monotonic()
        slow.sendall(V2_CLIENT[:10])  # and never the rest
        with _client(daemon) as waiting:
            waiting.sendall(V2_CLIENT + b"next\n")
            assert recv_all(slow) == b"", "closed without a byte"
            held = time.monotonic() - started
            answer = json.loads(recv_all(waiting))
        assert answer["line"] == "next"
        event = daemon.wait_log("proxy_refused", reason="timeout")
        assert "after 10 header byte(s)" in event["detail"]
        assert held >= timeout * 0.9, "closed before its deadline"


def test_a_unix_listener_trusts_unix_peers(tmp_path: Any) -> None:
    path = tmp_path / "p.sock"
    conf = tmp_path / "f.toml"
    conf.write_text(f'[[listeners]]\nbind = "unix:{path}"\nproxy_protocol = "v1"\n'
                    'proxy_allow_from = ["unix"]\n')  # fmt: skip
    with start_daemon("tests.handlers.proxied:whoami", "-c", str(conf), workers=1,
                      bind=False) as daemon:  # fmt: skip
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(20)
            sock.connect(str(path))
            sock.sendall(build.v1("TCP4", CLIENT[0], SERVER[0], CLIENT[1], SERVER[1]) + b"u\n")
            seen = json.loads(recv_all(sock))
        assert tuple(seen["peer"]) == CLIENT
        assert seen["proxy"] == ""  # an unnamed Unix peer
        assert daemon.stop(signal.SIGTERM) == 0


def test_an_allow_list_that_trusts_everyone_is_warned_about() -> None:
    args = ("--proxy-protocol", "v1", "--proxy-allow-from", "0.0.0.0/0,::/0")
    with start_daemon("tests.handlers.proxied:whoami", *args, workers=1) as daemon:
        event = daemon.wait_log("proxy_trusts_any")
        assert "0.0.0.0/0, ::/0" in event["message"]
        assert tuple(ask(daemon, V1_CLIENT)["peer"]) == ("2001:db8::7", 40002, 0, 0)
    with start_daemon("tests.handlers.proxied:whoami", *proxy_args("v1"), workers=1) as daemon:
        ask(daemon, V1_CLIENT)
        assert daemon.stop() == 0
        assert daemon.records("proxy_trusts_any") == []


def test_a_reload_checks_the_allow_list_and_keeps_a_listener_as_it_is(tmp_path: Any) -> None:
    """A configuration that would take headers from anyone fails the reload, and the
    running workers go on; a valid one that changes a listener's PROXY settings keeps
    the listener as it is (as for any listener setting), and says so."""
    conf = tmp_path / "f.toml"
    conf.write_text('proxy_protocol = "v2"\nproxy_allow_from = ["127.0.0.1"]\n')
    with start_daemon("tests.handlers.proxied:whoami", "-c", str(conf),
                      workers=1) as daemon:  # fmt: skip
        assert tuple(ask(daemon, V2_CLIENT)["peer"]) == CLIENT
        conf.write_text('proxy_protocol = "v2"\n')  # no proxy_allow_from
        daemon.proc.send_signal(signal.SIGHUP)
        failed = daemon.wait_log("reload_failed")
        assert "proxy_allow_from is not set" in failed["message"]
        assert tuple(ask(daemon, V2_CLIENT)["peer"]) == CLIENT
        conf.write_text('proxy_protocol = "off"\nproxy_header_timeout = 2\n')
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_listeners_kept")
        daemon.wait_log("reload_completed")
        assert tuple(ask(daemon, V2_CLIENT)["peer"]) == CLIENT  # still a PROXY listener


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed "
                    "(apt-get install haproxy; .ci/run installs it)")  # fmt: skip
@pytest.mark.parametrize(("version", "send"), [("v1", "send-proxy"), ("v2", "send-proxy-v2")])
def test_real_haproxy_in_front_the_handler_sees_the_client(tmp_path: Any, version: str,
                                                           send: str) -> None:  # fmt: skip
    """HAProxy on loopback relays with send-proxy(-v2) to a real daemon; the client
    connects from 127.0.0.2, HAProxy from 127.0.0.1, the only address allowed."""
    frontend = socket.create_server(("127.0.0.1", 0))
    args = proxy_args(version, "--access-log")
    with frontend, start_daemon("tests.handlers.proxied:whoami", *args, workers=2) as daemon:
        host, port = daemon.address
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            "global\n    nbthread 1\n"
            "defaults\n    mode tcp\n    timeout connect 10s\n    timeout client 30s\n"
            "    timeout server 30s\n"
            f"frontend app\n    bind fd@{frontend.fileno()}\n    default_backend fs\n"
            f"backend fs\n    server fs {host}:{port} {send} source 127.0.0.1\n")  # fmt: skip
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)],
                                   pass_fds=[frontend.fileno()], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)  # fmt: skip
        try:
            for index in range(5):
                with socket.socket() as client:
                    client.settimeout(20)
                    client.bind(("127.0.0.2", 0))
                    client.connect(frontend.getsockname())
                    mine = client.getsockname()
                    client.sendall(b"through haproxy %d\n" % index)
                    seen = json.loads(recv_all(client))
                assert tuple(seen["peer"]) == mine, "the handler sees the client, not HAProxy"
                assert seen["proxy"][0] == "127.0.0.1"
                assert seen["version"] == int(version[1])
                assert seen["line"] == f"through haproxy {index}"
                daemon.wait_log("connection_served", peer=f"127.0.0.2:{mine[1]}")
            assert daemon.stop() == 0
            assert daemon.records("proxy_refused") == []
        finally:
            haproxy.terminate()
            haproxy.wait(timeout=20)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run workers as nobody")
@pytest.mark.parametrize(("worker_class", "handler"),
                         [("sync", "handle"), ("thread", "handle"), ("asyncio", "streams")])
def test_workers_as_nobody_read_the_header(worker_class: str, handler: str) -> None:
    """The header reader is the daemon's code, loaded before the privilege drop:
    a worker's user may be unable to read the standard library's files."""
    with start_daemon(f"tests.handlers.proxied_plain:{handler}", *proxy_args("v2"),
                      "--user", "nobody", "--group", "nogroup", "--worker-class", worker_class,
                      workers=1) as daemon:  # fmt: skip
        assert daemon.workers()[0].uids().real == 65534
        with _client(daemon) as sock:
            sock.sendall(V2_CLIENT + b"hello\n")
            answer = recv_all(sock)
        assert answer == f"{CLIENT!r}\n".encode()
        assert daemon.stop() == 0
    assert not daemon.records("proxy_refused")
