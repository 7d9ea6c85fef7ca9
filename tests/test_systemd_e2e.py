"""forkserver's own unit files under a real systemd 252, in a container.

This machine's PID 1 is not systemd, so ``systemd-nspawn --boot`` runs a
real one in a Debian root built once by ``systemd_e2e/build_rootfs.sh``
(cached under /var/tmp).  The container shares the host's network, so
the test connects from the host to the port systemd binds inside.

forkserver is installed inside by running systemd/README.md's own install
commands: a virtualenv in /opt/forkserver made from a copy of this source
tree in /usr/local/src/forkserver (its pip fetches the dependencies from
PyPI), then the shipped units as written.  The test adds only drop-ins:
the port, and a shorter watchdog.  Commands inside run as from a root
shell there (``SHELL_ENV``): none of the test session's variables.

The cgroup rule: the service manager runs only inside its container, and
the host's ``/proc/1/cgroup`` must be the same after the test as before.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.loadgen import BackgroundLoad
from tests.support import exchange, poll_until

E2E = Path(__file__).resolve().parent / "systemd_e2e"
UNITS_README = E2E.parent.parent / "systemd" / "README.md"
BOOT = E2E / "nspawn_boot.sh"
ROOTFS = Path(os.environ.get("FORKSERVER_E2E_ROOTFS", "/var/tmp/forkserver-e2e/rootfs"))
TIMEOUT = 60.0
WATCHDOG_SEC = 2

# The first run on a machine builds the container root (about two minutes,
# more from a slow mirror) inside the first test's set-up; every command
# after that has its own timeout.
pytestmark = [pytest.mark.systemd, pytest.mark.slow, pytest.mark.timeout(900)]

#: A root shell inside the container: none of the test session's variables
#: (its RUNTIME_DIRECTORY above all), and the XDG_RUNTIME_DIR a root login has.
SHELL_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "XDG_RUNTIME_DIR": "/run/user/0",
}


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

    def execute(self, *command: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BOOT), "exec", str(self.state), *command],
            capture_output=True, text=True, timeout=timeout, check=False, env=SHELL_ENV,
        )  # fmt: skip

    def run(self, *command: str, check: bool = True, timeout: float = TIMEOUT) -> str:
        result = self.execute(*command, timeout=timeout)
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

    def journal(self, *units: str) -> str:
        names = units or ("forkserver.service", "forkserver.socket")
        options = [option for unit in names for option in ("-u", unit)]
        out = self.execute("journalctl", "--no-pager", "-n", "80", *options)
        return "--- journal ---\n" + out.stdout

    def ctl_status(self, *flags: str) -> dict[str, Any]:
        """``forkserver ctl status --json`` from a root shell: no socket named."""
        result: dict[str, Any] = json.loads(self.run("forkserver", "ctl", *flags, "status",
                                                     "--json"))  # fmt: skip
        return result

    def write_config(self, text: str) -> None:
        self.run("bash", "-c", f"cat > /etc/forkserver/forkserver.toml <<'END'\n{text}END")

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
WatchdogSec={WATCHDOG_SEC}
"""
CONFIG = 'handler = "forkserver.examples.echo:handle"\nworkers = 2\ngraceful_timeout = 10.0\n'
#: What a clone would not bring: files that builds and test runs leave.
NOT_SOURCE = ("./.venv", "./.git", "*.egg-info", "__pycache__", "./build", ".mypy_cache",
              ".ruff_cache", ".pytest_cache", ".hypothesis", "./tests/bench/results",
              "./tests/bench/.work")  # fmt: skip


