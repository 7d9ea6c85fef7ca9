"""Certificates made on the fly, and real TLS clients, for the TLS tests.

Nothing here is checked in: every key and certificate is generated into
a test's temporary directory with the ``cryptography`` package (a test
extra).  Clients are real: Python's ``ssl`` module and ``openssl
s_client``, each bounded in time and reaped.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import select
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from forkserver.privileges import drop_privileges
from tests.support import wait_pid

TIMEOUT = 10.0  # seconds; every client operation here is bounded by it
UTC = datetime.UTC
NOW = datetime.datetime.now(UTC)
DAY = datetime.timedelta(days=1)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, in memory and as PEM files."""

    name: str
    cert: x509.Certificate
    key: PrivateKey
    certfile: Path
    keyfile: Path

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


class Pki:
    """A tiny certificate authority that writes into *directory*."""

    def __init__(self, directory: Path, name: str = "Test CA") -> None:
        self.directory = directory
        self.ca = self.issue(name, issuer=None, ca=True)

    def issue(
        self,
        name: str,
        *,
        issuer: Issued | str | None = "ca",
        sans: Sequence[str] = (),
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        ca: bool = False,
        client: bool = False,
        key: PrivateKey | None = None,
        password: bytes | None = None,
        rsa_key: bool = False,
    ) -> Issued:
        """A certificate for *name*, signed by *issuer* ("ca": ours; None: self-signed)."""
        if key is None:
            key = (
                rsa.generate_private_key(public_exponent=65537, key_size=2048)
                if rsa_key
                else ec.generate_private_key(ec.SECP256R1())
            )
        signer = self.ca if issuer == "ca" else issuer
        assert signer is None or isinstance(signer, Issued)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(signer.cert.subject if signer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - DAY)
            .not_valid_after(not_after or NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(s) for s in sans]), critical=False
            )
        if not ca:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(signer.key if signer else key, hashes.SHA256())
        certfile = self.directory / f"{name}.crt"
        keyfile = self.directory / f"{name}.key"
        certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        keyfile.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
            )
        )
        os.chmod(keyfile, 0o600)
        return Issued(name, cert, key, certfile, keyfile)

    def server(self, name: str = "localhost", **kwargs: object) -> Issued:
        sans = kwargs.pop("sans", (name, "127.0.0.1"))
        return self.issue(name, sans=sans, **kwargs)  # type: ignore[arg-type]


def _general_name(text: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        return x509.DNSName(text)


# -- clients ----------------------------------------------------------------


def client_context(
    cafile: Path | None = None,
    *,
    cert: Issued | None = None,
    alpn: Sequence[str] = (),
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A Python client context that trusts *cafile* (or nothing, with no checks)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=str(cafile))
    if cert is not None:
        ctx.load_cert_chain(str(cert.certfile), str(cert.keyfile))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def tcp_connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=TIMEOUT)


@contextlib.contextmanager
def tls_connect(
    address: tuple[str, int], ctx: ssl.SSLContext, server_hostname: str | None = "localhost"
) -> Iterator[ssl.SSLSocket]:
    """A connected, handshaken client ``SSLSocket``, closed on exit."""
    sock = tcp_connect(address)
    try:
        tls = ctx.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise
    with tls:
        yield tls


@dataclass(frozen=True)
class SClientResult:
    returncode: int
    output: str


def s_client(
    address: tuple[str, int],
    *args: str,
    stdin: bytes = b"",
    timeout: float = TIMEOUT,
) -> SClientResult:
    """Run ``openssl s_client`` against *address*: stdout and stderr, merged.

    ``stdin`` is what the client sends after the handshake; when it is
    used up, s_client closes the connection (``-ign_eof`` is not given).
    The process is killed and reaped if it outlives *timeout*.
    """
    host, port = address
    cmd = ["openssl", "s_client", "-connect", f"{host}:{port}", "-no_ign_eof", *args]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"openssl s_client did not finish in {timeout} s: {out!r}") from None
    return SClientResult(proc.returncode, out.decode("utf-8", "replace"))


def client_hello(server_hostname: str = "localhost", **kwargs: Any) -> bytes:
    """The bytes of a real ClientHello (Python's client), to send by hand."""
    ctx = client_context(**kwargs)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    data = outgoing.read()
    assert data[:1] == b"\x16", data[:16]
    return data


class OneShotServer:
    """Accepts one connection on loopback and runs *serve(conn)* on it in a thread.

    ``outcome()`` waits (bounded) for the thread and returns what *serve*
    returned, or raises what it raised.
    """

    def __init__(self, serve: Callable[[socket.socket], Any]) -> None:
        self._serve = serve
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self._result: Any = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            self._result = self._serve(conn)
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def finished(self) -> bool:
        return self._done.is_set()

    def outcome(self, timeout: float = TIMEOUT) -> Any:
        assert self._done.wait(timeout), f"the server thread did not finish in {timeout} s"
        self._thread.join(timeout)
        if self._error is not None:
            raise self._error
        return self._result

    def close(self) -> None:
        self.listener.close()
        if not self._done.wait(TIMEOUT):
            raise AssertionError("the server thread is still running")
        self._thread.join(TIMEOUT)
        result = self._result
        if isinstance(result, socket.socket):
            result.close()

    def __enter__(self) -> OneShotServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def as_nobody(action: Callable[[], str]) -> str:
    """Run *action* in a forked child that became ``nobody``; what it returned (or raised).

    The child never returns into pytest; the parent reads its report
    (bounded) and reaps it.
    """
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(report_r)
            drop_privileges("nobody", "nogroup")
            try:
                text = action()
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
            os.write(report_w, text.encode()[:65536])
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(report_w)
    try:
        ready, _, _ = select.select([report_r], [], [], TIMEOUT)
        assert ready, "the child sent no report"
        data = b""
        while chunk := os.read(report_r, 65536):
            data += chunk
    finally:
        os.close(report_r)
        assert wait_pid(pid, timeout=TIMEOUT) == 0
    return data.decode()
