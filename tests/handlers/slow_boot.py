"""Imports at once in the master's check; in a worker, the import waits for the test.

A worker writes its pid to ``$SLOW_BOOT_DIR/<pid>.importing``, then waits
(at most 20 s) until ``$SLOW_BOOT_DIR/go`` exists, so a test can signal
it while it is still booting.
"""

import os
import time
from pathlib import Path

import setproctitle

if setproctitle.getproctitle().startswith("forkserver: worker"):
    directory = Path(os.environ["SLOW_BOOT_DIR"])
    (directory / f"{os.getpid()}.importing").touch()
    deadline = time.monotonic() + 20
    while not (directory / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # sleep-ok: a handler's import standing in for a slow one


def handle(conn: object, peer: object) -> None:
    """Never reached."""
