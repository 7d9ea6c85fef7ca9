"""What every worker class shares: its context, its channel, one connection.

A worker's channel socket stays blocking: sends are small and the
master reads them promptly; receives wait in a selector first and then
use ``MSG_DONTWAIT``.  The one exception is bounded: a sync worker that
has just closed a connection waits for the next inside ``recvmsg``, for
at most ``SO_RCVTIMEO`` (``WorkerChannel.wait_after_freed``), as a plain
blocking worker would, rather than paying a failed receive, a selector
wake-up and the reserve's two ``setrlimit`` calls each time it runs dry.

Each receive has the worker's descriptor reserve (``workers.reserve``)
to itself.  A worker whose reserve was needed is out of descriptors:
its channel stops receiving (``WorkerChannel.exhausted``) and says
LEAVING, so the master takes back at once what is queued on it and
starts a successor; the worker finishes what it holds and exits with
``EXIT_RUNTIME_ERROR``.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from forkserver import channel, fdpass
from forkserver.channel import HandlerError, MasterMessage
from forkserver.handler import HandlerKind, LoadedHandler, ServerInfo, WorkerClass
from forkserver.hooks import HookTarget
from forkserver.log import use_log_file
from forkserver.workers import preamble
from forkserver.workers.handshakes import Handshakes
from forkserver.workers.preamble import Preamble, Refusals
from forkserver.workers.reserve import DescriptorReserve
from forkserver.workers.timing import ConnectionTimes

#: The most seconds between heartbeats (and stats) from a worker's loop;
#: the master asks for more often when its ``timeout`` is short.
HEARTBEAT_INTERVAL = 1.0

access = logging.getLogger("forkserver.access")
log = logging.getLogger("forkserver.worker")

#: Worker exit codes the master understands.
EXIT_OK = 0
EXIT_BOOT_ERROR = 3  # setting up or loading the handler failed: it never served
EXIT_RUNTIME_ERROR = 4  # it served, then could not go on (out of descriptors, a failure of its own)
#: What the master adds to such an exit in its log.
EXIT_MEANINGS: Final = {
    EXIT_BOOT_ERROR: "boot failure: it could not start, see its log",
    EXIT_RUNTIME_ERROR: "runtime failure: it could not go on serving, see its log",
}


@dataclass(slots=True)
class WorkerContext:
    """Everything a worker is told by the master that forked it."""

    slot: int
    master_pid: int
    channel: socket.socket
    handler_spec: str
    worker_class: WorkerClass
    concurrency: int
    listener_names: tuple[str, ...]
    name: str = ""
    user: str | None = None
    group: str | None = None
    handler: LoadedHandler | None = None
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    served: int = 0
    errors: int = 0
    in_flight: int = 0
    keep_fds: set[int] = field(default_factory=set)
    access_log: bool = False
    #: ``access_log_format`` when it is not the default (None: the built-in line).
    access_log_format: str | None = None
    event_loop: str = "asyncio"  # asyncio workers: "asyncio" or "uvloop"
    #: (listener index, descriptor) of each ``dispatch = "shared"`` listener:
    #: kept open across boot (see ``keep_fds``), accepted from by the worker.
    shared_listeners: tuple[tuple[int, int], ...] = ()
    #: (family, type, proto) of each listener's connections, learnt from the first.
    socket_kinds: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    #: SIGTERM arrived before the worker loop set its own handler (see ``boot``).
    term_received: bool = False
    #: Descriptor numbers kept for the channel's receives (set at boot).
    reserve: DescriptorReserve | None = None
    #: READY was sent: from then on a failure is a runtime one, not a boot one.
    serving: bool = False
    #: Write end of the stack-dump pipe (``faulthandler`` writes there); -1: stderr.
    stack_dump_fd: int = -1
    #: Each listener's steps before the handler (``workers.preamble``); () when none has any.
    preambles: tuple[Preamble | None, ...] = ()
    #: Connections a preamble closed, per listener and reason (sent with the stats).
    refusals: Refusals = field(default_factory=Refusals)
    #: The worker hooks that are set (``hooks.configured``): a spec, or a callable.
    hooks: dict[str, HookTarget] = field(default_factory=dict)
    #: How long the connections whose handler ran took, per listener (sent with the stats).
    durations: ConnectionTimes = field(default_factory=ConnectionTimes)
    #: TLS handshakes done and failed, per listener and reason (sent with the stats).
    handshakes: Handshakes = field(default_factory=Handshakes)
    #: The last connection ``serve_blocking`` served was closed by the worker
    #: itself (the handler neither detached nor kept it): its descriptor
    #: number is free again (see ``WorkerChannel.receive_one``).
    number_freed: bool = False

    def __post_init__(self) -> None:
        self.refusals.slot, self.refusals.describe = self.slot, format_peer  # its log lines
        self.handshakes.slot, self.handshakes.describe = self.slot, format_peer

    def listener_name(self, index: int) -> str:
        if 0 <= index < len(self.listener_names):
            return self.listener_names[index]
        return f"listener {index}"

    def listener_family(self, index: int) -> int | None:
        """The address family of *index*'s connections, once one was seen."""
        kind = self.socket_kinds.get(index)
        return kind[0] if kind is not None else None


