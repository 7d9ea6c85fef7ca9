"""Bind specs: parsing (pure) and opening real listening sockets."""

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkserver import fdpass
from forkserver.eventloop import EventLoop
from forkserver.listeners import (
    BindSpec,
    Listener,
    ListenerError,
    open_listener,
    open_listeners,
    parse_bind,
)
from forkserver.systemd import InheritedSocket


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8000", BindSpec(kind="tcp", host="127.0.0.1", port=8000)),
        ("localhost:0", BindSpec(kind="tcp", host="localhost", port=0)),
        ("[::1]:80", BindSpec(kind="tcp", host="::1", port=80)),
        ("[::]:65535", BindSpec(kind="tcp", host="::", port=65535)),
        (":8080", BindSpec(kind="tcp", host="", port=8080)),
        ("unix:/run/x.sock", BindSpec(kind="unix", path="/run/x.sock")),
        ("unix:@abstract", BindSpec(kind="unix", path="@abstract")),
        ("fd://3", BindSpec(kind="fd", fd=3)),
        ("systemd", BindSpec(kind="systemd")),
        ("systemd:web", BindSpec(kind="systemd", name="web")),
    ],
)
def test_parse_bind_accepts_every_documented_form(text: str, expected: BindSpec) -> None:
    spec = parse_bind(text)
    assert spec.kind == expected.kind
    assert (spec.host, spec.port, spec.path, spec.fd, spec.name) == (
        expected.host,
        expected.port,
        expected.path,
        expected.fd,
        expected.name,
    )
    assert spec.text == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        (" 127.0.0.1:80", "whitespace"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:", "is not a number"),
        ("127.0.0.1:http", "is not a number"),
        ("127.0.0.1:65536", "out of range"),
        ("127.0.0.1:٣", "is not a number"),
        ("::1:80", "must be in brackets"),
        ("[::1:80", "unbalanced"),
        ("[1.2.3.4]:80", "not an IPv6 address"),
        ("ho st:80", "not a host name"),
        ("unix:", "no path"),
        ("unix:" + "a" * 200, "more than a Unix socket address holds"),
        ("unix:/a\0b", "NUL"),
        ("fd://", "needs a descriptor number"),
        ("fd://x", "needs a descriptor number"),
        ("fd://-3", "needs a descriptor number"),
        ("fd://1", "standard stream"),
        ("systemd:", "systemd socket name"),
        ("systemd:a b", "systemd socket name"),
        ("x" * 5000, "is too long: 5000 characters, the limit is 4096"),
        ("999.1.1.1:80", "octet 999 of '999.1.1.1' is over 255"),
        ("1.2.3:80", "'1.2.3' has 3 parts; an IPv4 address has 4"),
        ("10.0.0.010:80", "octet '010' of '10.0.0.010' has a leading zero"),
    ],
)
def test_parse_bind_rejects_bad_specs_naming_them(text: str, message: str) -> None:
    with pytest.raises(ListenerError, match=message) as info:
        parse_bind(text)
    if len(text) < 100:
        assert repr(text) in str(info.value)


def test_parse_bind_rejects_non_strings() -> None:
    with pytest.raises(ListenerError, match="must be a string"):
        parse_bind(8000)  # type: ignore[arg-type]


# --- opening listeners: real sockets --------------------------------------


@pytest.fixture
def opened() -> Iterator[list[Listener]]:
    listeners: list[Listener] = []
    yield listeners
    for listener in listeners:
        listener.close()


def test_a_tcp_listener_on_port_0_accepts_and_hands_over_raw_descriptors(
    opened: list[Listener],
) -> None:
    listener = open_listener(parse_bind("127.0.0.1:0"), 0, backlog=16)
    opened.append(listener)
    received: list[tuple[int, int]] = []
    listener.dispatch = lambda fd, index: received.append((fd, index))
    port = listener.server_port()
    assert port > 0
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        assert listener.wait_for_new_connection(5000).available
        assert len(received) == 1
        fd, index = received[0]
        assert index == 0
        assert not os.get_inheritable(fd)
        os.close(fd)


def test_an_override_of_incoming_connection_gets_every_descriptor_though_dispatch_is_set(
    opened: list[Listener],
) -> None:
    """The accept loop calls ``dispatch`` itself for a plain ``Listener``: not for this one."""

    class Counting(Listener):
        def incoming_connection(self, socket_descriptor: int) -> None:
            seen.append(socket_descriptor)
            super().incoming_connection(socket_descriptor)

    seen: list[int] = []
    received: list[tuple[int, int]] = []
    loop = EventLoop()
    listener = Counting(parse_bind("127.0.0.1:0"), 3, loop=loop)
    opened.append(listener)
    assert listener.listen("127.0.0.1", 0)
    listener.dispatch = lambda fd, index: received.append((fd, index))
    clients = [socket.create_connection(("127.0.0.1", listener.server_port()), timeout=5)
               for _ in range(3)]  # fmt: skip
    try:
        while len(received) < 3:
            loop.run_once(5.0)
        assert [fd for fd, _ in received] == seen
        assert {index for _, index in received} == {3}
    finally:
        for client in clients:
            client.close()
        fdpass.close_all([fd for fd, _ in received])
        listener.close()
        loop.close()


def test_a_host_name_is_resolved(opened: list[Listener]) -> None:
    listener = open_listener(parse_bind("localhost:0"), 0, backlog=16)
    opened.append(listener)
    assert listener.server_address().is_loopback()


