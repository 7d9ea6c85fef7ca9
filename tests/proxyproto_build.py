"""Building PROXY headers for the tests, independently of ``forkserver.proxyproto``.

The CRC32C here is the bit-by-bit definition (no table), so a header
built with ``crc=True`` checks the module's table-driven one.
"""

from __future__ import annotations

import socket

SIG = b"\r\n\r\n\x00\r\nQUIT\n"

LOCAL, PROXY = 0x20, 0x21
UNSPEC, TCP4, UDP4, TCP6, UDP6, UNIX_STREAM, UNIX_DGRAM = 0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32


def crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def v1(protocol: str, src: str = "", dst: str = "", sport: int = 0, dport: int = 0) -> bytes:
    if protocol == "UNKNOWN" and not src:
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {protocol} {src} {dst} {sport} {dport}\r\n".encode()


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def ssl_tlv(client: int, verify: int, subs: list[tuple[int, bytes]] = []) -> bytes:  # noqa: B006
    body = bytes([client]) + verify.to_bytes(4, "big") + b"".join(tlv(k, v) for k, v in subs)
    return tlv(0x20, body)


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    return (socket.inet_pton(family, src) + socket.inet_pton(family, dst)
            + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))  # fmt: skip


def unix(src: bytes, dst: bytes) -> bytes:
    return src.ljust(108, b"\x00") + dst.ljust(108, b"\x00")


def v2(command: int = PROXY, family: int = TCP4, addresses: bytes = b"", tlvs: bytes = b"",
       *, crc: bool = False, length: int | None = None) -> bytes:  # fmt: skip
    """A v2 header; ``crc`` appends a CRC32C TLV; ``length`` overrides the length field."""
    body = addresses + tlvs
    if crc:
        body += tlv(0x03, b"\x00\x00\x00\x00")
    size = len(body) if length is None else length
    header = SIG + bytes([command, family]) + size.to_bytes(2, "big") + body
    if crc:
        header = header[:-4] + crc32c_bitwise(header).to_bytes(4, "big")
    return header


def v2_inet(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"", *,
            crc: bool = False) -> bytes:  # fmt: skip
    family = TCP6 if ":" in src else TCP4
    return v2(PROXY, family, inet(src, dst, sport, dport), tlvs, crc=crc)
