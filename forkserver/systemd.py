"""systemd: socket activation (sd_listen_fds(3)) and the notify protocol (sd_notify(3)).

Invariants:

* Only the master talks to systemd.  ``listen_fds()`` and
  ``Notifier.from_environ()`` remove the variables they read from the
  environment, so no worker, and no program a worker executes, inherits
  ``LISTEN_*``, ``NOTIFY_SOCKET`` or ``WATCHDOG_*``.
* Inherited descriptors are made close-on-exec as soon as they are
  claimed; they belong to systemd, which keeps its own copy.
* Notifying never fails the caller: a missing or unreachable notify
  socket is logged once at warning level and otherwise ignored.  A send
  blocks for at most ``SEND_TIMEOUT`` seconds (the receiver's queue may be
  full), so a stalled systemd cannot wedge the master for long.
* Nothing read from the environment is trusted: each value is parsed
  strictly and bounded, and a malformed one raises ``SystemdError``
  naming the variable.
"""

from __future__ import annotations

import array
import errno as errno_mod
import hashlib
import logging
import math
import os
import resource
import socket
import stat
import struct
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Final

from forkserver.errors import ForkserverError

__all__ = [
    "SD_LISTEN_FDS_START",
    "InheritedSocket",
    "Notifier",
    "SystemdError",
    "check_listening",
    "listen_fds",
    "store_name",
    "valid_fd_name",
]

log = logging.getLogger("forkserver.systemd")

SD_LISTEN_FDS_START: Final = 3
#: systemd reads at most this many bytes of one notification (PIPE_BUF).
NOTIFY_MAX_BYTES: Final = 4096
#: STATUS= is one line; longer text is cut here, well under the limit above.
STATUS_MAX_CHARS: Final = 512
#: Longest blocking send to a notify socket whose queue is full.
SEND_TIMEOUT: Final = 1.0
#: Minimum seconds between two rate-limited STATUS= updates.
STATUS_INTERVAL: Final = 1.0
#: FileDescriptorName= / FDNAME= limit (systemd's fdname_is_valid()).
FD_NAME_MAX: Final = 255
_LISTEN_VARS: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_NOTIFY_VARS: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# sun_path is 108 bytes; an abstract name uses all of it after the NUL.
_SUN_PATH_MAX: Final = 108


class SystemdError(ForkserverError):
    """A malformed systemd variable or an unusable inherited descriptor."""


@dataclass(frozen=True)
class InheritedSocket:
    """A descriptor passed by systemd; ``name`` is its FileDescriptorName=."""

    fd: int
    name: str


def valid_fd_name(name: str) -> bool:
    """True if *name* is a name systemd accepts for a descriptor."""
    return (
        0 < len(name) <= FD_NAME_MAX and name.isascii() and name.isprintable() and ":" not in name
    )


