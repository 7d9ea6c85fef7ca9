"""Descriptor passing over real SEQPACKET socketpairs, across a real fork."""

import os
import resource
import socket
from collections.abc import Iterator

import pytest

from forkserver import fdpass
from tests.support import wait_pid


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def test_a_batch_of_descriptors_crosses_a_fork_close_on_exec(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    parent_end, child_end = pair
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: receive, check, echo each fd's data back through it
        code = 1
        try:
            data, fds = fdpass.recv(child_end, 100, fdpass.SCM_MAX_FD)
            ok = data == b"hello" and len(fds) == 3
            ok = ok and all(not os.get_inheritable(fd) for fd in fds)
            for i, fd in enumerate(fds):
                os.write(fd, bytes([65 + i]))
            code = 0 if ok else 2
        finally:
            os._exit(code)
    os.close(r)
    socks = [socket.socketpair() for _ in range(3)]
    try:
        assert fdpass.send(parent_end, b"hello", [s[0].fileno() for s in socks])
        assert wait_pid(pid) == 0
        assert [s[1].recv(1) for s in socks] == [b"A", b"B", b"C"]
    finally:
        os.close(w)
        for a, b in socks:
            a.close()
            b.close()


def test_truncated_descriptors_are_an_error_and_none_leak(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        assert fdpass.send(a, b"x", [r, w, r, w, r])
        before = open_fds()
        with pytest.raises(fdpass.FdPassError, match="truncated"):
            fdpass.recv(b, 100, 2)
        assert open_fds() == before
    finally:
        os.close(r)
        os.close(w)


def test_a_receiver_out_of_descriptors_is_told_so_not_blamed_on_the_sender(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """At RLIMIT_NOFILE the kernel installs what it can and closes the rest."""
    a, b = pair
    r, w = os.pipe()
    assert fdpass.send(a, b"three", [r, r, r])
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: fill the table but one number, then receive
        code = 1
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(open_fds()) + 16, 4096))
            filler = []
            while True:
                try:
                    filler.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    break
            os.close(filler.pop())  # room for one
            try:
                fdpass.recv(b, 100, fdpass.SCM_MAX_FD)
            except fdpass.DescriptorsLost as exc:
                os.write(report_w, f"{exc.data!r} {exc}".encode())
                code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    try:
        with os.fdopen(report_r, "rb") as report:
            text = report.read().decode()
        assert wait_pid(pid) == 0
    finally:
        os.close(r)
        os.close(w)
    assert text.startswith("b'three' out of descriptors: only 1 of the message's descriptors")


def test_an_oversized_message_is_an_error(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    assert fdpass.send(a, b"x" * 200)
    with pytest.raises(fdpass.FdPassError, match="longer than 100 bytes"):
        fdpass.recv(b, 100, 1)


def test_descriptors_where_none_are_expected_are_refused_and_closed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        assert fdpass.send(a, b"x", [r])
        before = open_fds()
        with pytest.raises(fdpass.FdPassError, match="truncated"):
            fdpass.recv(b, 100, 0)
        assert open_fds() == before
    finally:
        os.close(r)
        os.close(w)


def test_a_full_channel_returns_false_instead_of_blocking(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = 0
    for _ in range(100_000):
        if not fdpass.send(a, b"y" * 1000):
            break
        sent += 1
    else:
        pytest.fail("the channel never filled up")
    assert sent > 0
    messages = fdpass.drain(b, 2000, 0)
    assert len(messages) == sent
    assert fdpass.send(a, b"again")


def test_send_each_sends_one_descriptor_per_message_until_the_channel_is_full(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    count = 200  # far beyond what 4 KiB of send buffer holds
    messages = [bytes([i % 256]) * 500 for i in range(count)]
    r, w = os.pipe()
    try:
        sent, error = fdpass.send_each(a, messages, [w] * count)
        assert error is None
        assert 0 < sent < count, "the channel never filled up"
        received = fdpass.drain(b, 1000, fdpass.SCM_MAX_FD)
        assert [data for data, _ in received] == messages[:sent]
        assert all(len(fds) == 1 for _, fds in received)
        for _, fds in received:  # each is a working copy of the pipe's write end
            os.write(fds[0], b"x")
            os.close(fds[0])
        assert os.read(r, 1000) == b"x" * sent
        assert fdpass.send_each(a, messages[:3], [w] * 3) == (3, None)  # read: room again
        fdpass.close_all([fd for _, fds in fdpass.drain(b, 1000, 1) for fd in fds])
    finally:
        os.close(r)
        os.close(w)


def test_send_each_reports_the_error_that_stopped_it_and_how_many_went_before() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a:
        b.close()
        r, w = os.pipe()
        try:
            sent, error = fdpass.send_each(a, [b"c", b"c"], [w, w])
        finally:
            os.close(r)
            os.close(w)
    assert sent == 0
    assert isinstance(error, BrokenPipeError)  # MSG_NOSIGNAL: an error, never SIGPIPE


def test_drain_returns_every_queued_message_with_its_descriptors(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        assert fdpass.send(a, b"one", [r])
        assert fdpass.send(a, b"two", [w, r])
        messages = fdpass.drain(b, 100, 4)
        assert [data for data, _ in messages] == [b"one", b"two"]
        assert [len(fds) for _, fds in messages] == [1, 2]
        for _, fds in messages:
            fdpass.close_all(fds)
        assert fdpass.drain(b, 100, 4) == []
    finally:
        os.close(r)
        os.close(w)


def test_end_of_file_is_an_empty_message(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.close()
    assert fdpass.recv(b, 100, 1) == (b"", [])


def test_too_many_descriptors_for_one_message_is_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    with pytest.raises(ValueError, match="at most 253"):
        fdpass.send(pair[0], b"x", [0] * 254)


def consecutive_fds(count: int) -> list[int]:
    """*count* descriptors with consecutive numbers (dup'd to the first free run)."""
    base = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    start = max(open_fds()) + 1
    fds = [os.dup2(base, start + i, inheritable=False) for i in range(count)]
    os.close(base)
    return fds


def test_close_many_closes_runs_of_numbers_and_nothing_between_them() -> None:
    run = consecutive_fds(6)
    keep = [run[2], run[4]]  # ours, left open: close_many must step over them
    fdpass.close_many([run[5], run[0], run[3], run[1]])
    assert [fd in open_fds() for fd in run] == [False, False, True, False, True, False]
    fdpass.close_many(keep)
    assert not open_fds() & set(run)
    single = consecutive_fds(1)
    fdpass.close_many(single)
    assert single[0] not in open_fds()
    fdpass.close_many([])  # nothing to do
