"""What the health listener says, from the master's figures: pure, no I/O.

Two protocols share one listener (``health_listener``):

* HAProxy's **agent-check**: HAProxy connects, may send its
  ``agent-send`` line, and reads one line of words.  We answer
  ``up ready NN%`` while serving (*NN* is the free worker capacity, at
  least 1%, so a busy host still gets its share of new connections
  while a freer one gets more), ``up drain`` from the moment a graceful
  stop or an upgrade's hand-over begins (HAProxy sends no new
  connections, and the ones it has finish), and ``down #REASON`` while
  no worker is ready (starting, or every worker lost).  ``ready`` and
  ``up`` are repeated in every ready answer, because only the agent can
  undo what the agent said.
* HTTP ``GET`` (or ``HEAD``): ``/healthz`` is 200 while the master
  answers at all (liveness), ``/readyz`` is 200 while a worker is ready
  and no stop has begun, else 503 (readiness: Kubernetes probes,
  HAProxy ``option httpchk``).  More routes can be added
  (``Routes.add``): a ``/metrics`` page, say.  Unknown paths are 404,
  other methods 405, anything unparsable 400.

``is_http(first_line)`` tells the two apart by the first line: an HTTP
request line, or anything else (an ``agent-send`` string, or nothing
at all within the listener's agent wait).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from forkserver.status import Snapshot

__all__ = [
    "HealthFacts",
    "HttpAnswer",
    "Routes",
    "agent_reply",
    "health_facts",
    "http_response",
    "is_http",
    "readiness",
]

Readiness = Literal["ready", "draining", "not_ready"]


@dataclass(frozen=True, slots=True)
class HealthFacts:
    """The master's figures that the answers come from."""

    #: A graceful stop (TERM, ``ctl stop``) or an upgrade's hand-over has begun.
    draining: bool
    #: Workers ready to take connections now.
    ready_workers: int
    #: Connections those workers can hold at once (ready workers x concurrency).
    capacity: int
    #: Connections held by workers now, plus those queued in the master.
    load: int
    #: Why it is not ready, when no worker is (for ``down #...``).
    reason: str = "no worker is ready"


def health_facts(snapshot: Snapshot, *, ever_ready: bool) -> HealthFacts:
    """The figures the answers need, from the master's one snapshot."""
    return HealthFacts(
        draining=snapshot.draining, ready_workers=snapshot.ready, capacity=snapshot.capacity,
        load=snapshot.capacity - snapshot.free,
        reason="no worker is ready" if ever_ready else "starting: no worker ready yet")  # fmt: skip


def readiness(facts: HealthFacts) -> Readiness:
    if facts.draining:
        return "draining"
    return "ready" if facts.ready_workers > 0 and facts.capacity > 0 else "not_ready"


def free_percent(facts: HealthFacts) -> int:
    """Free capacity in percent, 1 to 100 (0 would read as drain to HAProxy)."""
    if facts.capacity <= 0:
        return 1
    free = max(0, facts.capacity - facts.load)
    return max(1, min(100, (100 * free + facts.capacity - 1) // facts.capacity))


_REASON_CHARS: Final = re.compile(r"[^A-Za-z0-9 ._:/()-]")


def agent_reply(facts: HealthFacts) -> bytes:
    """The agent-check line, newline included."""
    state = readiness(facts)
    if state == "ready":
        return f"up ready {free_percent(facts)}%\n".encode()
    if state == "draining":
        return b"up drain\n"
    reason = _REASON_CHARS.sub("_", facts.reason)[:100]
    return f"down #{reason}\n".encode()


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   503: "Service Unavailable"}  # fmt: skip


class Routes:
    """Path -> answer; ``/healthz`` and ``/readyz`` unless *health* is false."""

    def __init__(self, *, health: bool = True) -> None:
        self._routes: dict[str, Callable[[HealthFacts], HttpAnswer]] = {}
        if health:
            self._routes.update({"/healthz": _healthz, "/readyz": _readyz})

    def paths(self) -> list[str]:
        return list(self._routes)

    def add(self, path: str, answer: Callable[[HealthFacts], HttpAnswer]) -> None:
        if not path.startswith("/") or path in self._routes:
            raise ValueError(f"route {path!r}: taken, or not an absolute path")
        self._routes[path] = answer

    def answer(self, method: str, path: str, facts: HealthFacts) -> HttpAnswer:
        route = self._routes.get(path.split("?", 1)[0])
        if route is None:
            return HttpAnswer(404, b"not found\n")
        if method not in ("GET", "HEAD"):
            return HttpAnswer(405, b"only GET and HEAD\n")
        return route(facts)


def _healthz(facts: HealthFacts) -> HttpAnswer:
    return HttpAnswer(200, b"alive\n")


def _readyz(facts: HealthFacts) -> HttpAnswer:
    state = readiness(facts)
    if state == "ready":
        return HttpAnswer(200, b"ready\n")
    return HttpAnswer(503, b"draining\n" if state == "draining" else b"not ready\n")


_REQUEST_LINE: Final = re.compile(rb"([A-Z]{1,16}) (/[\x21-\x7e]{0,2000}) HTTP/1\.[01]")


def is_http(first_line: bytes) -> bool:
    """Does this first line (without its line end) start an HTTP request?"""
    return bool(re.match(rb"[A-Z]{1,16} ", first_line))


def http_response(routes: Routes, request_line: bytes, facts: HealthFacts) -> bytes:
    """The whole response to *request_line* (the connection closes after it)."""
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        answer, method = HttpAnswer(400, b"bad request\n"), "GET"
    else:
        method = match.group(1).decode()
        answer = routes.answer(method, match.group(2).decode("ascii"), facts)
    head = (f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, 'Unknown')}\r\n"
            f"Content-Type: {answer.content_type}\r\n"
            f"Content-Length: {len(answer.body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    return head if method == "HEAD" else head + answer.body