def test_a_unix_listener_replaces_a_stale_socket_file_and_removes_its_own(
    opened: list[Listener], tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    listener = open_listener(parse_bind(f"unix:{path}"), 0, backlog=16)
    opened.append(listener)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert listener.describe() == f"unix:{path}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
    listener.close()
    assert not path.exists()


def test_a_unix_listener_refuses_a_live_socket_or_a_plain_file(
    opened: list[Listener], tmp_path: Path
) -> None:
    live = tmp_path / "live.sock"
    first = open_listener(parse_bind(f"unix:{live}"), 0, backlog=16)
    opened.append(first)
    with pytest.raises(ListenerError, match="another process listens on"):
        open_listener(parse_bind(f"unix:{live}"), 1, backlog=16)
    plain = tmp_path / "plain"
    plain.write_text("data")
    with pytest.raises(ListenerError, match="exists and is not a socket"):
        open_listener(parse_bind(f"unix:{plain}"), 1, backlog=16)
    assert plain.read_text() == "data"


def test_an_abstract_unix_listener(opened: list[Listener]) -> None:
    name = f"forkserver-test-{os.getpid()}"
    listener = open_listener(parse_bind(f"unix:@{name}"), 0, backlog=16)
    opened.append(listener)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect("\0" + name)
    assert listener.describe() == f"unix:@{name}"


def test_an_inherited_descriptor_is_adopted(opened: list[Listener]) -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    fd = sock.detach()
    listener = open_listener(parse_bind(f"fd://{fd}"), 0, backlog=16)
    opened.append(listener)
    assert listener.socket_descriptor() == fd


def test_a_descriptor_that_is_not_a_listener_is_refused_and_left_open() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ListenerError, match=f"fd://{a.fileno()}"):
        open_listener(parse_bind(f"fd://{a.fileno()}"), 0, backlog=16)
    a_fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(ListenerError, match="cannot adopt"):
            open_listener(parse_bind(f"fd://{a_fd}"), 0, backlog=16)
        os.fstat(a_fd)  # still ours
    finally:
        os.close(a_fd)


def test_an_address_in_use_is_an_error_naming_the_spec(opened: list[Listener]) -> None:
    first = open_listener(parse_bind("127.0.0.1:0"), 0, backlog=16)
    opened.append(first)
    spec = f"127.0.0.1:{first.server_port()}"
    with pytest.raises(ListenerError, match=rf"bind spec '{spec}': .*already in use"):
        open_listeners([parse_bind(spec)], backlog=16)


def test_a_failure_closes_the_listeners_already_opened(tmp_path: Path) -> None:
    path = tmp_path / "first.sock"
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(ListenerError, match="not a socket"):
        open_listeners([parse_bind(f"unix:{path}"), parse_bind(f"unix:{plain}")], backlog=16)
    assert not path.exists()  # the first was opened, then closed and unlinked


def test_systemd_sockets_are_chosen_by_name(opened: list[Listener]) -> None:
    web = socket.create_server(("127.0.0.1", 0))
    admin = socket.create_server(("127.0.0.1", 0))
    inherited = [
        InheritedSocket(fd=web.detach(), name="web"),
        InheritedSocket(fd=admin.detach(), name="admin"),
    ]
    try:
        named = open_listeners([parse_bind("systemd:admin")], backlog=16, inherited=inherited)
        opened.extend(named)
        assert [listener.socket_descriptor() for listener in named] == [inherited[1].fd]
        with pytest.raises(ListenerError, match="no socket named 'db'"):
            open_listeners([parse_bind("systemd:db")], backlog=16, inherited=inherited)
        every = open_listeners([parse_bind("systemd")], backlog=16, inherited=inherited[:1])
        opened.extend(every)
        assert [listener.name for listener in every] == ["web"]
    finally:
        for sock in inherited:
            if all(listener.socket_descriptor() != sock.fd for listener in opened):
                os.close(sock.fd)


def _deferred(listener: Listener) -> int:
    sock = listener.listening_socket()
    assert sock is not None
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)


def test_defer_accept_sets_tcp_defer_accept_and_zero_leaves_a_socket_as_it_was(
    opened: list[Listener], tmp_path: Path
) -> None:
    tcp = open_listener(parse_bind("127.0.0.1:0"), 0, backlog=16)
    opened.append(tcp)
    assert _deferred(tcp) == 0
    tcp.defer_accept(5)
    assert _deferred(tcp) >= 5  # the kernel rounds up to its retransmission schedule
    inherited = socket.create_server(("127.0.0.1", 0))
    inherited.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 3)  # its owner's choice
    adopted = open_listener(parse_bind(f"fd://{inherited.detach()}"), 1, backlog=16)
    opened.append(adopted)
    adopted.defer_accept(0)
    assert _deferred(adopted) >= 3
    unix = open_listener(parse_bind(f"unix:{tmp_path / 'u.sock'}"), 2, backlog=16)
    opened.append(unix)
    unix.defer_accept(5)  # no such option for a Unix socket: left alone, no error


def test_a_deferred_listener_accepts_only_once_the_client_has_spoken(
    opened: list[Listener],
) -> None:
    listener = open_listener(parse_bind("127.0.0.1:0"), 0, backlog=16)
    opened.append(listener)
    listener.defer_accept(30)
    address = ("127.0.0.1", listener.server_port())
    with socket.create_connection(address) as silent, \
            socket.create_connection(address) as talking:  # fmt: skip
        talking.sendall(b"hello")
        assert listener.wait_for_new_connection(5000)
        conn = listener.next_pending_connection()
        assert conn is not None
        with conn:
            assert conn.recv(16) == b"hello"  # the talking one, though it came second
        assert not listener.wait_for_new_connection(0)  # the silent one is still held
        silent.sendall(b"late")
        assert listener.wait_for_new_connection(5000)
        late = listener.next_pending_connection()
        assert late is not None
        with late:
            assert late.recv(16) == b"late"
