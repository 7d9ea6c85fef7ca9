"""The PROXY header parser against real HAProxy, an independent sender.

One HAProxy process (Debian's ``haproxy`` package; ``.ci/run`` installs
it) runs for the module on a generated config in a temporary directory,
``mode tcp``, with frontends on sockets the test bound itself on
loopback (passed as ``fd@N``, so no port is guessed) and backends that
connect to the test's own listeners with ``send-proxy`` and
``send-proxy-v2``.  A client connects to a frontend; the test accepts
what HAProxy relays, reads the header with the module's readers and
checks it against the client's real address and port, then checks that
the client's bytes follow intact.

It covers TCP4 and TCP6 (v1 and v2), an IPv4 client of a dual-stack
socket (``::ffff:127.0.0.1``), a Unix-socket frontend (HAProxy sends
``UNKNOWN`` and ``LOCAL`` then), the CRC32C, UNIQUE_ID and SSL TLVs on
plain connections, and with a TLS frontend (certificates made with the
``openssl`` tool) AUTHORITY, ALPN and the SSL sub-TLVs: version, cipher,
client certificate CN, and the frontend certificate's algorithms.

HAProxy is stopped and reaped when the module ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from forkserver.proxyproto import Command, ProxyInfo, SslInfo
from forkserver.proxyread import read_header, read_header_blocking

HAPROXY = shutil.which("haproxy")
OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed "
                                "(apt-get install haproxy; .ci/run installs it)")  # fmt: skip

TIMEOUT = 10.0
PAYLOAD = b"hello from the client\r\n" * 50


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


IPV6 = ipv6_loopback()


@dataclass
class Haproxy:
    """The running HAProxy and the sockets around it."""

    frontends: dict[str, tuple[int, object]] = field(default_factory=dict)  # name: (family, addr)
    targets: dict[str, socket.socket] = field(default_factory=dict)  # backend: our listener
    certs: Path | None = None
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    def relay(self, frontend: str, backend: str, client: socket.socket | None = None,
              ) -> tuple[socket.socket, socket.socket]:  # fmt: skip
        """Connect a client to *frontend*; return it and what *backend* relays to us."""
        family, address = self.frontends[frontend]
        if client is None:
            client = socket.socket(family)
            client.settimeout(TIMEOUT)
            client.connect(address)
        target = self.targets[backend]
        target.settimeout(TIMEOUT)
        try:
            relayed, _ = target.accept()
        except TimeoutError:
            client.close()
            raise AssertionError(f"HAProxy relayed nothing to {backend}: {self.output()}") from None
        return client, relayed

    def output(self) -> str:
        state = "running" if self.proc and self.proc.poll() is None else "exited"
        text = self.log.read_text(errors="replace")[-2000:] if self.log else ""
        return f"haproxy {state}; its output: {text!r}"


def make_certificates(where: Path) -> Path:
    """A server certificate for proxy.test and a self-signed client one (client.test)."""
    assert OPENSSL is not None
    for name, subject in (("server", "proxy.test"), ("client", "client.test")):
        subprocess.run([OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-sha256", "-nodes", "-days", "2",
                        "-subj", f"/CN={subject}", "-addext", f"subjectAltName=DNS:{subject}",
                        "-keyout", str(where / f"{name}.key"), "-out", str(where / f"{name}.crt")],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        (where / f"{name}.pem").write_bytes((where / f"{name}.crt").read_bytes()
                                            + (where / f"{name}.key").read_bytes())  # fmt: skip
    return where


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Haproxy]:
    assert HAPROXY is not None
    work = tmp_path_factory.mktemp("haproxy")
    h = Haproxy(log=work / "haproxy.log")
    with contextlib.ExitStack() as stack:
        def listen(family: int, address: object) -> socket.socket:
            sock = stack.enter_context(socket.socket(family))
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, address != "dual")
                address = ("::ffff:127.0.0.1", 0) if address == "dual" else address
            sock.bind(address)  # type: ignore[arg-type]
            sock.listen(16)
            return sock

        binds: dict[str, list[socket.socket]] = {}
        for name in ("v1", "v2", "tls"):
            v4 = listen(socket.AF_INET, ("127.0.0.1", 0))
            h.frontends[f"{name}/ipv4"] = (socket.AF_INET, v4.getsockname())
            binds[name] = [v4]
            if IPV6:
                v6 = listen(socket.AF_INET6, ("::1", 0))
                h.frontends[f"{name}/ipv6"] = (socket.AF_INET6, v6.getsockname())
                dual = listen(socket.AF_INET6, "dual")
                h.frontends[f"{name}/dual"] = (socket.AF_INET, ("127.0.0.1", dual.getsockname()[1]))
                binds[name] += [v6, dual]
            path = str(work / f"{name}.sock")
            unix = listen(socket.AF_UNIX, path)
            h.frontends[f"{name}/unix"] = (socket.AF_UNIX, path)
            binds[name].append(unix)
        for backend in ("v1", "v2", "tls"):
            h.targets[backend] = listen(socket.AF_INET, ("127.0.0.1", 0))

        def bind_lines(name: str, options: str = "") -> str:
            return "".join(f"    bind fd@{s.fileno()}{options}\n" for s in binds[name])

        def server(backend: str, options: str) -> str:
            port = h.targets[backend].getsockname()[1]
            return f"    server {backend} 127.0.0.1:{port} {options}\n"

        tls = ""
        if OPENSSL is not None:
            h.certs = make_certificates(work)
            tls = ("frontend fe_tls\n"
                   + bind_lines("tls", f" ssl crt {h.certs / 'server.pem'} ca-file "
                                f"{h.certs / 'client.crt'} verify optional alpn h2,http/1.1")
                   + "    unique-id-format %ci:%cp\n    default_backend be_tls\n"
                   "backend be_tls\n"
                   + server("tls", "send-proxy-v2 proxy-v2-options "
                            "ssl,cert-cn,ssl-cipher,cert-sig,cert-key,authority,crc32c,unique-id"))
        config = ("global\n    nbthread 1\n"
                  "defaults\n    mode tcp\n    timeout connect 10s\n"
                  "    timeout client 30s\n    timeout server 30s\n"
                  "frontend fe_v1\n" + bind_lines("v1") + "    default_backend be_v1\n"
                  "backend be_v1\n" + server("v1", "send-proxy")
                  + "frontend fe_v2\n" + bind_lines("v2")
                  + "    unique-id-format %ci:%cp\n    default_backend be_v2\n"
                  "backend be_v2\n"
                  + server("v2", "send-proxy-v2 proxy-v2-options ssl,unique-id,authority,crc32c")
                  + tls)  # fmt: skip
        cfg = work / "haproxy.cfg"
        cfg.write_text(config)
        fds = [s.fileno() for group in binds.values() for s in group]
        check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], check=False, capture_output=True,
                               text=True, pass_fds=fds, timeout=60)  # fmt: skip
        assert check.returncode == 0, f"haproxy refused {config}: {check.stdout}{check.stderr}"
        with h.log.open("wb") as log:
            h.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], pass_fds=fds,
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      start_new_session=True)  # fmt: skip
        try:
            yield h
        finally:
            h.proc.terminate()
            try:
                h.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                h.proc.kill()
                h.proc.wait(TIMEOUT)
            assert h.proc.returncode is not None


def peer_of(client: socket.socket) -> tuple[object, object]:
    """What the header must say for this client: its own address, and the frontend's."""
    return client.getsockname(), client.getpeername()


