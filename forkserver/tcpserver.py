"""``TcpServer``: QTcpServer semantics (being written; see docs/internals.md)."""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = ["NetworkProxy", "TcpServer", "WaitResult"]


class NetworkProxy(enum.IntEnum):
    """``QNetworkProxy::ProxyType``: the same names and values."""

    DefaultProxy = 0
    Socks5Proxy = 1
    NoProxy = 2
    HttpProxy = 3
    HttpCachingProxy = 4
    FtpCachingProxy = 5


class WaitResult(NamedTuple):
    available: bool
    timed_out: bool

    def __bool__(self) -> bool:
        return self.available


class TcpServer:
    def __init__(self) -> None:
        raise NotImplementedError("TcpServer is not written yet")
