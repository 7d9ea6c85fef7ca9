"""A stand-in for systemd's end of the notify protocol (sd_notify(3)).

``NotifyReceiver`` binds an ``AF_UNIX``/``SOCK_DGRAM`` socket (a path, or
an abstract ``@name``) with ``SO_PASSCRED``, so every datagram arrives
with the sender's credentials as systemd sees them.  ``next()`` waits,
with a timeout, for the next datagram and returns it parsed: the sender
pid, the ``KEY=VALUE`` fields in order, and any descriptors passed with
SCM_RIGHTS (received close-on-exec; the caller closes them).
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

_CREDS = struct.Struct("iII")  # struct ucred: pid, uid, gid
_MAX_FDS = 16


@dataclass
class Notification:
    pid: int
    fields: list[tuple[str, str]]
    fds: list[int] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        return next((value for name, value in self.fields if name == key), None)

    def names(self) -> list[str]:
        return [name for name, _ in self.fields]

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class NotifyReceiver:
    def __init__(self, address: str | Path) -> None:
        """*address*: a path, or ``@name`` for the abstract namespace."""
        text = str(address)
        self.env_value = text
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.sock.bind("\0" + text[1:] if text.startswith("@") else text)
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> NotifyReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def next(self, timeout: float = 10.0) -> Notification:
        """The next datagram; fails the test if none comes within *timeout*."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            raise AssertionError(f"no notification within {timeout} s")
        return self._receive()

    def wait_for(self, key: str, timeout: float = 20.0) -> tuple[Notification, list[Notification]]:
        """Skip ahead to the first datagram with *key*; return it and all seen."""
        deadline = time.monotonic() + timeout
        seen: list[Notification] = []
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                message = self.next(remaining)
            except AssertionError:
                got = [m.names() for m in seen]
                raise AssertionError(f"no {key}= within {timeout} s; got {got}") from None
            seen.append(message)
            if key in message.names():
                return message, seen

    def pending(self) -> bool:
        ready, _, _ = select.select([self.sock], [], [], 0)
        return bool(ready)

    def _receive(self) -> Notification:
        cmsg_space = socket.CMSG_SPACE(_CREDS.size) + socket.CMSG_SPACE(_MAX_FDS * 4)
        data, ancillary, flags, _ = self.sock.recvmsg(4096, cmsg_space, socket.MSG_CMSG_CLOEXEC)
        pid, fds = -1, array.array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CREDS.unpack(payload[: _CREDS.size])[0]
            elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            for fd in fds:
                os.close(fd)
            raise AssertionError(f"notification truncated (flags {flags:#x})")
        fields = []
        for line in data.decode().split("\n"):
            if line:
                name, sep, value = line.partition("=")
                assert sep, f"notification line without '=': {line!r}"
                fields.append((name, value))
        return Notification(pid, fields, list(fds))