def read(sock: socket.socket, version: int, how: str) -> ProxyInfo:
    deadline = time.monotonic() + TIMEOUT
    if how == "blocking":
        return read_header_blocking(sock, version, deadline)  # type: ignore[arg-type]
    sock.setblocking(False)
    try:
        return asyncio.run(read_header(sock, version, deadline))  # type: ignore[arg-type]
    finally:
        sock.setblocking(True)


def rest_of(relayed: socket.socket, client: socket.socket) -> bytes:
    client.shutdown(socket.SHUT_WR)
    relayed.settimeout(TIMEOUT)
    data = bytearray()
    while chunk := relayed.recv(65536):
        data += chunk
    return bytes(data)


FAMILIES = ["ipv4", *(["ipv6", "dual"] if IPV6 else [])]


@pytest.mark.parametrize("how", ["blocking", "asyncio"])
@pytest.mark.parametrize("family", FAMILIES)
def test_v1_from_haproxy_names_the_client(haproxy: Haproxy, family: str, how: str) -> None:
    client, relayed = haproxy.relay(f"v1/{family}", "v1")
    with client, relayed:
        client.sendall(PAYLOAD)
        info = read(relayed, 1, how)
        (host, port, *_), frontend = peer_of(client)
        if family == "dual":  # an IPv4 client of an IPv6 socket, as HAProxy saw it
            assert info.source == (f"::ffff:{host}", port, 0, 0)
        else:
            assert (info.source, info.destination) == (client.getsockname(), frontend)
        assert info.from_header and info.command == Command.PROXY and info.version == 1
        assert rest_of(relayed, client) == PAYLOAD


