"""forkserver.systemd against a real notify socket and real inherited descriptors.

The notify side is checked with ``NotifyReceiver``: a real
``AF_UNIX``/``SOCK_DGRAM`` socket with ``SO_PASSCRED``, so each message's
sender pid is the kernel's word, not ours.  ``listen_fds()`` is checked
on parsed environments in-process, and on real descriptors at 3, 4, ...
in a program started through ``listen_shim.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkserver.systemd import (
    SEND_TIMEOUT,
    STATUS_MAX_CHARS,
    InheritedSocket,
    Notifier,
    SystemdError,
    check_listening,
    listen_fds,
    store_name,
    valid_fd_name,
)
from tests.systemd_e2e.notify_receiver import NotifyReceiver

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "tests" / "systemd_e2e" / "listen_shim.py"


# -- listen_fds(): parsing the environment ------------------------------


def test_no_listen_pid_means_no_sockets_and_the_rest_is_unset() -> None:
    env = {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "PATH": "/bin"}
    assert listen_fds(env) == []
    assert env == {"PATH": "/bin"}


def test_another_pid_is_ignored_logged_and_unset(caplog: pytest.LogCaptureFixture) -> None:
    other = os.getppid()
    env = {"LISTEN_PID": str(other), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
    with caplog.at_level(logging.INFO, logger="forkserver.systemd"):
        assert listen_fds(env) == []
    assert env == {}
    assert f"LISTEN_PID={other} is not this process" in caplog.text


def test_zero_descriptors() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert listen_fds(env) == []
    assert env == {}


def test_unset_false_leaves_the_environment_alone() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""}
    assert listen_fds(env, unset=False) == []
    assert env == {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""}


MALFORMED = [
    ({"LISTEN_PID": "abc", "LISTEN_FDS": "1"}, r"^LISTEN_PID='abc': not a decimal integer$"),
    ({"LISTEN_PID": "", "LISTEN_FDS": "1"}, r"^LISTEN_PID='': not a decimal integer$"),
    ({"LISTEN_PID": "-1", "LISTEN_FDS": "1"}, r"^LISTEN_PID='-1': not a decimal integer$"),
    ({"LISTEN_PID": " 7", "LISTEN_FDS": "1"}, r"^LISTEN_PID=' 7': not a decimal integer$"),
    ({"LISTEN_PID": "0x10", "LISTEN_FDS": "1"}, r"^LISTEN_PID='0x10': not a decimal integer$"),
    ({"LISTEN_PID": "0", "LISTEN_FDS": "1"}, r"^LISTEN_PID=0: out of range 1\.\.\d+$"),
    ({"LISTEN_PID": "9" * 40, "LISTEN_FDS": "1"}, r"^LISTEN_PID='9{40}': not a decimal"),
    ({"LISTEN_PID": "SELF"}, r"^LISTEN_PID is set but LISTEN_FDS is missing$"),
    ({"LISTEN_PID": "SELF", "LISTEN_FDS": "two"}, r"^LISTEN_FDS='two': not a decimal"),
    ({"LISTEN_PID": "SELF", "LISTEN_FDS": "1.0"}, r"^LISTEN_FDS='1\.0': not a decimal"),
    ({"LISTEN_PID": "SELF", "LISTEN_FDS": "-2"}, r"^LISTEN_FDS='-2': not a decimal"),
    ({"LISTEN_PID": "SELF", "LISTEN_FDS": "99999999"}, r"^LISTEN_FDS=99999999: out of range"),
    (
        {"LISTEN_PID": "SELF", "LISTEN_FDS": "0", "LISTEN_FDNAMES": "web"},
        r"^LISTEN_FDNAMES='web': 1 names for LISTEN_FDS=0$",
    ),
    (
        {"LISTEN_PID": "SELF", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web"},
        r"^LISTEN_FDNAMES='web': 1 names for LISTEN_FDS=2$",
    ),
    (
        {"LISTEN_PID": "SELF", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "we\tb"},
        r"^LISTEN_FDNAMES: invalid descriptor name 'we\\tb'$",
    ),
    (
        {"LISTEN_PID": "SELF", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:"},
        r"^LISTEN_FDNAMES: invalid descriptor name ''$",
    ),
    (
        {"LISTEN_PID": "SELF", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x" * 256},
        r"^LISTEN_FDNAMES: invalid descriptor name 'x{256}'$",
    ),
]


@pytest.mark.parametrize(("env", "message"), MALFORMED)
def test_malformed_values_name_the_variable(env: dict[str, str], message: str) -> None:
    env = {k: str(os.getpid()) if v == "SELF" else v for k, v in env.items()}
    with pytest.raises(SystemdError, match=message):
        listen_fds(env)
    assert env == {}, "the variables are unset even when they are rejected"


# -- listen_fds(): real descriptors, in a program started like systemd does

PROBE = r"""
import json, os, subprocess, sys
from forkserver.systemd import SystemdError, check_listening, listen_fds
try:
    found = listen_fds()
