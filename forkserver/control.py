"""The control socket: a small request/reply server in the master's loop,
and the client behind ``forkserver ctl``.

Wire format
-----------
One request per connection.  The client sends one JSON object and a
newline (at most ``MAX_REQUEST`` bytes)::

    {"command": "scale", "args": {"workers": 4}}

and the server answers with one JSON object and a newline, then closes::

    {"ok": true, "result": ...}
    {"ok": false, "error": "why", "denied": false}

The answer may come later than the request: a command whose outcome is
known only later (``reload``) returns a :class:`Deferred`, and the
client stays connected until it is settled (or its own timeout ends the
wait).

Where the socket is: :func:`socket_path`, the one rule ``run``, ``ctl``
and ``check-config`` share (``control_socket``; else
``$RUNTIME_DIRECTORY``; else ``/run/forkserver[-NAME]`` for root,
``$XDG_RUNTIME_DIR/forkserver[-NAME]`` for others).

Security: the socket is created mode 0600 (under umask 0177, so it is
never more open, not even for an instant).  ``SO_PEERCRED`` is checked on
every connection: only root and the daemon's own uid are served, anyone
else gets ``{"ok": false, "denied": true, ...}`` and a ``control_denied``
log event.  The server never blocks the loop: every socket is
non-blocking, requests are size-limited, and a client that does not send
a complete request within ``client_timeout`` seconds is dropped.

Wiring (in the master, once its loop exists)::

    server = control.open_control(loop, settings, {
        "status": master.status, "reload": master.request_reload,
        "scale": master.scale, "stop": master.request_stop,
        "reopen-logs": master.reopen_logs})      # None: the default path was taken
    ...
    if server is not None:
        server.close()                           # on the way out; removes the file
    # and in each forked worker, before anything else:
    server.discard_after_fork()                  # its copies of the sockets

Commands the master supplies
----------------------------
:class:`ControlServer` takes a mapping of command name to callable, so it
knows nothing of the master's internals.  Arguments are validated here;
the callables get clean keyword arguments and must not block (``stop``
begins its work and returns; ``reload`` begins and returns a
:class:`Deferred` that the reload's outcome settles).  To fail cleanly, raise
:class:`CommandError` (or any ``ForkserverError``) with a message for
the operator; any other exception is logged and answered with an error,
never raised out of the loop.

===============  ======================================  ===============
command          called as                               returns
===============  ======================================  ===============
``status``       ``status()``                            the mapping below
``reload``       ``reload()``                            a Deferred (or a mapping)
``scale``        ``scale(workers=N)`` or ``scale(by=D)``  mapping or None
``kill``         ``kill(worker=W)`` or                   mapping or None
                 ``kill(worker=W, signal_name=NAME)``
``stop``         ``stop(graceful=True|False)``           None
``reopen-logs``  ``reopen_logs()``                       None
``metrics``      ``metrics()``                           the Prometheus text
===============  ======================================  ===============

The requests behind them: ``{"workers": N}`` (1 ≤ N ≤ ``MAX_WORKERS``)
or ``{"by": D}`` for ``scale``: a relative change the master resolves
against its current target, never below 1 nor above ``MAX_WORKERS``
(``forkserver ctl scale +1``); ``{"worker": W}`` for ``kill``, W a
worker's pid or else a slot: the worker is retired (it finishes its
connections, a successor starts at once), or with ``{"signal": NAME}``
(one of ``KILL_SIGNALS``) sent that signal instead.

``status()`` returns::

    {
      "master": {
        "pid": int, "name": str,
        "started": float,            # time.time() when the master started
        "generation": int,           # bumped by each completed reload
        "state": str,                # "starting" | "running" | "degraded" | "reloading"
                                     # | "draining" | "stopping"; degraded: some slot's
                                     # workers keep dying before they are ready (see
                                     # "failing"); draining: drain_delay after a stop
        "draining": bool,            # the health answers say drain (a stop has begun)
        "health": str | None,        # where the health listener answers (health_bind)
        "workers_target": int,       # how many workers it wants
        "pending": int,              # accepted connections queued in the master
        "accepting": bool,           # False while accept is paused
        "listeners": [{"name": str, "address": str,   # TcpServer.describe()
                       "fd": int, "inode": int,       # os.fstat(fd).st_ino
                       "backlog": int | None,         # now in the kernel's accept queue
                       "backlog_limit": int | None,   # the most it holds; both None
                                                      # for a Unix socket
                       "refused": {str: int},         # reason: connections closed before
                                                      # the handler (PROXY header, allow list)
                       "handshakes": {str: int}}],    # TLS: "done", and failed by reason
        "totals": {"served": int, "in_flight": int, "spawned": int,
                   "deaths": int,          # workers that died without being asked to
                   "restarts": int,        # the same as deaths (the older name)
                   "replaced": int,        # workers retired on purpose for a successor:
                                           # reload, max_requests, max_memory, ctl kill
                   "handler_errors": int,  # exceptions the handler raised
                   "errors": int},         # the same as handler_errors (the older name)
                                           # every total counts for the master's life:
                                           # a reload or scale-down never lowers one
        "failing": [{"slot": int,          # slots in crash back-off, with no ready worker
                     "crashes": int,       # consecutive crashes
                     "respawn_in": float | None}],  # seconds; None: its worker is starting
        "last_reload_error": str | None,
      },
      "workers": [{
        "slot": int, "pid": int, "generation": int,
        "state": str,                # the worker table's state name
        "started": float,            # time.time() at fork
        "served": int, "in_flight": int,
        "deaths": int, "restarts": int,  # unplanned deaths in this slot (restarts: older name)
        "replaced": int,             # its workers retired on purpose for a successor
        "last_exit": str | None,     # how the previous process in the slot ended
        "last_error": str | None,    # the last handler error it reported
      }, ...],
    }

The server adds what it can measure itself, so the master need not:
``master.uptime`` and each worker's ``age`` (from ``started``), and from
psutil each process's ``rss``, ``uss`` (bytes) and ``cpu_percent`` (since
the previous status request; over its lifetime on the first).  Keys the
master already set are left alone.  The reply also carries
``"schema": 1``; keys are only ever added, never renamed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeGuard

import psutil

from forkserver.config import Settings
from forkserver.errors import ForkserverError
from forkserver.eventloop import EventLoop, TimerHandle
from forkserver.ratelimit import LogLimiter
from forkserver.tcpserver import TcpServer

__all__ = [
    "AttemptReplies",
    "BadReply",
    "CommandError",
    "CommandFailed",
    "ControlError",
    "ControlRefused",
    "ControlServer",
    "ControlTimeout",
    "ControlUnavailable",
    "Deferred",
    "SocketPath",
    "check_private_dir",
    "default_socket_path",
    "format_result",
    "format_status",
    "open_control",
    "request",
    "socket_path",
]

log = logging.getLogger(__name__)

MAX_REQUEST: Final = 64 * 1024
MAX_REPLY: Final = 16 * 1024 * 1024
MAX_CLIENTS: Final = 32
MAX_WAIT: Final = 600.0           # seconds a deferred reply may take
MAX_WORKERS: Final = 4096         # the bound of the ``workers`` setting
STATUS_SCHEMA: Final = 1
#: At most one "accept failed" warning per this many seconds.
ACCEPT_FAILED_LOG_INTERVAL: Final = 10.0
_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlError(ForkserverError):
    """The control socket cannot be set up, or a client call failed."""


class CommandError(ControlError):
    """Raised by a command callable: the message goes back to the client."""


class ControlUnavailable(ControlError):
    """No daemon is listening on the control socket."""


class ControlRefused(ControlError):
    """The daemon (or the socket's file mode) refused us."""


class ControlTimeout(ControlError):
    """The daemon did not reply in time."""


class CommandFailed(ControlError):
    """The daemon answered with an error."""


class BadReply(ControlError):
    """The reply was not what the protocol promises."""


class Deferred:
    """The answer to a control command that is known only later.

    A command returns one instead of its result; whoever learns the
    outcome calls :meth:`resolve` or :meth:`fail` (the first call counts,
    later ones are ignored).  The server keeps the client connected until
    then, without blocking the loop; the client's own timeout bounds its
    wait, and the server answers with an error after ``MAX_WAIT`` seconds
    or when it closes."""

    def __init__(self) -> None:
        self.reply: dict[str, Any] | None = None
        self._callbacks: list[Callable[[], None]] = []

    @property
    def done(self) -> bool:
        return self.reply is not None

    def resolve(self, result: Any = None) -> None:
        self._settle({"ok": True, "result": result})

    def fail(self, message: str) -> None:
        self._settle({"ok": False, "error": message})

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call *callback* once settled (at once if it is already)."""
        if self.reply is not None:
            callback()
        else:
            self._callbacks.append(callback)

    def _settle(self, reply: dict[str, Any]) -> None:
        if self.reply is not None:
            return
        self.reply = reply
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class AttemptReplies:
    """Deferred replies for an operation that runs one attempt at a time,
    each attempt ending in exactly one outcome (``succeeded`` or
    ``failed``), as reloads do.

    A request made while no attempt is under way is answered by the
    attempt it starts; one made during an attempt is answered by the next
    one (requests made meanwhile merge into it), since only that one sees
    what the requester changed."""

    def __init__(self) -> None:
        self._this: list[Deferred] = []
        self._next: list[Deferred] = []

    def expect(self, *, during_attempt: bool) -> Deferred:
        reply = Deferred()
        (self._next if during_attempt else self._this).append(reply)
        return reply

    def succeeded(self, result: Any = None) -> None:
        for reply in self._advance():
            reply.resolve(result)

    def failed(self, message: str) -> None:
        for reply in self._advance():
            reply.fail(message)

    def _advance(self) -> list[Deferred]:
        settled, self._this, self._next = self._this, self._next, []
        return settled


#: Where the control socket lives when ``control_socket`` is not set: the
#: first that applies of systemd's ``$RUNTIME_DIRECTORY``, ``/run`` for root,
#: ``$XDG_RUNTIME_DIR`` for other users, and a private directory in /tmp.
ROOT_RUNTIME_DIR: Final = "/run"
FALLBACK_DIR: Final = "/tmp"  # noqa: S108 - checked by check_private_dir before use
SOCKET_NAME: Final = "control.sock"


@dataclass(frozen=True, slots=True)
class SocketPath:
    """Where the control socket is, and which rule put it there.

    ``configured``: the ``control_socket`` setting named it (a taken or
    unusable path is then an error, not a warning).  ``private_parent``:
    its directory sits in a world-writable one, so it must be ours and
    closed to others before the socket in it is trusted."""

    path: str
    origin: str
    configured: bool = False
    private_parent: bool = False


def socket_path(control_socket: str | None, name: str = "",
                environ: Mapping[str, str] = os.environ,
                uid: int | None = None) -> SocketPath:
    """The one rule that places the control socket, for ``run``, ``ctl`` and
    ``check-config`` alike:

    1. the ``control_socket`` setting;
    2. ``$RUNTIME_DIRECTORY/control.sock`` (under systemd: the unit's
       ``RuntimeDirectory=``; the first one if it lists several);
    3. for root, ``/run/forkserver/control.sock`` (where the shipped unit's
       ``RuntimeDirectory=forkserver`` puts it, so a root shell finds it);
    4. for other users, ``$XDG_RUNTIME_DIR/forkserver/control.sock``;
    5. else ``/tmp/forkserver-UID/control.sock``.

    With ``name`` set, the directory is ``forkserver-NAME`` (as the
    template unit's ``RuntimeDirectory=forkserver-%i``), so daemons with
    different names never share a socket."""
    if control_socket:
        return SocketPath(control_socket, "the control_socket setting", configured=True)
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return SocketPath(os.path.join(runtime, SOCKET_NAME), "$RUNTIME_DIRECTORY (systemd)")
    uid = os.geteuid() if uid is None else uid
    directory = "forkserver-" + name.replace("/", "_") if name else "forkserver"
    if uid == 0:
        return SocketPath(os.path.join(ROOT_RUNTIME_DIR, directory, SOCKET_NAME),
                          "/run, for root")
    xdg = environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(xdg):
        return SocketPath(os.path.join(xdg, directory, SOCKET_NAME), "$XDG_RUNTIME_DIR")
    return SocketPath(os.path.join(FALLBACK_DIR, f"{directory}-{uid}", SOCKET_NAME),
                      "a private directory in /tmp, without $XDG_RUNTIME_DIR",
                      private_parent=True)


def default_socket_path(settings: Settings | None,
                        environ: Mapping[str, str] = os.environ) -> str:
    """:func:`socket_path` for *settings* (None: the defaults)."""
    settings = settings if settings is not None else Settings()
    return socket_path(settings.control_socket, settings.name, environ).path


def check_private_dir(directory: str) -> None:
    """Refuse a directory another user could have planted: it must be a
    real directory (not a link), ours, and closed to group and others."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"{directory}: exists and is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ControlError(f"{directory}: not a private directory of uid {os.geteuid()} "
                           f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")


def _make_parent(where: SocketPath) -> None:
    """Create the socket's directory, mode 0700, if it is missing."""
    directory = os.path.dirname(where.path) or "."
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlError(f"control socket {where.path}: cannot create {directory}: "
                           f"{exc.strerror}") from None
    if where.private_parent:
        check_private_dir(directory)


def open_control(loop: EventLoop, settings: Settings,
                 commands: Mapping[str, Callable[..., object]],
                 environ: Mapping[str, str] = os.environ) -> ControlServer | None:
    """Start the control server where :func:`socket_path` says.

    A ``control_socket`` that is taken or unusable raises
    :class:`ControlError`.  A default path that is (another daemon with no
    configuration of its own, say) is logged as a warning, and the master
    runs without a control socket: None."""
    where = socket_path(settings.control_socket, settings.name, environ)
    server = ControlServer(loop, where.path, commands)
    try:
        _make_parent(where)
        server.start()
    except ControlError as exc:
        if where.configured:
            raise
        log.warning("%s; running without a control socket (set control_socket, or give "
                    "this daemon a name, for a socket of its own)", exc,
                    extra={"event": "control_unavailable", "path": where.path})  # fmt: skip
        return None
    return server


# ------------------------------------------------------------------ requests

def _no_args(args: Mapping[str, Any]) -> dict[str, Any]:
    if args:
        raise CommandError(f"takes no arguments, got {sorted(args)}")
    return {}


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _scale_args(args: Mapping[str, Any]) -> dict[str, Any]:
    if set(args) == {"by"}:       # relative: the master resolves it against its target
        by = args["by"]
        if not _is_int(by) or not -MAX_WORKERS <= by <= MAX_WORKERS:
            raise CommandError(f'expected {{"by": N}} with N between -{MAX_WORKERS} and '
                               f"{MAX_WORKERS}")
        return {"by": by}
    n = args.get("workers")
    if set(args) != {"workers"} or not _is_int(n):
        raise CommandError('expected {"workers": N} or {"by": N}')
    if not 1 <= n <= MAX_WORKERS:
        raise CommandError(f"workers must be between 1 and {MAX_WORKERS}, got {n}")
    return {"workers": n}


#: The signals ``ctl kill --signal`` may send a worker: those SIGNALS.md gives a
#: meaning there.
KILL_SIGNALS: Final = ("TERM", "QUIT", "ABRT", "KILL")


def parse_signal_name(text: str) -> str:
    """``TERM``, ``sigterm``, ``SIGTERM`` → ``TERM``; raises ValueError naming the choices."""
    name = text.upper().removeprefix("SIG")
    if name not in KILL_SIGNALS:
        raise ValueError(f"cannot send {text!r} to a worker: expected one of "
                         f"{', '.join(KILL_SIGNALS)}")
    return name


def _kill_args(args: Mapping[str, Any]) -> dict[str, Any]:
    worker, name = args.get("worker"), args.get("signal")
    if "worker" not in args or set(args) - {"worker", "signal"} or not _is_int(worker):
        raise CommandError('expected {"worker": SLOT_OR_PID} and optionally {"signal": NAME}')
    if worker < 0:
        raise CommandError(f"no worker has pid or slot {worker}")
    if name is None:
        return {"worker": worker}
    if not isinstance(name, str):
        raise CommandError(f"signal must be a name ({', '.join(KILL_SIGNALS)})")
    try:
        return {"worker": worker, "signal_name": parse_signal_name(name[:32])}
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _stop_args(args: Mapping[str, Any]) -> dict[str, Any]:
    mode = args.get("mode", "graceful")
    if set(args) - {"mode"} or mode not in ("graceful", "fast"):
        raise CommandError('expected {"mode": "graceful"} or {"mode": "fast"}')
    return {"graceful": mode == "graceful"}


_ARGS: Final[dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]]] = {
    "status": _no_args,
    "reload": _no_args,
    "scale": _scale_args,
    "kill": _kill_args,
    "stop": _stop_args,
    "reopen-logs": _no_args,
    "metrics": _no_args,
}


def _decode_request(line: bytes) -> tuple[str, Mapping[str, Any]]:
    try:
        req = json.loads(line)
    except (ValueError, RecursionError):
        raise CommandError("malformed request: not JSON") from None
    if not isinstance(req, dict) or not isinstance(req.get("command"), str):
        raise CommandError('malformed request: expected {"command": NAME, "args": {...}}')
    args = req.get("args", {})
    if not isinstance(args, dict) or set(req) - {"command", "args"}:
        raise CommandError("malformed request: 'args' must be an object, and nothing else "
                           "may be sent")
    return req["command"], args


# ------------------------------------------------------------------ server

@dataclass(eq=False)
class _Client:
    sock: socket.socket
    pid: int
    uid: int
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytes = b""
    timer: TimerHandle | None = None
    waiting: Deferred | None = None   # a command's reply still to come


class _ControlListener(TcpServer):
    """The control socket's listener: every accepted descriptor goes to *take*.

    A ``TcpServer``, so that the control socket accepts as every other
    listener in the master does: in bounded batches, and out of the loop
    for a back-off when descriptors run out, never spinning on EMFILE.
    """

    def __init__(self, loop: EventLoop, take: Callable[[int], None]) -> None:
        super().__init__(loop=loop)
        self._take = take
        self.set_accept_batch_size(MAX_CLIENTS)

    def incoming_connection(self, socket_descriptor: int) -> None:
        self._take(socket_descriptor)


class ControlServer:
    """Serves the control socket at *path* from *loop*.

    ``start()`` creates the socket (refusing to replace a live one or a
    file that is not a socket) and registers it; ``close()`` unregisters
    and removes it.  *allowed_uids* defaults to root and our own uid.
    """

    def __init__(self, loop: EventLoop, path: str,
                 commands: Mapping[str, Callable[..., object]], *,
                 allowed_uids: frozenset[int] | None = None,
                 client_timeout: float = 5.0) -> None:
        unknown = set(commands) - set(_ARGS)
        if unknown:
            raise ValueError(f"unknown control commands: {sorted(unknown)}")
        self._loop = loop
        self.path = path
        self._commands = dict(commands)
        self._allowed = allowed_uids if allowed_uids is not None else frozenset(
            {0, os.geteuid()})
        self._timeout = client_timeout
        self._listener: _ControlListener | None = None
        self._inode = -1
        self._clients: set[_Client] = set()
        self._procs: dict[int, psutil.Process] = {}
        self._accept_log = LogLimiter(ACCEPT_FAILED_LOG_INTERVAL, loop.time)

    # -- socket life ----------------------------------------------------

    def start(self) -> None:
        _clear_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # close-on-exec
        try:
            old_umask = os.umask(0o177)       # born 0600: no window where it is wider
            try:
                sock.bind(self.path)
            finally:
                os.umask(old_umask)
            os.chmod(self.path, 0o600)
            self._inode = os.stat(self.path).st_ino
            sock.listen(MAX_CLIENTS)
        except OSError as exc:
            sock.close()
            raise ControlError(f"control socket {self.path}: {exc.strerror}") from None
        listener = _ControlListener(self._loop, self._on_accepted)
        if not listener.set_socket_descriptor(sock.fileno()):
            sock.close()
            raise ControlError(f"control socket {self.path}: {listener.error_string()}")
        sock.detach()                         # the listener owns the descriptor now
        listener.accept_error.connect(lambda error: self._accept_failed(listener))
        self._listener = listener

    def close(self) -> None:
        for client in list(self._clients):
            if client.waiting is not None and not client.outbuf:
                with contextlib.suppress(OSError):     # best effort: we are going away
                    client.sock.send(json.dumps({
                        "ok": False, "error": "the master stopped before the outcome was "
                                              "known"}).encode() + b"\n")
            self._drop(client)
        if self._listener is None:
            return
        self._listener.close()
        self._listener = None
        with contextlib.suppress(OSError):      # only our own socket file
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def discard_after_fork(self) -> None:
        """In a forked child: close our copies of the listening socket and
        of every client connection, without touching the loop or the
        socket file (both still belong to the master).  Otherwise a worker
        would keep a dropped client's connection open."""
        for client in self._clients:
            client.sock.close()
        self._clients.clear()
        if self._listener is not None:
            sock = self._listener.listening_socket()
            if sock is not None:
                sock.close()      # not listener.close(): that would unregister it
            self._listener = None  # from the epoll set the master shares with us

    def fileno(self) -> int:
        return self._listener.socket_descriptor() if self._listener is not None else -1

    # -- connections ----------------------------------------------------

    def _accept_failed(self, listener: TcpServer) -> None:
        """Out of descriptors, say: the listener backs off; say so now and then."""
        unlogged = self._accept_log.check()
        if unlogged is None:
            return
        more = f" ({unlogged} more since the last report)" if unlogged else ""
        log.warning("control socket: %s%s", listener.error_string(), more,
                    extra={"event": "accept_failed", "listener": "control",
                           "path": self.path, "unlogged": unlogged})

    def _on_accepted(self, fd: int) -> None:
        try:
            conn = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return
        try:
            self._admit(conn)
        except Exception:
            log.exception("control socket: dropping a new client after an internal error",
                          extra={"event": "control_error"})
            conn.close()

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        pid, uid, _gid = _UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid not in self._allowed:
            log.warning("control request refused: uid %d (pid %d) is not allowed", uid, pid,
                        extra={"event": "control_denied", "uid": uid, "peer_pid": pid})
            self._reply_and_close(conn, {"ok": False, "denied": True,
                                         "error": f"permission denied: uid {uid} may not "
                                                  "control this daemon"})
            return
        if len(self._clients) >= MAX_CLIENTS:
            self._reply_and_close(conn, {"ok": False, "error": "busy: too many control "
                                                                "clients, try again"})
            return
        client = _Client(conn, pid, uid)
        client.timer = self._loop.call_later(self._timeout, lambda: self._on_timeout(client))
        self._clients.add(client)
        self._loop.add_reader(conn, lambda: self._guard(client, self._on_readable))

    @staticmethod
    def _reply_and_close(conn: socket.socket, reply: Mapping[str, Any]) -> None:
        """A best-effort one-shot reply for clients we will not serve.  What
        they already sent is read first: closing a Unix socket with unread
        data makes the peer's next read fail with ECONNRESET."""
        with contextlib.suppress(OSError):
            conn.recv(MAX_REQUEST)
        with contextlib.suppress(OSError):
            conn.send(json.dumps(reply).encode() + b"\n")
        conn.close()

    def _guard(self, client: _Client, step: Callable[[_Client], None]) -> None:
        """Nothing a client does may raise out of the master's loop."""
        try:
            step(client)
        except Exception:
            log.exception("control socket: dropping a client after an internal error",
                          extra={"event": "control_error"})
            self._drop(client)

    def _on_timeout(self, client: _Client) -> None:
        if client in self._clients:
            log.info("control socket: pid %d sent no complete request in %gs; dropped",
                     client.pid, self._timeout,
                     extra={"event": "control_timeout", "peer_pid": client.pid})
            self._drop(client)

    def _on_readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.inbuf += data
        newline = client.inbuf.find(b"\n")
        if newline < 0 and len(client.inbuf) > MAX_REQUEST:
            self._respond(client, {"ok": False, "error": f"request larger than "
                                                         f"{MAX_REQUEST} bytes"})
        elif newline >= 0 or (not data and client.inbuf):
            end = newline if newline >= 0 else len(client.inbuf)
            answer = self._execute(client, bytes(client.inbuf[:end]))
            if isinstance(answer, Deferred):
                self._await(client, answer)
            else:
                self._respond(client, answer)
        elif not data:
            self._drop(client)         # closed without asking anything

    def _execute(self, client: _Client, line: bytes) -> dict[str, Any] | Deferred:
        command = "request"
        try:
            command, raw_args = _decode_request(line)
            if command not in self._commands:
                known = ", ".join(sorted(self._commands))
                raise CommandError(f"unknown command {command[:64]!r} (known: {known})")
            kwargs = _ARGS[command](raw_args)
            args = "".join(f" {key}={value}" for key, value in kwargs.items())
            log.info("control: %s%s from uid %d (pid %d)", command, args,
                     client.uid, client.pid,
                     extra={"event": "control_request", "command": command,
                            "uid": client.uid, "peer_pid": client.pid})
            result = self._commands[command](**kwargs)
            if isinstance(result, Deferred):
                return result
            if command == "status" and isinstance(result, Mapping):
                result = self._enrich(result)
            return {"ok": True, "result": result}
        except ForkserverError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control: %s failed", command,
                          extra={"event": "control_error", "command": command})
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def _await(self, client: _Client, reply: Deferred) -> None:
        """The command answers later: hold the client (reading nothing more
        from it) until *reply* is settled, or for ``MAX_WAIT`` at most."""
        self._loop.remove_reader(client.sock)
        if client.timer is not None:
            client.timer.cancel()
        client.waiting = reply
        client.timer = self._loop.call_later(MAX_WAIT, lambda: self._guard(
            client, lambda c: self._respond(c, {"ok": False, "error": f"no outcome within "
                                                                      f"{MAX_WAIT:g}s"})))
        def settled() -> None:  # inside whatever learnt the outcome: answer from the loop
            self._loop.call_soon(lambda: self._guard(client, self._deliver))

        reply.when_done(settled)

    def _deliver(self, client: _Client) -> None:
        if client in self._clients and client.waiting is not None and client.waiting.reply:
            self._respond(client, client.waiting.reply)

    def _respond(self, client: _Client, reply: Mapping[str, Any]) -> None:
        self._loop.remove_reader(client.sock)
        if client.waiting is not None:
            client.waiting = None
            if client.timer is not None:
                client.timer.cancel()
                client.timer = None
        try:
            client.outbuf = json.dumps(reply, default=str).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            client.outbuf = json.dumps({"ok": False, "error": f"unencodable reply: {exc}"}
                                       ).encode() + b"\n"
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(client)
            return
        client.outbuf = client.outbuf[sent:]
        if client.outbuf:
            self._loop.add_writer(client.sock, lambda: self._guard(client, self._flush))
        else:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        self._clients.discard(client)
        if client.timer is not None:
            client.timer.cancel()
        self._loop.remove_reader(client.sock)
        self._loop.remove_writer(client.sock)
        client.sock.close()

    # -- status figures -------------------------------------------------

    def _enrich(self, status: Mapping[str, Any]) -> dict[str, Any]:
        """Add uptime/age and psutil figures (see the module docstring)."""
        now = time.time()
        out: dict[str, Any] = {"schema": STATUS_SCHEMA, **status}
        master = dict(out.get("master") or {})
        if "started" in master:
            master.setdefault("uptime", round(now - float(master["started"]), 3))
        master.update({k: v for k, v in self._figures(master.get("pid")).items()
                       if k not in master})
        out["master"] = master
        workers = []
        for worker in out.get("workers") or []:
            w = dict(worker)
            if "started" in w:
                w.setdefault("age", round(now - float(w["started"]), 3))
            w.update({k: v for k, v in self._figures(w.get("pid")).items() if k not in w})
            workers.append(w)
        out["workers"] = workers
        live = {w.get("pid") for w in workers} | {master.get("pid")}
        for pid in set(self._procs) - live:
            del self._procs[pid]
        return out

    def _figures(self, pid: object) -> dict[str, Any]:
        if not isinstance(pid, int) or pid <= 0:
            return {}
        try:
            proc = self._procs.get(pid)
            first = proc is None
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            mem = proc.memory_full_info()
            if first:      # cpu_percent(None) has no baseline yet: use the lifetime
                cpu = proc.cpu_times()
                lifetime = max(time.time() - proc.create_time(), 1e-3)
                proc.cpu_percent(None)
                percent = 100.0 * (cpu.user + cpu.system) / lifetime
            else:
                percent = proc.cpu_percent(None)
            return {"rss": mem.rss, "uss": getattr(mem, "uss", None),
                    "cpu_percent": round(percent, 1)}
        except (psutil.Error, OSError):
            self._procs.pop(pid, None)
            return {"rss": None, "uss": None, "cpu_percent": None}


