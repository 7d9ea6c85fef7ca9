"""forkserver's own unit files under a real systemd 252, in a container.

This machine's PID 1 is not systemd, so ``systemd-nspawn --boot`` runs a
real one in a Debian root built once by ``systemd_e2e/build_rootfs.sh``
(cached under /var/tmp).  The container shares the host's network, so
the test connects from the host to the port systemd binds inside; the
repository is bound read-only inside, so forkserver runs from source.

The cgroup rule: the service manager runs only inside its container, and
the host's ``/proc/1/cgroup`` must be the same after the test as before.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.loadgen import BackgroundLoad
from tests.support import exchange, poll_until

E2E = Path(__file__).resolve().parent / "systemd_e2e"
BOOT = E2E / "nspawn_boot.sh"
ROOTFS = Path(os.environ.get("FORKSERVER_E2E_ROOTFS", "/var/tmp/forkserver-e2e/rootfs"))
TIMEOUT = 60.0
WATCHDOG_SEC = 2

# The first run on a machine builds the container root (about 70 s, more
# from a slow mirror) inside the first test's set-up; every command after
# that has its own timeout.
pytestmark = [pytest.mark.systemd, pytest.mark.slow, pytest.mark.timeout(900)]


def nspawn_unavailable() -> str | None:
    """Why systemd-nspawn cannot run here, or None."""
    if os.geteuid() != 0:
        return "systemd-nspawn --boot needs root"
    for tool in ("systemd-nspawn", "unshare", "nsenter", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install systemd-container debootstrap)"
    if (
        not Path("/sys/fs/cgroup/systemd").is_dir()
        and not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    ):
        return "no cgroup hierarchy systemd can use under /sys/fs/cgroup"
    return None


def free_port() -> int:
    """A port to name in the .socket unit (systemd takes no port 0).

    Chosen below the kernel's ephemeral range, where no port-0 bind or
    outgoing connection of a parallel test can land, and checked free.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


