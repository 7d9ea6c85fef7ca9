"""The health listener: HAProxy's agent-check and HTTP probes, from the master's loop.

``health_bind`` opens one listening socket in the master; what it says
comes from ``health_answers`` and the figures *facts()* returns when an
answer is due.  It never reads worker traffic and never blocks the
loop:

* every client socket is non-blocking and read and written only when
  the loop says it is ready;
* a client sends at most ``MAX_REQUEST`` bytes (a request line and
  headers, or an ``agent-send`` line) and is dropped ``CLIENT_TIMEOUT``
  seconds after it connected, whatever it is doing;
* at most ``MAX_CLIENTS`` are served at once: one more is closed at
  once, unread (a balancer retries on its next interval);
* accepting is a ``TcpServer``'s, in bounded batches, backing off when
  descriptors run out.

Which protocol a client speaks is told by its first line: an HTTP
request line is answered as HTTP once its headers are in; any other
line (HAProxy's ``agent-send``), or silence for ``AGENT_WAIT`` seconds
(an agent check without ``agent-send``), gets the agent line.  After
the answer the socket's sending side is shut and what the client still
sends is read and dropped until it closes (so the kernel does not
reset the connection under an unread request), within the same
deadline.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from forkserver import health_answers, listeners
from forkserver.errors import ForkserverError
from forkserver.eventloop import EventLoop, TimerHandle
from forkserver.health_answers import HealthFacts, Routes
from forkserver.listeners import Listener
from forkserver.ratelimit import LogLimiter

log = logging.getLogger("forkserver.master")

MAX_CLIENTS: Final = 64
MAX_REQUEST: Final = 8192
CLIENT_TIMEOUT: Final = 2.0
#: An agent check that sends nothing is answered after this much silence.
AGENT_WAIT: Final = 0.5
LOG_INTERVAL: Final = 10.0

__all__ = ["HealthError", "HealthListener"]


class HealthError(ForkserverError):
    """``health_bind`` cannot be opened; the message names it."""


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytes = b""
    answered: bool = False
    deadline: TimerHandle | None = None
    agent_timer: TimerHandle | None = None


class HealthListener:
    """Serves *bind* from *loop*; ``start()`` opens it, ``close()`` ends it."""

    def __init__(self, loop: EventLoop, bind: str, facts: Callable[[], HealthFacts],
                 routes: Routes | None = None, *, max_clients: int = MAX_CLIENTS,
                 client_timeout: float = CLIENT_TIMEOUT,
                 agent_wait: float = AGENT_WAIT, agent: bool = True) -> None:  # fmt: skip
        """*agent* false: HTTP only (the metrics listener): no agent-check line,
        a request that is not HTTP is a 400."""
        self._loop = loop
        self.bind = bind
        self._facts = facts
        self.routes = routes if routes is not None else Routes()
        self._max_clients = max_clients
        self._timeout = client_timeout
        self._agent_wait = agent_wait
        self._agent = agent
        self._setting = "health_bind" if agent else "metrics_bind"  # for the errors
        self._listener: Listener | None = None
        self._clients: set[_Client] = set()
        self._log = LogLimiter(LOG_INTERVAL, loop.time)
        #: Clients turned away because ``max_clients`` were being served.
        self.turned_away = 0

    def start(self) -> None:
        try:
            spec = listeners.parse_bind(self.bind)
            if spec.kind not in ("tcp", "unix"):
                raise HealthError(f"{self._setting} {self.bind!r}: must be an address to bind "
                                  "(HOST:PORT, [V6]:PORT, :PORT or unix:PATH)")  # fmt: skip
            listener = listeners.open_listener(spec, 0, backlog=self._max_clients,
                                               loop=self._loop)  # fmt: skip
        except listeners.ListenerError as exc:
            raise HealthError(f"{self._setting}: {exc}") from None
        listener.set_accept_batch_size(self._max_clients)
        listener.dispatch = self._accepted
        listener.accept_error.connect(lambda error: self._accept_failed(listener))
        self._listener = listener
        paths = ", ".join(self.routes.paths())
        if self._agent:
            log.info("health answers on %s (agent-check, GET %s)", listener.describe(), paths,
                     extra={"event": "health_listening",
                            "address": listener.describe()})  # fmt: skip
        else:
            log.info("metrics on %s (GET %s)", listener.describe(), paths,
                     extra={"event": "metrics_listening",
                            "address": listener.describe()})  # fmt: skip

    def describe(self) -> str:
        return self._listener.describe() if self._listener is not None else self.bind

    @property
    def clients(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        for client in list(self._clients):
            self._drop(client)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def discard_after_fork(self) -> None:
        """In a forked child: close our copies, leaving the loop and the socket file alone."""
        for client in self._clients:
            with contextlib.suppress(OSError):
                client.sock.close()
        self._clients.clear()
        if self._listener is not None:
            sock = self._listener.listening_socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()

    # -- clients ----------------------------------------------------------

    def _accepted(self, fd: int, index: int) -> None:
        sock = socket.socket(fileno=fd)
        if len(self._clients) >= self._max_clients:
            self.turned_away += 1
            sock.close()
            unlogged = self._log.check("busy")
            if unlogged is not None:
                log.warning("health listener %s: %d clients at once, the most it serves: one "
                            "more was closed unanswered", self.describe(), self._max_clients,
                            extra={"event": "health_busy", "unlogged": unlogged})  # fmt: skip
            return
        sock.setblocking(False)
        client = _Client(sock)
        self._clients.add(client)
        client.deadline = self._loop.call_later(self._timeout, lambda: self._drop(client))
        if self._agent:
            client.agent_timer = self._loop.call_later(self._agent_wait,
                                                       lambda: self._silent(client))  # fmt: skip
        self._loop.add_reader(sock, lambda: self._readable(client))

    def _readable(self, client: _Client) -> None:
        room = MAX_REQUEST if client.answered else MAX_REQUEST + 1 - len(client.inbuf)
        try:
            data = client.sock.recv(room)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        if client.answered:  # lingering: read and drop until the client closes
            if not data:
                self._drop(client)
            return
        if not data:  # closed before asking anything: nothing to answer
            self._drop(client)
            return
        client.inbuf += data
        if len(client.inbuf) > MAX_REQUEST:
            self._answer(client, health_answers.http_response(
                self.routes, b"", self._facts()))  # fmt: skip
            return
        self._parse(client)

    def _parse(self, client: _Client) -> None:
        buf = bytes(client.inbuf)
        end = buf.find(b"\n")
        if end < 0:
            return
        first = buf[:end].rstrip(b"\r")
        if not health_answers.is_http(first):
            if self._agent:
                self._answer(client, health_answers.agent_reply(self._facts()))
            else:
                self._answer(client, health_answers.http_response(
                    self.routes, b"", self._facts()))  # fmt: skip
        elif b"\r\n\r\n" in buf or b"\n\n" in buf:
            self._answer(client, health_answers.http_response(self.routes, first,
                                                              self._facts()))  # fmt: skip

    def _silent(self, client: _Client) -> None:
        """No line yet after ``agent_wait``: an agent check without ``agent-send``."""
        client.agent_timer = None
        if client.answered or client not in self._clients:
            return
        if client.inbuf and health_answers.is_http(bytes(client.inbuf[:17])):
            return  # an HTTP client still sending its headers
        self._answer(client, health_answers.agent_reply(self._facts()))

    def _answer(self, client: _Client, response: bytes) -> None:
        client.answered = True
        if client.agent_timer is not None:
            client.agent_timer.cancel()
            client.agent_timer = None
        client.outbuf = response
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.outbuf)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(client)
            return
        client.outbuf = client.outbuf[sent:]
        if client.outbuf:
            self._loop.add_writer(client.sock, lambda: self._flush(client))
            return
        self._loop.remove_writer(client.sock)
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        if client not in self._clients:
            return
        self._clients.discard(client)
        for timer in (client.deadline, client.agent_timer):
            if timer is not None:
                timer.cancel()
        self._loop.remove_reader(client.sock)
        self._loop.remove_writer(client.sock)
        client.sock.close()

    def _accept_failed(self, listener: Listener) -> None:
        unlogged = self._log.check("accept")
        if unlogged is not None:
            log.warning("health listener %s: accept failed: %s", listener.describe(),
                        listener.error_string(),
                        extra={"event": "accept_failed", "listener": "health",
                               "unlogged": unlogged})  # fmt: skip
