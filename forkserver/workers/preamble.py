"""What a worker does with a connection before the handler sees it: its preamble.

Every worker class runs the same steps, here, between adopting a
received (or self-accepted) descriptor and calling the handler:

1. *who is it*: on a listener with ``proxy_protocol`` on, the socket's
   peer (the balancer) must be in ``proxy_allow_from``; a connection
   from anywhere else is closed unread;
2. *the PROXY header*: read and parsed by ``proxyread`` within
   ``proxy_header_timeout`` (v1 at most 107 bytes, v2 at most
   ``proxy_header_max``), never a byte past it, so the handler reads
   the client's data from its first byte.  A v2 ``LOCAL`` header (the
   balancer's own health check) and a v1 ``UNKNOWN`` one leave the
   socket's own addresses in place;
3. *the TLS handshake*, on a TLS listener (``workers.tlsstep``), within
   ``tls_handshake_timeout``: after the header, which is in clear text
   before it.  Completed and failed handshakes are counted per listener
   (``Handshakes``: ``done`` or the failure's reason), a failure logged
   as ``tls_handshake_failed`` at INFO, rate-limited.

A refused connection never reaches the handler and is no handler
error: it is closed, counted per listener and reason (``Refusals``,
reported to the master with the worker's stats) and logged as
``proxy_refused`` at most once per ``LOG_INTERVAL`` per listener and
reason.  Reasons are the parser's (``proxyproto.REASONS``) and
``not_allowed``.  Nothing here raises past the caller: a connection
cannot end its worker.

The handler then sees the client: *peer* is the header's source, and
``proxy_info()`` (a context variable, so right for each thread of a
thread worker and each task of an asyncio worker, protocol callbacks
included) returns the ``ProxiedConnection`` with the destination, the
balancer's own address and the header (version, command, TLVs).
Outside a PROXY listener's connection it returns None.

``Preamble`` values are built in the master (``for_listeners``) and
reach workers by fork.  The master never reads client bytes: this
module runs only in workers, and imports ``proxyread`` (and with it
asyncio) only there.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from forkserver.proxyallow import AllowList, compile_allow_list
from forkserver.proxyproto import Address, ProxyInfo, ProxyProtocolError
from forkserver.workers.counts import ReasonCounts
from forkserver.workers.handshakes import Handshakes

if TYPE_CHECKING:
    from forkserver.config import Settings
    from forkserver.tls_listeners import ListenerTls

__all__ = [
    "NOT_ALLOWED",
    "Preamble",
    "ProxiedConnection",
    "Refusals",
    "admit_async",
    "admit_blocking",
    "for_listeners",
    "proxy_info",
]

log = logging.getLogger("forkserver.worker")

#: The reason for a peer that is not in ``proxy_allow_from``.
NOT_ALLOWED: Final = "not_allowed"
#: At most one ``proxy_refused`` line per listener and reason this often.
LOG_INTERVAL: Final = 10.0
#: Bounded reason text (the channel carries it).
MAX_REASON: Final = 32


@dataclass(frozen=True, slots=True)
class Preamble:
    """One listener's steps before the handler: the PROXY header (*version*
    None: none), then the TLS handshake (*tls* None: none)."""

    listener: str  # its name, for the log
    version: Literal[1, 2] | None
    allow: AllowList | None  # None without PROXY
    header_max: int
    header_timeout: float
    tls: ListenerTls | None = None


@dataclass(frozen=True, slots=True)
class ProxiedConnection:
    """A connection relayed by a balancer, as the handler should see it.

    ``client`` is the handler's *peer*; ``server`` the address the client
    connected to; ``proxy`` the socket's own peer (the balancer);
    ``header`` what the PROXY header said (``version``, ``command``,
    ``tlvs``; ``from_header`` is false for ``LOCAL``/``UNKNOWN``, whose
    addresses are the socket's).
    """

    client: Address
    server: Address
    proxy: Address
    header: ProxyInfo
    listener: str


_current: contextvars.ContextVar[ProxiedConnection | None] = contextvars.ContextVar(
    "forkserver_proxied_connection", default=None
)


def proxy_info() -> ProxiedConnection | None:
    """The PROXY details of the connection being handled here, or None.

    Call it from the handler: a plain function or a socketserver
    handler (each thread of a thread worker has its own), an asyncio
    stream handler or an ``asyncio.Protocol``'s callbacks (they run in
    the connection's context).
    """
    return _current.get()


def forget(*, tls: bool = False) -> None:
    """The connection is over: ``proxy_info()`` (and with *tls* ``tls_info()``)
    is None again in this thread."""
    _current.set(None)
    if tls:
        from forkserver.workers import tlsstep  # noqa: PLC0415 (loaded already by then)

        tlsstep.forget()


def for_listeners(settings: Settings, tables: Sequence[int | None], names: Sequence[str],
                  tls: Mapping[int | None, ListenerTls] | None = None,
                  ) -> tuple[Preamble | None, ...]:  # fmt: skip
    """Each listener's ``Preamble`` (None: no step before the handler).

    *tables* gives, for each listener, the index of the
    ``settings.listeners`` table it was opened from, or None for one
    opened without a table (the default bind, an upgrade's sockets
    that match no table): the global settings apply to it.  *names*
    are the listeners' names, for the log.  Empty when no listener has
    a step, so a worker tests one empty tuple per connection.  *tls*
    holds the TLS listeners' contexts, by table (``tls_listeners.load``).
    """
    out: list[Preamble | None] = []
    for table, name in zip(tables, names, strict=True):
        item = settings.listeners[table] if table is not None else None
        version = item.proxy_protocol if item and item.proxy_protocol else settings.proxy_protocol
        allowed = (item.proxy_allow_from if item and item.proxy_allow_from is not None
                   else settings.proxy_allow_from)  # fmt: skip
        handshake = (tls or {}).get(table)
        if version == "off" and handshake is None:
            out.append(None)
            continue
        out.append(Preamble(name, None if version == "off" else 1 if version == "v1" else 2,
                            None if version == "off" else compile_allow_list(allowed),
                            settings.proxy_header_max,
                            settings.proxy_header_timeout, handshake))  # fmt: skip
    return tuple(out) if any(out) else ()


class Refusals(ReasonCounts):
    """Connections closed before the handler, per (listener index, reason),
    since the worker started (see ``workers.counts``)."""

    def __init__(self, slot: int = 0, describe: Callable[[object], str] = str) -> None:
        super().__init__(slot, describe, LOG_INTERVAL)

    def refused(self, listener: int, name: str, reason: str, peer: object, detail: str) -> None:
        unlogged = self.count(listener, reason[:MAX_REASON])
        if unlogged is None:
            return
        who = self.describe(peer)
        log.warning(
            "%s: connection from %s closed before the handler: %s (%s)%s", name, who, reason,
            detail, f"; {unlogged} more like it since the last line" if unlogged else "",
            extra={"event": "proxy_refused", "listener": name, "reason": reason,
                   "peer": who, "detail": detail, "slot": self.slot, "pid": os.getpid(),
                   "unlogged": unlogged},
        )  # fmt: skip


#: What a preamble hands on to the handler: the connection, and the client's address.
Admitted = tuple[socket.socket, Address]


def _unknown_peer(conn: socket.socket, peer: object) -> bool:
    """``getpeername`` failed on an IP connection (the peer already reset it)."""
    return not peer and conn.family != socket.AF_UNIX


def admit_blocking(preamble: Preamble, refusals: Refusals, conn: socket.socket, listener: int,
                   peer: object, *, handshakes: Handshakes | None = None,
                   ) -> Admitted | None:  # fmt: skip
    """Run *preamble* on a blocking *conn* whose socket peer is *peer*.

    Returns the connection and the client's address for the handler,
    with ``proxy_info()`` set in this thread (``forget()`` it once the
    handler is done), or None when the connection was refused (the
    caller closes it).  Waits no longer than ``header_timeout``, then (a TLS
    listener) the handshake's own ``tls_handshake_timeout``: the connection
    returned is then the ``SSLSocket``, counted in *handshakes*.
    """
    if preamble.version is None:
        client: Address = peer  # type: ignore[assignment]
    else:
        admitted = _proxy_blocking(preamble, refusals, conn, listener, peer)
        if admitted is None:
            return None
        client = admitted[1]
    if preamble.tls is None:
        return conn, client
    from forkserver.workers import tlsstep  # noqa: PLC0415 (ssl, asyncio: workers only)

    tls = tlsstep.handshake_blocking(preamble.tls, handshakes or Handshakes(), conn,
                                     listener=listener, name=preamble.listener,
                                     peer=peer)  # fmt: skip
    return None if tls is None else (tls, client)


def _proxy_blocking(preamble: Preamble, refusals: Refusals, conn: socket.socket,
                    listener: int, peer: object) -> Admitted | None:  # fmt: skip
    from forkserver.proxyread import read_header_blocking  # noqa: PLC0415 (see module doc)

    assert preamble.version is not None
    refusal = _check_peer(preamble, conn, peer)
    if refusal is None:
        deadline = time.monotonic() + preamble.header_timeout
        try:
            info = read_header_blocking(conn, preamble.version, deadline, preamble.header_max,
                                        peer=peer or None)  # type: ignore[arg-type]  # fmt: skip
        except ProxyProtocolError as exc:
            refusal = (exc.reason, str(exc))
        except OSError as exc:  # getsockname on a connection already gone
            refusal = ("closed", f"{type(exc).__name__}: {exc}")
        else:
            return conn, _admitted(preamble, info, peer)
    refusals.refused(listener, preamble.listener, refusal[0], peer, refusal[1])
    return None


async def admit_async(preamble: Preamble, refusals: Refusals, sock: socket.socket,
                      listener: int, peer: object) -> Admitted | None:  # fmt: skip
    """``admit_blocking`` for an asyncio worker: *sock* is made non-blocking and
    waited for on the running loop, before any transport is attached.

    ``proxy_info()`` is set in the calling task's context, which the
    handler's task (or protocol callbacks) started from it inherit.  The
    PROXY step only: the TLS handshake of an asyncio worker is the
    transport's (``tlsstep.handshake_streams``/``handshake_protocol``).
    """
    from forkserver.proxyread import read_header  # noqa: PLC0415 (see module doc)

    if preamble.version is None:
        return sock, peer  # type: ignore[return-value]

    refusal = _check_peer(preamble, sock, peer)
    if refusal is None:
        sock.setblocking(False)
        deadline = time.monotonic() + preamble.header_timeout
        try:
            info = await read_header(sock, preamble.version, deadline, preamble.header_max,
                                     peer=peer or None)  # type: ignore[arg-type]  # fmt: skip
        except ProxyProtocolError as exc:
            refusal = (exc.reason, str(exc))
        except OSError as exc:
            refusal = ("closed", f"{type(exc).__name__}: {exc}")
        else:
            return sock, _admitted(preamble, info, peer)
    refusals.refused(listener, preamble.listener, refusal[0], peer, refusal[1])
    return None


def _check_peer(preamble: Preamble, conn: socket.socket, peer: object) -> tuple[str, str] | None:
    """Why *peer* may not send a header, or None if it may."""
    if _unknown_peer(conn, peer):
        return "closed", "the peer's address is unknown: the connection was already reset"
    if preamble.allow is None or not preamble.allow.allows(peer):  # type: ignore[arg-type]
        return NOT_ALLOWED, "the peer is not in proxy_allow_from"
    return None


def _admitted(preamble: Preamble, info: ProxyInfo, peer: object) -> Address:
    _current.set(ProxiedConnection(info.source, info.destination, peer,  # type: ignore[arg-type]
                                   info, preamble.listener))  # fmt: skip
    return info.source
