"""Fixtures shared across test modules."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from forkserver import EventLoop, TcpServer


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
