"""Start-up: check the settings and the handler, and open or adopt the listening sockets.

Everything here runs in the master before any worker is forked, and
fails with a ``ForkserverError`` that names what is wrong; ``serve()``
turns that into an exit code.  ``preflight`` is every check ``run``
makes before it forks: ``forkserver check-config`` calls the same
function, so the two cannot disagree.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Mapping
from typing import Final

from forkserver import listeners, probe, tls_listeners
from forkserver.config import Settings
from forkserver.errors import ForkserverError
from forkserver.eventloop import EventLoop
from forkserver.handler import LoadedHandler, WorkerClass, load_handler
from forkserver.handler import resolve_worker_class as _resolve_class
from forkserver.listeners import Listener
from forkserver.systemd import InheritedSocket, Notifier, listen_fds, store_name
from forkserver.tls_listeners import ListenerTls
from forkserver.upgrade import Handover

DEFAULT_BIND: Final = "127.0.0.1:8000"


class StartupFailed(ForkserverError):
    """The daemon could not start: ``error`` says why, ``exit_code`` is what ``run`` exits with.

    Raised by ``master.serve(..., raise_failures=True)`` (the embedding
    API); the CLI gets the exit code instead.  Nothing was left running.
    """

    def __init__(self, error: ForkserverError, exit_code: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.exit_code = exit_code


def preflight(
    settings: Settings, *, check_only: bool = False, loaded: LoadedHandler | None = None
) -> tuple[LoadedHandler | None, WorkerClass, Mapping[int | None, ListenerTls]]:
    """Every check before the first fork: the preloaded handler (or None), the
    worker class and the TLS listeners' contexts (``tls_listeners.load``).

    In order: the user/group can be switched to (and ``preload`` is not
    combined with a switch under root), every TLS listener's certificate
    and key files load (here, as the master's user), the handler loads (in a child
    that drops privileges first, as a worker does, within
    ``reload_timeout``; with ``preload``, in this process), the worker
    class suits it, and the event loop is installed.  Raises
    ``ForkserverError``.  ``run`` has taken on the umask and directory
    before (``probe.enter``); with *check_only* (``check-config``) this
    process changes nothing: the check child takes them on, and imports
    a preloaded handler too.  *loaded* is a handler the caller loaded
    itself (an object given to the embedding API): it is used as a
    preloaded one, and nothing is imported.
    """
    probe.check_credentials(settings, preload=settings.preload)
    tls = tls_listeners.load(settings)
    if loaded is not None:
        handler: LoadedHandler | None = loaded
        kind = loaded.kind
    elif settings.preload and not check_only:
        handler = load_handler(settings.handler)
        kind = handler.kind
        gc.freeze()  # what the handler built stays shared copy-on-write with workers
    else:
        handler = None
        kind = probe.check_handler(settings, entering=check_only)
    worker_class = _resolve_class(settings.handler, kind, settings.worker_class)
    probe.check_event_loop(settings, worker_class)
    return handler, worker_class, tls


def open_configured(
    settings: Settings,
    loop: EventLoop,
    notifier: Notifier,
    claimed: list[InheritedSocket] | None = None,
) -> list[Listener]:
    """Open the configured listeners (``DEFAULT_BIND``, or systemd's, if none).

    *claimed* are the systemd sockets, if ``listen_fds()`` was called
    already (``serve()`` claims them first thing, so that no descriptor
    it opens can take the number of one that was passed closed).

    A socket this master binds itself is given to systemd to keep
    (FDSTORE=1, named by ``store_name(bind)``), so that after a restart
    it comes back in LISTEN_FDS and is adopted instead of bound again:
    connections that wait in its backlog meanwhile are not refused.
    """
    claimed = listen_fds() if claimed is None else claimed
    if settings.listeners:
        binds = [(item.bind, item.name, item.backlog, item.dispatch or settings.dispatch,
                  settings.defer_accept if item.defer_accept is None else item.defer_accept)
                 for item in settings.listeners]  # fmt: skip
    else:
        binds = [("systemd" if claimed else DEFAULT_BIND, "", None, settings.dispatch,
                  settings.defer_accept)]  # fmt: skip
    kept = {sock.name: sock for sock in claimed}
    own = {store_name(bind) for bind, *_ in binds if _bindable(bind)}
    from_units = [sock for sock in claimed if sock.name not in own]  # for "systemd" specs
    opened: list[Listener] = []
    try:
        for table, (bind, name, backlog, dispatch, defer) in enumerate(binds):
            spec = listeners.parse_bind(bind)
            if name and spec.kind != "systemd":  # systemd sockets carry their own names
                spec = dataclasses.replace(spec, name=name)
            stored = kept.get(store_name(bind)) if _bindable(bind) else None
            if stored is not None:  # ours from the previous run: adopt, never bind again
                spec = dataclasses.replace(spec, kind="fd", fd=stored.fd)
            size = backlog if backlog is not None else settings.backlog
            more = listeners.open_listeners([spec], backlog=size, loop=loop, inherited=from_units)
            for listener in more:
                listener.index = len(opened)
                listener.shared = dispatch == "shared"
                listener.table = table if settings.listeners else None
                opened.append(listener)
                listener.defer_accept(defer)
                if stored is None and _bindable(bind) and notifier.enabled:
                    _store(notifier, bind, listener)
    except BaseException:
        for listener in opened:
            listener.close()
        raise
    return opened


def _bindable(bind: str) -> bool:
    return listeners.parse_bind(bind).kind in ("tcp", "unix")


def _store(notifier: Notifier, bind: str, listener: Listener) -> None:
    notifier.store_fds({store_name(bind): listener.socket_descriptor()})
    listener.created_path = None  # the file stays with the socket systemd keeps


def adopt_handover(handover: Handover, settings: Settings, loop: EventLoop) -> list[Listener]:
    """The listeners an older master handed over, in its order and with its names.

    They replace the configured binds: the sockets must stay the same
    across an upgrade, whatever the file says now.
    """
    inherited = [InheritedSocket(item.fd, f"listener{i}") for i, item in
                 enumerate(handover.listeners)]  # fmt: skip
    spec = listeners.parse_bind("systemd")
    opened = listeners.open_listeners([spec], backlog=settings.backlog, loop=loop,
                                      inherited=inherited)  # fmt: skip
    # The configured tables match the handed listeners one to one unless a
    # "systemd" spec stood for several sockets; then the global setting decides.
    tables = settings.listeners if len(settings.listeners) == len(opened) else ()
    for index, (listener, item) in enumerate(zip(opened, handover.listeners, strict=True)):
        dispatch = tables[index].dispatch if tables else None
        listener.shared = (dispatch or settings.dispatch) == "shared"
        listener.table = index if tables else None
        defer = tables[index].defer_accept if tables else None
        listener.defer_accept(settings.defer_accept if defer is None else defer)
        listener.name = item.name
        listener.created_path = item.path  # ours to remove now
    return opened