@pytest.mark.parametrize("how", ["blocking", "asyncio"])
@pytest.mark.parametrize("family", FAMILIES)
def test_v2_from_haproxy_names_the_client_with_its_tlvs(haproxy: Haproxy, family: str,
                                                        how: str) -> None:  # fmt: skip
    client, relayed = haproxy.relay(f"v2/{family}", "v2")
    with client, relayed:
        client.sendall(PAYLOAD)
        info = read(relayed, 2, how)
        (host, port, *_), frontend = peer_of(client)
        if family == "dual":
            assert info.source == (f"::ffff:{host}", port, 0, 0)
            host = f"::ffff:{host}"
        else:
            assert (info.source, info.destination) == (client.getsockname(), frontend)
        assert info.from_header and info.command == Command.PROXY and info.version == 2
        assert info.tlvs.crc32c is not None  # present, so verified
        assert info.tlvs.unique_id == f"{host}:{port}".encode()
        assert info.tlvs.ssl == SslInfo(client=0, verify=0)  # a plain connection
        assert info.tlvs.authority is None and info.tlvs.alpn is None
        assert rest_of(relayed, client) == PAYLOAD


@pytest.mark.parametrize("version", [1, 2])
def test_unix_frontend_gives_the_socket_addresses(haproxy: Haproxy, version: int) -> None:
    """HAProxy cannot name a Unix client: v1 says UNKNOWN, v2 sends LOCAL (with TLVs)."""
    client, relayed = haproxy.relay(f"v{version}/unix", f"v{version}")
    with client, relayed:
        client.sendall(PAYLOAD)
        info = read(relayed, version, "blocking")
        assert not info.from_header
        assert (info.source, info.destination) == (relayed.getpeername(), relayed.getsockname())
        assert info.command == (Command.PROXY if version == 1 else Command.LOCAL)
        if version == 1:
            assert info.length == len(b"PROXY UNKNOWN\r\n")
        else:
            assert info.length > 16 and info.tlvs.crc32c is None  # its TLVs skipped unread
        assert rest_of(relayed, client) == PAYLOAD


@pytest.mark.skipif(HAPROXY is not None and OPENSSL is None,
                    reason="the openssl tool is needed to make certificates")
@pytest.mark.parametrize("family", FAMILIES)
def test_v2_from_haproxy_over_tls_carries_authority_alpn_and_ssl(haproxy: Haproxy,
                                                                 family: str) -> None:  # fmt: skip
    assert haproxy.certs is not None
    context = ssl.create_default_context(cafile=str(haproxy.certs / "server.crt"))
    context.load_cert_chain(str(haproxy.certs / "client.crt"), str(haproxy.certs / "client.key"))
    context.set_alpn_protocols(["h2"])
    sock_family, address = haproxy.frontends[f"tls/{family}"]
    raw = socket.socket(sock_family)
    raw.settimeout(TIMEOUT)
    raw.connect(address)
    tls = context.wrap_socket(raw, server_hostname="proxy.test")
    client, relayed = haproxy.relay(f"tls/{family}", "tls", client=tls)
    with client, relayed:
        client.sendall(PAYLOAD)
        info = read(relayed, 2, "blocking")
        (host, port, *_), _ = peer_of(client)
        if family == "dual":
            assert info.source == (f"::ffff:{host}", port, 0, 0)
        else:
            assert info.source == client.getsockname()
        t = info.tlvs
        assert t.authority == "proxy.test"
        assert t.alpn == b"h2" == client.selected_alpn_protocol().encode()  # type: ignore[union-attr]
        assert t.crc32c is not None
        assert t.ssl is not None and t.ssl.tls and t.ssl.cert_verified
        assert t.ssl.version == client.version()
        assert t.ssl.cipher == client.cipher()[0]  # type: ignore[index]
        assert t.ssl.cn == "client.test"
        assert (t.ssl.sig_alg, t.ssl.key_alg) == ("ecdsa-with-SHA256", "EC256")  # HAProxy's cert
        relayed.settimeout(TIMEOUT)
        data = bytearray()
        while len(data) < len(PAYLOAD) and (chunk := relayed.recv(65536)):
            data += chunk
        assert bytes(data) == PAYLOAD  # decrypted by HAProxy, after the header
