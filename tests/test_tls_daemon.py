"""TLS listeners in a real daemon: the workers run the handshake before the handler.

Certificates are made per test in ``tmp_path`` (``tests.tls_support``);
clients are real: Python's ``ssl`` module, ``openssl s_client`` and
``curl``.  The handlers (``tests.handlers.tls_info``) answer what they
were told about the connection and log ``test_handler_called`` each
time, so a refused connection is proven never to have reached one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import proxyproto_build as build
from tests.metrics_support import parse
from tests.support import ROOT, Daemon, poll_until, recv_all, start_daemon
from tests.tls_support import (
    DAY,
    NOW,
    Issued,
    Pki,
    client_context,
    client_hello,
    s_client,
    tcp_connect,
    tls_connect,
)

HANDLERS = "tests.handlers.tls_info"
FORMS = {
    "sync": ("sync", "sync"),
    "thread": ("sync", "thread"),
    "socketserver": ("RequestHandler", "thread"),
    "streams": ("streams", "asyncio"),
    "protocol": ("Protocol", "asyncio"),
}

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def server(pki: Pki) -> Issued:
    return pki.server("localhost")


def tls_args(cert: Issued, *more: str) -> tuple[str, ...]:
    return ("--tls-certfile", str(cert.certfile), "--tls-keyfile", str(cert.keyfile), *more)


def ask(daemon: Daemon, ctx: ssl.SSLContext, line: bytes = b"hello",
        server_hostname: str | None = "localhost") -> dict[str, Any]:  # fmt: skip
    with tls_connect(daemon.address, ctx, server_hostname) as tls:
        tls.sendall(line + b"\n")
        answer = recv_all(tls)
    assert answer, "the connection closed without an answer"
    result: dict[str, Any] = json.loads(answer)
    return result


def served_serial(daemon: Daemon, ctx: ssl.SSLContext) -> int:
    from cryptography import x509  # noqa: PLC0415

    with tls_connect(daemon.address, ctx) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def ctl(control: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "forkserver", "ctl", "--socket", str(control), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def handshakes(control: Path, listener: int = 0) -> dict[str, int]:
    out = ctl(control, "status", "--json")
    assert out.returncode == 0, out.stderr
    counts: dict[str, int] = json.loads(out.stdout)["master"]["listeners"][listener]["handshakes"]
    return counts


def wait_handshakes(control: Path, done: int, failed: dict[str, int] | None = None,
                    listener: int = 0) -> dict[str, int]:  # fmt: skip
    """``ctl status``'s counts once the workers reported at least *done* and *failed*."""
    seen: dict[str, int] = {}

    def reported() -> bool:
        nonlocal seen
        seen = handshakes(control, listener)
        return seen.get("done", 0) >= done and all(
            seen.get(reason, 0) >= n for reason, n in (failed or {}).items())

    poll_until(reported, f"{done} handshakes done and {failed} failed in ctl status")
    return seen


def handler_calls(daemon: Daemon) -> int:
    return len(daemon.records("test_handler_called"))




def run_daemon(handler: str, cert: Issued, tmp_path: Path, *more: str, workers: int = 1,
               worker_class: str = "sync") -> Any:  # fmt: skip
    """``start_daemon`` on a TLS listener with a control socket in *tmp_path*."""
    return start_daemon(handler, *tls_args(cert, "--worker-class", worker_class,
                                           "--control-socket", str(tmp_path / "ctl.sock"),
                                           *more), workers=workers)  # fmt: skip


# -- every handler form -----------------------------------------------------------


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_handler_form_gets_the_decrypted_connection_and_what_was_negotiated(
    form: str, pki: Pki, server: Issued, tmp_path: Path
) -> None:
    target, worker_class = FORMS[form]
    with run_daemon(f"{HANDLERS}:{target}", server, tmp_path, "--tls-alpn", "h2,http/1.1",
                    worker_class=worker_class) as daemon:  # fmt: skip
        seen = ask(daemon, client_context(pki.ca.certfile, alpn=["http/1.1"]))
        assert seen["form"] == form.replace("thread", "sync")
        assert seen["line"] == "hello" and seen["encrypted"] and seen["tls"]
        assert (seen["version"], seen["alpn"]) == ("TLSv1.3", "http/1.1")
        assert seen["cipher"].startswith("TLS_")
        assert seen["server_name"] == "localhost"
        assert seen["client_cn"] is None and seen["client"] is None
        # TLS 1.2, chosen by the client: negotiated and reported as such.
        old = ask(daemon, client_context(pki.ca.certfile, maximum=ssl.TLSVersion.TLSv1_2))
        assert old["version"] == "TLSv1.2" and old["alpn"] is None
        assert wait_handshakes(tmp_path / "ctl.sock", done=2) == {"done": 2}


