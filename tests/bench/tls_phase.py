"""The bench's ``tls`` phase: TLS handshakes and TLS keep-alive, forkserver beside nginx.

One certificate (ECDSA P-256, self-signed, made here with
``cryptography``) is served by every server in the same run: forkserver
with sync workers (``forkserver.examples.hello_http:handle``) and with
asyncio workers (``async_handle``), both on a TLS listener, and nginx
(``listen ... ssl``, the same trivial answer, TLS 1.3 session tickets on
and no session cache, as the ``ssl`` module's defaults give forkserver).
For each server and round, three runs:

* ``full``: ``openssl s_time -new``, one client making full handshakes
  one after another (no resumption): the rate is bound by that one
  client's latency; the figure to read is the server tree's CPU per full
  handshake;
* ``resumed``: wrk with ``Connection: close``, every request a new TCP
  connection; wrk 4.1 resumes with the server's TLS 1.3 tickets (PSK
  with an X25519 key share: no certificate signature), so these are
  resumed handshakes per second;
* ``keepalive``: wrk's requests over established TLS connections.

The rows give the median of the rounds and the ratios to nginx in the
same mode.  What was negotiated (``openssl s_client -brief`` before the
runs: protocol, cipher, key exchange group, signature type) is in each
row: TLS 1.3, TLS_AES_256_GCM_SHA384, X25519, ECDSA with the P-256 key.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.bench import launch, procstat, wrk

NGINX_TLS = """\
worker_processes {workers};
daemon off;
master_process on;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    keepalive_requests 1000000;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    # As forkserver (the ssl module's defaults): TLS 1.3 tickets, no server-side cache.
    ssl_session_cache off;
    ssl_session_tickets on;
    server {{
        listen 127.0.0.1:{port} ssl backlog=2048;
        location / {{
            return 200 "Hello, world\\n";
        }}
    }}
}}
"""


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1: (certfile, keyfile)."""
    from cryptography import x509  # noqa: PLC0415 (a test extra)
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    certfile, keyfile = directory / "bench.crt", directory / "bench.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    keyfile.chmod(0o600)
    return certfile, keyfile


def nginx_tls(certfile: Path, keyfile: Path) -> launch.Builder:
    def build(fd: int, port: int, workers: int, scratch: Path) -> launch.Launch:
        conf = scratch / "nginx-tls.conf"
        conf.write_text(NGINX_TLS.format(port=port, workers=workers, work=scratch,
                                         cert=certfile, key=keyfile))  # fmt: skip
        return launch.Launch(["nginx", "-p", str(scratch), "-c", str(conf)],
                             env={"NGINX": f"{fd};"}, stop_signal=signal.SIGQUIT)  # fmt: skip
    return build


def https_ok(port: int, timeout: float) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw) as tls:  # fmt: skip
        tls.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(4096):
            data += chunk
    return data.startswith(b"HTTP/1.1 200")


def negotiated(port: int) -> str:
    """What ``openssl s_client`` negotiates with the server: protocol, cipher, key exchange."""
    done = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                           "-brief"], input="", capture_output=True, text=True, timeout=20,
                          check=False)  # fmt: skip
    text = done.stdout + done.stderr
    found = {key: m.group(1).strip() for key in ("Protocol version", "Ciphersuite",
                                                   "Server Temp Key", "Signature type")
             if (m := re.search(rf"{key}: (.*)", text))}  # fmt: skip
    return "; ".join(f"{v}" for v in found.values()) or "unknown"


def servers(certfile: Path, keyfile: Path) -> dict[str, launch.Builder]:
    tls = ("--tls-certfile", str(certfile), "--tls-keyfile", str(keyfile))
    return {
        "fs-sync-tls": launch.forkserver("sync", launch.HELLO, *tls),
        "fs-asyncio-tls": launch.forkserver("asyncio", launch.HELLO_ASYNC, *launch.ROOMY, *tls),
        "nginx-tls": nginx_tls(certfile, keyfile),
    }


def s_time_new(port: int, seconds: float) -> tuple[int, float]:
    """``openssl s_time -new``: full handshakes one after another; (count, wall seconds)."""
    done = subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
                           "-time", f"{seconds:g}", "-www", "/"], capture_output=True,
                          text=True, timeout=seconds + 30, check=False)  # fmt: skip
    found = re.search(r"(\d+) connections in (\d+) real seconds", done.stdout)
    if done.returncode != 0 or found is None:
        raise wrk.WrkError(f"openssl s_time failed: {done.stdout[-300:]} {done.stderr[-300:]}")
    return int(found.group(1)), float(found.group(2))


MODES = {
    "full": "full handshakes/s (openssl s_time -new, one client)",
    "resumed": "new connections/s, resumed (wrk, Connection: close)",
    "keepalive": "keep-alive req/s (wrk)",
}


def tls_phase(rows: list[dict[str, Any]], args: Any) -> None:
    """Append one row per server and mode (medians over ``args.rounds``)."""
    certfile, keyfile = make_certificate(launch.WORK / "tls")
    measured: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    handshake = {}
    for name, builder in servers(certfile, keyfile).items():
        if name.startswith("nginx") and not shutil.which("nginx"):
            print("  skipping nginx-tls: nginx is not installed", file=sys.stderr)
            continue
        with launch.Server(name, builder, workers=args.workers) as server:
            server.wait_ready(probe=https_ok)
            handshake[name] = negotiated(server.port)
            url = f"https://127.0.0.1:{server.port}/"
            for round_no in range(args.rounds):
                for mode in MODES:
                    before = procstat.cpu_snapshot(server.pid)
                    if mode == "full":
                        count, wall = s_time_new(server.port, args.seconds)
                        rate, errors = count / wall, 0
                    else:
                        result = wrk.run(url, connections=args.connections,
                                         seconds=args.seconds, close=mode == "resumed")  # fmt: skip
                        count, rate, errors = result.requests, result.rps, result.errors
                    cpu = procstat.cpu_delta(before, procstat.cpu_snapshot(server.pid)).total
                    each = cpu / max(1, count)
                    measured.setdefault((name, mode), []).append((rate, each, errors))
                    print(f"  {name} {mode} round {round_no}: {rate:.0f}/s, "
                          f"{each * 1e6:.0f} µs server CPU each, {errors} errors", flush=True)
    for mode, what in MODES.items():
        base = measured.get(("nginx-tls", mode))
        base_rate = statistics.median(r for r, _, _ in base) if base else None
        base_cpu = statistics.median(c for _, c, _ in base) if base else None
        for (name, row_mode), samples in measured.items():
            if row_mode != mode:
                continue
            rate = statistics.median(r for r, _, _ in samples)
            cpu = statistics.median(c for _, c, _ in samples)
            rows.append({
                "server": name, "mode": mode, "what": what, "per second": round(rate),
                "server CPU µs each": round(cpu * 1e6),
                "rate vs nginx": round(rate / base_rate, 3) if base_rate else "",
                "CPU vs nginx": round(cpu / base_cpu, 2) if base_cpu else "",
                "errors": sum(e for _, _, e in samples), "handshake": handshake[name],
            })  # fmt: skip
