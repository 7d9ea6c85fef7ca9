"""Load a user's handler and say how to call it.

A handler is named ``module:attribute`` (the attribute may be dotted,
``pkg.mod:App.handle``) and imported as a user expects: the current
directory comes first on ``sys.path``, as with ``python -m``.

Four forms are supported:

``def handle(conn: socket.socket, peer) -> None``
    Called once per connection with a blocking socket and the peer
    address (``(host, port)`` for TCP, ``""`` for a Unix socket).
    Runs on ``sync`` or ``thread`` workers.

``async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter)``
    A coroutine function, run as a task on an ``asyncio`` worker (the
    default worker class for such handlers).

an ``asyncio.Protocol`` subclass (or any ``asyncio.BaseProtocol``)
    Instantiated per connection with no arguments and attached to the
    connection with ``loop.connect_accepted_socket``, as
    ``loop.create_server`` would: callbacks instead of a coroutine per
    connection, the cheapest form on an ``asyncio`` worker (its default
    worker class).  The connection counts as served once
    ``connection_lost`` has run; an exception raised by a callback
    closes the connection and is reported like any handler error.

a ``socketserver.BaseRequestHandler`` subclass
    Instantiated per connection as ``cls(conn, peer, server)`` exactly as
    ``socketserver`` does, so ``http.server.SimpleHTTPRequestHandler``
    serves files unchanged.  ``server`` is a small object with
    ``server_address`` and ``listener`` (the bind spec).

The worker closes the connection after the handler returns or raises.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import os
import socketserver
import sys
from dataclasses import dataclass
from typing import Literal

from forkserver.errors import ForkserverError

WorkerClass = Literal["sync", "thread", "asyncio"]


class HandlerLoadError(ForkserverError):
    """The handler cannot be imported, found or used with this worker class."""


class HandlerKind(enum.Enum):
    FUNCTION = "function"
    COROUTINE = "coroutine"
    PROTOCOL = "protocol"
    REQUEST_HANDLER = "request_handler"


#: The forms only an ``asyncio`` worker can run.
ASYNC_KINDS = frozenset({HandlerKind.COROUTINE, HandlerKind.PROTOCOL})


@dataclass(frozen=True, slots=True)
class LoadedHandler:
    spec: str
    kind: HandlerKind
    target: object


def split_spec(spec: str) -> tuple[str, str]:
    """``module:attribute`` -> ``(module, attribute)``, or HandlerLoadError."""
    module, sep, attribute = spec.partition(":")
    names = [*module.split("."), *attribute.split(".")]
    if not sep or not all(name.isidentifier() for name in names):
        raise HandlerLoadError(
            f"handler {spec!r}: expected module:attribute, as in myapp.handlers:handle"
        )
    return module, attribute


def load_handler(spec: str) -> LoadedHandler:
    """Import the handler named *spec* and classify it.

    Raises ``HandlerLoadError`` whose message names the spec and, for an
    import that failed inside the user's module, keeps the original
    exception as ``__cause__`` so the traceback can be shown.
    """
    module_name, attribute = split_spec(spec)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, "")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise HandlerLoadError(f"handler {spec!r}: no module named {exc.name!r}") from None
        raise HandlerLoadError(f"handler {spec!r}: importing {module_name} failed: {exc}") from exc
    except Exception as exc:
        raise HandlerLoadError(
            f"handler {spec!r}: importing {module_name} raised {type(exc).__name__}: {exc}"
        ) from exc
    for name in attribute.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise HandlerLoadError(
                f"handler {spec!r}: {module_name} has no {attribute!r}"
            ) from None
    return LoadedHandler(spec=spec, kind=classify(spec, target), target=target)


def classify(spec: str, target: object) -> HandlerKind:
    if inspect.isclass(target):
        if issubclass(target, socketserver.BaseRequestHandler):
            return HandlerKind.REQUEST_HANDLER
        # A protocol's module imported asyncio; the master need not.
        asyncio = sys.modules.get("asyncio")
        if asyncio is not None and issubclass(target, asyncio.BaseProtocol):
            _check_no_arguments(spec, target)
            return HandlerKind.PROTOCOL
        raise HandlerLoadError(
            f"handler {spec!r} is a class but neither a socketserver.BaseRequestHandler "
            "nor an asyncio.Protocol subclass"
        )
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 (an async __call__ counts)
    ):
        return HandlerKind.COROUTINE
    if callable(target):
        return HandlerKind.FUNCTION
    raise HandlerLoadError(f"handler {spec!r} is a {type(target).__name__}, not callable")


def _check_no_arguments(spec: str, cls: type) -> None:
    """A protocol is created with no arguments: say so at start, not per connection."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no signature to read (a class written in C)
        return
    try:
        signature.bind()
    except TypeError:
        needed = ", ".join(
            name for name, parameter in signature.parameters.items()
            if parameter.default is parameter.empty
            and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        )  # fmt: skip
        raise HandlerLoadError(
            f"handler {spec!r}: an asyncio protocol handler is created with no arguments, "
            f"but {cls.__name__}() needs {needed}"
        ) from None


def resolve_worker_class(
    spec: str, kind: HandlerKind, requested: WorkerClass | None
) -> WorkerClass:
    """The worker class to run *kind* with; refuses combinations that cannot work."""
    if requested is None:
        return "asyncio" if kind in ASYNC_KINDS else "sync"
    if kind in ASYNC_KINDS and requested != "asyncio":
        what = "a coroutine function" if kind is HandlerKind.COROUTINE else "an asyncio protocol"
        raise HandlerLoadError(
            f"handler {spec!r} is {what}: it needs --worker-class asyncio, not {requested}"
        )
    if kind not in ASYNC_KINDS and requested == "asyncio":
        raise HandlerLoadError(
            f"handler {spec!r} is not a coroutine function: the asyncio worker class runs "
            "`async def handle(reader, writer)` or an asyncio.Protocol subclass; use sync or thread"
        )
    return requested


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What a ``BaseRequestHandler`` sees as ``self.server``."""

    server_address: object
    listener: str
