"""``proxy_allow_from``: the peers trusted to send a PROXY header.

A PROXY header lets its sender claim any client address, so only the
load balancers may send one.  ``compile_allow_list(entries)`` turns the
setting into an ``AllowList``; ``allow_list.allows(peer)`` answers for
the address ``accept()`` or ``getpeername()`` returned, before a byte is
read.

Entries are IPv4 or IPv6 addresses (``10.0.0.7``, ``::1``) or networks in
CIDR form (``10.0.0.0/8``, ``fd00::/8``), and ``unix`` for the peers of
Unix-socket listeners (whose peers have no address to match: whoever
can connect to the socket file is trusted).  An IPv4-mapped IPv6 peer
(``::ffff:10.0.0.7``, an IPv4 client of a dual-stack listener) matches
the IPv4 entries as well as the IPv6 ones.

Refused, with an error that names the entry: an empty list (it would
refuse every connection of a listener that requires the header), an
empty entry, a host name (no DNS at start-up, and a name is not a
trust boundary), a network with host bits set (``10.0.0.1/8``: the
intent is unclear), a zone (``fe80::1%eth0``), and the bare
unspecified addresses ``0.0.0.0`` and ``::``, which no peer has and
which are surely meant as "any".

Trusting everyone is possible, but only explicitly: ``0.0.0.0/0`` and
``::/0`` are accepted as written (behind a cloud NLB that keeps client
addresses, the peer *is* the client, so no narrower list works), and
``AllowList.trusts_any`` says so, for a warning at start-up.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from forkserver.errors import ForkserverError
from forkserver.proxyproto import Address

__all__ = ["UNIX", "AllowList", "AllowListError", "compile_allow_list"]

#: The entry that trusts the peers of Unix-socket listeners.
UNIX: Final = "unix"

_MAPPED_PREFIX: Final = 0xFFFF << 32  # ::ffff:0:0/96


class AllowListError(ForkserverError, ValueError):
    """A ``proxy_allow_from`` entry is malformed, or the list is empty."""


@dataclass(frozen=True, slots=True)
class _Table:
    """Networks of one family, grouped by prefix length for a set lookup each."""

    bits: int
    by_shift: tuple[tuple[int, frozenset[int]], ...]  # (host bits, network >> host bits)

    @classmethod
    def build(cls, bits: int, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
              ) -> _Table:  # fmt: skip
        groups: dict[int, set[int]] = {}
        for net in networks:
            shift = bits - net.prefixlen
            groups.setdefault(shift, set()).add(int(net.network_address) >> shift)
        # Widest networks first: a /0 answers at once.
        ordered = sorted(groups.items(), reverse=True)
        return cls(bits, tuple((shift, frozenset(nets)) for shift, nets in ordered))

    def __contains__(self, address: int) -> bool:
        return any(address >> shift in nets for shift, nets in self.by_shift)


@dataclass(frozen=True, slots=True)
class AllowList:
    """A compiled ``proxy_allow_from``; immutable, cheap to test against."""

    entries: tuple[str, ...]  # as written, for messages
    unix: bool
    _ipv4: _Table
    _ipv6: _Table

    @property
    def trusts_any(self) -> bool:
        """``0.0.0.0/0`` or ``::/0`` is listed: every IPv4 or IPv6 peer may send a header."""
        return any(shift == table.bits for table in (self._ipv4, self._ipv6)
                   for shift, _ in table.by_shift)  # fmt: skip

    def allows(self, peer: Address) -> bool:
        """Whether the peer *peer* (as ``getpeername()`` returns it) may send a header.

        A ``str`` or ``bytes`` is a Unix-socket peer; a tuple an IP peer.
        Anything that is not a numeric address is refused.
        """
        if isinstance(peer, str | bytes):
            return self.unix
        return self.allows_host(peer[0])

    def allows_host(self, host: str) -> bool:
        """Whether the numeric IP address *host* (a zone is ignored) is listed."""
        try:
            if ":" not in host:
                return int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big") in self._ipv4
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, host.partition("%")[0]),
                                   "big")  # fmt: skip
        except (OSError, ValueError):
            return False
        if value >> 32 == _MAPPED_PREFIX >> 32 and value & 0xFFFFFFFF in self._ipv4:
            return True
        return value in self._ipv6


def compile_allow_list(entries: Iterable[str], *, setting: str = "proxy_allow_from") -> AllowList:
    """Check and compile *entries*; raise ``AllowListError`` naming a bad one.

    Surrounding whitespace is ignored, and so are repeats.  *setting* is
    the name used in messages.
    """
    written: list[str] = []
    unix = False
    ipv4: list[ipaddress.IPv4Network] = []
    ipv6: list[ipaddress.IPv6Network] = []
    for number, raw in enumerate(entries, 1):
        if not isinstance(raw, str):
            raise AllowListError(f"{setting} entry {number} is not a string: {raw!r}")
        entry = raw.strip()
        written.append(entry)
        if entry.lower() == UNIX:
            unix = True
            continue
        net = _network(entry, f"{setting} entry {number} ({raw!r})")
        if isinstance(net, ipaddress.IPv4Network):
            ipv4.append(net)
        else:
            ipv6.append(net)
    if not written:
        raise AllowListError(f"{setting} is empty: list the addresses or networks of the "
                             "load balancers (and 'unix' for Unix-socket listeners)")  # fmt: skip
    return AllowList(tuple(written), unix, _Table.build(32, ipv4), _Table.build(128, ipv6))


def _network(entry: str, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not entry:
        raise AllowListError(f"{where} is empty")
    if "%" in entry:
        raise AllowListError(f"{where}: a zone (%...) cannot be matched; give the address alone")
    try:
        net = ipaddress.ip_network(entry, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise AllowListError(f"{where} is not an IPv4 or IPv6 address or network "
                                 f"(CIDR), nor {UNIX!r}") from None  # fmt: skip
        address = entry.partition("/")[0]
        raise AllowListError(f"{where} has host bits set: write {loose} for the network, "
                             f"or {address} alone for the one address") from None  # fmt: skip
    if "/" not in entry and net.network_address.is_unspecified:
        raise AllowListError(f"{where} is no peer's address; write "
                             f"{net.network_address}/0 to trust every "
                             f"IPv{net.version} peer") from None  # fmt: skip
    return net
