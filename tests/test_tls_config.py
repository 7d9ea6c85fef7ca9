"""``forkserver.tls``: TLS listener settings and ``build_context``.

Every bad file a person can give is tried for real, and the error must
name the setting, the file and the reason in plain words.  Files that
root could read anyway are made unreadable by running ``build_context``
as ``nobody`` in a forked child.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkserver.tls import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    SniSelector,
    TlsCertificate,
    TlsConfig,
    TlsConfigError,
    build_context,
)
from tests.tls_support import (
    DAY,
    NOW,
    TIMEOUT,
    Issued,
    Pki,
    as_nobody,
    client_context,
    tls_connect,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("tlsconfig"))


@pytest.fixture(scope="module")
def leaf(pki: Pki) -> Issued:
    return pki.server()


def config(leaf: Issued, **kwargs: object) -> TlsConfig:
    return TlsConfig(tls_certfile=str(leaf.certfile), tls_keyfile=str(leaf.keyfile), **kwargs)  # type: ignore[arg-type]


def refused(cfg: TlsConfig) -> str:
    with pytest.raises(TlsConfigError) as info:
        build_context(cfg)
    return str(info.value)


# -- the settings alone -------------------------------------------------------


def test_defaults() -> None:
    cfg = TlsConfig(tls_certfile="/etc/cert.pem")
    assert cfg.tls_keyfile is None
    assert cfg.tls_client_auth == "none"
    assert cfg.tls_min_version == "TLSv1.2"
    assert cfg.tls_ciphers is None
    assert cfg.tls_alpn == ()
    assert cfg.tls_handshake_timeout == DEFAULT_HANDSHAKE_TIMEOUT == 5.0
    assert cfg.tls_certificates == ()
    assert cfg.verify_mode() is ssl.CERT_NONE
    assert cfg.minimum_version() is ssl.TLSVersion.TLSv1_2


def test_settings_are_frozen_and_comparable() -> None:
    a = TlsConfig(tls_certfile="/c", tls_alpn=["h2"])  # type: ignore[arg-type]
    b = TlsConfig(tls_certfile="/c", tls_alpn=("h2",))
    assert a == b and hash(a) == hash(b)  # a reload can tell whether anything changed
    with pytest.raises(AttributeError):
        a.tls_certfile = "/other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tls_certfile": ""}, "tls_certfile: must be a non-empty file path"),
        ({"tls_certfile": 3}, "tls_certfile: must be a file path, not int"),
        ({"tls_keyfile": "a\0b"}, "tls_keyfile: must be a non-empty file path without NUL"),
        ({"tls_client_auth": "yes"}, "tls_client_auth: 'yes' is not one of none, optional"),
        ({"tls_client_auth": ["required"]}, "tls_client_auth: ['required'] is not one of none"),
        ({"tls_min_version": 1.2}, "tls_min_version: 1.2 is not one of TLSv1.2, TLSv1.3"),
        ({"tls_client_auth": "required"}, "tls_client_auth: 'required' needs tls_cafile"),
        ({"tls_cafile": "/ca.pem"}, "tls_cafile: is set but tls_client_auth is 'none'"),
        ({"tls_min_version": "TLSv1.1"}, "tls_min_version: 'TLSv1.1' is not one of TLSv1.2, "
                                         "TLSv1.3 (TLS 1.0 and 1.1 are not offered)"),
        ({"tls_ciphers": ""}, "tls_ciphers: must be a non-empty ASCII"),
        ({"tls_ciphers": "HIGH\n"}, "tls_ciphers: contains control characters"),
        ({"tls_alpn": "h2"}, "tls_alpn: must be a list of protocol names"),
        ({"tls_alpn": ["h2", "h2"]}, "tls_alpn: names a protocol twice"),
        ({"tls_alpn": [""]}, "tls_alpn: '': a protocol name is 1 to 255 bytes"),
        ({"tls_alpn": ["x" * 256]}, f"tls_alpn: {'x' * 256!r}: a protocol name is 1 to 255"),
        ({"tls_alpn": ["h\u00e9"]}, "tls_alpn: 'h\u00e9' is not a printable ASCII string"),
        ({"tls_alpn": [f"p{i}" for i in range(33)]}, "tls_alpn: at most 32 protocols"),
        ({"tls_handshake_timeout": 0}, "tls_handshake_timeout: 0 is not in (0, 3600] seconds"),
        ({"tls_handshake_timeout": float("nan")}, "tls_handshake_timeout: nan is not in"),
        ({"tls_handshake_timeout": True}, "tls_handshake_timeout: must be a number of seconds, "
                                          "not bool"),
        ({"tls_certificates": "x"}, "tls_certificates: must be a list"),
        ({"tls_certificates": [{"certfile": "/x"}]}, "tls_certificates[0]: must be a "
                                                     "TlsCertificate, not dict"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict[str, object], message: str) -> None:
    values: dict[str, object] = {"tls_certfile": "/etc/cert.pem", **kwargs}
    with pytest.raises(TlsConfigError) as info:
        TlsConfig(**values)  # type: ignore[arg-type]
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.key == message.split(":", 1)[0]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "must name at least one host"),
        ("example.com", "must be a list of host names"),
        (["*.com.*"], "is not a host name"),
        (["a.*.example.com"], "is not a host name (a wildcard is only '*.' in front)"),
        (["*"], "is not a host name or a *.domain wildcard"),
        (["-bad.example"], "is not a host name"),
        (["b\u00fccher.example"], "write an international name as its xn-- A-label"),
        (["x" * 64 + ".example"], "is not a host name"),
    ],
)
def test_bad_server_names(names: object, message: str) -> None:
    with pytest.raises(TlsConfigError, match=message.replace("*", r"\*").replace("(", r"\(")
                       .replace(")", r"\)")) as info:
        TlsCertificate(server_names=names, certfile="/c")  # type: ignore[arg-type]
    assert info.value.key == "server_names"


def test_server_names_are_normalised() -> None:
    entry = TlsCertificate(server_names=["WWW.Example.COM.", "*.Example.com"], certfile="/c")  # type: ignore[arg-type]
    assert entry.server_names == ("www.example.com", "*.example.com")


def test_a_server_name_served_twice_is_refused() -> None:
    a = TlsCertificate(server_names=("a.example",), certfile="/a")
    b = TlsCertificate(server_names=("b.example", "A.example"), certfile="/b")
    with pytest.raises(TlsConfigError) as info:
        TlsConfig(tls_certfile="/c", tls_certificates=(a, b))
    assert str(info.value) == (
        "tls_certificates[1].server_names: 'a.example' is already served by tls_certificates[0]"
    )


def test_from_mapping_reads_a_toml_table() -> None:
    cfg = TlsConfig.from_mapping({
        "tls_certfile": "/c.pem",
        "tls_client_auth": "optional",
        "tls_cafile": "/ca.pem",
        "tls_alpn": ["h2", "http/1.1"],
        "tls_certificates": [
            {"server_names": ["api.example"], "certfile": "/api.pem", "keyfile": "/api.key"},
        ],
    })
    assert cfg.tls_alpn == ("h2", "http/1.1")
    assert cfg.tls_certificates == (
        TlsCertificate(server_names=("api.example",), certfile="/api.pem", keyfile="/api.key"),
    )
    assert cfg.verify_mode() is ssl.CERT_OPTIONAL


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "tls_certfile: is required for a TLS listener"),
        ({"tls_certfile": "/c", "tls_cerfile": "/d"}, "tls: unknown setting 'tls_cerfile'"),
        ({"tls_certfile": "/c", "tls_certificates": {"a": 1}}, "tls_certificates: must be a list"),
        ({"tls_certfile": "/c", "tls_certificates": [3]}, "tls_certificates[0]: must be a table"),
        ({"tls_certfile": "/c", "tls_certificates": [{"certfile": "/x"}]},
         "tls_certificates[0]: needs server_names and certfile"),
        ({"tls_certfile": "/c", "tls_certificates": [{"server_names": ["*x"], "certfile": "/x"}]},
         "tls_certificates[0].server_names: '*x' is not a host name"),
        ({"tls_certfile": "/c", "tls_certificates": [
            {"server_names": ["a.example"], "certfile": "/x", "key": "/k"}]},
         "tls_certificates[0]: unknown setting 'key'"),
    ],
)
def test_from_mapping_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(TlsConfigError) as info:
        TlsConfig.from_mapping(data)
    assert str(info.value).startswith(message), str(info.value)


# -- build_context: what it builds ------------------------------------------------


def test_the_context_is_a_secure_server_context(leaf: Issued) -> None:
    ctx = build_context(config(leaf, tls_alpn=("h2",)))
    assert ctx.protocol is ssl.PROTOCOL_TLS_SERVER
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode is ssl.CERT_NONE
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert isinstance(ctx.sni_callback, SniSelector)
    assert ctx.get_ca_certs() == []


def test_the_key_may_be_in_the_certfile(pki: Pki, tmp_path: Path, leaf: Issued) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(leaf.certfile.read_bytes() + leaf.keyfile.read_bytes())
    build_context(TlsConfig(tls_certfile=str(both)))


def test_an_encrypted_key_with_its_password_file(pki: Pki, tmp_path: Path) -> None:
    enc = pki.issue("enc-ok", sans=("localhost",), password=b"s3cret")
    password = tmp_path / "pw"
    password.write_bytes(b"s3cret\n")  # the newline is the file's
    build_context(config(enc, tls_password_file=str(password)))


def test_client_auth_loads_the_ca(pki: Pki, leaf: Issued) -> None:
    ctx = build_context(config(leaf, tls_client_auth="required", tls_cafile=str(pki.ca.certfile)))
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "Test CA"),),)]


def test_a_ca_bundle_may_hold_expired_roots(pki: Pki, leaf: Issued, tmp_path: Path) -> None:
    old = pki.issue("old root", issuer=None, ca=True, not_before=NOW - 20 * DAY,
                    not_after=NOW - 10 * DAY)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(old.certfile.read_bytes() + pki.ca.certfile.read_bytes())
    build_context(config(leaf, tls_client_auth="optional", tls_cafile=str(bundle)))


def test_ciphers_and_min_version_are_applied(leaf: Issued) -> None:
    ctx = build_context(config(leaf, tls_ciphers="ECDHE-ECDSA-AES128-GCM-SHA256",
                               tls_min_version="TLSv1.3"))
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
    tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 == ["ECDHE-ECDSA-AES128-GCM-SHA256"]


# -- build_context: each bad file, and its message --------------------------------


def test_missing_certfile(leaf: Issued, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    cfg = TlsConfig(tls_certfile=str(missing), tls_keyfile=str(leaf.keyfile))
    assert refused(cfg) == f"tls_certfile: {missing}: the file does not exist"


def test_missing_keyfile(leaf: Issued, tmp_path: Path) -> None:
    cfg = TlsConfig(tls_certfile=str(leaf.certfile), tls_keyfile=str(tmp_path / "k"))
    assert refused(cfg) == f"tls_keyfile: {tmp_path / 'k'}: the file does not exist"


def test_a_directory_instead_of_a_file(leaf: Issued, tmp_path: Path) -> None:
    cfg = TlsConfig(tls_certfile=str(tmp_path), tls_keyfile=str(leaf.keyfile))
    assert refused(cfg) == f"tls_certfile: {tmp_path}: is a directory"


def test_a_fifo_is_refused_without_blocking(leaf: Issued, tmp_path: Path) -> None:
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    cfg = TlsConfig(tls_certfile=str(leaf.certfile), tls_keyfile=str(fifo))
    assert refused(cfg) == f"tls_keyfile: {fifo}: is not a regular file"


def test_an_oversized_file_is_refused_unread(leaf: Issued, tmp_path: Path) -> None:
    big = tmp_path / "big.pem"
    with big.open("wb") as f:
        f.truncate((1 << 20) + 1)
    cfg = TlsConfig(tls_certfile=str(big), tls_keyfile=str(leaf.keyfile))
    assert refused(cfg) == f"tls_certfile: {big}: is {(1 << 20) + 1} bytes, more than {1 << 20}"


def test_an_empty_certfile(leaf: Issued, tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    cfg = TlsConfig(tls_certfile=str(empty), tls_keyfile=str(leaf.keyfile))
    assert refused(cfg) == (
        f"tls_certfile: {empty}: holds no PEM certificate (a line -----BEGIN CERTIFICATE-----)"
    )


def test_a_key_given_as_the_certfile(leaf: Issued) -> None:
    cfg = TlsConfig(tls_certfile=str(leaf.keyfile), tls_keyfile=str(leaf.keyfile))
    assert "holds no PEM certificate" in refused(cfg)


def test_a_damaged_certificate(leaf: Issued, tmp_path: Path) -> None:
    text = leaf.certfile.read_bytes()
    lines = text.splitlines(keepends=True)
    damaged = tmp_path / "damaged.pem"
    damaged.write_bytes(lines[0] + lines[1][:12] + b"\n" + lines[-1])  # valid base64, cut DER
    cfg = TlsConfig(tls_certfile=str(damaged), tls_keyfile=str(leaf.keyfile))
    assert refused(cfg) == (
        f"tls_certfile: {damaged}: the certificate is malformed: the certificate ends early"
    )


def test_no_key_where_the_key_should_be(leaf: Issued) -> None:
    cfg = TlsConfig(tls_certfile=str(leaf.certfile), tls_keyfile=str(leaf.certfile))
    assert refused(cfg) == (
        f"tls_keyfile: {leaf.certfile}: holds no PEM private key "
        "(a line -----BEGIN PRIVATE KEY-----)"
    )
    # Without a keyfile the key is looked for in the certfile, and the message says so.
    assert refused(TlsConfig(tls_certfile=str(leaf.certfile))) == (
        f"tls_certfile: {leaf.certfile}: holds no PEM private key "
        "(a line -----BEGIN PRIVATE KEY-----); set tls_keyfile to the file that has it"
    )


def test_a_key_that_does_not_match_the_certificate(pki: Pki, leaf: Issued) -> None:
    other = pki.issue("other-key")
    cfg = TlsConfig(tls_certfile=str(leaf.certfile), tls_keyfile=str(other.keyfile))
    assert refused(cfg) == (
        f"tls_keyfile: {other.keyfile}: the private key does not match the certificate "
        f"in {leaf.certfile}"
    )


def test_a_damaged_key(leaf: Issued, tmp_path: Path) -> None:
    lines = leaf.keyfile.read_bytes().splitlines(keepends=True)
    damaged = tmp_path / "damaged.key"
    damaged.write_bytes(lines[0] + b"AAAA" + lines[1][4:] + b"".join(lines[2:]))
    cfg = TlsConfig(tls_certfile=str(leaf.certfile), tls_keyfile=str(damaged))
    message = refused(cfg)
    assert message.startswith(
        f"tls_keyfile: {damaged}: OpenSSL cannot use this key with the certificate in "
        f"{leaf.certfile} (a damaged or unsupported key: "
    ), message


def test_an_encrypted_key_without_a_password_file(pki: Pki) -> None:
    enc = pki.issue("enc-nopw", password=b"pw")
    assert refused(config(enc)) == (
        f"tls_keyfile: {enc.keyfile}: the key is encrypted and tls_password_file is not set"
    )


def test_the_wrong_password(pki: Pki, tmp_path: Path) -> None:
    enc = pki.issue("enc-wrong", password=b"right")
    password = tmp_path / "pw"
    password.write_bytes(b"wrong")
    assert refused(config(enc, tls_password_file=str(password))) == (
        f"tls_password_file: {password}: the password does not decrypt the key in {enc.keyfile}"
    )


def test_an_empty_or_missing_password_file(pki: Pki, tmp_path: Path) -> None:
    enc = pki.issue("enc-empty", password=b"pw")
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    assert refused(config(enc, tls_password_file=str(empty))) == (
        f"tls_password_file: {empty}: is empty"
    )
    missing = tmp_path / "missing"
    assert refused(config(enc, tls_password_file=str(missing))) == (
        f"tls_password_file: {missing}: the file does not exist"
    )


def test_an_expired_certificate(pki: Pki) -> None:
    end = (NOW - DAY).replace(microsecond=0)
    old = pki.issue("expired", not_before=NOW - 10 * DAY, not_after=end)
    assert refused(config(old)) == (
        f"tls_certfile: {old.certfile}: the certificate expired on "
        f"{end:%Y-%m-%d %H:%M:%S} UTC"
    )


def test_a_certificate_not_yet_valid(pki: Pki) -> None:
    start = (NOW + DAY).replace(microsecond=0)
    early = pki.issue("early", not_before=start, not_after=NOW + 10 * DAY)
    message = refused(config(early))
    assert message.startswith(
        f"tls_certfile: {early.certfile}: the certificate is not valid until "
        f"{start:%Y-%m-%d %H:%M:%S} UTC (this machine's clock says "
    ), message


def test_an_expired_certificate_in_the_chain(pki: Pki, tmp_path: Path) -> None:
    end = (NOW - DAY).replace(microsecond=0)
    intermediate = pki.issue("old intermediate", ca=True, not_before=NOW - 10 * DAY,
                             not_after=end)
    leaf = pki.issue("chained", issuer=intermediate)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(leaf.certfile.read_bytes() + intermediate.certfile.read_bytes())
    cfg = TlsConfig(tls_certfile=str(chain), tls_keyfile=str(leaf.keyfile))
    assert refused(cfg) == (
        f"tls_certfile: {chain}: chain certificate 2 of 2 expired on {end:%Y-%m-%d %H:%M:%S} UTC"
    )


def test_validity_is_checked_at_the_given_moment(leaf: Issued) -> None:
    later = NOW + 60 * DAY  # the fixture certificate is valid for 30 days
    with pytest.raises(TlsConfigError, match="the certificate expired on"):
        build_context(config(leaf), now=later)


def test_ca_file_errors(pki: Pki, leaf: Issued, tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    assert refused(config(leaf, tls_client_auth="required", tls_cafile=str(missing))) == (
        f"tls_cafile: {missing}: the file does not exist"
    )
    assert refused(config(leaf, tls_client_auth="required", tls_cafile=str(leaf.keyfile))) == (
        f"tls_cafile: {leaf.keyfile}: holds no PEM certificate "
        "(a line -----BEGIN CERTIFICATE-----)"
    )
    end = (NOW - DAY).replace(microsecond=0)
    old = pki.issue("old ca", issuer=None, ca=True, not_before=NOW - 9 * DAY, not_after=end)
    assert refused(config(leaf, tls_client_auth="optional", tls_cafile=str(old.certfile))) == (
        f"tls_cafile: {old.certfile}: no certificate in it is valid now; "
        f"certificate 1 of 1 expired on {end:%Y-%m-%d %H:%M:%S} UTC"
    )


def test_a_cipher_string_openssl_does_not_know(leaf: Issued) -> None:
    message = refused(config(leaf, tls_ciphers="NOT-A-CIPHER"))
    assert message.startswith(
        "tls_ciphers: 'NOT-A-CIPHER' selects no cipher this OpenSSL (OpenSSL 3"
    ), message


def test_errors_in_an_sni_entry_name_the_entry(pki: Pki, leaf: Issued, tmp_path: Path) -> None:
    good = TlsCertificate(server_names=("a.example",), certfile=str(leaf.certfile),
                          keyfile=str(leaf.keyfile))
    bad = TlsCertificate(server_names=("b.example",), certfile=str(tmp_path / "gone.pem"),
                         keyfile=str(leaf.keyfile))
    cfg = config(leaf, tls_certificates=(good, bad))
    assert refused(cfg) == (
        f"tls_certificates[1].certfile: {tmp_path / 'gone.pem'}: the file does not exist"
    )
    enc = pki.issue("sni-enc", password=b"pw")
    locked = TlsCertificate(server_names=("c.example",), certfile=str(enc.certfile),
                            keyfile=str(enc.keyfile))
    assert refused(config(leaf, tls_certificates=(locked,))) == (
        f"tls_certificates[0].keyfile: {enc.keyfile}: the key is encrypted and "
        "tls_certificates[0].password_file is not set"
    )


# -- who reads the key -------------------------------------------------------------


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory that ``nobody`` may enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="forkserver-tls-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@needs_root
def test_an_unreadable_key_is_named_with_the_reader(leaf: Issued, world_dir: Path) -> None:
    cert = world_dir / "cert.pem"
    key = world_dir / "key.pem"
    shutil.copy(leaf.certfile, cert)
    shutil.copy(leaf.keyfile, key)
    cert.chmod(0o644)
    key.chmod(0o600)  # root's alone
    cfg = TlsConfig(tls_certfile=str(cert), tls_keyfile=str(key))
    report = as_nobody(lambda: repr(build_context(cfg)))
    assert report == (
        f"TlsConfigError: tls_keyfile: {key}: permission denied (this process runs as uid 65534)"
    )


@needs_root
def test_a_worker_serves_a_key_only_root_can_read(leaf: Issued, world_dir: Path) -> None:
    """The master (root) builds the context; a forked child that became
    nobody cannot read the key file, yet completes handshakes: the key is
    in its memory."""
    key = world_dir / "key.pem"
    shutil.copy(leaf.keyfile, key)
    key.chmod(0o600)
    ctx = build_context(TlsConfig(tls_certfile=str(leaf.certfile), tls_keyfile=str(key)))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    address = listener.getsockname()

    def serve() -> str:
        try:
            key.read_bytes()
        except PermissionError:
            pass
        else:
            return "the key file was readable"
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            return f"uid {os.geteuid()} served {tls.version()}"

    result: list[str] = []
    client = threading.Thread(target=lambda: result.append(_handshake_as_client(address)))
    client.start()
    try:
        report = as_nobody(serve)
    finally:
        client.join(TIMEOUT)
        listener.close()
    assert not client.is_alive()
    assert report == "uid 65534 served TLSv1.3"
    assert result == ["ok"]


def _handshake_as_client(address: tuple[str, int]) -> str:
    try:
        with tls_connect(address, client_context()):
            return "ok"
    except OSError as exc:
        return repr(exc)


_ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(
    st.sampled_from([*TlsConfig.__dataclass_fields__, "tls_unknown"]), _ANY_VALUE, max_size=6
))
def test_any_table_gives_a_config_or_a_config_error(data: dict[str, object]) -> None:
    """What a TOML file can hold never escapes as anything but TlsConfigError."""
    try:
        TlsConfig.from_mapping(data)
    except TlsConfigError as exc:
        assert exc.key.startswith("tls")