def store_name(bind: str) -> str:
    """The FDNAME= under which the master stores the socket it bound for *bind*.

    Deterministic, so the next start finds the socket again by its bind
    spec in LISTEN_FDNAMES.  ``:`` (the LISTEN_FDNAMES separator), ``%``
    and anything not printable ASCII are %-escaped, so distinct specs
    give distinct names; a result longer than systemd allows is cut and
    ends with a hash of the whole spec.
    """
    if not bind:
        raise ValueError("store_name: empty bind spec")
    escaped = "".join(
        ch if ch.isascii() and ch.isprintable() and ch not in ":%" else _escape(ch) for ch in bind
    )
    if len(escaped) <= FD_NAME_MAX:
        return escaped
    digest = hashlib.sha256(bind.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{escaped[: FD_NAME_MAX - 17]}~{digest}"


def _escape(ch: str) -> str:
    return "".join(f"%{byte:02X}" for byte in ch.encode("utf-8", "surrogateescape"))


def _parse_int(environ: Mapping[str, str], var: str, *, low: int, high: int) -> int:
    text = environ[var]
    # int() would also accept " 3", "+3", "0x3" or "3_0"; systemd does not.
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise SystemdError(f"{var}={text!r}: not a decimal integer")
    value = int(text)
    if not low <= value <= high:
        raise SystemdError(f"{var}={value}: out of range {low}..{high}")
    return value


def _fd_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def listen_fds(
    environ: MutableMapping[str, str] = os.environ, *, unset: bool = True
) -> list[InheritedSocket]:
    """Claim the descriptors systemd passed to this process.

    As sd_listen_fds_with_names(3): descriptors start at 3, and are ours
    only when ``LISTEN_PID`` is our pid (otherwise they are ignored, with a
    log line).  Each claimed descriptor is made close-on-exec.  With
    *unset*, ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` are
    removed from *environ* in every case, error included, so no child
    inherits them.  A descriptor without a name is called ``unknown``, as
    systemd does.
    """
    try:
        return _claim(environ)
    finally:
        if unset:
            for var in _LISTEN_VARS:
                environ.pop(var, None)


def _claim(environ: Mapping[str, str]) -> list[InheritedSocket]:
    if "LISTEN_PID" not in environ:
        return []
    pid = _parse_int(environ, "LISTEN_PID", low=1, high=2**31 - 1)
    if pid != os.getpid():
        log.info(
            "ignoring LISTEN_FDS: LISTEN_PID=%d is not this process (%d)",
            pid,
            os.getpid(),
            extra={"event": "listen_fds_ignored", "listen_pid": pid},
        )
        return []
    if "LISTEN_FDS" not in environ:
        raise SystemdError("LISTEN_PID is set but LISTEN_FDS is missing")
    count = _parse_int(environ, "LISTEN_FDS", low=0, high=_fd_limit() - SD_LISTEN_FDS_START)
    names = _parse_names(environ, count)
    found = []
    for offset, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + offset
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise SystemdError(
                f"LISTEN_FDS={count}: descriptor {fd} is not open ({exc.strerror})"
            ) from None
        found.append(InheritedSocket(fd, name))
    return found


def _parse_names(environ: Mapping[str, str], count: int) -> list[str]:
    text = environ.get("LISTEN_FDNAMES")
    if text is None:
        return ["unknown"] * count
    names = text.split(":") if count else ([] if text == "" else text.split(":"))
    if len(names) != count:
        raise SystemdError(
            f"LISTEN_FDNAMES={text[:300]!r}: {len(names)} names for LISTEN_FDS={count}"
        )
    for name in names:
        if not valid_fd_name(name):
            raise SystemdError(f"LISTEN_FDNAMES: invalid descriptor name {name[:300]!r}")
    return names


def check_listening(inherited: InheritedSocket) -> None:
    """Raise ``SystemdError`` unless *inherited* is a listening stream socket.

    The message names the unit setting to change, because the usual
    cause is a ``.socket`` unit written for another kind of service.
    Only TCP (IPv4, IPv6) and Unix stream sockets are accepted.
    """
    where = f"inherited descriptor {inherited.fd} ({inherited.name})"
    try:
        mode = os.fstat(inherited.fd).st_mode
    except OSError as exc:
        raise SystemdError(f"{where} is not open ({exc.strerror}): nothing was passed "
                           "there, or it was closed before forkserver started") from None
    if not stat.S_ISSOCK(mode):
        raise SystemdError(f"{where} is {describe_non_socket(inherited.fd, mode)}, not a "
                           "socket; use ListenStream= in the .socket unit")  # fmt: skip
    sock = socket.socket(fileno=inherited.fd)
    try:
        _check_socket(sock, where)
    finally:
        sock.detach()


def describe_non_socket(fd: int, mode: int) -> str:
    """What descriptor *fd* (of file mode *mode*, not a socket) is, for a message."""
    kinds = ((stat.S_ISFIFO, "a FIFO or pipe (a ListenFIFO= unit?)"),
             (stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))  # fmt: skip
    kind = next((name for test, name in kinds if test(mode)), "neither a file nor a socket")
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return kind
    return f"{kind}: {target[:200]}"


def _check_socket(sock: socket.socket, where: str) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        raise SystemdError(
            f"{where} is a {sock.family.name} socket; use ListenStream= with an "
            "IP address, a port or a path"
        )
    if sock.type != socket.SOCK_STREAM:
        kind = {socket.SOCK_DGRAM: "datagram", socket.SOCK_SEQPACKET: "seqpacket"}
        raise SystemdError(
            f"{where} is a {kind.get(sock.type, sock.type.name)} socket; "
            "use ListenStream= in the .socket unit (not ListenDatagram= or "
            "ListenSequentialPacket=)"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise SystemdError(f"{where} is {_not_listening(sock)}, not a listening one")


def _not_listening(sock: socket.socket) -> str:
    """A stream socket that is not listening: connected, bound, or neither."""
    try:
        peer = sock.getpeername()
    except OSError:  # ENOTCONN
        pass
    else:
        to = f" (to {_address_text(peer)})" if peer else ""
        return (f"a connected socket{to}; set Accept=no in the .socket unit (forkserver "
                "accepts connections itself)")  # fmt: skip
    try:
        name = sock.getsockname()
    except OSError:
        name = None
    unbound = not name or (isinstance(name, tuple) and name[1] == 0)
    if unbound:
        return "an unbound stream socket (never bound, never listening)"
    return f"a stream socket bound to {_address_text(name)} that is not listening"


def _address_text(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(address, bytes) and address[:1] == b"\0":  # an abstract Unix address
        return "@" + address[1:].decode("utf-8", "replace")
    return str(address)


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _one_line(text: str) -> str:
    """STATUS= text as one printable line of bounded length."""
    line = "".join(ch if ch.isprintable() else " " for ch in text)
    if len(line) > STATUS_MAX_CHARS:
        line = line[: STATUS_MAX_CHARS - 3] + "..."
    return line


def _address(text: str) -> bytes | None:
    """NOTIFY_SOCKET as a socket address, or None if it cannot be one."""
    raw = os.fsencode(text)
    if raw[:1] == b"@":
        raw = b"\0" + raw[1:]
    elif raw[:1] != b"/":
        return None
    if len(raw) >= _SUN_PATH_MAX or b"\0" in raw[1:]:
        return None
    return raw


class Notifier:
    """Tells systemd how the service is doing (sd_notify(3)).

    Build it with ``from_environ()`` in the master before any worker is
    forked.  Without ``NOTIFY_SOCKET`` it is disabled and every method is
    a cheap no-op.  A fresh datagram socket is used for each message, as
    sd_notify() does, so no notify descriptor lingers in forked workers.
    """

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
        status_interval: float = STATUS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._text = address
        self._address = _address(address) if address else None
        if address and self._address is None:
            log.warning(
                "NOTIFY_SOCKET=%r is not a Unix socket path or @name; not notifying",
                address[:200],
                extra={"event": "notify_unusable"},
            )
        self.enabled: bool = self._address is not None
        self._watchdog_usec = watchdog_usec if self.enabled else None
        self._status_interval = status_interval
        self._clock = clock
        self._status_sent_at = -math.inf
        self._status_sent = ""
        self._status_pending: str | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier:
        """Read and remove ``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``WATCHDOG_PID``.

        The watchdog is on only when ``WATCHDOG_USEC`` is set and
        ``WATCHDOG_PID`` is absent or our pid (sd_watchdog_enabled(3)).
        Malformed watchdog values raise ``SystemdError``.
        """
        try:
            address = environ.get("NOTIFY_SOCKET") or None
            watchdog = _watchdog_usec(environ)
        finally:
            for var in _NOTIFY_VARS:
                environ.pop(var, None)
        return cls(address, watchdog_usec=watchdog)

    def handover_environ(self) -> dict[str, str]:
        """The variables a re-executed master needs to keep notifying.

        ``WATCHDOG_PID`` is left out: the new master has another pid, and
        the variable is only for the process that reads it.
        """
        env: dict[str, str] = {}
        if self._text and self.enabled:
            env["NOTIFY_SOCKET"] = self._text
            if self._watchdog_usec is not None:
                env["WATCHDOG_USEC"] = str(self._watchdog_usec)
        return env

    # -- the messages ---------------------------------------------------

    def ready(self, status: str) -> None:
        """READY=1 with a STATUS= line: at start, and when a reload is done."""
        self._send_status_with("READY=1", status)

    def reloading(self) -> None:
        """RELOADING=1 with MONOTONIC_USEC=, at the start of a reload."""
        self._send(f"RELOADING=1\nMONOTONIC_USEC={_monotonic_usec()}")

    def stopping(self) -> None:
        """STOPPING=1, at the start of a stop."""
        self._send("STOPPING=1")

    def status(self, text: str, *, force: bool = False) -> None:
        """STATUS=, at most once per ``status_interval`` unless *force*.

        A change that arrives too soon is kept and sent by a later call
        to ``status()``, ``flush_status()`` or ``watchdog()``; an unchanged
        line is not sent again.
        """
        if not self.enabled:
            return
        line = _one_line(text)
        if line == self._status_sent and self._status_pending is None:
            return
        self._status_pending = line
        if force or self._clock() - self._status_sent_at >= self._status_interval:
            self.flush_status(force=True)

    def flush_status(self, *, force: bool = False) -> None:
        """Send a held-back STATUS= line once its interval has passed."""
        if self._status_pending is None:
            return
        if not force and self._clock() - self._status_sent_at < self._status_interval:
            return
        line, self._status_pending = self._status_pending, None
        if line != self._status_sent:
            self._record_status(line)
            self._send(f"STATUS={line}", wait=False)

    def status_deadline(self) -> float | None:
        """When a held-back STATUS= line becomes due (on ``clock``), or None."""
        if self._status_pending is None:
            return None
        return self._status_sent_at + self._status_interval

    def extend_timeout(self, seconds: float) -> None:
        """EXTEND_TIMEOUT_USEC=: the current stop (or start) needs *seconds* more."""
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"extend_timeout: {seconds!r} is not a positive duration")
        self._send(f"EXTEND_TIMEOUT_USEC={math.ceil(seconds * 1_000_000)}")

    def watchdog_interval(self) -> float | None:
        """Seconds between ``watchdog()`` calls (half of WATCHDOG_USEC), or None."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def watchdog(self) -> None:
        """WATCHDOG=1 (only when the watchdog is on); also flushes STATUS=."""
        if self._watchdog_usec is None:
            return
        self._send("WATCHDOG=1", wait=False)
        self.flush_status()

    def fatal(self, errno: int, status: str) -> None:
        """ERRNO= and STATUS= with the reason the master is giving up."""
        if errno < 0:
            raise ValueError(f"fatal: errno {errno} is negative")
        self._send_status_with(f"ERRNO={errno}", status)

    def main_pid(self, pid: int) -> None:
        """MAINPID=: *pid* (a new master after an upgrade) is now the main process."""
        if pid <= 0:
            raise ValueError(f"main_pid: {pid} is not a process id")
        self._send(f"MAINPID={pid}")

    def store_fds(self, fds: Mapping[str, int]) -> None:
        """FDSTORE=1 with FDNAME=, one message per listening socket.

        Only listening sockets may be stored: anything else raises
        ``SystemdError`` before a message is sent.  Store only sockets
        the master bound itself; one inherited from a ``.socket`` unit is
        passed again on every start anyway.  systemd keeps them only if
        the service sets ``FileDescriptorStoreMax=``.
        """
        for name, fd in fds.items():
            if not valid_fd_name(name):
                raise SystemdError(f"store_fds: invalid descriptor name {name[:300]!r}")
            check_listening(InheritedSocket(fd, name))
        for name, fd in fds.items():
            self._send(f"FDSTORE=1\nFDNAME={name}", fds=(fd,))

    # -- sending --------------------------------------------------------

    def _send_status_with(self, first: str, status: str) -> None:
        if not self.enabled:
            return
        line = _one_line(status)
        self._status_pending = None
        self._record_status(line)
        self._send(f"{first}\nSTATUS={line}")

    def _record_status(self, line: str) -> None:
        self._status_sent = line
        self._status_sent_at = self._clock()

    def _send(self, message: str, *, fds: tuple[int, ...] = (), wait: bool = True) -> None:
        """Send one datagram; never raises for delivery problems.

        *wait* False is for messages that a later one supersedes
        (WATCHDOG=1, STATUS=): they are dropped if the queue is full.
        """
        if self._address is None:
            return
        data = message.encode()
        if len(data) > NOTIFY_MAX_BYTES:
            raise ValueError(f"notification of {len(data)} bytes exceeds {NOTIFY_MAX_BYTES}")
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # A kernel-side send timeout keeps the socket blocking (no
                # busy retry) but bounds the wait for a full receive queue.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(SEND_TIMEOUT))
                sock.sendmsg([data], ancillary, 0 if wait else socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            self._delivery_failed(message, exc)

    def _delivery_failed(self, message: str, exc: OSError) -> None:
        first = message.split("\n", 1)[0]
        if exc.errno in (errno_mod.EAGAIN, errno_mod.EWOULDBLOCK):
            log.debug("notify socket busy, dropped %s", first)
            return
        if self._warned:
            log.debug("notify failed for %s: %s", first, exc)
            return
        self._warned = True
        log.warning(
            "cannot notify systemd at %s (%s); carrying on without it",
            self._text,
            exc.strerror or exc,
            extra={"event": "notify_failed"},
        )


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    if "WATCHDOG_USEC" not in environ:
        return None
    usec = _parse_int(environ, "WATCHDOG_USEC", low=1, high=2**64 - 2)
    if "WATCHDOG_PID" in environ:
        pid = _parse_int(environ, "WATCHDOG_PID", low=1, high=2**31 - 1)
        if pid != os.getpid():
            log.info(
                "watchdog is for pid %d, not this process (%d); not pinging it",
                pid,
                os.getpid(),
                extra={"event": "watchdog_ignored"},
            )
            return None
    return usec
