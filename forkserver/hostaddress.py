"""``HostAddress``: an IP address as ``QHostAddress`` models it.

A ``HostAddress`` is null, a literal IPv4/IPv6 address, or the special
dual-stack ``Any`` (one IPv6 socket with ``IPV6_V6ONLY`` off, so IPv4
clients connect too).  Like Qt, it never resolves host names:
``HostAddress("localhost")`` is null, and so is any text that is not a
numeric address.  Instances are immutable and hashable.

An IPv6 zone (``fe80::1%lo``) is kept as written, but compares by the
interface it names: ``fe80::1%lo`` equals ``fe80::1%1`` when ``lo`` is
interface 1.  The name is looked up once, when the address is made; a
name no interface has compares as text.
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

    __slots__ = ("_any", "_ip", "_zone")

    Null: ClassVar[HostAddress]
    Any: ClassVar[HostAddress]
    AnyIPv4: ClassVar[HostAddress]
    AnyIPv6: ClassVar[HostAddress]
    LocalHost: ClassVar[HostAddress]
    LocalHostIPv6: ClassVar[HostAddress]
    Broadcast: ClassVar[HostAddress]

    _ip: _IP | None
    _any: bool
    _zone: int | str | None  # the zone's interface index; its text if no interface has it

    def __init__(
        self,
        address: str | HostAddress | ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
    ) -> None:
        if isinstance(address, HostAddress):
            ip, dual, zone = address._ip, address._any, address._zone
        elif isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address | str | None):
            ip = _parse(address) if isinstance(address, str) else address
            dual, zone = False, _zone_key(ip)
        else:
            raise TypeError(
                f"HostAddress() takes a str, an ipaddress address or a HostAddress, "
                f"not {type(address).__name__}"
            )
        object.__setattr__(self, "_ip", ip)
        object.__setattr__(self, "_any", dual)
        object.__setattr__(self, "_zone", zone)

    @classmethod
    def _dual_stack_any(cls) -> HostAddress:
        address = cls()
        object.__setattr__(address, "_any", True)
        return address

    @classmethod
    def from_sockaddr(cls, family: int, sockaddr: object) -> HostAddress:
        """The address part of a ``getsockname()``/``accept()`` result.

        A scope id is reported by interface name (``fe80::1%lo``), as Qt
        does, or by number when no interface has that index.
        """
        if family == socket.AF_INET and isinstance(sockaddr, tuple):
            return cls(str(sockaddr[0]))
        if family == socket.AF_INET6 and isinstance(sockaddr, tuple):
            host, scope = str(sockaddr[0]).partition("%")[0], int(sockaddr[3])
            if scope:
                host = f"{host}%{_interface_name(scope)}"
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

    def _key(self) -> tuple[bool, int, bytes, int | str | None]:
        ip = self._ip
        if ip is None:
            return (self._any, 0, b"", None)
        return (self._any, ip.version, ip.packed, self._zone)  # packed: without the zone

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HostAddress):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self) -> tuple[object, tuple[str, bool]]:
        # __setattr__ refuses, so copy and pickle go through the constructor.
        return (_restore, (str(self), self._any))


def _restore(text: str, dual_stack: bool) -> HostAddress:
    return HostAddress.Any if dual_stack else HostAddress(text)


def _zone_key(ip: _IP | None) -> int | str | None:
    """What an IPv6 zone means: the interface index it names or is."""
    zone = ip.scope_id if isinstance(ip, ipaddress.IPv6Address) else None
    if not zone:
        return None
    if zone.isascii() and zone.isdigit():
        return int(zone)
    try:
        return socket.if_nametoindex(zone)
    except OSError:  # no such interface (here, now): only the same text is the same zone
        return zone


def _interface_name(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return str(index)


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