_MAX_MESSAGE: Final = channel.MAX_MESSAGE_SIZE
_MAX_FDS: Final = fdpass.SCM_MAX_FD
_RECV_SIZE, _RECV_SPACE, _RECV_FLAGS = fdpass.recv_args(_MAX_MESSAGE, _MAX_FDS, nonblocking=True)
_WAIT_FLAGS: Final = fdpass.recv_args(_MAX_MESSAGE, _MAX_FDS)[2]
_TIMEVAL: Final = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO
_TRUNCATED: Final = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_SOL_SOCKET: Final = int(socket.SOL_SOCKET)
_SCM_RIGHTS: Final = int(socket.SCM_RIGHTS)
_ONE_FD: Final = struct.Struct("i")
_ONE_FD_SIZE: Final = _ONE_FD.size
_unpack_fd: Final = _ONE_FD.unpack


class ChannelClosed(Exception):
    """The master's end of the channel is gone."""


class WorkerChannel:
    """The worker's side of the supervisor channel."""

    def __init__(
        self, sock: socket.socket, reserve: DescriptorReserve | None = None, slot: int = 0
    ) -> None:
        self.sock = sock
        self.slot = slot  # for the log
        self.reserve = reserve if reserve is not None else DescriptorReserve(0)
        #: A received number below this took nothing from the reserve (with no
        #: reserve: every number does, even under an infinite limit).
        self._floor = self.reserve.floor if self.reserve.size else sys.maxsize
        self._recvmsg = sock.recvmsg
        #: ``recvmsg`` flags when a number was freed (``wait_after_freed``).
        self._freed_flags = _RECV_FLAGS
        #: The worker ran out of descriptors: nothing more is received.
        self.exhausted = False
        self._send_lock = threading.Lock()

    def fileno(self) -> int:
        return self.sock.fileno()

    def wait_after_freed(self, seconds: float) -> None:
        """Let a receive with a number freed wait up to *seconds* for its message.

        For a worker with nothing else to watch (a sync worker without
        shared listeners): it blocks in ``recvmsg`` as a plain blocking
        worker does, and the kernel's ``SO_RCVTIMEO`` bounds the wait, so
        a signal's flag is seen within *seconds* (its handler runs at
        once, then the receive waits out a fresh bound).
        """
        whole = int(seconds)
        micro = round((seconds - whole) * 1e6) or (0 if whole else 1)  # zero: no bound at all
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(whole, micro))
        self._freed_flags = _WAIT_FLAGS

    def send(self, message: channel.WorkerMessage) -> None:
        self.send_bytes(channel.encode(message))

    def send_done(self, count: int) -> None:
        """DONE for *count* connections: once per connection, so kept cheap."""
        self.send_bytes(channel.encode_done(count))

    def send_bytes(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.send(data)
            except (BrokenPipeError, ConnectionResetError):
                raise ChannelClosed from None

    def receive(self) -> list[tuple[MasterMessage, list[int]]]:
        """Every message queued now, with its descriptors (empty: none yet).

        Raises ``ChannelClosed`` at end of file.  A malformed message from
        the master raises ``ProtocolError`` after closing its descriptors.
        Once ``exhausted``, nothing more is received.
        """
        received: list[tuple[MasterMessage, list[int]]] = []
        while (message := self.receive_one()) is not None:
            received.append(message)
        return received

    def receive_one(self, freed: bool = False) -> tuple[MasterMessage, list[int]] | None:
        """The next queued message with its descriptors, or None if none is queued.

        (With *freed* after ``wait_after_freed``: or None if none came
        within its bound.)

        What is left queued stays the master's to take back if this
        worker dies, so a worker that serves one message at a time can
        lose only the connections it is serving.  The message that
        leaves the worker out of descriptors is returned, with
        ``exhausted`` set; after it, None, whatever is queued.

        *freed*: the caller has just closed a descriptor of its own, below
        the reserve, and opened none since, so one number is free for a
        message of one descriptor (all a sync worker is sent) without the
        reserve's two ``setrlimit`` calls.
        """
        if self.exhausted:
            return None
        try:
            if freed:
                data, ancillary, msg_flags, _ = self._recvmsg(_RECV_SIZE, _RECV_SPACE,
                                                              self._freed_flags)
            else:
                data, ancillary, msg_flags, _ = self._recvmsg_reserved()
        except BlockingIOError:
            return None
        # What the master sends a sync worker: CONNECTIONS with one descriptor,
        # received whole, below the reserve.  Anything else takes fdpass.unpack.
        known = channel.ONE_CONNECTION.get(data)
        if known is not None and not msg_flags & _TRUNCATED and len(ancillary) == 1:
            level, kind, payload = ancillary[0]
            if level == _SOL_SOCKET and kind == _SCM_RIGHTS and len(payload) == _ONE_FD_SIZE:
                (fd,) = _unpack_fd(payload)
                if fd < self._floor:
                    return known, [fd]
        reserve = self.reserve
        try:
            data, fds = fdpass.unpack(data, ancillary, msg_flags, _MAX_MESSAGE, _MAX_FDS)
        except fdpass.DescriptorsLost as exc:
            self._lost(exc)
            return None
        if not data and not fds:
            raise ChannelClosed
        if reserve.size and fds and reserve.exhausted_by(fds):
            self.exhausted = True
            log.error(
                "worker %d (pid %d) is out of descriptors (RLIMIT_NOFILE %d, all %d below "
                "its reserve taken): it takes no more connections, finishes those it holds "
                "and exits", self.slot, os.getpid(), reserve.limit, reserve.floor,
                extra={"event": "worker_out_of_descriptors", "slot": self.slot,
                       "pid": os.getpid(), "limit": reserve.limit, "lost": 0},
            )  # fmt: skip
            self._leave(f"is out of descriptors (RLIMIT_NOFILE {reserve.limit})")
        return _decode(data, fds), fds

    def _recvmsg_reserved(self) -> tuple[bytes, list[tuple[int, int, bytes]], int, object]:
        """``recvmsg`` with the reserved numbers open to it, and only to it."""
        reserve = self.reserve
        reserve.open()
        try:
            return self._recvmsg(_RECV_SIZE, _RECV_SPACE, _RECV_FLAGS)
        finally:
            reserve.close()

    def _leave(self, reason: str) -> None:
        """LEAVING: the master takes back what is queued here, and replaces this worker.

        Raises ``ChannelClosed`` if the master is gone (the worker goes at once then).
        """
        self.send(channel.Leaving(reason=reason))

    def _lost(self, exc: fdpass.DescriptorsLost) -> None:
        """A message whose descriptors the kernel could not install: they are gone."""
        self.exhausted = True
        try:
            message = channel.decode_master_message(exc.data)
        except channel.ProtocolError:
            message = None
        lost = len(message.listeners) if isinstance(message, channel.Connections) else 0
        log.error(
            "worker %d (pid %d) is %s; %d connections of that message are lost; it takes "
            "no more connections, finishes those it holds and exits",
            self.slot, os.getpid(), exc, lost,
            extra={"event": "worker_out_of_descriptors", "slot": self.slot,
                   "pid": os.getpid(), "limit": self.reserve.limit, "lost": lost},
        )  # fmt: skip
        self._leave(f"is out of descriptors (RLIMIT_NOFILE {self.reserve.limit}): "
                    f"{lost} connections lost")  # fmt: skip


def _decode(data: bytes, fds: list[int]) -> MasterMessage:
    one = channel.ONE_CONNECTION.get(data)
    if one is not None and len(fds) == 1:  # the usual message, decoded once for all
        return one
    try:
        message = channel.decode_master_message(data)
        expected = channel.descriptors_expected(message)
        if len(fds) != expected:
            raise channel.ProtocolError(
                f"{type(message).__name__} came with {len(fds)} descriptors, expected {expected}"
            )
    except channel.ProtocolError:
        fdpass.close_all(fds)
        raise
    return message


def refusal_reports(ctx: WorkerContext) -> list[channel.Refusals | channel.Handshakes]:
    """REFUSALS and HANDSHAKES for the counts that moved since the last stats."""
    changed = ctx.refusals.take_changed()
    step = channel.MAX_REFUSAL_ENTRIES
    reports: list[channel.Refusals | channel.Handshakes] = [
        channel.Refusals(changed[at : at + step]) for at in range(0, len(changed), step)]
    shaken = ctx.handshakes.take_changed()
    return reports + [channel.Handshakes(shaken[at : at + step])
                      for at in range(0, len(shaken), step)]  # fmt: skip


def stats_reports(
    ctx: WorkerContext,
) -> list[channel.Refusals | channel.Handshakes | channel.Durations]:
    """What goes with the stats besides STATS: the counts that moved since the last time."""
    return [*refusal_reports(ctx), *ctx.durations.reports()]


def reopen_log(ctx: WorkerContext, fds: list[int]) -> None:
    """REOPEN: log to the file that came with it (the connections held are untouched)."""
    if use_log_file(fds[0]):
        log.info("worker %d (pid %d) logs to the reopened log file", ctx.slot, os.getpid(),
                 extra={"event": "worker_log_reopened", "slot": ctx.slot,
                        "pid": os.getpid()})  # fmt: skip


def format_peer(peer: object, family: int | None = None) -> str:
    """The peer for a log line; *family* is its listener's, when known.

    An address nobody could learn (``getpeername`` fails on a connection
    the peer has already reset) is "unix" only on a Unix socket, where
    an unnamed peer is the rule; elsewhere it is "unknown".
    """
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if peer:
        return str(peer)
    return "unix" if family == socket.AF_UNIX else "unknown"


def error_report(
    exc: BaseException, listener: int, peer: object, family: int | None = None
) -> HandlerError:
    return HandlerError(
        listener=listener,
        exc_type=f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
        peer=format_peer(peer, family),
    )


def adopt(ctx: WorkerContext, fd: int, listener: int, blocking: bool | None) -> socket.socket:
    """A socket object owning the received descriptor *fd* from *listener*.

    ``socket.socket(fileno=fd)`` asks the kernel for the family, type and
    protocol (a getsockname and two getsockopt calls) every time; every
    connection of one listener has the same three, so only its first
    one asks.  *blocking* None leaves the descriptor's mode alone (the
    caller sets it); True skips the ioctl when it would change nothing:
    the master accepts without ``SOCK_NONBLOCK``, so a received
    descriptor is blocking, as Python assumes without a default timeout.
    """
    kind = ctx.socket_kinds.get(listener)
    try:
        if kind is None:
            sock = socket.socket(fileno=fd)
            ctx.socket_kinds[listener] = (sock.family, sock.type, sock.proto)
        else:
            sock = socket.socket(*kind, fileno=fd)
    except OSError:
        fdpass.close_all([fd])
        raise
    if blocking is False or (blocking and socket.getdefaulttimeout() is not None):
        sock.setblocking(blocking)
    return sock


def peer_of(sock: socket.socket) -> object:
    try:
        return sock.getpeername()
    except OSError:
        return ""


_REQUEST_HANDLER: Final = HandlerKind.REQUEST_HANDLER
_socket: Final = socket.socket
_default_timeout: Final = socket.getdefaulttimeout


def serve_blocking(  # noqa: PLR0912 (every connection's path, kept in one frame)
    ctx: WorkerContext, fd: int, listener: int, peer: object = None
) -> HandlerError | None:
    """Run a sync handler on one connection; close it; report what went wrong.

    *peer* is the address ``accept()`` returned, if this worker accepted
    it; otherwise (a descriptor from the master) it is asked for.
    """
    handler = ctx.handler
    assert handler is not None
    started = time.monotonic()
    kind = ctx.socket_kinds.get(listener)
    if kind is not None and _default_timeout() is None:
        # adopt()'s own path, without its frame: every connection comes here.
        # The master accepts without SOCK_NONBLOCK: the descriptor is blocking already.
        try:
            conn = _socket(*kind, fileno=fd)
        except OSError as exc:
            fdpass.close_all([fd])
            return error_report(exc, listener, "", kind[0])
    else:
        try:
            conn = adopt(ctx, fd, listener, True)
        except OSError as exc:
            return error_report(exc, listener, "", ctx.listener_family(listener))
    if peer is None:
        try:
            peer = conn.getpeername()
        except OSError:
            peer = ""  # reset already: the peer is gone, and so is its name
    step = ctx.preambles[listener] if ctx.preambles else None
    if step is not None:  # PROXY: who is it, and the header; TLS: the handshake
        admitted = preamble.admit_blocking(step, ctx.refusals, conn, listener, peer,
                                           handshakes=ctx.handshakes)  # fmt: skip
        if admitted is None:
            conn.close()
            return None
        conn, peer = admitted
    call: Callable[..., object] = handler.target  # type: ignore[assignment]
    error = None
    try:
        if handler.kind is _REQUEST_HANDLER:
            info = ServerInfo(server_address=_sockname(conn), listener=ctx.listener_name(listener))
            call(conn, peer, info)
        else:
            call(conn, peer)
    except BaseException as exc:
        # Whatever the handler raises is its error, never the worker's end:
        # sys.exit(), KeyboardInterrupt (workers ignore SIGINT, so only the
        # handler can raise one), GeneratorExit, a BaseException of its own.
        error = error_report(exc, listener, peer, ctx.listener_family(listener))
    finally:
        owned = conn.fileno() >= 0  # not detached, nor closed by the handler
        conn.close()
        if step is not None:
            preamble.forget(tls=step.tls is not None)
        elapsed = time.monotonic() - started
        ctx.durations.observe(listener, elapsed)
        if ctx.access_log:
            log_access(ctx, listener, peer, elapsed, failed=error is not None,
                       exc_type=error.exc_type if error is not None else "")
        # A descriptor a file object still uses stays open (socket.makefile).
        ctx.number_freed = owned and conn.fileno() < 0
    return error


def log_access(ctx: WorkerContext, listener: int, peer: object, elapsed: float, *,
               failed: bool, exc_type: str = "") -> None:
    """One access line per connection: where, who, which worker, how long (*elapsed* s).

    What was said on the connection (bytes, status) is the handler's
    business: the worker never reads client bytes itself, so it cannot
    count them without wrapping every socket call the handler makes.
    The default line is formatted by ``logging`` with ``%``, the cheapest
    path; an ``access_log_format`` of one's own costs one ``str.format_map``.
    """
    elapsed_ms = elapsed * 1e3  # seconds, as the duration histogram observed them
    name, who = ctx.listener_name(listener), format_peer(peer, ctx.listener_family(listener))
    extra = {"event": "connection_served", "listener": name, "peer": who,
             "slot": ctx.slot, "duration_ms": round(elapsed_ms, 3), "ok": not failed}  # fmt: skip
    template = ctx.access_log_format
    if template is None:
        access.info("%s %s worker %d %.1f ms%s", name, who, ctx.slot, elapsed_ms,
                    " (handler error)" if failed else "", extra=extra)  # fmt: skip
        return
    access.info("%s", template.format_map({
        "listener": name, "peer": who, "worker": ctx.slot, "pid": os.getpid(),
        "duration_ms": elapsed_ms, "status": "error" if failed else "ok",
        "error": " (handler error)" if failed else "", "exc_type": exc_type or "-",
    }), extra=extra)  # fmt: skip


def _sockname(sock: socket.socket) -> object:
    try:
        return sock.getsockname()
    except OSError:
        return ""
