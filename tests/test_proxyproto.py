"""The PROXY header parser on the spec's examples and on each rule, one by one."""

from __future__ import annotations

import socket

import pytest

from forkserver.proxyproto import (
    DEFAULT_MAX_SIZE,
    MAX_V2_SIZE,
    MIN_MAX_SIZE,
    REASONS,
    Command,
    NeedMore,
    ProxyHeader,
    ProxyProtocolError,
    SslInfo,
    Tlvs,
    crc32c,
    parse,
)
from tests import proxyproto_build as b

PAYLOAD = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"


def header(data: bytes, version: int, **kw: int) -> ProxyHeader:
    result = parse(data, version, **kw)  # type: ignore[arg-type]
    assert isinstance(result, ProxyHeader), result
    return result


def error(data: bytes, version: int, **kw: int) -> ProxyProtocolError:
    with pytest.raises(ProxyProtocolError) as info:
        parse(data, version, **kw)  # type: ignore[arg-type]
    assert info.value.reason in REASONS
    return info.value


# --- CRC32C ------------------------------------------------------------------


@pytest.mark.parametrize(("data", "crc"), [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),  # the CRC catalogue's check value for CRC-32/ISCSI
    (bytes(32), 0x8A9136AA),  # RFC 3720 B.4: 32 bytes of zeros
    (b"\xff" * 32, 0x62A8AB43),  # 32 bytes of ones
    (bytes(range(32)), 0x46DD794E),  # 32 incrementing bytes
    (bytes(range(31, -1, -1)), 0x113FDB5C),  # 32 decrementing bytes
])  # fmt: skip
def test_crc32c_known_vectors(data: bytes, crc: int) -> None:
    assert crc32c(data) == crc
    assert b.crc32c_bitwise(data) == crc


def test_crc32c_continues_from_a_previous_value() -> None:
    data = bytes(range(256)) * 3
    assert crc32c(data[100:], crc32c(data[:100])) == crc32c(data) == b.crc32c_bitwise(data)


# --- v1: the spec's examples --------------------------------------------------


def test_v1_spec_example_tcp4_leaves_the_request_after_it() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    h = header(line + PAYLOAD, 1)
    assert (h.version, h.command, h.family) == (1, Command.PROXY, socket.AF_INET)
    assert h.source == ("192.168.0.1", 56324)
    assert h.destination == ("192.168.0.11", 443)
    assert h.length == len(line) == 47
    assert h.tlvs == Tlvs()


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
    b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    b" 65535 65535\r\n",
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:"
    b"ffff 65535 65535\r\n",
])  # fmt: skip
def test_v1_spec_longest_lines_are_accepted(line: bytes) -> None:
    assert len(line) in (56, 104, 15, 107)
    assert header(line + PAYLOAD, 1).length == len(line)


