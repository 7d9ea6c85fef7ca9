"""Property tests of the PROXY header parser.

* Arbitrary bytes give a header, ``NeedMore`` or ``ProxyProtocolError``
  (with a reason from ``REASONS``), and nothing else, ever.
* A valid header parses to what was encoded, whatever follows it.
* Every truncation of a valid header is ``NeedMore``, asking for no
  byte beyond the header.
* Every single-byte change of a valid header is refused, or gives the
  header the changed bytes describe (checked field by field against
  the standard library's own parsers, not against the module).
* Inputs longer than the bounds are refused within them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from forkserver.proxyproto import (
    DEFAULT_MAX_SIZE,
    MAX_V2_SIZE,
    MIN_MAX_SIZE,
    REASONS,
    V1_MAX_LENGTH,
    Command,
    NeedMore,
    ProxyHeader,
    ProxyProtocolError,
    SslInfo,
    Tlvs,
    parse,
)
from tests import proxyproto_build as b

FUZZ = settings(max_examples=200, deadline=None)


def outcome(data: bytes, version: int, max_size: int = DEFAULT_MAX_SIZE,
            ) -> ProxyHeader | NeedMore | ProxyProtocolError:  # fmt: skip
    try:
        return parse(data, version, max_size=max_size)  # type: ignore[arg-type]
    except ProxyProtocolError as exc:
        assert exc.reason in REASONS, exc
        assert str(exc).startswith(f"v{version} header: "), exc
        return exc


# --- strategies ---------------------------------------------------------------

ipv4 = st.integers(0, 2**32 - 1).map(
    lambda n: socket.inet_ntop(socket.AF_INET, n.to_bytes(4, "big")))
ipv6_int = st.one_of(st.integers(0, 2**128 - 1), st.integers(0, 2**16),
                     st.integers(0, 2**32 - 1).map(lambda n: 0xFFFF << 32 | n))  # fmt: skip
ports = st.integers(0, 65535)


@st.composite
def ipv6_text(draw: st.DrawFn) -> str:
    """Any spelling a sender may use: compressed, full, mixed case, dotted tail."""
    value = draw(ipv6_int)
    address = ipaddress.IPv6Address(value)
    style = draw(st.sampled_from(["compressed", "exploded", "short", "upper", "dotted"]))
    if style == "exploded":
        return address.exploded
    if style == "short":
        return ":".join(f"{(value >> s) & 0xFFFF:x}" for s in range(112, -1, -16))
    if style == "upper":
        return address.compressed.upper()
    if style == "dotted" and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return socket.inet_ntop(socket.AF_INET6, address.packed)


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    protocol = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if protocol == "UNKNOWN":
        tail = draw(st.one_of(st.just(b""), st.binary(max_size=90).map(
            lambda t: b" " + t.replace(b"\r\n", b"\r."))))  # fmt: skip
        line = b"PROXY UNKNOWN" + tail + b"\r\n"
        return line, ProxyHeader(1, Command.PROXY, None, None, None, len(line))
    text = ipv4 if protocol == "TCP4" else ipv6_text()
    src, dst, sport, dport = draw(text), draw(text), draw(ports), draw(ports)
    line = b.v1(protocol, src, dst, sport, dport)
    if protocol == "TCP4":
        return line, ProxyHeader(1, Command.PROXY, socket.AF_INET, (src, sport), (dst, dport),
                                 len(line))  # fmt: skip

    def shown(text: str) -> str:
        return socket.inet_ntop(socket.AF_INET6, ipaddress.IPv6Address(text).packed)

    return line, ProxyHeader(1, Command.PROXY, socket.AF_INET6, (shown(src), sport, 0, 0),
                             (shown(dst), dport, 0, 0), len(line))  # fmt: skip


# Text TLVs: short names without control characters.
names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40)
utf8_names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40).filter(
    lambda t: 0 < len(t.encode()) <= 255)
SSL_FIELDS = {0x21: "version", 0x22: "cn", 0x23: "cipher", 0x24: "sig_alg", 0x25: "key_alg",
              0x26: "group", 0x27: "sig_scheme", 0x28: "client_cert"}  # fmt: skip


@dataclass
class V2Case:
    data: bytes
    expected: ProxyHeader
    address_length: int
    noop_ranges: list[range]  # where a NOOP TLV lies (its type, length and value)


@st.composite
def ssl_tlvs(draw: st.DrawFn) -> tuple[bytes, SslInfo]:
    client, verify = draw(st.integers(0, 255)), draw(st.integers(0, 2**32 - 1))
    kinds = draw(st.lists(st.sampled_from(sorted(SSL_FIELDS)), unique=True, max_size=4))
    subs, fields = [], {}
    for kind in kinds:
        if kind == 0x28:
            value: str | bytes = draw(st.binary(max_size=60))
            raw = value
        else:
            value = draw(utf8_names if kind == 0x22 else names)
            raw = value.encode()
        subs.append((kind, raw))
        fields[SSL_FIELDS[kind]] = value
    return b.ssl_tlv(client, verify, subs), SslInfo(client, verify, **fields)  # type: ignore[arg-type]


@st.composite
def v2_headers(draw: st.DrawFn) -> V2Case:
    command = draw(st.sampled_from([b.LOCAL, b.PROXY]))
    supported = [b.UNSPEC, b.TCP4, b.TCP6, b.UNIX_STREAM]
    family = draw(st.sampled_from(supported if command == b.PROXY else
                                  [*supported, b.UDP4, b.UDP6, b.UNIX_DGRAM]))  # fmt: skip
    src: object = None
    dst: object = None
    af = None
    if family in (b.TCP4, b.UDP4):
        s, d, sp, dp = draw(ipv4), draw(ipv4), draw(ports), draw(ports)
        addresses = b.inet(s, d, sp, dp)
        af, src, dst = socket.AF_INET, (s, sp), (d, dp)
    elif family in (b.TCP6, b.UDP6):
        s6, d6 = draw(ipv6_int), draw(ipv6_int)
        sp, dp = draw(ports), draw(ports)
        s, d = (socket.inet_ntop(socket.AF_INET6, v.to_bytes(16, "big")) for v in (s6, d6))
        addresses = b.inet(s, d, sp, dp)
        af, src, dst = socket.AF_INET6, (s, sp, 0, 0), (d, dp, 0, 0)
    elif family in (b.UNIX_STREAM, b.UNIX_DGRAM):
        paths = st.binary(max_size=106).map(lambda p: b"/" + p.replace(b"\x00", b""))
        sp_, dp_ = draw(paths), draw(paths)
        addresses = b.unix(sp_, dp_)
        af = socket.AF_UNIX
        src, dst = (p.decode("utf-8", "surrogateescape") for p in (sp_, dp_))
    else:
        addresses = b""
    if command == b.LOCAL and draw(st.booleans()):
        addresses = b""  # a LOCAL header need not carry the addresses of its family
    if command == b.LOCAL or family == b.UNSPEC:
        af, src, dst = None, None, None

    tlvs = b""
    fields: dict[str, object] = {}
    unknown: list[tuple[int, bytes]] = []
    noops: list[range] = []
    offset = 16 + len(addresses)
    kinds = draw(st.lists(st.sampled_from(["alpn", "authority", "unique_id", "ssl", "netns",
                                           "noop", "unknown"]), max_size=5))  # fmt: skip
    for kind in kinds:
        if kind in fields:
            continue
        if kind == "alpn":
            value = draw(st.binary(max_size=20))
            raw, fields[kind] = b.tlv(0x01, value), value
        elif kind == "authority":
            text = draw(utf8_names)
            raw, fields[kind] = b.tlv(0x02, text.encode()), text
        elif kind == "unique_id":
            value = draw(st.binary(max_size=128))
            raw, fields[kind] = b.tlv(0x05, value), value
        elif kind == "ssl":
            raw, fields[kind] = draw(ssl_tlvs())
        elif kind == "netns":
            text = draw(names)
            raw, fields[kind] = b.tlv(0x30, text.encode()), text
        elif kind == "noop":
            raw = b.tlv(0x04, draw(st.binary(max_size=8)))
            noops.append(range(offset, offset + len(raw)))
        else:
            code = draw(st.sampled_from([0x06, 0x1F, 0x31, 0xE0, 0xEF, 0xF0, 0xFF]))
            value = draw(st.binary(max_size=12))
            raw = b.tlv(code, value)
            unknown.append((code, value))
        tlvs += raw
        offset += len(raw)
    crc = draw(st.booleans())
    data = b.v2(command, family, addresses, tlvs, crc=crc)
    if crc:
        fields["crc32c"] = int.from_bytes(data[-4:], "big")
    tlvs_seen = Tlvs(unknown=tuple(unknown), **fields)  # type: ignore[arg-type]
    expected = ProxyHeader(2, Command(command & 0x0F), af, src, dst, len(data),  # type: ignore[arg-type]
                           Tlvs() if command == b.LOCAL else tlvs_seen)  # fmt: skip
    return V2Case(data, expected, len(addresses), noops)


# --- arbitrary bytes ------------------------------------------------------------

prefixed = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=120).map(lambda t: b"PROXY " + t),
    st.tuples(st.sampled_from([b"TCP4 ", b"TCP6 ", b"UNKNOWN"]), st.binary(max_size=110)).map(
        lambda p: b"PROXY " + p[0] + p[1]),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300)).map(
        lambda p: b.SIG + bytes(p[:2]) + p[2]),
    st.tuples(st.sampled_from([0x20, 0x21]), st.sampled_from([0x00, 0x11, 0x21, 0x31]),
              st.binary(max_size=300)).map(
        lambda p: b.SIG + bytes(p[:2]) + len(p[2]).to_bytes(2, "big") + p[2]),
)  # fmt: skip


@FUZZ
@given(prefixed, st.sampled_from([1, 2]), st.integers(MIN_MAX_SIZE, MAX_V2_SIZE))
def test_arbitrary_bytes_give_a_header_more_or_the_module_error(data: bytes, version: int,
                                                               max_size: int) -> None:  # fmt: skip
    result = outcome(data, version, max_size)
    limit = V1_MAX_LENGTH if version == 1 else max_size
    if isinstance(result, ProxyHeader):
        assert result.length <= min(len(data), limit)
        assert parse(data[: result.length], version, max_size=max_size) == result  # type: ignore[arg-type]
    elif isinstance(result, NeedMore):
        assert result.n >= 1
        assert len(data) + result.n <= limit
    if version == 1 and len(data) >= V1_MAX_LENGTH and b"\r\n" not in data[:V1_MAX_LENGTH]:
        assert isinstance(result, ProxyProtocolError)


# --- valid headers, truncated ------------------------------------------------------


@FUZZ
@given(v1_headers(), st.binary(max_size=40))
def test_v1_valid_header_parses_to_what_was_encoded(case: tuple[bytes, ProxyHeader],
                                                    after: bytes) -> None:  # fmt: skip
    line, expected = case
    assert parse(line + after, 1) == expected


@FUZZ
@given(v2_headers(), st.binary(max_size=40))
def test_v2_valid_header_parses_to_what_was_encoded(case: V2Case, after: bytes) -> None:
    assert parse(case.data + after, 2) == case.expected


@FUZZ
@given(v1_headers())
def test_v1_every_truncation_needs_more_within_the_line(case: tuple[bytes, ProxyHeader]) -> None:
    line, _ = case
    for cut in range(len(line)):
        result = parse(line[:cut], 1)
        assert isinstance(result, NeedMore), (cut, result)
        assert cut + result.n <= len(line)


@FUZZ
@given(v2_headers())
def test_v2_every_truncation_needs_more_within_the_header(case: V2Case) -> None:
    for cut in range(len(case.data)):
        result = parse(case.data[:cut], 2)
        assert isinstance(result, NeedMore), (cut, result)
        assert cut + result.n <= len(case.data)
        if cut >= 16:
            assert cut + result.n == len(case.data)  # the length is known: exactly the rest


# --- single-byte mutations ------------------------------------------------------

MUTANT_BYTES = st.one_of(st.integers(0, 255), st.sampled_from(b"0123456789abcdefABCDEF.: \r\n"))


@FUZZ
@given(v1_headers(), st.data())
def test_v1_mutation_is_refused_or_read_as_the_new_line_says(
        case: tuple[bytes, ProxyHeader], data: st.DataObject) -> None:  # fmt: skip
    line, _ = case
    at = data.draw(st.integers(0, len(line) - 1))
    new = data.draw(MUTANT_BYTES.filter(lambda v: v != line[at]))
    mutant = line[:at] + bytes([new]) + line[at + 1 :]
    result = outcome(mutant, 1)
    end = mutant.find(b"\r\n")
    if isinstance(result, NeedMore):
        assert end < 0  # only a broken CRLF leaves the line unfinished
        return
    if isinstance(result, ProxyProtocolError):
        return
    assert result.length == end + 2
    fields = mutant[:end].split(b" ")
    assert fields[0] == b"PROXY"
    if fields[1] == b"UNKNOWN":
        assert (result.family, result.source, result.destination) == (None, None, None)
        return
    assert len(fields) == 6 and fields[1] in (b"TCP4", b"TCP6")
    assert result.source is not None and result.destination is not None
    for text, address in ((fields[2], result.source), (fields[3], result.destination)):
        assert isinstance(address, tuple)
        parsed = ipaddress.ip_address(text.decode())
        assert parsed.version == (4 if fields[1] == b"TCP4" else 6)
        assert parsed == ipaddress.ip_address(address[0])
        if parsed.version == 4:
            assert str(parsed) == text.decode()  # canonical: no leading zeros
    for text, address in ((fields[4], result.source), (fields[5], result.destination)):
        assert isinstance(address, tuple)
        assert str(int(text)) == text.decode() and int(text) == address[1] <= 65535


@FUZZ
@given(v2_headers(), st.data())
def test_v2_mutation_is_refused_or_read_as_the_new_bytes_say(
        case: V2Case, data: st.DataObject) -> None:  # fmt: skip
    original, expected = case.data, case.expected
    at = data.draw(st.integers(0, len(original) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda v: v != original[at]))
    mutant = original[:at] + bytes([new]) + original[at + 1 :]
    result = outcome(mutant, 2)
    address_end = 16 + case.address_length

    if at < 12:
        assert isinstance(result, ProxyProtocolError) and result.reason == "bad_signature"
        return
    if at in (14, 15):  # the length field
        total = 16 + int.from_bytes(mutant[14:16], "big")
        if isinstance(result, NeedMore):
            assert total > len(mutant) and result.n == total - len(mutant)
        elif isinstance(result, ProxyHeader):
            assert total < len(mutant) and result.length == total
            assert result.tlvs.crc32c is None  # the checksum covers the length
        else:
            assert total > DEFAULT_MAX_SIZE or total != len(mutant)
        return
    assert not isinstance(result, NeedMore)
    if isinstance(result, ProxyProtocolError):
        return
    assert result.length == expected.length
    if at == 12:
        assert result.command == Command(new & 0x0F) != expected.command and new >> 4 == 2
        if result.command == Command.LOCAL:  # its block is discarded
            assert result == dataclasses.replace(expected, command=Command.LOCAL, family=None,
                                                 source=None, destination=None, tlvs=Tlvs())
        return
    if expected.command == Command.LOCAL:  # nothing after byte 12 but the family matters
        assert result == expected
        return
    # A changed header never passes with a checksum (changing the CRC32C TLV's
    # type byte does make a valid header without one).
    assert result.tlvs.crc32c is None, "a change the checksum covers went through"
    if at == 13:
        families = {b.TCP4: socket.AF_INET, b.TCP6: socket.AF_INET6, b.UNIX_STREAM: socket.AF_UNIX}
        assert result.family == (families.get(new) if result.command == Command.PROXY else None)
    elif at < address_end:
        assert (result.command, result.family, result.tlvs) == (
            expected.command, expected.family, expected.tlvs)
        src, dst = decode_addresses(expected.family, mutant[16:address_end])
        assert result == dataclasses.replace(expected, source=src, destination=dst)
    else:  # a TLV
        assert (result.source, result.destination) == (expected.source, expected.destination)
        assert result.tlvs != expected.tlvs or any(at in r for r in case.noop_ranges)


def decode_addresses(family: object, block: bytes) -> tuple[object, object]:
    """The addresses a mutated block holds, decoded with the standard library."""
    if family == socket.AF_UNIX:
        return unix_path(block[:108]), unix_path(block[108:])
    size = 4 if family == socket.AF_INET else 16
    hosts = [str(ipaddress.ip_address(block[i : i + size])) for i in (0, size)]
    shown = [socket.inet_ntop(family, ipaddress.ip_address(h).packed) for h in hosts]  # type: ignore[arg-type]
    ports = [int.from_bytes(block[2 * size + i : 2 * size + i + 2], "big") for i in (0, 2)]
    if family == socket.AF_INET:
        return (shown[0], ports[0]), (shown[1], ports[1])
    return (shown[0], ports[0], 0, 0), (shown[1], ports[1], 0, 0)


def unix_path(raw: bytes) -> str | bytes:
    if raw.startswith(b"\x00"):  # abstract: the name without its NUL padding
        return raw.rstrip(b"\x00") or ""
    return raw.split(b"\x00")[0].decode("utf-8", "surrogateescape")


# --- over-long inputs -------------------------------------------------------------


@FUZZ
@given(st.sampled_from([b"PROXY UNKNOWN ", b"PROXY TCP4 1", b"PROXY TCP6 ::", b"PROXY "]),
       st.binary(min_size=V1_MAX_LENGTH, max_size=200).map(lambda t: t.replace(b"\r", b"_")))
def test_v1_over_long_line_is_refused_by_byte_107(prefix: bytes, filler: bytes) -> None:
    data = prefix + filler
    result = outcome(data, 1)
    assert isinstance(result, ProxyProtocolError)
    assert outcome(data[:V1_MAX_LENGTH], 1).__class__ is ProxyProtocolError


@FUZZ
@given(st.sampled_from([b.LOCAL, b.PROXY]), st.sampled_from([0x00, 0x11, 0x21, 0x31]),
       st.integers(0, 0xFFFF), st.integers(MIN_MAX_SIZE, MAX_V2_SIZE))
def test_v2_length_is_refused_on_the_fixed_part_when_over_the_bound(
        command: int, family: int, length: int, max_size: int) -> None:  # fmt: skip
    fixed = b.v2(command, family, length=length)
    result = outcome(fixed, 2, max_size)
    if 16 + length > max_size:
        assert isinstance(result, ProxyProtocolError) and result.reason == "too_large"
    elif command == b.LOCAL or length >= {0x00: 0, 0x11: 12, 0x21: 36, 0x31: 216}[family]:
        assert result == NeedMore(length) if length else isinstance(result, ProxyHeader)
    else:
        assert isinstance(result, ProxyProtocolError) and result.reason == "truncated"