except SystemdError as exc:
    print(json.dumps({"error": str(exc)}))
    raise SystemExit(0)
for item in found:
    check_listening(item)
child = subprocess.run(
    [sys.executable, "-c", "import os; print(sorted(k for k in os.environ if 'LISTEN_' in k))"],
    capture_output=True, text=True, check=True,
)
print(json.dumps({
    "pid": os.getpid(),
    "found": [[s.fd, s.name, os.get_inheritable(s.fd)] for s in found],
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "child_env": child.stdout.strip(),
}))
"""


def run_probe(socks: list[socket.socket], *shim_args: str) -> dict[str, object]:
    fds = [s.fileno() for s in socks]
    command = [sys.executable, str(SHIM), *shim_args, *map(str, fds), "--"]
    command += [sys.executable, "-c", PROBE]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        command, check=False, pass_fds=fds, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


@pytest.fixture
def tcp_and_unix(tmp_path: Path) -> Iterator[list[socket.socket]]:
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "s"))
    unix.listen()
    yield [tcp, unix]
    tcp.close()
    unix.close()


def test_inherited_sockets_are_claimed_named_cloexec_and_unset(
    tcp_and_unix: list[socket.socket],
) -> None:
    answer = run_probe(tcp_and_unix, "--names", "web:admin")
    assert answer["found"] == [[3, "web", False], [4, "admin", False]]
    assert answer["env"] == []
    assert answer["child_env"] == "[]"


def test_unnamed_sockets_are_called_unknown(tcp_and_unix: list[socket.socket]) -> None:
    answer = run_probe(tcp_and_unix)
    assert answer["found"] == [[3, "unknown", False], [4, "unknown", False]]


def test_sockets_for_another_pid_are_left_alone(tcp_and_unix: list[socket.socket]) -> None:
    answer = run_probe(tcp_and_unix, "--names", "web:admin", "--listen-pid", "1")
    assert answer["found"] == []
    assert answer["env"] == []


def test_a_descriptor_that_is_not_open_is_an_error(tcp_and_unix: list[socket.socket]) -> None:
    # LISTEN_FDS counts two, but only one descriptor is passed: 4 is closed.
    answer = run_probe(tcp_and_unix[:1], "--names", "web:admin", "--count", "2")
    assert answer == {"error": "LISTEN_FDS=2: descriptor 4 is not open (Bad file descriptor)"}


# -- check_listening() ---------------------------------------------------


def test_listening_tcp_v6_and_unix_sockets_pass(tcp_and_unix: list[socket.socket]) -> None:
    for sock in tcp_and_unix:
        check_listening(InheritedSocket(sock.fileno(), "x"))
    if socket.has_ipv6:
        with socket.create_server(("::1", 0), family=socket.AF_INET6) as v6:
            check_listening(InheritedSocket(v6.fileno(), "v6"))


def test_a_datagram_socket_is_refused_naming_listen_stream() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(SystemdError, match=r"datagram socket; use ListenStream="):
            check_listening(InheritedSocket(sock.fileno(), "dg"))


def test_a_connected_socket_is_refused_naming_accept_no() -> None:
    left, right = socket.socketpair()
    with left, right:
        with pytest.raises(
            SystemdError, match=r"^inherited descriptor \d+ \(conn\) is a connected"
        ):
            check_listening(InheritedSocket(left.fileno(), "conn"))
        with pytest.raises(SystemdError, match=r"set Accept=no in the \.socket unit"):
            check_listening(InheritedSocket(left.fileno(), "conn"))


def test_a_bound_but_not_listening_stream_socket_is_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(SystemdError, match=r"not a listening one"):
            check_listening(InheritedSocket(sock.fileno(), "idle"))


def test_a_pipe_is_refused() -> None:
    read, write = os.pipe()
    try:
        fifo = r"is a FIFO or pipe \(a ListenFIFO= unit\?\): pipe:\[\d+\], not a socket"
        with pytest.raises(SystemdError, match=fifo):
            check_listening(InheritedSocket(read, "fifo"))
    finally:
        os.close(read)
        os.close(write)


def test_check_leaves_the_descriptor_open(tcp_and_unix: list[socket.socket]) -> None:
    fd = tcp_and_unix[0].fileno()
    check_listening(InheritedSocket(fd, "web"))
    os.fstat(fd)  # still open: the check detached, not closed


# -- Notifier ------------------------------------------------------------


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifyReceiver]:
    if request.param == "path":
        address = str(tmp_path / "notify")
    else:
        address = f"@forkserver-test-{uuid.uuid4().hex}"
    with NotifyReceiver(address) as recv:
        yield recv


def notifier_for(recv: NotifyReceiver, **environ: str) -> Notifier:
    env = {"NOTIFY_SOCKET": recv.env_value, **environ}
    return Notifier.from_environ(env)


def test_ready_carries_status_and_our_pid(receiver: NotifyReceiver) -> None:
    notifier = notifier_for(receiver)
    assert notifier.enabled
    notifier.ready("2/2 workers idle")
    message = receiver.next()
    assert message.pid == os.getpid()
    assert message.fields == [("READY", "1"), ("STATUS", "2/2 workers idle")]


def test_every_message_in_order(receiver: NotifyReceiver) -> None:
    notifier = notifier_for(receiver, WATCHDOG_USEC="4000000")
    notifier.ready("up")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.ready("generation 2")
    notifier.watchdog()
    notifier.stopping()
    notifier.extend_timeout(2.5)
    notifier.main_pid(4242)
    notifier.fatal(errno.EADDRINUSE, "cannot bind 127.0.0.1:80")
    got = [receiver.next() for _ in range(8)]
    assert {m.pid for m in got} == {os.getpid()}
    assert [m.fields for m in got] == [
        [("READY", "1"), ("STATUS", "up")],
        [("RELOADING", "1"), ("MONOTONIC_USEC", got[1].get("MONOTONIC_USEC"))],
        [("READY", "1"), ("STATUS", "generation 2")],
        [("WATCHDOG", "1")],
        [("STOPPING", "1")],
        [("EXTEND_TIMEOUT_USEC", "2500000")],
        [("MAINPID", "4242")],
        [("ERRNO", str(errno.EADDRINUSE)), ("STATUS", "cannot bind 127.0.0.1:80")],
    ]
    assert before <= int(got[1].get("MONOTONIC_USEC") or 0) <= after
    assert not receiver.pending()


def test_a_forked_sender_is_seen_with_its_own_pid(receiver: NotifyReceiver) -> None:
    """systemd trusts the kernel's credentials; a worker would be seen as a worker."""
    notifier = notifier_for(receiver)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            notifier.stopping()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert receiver.next().pid == pid


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_status_is_rate_limited_and_the_last_change_is_kept(receiver: NotifyReceiver) -> None:
    clock = FakeClock()
    notifier = Notifier(receiver.env_value, status_interval=1.0, clock=clock)
    notifier.status("1 busy")
    assert receiver.next().fields == [("STATUS", "1 busy")]
    clock.now += 0.2
    notifier.status("2 busy")
    notifier.status("3 busy")  # too soon: held back, replacing "2 busy"
    assert notifier.status_deadline() == 101.0
    notifier.flush_status()  # not due yet
    notifier.stopping()  # a marker: anything sent before it arrives first
    assert receiver.next().names() == ["STOPPING"]
    clock.now = 101.0
    notifier.flush_status()
    assert receiver.next().fields == [("STATUS", "3 busy")]
    assert notifier.status_deadline() is None
    clock.now += 5
    notifier.status("3 busy")  # unchanged: not sent again
    notifier.status("4 busy", force=True)
    assert receiver.next().fields == [("STATUS", "4 busy")]
    clock.now += 0.1
    notifier.status("forced", force=True)  # force ignores the interval
    assert receiver.next().fields == [("STATUS", "forced")]
    assert not receiver.pending()


