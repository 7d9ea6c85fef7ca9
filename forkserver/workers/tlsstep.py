"""A TLS listener's handshake in the worker, its counts, and what the handler sees of it.

The last step of the preamble (``workers.preamble``), after the PROXY
header when a listener has both:

* ``handshake_blocking`` (sync and thread workers) runs the server
  handshake within the listener's ``tls_handshake_timeout``
  (``handshake.handshake_blocking``: every wait bounded by the time
  left, so a client that stalls or drips bytes holds a sync worker no
  longer than that);
* ``handshake_streams`` / ``handshake_protocol`` (asyncio workers, on
  asyncio's loop or uvloop) run it on the loop, never blocking it, and
  give the handler its streams or attach its protocol once it is done.

A failed handshake is no handler error: the connection is closed,
counted in ``Handshakes`` (per listener: ``done``, or the failure's
reason: ``timeout``, ``not_tls``, ``protocol_version``, ``unknown_ca``,
...; sent to the master with the worker's stats) and logged at INFO as
``tls_handshake_failed``, at most once per ``LOG_INTERVAL`` per listener
and reason, with the peer and OpenSSL's reason.

The handler gets the decrypted connection (an ``ssl.SSLSocket``, or
TLS streams/transport) and, for every form but ``asyncio.Protocol``,
``tls_info()`` (a context variable, like ``proxy_info()``) returns the
``handshake.TlsInfo``: version, cipher, ALPN, SNI name, client
certificate.  A protocol asks its transport:
``handshake.connection_info(transport)``.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import ssl
import time
from typing import Protocol

from forkserver import handshake
from forkserver.handshake import HandshakeError, TlsInfo
from forkserver.tls_listeners import ListenerTls
from forkserver.workers import protocols
from forkserver.workers.handshakes import Handshakes


class AsyncioServing(Protocol):
    """What ``serve_tls`` uses of an asyncio worker (``workers.aio.AsyncioWorker``)."""

    protocol: type[protocols.TrackedProtocol] | None

    async def handle_streams(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> BaseException | None: ...

__all__ = ["handshake_blocking", "handshake_protocol", "handshake_streams",
           "serve_tls", "tls_info"]

_current: contextvars.ContextVar[TlsInfo | None] = contextvars.ContextVar(
    "forkserver_tls_info", default=None
)


def tls_info() -> TlsInfo | None:
    """What the TLS connection being handled here negotiated, or None (not TLS).

    From a sync or thread handler (plain function or socketserver) and
    an asyncio stream handler; an ``asyncio.Protocol`` calls
    ``forkserver.handshake.connection_info(transport)`` instead.
    """
    return _current.get()


def forget() -> None:
    """The connection is over: ``tls_info()`` is None again in this thread."""
    _current.set(None)


def _who(peer: object, family: int) -> object:
    """The peer for the log: a Unix socket's client has no name but "unix"."""
    return peer if peer or family != socket.AF_UNIX else "unix"


def handshake_blocking(step: ListenerTls, counts: Handshakes, conn: socket.socket, *,
                       listener: int, name: str, peer: object) -> ssl.SSLSocket | None:  # fmt: skip
    """The handshake on a blocking *conn*: the ``SSLSocket`` for the handler, with
    ``tls_info()`` set in this thread, or None (refused: *conn* is closed).
    *listener* is its index, *name* its name and *peer* the client, for the counts."""
    family = conn.family
    deadline = time.monotonic() + step.handshake_timeout
    try:
        tls = handshake.handshake_blocking(conn, step.context, deadline)
        info = handshake.connection_info(tls)
    except HandshakeError as exc:
        counts.failed(listener, name, exc.failure, _who(peer, family))
        return None
    except (OSError, ValueError) as exc:  # the peer left just after it finished
        conn.close()
        counts.failed(listener, name, handshake.classify_handshake_error(exc),
                      _who(peer, family))
        return None
    counts.done(listener)
    _current.set(info)
    return tls


async def handshake_streams(
    step: ListenerTls, counts: Handshakes, sock: socket.socket, *, listener: int, name: str,
    peer: object,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """The handshake on the running loop, as streams; None when refused (*sock* closed).

    ``tls_info()`` is set in the calling task's context.
    """
    family = sock.family
    try:
        reader, writer = await handshake.handshake_async(sock, step.context, step.handshake_timeout)
        info = handshake.connection_info(writer)
    except HandshakeError as exc:
        counts.failed(listener, name, exc.failure, _who(peer, family))
        return None
    except (OSError, ValueError, TypeError) as exc:
        sock.close()
        counts.failed(listener, name, handshake.classify_handshake_error(exc),
                      _who(peer, family))
        return None
    counts.done(listener)
    _current.set(info)
    return reader, writer


async def handshake_protocol(
    step: ListenerTls, counts: Handshakes, protocol: type[protocols.TrackedProtocol],
    sock: socket.socket, *, listener: int, name: str, peer: object,
) -> BaseException | None:
    """As ``protocols.serve`` over TLS: the handler's protocol is made once the
    handshake is done.  A refused handshake is counted, not returned as an error."""
    loop = asyncio.get_running_loop()
    made: list[protocols.TrackedProtocol] = []

    def make() -> protocols.TrackedProtocol:
        instance = protocol()
        instance.forkserver_over = loop.create_future()
        made.append(instance)
        return instance

    family = sock.family
    try:
        transport, _ = await handshake.handshake_async_transport(
            make, sock, step.context, step.handshake_timeout
        )
    except HandshakeError as exc:
        counts.failed(listener, name, exc.failure, _who(peer, family))
        return None
    counts.done(listener)
    return await protocols.wait_over(made[0], transport)


async def serve_tls(worker: AsyncioServing, step: ListenerTls, counts: Handshakes,
                    sock: socket.socket, *, listener: int, name: str,
                    peer: object) -> BaseException | None:  # fmt: skip
    """An asyncio worker's TLS connection: the handshake, then its handler; the
    handler's error, if any (a refused handshake is none: it is counted)."""
    if worker.protocol is not None:
        try:
            return await handshake_protocol(step, counts, worker.protocol, sock,
                                            listener=listener, name=name,
                                            peer=peer)  # fmt: skip
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # its __init__, say
            return exc
    streams = await handshake_streams(step, counts, sock, listener=listener, name=name,
                                      peer=peer)  # fmt: skip
    if streams is None:
        return None
    return await worker.handle_streams(*streams)
