"""Certificates in PEM files, and the validity period inside each.

OpenSSL loads an expired server certificate without a word, so
``forkserver.tls`` checks validity itself before any fork.  The ssl
module has no public way to read a certificate's dates (only the
private ``ssl._ssl._test_decode_cert``), and ``cryptography`` would be
a large new runtime dependency for two fields, so this module reads
them: RFC 5280's ``Certificate → TBSCertificate → Validity``, with a
DER reader that checks every length against the bytes it has and
raises ``ValueError`` on anything it does not expect.

Pure: bytes in, values out, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from typing import Final

__all__ = ["certificate_validity", "has_encrypted_private_key", "has_private_key",
           "pem_certificates"]

_PEM_CERT_RE: Final = re.compile(
    rb"-----BEGIN (?P<label>(?:X509 |TRUSTED )?CERTIFICATE)-----"
    rb"(?P<body>[A-Za-z0-9+/=\s]*?)"
    rb"-----END (?P=label)-----"
)
_PEM_ANY_KEY_RE: Final = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
_PEM_ENCRYPTED_RE: Final = re.compile(
    rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: *4, *ENCRYPTED"
)


def pem_certificates(data: bytes) -> list[bytes]:
    """The DER bytes of each certificate in PEM text, in file order.

    Text outside the ``-----BEGIN CERTIFICATE-----`` blocks (keys,
    comments) is ignored; a block whose base64 is broken raises
    ``ValueError``.
    """
    result = []
    for number, match in enumerate(_PEM_CERT_RE.finditer(data), 1):
        body = b"".join(match.group("body").split())
        try:
            result.append(base64.b64decode(body, validate=True))
        except binascii.Error:
            raise ValueError(f"certificate {number}: its base64 text is broken") from None
    return result


def has_private_key(data: bytes) -> bool:
    """True if PEM text holds a private key block (PKCS#8, RSA, EC, encrypted or not)."""
    return _PEM_ANY_KEY_RE.search(data) is not None


def has_encrypted_private_key(data: bytes) -> bool:
    """True if PEM text holds a password-protected key (PKCS#8 or legacy ``Proc-Type``)."""
    return _PEM_ENCRYPTED_RE.search(data) is not None


class _Der:
    """Just enough of a DER reader for a certificate's validity field."""

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = start
        self.end = len(data) if end is None else end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def peek_tag(self) -> int:
        if self.pos >= self.end:
            raise ValueError("the certificate ends early")
        return self.data[self.pos]

    def read(self, expect: int | tuple[int, ...] | None = None) -> tuple[int, int, int]:
        """The next element: (tag, start of its contents, end of its contents)."""
        tag = self.peek_tag()
        if expect is not None and tag not in ((expect,) if isinstance(expect, int) else expect):
            raise ValueError(f"unexpected DER tag 0x{tag:02x} at byte {self.pos}")
        if tag & 0x1F == 0x1F:
            raise ValueError("multi-byte DER tags do not occur in a certificate header")
        pos = self.pos + 1
        if pos >= self.end:
            raise ValueError("the certificate ends early")
        first = self.data[pos]
        pos += 1
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > 4:  # 0: BER's indefinite length, not DER
                raise ValueError(f"bad DER length at byte {pos - 1}")
            if pos + count > self.end:
                raise ValueError("the certificate ends early")
            length = int.from_bytes(self.data[pos : pos + count], "big")
            pos += count
        if pos + length > self.end:
            raise ValueError("the certificate ends early")
        self.pos = pos + length
        return tag, pos, pos + length


_SEQUENCE: Final = 0x30
_INTEGER: Final = 0x02
_VERSION: Final = 0xA0  # [0] EXPLICIT
_UTC_TIME: Final = 0x17
_GENERALIZED_TIME: Final = 0x18


def certificate_validity(der: bytes) -> tuple[datetime.datetime, datetime.datetime]:
    """``(not_before, not_after)`` of a DER certificate, as aware UTC datetimes.

    Reads RFC 5280's ``Certificate → TBSCertificate → Validity``:
    version, serial, signature algorithm and issuer are skipped, and the
    two times are ``UTCTime`` (``YYMMDDHHMMSSZ``, years 1950-2049) or
    ``GeneralizedTime`` (``YYYYMMDDHHMMSSZ``).  Anything else raises
    ``ValueError`` naming what was wrong.  Bytes after the certificate
    (the trust settings of a ``TRUSTED CERTIFICATE``) are ignored.
    """
    outer = _Der(der)
    _, start, end = outer.read(_SEQUENCE)
    tbs_reader = _Der(der, start, end)
    _, start, end = tbs_reader.read(_SEQUENCE)
    tbs = _Der(der, start, end)
    if tbs.peek_tag() == _VERSION:
        tbs.read(_VERSION)
    tbs.read(_INTEGER)  # serialNumber
    tbs.read(_SEQUENCE)  # signature AlgorithmIdentifier
    tbs.read(_SEQUENCE)  # issuer Name
    _, start, end = tbs.read(_SEQUENCE)  # validity
    validity = _Der(der, start, end)
    times = []
    for _ in range(2):
        tag, start, end = validity.read((_UTC_TIME, _GENERALIZED_TIME))
        times.append(_der_time(tag, der[start:end]))
    if not validity.at_end():
        raise ValueError("the validity field holds more than two times")
    return times[0], times[1]


def _der_time(tag: int, raw: bytes) -> datetime.datetime:
    text = raw.decode("ascii", "replace")
    digits = 12 if tag == _UTC_TIME else 14
    if len(text) != digits + 1 or not text.endswith("Z") or not text[:-1].isdigit():
        kind = "UTCTime" if tag == _UTC_TIME else "GeneralizedTime"
        raise ValueError(f"malformed {kind} {text!r}")
    if tag == _UTC_TIME:
        year = int(text[:2])
        year += 1900 if year >= 50 else 2000  # RFC 5280, 4.1.2.5.1
        rest = text[2:-1]
    else:
        year = int(text[:4])
        rest = text[4:-1]
    month, day, hour, minute, second = (int(rest[i : i + 2]) for i in range(0, 10, 2))
    try:
        return datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.UTC)
    except ValueError:
        raise ValueError(f"impossible date {text!r}") from None
