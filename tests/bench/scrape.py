"""Scrape a server's metrics while it runs, as Prometheus would.

The ``-metrics`` server variants set ``metrics_bind`` to a Unix socket in
their scratch directory; ``Scraper`` asks it for ``GET /metrics`` once per
``INTERVAL`` from a thread of the bench (its own CPU is not the server's),
so the run measures the per-connection path with a scraped master.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

INTERVAL = 1.0  # Prometheus's scrape_interval, at its shortest usual setting
TIMEOUT = 2.0


def scrape(path: Path) -> bool:
    """One ``GET /metrics``: True for a 200 with a body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.startswith(b"HTTP/1.1 200") and b"forkserver_build_info" in data


class Scraper(threading.Thread):
    """``scrape(path)`` every ``interval`` s until ``stop()``; counts the answers."""

    def __init__(self, path: Path, interval: float = INTERVAL) -> None:
        super().__init__(name=f"scrape {path}", daemon=True)
        self.path, self.interval = path, interval
        self.scrapes = 0  # answered with the metrics
        self.failures = 0  # refused, cut, timed out or wrong (before the server listens, too)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):  # the scrape interval, not a sync
            try:
                ok = scrape(self.path)
            except OSError:
                ok = False
            self.scrapes += ok
            self.failures += not ok

    def stop(self) -> None:
        self._done.set()
        self.join(TIMEOUT * 2)
