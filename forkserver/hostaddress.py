"""``HostAddress``: an IP address as ``QHostAddress`` models it.

A ``HostAddress`` is null, a literal IPv4/IPv6 address, or the special
dual-stack ``Any`` (one IPv6 socket with ``IPV6_V6ONLY`` off, so IPv4
clients connect too).  Like Qt, it never resolves host names:
``HostAddress("localhost")`` is null, and so is any text that is not a
numeric address.  Instances are immutable and hashable.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from typing import ClassVar

__all__ = ["HostAddress", "NetworkLayerProtocol"]

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class NetworkLayerProtocol(enum.IntEnum):
    """``QAbstractSocket::NetworkLayerProtocol``: same names and values."""

    IPv4Protocol = 0
    IPv6Protocol = 1
    AnyIPProtocol = 2
    UnknownNetworkLayerProtocol = -1


class HostAddress:
    """An IPv4 or IPv6 address, the dual-stack ``Any``, or null."""

    __slots__ = ("_any", "_ip")

    Null: ClassVar[HostAddress]
    Any: ClassVar[HostAddress]
    AnyIPv4: ClassVar[HostAddress]
    AnyIPv6: ClassVar[HostAddress]
    LocalHost: ClassVar[HostAddress]
    LocalHostIPv6: ClassVar[HostAddress]
    Broadcast: ClassVar[HostAddress]

    _ip: _IP | None
    _any: bool

    def __init__(
        self,
        address: str | HostAddress | ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
    ) -> None:
        ip: _IP | None = None
        dual = False
        if isinstance(address, HostAddress):
            ip, dual = address._ip, address._any
        elif isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            ip = address
        elif isinstance(address, str):
            ip = _parse(address)
        elif address is not None:
            raise TypeError(
                f"HostAddress() takes a str, an ipaddress address or a HostAddress, "
                f"not {type(address).__name__}"
            )
        object.__setattr__(self, "_ip", ip)
        object.__setattr__(self, "_any", dual)

    @classmethod
    def _dual_stack_any(cls) -> HostAddress:
        address = cls()
        object.__setattr__(address, "_any", True)
        return address

    @classmethod
    def from_sockaddr(cls, family: int, sockaddr: object) -> HostAddress:
        """The address part of a ``getsockname()``/``accept()`` result."""
        if family == socket.AF_INET and isinstance(sockaddr, tuple):
            return cls(str(sockaddr[0]))
        if family == socket.AF_INET6 and isinstance(sockaddr, tuple):
            host, scope = str(sockaddr[0]), int(sockaddr[3])
            if scope and "%" not in host:
                host = f"{host}%{scope}"
            return cls(host)
        return cls.Null

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("HostAddress is immutable")

    # -- queries --------------------------------------------------------

    def is_null(self) -> bool:
        return self._ip is None and not self._any

    def is_any(self) -> bool:
        """True only for the dual-stack ``Any`` (not ``AnyIPv4``/``AnyIPv6``)."""
        return self._any

    def is_loopback(self) -> bool:
        return self._ip is not None and self._ip.is_loopback

    def protocol(self) -> NetworkLayerProtocol:
        if self._any:
            return NetworkLayerProtocol.AnyIPProtocol
        if self._ip is None:
            return NetworkLayerProtocol.UnknownNetworkLayerProtocol
        if self._ip.version == 4:
            return NetworkLayerProtocol.IPv4Protocol
        return NetworkLayerProtocol.IPv6Protocol

    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The ``ipaddress`` object; ``::`` for ``Any``; None when null."""
        if self._any:
            return ipaddress.IPv6Address("::")
        return self._ip

    def scope_id(self) -> str:
        """The IPv6 zone (``"eth0"`` in ``fe80::1%eth0``), or ``""``."""
        if isinstance(self._ip, ipaddress.IPv6Address):
            return self._ip.scope_id or ""
        return ""

    def family(self) -> socket.AddressFamily:
        """The socket family to bind with; ``Any`` binds an IPv6 socket."""
        if self.is_null():
            raise ValueError("a null HostAddress has no address family")
        if self.protocol() == NetworkLayerProtocol.IPv4Protocol:
            return socket.AF_INET
        return socket.AF_INET6

    def sockaddr(self, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
        """The address tuple ``bind()`` takes, zone index resolved."""
        if self.is_null():
            raise ValueError("a null HostAddress cannot be bound")
        infos = socket.getaddrinfo(
            str(self),
            port,
            self.family(),
            socket.SOCK_STREAM,
            0,
            socket.AI_NUMERICHOST | socket.AI_PASSIVE,
        )
        sockaddr = infos[0][4]
        if self.family() == socket.AF_INET:
            return (str(sockaddr[0]), int(sockaddr[1]))
        return (str(sockaddr[0]), int(sockaddr[1]), 0, int(sockaddr[3]))  # type: ignore[misc]

    def with_port(self, port: int) -> str:
        """``127.0.0.1:8000`` or ``[::1]:8000``, as people write endpoints."""
        if self.family() == socket.AF_INET6:
            return f"[{self}]:{port}"
        return f"{self}:{port}"

    # -- value semantics ------------------------------------------------

    def __str__(self) -> str:
        if self._any:
            return "::"
        return "" if self._ip is None else str(self._ip)

    def __repr__(self) -> str:
        for name in ("Any", "Null"):
            if self == getattr(HostAddress, name, None):
                return f"HostAddress.{name}"
        return f"HostAddress({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HostAddress):
            return NotImplemented
        return self._any == other._any and self._ip == other._ip

    def __hash__(self) -> int:
        return hash((self._any, self._ip))

    def __reduce__(self) -> tuple[object, tuple[str, bool]]:
        # __setattr__ refuses, so copy and pickle go through the constructor.
        return (_restore, (str(self), self._any))


def _restore(text: str, dual_stack: bool) -> HostAddress:
    return HostAddress.Any if dual_stack else HostAddress(text)


def _parse(text: str) -> _IP | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


HostAddress.Null = HostAddress()
HostAddress.Any = HostAddress._dual_stack_any()
HostAddress.AnyIPv4 = HostAddress("0.0.0.0")
HostAddress.AnyIPv6 = HostAddress("::")
HostAddress.LocalHost = HostAddress("127.0.0.1")
HostAddress.LocalHostIPv6 = HostAddress("::1")
HostAddress.Broadcast = HostAddress("255.255.255.255")
