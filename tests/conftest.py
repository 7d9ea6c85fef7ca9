"""Fixtures shared across test modules."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from forkserver import EventLoop, TcpServer


@pytest.fixture(scope="session", autouse=True)
def private_runtime_directory() -> Iterator[str]:
    """Daemons started by the tests put their default control socket here,
    not in /run/forkserver (the default for root) where they would meet
    each other and the machine's own daemons.  Tests of that rule pass
    their own environment."""
    path = tempfile.mkdtemp(prefix="fs-run-")
    saved = os.environ.get("RUNTIME_DIRECTORY")
    os.environ["RUNTIME_DIRECTORY"] = path
    yield path
    if saved is None:
        os.environ.pop("RUNTIME_DIRECTORY", None)
    else:
        os.environ["RUNTIME_DIRECTORY"] = saved
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    ev = EventLoop()
    yield ev
    ev.close()


@pytest.fixture
def server(loop: EventLoop) -> Iterator[TcpServer]:
    """A server on the test's loop, not yet listening; closed afterwards."""
    with TcpServer(loop=loop) as srv:
        yield srv


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    """Undo what a test's logging set-up adds to the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
