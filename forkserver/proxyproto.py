"""The PROXY protocol header (HAProxy's ``doc/proxy-protocol.txt``, v1 and v2).

An L4 load balancer that cannot pass the client's address any other way
(HAProxy ``send-proxy``/``send-proxy-v2``, nginx ``proxy_protocol on``
in a ``stream`` block, cloud NLBs) sends one header before the client's
first byte.  This module turns those bytes into a ``ProxyHeader``; it
does no I/O (``proxyread`` reads the header from a socket, ``proxyallow``
decides who may send one).

``parse(data, version)`` is pure and incremental.  *data* is what has
arrived so far, from the first byte of the connection; the answer is
one of:

* a ``ProxyHeader`` whose ``length`` is the header's size: bytes beyond
  it in *data* are the client's and are never looked at;
* ``NeedMore(n)``: the header is at least *n* bytes longer than *data*,
  and every byte of *data* belongs to it, so a reader may consume all of
  *data* and then read exactly *n* more without ever reading a byte of
  the client's;
* ``ProxyProtocolError`` raised, as soon as the bytes can no longer
  become a valid header (a receiver should abort early, says the spec).

The version is configured, never guessed.  The spec says a receiver
"MUST be configured to only receive the protocol described in this
specification and MUST not try to guess whether the protocol header is
present": a listener that accepted connections with or without a header
(or either version, detected per connection) would let any client that
reaches it directly claim any address by sending a header itself.  So
``parse`` takes the one version the listener expects, and bytes of the
other version are an error like any other.

Decisions where the spec leaves room, each on the strict side:

* v1: addresses and ports in canonical form only (IPv4 without leading
  zeros; ports 0-65535 without leading zeros; IPv6 as ``inet_pton``
  reads it, which includes the ``::ffff:1.2.3.4`` form that HAProxy's
  ``inet_ntop`` sends for IPv4 clients of an IPv6 frontend, but no zone).
  ``UNKNOWN`` may carry anything up to the CRLF, which is ignored.
* v2: only the seven family bytes the spec lists are valid.  With
  ``PROXY``, the two TCP families and UNIX stream give addresses, UNSPEC
  gives none (use the socket's), and the DGRAM ones are refused: this is
  a stream server, and a UDP header on a TCP connection is a
  misconfiguration, not something to fall back from.
* v2 ``LOCAL`` (the proxy's own connection, a health check): the spec
  says to "use the real connection endpoints and discard the protocol
  block including the family which is ignored".  So the 16 + length
  bytes are skipped unread, addresses and TLVs alike: nothing in them is
  used, so nothing in them needs checking (and no guess is made about
  where TLVs would start after the addresses of an ignored family).
  Only the fixed part is checked and the size bounded.
* v2 ``PROXY`` TLVs are all parsed, and any that overruns its container (the
  header, or the SSL TLV for its sub-TLVs) is an error, as is a known
  TLV given twice.  Text TLVs are decoded strictly (US-ASCII or UTF-8 as
  the spec says) and may not hold control characters.  A CRC32C TLV is
  verified.  Unknown types are kept raw in ``Tlvs.unknown``; NOOP is
  dropped.

Errors are ``ProxyProtocolError``: the message says what was wrong and
where, and ``reason`` is one of ``REASONS``, a fixed set fit for a
metric label.
"""

from __future__ import annotations

import enum
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias, get_args

from forkserver.errors import ForkserverError

__all__ = [
    "DEFAULT_MAX_SIZE",
    "MAX_V2_SIZE",
    "MIN_MAX_SIZE",
    "REASONS",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "Address",
    "Command",
    "NeedMore",
    "ProxyHeader",
    "ProxyInfo",
    "ProxyProtocolError",
    "Reason",
    "SslInfo",
    "Tlvs",
    "Version",
    "check_max_size",
    "crc32c",
    "parse",
]

Version: TypeAlias = Literal[1, 2]

#: What ``getpeername()``/``getsockname()`` return: ``(host, port)`` for
#: AF_INET, ``(host, port, flowinfo, scope_id)`` for AF_INET6, a ``str``
#: path for AF_UNIX (``bytes`` for an abstract address).
Address: TypeAlias = tuple[str, int] | tuple[str, int, int, int] | str | bytes

