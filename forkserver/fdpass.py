"""Descriptors over ``SOCK_SEQPACKET`` sockets with SCM_RIGHTS.

Why not ``socket.send_fds``/``recv_fds``: ``recv_fds`` ignores its
flags and checks neither ``MSG_CTRUNC`` nor ``MSG_TRUNC``, and the
descriptors it returns are inheritable (PEP 446 does not cover
SCM_RIGHTS).  Here every receive uses ``MSG_CMSG_CLOEXEC``, and a
truncated message is an error after closing whatever did arrive, so
nothing leaks and nothing is silently lost.

A receiver that has reached its ``RLIMIT_NOFILE`` cannot take the
descriptors of a message: the kernel installs those it can, sets
``MSG_CTRUNC`` and closes the rest, which are then lost for good.  That
raises ``DescriptorsLost``, which says so, rather than blaming the
sender; a worker keeps descriptor numbers in reserve so that it never
gets there (``workers.reserve``).

Sending never blocks: a full channel (``EAGAIN``) returns False and the
caller keeps the descriptors to retry when the channel is writable.
Too many descriptors in flight (``ETOOMANYREFS``, when the sender's
in-flight count exceeds its RLIMIT_NOFILE) or a lack of kernel memory
(``ENOBUFS``) raise ``OSError``: writability does not announce their
end, so the caller retries on a timer instead.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import Final

#: The kernel's SCM_MAX_FD: the most descriptors one message can carry.
SCM_MAX_FD: Final = 253
_FD_SIZE: Final = array.array("i").itemsize
_ONE_FD: Final = struct.Struct("i")
# Plain ints: flag enums cost a Python call per operation on a hot path.
_SEND_FLAGS: Final = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_RECV_FLAGS: Final = int(socket.MSG_CMSG_CLOEXEC)
_RECV_NOWAIT_FLAGS: Final = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
_CTRUNC: Final = int(socket.MSG_CTRUNC)
_TRUNC: Final = int(socket.MSG_TRUNC)
_TRUNCATED: Final = _CTRUNC | _TRUNC
#: ``recvmsg`` flags that make a message suspect: ``unpack`` says what is wrong.
TRUNCATED: Final = _TRUNCATED
_SOL_SOCKET: Final = int(socket.SOL_SOCKET)
_SCM_RIGHTS: Final = int(socket.SCM_RIGHTS)
#: Ancillary buffer size by the number of descriptors a receive allows.
_SPACE: Final[dict[int, int]] = {}


class FdPassError(Exception):
    """A message arrived truncated, or carried descriptors it should not."""


class DescriptorsLost(FdPassError):
    """The receiver is out of descriptors: the kernel closed what it could not install.

    ``data`` is the message itself (it did arrive), so the receiver can
    tell what was lost.
    """

    def __init__(self, message: str, data: bytes) -> None:
        super().__init__(message)
        self.data = data


def send(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> bool:
    """Send one message with *fds* attached, without blocking.

    Returns False when the channel cannot take it now (nothing was
    sent; the caller still owns *fds*).  Other errors raise ``OSError``.
    On success the caller still owns its copies of *fds* and should
    close them: the receiver has its own.
    """
    count = len(fds)
    if count > SCM_MAX_FD:
        raise ValueError(f"at most {SCM_MAX_FD} descriptors per message, not {count}")
    ancillary: list[tuple[int, int, bytes | array.array[int]]] = []
    if count == 1:  # a sync worker's every message: no array for one number
        ancillary.append((_SOL_SOCKET, _SCM_RIGHTS, _ONE_FD.pack(fds[0])))
    elif count:
        ancillary.append((_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds)))
    try:
        sock.sendmsg([data], ancillary, _SEND_FLAGS)
    except BlockingIOError:
        return False
    return True


def send_each(
    sock: socket.socket, messages: Iterable[bytes], fds: Sequence[int]
) -> tuple[int, OSError | None]:
    """Send the i-th of *messages* with ``fds[i]`` attached, one message each, without blocking.

    The sync workers' path: every connection is one such message, so the
    loop is here, one call per batch.  Returns how many went, and the
    error that stopped the rest: None when all went or the channel is
    full (fewer went than *fds*), else the ``OSError`` of the failed send.
    The caller still owns its copies of what went, as with ``send``.
    """
    sendmsg, pack, flags = sock.sendmsg, _ONE_FD.pack, _SEND_FLAGS
    sent = 0
    try:
        for data, fd in zip(messages, fds, strict=True):
            sendmsg([data], [(_SOL_SOCKET, _SCM_RIGHTS, pack(fd))], flags)
            sent += 1
    except BlockingIOError:
        pass
    except OSError as exc:
        return sent, exc
    return sent, None


def recv(
    sock: socket.socket, max_size: int, max_fds: int, *, nonblocking: bool = False
) -> tuple[bytes, list[int]]:
    """Receive one message and the descriptors that came with it.

    The descriptors are close-on-exec and owned by the caller.  An empty
    message with no descriptors means end of file.  A message longer
    than *max_size* or with more than *max_fds* descriptors raises
    ``FdPassError`` (the descriptors that did arrive are closed first).
    With *nonblocking*, ``BlockingIOError`` means nothing is queued.
    """
    flags = _RECV_NOWAIT_FLAGS if nonblocking else _RECV_FLAGS
    space = _SPACE.get(max_fds)
    if space is None:
        space = _SPACE[max_fds] = socket.CMSG_SPACE(max_fds * _FD_SIZE) if max_fds else 0
    data, ancillary, msg_flags, _ = sock.recvmsg(max_size + 1, space, flags)
    return unpack(data, ancillary, msg_flags, max_size, max_fds)


def recv_args(max_size: int, max_fds: int, *, nonblocking: bool = False) -> tuple[int, int, int]:
    """The arguments of the ``sock.recvmsg`` that ``recv`` makes, for ``unpack``."""
    space = socket.CMSG_SPACE(max_fds * _FD_SIZE) if max_fds else 0
    return max_size + 1, space, _RECV_NOWAIT_FLAGS if nonblocking else _RECV_FLAGS


def unpack(
    data: bytes, ancillary: list[tuple[int, int, bytes]], msg_flags: int, max_size: int,
    max_fds: int,
) -> tuple[bytes, list[int]]:
    """``recv``'s result and checks, from what its ``recvmsg`` returned (``recv_args``).

    For a receiver that makes the ``recvmsg`` call itself, to look at
    the message first: what ``unpack`` raises, ``recv`` would have.
    """
    fds: list[int] = []
    if ancillary:
        level, kind, payload = ancillary[0]
        if (len(ancillary) == 1 and level == _SOL_SOCKET and kind == _SCM_RIGHTS
                and not len(payload) % _FD_SIZE):  # what the master sends: one array
            fds = memoryview(payload).cast("i").tolist()
        else:
            fds = _collect_fds(ancillary)
    # Every receive of every connection comes here: the whole check only
    # when something looks wrong.
    if msg_flags & _TRUNCATED or len(data) > max_size or len(fds) > max_fds:
        problem = _check(data, fds, msg_flags, max_size, max_fds)
        if problem:
            close_all(fds)
            if msg_flags & _CTRUNC and len(fds) < max_fds:
                raise DescriptorsLost(problem, data)
            raise FdPassError(problem)
    return data, fds


def _collect_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return fds


def _check(data: bytes, fds: list[int], msg_flags: int, max_size: int, max_fds: int) -> str:
    if msg_flags & _CTRUNC:
        if len(fds) < max_fds:  # there was room for more: the receiver could not take them
            return (f"out of descriptors: only {len(fds)} of the message's descriptors could "
                    "be received (RLIMIT_NOFILE reached), the kernel closed the others")
        return f"descriptors were truncated (more than {max_fds} sent with one message)"
    if msg_flags & _TRUNC or len(data) > max_size:
        return f"message longer than {max_size} bytes"
    if len(fds) > max_fds:
        return f"{len(fds)} descriptors arrived, at most {max_fds} expected"
    return ""


def drain(sock: socket.socket, max_size: int, max_fds: int) -> list[tuple[bytes, list[int]]]:
    """Every message still queued on *sock*, without blocking.

    A truncated message is skipped (its descriptors closed) rather than
    stopping the drain: the rest are still worth having.
    """
    messages: list[tuple[bytes, list[int]]] = []
    while True:
        try:
            data, fds = recv(sock, max_size, max_fds, nonblocking=True)
        except BlockingIOError:
            return messages
        except FdPassError:
            continue
        if not data and not fds:
            return messages
        messages.append((data, fds))


def close_all(fds: Sequence[int]) -> None:
    """Close every descriptor in *fds*, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise


def close_many(fds: Sequence[int]) -> None:
    """Close distinct descriptors, each run of consecutive numbers with one ``close_range``.

    Descriptors accepted in one batch usually have consecutive numbers
    (the kernel gives the lowest free ones), so the master's copies of a
    batch go in one system call instead of one each.  Errors are
    ignored, as ``close_all`` ignores ``EBADF``.
    """
    count = len(fds)
    if count < 2:
        close_all(fds)
        return
    low, high = min(fds), max(fds)
    if high - low + 1 == count:  # distinct numbers filling the range: only ours in it
        os.closerange(low, high + 1)
        return
    ordered = sorted(set(fds))
    start = previous = ordered[0]
    for fd in (*ordered[1:], -1):
        if fd != previous + 1:  # a run ends: one call for it
            if previous > start:
                os.closerange(start, previous + 1)
            else:
                close_all((start,))
            start = fd
        previous = fd