# -- openssl s_client: versions, ALPN, SNI, client certificates ------------------------


@needs_openssl
def test_s_client_tls_1_2_and_1_3_succeed_and_1_0_and_1_1_are_refused(
    pki: Pki, server: Issued, tmp_path: Path
) -> None:
    ca = str(pki.ca.certfile)
    with run_daemon(f"{HANDLERS}:sync", server, tmp_path, "--tls-alpn", "http/1.1") as daemon:
        for flag, version in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
            result = s_client(daemon.address, flag, "-CAfile", ca, "-servername", "localhost",
                              "-alpn", "http/1.1", "-ign_eof", stdin=b"hi\n")  # fmt: skip
            assert f"Protocol  : {version}" in result.output or f", {version}," in result.output
            assert "Verify return code: 0 (ok)" in result.output
            assert "ALPN protocol: http/1.1" in result.output
            assert '"line": "hi"' in result.output
        for flag in ("-tls1", "-tls1_1"):
            refused = s_client(daemon.address, flag, "-CAfile", ca, "-cipher", "DEFAULT@SECLEVEL=0")
            assert refused.returncode != 0 and '"line"' not in refused.output
        counts = wait_handshakes(tmp_path / "ctl.sock", done=2, failed={"protocol_version": 2})
        assert counts == {"done": 2, "protocol_version": 2}
        daemon.stop()
        assert handler_calls(daemon) == 2
        logged = daemon.records("tls_handshake_failed")
        assert logged and logged[0]["reason"] == "protocol_version"
        assert logged[0]["level"] == "info"
        assert logged[0]["peer"].startswith("127.0.0.1:")
        assert len(logged) == 1  # rate-limited: one line per listener and reason per 10 s


def listener_table(tmp_path: Path, body: str) -> tuple[Path, socket.socket]:
    """A config file whose one listener is a socket of ours (``fd://``) with *body*."""
    sock = socket.create_server(("127.0.0.1", 0))
    conf = tmp_path / "forkserver.toml"
    conf.write_text(f'control_socket = "{tmp_path / "ctl.sock"}"\n'
                    f'[[listeners]]\nbind = "fd://{sock.fileno()}"\nname = "tls"\n{body}')
    return conf, sock


@needs_openssl
def test_sni_picks_the_certificate_for_the_name_and_the_default_otherwise(
    pki: Pki, server: Issued, tmp_path: Path
) -> None:
    api = pki.server("api.example.com", sans=("api.example.com",))
    wild = pki.server("wild.example.net", sans=("*.example.net",))
    conf, sock = listener_table(tmp_path, f"""\
tls_certfile = "{server.certfile}"
tls_keyfile = "{server.keyfile}"
[[listeners.tls_certificates]]
server_names = ["api.example.com"]
certfile = "{api.certfile}"
keyfile = "{api.keyfile}"
[[listeners.tls_certificates]]
server_names = ["*.example.net"]
certfile = "{wild.certfile}"
keyfile = "{wild.keyfile}"
""")
    with sock, start_daemon(f"{HANDLERS}:sync", "-c", str(conf), bind=False, workers=1,
                            extra_fds=[sock.fileno()]):  # fmt: skip
        address = sock.getsockname()
        for name, subject in (("api.example.com", "CN=api.example.com"),
                              ("a.example.net", "CN=wild.example.net"),
                              ("other.example.org", "CN=localhost")):  # fmt: skip
            result = s_client(address, "-servername", name, "-CAfile", str(pki.ca.certfile),
                              "-verify_hostname", name, "-ign_eof", stdin=b"x\n")  # fmt: skip
            assert f"subject={subject}" in result.output.replace(" = ", "="), result.output
            ok = "Verify return code: 0 (ok)" in result.output
            assert ok == (subject != "CN=localhost")  # the default's name is localhost
            assert f'"server_name": "{name}"' in result.output
        without = s_client(address, "-noservername", "-ign_eof", stdin=b"x\n")
        assert "subject=CN=localhost" in without.output.replace(" = ", "=")