#: A v1 line is at most 107 bytes including the CRLF (the spec's worst case).
V1_MAX_LENGTH: Final = 107
#: The v2 format's own bound: 16 fixed bytes and a 16-bit length.
MAX_V2_SIZE: Final = 16 + 0xFFFF
#: The smallest ``max_size`` accepted: room for the largest address block
#: (UNIX, 2 x 108 bytes) after the 16 fixed bytes.
MIN_MAX_SIZE: Final = 16 + 216
#: The daemon's default bound on a v2 header.
DEFAULT_MAX_SIZE: Final = 4096

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"

Reason: TypeAlias = Literal[
    "bad_signature",  # v1: not "PROXY "; v2: not the 12-byte signature
    "bad_protocol",  # v1: not TCP4, TCP6 or UNKNOWN
    "bad_syntax",  # v1: wrong number of fields, stray spaces or CR
    "bad_address",  # v1: an address not canonical for its family
    "bad_port",  # v1: a port not canonical or out of range
    "no_crlf",  # v1: no CRLF within 107 bytes
    "bad_version",  # v2: version nibble is not 2
    "bad_command",  # v2: command nibble is neither LOCAL nor PROXY
    "bad_family",  # v2: family/transport byte not one the spec defines
    "unsupported_family",  # v2: UDP/DGRAM, which a stream server refuses
    "too_large",  # v2: 16 + length exceeds the configured maximum
    "truncated",  # v2: the length leaves too little for the address block or a TLV
    "bad_tlv",  # v2: a TLV value that is malformed, too long or repeated
    "bad_checksum",  # v2: the CRC32C TLV does not match the header
    "timeout",  # reading: no complete header by the deadline
    "closed",  # reading: the peer closed or reset mid-header
]
REASONS: Final[frozenset[str]] = frozenset(get_args(Reason))


class ProxyProtocolError(ForkserverError):
    """A PROXY header is invalid, too large, incomplete at the deadline, or cut off.

    ``str(exc)`` names the cause and where it is; ``reason`` is one of
    ``REASONS``.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason


class Command(enum.IntEnum):
    """The v2 command nibble (v1 headers are always ``PROXY``)."""

    LOCAL = 0  # the proxy's own connection (a health check): use the socket's addresses
    PROXY = 1  # relayed on behalf of a client: the header has its addresses


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The header is at least ``n`` bytes longer than what was given."""

    n: int


#: ``SslInfo.client`` bits (``PP2_CLIENT_*``).
CLIENT_SSL: Final = 0x01
CLIENT_CERT_CONN: Final = 0x02
CLIENT_CERT_SESS: Final = 0x04


@dataclass(frozen=True, slots=True)
class SslInfo:
    """The ``PP2_TYPE_SSL`` TLV: how the client talked to the proxy."""

    client: int  # CLIENT_* bits
    verify: int  # 0 when the client's certificate was verified
    version: str | None = None  # "TLSv1.3"
    cn: str | None = None  # the client certificate's Common Name
    cipher: str | None = None  # "ECDHE-RSA-AES128-GCM-SHA256"
    sig_alg: str | None = None  # "RSA-SHA256"
    key_alg: str | None = None  # "RSA2048"
    group: str | None = None  # "secp256r1"
    sig_scheme: str | None = None  # "rsa_pss_rsae_sha256"
    client_cert: bytes | None = None  # DER

    @property
    def tls(self) -> bool:
        """The client connected over TLS."""
        return bool(self.client & CLIENT_SSL)

    @property
    def cert_verified(self) -> bool:
        """The client presented a certificate and the proxy verified it."""
        return bool(self.client & (CLIENT_CERT_CONN | CLIENT_CERT_SESS)) and self.verify == 0


@dataclass(frozen=True, slots=True)
class Tlvs:
    """The v2 TLVs; fields are ``None`` when the header has no such TLV.

    A v1 header has none, nor does a v2 ``LOCAL`` header (its block is
    discarded unread).
    """

    alpn: bytes | None = None
    authority: str | None = None  # the host name the client asked for (SNI)
    crc32c: int | None = None  # present means verified
    unique_id: bytes | None = None
    ssl: SslInfo | None = None
    netns: str | None = None
    #: Other types (custom 0xE0-0xEF, experimental, future), in header order.
    unknown: tuple[tuple[int, bytes], ...] = ()


