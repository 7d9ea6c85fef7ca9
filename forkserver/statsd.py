"""The metrics pushed to a statsd server over UDP, for gunicorn-style set-ups.

``StatsdPush`` sends the master's metric families (``metrics.Exposition``)
every ``statsd_interval`` seconds to ``statsd_host``, from a timer in the
master's loop:

* counters as the change since the last push (``name:5|c``), and only
  when they moved; gauges as they are (``name:3|g``); a histogram as the
  change of its count and sum (statsd has no buckets);
* one name per series: ``statsd_prefix``, the metric's name without its
  ``forkserver_`` prefix, then each label's value, joined by dots
  (``forkserver.connections_accepted_total.web``); characters statsd
  does not take in a name become ``_``.  The per-worker series (labelled
  by pid) and the build information are left out: a name per worker
  process would grow without end in a statsd back end;
* lines joined by newlines into datagrams of at most ``MAX_DATAGRAM``
  bytes, sent from a non-blocking UDP socket: a send that fails (no
  buffer, a network error) is counted and logged at most once per
  ``LOG_INTERVAL``, never retried, never raised into the loop.

The settings are read at every push, so a reload changes the address,
the prefix or the interval.  ``push()`` is the whole of one push, for
tests.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Iterable
from typing import Final

from forkserver.config import Settings
from forkserver.eventloop import EventLoop, TimerHandle
from forkserver.metrics import Family, render_number
from forkserver.ratelimit import LogLimiter

log = logging.getLogger("forkserver.master")

#: Fits one Ethernet frame with room for IP and UDP headers (statsd's own advice).
MAX_DATAGRAM: Final = 1432
LOG_INTERVAL: Final = 60.0
#: Families not pushed: constants.  Series labelled by ``pid`` (one per worker
#: process) are not pushed either; the pool's own, such as the workers' deaths
#: by cause, are.
SKIPPED: Final = frozenset({"forkserver_build_info"})
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_-]")

__all__ = ["MAX_DATAGRAM", "StatsdPush", "address_of", "lines"]


def address_of(host: str) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """``statsd_host`` (checked by the settings) as a socket family and address."""
    name, _, port = host.rpartition(":")
    name = name.strip("[]")
    family = socket.AF_INET6 if ipaddress.ip_address(name).version == 6 else socket.AF_INET
    return family, (name, int(port))


def lines(families: Iterable[Family], prefix: str, last: dict[str, float]) -> list[str]:
    """The statsd lines of one push; *last* holds each counter's value at the
    previous push, and is updated."""
    out: list[str] = []
    for family in families:
        if family.name in SKIPPED:
            continue
        base = family.name.removeprefix("forkserver_")
        for sample in family.samples:
            if any(key == "pid" for key, _ in sample.labels):
                continue
            suffix = sample.name[len(family.name):]
            if family.kind == "histogram" and suffix == "_bucket":
                continue
            parts = [prefix, base + suffix, *(_UNSAFE.sub("_", value) or "_"
                                              for _, value in sample.labels)]  # fmt: skip
            name = ".".join(parts)
            if family.kind == "gauge":
                out.append(f"{name}:{render_number(sample.value)}|g")
                continue
            delta = sample.value - last.get(name, 0)
            last[name] = sample.value
            if delta > 0:
                out.append(f"{name}:{render_number(delta)}|c")
    return out


def datagrams(items: Iterable[str]) -> list[bytes]:
    """Lines joined by newlines, each datagram at most ``MAX_DATAGRAM`` bytes."""
    out: list[bytes] = []
    current = b""
    for line in items:
        data = line.encode()[:MAX_DATAGRAM]
        if current and len(current) + 1 + len(data) > MAX_DATAGRAM:
            out.append(current)
            current = b""
        current = current + b"\n" + data if current else data
    if current:
        out.append(current)
    return out


class StatsdPush:
    """Every ``statsd_interval`` seconds, the metrics to ``statsd_host``."""

    def __init__(self, loop: EventLoop, families: Callable[..., list[Family]],
                 settings: Callable[[], Settings]) -> None:  # fmt: skip
        self._loop = loop
        self._families = families  # called with processes=False
        self._settings = settings
        self._sock: socket.socket | None = None
        self._last: dict[str, float] = {}
        self._timer: TimerHandle | None = None
        self._log = LogLimiter(LOG_INTERVAL, loop.time)
        self.sent = 0  # datagrams sent, over the master's life
        self.failed = 0  # datagrams that could not be sent

    def start(self) -> None:
        self._arm()

    def _arm(self) -> None:
        self._timer = self._loop.call_later(self._settings().statsd_interval, self._tick)

    def _tick(self) -> None:
        self._arm()
        self.push()

    def push(self) -> None:
        settings = self._settings()
        if not settings.statsd_host:
            return
        family, address = address_of(settings.statsd_host)
        sock = self._socket(family)
        if sock is None:
            return
        items = lines(self._families(processes=False), settings.statsd_prefix, self._last)
        for data in datagrams(items):
            try:
                sock.sendto(data, address)
                self.sent += 1
            except OSError as exc:  # BlockingIOError (a full buffer) too: this one is lost
                self._failed(settings.statsd_host, exc)

    def _socket(self, family: socket.AddressFamily) -> socket.socket | None:
        if self._sock is not None and self._sock.family == family:
            return self._sock
        self.close()
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:  # out of descriptors: the next push tries again
            self._failed("a UDP socket", exc)
            return None
        sock.setblocking(False)
        self._sock = sock
        return sock

    def _failed(self, where: str, exc: OSError) -> None:
        self.failed += 1
        unlogged = self._log.check("send")
        if unlogged is not None:
            more = f" ({unlogged} more since the last report)" if unlogged else ""
            log.warning("statsd: cannot send to %s: %s%s", where, exc.strerror or exc, more,
                        extra={"event": "statsd_failed", "error": str(exc),
                               "unlogged": unlogged})  # fmt: skip

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.close()
