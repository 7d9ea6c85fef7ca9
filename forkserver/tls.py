"""A TLS listener's settings, and the ``ssl.SSLContext`` built from them.

The master never touches client bytes, so TLS runs in the workers; but
the files are read here, in the master, before any fork:

* ``TlsConfig``: one TLS listener's settings, frozen, checked as far as
  can be done without reading a file.  Field names are the daemon's
  setting names (``tls_certfile``, ``tls_client_auth``, ...).
* ``build_context(config)``: reads and checks every certificate, key,
  password and CA file and returns the server context.  A missing,
  unreadable, malformed, mismatched, expired or not yet valid file
  raises ``TlsConfigError`` naming the setting, the file and the reason
  in plain words.
* ``SniSelector``: the context's ``sni_callback``; it picks a context by
  the server name the client asked for (exact names, then
  ``*.example.com`` wildcards), else the default.

Key material: ``build_context`` reads the private key in the process
that calls it, so workers that run as an unprivileged user can serve a
key only root can read.  It is not kept from them, though: after fork,
every worker holds the loaded context, key included, in its memory,
where the handler (or anything that can ptrace or core-dump that user's
processes) can read it.  See docs/internals.md, "tls.py".

The per-connection side (handshakes, failures, what was negotiated) is
``forkserver.handshake``; PEM and validity dates are ``forkserver.pem``.
"""

from __future__ import annotations

import datetime
import errno
import os
import re
import ssl
import stat
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from forkserver import pem
from forkserver.errors import ForkserverError

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "SniSelector",
    "TlsCertificate",
    "TlsConfig",
    "TlsConfigError",
    "build_context",
    "requested_server_name",
]

ClientAuth = Literal["none", "optional", "required"]

#: Seconds, as Qt's ``QSslServer`` (5000 ms).
DEFAULT_HANDSHAKE_TIMEOUT: Final = 5.0
MAX_HANDSHAKE_TIMEOUT: Final = 3600.0
#: A certificate chain, a key or a CA bundle larger than this is refused
#: unread (a chain is a few KiB; Debian's whole CA bundle is about 200 KiB).
MAX_PEM_FILE: Final = 1 << 20
MAX_PASSWORD_FILE: Final = 1024
MAX_ALPN_PROTOCOLS: Final = 32
MAX_CIPHERS_TEXT: Final = 4096
MAX_SERVER_NAMES: Final = 1000

_MIN_VERSIONS: Final[Mapping[str, ssl.TLSVersion]] = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
_VERIFY_MODES: Final[Mapping[str, ssl.VerifyMode]] = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
# One DNS label (RFC 1123; "_" is tolerated, as in internal names).
_LABEL_RE: Final = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


