"""``forkserver.pem``: certificates in PEM text, and the validity dates in each.

The dates are checked against the ``cryptography`` package, which made
the certificates, across both time encodings RFC 5280 uses (UTCTime
through 2049, GeneralizedTime from 2050).  Broken input of every kind
raises ``ValueError`` and nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from forkserver import pem
from tests.tls_support import UTC, Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pem"))


@pytest.fixture(scope="module")
def leaf_der(pki: Pki) -> bytes:
    return pki.server().der


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [
        (datetime.datetime(1950, 1, 1, tzinfo=UTC), datetime.datetime(1999, 12, 31, 23, 59, 59,
                                                                      tzinfo=UTC)),
        (datetime.datetime(2000, 2, 29, 12, 0, 1, tzinfo=UTC),
         datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)),
        (datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),
         datetime.datetime(2050, 1, 1, tzinfo=UTC)),  # GeneralizedTime from 2050
        (datetime.datetime(2049, 6, 1, tzinfo=UTC), datetime.datetime(9999, 12, 31, 23, 59, 59,
                                                                      tzinfo=UTC)),
    ],
    ids=["utc-1900s", "utc-2000s", "generalized-2050", "no-well-defined-expiry"],
)
def test_validity_matches_what_cryptography_wrote(
    pki: Pki, not_before: datetime.datetime, not_after: datetime.datetime
) -> None:
    issued = pki.issue(f"dated-{not_before.year}-{not_after.year}", not_before=not_before,
                       not_after=not_after)
    assert issued.cert.not_valid_before_utc == not_before  # the fixture did what we meant
    assert pem.certificate_validity(issued.der) == (not_before, not_after)


def test_validity_of_a_v1_certificate_without_a_version_field(pki: Pki) -> None:
    # A v1 certificate has no [0] version element: the reader must not need it.
    key = pki.ca.key
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "v1")])
    start = datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    end = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(7).not_valid_before(start).not_valid_after(end)
    )
    cert = builder.sign(key, hashes.SHA256())
    # cryptography always writes v3: rebuild the DER without the [0] version.
    der = cert.public_bytes(serialization.Encoding.DER)
    tbs = cert.tbs_certificate_bytes
    tbs_content = tbs[_header_length(tbs) :]
    assert tbs_content.startswith(b"\xa0\x03\x02\x01\x02")  # [0] { INTEGER 2 }: v3
    after_tbs = der[_header_length(der) + len(tbs) :]  # signatureAlgorithm, signature
    v1 = _tlv(0x30, _tlv(0x30, tbs_content[5:]) + after_tbs)
    assert pem.certificate_validity(v1) == (start, end)


def _header_length(der: bytes) -> int:
    return 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def test_pem_certificates_finds_each_block_in_order_and_skips_the_rest(pki: Pki) -> None:
    a, b = pki.issue("pem-a"), pki.issue("pem-b")
    text = (
        b"a comment line\n"
        + a.cert.public_bytes(serialization.Encoding.PEM)
        + a.keyfile.read_bytes()
        + b"\n\n"
        + b.cert.public_bytes(serialization.Encoding.PEM).replace(b"\n", b"\r\n")
    )
    assert pem.pem_certificates(text) == [a.der, b.der]
    assert pem.has_private_key(text)
    assert not pem.has_private_key(a.certfile.read_bytes())
    assert pem.pem_certificates(b"no certificate here") == []


def test_a_trusted_certificate_block_counts_and_its_trailer_is_ignored(leaf_der: bytes) -> None:
    trailer = b"\x30\x03\x02\x01\x00"  # OpenSSL's trust settings follow the certificate
    body = base64.encodebytes(leaf_der + trailer)
    text = b"-----BEGIN TRUSTED CERTIFICATE-----\n" + body + b"-----END TRUSTED CERTIFICATE-----\n"
    [der] = pem.pem_certificates(text)
    assert pem.certificate_validity(der) == pem.certificate_validity(leaf_der)


def test_broken_base64_names_the_block(leaf_der: bytes) -> None:
    good = base64.encodebytes(leaf_der)
    text = (
        b"-----BEGIN CERTIFICATE-----\n" + good + b"-----END CERTIFICATE-----\n"
        b"-----BEGIN CERTIFICATE-----\nAAA=AAAA\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(ValueError, match="certificate 2: its base64 text is broken"):
        pem.pem_certificates(text)


def test_encrypted_keys_are_recognised(pki: Pki) -> None:
    encrypted = pki.issue("pem-enc", password=b"pw").keyfile.read_bytes()
    plain = pki.issue("pem-plain").keyfile.read_bytes()
    legacy = pki.ca.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"pw"),
    )
    assert pem.has_encrypted_private_key(encrypted)
    assert pem.has_private_key(encrypted)
    assert not pem.has_encrypted_private_key(plain)
    # OpenSSL's legacy format says so in a Proc-Type header.
    assert b"Proc-Type: 4,ENCRYPTED" in legacy
    assert pem.has_encrypted_private_key(legacy)
    assert pem.has_private_key(legacy)


@pytest.mark.parametrize(
    ("der", "message"),
    [
        (b"", "ends early"),
        (b"\x31\x00", "unexpected DER tag 0x31"),
        (b"\x30\x80\x00\x00", "bad DER length"),  # BER indefinite length
        (b"\x30\x85\x01\x02\x03\x04\x05", "bad DER length"),  # a 5-byte length
        (b"\x30\x05\x30\x03\x02\x01", "ends early"),
        (b"\x30\x02\x30\x00", "ends early"),
    ],
)
def test_malformed_der_raises_value_error(der: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pem.certificate_validity(der)


def _with_not_before(der: bytes, encoded: bytes) -> bytes:
    """*der* with its notBefore UTCTime replaced by *encoded* (13 characters)."""
    start = der.index(b"\x17\x0d")  # the first UTCTime of a certificate made now
    assert len(encoded) == 13
    return der[: start + 2] + encoded + der[start + 15 :]


@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        (b"240230120000Z", "impossible date"),  # February 30th
        (b"240101250000Z", "impossible date"),  # hour 25
        (b"2401011200000", "malformed UTCTime"),  # no Z
        (b"2401011200AAZ", "malformed UTCTime"),
    ],
)
def test_malformed_times_are_refused(leaf_der: bytes, encoded: bytes, message: str) -> None:
    assert pem.certificate_validity(_with_not_before(leaf_der, b"240101120000Z"))[0] == (
        datetime.datetime(2024, 1, 1, 12, tzinfo=UTC)
    )
    with pytest.raises(ValueError, match=message):
        pem.certificate_validity(_with_not_before(leaf_der, encoded))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_value_error(data: bytes) -> None:
    try:
        before, after = pem.certificate_validity(data)
    except ValueError:
        return
    assert before.tzinfo is UTC and after.tzinfo is UTC


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_certificates_raise_only_value_error(
    leaf_der: bytes, data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(leaf_der)))
    flip = data.draw(st.integers(0, len(leaf_der) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(leaf_der[:cut] if data.draw(st.booleans()) else leaf_der)
    if flip < len(damaged):
        damaged[flip] ^= 1 << bit
    with contextlib.suppress(ValueError):
        pem.certificate_validity(bytes(damaged))


def test_truncations_of_a_real_certificate_all_fail_cleanly(leaf_der: bytes) -> None:
    header_end = leaf_der.index(b"\x17\x0d") + 30  # the validity field is read by then
    for cut in range(header_end):
        with pytest.raises(ValueError):
            pem.certificate_validity(leaf_der[:cut])