def readme_install_blocks() -> list[str]:
    """The shell blocks of systemd/README.md's Install section, in order:
    the plain pair, then an instance of the template pair."""
    section = UNITS_README.read_text().split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.+?)\n```", section, re.DOTALL)
    assert len(blocks) == 2, "systemd/README.md's install steps changed: update this test"
    return blocks


def install_as_the_readme_says(box: Container) -> None:
    """The source in /usr/local/src/forkserver and the test's drop-ins (written
    first: the README's steps enable the socket, which must not take port
    8000 of the host's network), then the README's own commands."""
    etc = "/etc/systemd/system"
    excludes = " ".join(f"--exclude='{pattern}'" for pattern in NOT_SOURCE)
    prepare = f"""set -e
mkdir -p /usr/local/src/forkserver {etc}/forkserver.socket.d {etc}/forkserver.service.d
tar -C /media/forkserver-source {excludes} -cf - . | tar -C /usr/local/src/forkserver -xf -
printf '[Socket]\\nListenStream=\\nListenStream=127.0.0.1:{box.port}\\n' \\
    > {etc}/forkserver.socket.d/e2e.conf
printf '{SERVICE_DROP_IN.replace(chr(10), chr(92) + "n")}' > {etc}/forkserver.service.d/e2e.conf
"""
    box.run("bash", "-c", prepare)
    box.run("bash", "-euxc", readme_install_blocks()[0], timeout=600)  # pip reaches PyPI
    box.write_config(CONFIG)


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
        install_as_the_readme_says(container)
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


def test_the_readme_install_runs_the_shipped_units_from_the_venv(box: Container) -> None:
    assert box.run("/opt/forkserver/bin/forkserver", "--version").startswith("forkserver ")
    for unit in ("forkserver.service", "forkserver.socket"):
        shipped = (UNITS_README.parent / unit).read_text()
        assert box.run("cat", f"/etc/systemd/system/{unit}") == shipped.strip()
    assert box.prop("UnitFileState", "forkserver.socket") == "enabled"
    assert box.prop("ExecStart").count("path=/opt/forkserver/bin/forkserver ") == 1
    # Nothing of forkserver outside the virtualenv and the source copy.
    found = box.run("python3", "-c", "import importlib.util as u; "
                    "print(u.find_spec('forkserver'))")  # fmt: skip
    assert found == "None", found


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


def test_ctl_status_from_a_root_shell_needs_no_flags(box: Container) -> None:
    pid = ensure_running(box)
    status = box.ctl_status()
    assert status["master"]["pid"] == pid
    assert {w["pid"] for w in status["workers"]} == box.workers()
    table = box.run("forkserver", "ctl", "status")
    assert f"master pid {pid} " in table, table
    # The socket is the one the unit's RuntimeDirectory= holds.
    assert box.run("stat", "-c", "%F", "/run/forkserver/control.sock") == "socket"


#: An application installed into the virtualenv, as the README advises: the
#: echo handler, whose workers (not the master's import check) wait at import
#: while the gate's listener is there, so the test decides when a reload's
#: new generation can be ready.  Closing the listener opens the gate.
GATED_APP = """
import os
import socket

import setproctitle

from forkserver.examples.echo import handle

GATE = "/run/e2e-gate/gate.sock"
if setproctitle.getproctitle().startswith("forkserver: worker") and os.path.exists(GATE):
    with socket.socket(socket.AF_UNIX) as waiting:
        waiting.settimeout(60)
        try:
            waiting.connect(GATE)
            waiting.recv(1)
        except OSError:
            pass
"""
GATE_LISTENER = (
    "import os, socket, time; s = socket.socket(socket.AF_UNIX); "
    "s.bind('/run/e2e-gate/gate.sock'); os.chmod('/run/e2e-gate/gate.sock', 0o777); "
    "s.listen(16); time.sleep(300)"  # sleep-ok: holds the gate until the test stops its unit
)


def test_reload_waits_for_the_new_generation_and_loses_no_request(box: Container) -> None:
    pid = ensure_running(box)
    before = box.ctl_status()["master"]["generation"]
    old_workers = box.workers()
    site = box.run("/opt/forkserver/bin/python", "-c", "import sysconfig; "
                   "print(sysconfig.get_path('purelib'))")  # fmt: skip
    box.run("bash", "-c", f"cat > {site}/e2e_gated.py <<'END'\n{GATED_APP}END")
    box.write_config(CONFIG.replace("forkserver.examples.echo:handle", "e2e_gated:handle"))
    box.run("systemd-run", "--unit=e2e-gate", "--property=RuntimeDirectory=e2e-gate",
            "python3", "-c", GATE_LISTENER)  # fmt: skip
    try:
        poll_until(lambda: box.execute("test", "-S", "/run/e2e-gate/gate.sock").returncode == 0,
                   "the gate listening")  # fmt: skip
        reload = subprocess.Popen(
            [str(BOOT), "exec", str(box.state), "systemctl", "reload", "forkserver.service"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SHELL_ENV,
        )  # fmt: skip
        try:
            poll_until(lambda: len(box.workers() - old_workers) == 2,
                       "the new generation's workers, held at import")  # fmt: skip
            # They cannot be ready: systemctl reload must still be waiting.
            assert reload.poll() is None, "systemctl reload returned before the new " \
                                          "generation was ready"
            assert box.ctl_status()["master"]["generation"] == before
            with BackgroundLoad("127.0.0.1", box.port, total=None,
                                concurrency=8) as load:  # until stopped
                load.wait_answered(50)
                box.run("systemctl", "stop", "e2e-gate")             # open the gate
                _, err = reload.communicate(timeout=TIMEOUT)
                assert reload.returncode == 0, err + box.journal()
                # systemctl returned: the new generation serves, with no waiting here.
                status = box.ctl_status()
                load.wait_answered(load.answered + 50)  # the new generation serves it
                result = load.stop()  # fails if the load ended before the reload did
        finally:
            if reload.poll() is None:
                reload.kill()
                reload.communicate(timeout=TIMEOUT)
        assert status["master"]["generation"] == before + 1, box.journal()
        serving = {w["pid"] for w in status["workers"]
                   if w["generation"] == before + 1 and w["state"] == "ready"}  # fmt: skip
        assert len(serving) == 2 and not serving & old_workers, status
    finally:
        box.run("systemctl", "stop", "e2e-gate", check=False)
        box.write_config(CONFIG)
    assert result.failures == [], result.failure_summary()
    assert result.answered == result.attempted
    assert box.main_pid() == pid, "a reload keeps the master"
    assert box.prop("ActiveState") == "active"


def test_reload_of_a_broken_config_fails_and_the_service_keeps_serving(box: Container) -> None:
    pid = ensure_running(box)
    workers = box.workers()
    generation = box.ctl_status()["master"]["generation"]
    box.write_config('handler = "forkserver.examples.echo:handle"\nworkers = "many"\n')
    try:
        result = box.execute("systemctl", "reload", "forkserver.service")
        assert result.returncode != 0, "systemctl reload said it reloaded a broken config"
        assert box.prop("ActiveState") == "active"
        assert box.main_pid() == pid
        assert box.workers() == workers
        assert box.ask(b"still here") == b"still here"
        assert box.ctl_status()["master"]["generation"] == generation
        journal = box.journal()
        assert "Reload failed for forkserver.service" in journal, journal
        assert ("reload failed: /etc/forkserver/forkserver.toml:2, key 'workers'"
                in journal), journal  # fmt: skip
    finally:
        box.write_config(CONFIG)
    box.run("systemctl", "reload", "forkserver.service")      # fixed: it reloads again
    assert box.ctl_status()["master"]["generation"] == generation + 1


def test_restart_loses_no_connection(box: Container) -> None:
    pid = ensure_running(box)
    with BackgroundLoad("127.0.0.1", box.port, total=None, concurrency=8) as load:  # until stopped
        load.wait_answered(50)
        box.run("systemctl", "restart", "forkserver.service")  # returns once it is active again
        load.wait_answered(load.answered + 50)  # the new master serves it
        result = load.stop()  # fails if the load ended before the restart did
    assert result.failures == [], result.failure_summary()
    assert result.answered == result.attempted
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
    box.run("bash", "-euxc", readme_install_blocks()[1])      # as the README says
    unit = "forkserver@api.service"
    try:
        assert box.prop("ActiveState", unit) == "inactive"
        reply = box.run("python3", "-c", INSTANCE_CLIENT, "/run/forkserver-api.sock")
        assert reply == "to the api instance"
        assert box.prop("ActiveState", unit) == "active"
        pid = int(box.prop("MainPID", unit))
        title = box.run("ps", "-o", "args=", "-p", str(pid))
        assert title.startswith("forkserver: master [api]"), title
        # Its control socket: `ctl --name api` from a root shell, and its reload.
        status = box.ctl_status("--name", "api")
        assert (status["master"]["pid"], status["master"]["name"]) == (pid, "api")
        box.run("systemctl", "reload", unit)
        assert box.ctl_status("--name", "api")["master"]["generation"] == 1
    finally:
        box.run("systemctl", "stop", "forkserver@api.socket", unit)


def test_a_configuration_error_is_reported_and_not_restarted(box: Container) -> None:
    fresh_socket(box)
    box.write_config('handler = "no.such.module:handle"\nworkers = 2\n')
    try:
        result = box.execute("systemctl", "start", "forkserver.service")
        assert result.returncode != 0, "a service that cannot load its handler started"
        assert box.prop("ExecMainStatus") == "78", box.journal()
        assert box.prop("ActiveState") == "failed"
        assert box.prop("NRestarts") == "0", "RestartPreventExitStatus=78 was not honoured"
        # ERRNO= and STATUS= reached systemd before the exit.
        assert box.prop("StatusErrno") != "0"
        assert "no.such.module" in box.prop("StatusText")
    finally:
        box.write_config(CONFIG)
        box.run("systemctl", "reset-failed", "forkserver.service", check=False)