class TlsConfigError(ForkserverError, ValueError):
    """A TLS setting, or a file it names, cannot be used.  ``key`` is the setting."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


# -- the settings ---------------------------------------------------------------


@dataclass(frozen=True)
class TlsCertificate:
    """One entry of ``tls_certificates``: a certificate served for some names.

    ``keyfile`` None: the key is in ``certfile``.  ``server_names`` are
    host names, or ``*.example.com`` (one label, any name under it).
    """

    server_names: tuple[str, ...]
    certfile: str
    keyfile: str | None = None
    password_file: str | None = None

    def __post_init__(self) -> None:
        names: object = self.server_names
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise TlsConfigError("server_names", "must be a list of host names")
        normal = tuple(_server_name(n, "server_names") for n in names)
        if not normal:
            raise TlsConfigError("server_names", "must name at least one host")
        object.__setattr__(self, "server_names", normal)
        _path(self.certfile, "certfile")
        _path(self.keyfile, "keyfile", optional=True)
        _path(self.password_file, "password_file", optional=True)

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], key: str) -> TlsCertificate:
        """From a TOML table, *key* (``tls_certificates[0]``) naming it in errors."""
        _no_unknown(data, ("server_names", "certfile", "keyfile", "password_file"), key)
        if "certfile" not in data or "server_names" not in data:
            raise TlsConfigError(key, "needs server_names and certfile")
        try:
            return cls(
                server_names=data["server_names"],  # type: ignore[arg-type]
                certfile=data["certfile"],  # type: ignore[arg-type]
                keyfile=data.get("keyfile"),  # type: ignore[arg-type]
                password_file=data.get("password_file"),  # type: ignore[arg-type]
            )
        except TlsConfigError as exc:
            raise TlsConfigError(f"{key}.{exc.key}", exc.reason) from None


@dataclass(frozen=True)
class TlsConfig:
    """One TLS listener's settings; checked here as far as no file is read.

    * ``tls_certfile`` (PEM, the server certificate then its chain) and
      ``tls_keyfile`` (None: the key is in the certfile);
      ``tls_password_file`` holds the password of an encrypted key.
    * ``tls_client_auth``: ``none``, ``optional`` or ``required`` client
      certificates, checked against ``tls_cafile`` (needed unless none).
    * ``tls_min_version``: ``TLSv1.2`` (the default) or ``TLSv1.3``.
    * ``tls_ciphers``: an OpenSSL cipher string for TLS 1.2 (None: the
      ``ssl`` module's secure default).  TLS 1.3 suites are OpenSSL's
      defaults; the ``ssl`` module cannot change them.
    * ``tls_alpn``: protocols offered for ALPN, in order of preference.
    * ``tls_handshake_timeout``: seconds a client has to finish its handshake.
    * ``tls_certificates``: more certificates, chosen by SNI server name;
      ``tls_certfile`` serves every other name, and clients without SNI.
    """

    tls_certfile: str
    tls_keyfile: str | None = None
    tls_password_file: str | None = None
    tls_cafile: str | None = None
    tls_client_auth: ClientAuth = "none"
    tls_min_version: str = "TLSv1.2"
    tls_ciphers: str | None = None
    tls_alpn: tuple[str, ...] = ()
    tls_handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    tls_certificates: tuple[TlsCertificate, ...] = field(default=())

    def __post_init__(self) -> None:
        _path(self.tls_certfile, "tls_certfile")
        _path(self.tls_keyfile, "tls_keyfile", optional=True)
        _path(self.tls_password_file, "tls_password_file", optional=True)
        _path(self.tls_cafile, "tls_cafile", optional=True)
        _choice(self.tls_client_auth, _VERIFY_MODES, "tls_client_auth")
        if self.tls_client_auth != "none" and self.tls_cafile is None:
            raise TlsConfigError(
                "tls_client_auth",
                f"{self.tls_client_auth!r} needs tls_cafile, the CA that signs client certificates",
            )
        if self.tls_client_auth == "none" and self.tls_cafile is not None:
            # Refused rather than ignored: a CA file with no client check
            # reads as mutual TLS and is none.
            raise TlsConfigError(
                "tls_cafile",
                "is set but tls_client_auth is 'none', so no client certificate would be "
                "checked; set tls_client_auth to 'optional' or 'required'",
            )
        _choice(self.tls_min_version, _MIN_VERSIONS, "tls_min_version",
                " (TLS 1.0 and 1.1 are not offered)")
        _check_ciphers(self.tls_ciphers)
        object.__setattr__(self, "tls_alpn", _alpn(self.tls_alpn))
        _check_timeout(self.tls_handshake_timeout)
        object.__setattr__(self, "tls_certificates", _certificates(self.tls_certificates))

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> TlsConfig:
        """From a mapping of the setting names (a TOML table, say); unknown keys are refused."""
        names = list(cls.__dataclass_fields__)
        _no_unknown(data, names, "tls")
        if "tls_certfile" not in data:
            raise TlsConfigError("tls_certfile", "is required for a TLS listener")
        entries = data.get("tls_certificates", ())
        if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Iterable):
            raise TlsConfigError("tls_certificates", "must be a list of tables")
        certificates = []
        for index, entry in enumerate(entries):
            key = f"tls_certificates[{index}]"
            if not isinstance(entry, Mapping):
                raise TlsConfigError(key, f"must be a table, not {type(entry).__name__}")
            certificates.append(TlsCertificate.from_mapping(entry, key))
        values: dict[str, Any] = {k: v for k, v in data.items() if k != "tls_certificates"}
        return cls(**values, tls_certificates=tuple(certificates))

    def verify_mode(self) -> ssl.VerifyMode:
        return _VERIFY_MODES[self.tls_client_auth]

    def minimum_version(self) -> ssl.TLSVersion:
        return _MIN_VERSIONS[self.tls_min_version]


def _no_unknown(data: Mapping[str, object], known: Iterable[str], where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise TlsConfigError(where, f"unknown setting {unknown[0]!r}")


def _choice(value: object, choices: Mapping[str, object], key: str, note: str = "") -> None:
    if not isinstance(value, str) or value not in choices:
        raise TlsConfigError(key, f"{value!r} is not one of {', '.join(choices)}{note}")


def _path(value: object, key: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise TlsConfigError(key, f"must be a file path, not {type(value).__name__}")
    if not value or "\0" in value:
        raise TlsConfigError(key, "must be a non-empty file path without NUL bytes")


def _check_ciphers(ciphers: object) -> None:
    if ciphers is None:
        return
    if not isinstance(ciphers, str):
        raise TlsConfigError("tls_ciphers", f"must be a string, not {type(ciphers).__name__}")
    if not ciphers or len(ciphers) > MAX_CIPHERS_TEXT or not ciphers.isascii():
        raise TlsConfigError(
            "tls_ciphers", f"must be a non-empty ASCII OpenSSL cipher string of at most "
            f"{MAX_CIPHERS_TEXT} characters"
        )
    if not ciphers.isprintable():
        raise TlsConfigError("tls_ciphers", "contains control characters")


def _alpn(protocols: object) -> tuple[str, ...]:
    if isinstance(protocols, str) or not isinstance(protocols, Iterable):
        raise TlsConfigError("tls_alpn", "must be a list of protocol names, such as ['h2']")
    result = tuple(protocols)
    if len(result) > MAX_ALPN_PROTOCOLS:
        raise TlsConfigError("tls_alpn", f"at most {MAX_ALPN_PROTOCOLS} protocols")
    for proto in result:
        if not isinstance(proto, str) or not proto.isascii() or not proto.isprintable():
            raise TlsConfigError("tls_alpn", f"{proto!r} is not a printable ASCII string")
        if not 1 <= len(proto) <= 255:
            raise TlsConfigError("tls_alpn", f"{proto!r}: a protocol name is 1 to 255 bytes")
    if len(set(result)) != len(result):
        raise TlsConfigError("tls_alpn", "names a protocol twice")
    return result


def _check_timeout(timeout: object) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TlsConfigError(
            "tls_handshake_timeout", f"must be a number of seconds, not {type(timeout).__name__}"
        )
    if not 0 < timeout <= MAX_HANDSHAKE_TIMEOUT:  # also refuses NaN
        raise TlsConfigError(
            "tls_handshake_timeout",
            f"{timeout!r} is not in (0, {MAX_HANDSHAKE_TIMEOUT:g}] seconds",
        )


def _certificates(entries: object) -> tuple[TlsCertificate, ...]:
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Iterable):
        raise TlsConfigError("tls_certificates", "must be a list of certificate entries")
    result = tuple(entries)
    seen: dict[str, int] = {}
    for index, entry in enumerate(result):
        if not isinstance(entry, TlsCertificate):
            raise TlsConfigError(
                f"tls_certificates[{index}]",
                f"must be a TlsCertificate, not {type(entry).__name__}",
            )
        for name in entry.server_names:
            if name in seen:
                raise TlsConfigError(
                    f"tls_certificates[{index}].server_names",
                    f"{name!r} is already served by tls_certificates[{seen[name]}]",
                )
            seen[name] = index
    if len(seen) > MAX_SERVER_NAMES:
        raise TlsConfigError("tls_certificates", f"at most {MAX_SERVER_NAMES} server names")
    return result


def _server_name(name: object, key: str) -> str:
    """A configured server name, lower case, without a trailing dot."""
    if not isinstance(name, str):
        raise TlsConfigError(key, f"{name!r} is not a host name")
    if not name.isascii():
        raise TlsConfigError(key, f"{name!r}: write an international name as its xn-- A-label")
    normal = name.lower().removesuffix(".")
    labels = normal.split(".")
    wildcard = labels[0] == "*"
    if wildcard:
        labels = labels[1:]
    if len(normal) > 253 or len(labels) < (2 if wildcard else 1):
        raise TlsConfigError(key, f"{name!r} is not a host name or a *.domain wildcard")
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            hint = " (a wildcard is only '*.' in front)" if "*" in label else ""
            raise TlsConfigError(key, f"{name!r} is not a host name{hint}")
    return normal


# -- reading files --------------------------------------------------------------


def _read_file(path: str, key: str, limit: int) -> bytes:
    """A regular file's bytes, at most *limit*; errors in plain words."""
    try:
        # O_NONBLOCK: a FIFO put where a key belongs must not hang the master.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise TlsConfigError(key, f"{path}: {_os_reason(exc)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise TlsConfigError(key, f"{path}: is {kind}")
        if info.st_size > limit:
            raise TlsConfigError(key, f"{path}: is {info.st_size} bytes, more than {limit}")
        chunks = []
        total = 0
        while chunk := os.read(fd, limit + 1 - total):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise TlsConfigError(key, f"{path}: is more than {limit} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise TlsConfigError(key, f"{path}: {_os_reason(exc)}") from None
    finally:
        os.close(fd)


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "the file does not exist"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied (this process runs as uid {os.geteuid()})"
    if exc.errno == errno.EISDIR:
        return "is a directory"
    if exc.errno == errno.ENOTDIR:
        return "a directory in the path is not a directory"
    return f"cannot read it: {exc.strerror or exc}"


def _read_password(path: str, key: str) -> bytes:
    data = _read_file(path, key, MAX_PASSWORD_FILE)
    # One trailing newline is the file's, not the password's.
    password = data.removesuffix(b"\n").removesuffix(b"\r")
    if not password:
        raise TlsConfigError(key, f"{path}: is empty")
    return password


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _check_certificates(
    data: bytes, path: str, key: str, now: datetime.datetime, *, bundle: bool
) -> list[bytes]:
    """The DER certificates in *data*; each must be in its validity period.

    For a CA *bundle*, one valid certificate is enough (a system bundle
    may hold expired roots that simply never verify anything).
    """
    try:
        certificates = pem.pem_certificates(data)
    except ValueError as exc:
        raise TlsConfigError(key, f"{path}: {exc}") from None
    if not certificates:
        raise TlsConfigError(
            key, f"{path}: holds no PEM certificate (a line -----BEGIN CERTIFICATE-----)"
        )
    problems = []
    count = len(certificates)
    for number, der in enumerate(certificates, 1):
        which = _which(number, count, bundle=bundle)
        try:
            not_before, not_after = pem.certificate_validity(der)
        except ValueError as exc:
            raise TlsConfigError(key, f"{path}: {which} is malformed: {exc}") from None
        if now > not_after:
            problems.append(f"{which} expired on {_when(not_after)}")
        elif now < not_before:
            problems.append(
                f"{which} is not valid until {_when(not_before)} "
                f"(this machine's clock says {_when(now)})"
            )
    if problems and not bundle:
        raise TlsConfigError(key, f"{path}: {problems[0]}")
    if problems and len(problems) == count:
        raise TlsConfigError(key, f"{path}: no certificate in it is valid now; {problems[0]}")
    return certificates


def _which(number: int, count: int, *, bundle: bool) -> str:
    if bundle:
        return f"certificate {number} of {count}"
    if number == 1:
        return "the certificate" if count == 1 else f"the server certificate (1 of {count})"
    return f"chain certificate {number} of {count}"


# -- building the context -------------------------------------------------------


def build_context(
    config: TlsConfig, *, now: datetime.datetime | None = None
) -> ssl.SSLContext:
    """The server ``SSLContext`` for *config*, every file read and checked.

    Call it before forking: errors raise ``TlsConfigError`` naming the
    setting and the file.  With ``tls_certificates``, the returned
    (default) context carries an ``SniSelector`` as its
    ``sni_callback``.  *now* (for tests) is the moment certificates must
    be valid at.
    """
    moment = now or datetime.datetime.now(datetime.UTC)
    cadata = None
    if config.tls_cafile is not None:
        raw = _read_file(config.tls_cafile, "tls_cafile", MAX_PEM_FILE)
        cadata = b"".join(
            _check_certificates(raw, config.tls_cafile, "tls_cafile", moment, bundle=True)
        )
    default = _context(config, cadata)
    _Chain(
        config.tls_certfile, config.tls_keyfile, config.tls_password_file, setting="tls_"
    ).load_into(default, moment)
    table: dict[str, ssl.SSLContext] = {}
    for index, entry in enumerate(config.tls_certificates):
        ctx = _context(config, cadata)
        _Chain(
            entry.certfile, entry.keyfile, entry.password_file,
            setting=f"tls_certificates[{index}].",
        ).load_into(ctx, moment)
        for name in entry.server_names:
            table[name] = ctx
    default.sni_callback = SniSelector(default, table)
    return default


def _context(config: TlsConfig, cadata: bytes | None) -> ssl.SSLContext:
    # PROTOCOL_TLS_SERVER: no hostname check, and the ssl module's secure
    # defaults (no compression, server cipher order, single-use (EC)DH keys).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = config.minimum_version()
    # A client may not renegotiate a TLS 1.2 session: each renegotiation
    # costs the server a full handshake (a cheap DoS).
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if config.tls_ciphers is not None:
        try:
            ctx.set_ciphers(config.tls_ciphers)
        except ssl.SSLError:
            raise TlsConfigError(
                "tls_ciphers",
                f"{config.tls_ciphers!r} selects no cipher this OpenSSL "
                f"({ssl.OPENSSL_VERSION}) knows",
            ) from None
    if config.tls_alpn:
        ctx.set_alpn_protocols(list(config.tls_alpn))
    ctx.verify_mode = config.verify_mode()
    if cadata is not None:
        ctx.load_verify_locations(cadata=cadata)
    return ctx


@dataclass(frozen=True)
class _Chain:
    """One certificate chain and its key; *setting* prefixes the setting names in errors."""

    certfile: str
    keyfile: str | None
    password_file: str | None
    setting: str  # "tls_" -> tls_certfile...; "tls_certificates[0]." -> ...certfile

    def key(self, name: str) -> str:
        # The top-level settings are tls_certfile, tls_keyfile, tls_password_file.
        return f"{self.setting}{name}"

    def load_into(self, ctx: ssl.SSLContext, now: datetime.datetime) -> None:
        cert_key = self.key("certfile")
        cert_pem = _read_file(self.certfile, cert_key, MAX_PEM_FILE)
        _check_certificates(cert_pem, self.certfile, cert_key, now, bundle=False)
        # Without a keyfile, the key is in the certfile.
        key_path = self.keyfile if self.keyfile is not None else self.certfile
        key_key = self.key("keyfile") if self.keyfile is not None else cert_key
        key_pem = cert_pem if self.keyfile is None else _read_file(
            self.keyfile, key_key, MAX_PEM_FILE
        )
        if not pem.has_private_key(key_pem):
            hint = "" if self.keyfile else f"; set {self.key('keyfile')} to the file that has it"
            raise TlsConfigError(
                key_key, f"{key_path}: holds no PEM private key "
                f"(a line -----BEGIN PRIVATE KEY-----){hint}"
            )
        encrypted = pem.has_encrypted_private_key(key_pem)
        password_key = self.key("password_file")
        password = (
            _read_password(self.password_file, password_key) if self.password_file else None
        )
        no_password = TlsConfigError(
            key_key, f"{key_path}: the key is encrypted and {password_key} is not set"
        )
        if encrypted and password is None:
            raise no_password

        def give_password() -> bytes:
            # Always a callable: given none, OpenSSL would prompt on the terminal.
            if password is None:
                raise no_password
            return password

        try:
            ctx.load_cert_chain(self.certfile, self.keyfile, password=give_password)
        except TlsConfigError:
            raise
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise TlsConfigError(
                    key_key,
                    f"{key_path}: the private key does not match the certificate "
                    f"in {self.certfile}",
                ) from None
            if encrypted:
                raise TlsConfigError(
                    password_key,
                    f"{self.password_file}: the password does not decrypt the key in {key_path}",
                ) from None
            raise TlsConfigError(
                key_key,
                f"{key_path}: OpenSSL cannot use this key with the certificate in "
                f"{self.certfile} (a damaged or unsupported key: {exc.reason or exc})",
            ) from None
        except OSError as exc:  # the file changed or vanished since we read it
            raise TlsConfigError(cert_key, f"{self.certfile}: {_os_reason(exc)}") from None


# -- SNI ------------------------------------------------------------------------

# The server name each connection asked for, for connection_info(): the
# ssl module keeps it nowhere on the server side.  Weak keys: an entry
# goes with its SSLSocket or SSLObject.
_server_names: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def requested_server_name(conn: ssl.SSLSocket | ssl.SSLObject) -> str | None:
    """The SNI name a client sent, if its context came from ``build_context``."""
    return _server_names.get(conn)


class SniSelector:
    """An ``sni_callback``: the context for the server name a client asked for.

    Exact names win over wildcards; ``*.example.com`` matches one label
    (``a.example.com``, not ``example.com`` nor ``a.b.example.com``);
    case and a trailing dot do not matter.  Any other name, or none,
    gets the default context.
    """

    def __init__(self, default: ssl.SSLContext, by_name: Mapping[str, ssl.SSLContext]) -> None:
        self.default = default
        self._exact = {n: c for n, c in by_name.items() if not n.startswith("*.")}
        self._wildcard = {n[2:]: c for n, c in by_name.items() if n.startswith("*.")}

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        if not server_name:
            return self.default
        name = server_name.lower().removesuffix(".")
        found = self._exact.get(name)
        if found is None and "." in name:
            found = self._wildcard.get(name.split(".", 1)[1])
        return found if found is not None else self.default

    def __call__(
        self, conn: ssl.SSLSocket | ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext
    ) -> None:
        if server_name:
            _server_names[conn] = server_name
        chosen = self.context_for(server_name)
        if chosen is not ctx:
            conn.context = chosen
        # None: carry on with the handshake.