def test_watchdog_flushes_a_held_back_status(receiver: NotifyReceiver) -> None:
    clock = FakeClock()
    notifier = Notifier(receiver.env_value, watchdog_usec=2_000_000, clock=clock)
    notifier.status("a")
    notifier.status("b")
    clock.now += 1.0
    notifier.watchdog()
    assert [receiver.next().fields for _ in range(3)] == [
        [("STATUS", "a")],
        [("WATCHDOG", "1")],
        [("STATUS", "b")],
    ]


def test_status_is_one_bounded_line(receiver: NotifyReceiver) -> None:
    notifier = notifier_for(receiver)
    notifier.status("two\nlines\x00and a NUL", force=True)
    assert receiver.next().fields == [("STATUS", "two lines and a NUL")]
    notifier.ready("x" * 10_000)
    status = receiver.next().get("STATUS") or ""
    assert len(status) == STATUS_MAX_CHARS and status.endswith("...")


def test_store_fds_sends_each_listening_socket_with_its_name(
    receiver: NotifyReceiver, tcp_and_unix: list[socket.socket]
) -> None:
    tcp, unix = tcp_and_unix
    notifier = notifier_for(receiver)
    notifier.store_fds({"web": tcp.fileno(), "admin": unix.fileno()})
    for sock, name in ((tcp, "web"), (unix, "admin")):
        message = receiver.next()
        try:
            assert message.fields == [("FDSTORE", "1"), ("FDNAME", name)]
            assert len(message.fds) == 1
            assert os.fstat(message.fds[0]).st_ino == os.fstat(sock.fileno()).st_ino
        finally:
            message.close_fds()