@needs_openssl
@pytest.mark.parametrize("auth", ["required", "optional"])
def test_client_certificates_are_checked_against_tls_cafile(
    auth: str, pki: Pki, server: Issued, tmp_path: Path
) -> None:
    client = pki.issue("alice", client=True)
    stranger_ca = Pki(tmp_path, name="Other CA")
    stranger = stranger_ca.issue("mallory", client=True)
    ctl_sock = tmp_path / "ctl.sock"
    with run_daemon(f"{HANDLERS}:sync", server, tmp_path, "--tls-cafile", str(pki.ca.certfile),
                    "--tls-client-auth", auth) as daemon:  # fmt: skip
        seen = ask(daemon, client_context(pki.ca.certfile, cert=client))
        assert seen["client_cn"] == "alice"
        ca = str(pki.ca.certfile)
        with_cert = s_client(daemon.address, "-CAfile", ca, "-cert", str(client.certfile),
                             "-key", str(client.keyfile), "-ign_eof", stdin=b"x\n")  # fmt: skip
        assert '"client_cn": "alice"' in with_cert.output
        unknown = s_client(daemon.address, "-CAfile", ca, "-cert", str(stranger.certfile),
                           "-key", str(stranger.keyfile), "-ign_eof", stdin=b"x\n")  # fmt: skip
        assert '"line"' not in unknown.output
        none = s_client(daemon.address, "-CAfile", ca, "-ign_eof", stdin=b"x\n")
        if auth == "required":
            assert '"line"' not in none.output
            counts = wait_handshakes(ctl_sock, 2, {"unknown_ca": 1, "no_certificate": 1})
            assert counts == {"done": 2, "unknown_ca": 1, "no_certificate": 1}
        else:
            assert '"client_cn": null' in none.output
            counts = wait_handshakes(ctl_sock, 3, {"unknown_ca": 1})
            assert counts == {"done": 3, "unknown_ca": 1}
        daemon.stop()
        assert handler_calls(daemon) == (2 if auth == "required" else 3)


@needs_curl
@pytest.mark.parametrize("worker_class", ["sync", "asyncio"])
def test_curl_over_https_against_the_bundled_http_example(
    worker_class: str, pki: Pki, server: Issued, tmp_path: Path
) -> None:
    handler = ("forkserver.examples.hello_http:handle" if worker_class == "sync"
               else "forkserver.examples.hello_http:async_handle")  # fmt: skip
    with run_daemon(handler, server, tmp_path, worker_class=worker_class) as daemon:
        port = daemon.address[1]
        out = subprocess.run(["curl", "-sS", "--max-time", "20", "--cacert",
                              str(pki.ca.certfile), f"https://localhost:{port}/",
                              f"https://localhost:{port}/again"],
                             capture_output=True, timeout=30, check=False)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.count(b"Hello") == 2
        insecure = subprocess.run(["curl", "-sS", "--max-time", "20",
                                   f"https://localhost:{port}/"], capture_output=True,
                                  timeout=30, check=False)  # fmt: skip
        assert insecure.returncode != 0  # curl does not trust our test CA by itself
        wait_handshakes(tmp_path / "ctl.sock", done=1, failed={"unknown_ca": 1})


# -- bad input: refused cleanly, counted, never reaching the handler ---------------------


def refused(daemon: Daemon, data: bytes, *, shut: bool = True) -> bytes:
    """Send *data* (then EOF, with *shut*); what the daemon answered before closing
    (a close with our bytes unread is a reset: nothing was answered then)."""
    with tcp_connect(daemon.address) as sock:
        try:
            sock.sendall(data)
            if shut:
                sock.shutdown(socket.SHUT_WR)
            return recv_all(sock)
        except OSError:  # reset, or ENOTCONN: closed with our bytes unread
            return b""


def huge_client_hello() -> bytes:
    """A handshake record whose ClientHello claims far more than any real one."""
    body = b"\x01" + (1 << 20).to_bytes(3, "big") + b"\x03\x03" + b"\x00" * 16000
    return b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body


def tls_metrics(control_socket: Path) -> dict[str, float]:
    """``forkserver_tls_handshakes_total`` by result, from ``ctl metrics``."""
    text = subprocess.run([sys.executable, "-m", "forkserver", "ctl", "--socket",
                           str(control_socket), "metrics"], cwd=ROOT, capture_output=True,
                          text=True, timeout=20, check=True).stdout  # fmt: skip
    return {sample.labels["result"]: sample.value for sample in parse(text)
            if sample.name == "forkserver_tls_handshakes_total"}  # fmt: skip