@dataclass
class Container:
    state: Path
    port: int

    def run(self, *command: str, check: bool = True) -> str:
        result = subprocess.run(
            [str(BOOT), "exec", str(self.state), *command],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}\n"
                + self.journal()
            )
        return result.stdout.strip()

    def prop(self, name: str, unit: str = "forkserver.service") -> str:
        return self.run("systemctl", "show", "-P", name, unit)

    def main_pid(self) -> int:
        return int(self.prop("MainPID") or 0)

    def workers(self) -> set[int]:
        pid = self.main_pid()
        out = self.run("ps", "-o", "pid=", "--ppid", str(pid), check=False)
        return {int(line) for line in out.split()}

    def journal(self) -> str:
        out = subprocess.run(
            [str(BOOT), "exec", str(self.state), "journalctl", "--no-pager", "-n", "60",
             "-u", "forkserver.service", "-u", "forkserver.socket"],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
        return "--- journal ---\n" + out.stdout

    def wait_active(self, *, not_pid: int = 0) -> int:
        """Wait for the service to be active with a main pid other than *not_pid*."""

        def ready() -> bool:
            pid = self.main_pid()
            return pid not in (0, not_pid) and self.prop("ActiveState") == "active"

        poll_until(ready, "forkserver.service active", timeout=TIMEOUT)
        return self.main_pid()

    def ask(self, payload: bytes = b"ping\n") -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
            return exchange(sock, payload)


SERVICE_DROP_IN = f"""[Service]
Environment=PYTHONPATH=/opt/forkserver
WatchdogSec={WATCHDOG_SEC}
"""
CONFIG = 'handler = "forkserver.examples.echo:handle"\nworkers = 2\ngraceful_timeout = 10.0\n'


def install_units(box: Container) -> None:
    """Our unit files, as shipped, plus drop-ins for the port and the source tree."""
    etc = "/etc/systemd/system"
    script = f"""set -e
cp /opt/forkserver/systemd/forkserver.socket /opt/forkserver/systemd/forkserver.service {etc}/
mkdir -p {etc}/forkserver.socket.d {etc}/forkserver.service.d /etc/forkserver
cat > {etc}/forkserver.socket.d/e2e.conf <<'EOF'
[Socket]
ListenStream=
ListenStream=127.0.0.1:{box.port}
EOF
cat > {etc}/forkserver.service.d/e2e.conf <<'EOF'
{SERVICE_DROP_IN}EOF
cat > /etc/forkserver/forkserver.toml <<'EOF'
{CONFIG}EOF
systemctl daemon-reload
"""
    box.run("bash", "-c", script)


@pytest.fixture(scope="module")
def box() -> Iterator[Container]:
    reason = nspawn_unavailable()
    if reason:
        pytest.skip(f"systemd-nspawn cannot run here: {reason}")
    build = subprocess.run(
        [str(E2E / "build_rootfs.sh"), str(ROOTFS)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert build.returncode == 0, f"building the container root failed:\n{build.stderr[-3000:]}"
    cgroups_before = Path("/proc/1/cgroup").read_text(), Path("/proc/self/cgroup").read_text()
    state = Path(tempfile.mkdtemp(prefix="fse2e-", dir="/var/tmp"))
    container = Container(state, free_port())
    try:
        start = subprocess.run(
            [str(BOOT), "start", str(state)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert start.returncode == 0, f"the container did not boot:\n{start.stdout}{start.stderr}"
        install_units(container)
        yield container
    finally:
        stop = subprocess.run(
            [str(BOOT), "stop", str(state)], capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        shutil.rmtree(state, ignore_errors=True)
        after = Path("/proc/1/cgroup").read_text(), Path("/proc/self/cgroup").read_text()
        assert after == cgroups_before, f"the host's cgroups changed:\n{after}"
        assert stop.returncode == 0, stop.stderr


def fresh_socket(box: Container) -> None:
    """The socket listening, the service stopped and forgotten."""
    box.run("systemctl", "stop", "forkserver.service")
    box.run("systemctl", "reset-failed", "forkserver.service", check=False)
    box.run("systemctl", "start", "forkserver.socket")


def ensure_running(box: Container) -> int:
    if box.prop("ActiveState") != "active":
        fresh_socket(box)
        box.run("systemctl", "start", "forkserver.service")
    return box.wait_active()


def test_first_connection_activates_and_ready_makes_it_active(box: Container) -> None:
    fresh_socket(box)
    assert box.prop("ActiveState", "forkserver.socket") == "active"
    assert box.prop("ActiveState") == "inactive", "started before any connection"
    assert box.ask(b"activate me") == b"activate me"
    pid = box.wait_active()
    assert box.prop("Type") == "notify"
    status = box.prop("StatusText")
    assert f"127.0.0.1:{box.port}" in status, status
    # READY=1's own line, or the periodic summary that follows it
    assert "2 of 2 workers ready" in status or "2 ready/2" in status, status
    assert len(box.workers()) == 2
    # Only the master may notify (NotifyAccess=main) and it is the main pid.
    assert box.prop("NotifyAccess") == "main"
    assert box.prop("MainPID") == str(pid)


def test_reload_fails_no_request_and_replaces_the_workers(box: Container) -> None:
    pid = ensure_running(box)
    old_workers = box.workers()
    with BackgroundLoad("127.0.0.1", box.port, total=1500, concurrency=8, deadline=60) as load:
        load.wait_answered(50)
        box.run("systemctl", "reload", "forkserver.service")
        # systemd 252 returns once ExecReload (kill -HUP) exits: wait for
        # the new generation, whose workers are not the old ones.
        try:
            poll_until(
                lambda: bool(box.workers()) and not (box.workers() & old_workers),
                "a new generation of workers after systemctl reload",
                timeout=20,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{box.journal()}") from None
        assert load.running(), "the load ended before the reload did: it proves nothing"
        result = load.join()
    assert result.failures == [], result.failure_summary()
    assert box.main_pid() == pid, "a reload keeps the master"
    assert box.prop("ActiveState") == "active"


def test_restart_loses_no_connection(box: Container) -> None:
    pid = ensure_running(box)
    with BackgroundLoad("127.0.0.1", box.port, total=3000, concurrency=8, deadline=90) as load:
        load.wait_answered(50)
        box.run("systemctl", "restart", "forkserver.service")
        assert load.running(), "the load ended before the restart did: it proves nothing"
        result = load.join()
    assert result.failures == [], result.failure_summary()
    assert box.wait_active(not_pid=pid) != pid


def test_watchdog_restarts_a_wedged_master(box: Container) -> None:
    pid = ensure_running(box)
    restarts = int(box.prop("NRestarts"))
    assert box.prop("WatchdogUSec") == f"{WATCHDOG_SEC}s"
    box.run("kill", "-STOP", str(pid))
    new_pid = box.wait_active(not_pid=pid)
    assert int(box.prop("NRestarts")) == restarts + 1
    journal = box.journal()
    assert "Watchdog timeout" in journal, journal
    assert box.ask(b"after the watchdog") == b"after the watchdog"
    assert box.main_pid() == new_pid


def test_stop_leaves_the_socket_to_systemd_then_closes_it(box: Container) -> None:
    ensure_running(box)
    box.run("systemctl", "stop", "forkserver.service")
    assert box.prop("ActiveState") == "inactive"
    assert box.prop("Result") == "success", box.journal()
    # The socket is systemd's: still listening, and a client starts the service again.
    assert box.ask(b"again") == b"again"
    box.wait_active()
    box.run("systemctl", "stop", "forkserver.socket", "forkserver.service")
    assert box.prop("ActiveState", "forkserver.socket") == "inactive"
    with pytest.raises(ConnectionRefusedError):
        box.ask(b"nobody")
    # Nothing of the service is left running: no master, no worker.
    assert box.prop("MainPID") == "0"
    assert box.run("pgrep", "-f", "forkserver: ", check=False) == ""


INSTANCE_CLIENT = """
import socket, sys
with socket.socket(socket.AF_UNIX) as sock:
    sock.settimeout(30)
    sock.connect(sys.argv[1])
    sock.sendall(b"to the api instance")
    sock.shutdown(socket.SHUT_WR)
    print(sock.recv(100).decode())
"""


def test_a_template_instance_reads_its_own_config(box: Container) -> None:
    etc = "/etc/systemd/system"
    script = f"""set -e
cp /opt/forkserver/systemd/forkserver@.socket /opt/forkserver/systemd/forkserver@.service {etc}/
mkdir -p {etc}/forkserver@.service.d
printf '[Service]\\nEnvironment=PYTHONPATH=/opt/forkserver\\n' \\
    > {etc}/forkserver@.service.d/e2e.conf
printf 'handler = "forkserver.examples.echo:handle"\\nworkers = 1\\n' > /etc/forkserver/api.toml
systemctl daemon-reload
systemctl start forkserver@api.socket
"""
    box.run("bash", "-c", script)
    try:
        assert box.prop("ActiveState", "forkserver@api.service") == "inactive"
        reply = box.run("python3", "-c", INSTANCE_CLIENT, "/run/forkserver-api.sock")
        assert reply == "to the api instance"
        assert box.prop("ActiveState", "forkserver@api.service") == "active"
        pid = box.prop("MainPID", "forkserver@api.service")
        title = box.run("ps", "-o", "args=", "-p", pid)
        assert title.startswith("forkserver: master [api]"), title
    finally:
        box.run("systemctl", "stop", "forkserver@api.socket", "forkserver@api.service")


def test_a_configuration_error_is_reported_and_not_restarted(box: Container) -> None:
    fresh_socket(box)
    bad = 'handler = "no.such.module:handle"\nworkers = 2\n'
    box.run("bash", "-c", f"cat > /etc/forkserver/forkserver.toml <<'EOF'\n{bad}EOF")
    try:
        result = subprocess.run(
            [str(BOOT), "exec", str(box.state), "systemctl", "start", "forkserver.service"],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
        assert result.returncode != 0, "a service that cannot load its handler started"
        assert box.prop("ExecMainStatus") == "78", box.journal()
        assert box.prop("ActiveState") == "failed"
        assert box.prop("NRestarts") == "0", "RestartPreventExitStatus=78 was not honoured"
        # ERRNO= and STATUS= reached systemd before the exit.
        assert box.prop("StatusErrno") != "0"
        assert "no.such.module" in box.prop("StatusText")
    finally:
        box.run("bash", "-c", f"cat > /etc/forkserver/forkserver.toml <<'EOF'\n{CONFIG}EOF")
        box.run("systemctl", "reset-failed", "forkserver.service", check=False)