_NO_TLVS: Final = Tlvs()


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a complete, valid header says.

    ``source`` and ``destination`` are ``None`` when the header carries no
    addresses (v1 ``UNKNOWN``, v2 ``LOCAL``, v2 ``PROXY`` with UNSPEC):
    the connection's own addresses stand then, see ``resolve``.
    ``family`` is the family of the addresses, ``None`` with them.
    """

    version: Version
    command: Command
    family: socket.AddressFamily | None
    source: Address | None
    destination: Address | None
    length: int  # bytes of the header, CRLF or TLVs included
    tlvs: Tlvs = field(default=_NO_TLVS)

    def resolve(self, peer: Address | None, local: Address | None) -> ProxyInfo:
        """The connection's addresses: the header's, or *peer* and *local* (the
        socket's ``getpeername()`` and ``getsockname()``) when it has none."""
        if self.source is not None and self.destination is not None:
            return ProxyInfo(self.source, self.destination, self.command, self.tlvs,
                             self.length, self.version, from_header=True)  # fmt: skip
        if peer is None or local is None:
            raise ValueError("this header carries no addresses: the socket's are needed")
        return ProxyInfo(peer, local, self.command, self.tlvs, self.length, self.version,
                         from_header=False)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """The connection as the handler should see it, once its header is read.

    ``source`` is the client (what ``getpeername()`` would give without
    the proxy), ``destination`` the address it connected to;
    ``from_header`` is false when they are the socket's own (``LOCAL``,
    ``UNKNOWN``, UNSPEC).
    """

    source: Address
    destination: Address
    command: Command
    tlvs: Tlvs
    length: int
    version: Version
    from_header: bool


def check_max_size(max_size: int) -> None:
    """Refuse a v2 size bound outside [``MIN_MAX_SIZE``, ``MAX_V2_SIZE``]."""
    if not MIN_MAX_SIZE <= max_size <= MAX_V2_SIZE:
        raise ValueError(f"max_size must be between {MIN_MAX_SIZE} and {MAX_V2_SIZE}, "
                         f"not {max_size}")  # fmt: skip


def parse(data: bytes | bytearray | memoryview, version: Version, *,
          max_size: int = DEFAULT_MAX_SIZE) -> ProxyHeader | NeedMore:  # fmt: skip
    """Parse the header at the start of *data*, expecting *version* (1 or 2).

    See the module docstring for the three outcomes.  *max_size* bounds a
    v2 header (16 + length); a v1 line is always bounded by 107 bytes.
    """
    if version == 1:
        return _parse_v1(bytes(data[:V1_MAX_LENGTH]))
    if version == 2:
        check_max_size(max_size)
        return _parse_v2(data, max_size)
    raise ValueError(f"PROXY protocol version must be 1 or 2, not {version!r}")


# --- CRC32C (Castagnoli), for the v2 checksum TLV ---------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C (RFC 4960 appendix B, iSCSI); pass the previous value to continue."""
    table = _CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- v1: one text line ------------------------------------------------------

_V1_PREFIX: Final = b"PROXY "
_V1_SHORTEST: Final = len(b"PROXY UNKNOWN\r\n")
_V1_PROTOCOLS: Final = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")
_V1_FIELDS: Final = ("source address", "destination address", "source port", "destination port")
_V1_CHARS: Final = {
    b"TCP4 ": frozenset(b"0123456789. "),
    b"TCP6 ": frozenset(b"0123456789abcdefABCDEF:. "),
}
_OCTET: Final = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_RE: Final = re.compile(rb"%s(?:\.%s){3}" % (_OCTET, _OCTET))
_IPV6_RE: Final = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
_PORT_RE: Final = re.compile(rb"0|[1-9][0-9]{0,4}")


def _show(raw: bytes) -> str:
    """Peer bytes for a message: quoted, non-ASCII escaped, at most 48 bytes."""
    text = repr(raw[:48].decode("ascii", "backslashreplace"))
    return text + "..." if len(raw) > 48 else text


def _v1_error(reason: Reason, message: str) -> ProxyProtocolError:
    return ProxyProtocolError(reason, "v1 header: " + message)


def _parse_v1(data: bytes) -> ProxyHeader | NeedMore:
    end = data.find(b"\r\n")
    if end >= 0:
        return _parse_v1_line(data[:end], end + 2)
    _check_v1_prefix(data)
    # No CRLF yet, so all of *data* is line; the line needs at least its CRLF.
    need = max(_V1_SHORTEST - len(data), 1 if data.endswith(b"\r") else 2)
    if len(data) + need > V1_MAX_LENGTH:
        raise _v1_error("no_crlf", f"no CRLF within {V1_MAX_LENGTH} bytes")
    return NeedMore(need)


def _check_v1_prefix(data: bytes) -> None:
    """Raise as soon as a line without its CRLF can no longer become valid."""
    if not _V1_PREFIX.startswith(data[: len(_V1_PREFIX)]):
        raise _v1_error("bad_signature", f"does not start with 'PROXY ': {_show(data[:16])}")
    rest = data[len(_V1_PREFIX) :]
    if not rest:
        return
    for protocol in _V1_PROTOCOLS:
        if protocol.startswith(rest[: len(protocol)]):
            break
    else:
        raise _v1_error("bad_protocol", f"protocol {_show(rest.split(b' ')[0][:16])} "
                                        "is not TCP4, TCP6 or UNKNOWN")  # fmt: skip
    tail = rest[len(protocol) :]
    if protocol == b"UNKNOWN":
        if tail and tail[:1] not in (b" ", b"\r"):
            raise _v1_error("bad_protocol", f"protocol {_show(rest[:16])} is not UNKNOWN")
        if tail[:1] == b"\r" and len(tail) > 1:
            raise _v1_error("bad_syntax", "CR not followed by LF after UNKNOWN")
        return  # the rest of an UNKNOWN line is ignored
    _check_v1_fields(data, len(_V1_PREFIX) + len(protocol), protocol)


def _check_v1_fields(data: bytes, start: int, protocol: bytes) -> None:
    """Check the bytes of a TCP4/TCP6 line's fields that have arrived."""
    allowed = _V1_CHARS[protocol]
    where = 0
    for offset in range(start, len(data)):
        byte = data[offset]
        if byte == 0x20:
            where += 1
            if where == len(_V1_FIELDS):
                raise _v1_error("bad_syntax", f"more than {len(_V1_FIELDS)} fields after "
                                              f"{protocol.decode().strip()}")  # fmt: skip
        elif byte == 0x0D and offset == len(data) - 1:
            pass  # the CR of the CRLF still to come
        elif byte not in allowed:
            reason: Reason = "bad_address" if where < 2 else "bad_port"
            raise _v1_error(reason, f"byte 0x{byte:02x} at offset {offset} cannot be "
                                    f"part of the {_V1_FIELDS[where]}")  # fmt: skip


def _parse_v1_line(line: bytes, length: int) -> ProxyHeader:
    """*line* is everything before the first CRLF; *length* includes the CRLF."""
    if not line.startswith(_V1_PREFIX):
        raise _v1_error("bad_signature", f"does not start with 'PROXY ': {_show(line[:16])}")
    rest = line[len(_V1_PREFIX) :]
    if rest == b"UNKNOWN" or rest.startswith(b"UNKNOWN "):
        return ProxyHeader(1, Command.PROXY, None, None, None, length)
    fields = rest.split(b" ")
    protocol = fields[0]
    if protocol == b"TCP4":
        family = socket.AF_INET
    elif protocol == b"TCP6":
        family = socket.AF_INET6
    else:
        raise _v1_error("bad_protocol", f"protocol {_show(protocol[:16])} "
                                        "is not TCP4, TCP6 or UNKNOWN")  # fmt: skip
    if len(fields) != 5:
        raise _v1_error("bad_syntax", f"a {protocol.decode()} line has 4 fields separated by "
                                      f"single spaces, not {_show(rest[5:])}")  # fmt: skip
    src = _v1_address(family, fields[1], _V1_FIELDS[0])
    dst = _v1_address(family, fields[2], _V1_FIELDS[1])
    sport = _v1_port(fields[3], _V1_FIELDS[2])
    dport = _v1_port(fields[4], _V1_FIELDS[3])
    if family == socket.AF_INET:
        return ProxyHeader(1, Command.PROXY, family, (src, sport), (dst, dport), length)
    return ProxyHeader(1, Command.PROXY, family, (src, sport, 0, 0), (dst, dport, 0, 0), length)


def _v1_address(family: socket.AddressFamily, text: bytes, what: str) -> str:
    if family == socket.AF_INET:
        if _IPV4_RE.fullmatch(text):
            return text.decode("ascii")
        raise _v1_error("bad_address", f"{what} {_show(text)} is not an IPv4 address in "
                                       "canonical form (four numbers 0-255 without "
                                       "leading zeros)")  # fmt: skip
    if _IPV6_RE.fullmatch(text):
        try:
            packed = socket.inet_pton(socket.AF_INET6, text.decode("ascii"))
        except OSError:
            pass
        else:
            return socket.inet_ntop(socket.AF_INET6, packed)
    raise _v1_error("bad_address", f"{what} {_show(text)} is not an IPv6 address")


def _v1_port(text: bytes, what: str) -> int:
    if _PORT_RE.fullmatch(text) and int(text) <= 0xFFFF:
        return int(text)
    raise _v1_error("bad_port", f"{what} {_show(text)} is not a number 0-65535 "
                                "without leading zeros")  # fmt: skip


# --- v2: binary -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Family:
    name: str
    address_length: int
    family: socket.AddressFamily | None  # None: no addresses; refused with PROXY if not UNSPEC
    supported: bool


_FAMILIES: Final = {
    0x00: _Family("UNSPEC", 0, None, True),
    0x11: _Family("TCP over IPv4", 12, socket.AF_INET, True),
    0x12: _Family("UDP over IPv4", 12, None, False),
    0x21: _Family("TCP over IPv6", 36, socket.AF_INET6, True),
    0x22: _Family("UDP over IPv6", 36, None, False),
    0x31: _Family("UNIX stream", 216, socket.AF_UNIX, True),
    0x32: _Family("UNIX datagram", 216, None, False),
}


def _v2_error(reason: Reason, message: str) -> ProxyProtocolError:
    return ProxyProtocolError(reason, "v2 header: " + message)


def _parse_v2(data: bytes | bytearray | memoryview, max_size: int) -> ProxyHeader | NeedMore:
    fixed = bytes(data[:16])
    _v2_signature(fixed[:12])
    if len(fixed) < 16:
        if len(fixed) > 12:
            command = _v2_command(fixed[12])
            if len(fixed) > 13:
                _v2_family(fixed[13], command)
        return NeedMore(16 - len(fixed))
    command = _v2_command(fixed[12])
    family = _v2_family(fixed[13], command)
    payload = int.from_bytes(fixed[14:16], "big")
    total = 16 + payload
    if total > max_size:
        raise _v2_error("too_large", f"16 + {payload} bytes exceed the limit of {max_size}")
    address_length = family.address_length
    if command == Command.PROXY and payload < address_length:
        raise _v2_error("truncated", f"{payload} of {address_length} address bytes "
                                     f"for {family.name}")  # fmt: skip
    if len(data) < total:
        return NeedMore(total - len(data))
    if command == Command.LOCAL:
        return ProxyHeader(2, command, None, None, None, total)  # the block is discarded
    header = bytes(data[:total])
    tlvs = _parse_tlvs(header, 16 + address_length)
    if family.family is None:
        return ProxyHeader(2, command, None, None, None, total, tlvs)
    src, dst = _v2_addresses(family.family, header[16 : 16 + address_length])
    return ProxyHeader(2, command, family.family, src, dst, total, tlvs)


def _v2_signature(got: bytes) -> None:
    if not V2_SIGNATURE.startswith(got):
        at = next(i for i, (a, b) in enumerate(zip(got, V2_SIGNATURE, strict=False)) if a != b)
        raise _v2_error("bad_signature", f"byte {at} of the 12-byte signature is 0x{got[at]:02x}, "
                                         f"not 0x{V2_SIGNATURE[at]:02x}")  # fmt: skip


def _v2_command(byte: int) -> Command:
    version, command = byte >> 4, byte & 0x0F
    if version != 2:
        raise _v2_error("bad_version", f"version {version} (byte 12 is 0x{byte:02x}), "
                                       "only 2 is defined")  # fmt: skip
    if command not in (Command.LOCAL, Command.PROXY):
        raise _v2_error("bad_command", f"command 0x{command:x} is neither LOCAL (0) "
                                       "nor PROXY (1)")  # fmt: skip
    return Command(command)


def _v2_family(byte: int, command: Command) -> _Family:
    family = _FAMILIES.get(byte)
    if family is None:
        raise _v2_error("bad_family", f"family/transport byte 0x{byte:02x} is not "
                                      "one the specification defines")  # fmt: skip
    if command == Command.PROXY and not family.supported:
        raise _v2_error("unsupported_family", f"family 0x{byte:02x} ({family.name}) "
                                              "is not supported")  # fmt: skip
    return family


def _v2_addresses(family: socket.AddressFamily, block: bytes) -> tuple[Address, Address]:
    if family == socket.AF_INET:
        sport, dport = int.from_bytes(block[8:10], "big"), int.from_bytes(block[10:12], "big")
        return ((socket.inet_ntop(family, block[0:4]), sport),
                (socket.inet_ntop(family, block[4:8]), dport))  # fmt: skip
    if family == socket.AF_INET6:
        sport, dport = int.from_bytes(block[32:34], "big"), int.from_bytes(block[34:36], "big")
        return ((socket.inet_ntop(family, block[0:16]), sport, 0, 0),
                (socket.inet_ntop(family, block[16:32]), dport, 0, 0))  # fmt: skip
    return _unix_address(block[:108], "source"), _unix_address(block[108:], "destination")


def _unix_address(raw: bytes, what: str) -> str | bytes:
    """A 108-byte ``sun_path`` as ``getpeername()`` shows it.

    A path ends at its NUL (bytes after it are padding); a leading NUL is
    an abstract address, returned as bytes without its trailing NUL
    padding; all NULs is an unnamed socket, ``''``.
    """
    if raw[0] == 0:
        name = raw.rstrip(b"\x00")
        return name if name else ""
    end = raw.find(b"\x00")
    if end < 0:
        raise _v2_error("bad_address", f"the UNIX {what} path is not NUL-terminated "
                                       "within 108 bytes")  # fmt: skip
    return raw[:end].decode("utf-8", "surrogateescape")


# TLV types (``PP2_TYPE_*``) and SSL sub-types (``PP2_SUBTYPE_SSL_*``).
TLV_ALPN: Final = 0x01
TLV_AUTHORITY: Final = 0x02
TLV_CRC32C: Final = 0x03
TLV_NOOP: Final = 0x04
TLV_UNIQUE_ID: Final = 0x05
TLV_SSL: Final = 0x20
TLV_NETNS: Final = 0x30
SSL_VERSION: Final = 0x21
SSL_CN: Final = 0x22
SSL_CIPHER: Final = 0x23
SSL_SIG_ALG: Final = 0x24
SSL_KEY_ALG: Final = 0x25
SSL_GROUP: Final = 0x26
SSL_SIG_SCHEME: Final = 0x27
SSL_CLIENT_CERT: Final = 0x28

#: The unique ID is "up to 128 bytes"; text TLVs (host names, cipher and
#: algorithm names, a certificate's CN, a namespace name) are bounded as
#: HAProxy bounds AUTHORITY.
MAX_UNIQUE_ID: Final = 128
MAX_TEXT_TLV: Final = 255

_TLV_NAMES: Final = {
    TLV_ALPN: "ALPN", TLV_AUTHORITY: "AUTHORITY", TLV_CRC32C: "CRC32C", TLV_NOOP: "NOOP",
    TLV_UNIQUE_ID: "UNIQUE_ID", TLV_SSL: "SSL", TLV_NETNS: "NETNS",
}  # fmt: skip
_SSL_NAMES: Final = {
    SSL_VERSION: "version", SSL_CN: "cn", SSL_CIPHER: "cipher", SSL_SIG_ALG: "sig_alg",
    SSL_KEY_ALG: "key_alg", SSL_GROUP: "group", SSL_SIG_SCHEME: "sig_scheme",
    SSL_CLIENT_CERT: "client_cert",
}  # fmt: skip
_UTF8_SUBTYPES: Final = frozenset({SSL_CN})
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")


def _tlv_name(kind: int, names: dict[int, str]) -> str:
    name = names.get(kind)
    return f"0x{kind:02x} ({name})" if name else f"0x{kind:02x}"


def _tlvs_in(block: bytes, start: int, end: int, what: str,
             names: dict[int, str]) -> Iterator[tuple[int, bytes, int]]:  # fmt: skip
    """Yield ``(type, value, value_offset)`` for each TLV in block[start:end]."""
    within = "" if what == "TLV" else " of the SSL TLV"
    pos = start
    while pos < end:
        if end - pos < 3:
            raise _v2_error("truncated", f"{end - pos} byte(s) left at offset {pos}{within}, "
                                         f"too few for a {what} (3)")  # fmt: skip
        kind = block[pos]
        size = int.from_bytes(block[pos + 1 : pos + 3], "big")
        value_end = pos + 3 + size
        if value_end > end:
            left = end - pos - 3
            raise _v2_error("truncated", f"{what} {_tlv_name(kind, names)} at offset {pos}{within} "
                                         f"claims {size} bytes, {left} are left")  # fmt: skip
        yield kind, block[pos + 3 : value_end], pos + 3
        pos = value_end


def _text(value: bytes, what: str, encoding: str) -> str:
    if len(value) > MAX_TEXT_TLV:
        raise _v2_error("bad_tlv", f"{what} is {len(value)} bytes, more than {MAX_TEXT_TLV}")
    try:
        text = value.decode(encoding)
    except UnicodeDecodeError:
        raise _v2_error("bad_tlv", f"{what} is not {encoding}: {_show(value)}") from None
    if _CONTROL_RE.search(text):
        raise _v2_error("bad_tlv", f"{what} holds a control character: {_show(value)}")
    return text


def _parse_tlvs(header: bytes, start: int) -> Tlvs:
    alpn = unique_id = None
    authority = netns = None
    ssl = None
    crc: int | None = None
    crc_at = 0
    seen: set[int] = set()
    unknown: list[tuple[int, bytes]] = []
    for kind, value, offset in _tlvs_in(header, start, len(header), "TLV", _TLV_NAMES):
        if kind == TLV_NOOP:
            continue
        if kind not in _TLV_NAMES:
            unknown.append((kind, value))
            continue
        if kind in seen:
            raise _v2_error("bad_tlv", f"TLV {_tlv_name(kind, _TLV_NAMES)} appears twice")
        seen.add(kind)
        if kind == TLV_CRC32C:
            if len(value) != 4:
                raise _v2_error("bad_tlv", f"CRC32C is {len(value)} bytes, not 4")
            crc, crc_at = int.from_bytes(value, "big"), offset
        elif kind == TLV_ALPN:
            alpn = value
        elif kind == TLV_UNIQUE_ID:
            unique_id = _unique_id(value)
        elif kind == TLV_SSL:
            ssl = _parse_ssl(value)
        elif kind == TLV_AUTHORITY:
            authority = _text(value, "AUTHORITY", "utf-8")
        else:
            netns = _text(value, "NETNS", "ascii")
    if crc is not None:
        _verify_crc32c(header, crc, crc_at)
    return Tlvs(alpn, authority, crc, unique_id, ssl, netns, tuple(unknown))


def _verify_crc32c(header: bytes, expected: int, offset: int) -> None:
    """The CRC32C of the whole header with the checksum field (at *offset*) zeroed."""
    actual = crc32c(header[:offset] + b"\x00\x00\x00\x00" + header[offset + 4 :])
    if actual != expected:
        raise _v2_error("bad_checksum", f"CRC32C TLV says 0x{expected:08x}, "
                                        f"the header's is 0x{actual:08x}")  # fmt: skip


def _unique_id(value: bytes) -> bytes:
    if len(value) > MAX_UNIQUE_ID:
        raise _v2_error("bad_tlv", f"UNIQUE_ID is {len(value)} bytes, more than {MAX_UNIQUE_ID}")
    return value


def _parse_ssl(value: bytes) -> SslInfo:
    if len(value) < 5:
        raise _v2_error("bad_tlv", f"SSL is {len(value)} bytes, too few for its client "
                                   "and verify fields (5)")  # fmt: skip
    texts: dict[int, str] = {}
    cert: bytes | None = None
    for kind, sub, _ in _tlvs_in(value, 5, len(value), "SSL sub-TLV", _SSL_NAMES):
        if kind not in _SSL_NAMES:
            continue  # an SSL sub-type this receiver does not know
        if kind in texts or (kind == SSL_CLIENT_CERT and cert is not None):
            raise _v2_error("bad_tlv", f"SSL sub-TLV {_tlv_name(kind, _SSL_NAMES)} appears twice")
        if kind == SSL_CLIENT_CERT:
            cert = sub
        else:
            encoding = "utf-8" if kind in _UTF8_SUBTYPES else "ascii"
            texts[kind] = _text(sub, f"SSL {_SSL_NAMES[kind]}", encoding)
    return SslInfo(
        client=value[0], verify=int.from_bytes(value[1:5], "big"),
        version=texts.get(SSL_VERSION), cn=texts.get(SSL_CN), cipher=texts.get(SSL_CIPHER),
        sig_alg=texts.get(SSL_SIG_ALG), key_alg=texts.get(SSL_KEY_ALG),
        group=texts.get(SSL_GROUP), sig_scheme=texts.get(SSL_SIG_SCHEME), client_cert=cert,
    )  # fmt: skip