def test_v1_tcp6_addresses_come_out_as_getpeername_shows_them() -> None:
    h = header(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::ffff:127.0.0.1 1 0\r\n", 1)
    assert h.family == socket.AF_INET6
    assert h.source == ("2001:db8::1", 1, 0, 0)
    assert h.destination == ("::ffff:127.0.0.1", 0, 0, 0)


def test_v1_unknown_means_the_socket_addresses_and_ignores_the_rest_of_the_line() -> None:
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN anything \r at all\n here\r\n"):
        h = header(line + PAYLOAD, 1)
        assert (h.command, h.family, h.source, h.destination) == (Command.PROXY, None, None, None)
        assert h.length == len(line)
        info = h.resolve(("10.0.0.1", 5), ("10.0.0.2", 80))
        assert (info.source, info.destination, info.from_header) == (
            ("10.0.0.1", 5), ("10.0.0.2", 80), False)


def test_v1_needs_the_crlf_and_asks_only_for_bytes_of_the_line() -> None:
    assert parse(b"", 1) == NeedMore(15)
    assert parse(b"PROX", 1) == NeedMore(11)
    assert parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", 1) == NeedMore(2)
    assert parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", 1) == NeedMore(1)


@pytest.mark.parametrize(("line", "reason", "words"), [
    (b"GET / HTTP/1.1\r\n", "bad_signature", "does not start with 'PROXY '"),
    (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "bad_signature", "'PROXY '"),
    (b"PROXY  TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "bad_protocol", "is not TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "bad_protocol", "'TCP5'"),
    (b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n", "bad_protocol", "'UDP4'"),
    (b"PROXY UNKNOWNX\r\n", "bad_protocol", "UNKNOWN"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "bad_syntax", "4 fields"),
    (b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", "bad_syntax", "single spaces"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", "bad_syntax", "4 fields"),
    (b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", "bad_address", "source address '01.2.3.4'"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.256 1 2\r\n", "bad_address", "destination address"),
    (b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", "bad_address", "'1.2.3'"),
    (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "bad_address", "IPv4"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad_address", "is not an IPv6 address"),
    (b"PROXY TCP6 ::1 1:2:3:4:5:6:7:8:9 1 2\r\n", "bad_address", "destination"),
    (b"PROXY TCP6 fe80::1%lo ::1 1 2\r\n", "bad_address", "'fe80::1%lo'"),
    (b"PROXY TCP6 ::1 ::1:: 1 2\r\n", "bad_address", "'::1::'"),
    (b"PROXY TCP6 ::1 ::ffff:01.2.3.4 1 2\r\n", "bad_address", "destination"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "bad_port", "source port '01'"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n", "bad_port", "destination port '65536'"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 -2\r\n", "bad_port", "destination port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", "bad_port", "byte 0x0a"),  # LF alone ends nothing
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\r\n", "bad_port", "'2\\r'"),
    (b"PROXY TCP4 1.2.3.4\r1.2.3.4 1 2", "bad_address", "byte 0x0d at offset 18"),
    (b"PROXY UNKNOWN\rX", "bad_syntax", "CR not followed by LF"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3", "bad_syntax", "more than 4 fields"),
    (b"PROXY TCP4 1.2.3.4 1.2x", "bad_address", "byte 0x78 at offset 22"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1x", "bad_port", "source port"),
    (b"PROXY UNKNOWN " + b"f" * 200, "no_crlf", "no CRLF within 107 bytes"),
    (b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n", "no_crlf", "107"),  # a 108-byte line
    (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c", "bad_signature", "'PROXY '"),  # v2 on v1
])  # fmt: skip
def test_v1_errors_name_the_cause(line: bytes, reason: str, words: str) -> None:
    exc = error(line, 1)
    assert exc.reason == reason, exc
    assert str(exc).startswith("v1 header: ")
    assert words in str(exc), exc


def test_v1_the_107_byte_bound_counts_the_crlf() -> None:
    line = b"PROXY UNKNOWN " + b"f" * 91  # 105 bytes
    assert header(line + b"\r\n", 1).length == 107
    assert parse(line, 1) == NeedMore(2)
    assert error(line + b"f", 1).reason == "no_crlf"  # 106 bytes: the CRLF would make 108
    assert parse(line + b"\r", 1) == NeedMore(1)


# --- v2 -------------------------------------------------------------------------


def test_v2_local_health_check_means_the_socket_addresses() -> None:
    data = b.v2(b.LOCAL, b.UNSPEC)
    h = header(data + PAYLOAD, 2)
    assert (h.version, h.command, h.family, h.source, h.length) == (
        2, Command.LOCAL, None, None, 16)
    info = h.resolve(("127.0.0.1", 4000), ("127.0.0.1", 80))
    assert info.source == ("127.0.0.1", 4000)
    assert info.command == Command.LOCAL and not info.from_header


def test_v2_local_discards_its_block_unread_whatever_the_family() -> None:
    for family, block in ((b.TCP4, b.inet("1.2.3.4", "5.6.7.8", 1, 2)),
                          (b.UDP6, b.inet("::1", "::2", 1, 2)),
                          (b.UNIX_DGRAM, b.unix(b"/a", b"/b")),
                          (b.TCP4, b.tlv(0x01, b"h2")),  # TLVs where the addresses would be
                          (b.UNSPEC, b"\x01\x00\x09 not TLVs"),
                          (b.UNSPEC, b.tlv(0x03, b"\x00\x00\x00\x00"))):  # fmt: skip
        data = b.v2(b.LOCAL, family, block)
        h = header(data + PAYLOAD, 2)
        assert (h.command, h.source, h.length, h.tlvs) == (
            Command.LOCAL, None, len(data), Tlvs())
        assert parse(data[:-1], 2) == NeedMore(1)
        assert header(b.v2(b.LOCAL, family), 2).length == 16


def test_v2_tcp4() -> None:
    data = b.v2_inet("192.168.0.1", "192.168.0.11", 56324, 443)
    h = header(data + PAYLOAD, 2)
    assert (h.command, h.family, h.length) == (Command.PROXY, socket.AF_INET, 28)
    assert h.source == ("192.168.0.1", 56324)
    assert h.destination == ("192.168.0.11", 443)
    info = h.resolve(("10.0.0.1", 1), ("10.0.0.2", 2))
    assert info.source == ("192.168.0.1", 56324) and info.from_header


def test_v2_tcp6() -> None:
    h = header(b.v2_inet("2001:db8::1", "::ffff:10.0.0.1", 0, 65535) + PAYLOAD, 2)
    assert (h.family, h.length) == (socket.AF_INET6, 52)
    assert h.source == ("2001:db8::1", 0, 0, 0)
    assert h.destination == ("::ffff:10.0.0.1", 65535, 0, 0)


def test_v2_unix_stream_paths_abstract_and_unnamed() -> None:
    h = header(b.v2(b.PROXY, b.UNIX_STREAM, b.unix(b"/run/client.sock", b"/run/lb.sock")), 2)
    assert (h.family, h.length) == (socket.AF_UNIX, 232)
    assert (h.source, h.destination) == ("/run/client.sock", "/run/lb.sock")
    h = header(b.v2(b.PROXY, b.UNIX_STREAM, b.unix(b"", b"\x00abstract")), 2)
    assert (h.source, h.destination) == ("", b"\x00abstract")
    long_path = b"/" + b"x" * 106  # 107 bytes and its NUL: the most sun_path holds
    assert header(b.v2(b.PROXY, b.UNIX_STREAM, b.unix(long_path, b"/d")), 2).source == (
        long_path.decode())
    assert header(b.v2(b.PROXY, b.UNIX_STREAM, b.unix(b"/\xff", b"/d")), 2).source == "/\udcff"


def test_v2_proxy_unspec_means_the_socket_addresses() -> None:
    h = header(b.v2(b.PROXY, b.UNSPEC, b"", b.tlv(0x02, b"example.com")), 2)
    assert (h.command, h.family, h.source) == (Command.PROXY, None, None)
    assert h.tlvs.authority == "example.com"


def test_v2_every_tlv_the_spec_defines() -> None:
    cert = bytes(range(256)) * 2
    tlvs = b"".join([
        b.tlv(0x01, b"h2"),
        b.tlv(0x02, "bücher.example".encode()),
        b.tlv(0x04, b"\x00" * 7),  # NOOP: dropped
        b.tlv(0x05, b"\x01" * 128),
        b.ssl_tlv(0x07, 0, [(0x21, b"TLSv1.3"), (0x22, "Jürgen".encode()),
                            (0x23, b"TLS_AES_128_GCM_SHA256"), (0x24, b"RSA-SHA256"),
                            (0x25, b"RSA2048"), (0x26, b"X25519"),
                            (0x27, b"rsa_pss_rsae_sha256"), (0x28, cert),
                            (0x2F, b"an SSL sub-type from the future")]),
        b.tlv(0x30, b"blue"),
        b.tlv(0xE0, b"custom"),
        b.tlv(0xEA, b""),
        b.tlv(0xE0, b"again"),
    ])  # fmt: skip
    data = b.v2_inet("10.0.0.1", "10.0.0.2", 1, 2, tlvs, crc=True)
    h = header(data + PAYLOAD, 2)
    assert h.length == len(data)
    t = h.tlvs
    assert t.alpn == b"h2"
    assert t.authority == "bücher.example"
    assert t.crc32c == int.from_bytes(data[-4:], "big")
    assert t.unique_id == b"\x01" * 128
    assert t.netns == "blue"
    assert t.unknown == ((0xE0, b"custom"), (0xEA, b""), (0xE0, b"again"))
    assert t.ssl == SslInfo(client=7, verify=0, version="TLSv1.3", cn="Jürgen",
                            cipher="TLS_AES_128_GCM_SHA256", sig_alg="RSA-SHA256",
                            key_alg="RSA2048", group="X25519", sig_scheme="rsa_pss_rsae_sha256",
                            client_cert=cert)  # fmt: skip
    assert t.ssl.tls and t.ssl.cert_verified


def test_v2_ssl_flags() -> None:
    plain = header(b.v2_inet("1.1.1.1", "2.2.2.2", 1, 2, b.ssl_tlv(0, 0)), 2).tlvs.ssl
    assert plain == SslInfo(client=0, verify=0)  # what HAProxy sends for a plain connection
    assert not plain.tls and not plain.cert_verified
    failed = header(b.v2_inet("1.1.1.1", "2.2.2.2", 1, 2, b.ssl_tlv(5, 20)), 2).tlvs.ssl
    assert failed is not None and failed.tls and not failed.cert_verified
    assert failed.verify == 20


def test_v2_crc32c_is_verified_over_the_whole_header() -> None:
    data = b.v2_inet("10.0.0.1", "10.0.0.2", 1, 2, b.tlv(0x01, b"h2"), crc=True)
    assert header(data, 2).tlvs.crc32c is not None
    for at in range(len(data)):
        bad = bytearray(data)
        bad[at] ^= 0x01
        try:
            result = parse(bytes(bad), 2)
        except ProxyProtocolError:
            continue
        # A longer length field, or PROXY turned LOCAL, whose block is not read.
        assert isinstance(result, NeedMore) or result.command == Command.LOCAL, (at, result)
    bad = bytearray(data)
    bad[20] ^= 0x80  # an address byte: still a valid header, but not the one summed
    exc = error(bytes(bad), 2)
    assert exc.reason == "bad_checksum"
    assert "CRC32C TLV says 0x" in str(exc)


def test_v2_needs_the_fixed_part_then_exactly_the_rest() -> None:
    data = b.v2_inet("10.0.0.1", "10.0.0.2", 1, 2, b.tlv(0x01, b"h2"))
    assert parse(b"", 2) == NeedMore(16)
    assert parse(data[:5], 2) == NeedMore(11)
    assert parse(data[:16], 2) == NeedMore(len(data) - 16)
    assert parse(data[:-1], 2) == NeedMore(1)


def test_v2_length_is_bounded_by_the_caller_then_by_the_format() -> None:
    fixed = b.v2(b.PROXY, b.TCP4, length=DEFAULT_MAX_SIZE - 16)
    assert parse(fixed, 2) == NeedMore(DEFAULT_MAX_SIZE - 16)
    too_big = b.v2(b.PROXY, b.TCP4, length=DEFAULT_MAX_SIZE - 15)
    exc = error(too_big, 2)  # refused on the 16 fixed bytes, before any more is read
    assert exc.reason == "too_large"
    assert str(exc) == "v2 header: 16 + 4081 bytes exceed the limit of 4096"
    assert parse(too_big, 2, max_size=MAX_V2_SIZE) == NeedMore(DEFAULT_MAX_SIZE - 15)
    assert parse(b.v2(b.PROXY, b.TCP4, length=0xFFFF), 2, max_size=MAX_V2_SIZE) == NeedMore(
        0xFFFF)
    for wrong in (MIN_MAX_SIZE - 1, MAX_V2_SIZE + 1):
        with pytest.raises(ValueError, match="max_size must be between"):
            parse(fixed, 2, max_size=wrong)
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        parse(fixed, 3)  # type: ignore[arg-type]


V4 = b.inet("1.2.3.4", "5.6.7.8", 1, 2)


@pytest.mark.parametrize(("data", "reason", "words"), [
    (b"\r\n\r\n\x00\r\nQUIT\r", "bad_signature", "byte 11 of the 12-byte signature is 0x0d"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "bad_signature", "byte 0"),  # v1 on v2
    (b.SIG + b"\x11", "bad_version", "version 1"),
    (b.SIG + b"\x31", "bad_version", "version 3"),
    (b.SIG + b"\x22", "bad_command", "command 0x2"),
    (b.SIG + b"\x2f", "bad_command", "command 0xf"),
    (b.SIG + b"\x21\x13", "bad_family", "0x13"),
    (b.SIG + b"\x21\x41", "bad_family", "0x41"),
    (b.SIG + b"\x20\x10", "bad_family", "0x10"),
    (b.SIG + b"\x21\x12", "unsupported_family", "family 0x12 (UDP over IPv4) is not supported"),
    (b.SIG + b"\x21\x22", "unsupported_family", "0x22 (UDP over IPv6)"),
    (b.SIG + b"\x21\x32", "unsupported_family", "0x32 (UNIX datagram)"),
    (b.v2(b.PROXY, b.TCP4, V4[:10]), "truncated", "10 of 12 address bytes for TCP over IPv4"),
    (b.v2(b.PROXY, b.TCP6, V4), "truncated", "12 of 36 address bytes"),
    (b.v2(b.PROXY, b.UNIX_STREAM, b""), "truncated", "0 of 216"),
    (b.v2(b.LOCAL, b.TCP4, length=DEFAULT_MAX_SIZE), "too_large", "16 + 4096 bytes"),
    (b.SIG + b"\x20\x45", "bad_family", "0x45"),
    (b.v2(b.PROXY, b.TCP4, V4, b"\x01\x00"), "truncated", "2 byte(s) left at offset 28"),
    (b.v2(b.PROXY, b.TCP4, V4, b"\x01\x00\x03h2"), "truncated",
     "TLV 0x01 (ALPN) at offset 28 claims 3 bytes, 2 are left"),
    (b.v2(b.PROXY, b.TCP4, V4, b.tlv(0x20, b"\x01\x00\x00\x00\x00\x21\x00\x09TLSv1.3")),
     "truncated", "SSL sub-TLV 0x21 (version) at offset 5 of the SSL TLV claims 9 bytes"),
    (b.v2(b.PROXY, b.TCP4, V4, b.tlv(0x20, b"\x01\x00\x00\x00")), "bad_tlv",
     "SSL is 4 bytes, too few"),
    (b.v2(b.PROXY, b.TCP4, V4, b.tlv(0x03, b"\x00\x00\x00")), "bad_tlv", "CRC32C is 3 bytes"),
    (b.v2(b.PROXY, b.TCP4, V4, b.tlv(0x05, b"u" * 129)), "bad_tlv", "UNIQUE_ID is 129 bytes"),
    (b.v2(b.PROXY, b.TCP4, V4, b.tlv(0x02, b"a" * 256)), "bad_tlv", "AUTHORITY is 256 bytes"),
    (b.v2(b.PROXY, b.TCP4, V4, b.tlv(0x02, b"\xff")), "bad_tlv", "AUTHORITY is not utf-8"),
    (b.v2(b.PROXY, b.TCP4, V4, b.tlv(0x02, b"a\nb")), "bad_tlv", "control character"),
    (b.v2(b.PROXY, b.TCP4, V4, b.tlv(0x30, "ü".encode())), "bad_tlv", "NETNS is not ascii"),
    (b.v2(b.PROXY, b.TCP4, V4, b.ssl_tlv(1, 0, [(0x23, b"\x00")])), "bad_tlv",
     "SSL cipher holds a control character"),
    (b.v2(b.PROXY, b.TCP4, V4, b.tlv(0x01, b"a") + b.tlv(0x01, b"b")), "bad_tlv",
     "TLV 0x01 (ALPN) appears twice"),
    (b.v2(b.PROXY, b.TCP4, V4, b.ssl_tlv(1, 0, [(0x21, b"a"), (0x21, b"b")])), "bad_tlv",
     "SSL sub-TLV 0x21 (version) appears twice"),
    (b.v2(b.PROXY, b.TCP4, V4, b.tlv(0x03, b"\x00\x00\x00\x00")), "bad_checksum", "says 0x0000"),
    (b.v2(b.PROXY, b.UNIX_STREAM, b"/" * 108 + bytes(108)), "bad_address",
     "UNIX source path is not NUL-terminated within 108 bytes"),
])  # fmt: skip
def test_v2_errors_name_the_cause(data: bytes, reason: str, words: str) -> None:
    exc = error(data, 2)
    assert exc.reason == reason, exc
    assert str(exc).startswith("v2 header: ")
    assert words in str(exc), exc


def test_reasons_are_a_small_fixed_set() -> None:
    assert len(REASONS) == 16
    assert all(r.isidentifier() and r.islower() for r in REASONS)


def test_resolve_needs_the_socket_addresses_when_the_header_has_none() -> None:
    with pytest.raises(ValueError, match="no addresses"):
        header(b"PROXY UNKNOWN\r\n", 1).resolve(None, None)