def test_store_fds_refuses_what_is_not_a_listening_socket(receiver: NotifyReceiver) -> None:
    notifier = notifier_for(receiver)
    left, right = socket.socketpair()
    with left, right, socket.create_server(("127.0.0.1", 0)) as good:
        with pytest.raises(SystemdError, match=r"\(conn\) is a connected socket"):
            notifier.store_fds({"good": good.fileno(), "conn": left.fileno()})
        with pytest.raises(SystemdError, match=r"^store_fds: invalid descriptor name 'a:b'$"):
            notifier.store_fds({"a:b": good.fileno()})
    notifier.stopping()
    assert receiver.next().names() == ["STOPPING"], "nothing was stored"


def test_watchdog_interval_is_half_of_watchdog_usec(receiver: NotifyReceiver) -> None:
    env = {"NOTIFY_SOCKET": receiver.env_value, "WATCHDOG_USEC": "3000000"}
    env["WATCHDOG_PID"] = str(os.getpid())
    notifier = Notifier.from_environ(env)
    assert env == {}, "no worker may inherit the notify variables"
    assert notifier.watchdog_interval() == 1.5
    assert notifier.handover_environ() == {
        "NOTIFY_SOCKET": receiver.env_value,
        "WATCHDOG_USEC": "3000000",
    }


def test_a_watchdog_for_another_pid_is_not_ours(receiver: NotifyReceiver) -> None:
    notifier = notifier_for(receiver, WATCHDOG_USEC="3000000", WATCHDOG_PID="1")
    assert notifier.watchdog_interval() is None
    notifier.watchdog()
    notifier.stopping()
    assert receiver.next().names() == ["STOPPING"], "no WATCHDOG=1 was sent"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WATCHDOG_USEC": "soon"}, r"^WATCHDOG_USEC='soon': not a decimal integer$"),
        ({"WATCHDOG_USEC": "0"}, r"^WATCHDOG_USEC=0: out of range"),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"}, r"^WATCHDOG_PID='me': not a decimal"),
    ],
)
def test_malformed_watchdog_values_name_the_variable(env: dict[str, str], message: str) -> None:
    env = {"NOTIFY_SOCKET": "/run/x", **env}
    with pytest.raises(SystemdError, match=message):
        Notifier.from_environ(env)
    assert env == {}