@pytest.mark.parametrize("worker_class", ["sync", "asyncio"])
def test_bad_clients_are_refused_counted_and_never_reach_the_handler(
    worker_class: str, pki: Pki, server: Issued, tmp_path: Path
) -> None:
    handler = f"{HANDLERS}:{'sync' if worker_class == 'sync' else 'streams'}"
    hello = client_hello()
    with run_daemon(handler, server, tmp_path, worker_class=worker_class) as daemon:
        assert b"HTTP" not in refused(daemon, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        refused(daemon, b"\x00" * 64 + b"not TLS at all\n")
        truncated = refused(daemon, hello[: len(hello) // 2])  # then EOF
        assert truncated in (b"", b"\x15\x03\x03\x00\x02\x02\x32")  # at most decode_error
        assert refused(daemon, huge_client_hello(), shut=False)[:1] in (b"", b"\x15")
        expected = {"plaintext_http": 1, "not_tls": 1}
        poll_until(lambda: sum(handshakes(tmp_path / "ctl.sock").values()) >= 4,
                   "four failed handshakes in ctl status")  # fmt: skip
        counts = handshakes(tmp_path / "ctl.sock")
        rest = {reason: n for reason, n in counts.items() if reason not in expected}
        assert {k: counts.get(k) for k in expected} == expected, counts
        assert sum(rest.values()) == 2 and set(rest) <= {"eof", "malformed", "too_large"}, counts
        # The worker serves the next client as if nothing happened.
        assert ask(daemon, client_context(pki.ca.certfile))["line"] == "hello"
        poll_until(lambda: tls_metrics(tmp_path / "ctl.sock").get("done") == 1,
                   "the served handshake in the metrics")  # fmt: skip
        assert tls_metrics(tmp_path / "ctl.sock") == {**counts, "done": 1}
        daemon.stop()
        assert handler_calls(daemon) == 1
        reasons = {r["reason"] for r in daemon.records("tls_handshake_failed")}
        assert reasons >= set(expected)


def test_a_client_that_never_finishes_is_cut_at_the_timeout_and_the_sync_worker_goes_on(
    pki: Pki, server: Issued, tmp_path: Path
) -> None:
    """One sync worker: the stalled client holds it only until tls_handshake_timeout."""
    hello = client_hello()
    args = ("--tls-handshake-timeout", "1")
    with run_daemon(f"{HANDLERS}:sync", server, tmp_path, *args) as daemon, \
            tcp_connect(daemon.address) as stalled:  # fmt: skip
        stalled.sendall(hello[:40])  # and never the rest
        started = time.monotonic()
        # Queued behind it on the only worker: served once the stalled one is cut off.
        assert ask(daemon, client_context(pki.ca.certfile))["line"] == "hello"
        event = daemon.wait_log("tls_handshake_failed", reason="timeout")
        assert event["peer"] == "{}:{}".format(*stalled.getsockname())
        assert recv_all(stalled) == b""  # closed by the worker
        assert time.monotonic() - started >= 1.0  # not before the timeout
        counts = wait_handshakes(tmp_path / "ctl.sock", done=1, failed={"timeout": 1})
        assert counts == {"done": 1, "timeout": 1}


def test_an_asyncio_worker_goes_on_serving_while_a_handshake_stalls(
    pki: Pki, server: Issued, tmp_path: Path
) -> None:
    """The handshake runs on the loop: a stalled client blocks no other connection."""
    args = ("--tls-handshake-timeout", "600")
    with run_daemon(f"{HANDLERS}:streams", server, tmp_path, *args,
                    worker_class="asyncio") as daemon, \
            tcp_connect(daemon.address) as stalled:  # fmt: skip
        stalled.sendall(client_hello()[:40])
        for _ in range(3):
            assert ask(daemon, client_context(pki.ca.certfile))["tls"]
        assert wait_handshakes(tmp_path / "ctl.sock", done=3) == {"done": 3}


def test_proxy_header_then_tls_on_one_listener(pki: Pki, server: Issued, tmp_path: Path) -> None:
    header = build.v2(addresses=build.inet("203.0.113.7", "198.51.100.1", 40001, 443))
    args = ("--proxy-protocol", "v2", "--proxy-allow-from", "127.0.0.1")
    for handler, worker_class in (("sync", "sync"), ("streams", "asyncio")):
        with run_daemon(f"{HANDLERS}:{handler}", server, tmp_path, *args,
                        worker_class=worker_class) as daemon:  # fmt: skip
            sock = tcp_connect(daemon.address)
            sock.sendall(header)  # in clear text, before the ClientHello
            ctx = client_context(pki.ca.certfile)
            with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
                tls.sendall(b"behind\n")
                seen = json.loads(recv_all(tls))
            assert seen["client"] == ["203.0.113.7", 40001] and seen["tls"]
            assert seen["line"] == "behind"
            # A TLS client without the header is refused by the PROXY step.
            assert refused(daemon, client_hello()) == b""
            daemon.wait_log("proxy_refused")
            daemon.stop()
            assert handler_calls(daemon) == 1


def test_tls_on_a_shared_listener(pki: Pki, server: Issued, tmp_path: Path) -> None:
    for worker_class, handler in (("sync", "sync"), ("thread", "sync"), ("asyncio", "streams")):
        with run_daemon(f"{HANDLERS}:{handler}", server, tmp_path, "--dispatch", "shared",
                        worker_class=worker_class, workers=2) as daemon:  # fmt: skip
            for _ in range(4):
                assert ask(daemon, client_context(pki.ca.certfile))["tls"]
            assert refused(daemon, b"plain\n") == b""
            wait_handshakes(tmp_path / "ctl.sock", done=4, failed={"not_tls": 1})


def test_workers_on_a_tls_listener_dump_no_core(pki: Pki, server: Issued, tmp_path: Path) -> None:
    with run_daemon(f"{HANDLERS}:sync", server, tmp_path, workers=2) as daemon:
        for worker in daemon.workers():
            limits = Path(f"/proc/{worker.pid}/limits").read_text()
            line = next(row for row in limits.splitlines() if row.startswith("Max core file size"))
            assert line.split()[4:6] == ["0", "0"], line


# -- certificates checked before any fork, and on reload ---------------------------------


def start_fails(args: list[str], tmp_path: Path) -> tuple[int, str, str]:
    """``forkserver run`` and ``check-config`` with *args*: run's exit code, both stderrs."""
    base = [sys.executable, "-m", "forkserver"]
    env_args = ["--control-socket", str(tmp_path / "ctl.sock")]
    run = subprocess.run([*base, "run", "--bind", "127.0.0.1:0", "--workers", "1", *env_args,
                          *args, f"{HANDLERS}:sync"], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    check = subprocess.run([*base, "check-config", *env_args, *args, f"{HANDLERS}:sync"],
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert check.returncode == 78, check.stderr
    return run.returncode, run.stderr, check.stderr


def test_a_bad_certificate_or_key_stops_the_start_with_78_naming_it(
    pki: Pki, server: Issued, tmp_path: Path
) -> None:
    other = pki.server("other")
    expired = pki.server("old", not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    missing = tmp_path / "missing.pem"
    cases = [
        (["--tls-certfile", str(missing)], ["tls_certfile", str(missing), "does not exist"]),
        (["--tls-certfile", str(server.certfile), "--tls-keyfile", str(other.keyfile)],
         ["tls_keyfile", str(other.keyfile), "does not match"]),
        (["--tls-certfile", str(expired.certfile), "--tls-keyfile", str(expired.keyfile)],
         ["tls_certfile", str(expired.certfile), "expired"]),
    ]  # fmt: skip
    for args, words in cases:
        code, run_err, check_err = start_fails(args, tmp_path)
        assert code == 78, run_err
        for text in (run_err, check_err):
            assert "the default listener" in text or "listener '127.0.0.1:0'" in text, text
            for word in words:
                assert word in text, (word, text)
        assert "worker" not in run_err.split("cannot start", 1)[0]  # nothing was forked


def write_pair(issued: Issued, certfile: Path, keyfile: Path) -> None:
    """Put *issued* at the paths the daemon reads, each replaced in one rename."""
    for source, target in ((issued.keyfile, keyfile), (issued.certfile, certfile)):
        staged = target.with_suffix(".new")
        staged.write_bytes(source.read_bytes())
        staged.rename(target)


def reload_daemon(tmp_path: Path, cert: Issued, *more: str) -> Any:
    certfile, keyfile = tmp_path / "live.crt", tmp_path / "live.key"
    write_pair(cert, certfile, keyfile)
    conf = tmp_path / "forkserver.toml"
    conf.write_text(f'tls_certfile = "{certfile}"\ntls_keyfile = "{keyfile}"\n'
                    f'control_socket = "{tmp_path / "ctl.sock"}"\nworker_class = "sync"\n')
    return start_daemon(f"{HANDLERS}:sync", "-c", str(conf), *more, workers=2)


def test_a_reload_with_a_bad_certificate_fails_and_the_old_one_keeps_serving(
    pki: Pki, server: Issued, tmp_path: Path
) -> None:
    ctx = client_context(pki.ca.certfile)
    with reload_daemon(tmp_path, server) as daemon:
        before = served_serial(daemon, ctx)
        (tmp_path / "live.key").write_bytes(pki.server("stranger").keyfile.read_bytes())
        out = ctl(tmp_path / "ctl.sock", "reload")
        assert out.returncode == 1
        assert "tls_keyfile" in out.stdout + out.stderr
        assert "does not match" in out.stdout + out.stderr
        failed = daemon.wait_log("reload_failed")
        assert "tls_keyfile" in failed["reason"]
        assert served_serial(daemon, ctx) == before == server.cert.serial_number


class TlsLoad:
    """Clients that connect, handshake and ask once, in a loop, on threads.

    Bounded in count (*cap*) and time (*deadline*); ``stop()`` ends it and
    returns what each connection saw: (monotonic start, serial) or an error.
    """

    def __init__(self, address: tuple[str, int], ctx: ssl.SSLContext, *, threads: int = 4,
                 cap: int = 20000, deadline: float = 120.0) -> None:  # fmt: skip
        import threading  # noqa: PLC0415

        self.address, self.ctx, self.cap = address, ctx, cap
        self.ends = time.monotonic() + deadline
        self.done: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        from cryptography import x509  # noqa: PLC0415

        while not self.stopping.is_set() and time.monotonic() < self.ends:
            with self.lock:
                if len(self.done) + len(self.errors) >= self.cap:
                    return
            started = time.monotonic()
            try:
                with tls_connect(self.address, self.ctx) as tls:
                    der = tls.getpeercert(binary_form=True)
                    tls.sendall(b"load\n")
                    answer = recv_all(tls)
                assert der is not None and b'"line": "load"' in answer, answer
                serial = x509.load_der_x509_certificate(der).serial_number
                with self.lock:
                    self.done.append((started, serial))
            except (OSError, AssertionError) as exc:
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")

    def count_since(self, moment: float) -> int:
        with self.lock:
            return sum(1 for started, _ in self.done if started >= moment)

    def stop(self) -> tuple[list[tuple[float, int]], list[str]]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self.threads)
        return self.done, self.errors


def test_a_reload_under_load_swaps_the_certificate_with_no_failed_handshake(
    pki: Pki, server: Issued, tmp_path: Path
) -> None:
    renewed = pki.server("renewed", sans=("localhost",))  # its own files, the same name
    assert renewed.cert.serial_number != server.cert.serial_number
    with reload_daemon(tmp_path, server) as daemon:
        daemon.wait_log("master_ready")
        load = TlsLoad(daemon.address, client_context(pki.ca.certfile))
        try:
            poll_until(lambda: load.count_since(0) >= 50, "the load flowing before the reload")
            write_pair(renewed, tmp_path / "live.crt", tmp_path / "live.key")
            out = ctl(tmp_path / "ctl.sock", "reload")  # answers once the new generation serves
            assert out.returncode == 0, out.stdout + out.stderr
            daemon.wait_log("reload_completed", generation=1)
            ready = time.monotonic()
            poll_until(lambda: load.count_since(ready) >= 50, "connections after the reload")
        finally:
            done, errors = load.stop()
        assert errors == [], errors[:5]
        serials = {serial for _, serial in done}
        assert serials == {server.cert.serial_number, renewed.cert.serial_number}
        after = [serial for started, serial in done if started >= ready]
        assert after and set(after) == {renewed.cert.serial_number}
        counts = wait_handshakes(tmp_path / "ctl.sock", done=len(done))
        assert counts == {"done": counts["done"]}  # not one failed


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run workers as nobody")
def test_workers_as_nobody_serve_a_key_only_root_can_read(pki: Pki, server: Issued,
                                                          tmp_path: Path) -> None:  # fmt: skip
    key = tmp_path / "root-only.key"
    key.write_bytes(server.keyfile.read_bytes())
    key.chmod(0o600)  # root's alone; tmp_path itself is root's too
    args = ("--tls-certfile", str(server.certfile), "--tls-keyfile", str(key),
            "--user", "nobody", "--group", "nogroup", "--worker-class", "sync")  # fmt: skip
    with start_daemon("tests.handlers.tls_plain:handle", *args, workers=1) as daemon, \
            tls_connect(daemon.address, client_context(pki.ca.certfile)) as tls:  # fmt: skip
        tls.sendall(b"as nobody\n")
        assert recv_all(tls) == b"TLSv1.3 as nobody\n"
        worker = daemon.workers()[0]
        assert worker.uids().real == 65534  # nobody, who cannot open the key file


def test_a_unix_listener_serves_tls(pki: Pki, server: Issued, tmp_path: Path) -> None:
    path = tmp_path / "tls.sock"
    conf = tmp_path / "forkserver.toml"
    conf.write_text(f'[[listeners]]\nbind = "unix:{path}"\n'
                    f'tls_certfile = "{server.certfile}"\ntls_keyfile = "{server.keyfile}"\n')
    with start_daemon(f"{HANDLERS}:sync", "-c", str(conf), bind=False, workers=1) as daemon:
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(20)
            raw.connect(str(path))
            with client_context(pki.ca.certfile).wrap_socket(raw, server_hostname="localhost") \
                    as tls:  # fmt: skip
                tls.sendall(b"over unix\n")
                seen = json.loads(recv_all(tls))
        assert seen["tls"] and seen["line"] == "over unix"
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(20)
            raw.connect(str(path))
            with contextlib.suppress(OSError):  # a reset, with our bytes unread
                raw.sendall(b"plain\n")
                assert recv_all(raw)[:1] in (b"", b"\x15")  # an alert at most
        assert daemon.wait_log("tls_handshake_failed")["peer"] == "unix"


@pytest.mark.parametrize("target", ["streams", "Protocol"])
def test_uvloop_workers_run_the_handshake_too(target: str, pki: Pki, server: Issued,
                                              tmp_path: Path) -> None:  # fmt: skip
    pytest.importorskip("uvloop")
    with run_daemon(f"{HANDLERS}:{target}", server, tmp_path, "--event-loop", "uvloop",
                    worker_class="asyncio") as daemon:  # fmt: skip
        seen = ask(daemon, client_context(pki.ca.certfile, alpn=["h2"]))
        assert seen["tls"] and seen["version"] == "TLSv1.3" and seen["line"] == "hello"
        assert refused(daemon, b"GET / HTTP/1.0\r\n\r\n")[:4] != b"HTTP"
        counts = wait_handshakes(tmp_path / "ctl.sock", done=1, failed={"plaintext_http": 1})
        assert counts == {"done": 1, "plaintext_http": 1}
        text = ctl(tmp_path / "ctl.sock", "status").stdout
        assert "TLS handshakes: 1 done, 1 failed (plaintext_http 1)" in text
        daemon.stop()
        assert handler_calls(daemon) == 1


def test_a_reload_applies_a_listener_tables_own_tls_keys(pki: Pki, server: Issued,
                                                          tmp_path: Path) -> None:  # fmt: skip
    """The binds stay (a restart changes them); the table's TLS keys change with a reload."""
    other = pki.server("other", sans=("localhost",))
    conf, sock = listener_table(tmp_path, f'tls_certfile = "{server.certfile}"\n'
                                          f'tls_keyfile = "{server.keyfile}"\n')  # fmt: skip
    ctx = client_context(pki.ca.certfile)
    with sock, start_daemon(f"{HANDLERS}:sync", "-c", str(conf), bind=False, workers=1,
                            extra_fds=[sock.fileno()]) as daemon:  # fmt: skip
        address = sock.getsockname()
        with tls_connect(address, ctx) as tls:
            assert tls.getpeercert(binary_form=True) == server.der
        text = conf.read_text().replace(str(server.certfile), str(other.certfile))
        conf.write_text(text.replace(str(server.keyfile), str(other.keyfile)))
        out = ctl(tmp_path / "ctl.sock", "reload")
        assert out.returncode == 0, out.stdout + out.stderr
        with tls_connect(address, ctx) as tls:
            assert tls.getpeercert(binary_form=True) == other.der
        assert daemon.records("reload_listeners_kept") == []
