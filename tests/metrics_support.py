"""Reading a running daemon's metrics: over HTTP, through ``ctl metrics``, parsed.

The text is parsed with ``prometheus_client``'s own parser, as Prometheus
would read it.  ``Scraper.value(name, **labels)`` is one sample's value;
``Scraper.wait(name, expected, **labels)`` polls until it is reached
(the workers report their figures with their stats, about once a second).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT, TIMEOUT, Daemon, poll_until, recv_all


def listener(daemon: Daemon) -> dict[str, str]:
    """The ``listener`` label of the daemon's one listener (``--bind fd://N``)."""
    return {"listener": f"fd://{daemon.listener.fileno()}"}


def address(daemon: Daemon, event: str = "metrics_listening") -> tuple[str, int]:
    host, _, port = daemon.wait_log(event)["address"].rpartition(":")
    return host, int(port)


def http(where: tuple[str, int], request: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request on a connection of its own."""
    with socket.create_connection(where, timeout=TIMEOUT) as sock:
        sock.sendall(request)
        answer = recv_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ", 2)[1]), headers, body


def control_socket(daemon: Daemon) -> str:
    return os.path.join(os.path.dirname(daemon.notify.getsockname()), "control.sock")


def ctl_metrics(daemon: Daemon, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "forkserver", "ctl", "--socket",
                           control_socket(daemon), "metrics", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT, check=True)  # fmt: skip
    return done.stdout


def parse(text: str) -> list[Any]:
    """Every sample, as prometheus_client reads the text."""
    return [sample for family in text_string_to_metric_families(text)
            for sample in family.samples]  # fmt: skip


class Scraper:
    def __init__(self, where: tuple[str, int]) -> None:
        self.where = where

    def text(self) -> str:
        status, headers, body = http(self.where, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status == 200, (status, body[:200])
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return body.decode()

    def samples(self) -> list[Any]:
        return parse(self.text())

    def value(self, name: str, **labels: str) -> float | None:
        found = [s.value for s in self.samples()
                 if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
        return float(found[0]) if found else None

    def wait(self, name: str, expected: float, **labels: str) -> None:
        """Poll until *name* with *labels* has the value *expected* (bounded)."""
        seen: list[float | None] = []

        def reached() -> bool:
            seen.append(self.value(name, **labels))
            return seen[-1] == expected

        try:
            poll_until(reached, f"{name}{labels} == {expected}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {seen[-1]}") from None