def test_without_notify_socket_everything_is_a_no_op() -> None:
    env = {"WATCHDOG_USEC": "1000000"}
    notifier = Notifier.from_environ(env)
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    assert notifier.handover_environ() == {}
    notifier.ready("x")
    notifier.status("x", force=True)
    notifier.reloading()
    notifier.stopping()
    notifier.watchdog()
    notifier.fatal(1, "x")


@pytest.mark.parametrize(
    "address",
    ["/nonexistent/forkserver/notify", "@forkserver-test-nobody-listens"],
)
def test_an_unreachable_notify_socket_is_logged_once_not_raised(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    with caplog.at_level(logging.WARNING, logger="forkserver.systemd"):
        notifier.ready("up")
        notifier.stopping()
        notifier.status("x", force=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"cannot notify systemd at {address}" in warnings[0].getMessage()


@pytest.mark.parametrize("address", ["relative/notify", "vsock:2:999", "/" + "x" * 200])
def test_a_notify_socket_that_cannot_be_an_address_disables_notifying(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="forkserver.systemd"):
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert not notifier.enabled
    assert "is not a Unix socket path or @name" in caplog.text


def test_a_full_queue_never_blocks_the_master_for_long(tmp_path: Path) -> None:
    """Nobody reads: droppable messages return at once, others give up after a bound."""
    with NotifyReceiver(tmp_path / "notify") as recv:
        notifier = Notifier(recv.env_value, watchdog_usec=1_000_000)
        started = time.monotonic()
        for _ in range(100):  # far past net.unix.max_dgram_qlen
            notifier.watchdog()
        assert time.monotonic() - started < SEND_TIMEOUT
        started = time.monotonic()
        notifier.stopping()
        assert time.monotonic() - started < SEND_TIMEOUT * 3
        assert recv.next().names() == ["WATCHDOG"]


def test_bad_arguments_are_errors(receiver: NotifyReceiver) -> None:
    notifier = notifier_for(receiver)
    with pytest.raises(ValueError, match="not a positive duration"):
        notifier.extend_timeout(0)
    with pytest.raises(ValueError, match="not a positive duration"):
        notifier.extend_timeout(float("nan"))
    with pytest.raises(ValueError, match="not a process id"):
        notifier.main_pid(0)
    with pytest.raises(ValueError, match="negative"):
        notifier.fatal(-1, "x")


# -- store_name(): FDNAME= for a socket the master bound ----------------


@pytest.mark.parametrize(
    ("bind", "name"),
    [
        ("127.0.0.1:8000", "127.0.0.1%3A8000"),
        ("[::1]:80", "[%3A%3A1]%3A80"),
        ("unix:/run/forkserver/web.sock", "unix%3A/run/forkserver/web.sock"),
        ("100%", "100%25"),
    ],
)
def test_store_name_is_legible(bind: str, name: str) -> None:
    assert store_name(bind) == name


@given(st.text(min_size=1))
def test_store_name_is_always_a_name_systemd_accepts(bind: str) -> None:
    assert valid_fd_name(store_name(bind))


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_distinct_binds_get_distinct_store_names(a: str, b: str) -> None:
    if a != b:
        assert store_name(a) != store_name(b)


def test_an_empty_bind_has_no_store_name() -> None:
    with pytest.raises(ValueError, match="empty bind spec"):
        store_name("")


def test_an_overlong_bind_is_cut_with_a_hash() -> None:
    a, b = "unix:/" + "x" * 300 + "a", "unix:/" + "x" * 300 + "b"
    assert len(store_name(a)) == 255 and valid_fd_name(store_name(a))
    assert store_name(a) != store_name(b)
