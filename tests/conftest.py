"""Fixtures shared by the TcpServer and EventLoop tests."""

from __future__ import annotations

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