def _clear_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:             # a directory we may not search, say
        raise ControlError(f"control socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"control socket {path}: exists and is not a socket; "
                           "refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)                 # left behind by a master that died
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ControlError(f"control socket {path}: cannot remove the stale socket: "
                               f"{exc.strerror}") from None
        return
    except OSError as exc:
        raise ControlError(f"control socket {path}: cannot check it: {exc.strerror}") from None
    finally:
        probe.close()
    raise ControlError(f"control socket {path}: another daemon is serving it")


# ------------------------------------------------------------------ client

def request(path: str, command: str, args: Mapping[str, Any] | None = None, *,
            timeout: float = 10.0) -> Any:
    """Send one command; return its result or raise a :class:`ControlError`
    subclass saying what went wrong.  *timeout* bounds the whole exchange,
    including a reply the daemon gives only once the command's outcome is
    known (``reload``)."""
    body = json.dumps({"command": command, "args": dict(args or {})}).encode() + b"\n"
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlUnavailable(f"no daemon at control socket {path}") from None
        except PermissionError:
            raise ControlRefused(f"permission denied on control socket {path} "
                                 "(it is served only to root and the daemon's user)") from None
        except TimeoutError:
            raise ControlTimeout(f"{path}: no connection in {timeout:g}s") from None
        except OSError as exc:     # not a socket, a path too long, ...
            raise ControlUnavailable(f"control socket {path}: "
                                     f"{exc.strerror or exc}") from None
        data = _exchange(sock, body, path, deadline, timeout)
    finally:
        sock.close()
    return _decode_reply(data, path)


def _exchange(sock: socket.socket, body: bytes, path: str, deadline: float,
              timeout: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(body)     # a refused client is answered before it sends
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY:
                raise BadReply(f"reply from {path} larger than {MAX_REPLY} bytes")
            if chunk.endswith(b"\n"):
                break
    except TimeoutError:
        raise ControlTimeout(f"no reply from {path} in {timeout:g}s") from None
    except OSError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE) and not chunks:
            raise ControlUnavailable(f"{path}: the daemon closed the connection") from None
        raise ControlError(f"{path}: {exc.strerror}") from None
    return b"".join(chunks)


def _decode_reply(data: bytes, path: str) -> Any:
    if not data:
        raise ControlUnavailable(f"{path}: the daemon closed the connection without a reply")
    try:
        reply = json.loads(data)
    except (ValueError, RecursionError):
        raise BadReply(f"malformed reply from {path}: {data[:120]!r}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise BadReply(f"malformed reply from {path}: {data[:120]!r}")
    if reply["ok"]:
        return reply.get("result")
    message = str(reply.get("error", "unspecified error"))
    if reply.get("denied"):
        raise ControlRefused(message)
    raise CommandFailed(message)


# ------------------------------------------------------------------ output

def format_result(result: Any) -> str:
    if isinstance(result, Mapping):
        return "".join(f"{k}: {v}\n" for k, v in result.items())
    return f"{result}\n"


def _size(n: object) -> str:
    if not isinstance(n, int):
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return "-"


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{seconds:.0f}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _handshakes_line(counts: Mapping[str, object]) -> str:
    """``TLS handshakes: 12 done, 3 failed (timeout 2, not_tls 1)``."""
    failures = {reason: n for reason, n in counts.items() if reason != "done"}
    failed = sum(n for n in failures.values() if isinstance(n, int))
    detail = ", ".join(f"{_cell(reason)} {_cell(n)}" for reason, n in failures.items())
    return (f"TLS handshakes: {_cell(counts.get('done', 0))} done, {failed} failed"
            + (f" ({detail})" if detail else ""))

def _cell(value: object) -> str:
    if value is None:
        return "-"
    text = str(value).replace("\n", " ")
    return text if len(text) <= 40 else text[:39] + "…"


_COLUMNS: Final = (("SLOT", "slot", _cell), ("PID", "pid", _cell),
                   ("GEN", "generation", _cell), ("STATE", "state", _cell),
                   ("AGE", "age", _duration), ("SERVED", "served", _cell),
                   ("INFL", "in_flight", _cell), ("RSS", "rss", _size),
                   ("USS", "uss", _size), ("CPU%", "cpu_percent", _cell),
                   ("RESTARTS", "restarts", _cell), ("LAST EXIT", "last_exit", _cell),
                   ("LAST ERROR", "last_error", _cell))


def format_status(status: Any, *, as_json: bool = False) -> str:
    """``status --json`` (sorted keys, stable) or a human summary and table."""
    if as_json:
        return json.dumps(status, indent=2, sort_keys=True, default=str) + "\n"
    if not isinstance(status, Mapping):
        raise BadReply(f"status reply is not an object: {status!r:.120}")
    m = status.get("master") or {}
    totals = m.get("totals") or {}
    lines = [
        f"master pid {_cell(m.get('pid'))}  name {m.get('name') or '-'}  "
        f"state {_cell(m.get('state'))}  generation {_cell(m.get('generation'))}  "
        f"uptime {_duration(m.get('uptime'))}",
        f"  workers {len(status.get('workers') or [])}/{_cell(m.get('workers_target'))}  "
        f"accepting {'yes' if m.get('accepting') else 'no'}  "
        f"pending {_cell(m.get('pending'))}  rss {_size(m.get('rss'))}",
        "  totals " + "  ".join(f"{k} {v}" for k, v in totals.items()),
    ]
    if m.get("last_reload_error"):
        lines.append(f"  last reload failed: {m['last_reload_error']}")
    for failing in m.get("failing") or []:
        wait = failing.get("respawn_in")
        then = f"next try in {wait:g}s" if isinstance(wait, int | float) else "starting again"
        crashes = failing.get("crashes")
        count = f" ({crashes} crashes in a row)" if isinstance(crashes, int) and crashes else ""
        lines.append(f"  degraded: slot {_cell(failing.get('slot'))} has no ready worker"
                     f"{count}, {then}")
    for lst in m.get("listeners") or []:
        address, name = _cell(lst.get("address")), lst.get("name")
        named = f"{name}: " if name and name != lst.get("address") else ""  # unnamed: once
        waiting, bound = lst.get("backlog"), lst.get("backlog_limit")
        backlog = (f", backlog {waiting} of {bound}"
                   if isinstance(waiting, int) and isinstance(bound, int) else "")
        lines.append(f"  listener {named}{address} "
                     f"(fd {_cell(lst.get('fd'))}, inode {_cell(lst.get('inode'))}{backlog})")
        refused = lst.get("refused")
        if isinstance(refused, Mapping) and refused:
            lines.append("    refused before the handler: " + ", ".join(
                f"{_cell(reason)} {_cell(count)}" for reason, count in refused.items()))
        shaken = lst.get("handshakes")
        if isinstance(shaken, Mapping) and shaken:
            lines.append("    " + _handshakes_line(shaken))
    if m.get("health"):
        lines.append(f"  health answers on {_cell(m['health'])}"
                     f"{' (saying drain)' if m.get('draining') else ''}")
    rows = [[h for h, _, _ in _COLUMNS]]
    for w in status.get("workers") or []:
        rows.append([fmt(w.get(key)) for _, key, fmt in _COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines.append("")
    lines.extend("  ".join(c.ljust(wd) for c, wd in zip(r, widths, strict=True)).rstrip()
                 for r in rows)
    return "\n".join(lines) + "\n"
