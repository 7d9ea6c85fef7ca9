"""The unit files in systemd/: strictly valid, hardened, and saying what we promise.

``systemd-analyze verify`` exits 0 on unknown keys and unparsable
values (it only prints "... ignoring"), so any output at all fails here.
``systemd-analyze security --offline=yes`` scores a unit without a
running manager; ``--threshold`` takes ten times the printed score.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from forkserver.config import Settings

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
#: Where systemd/README.md installs forkserver and its source.
VENV = "/opt/forkserver"
SOURCE = "/usr/local/src/forkserver"
SERVICES = ["forkserver.service", "forkserver@.service"]
SOCKETS = ["forkserver.socket", "forkserver@.socket"]
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.systemd


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not installed (apt-get install systemd)")
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def settings(unit: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order, repeats kept."""
    found, section = [], ""
    for raw in (UNITS / unit).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def value(unit: str, key: str) -> str:
    values = [v for _, k, v in settings(unit) if k == key]
    assert values, f"{unit} sets no {key}="
    return values[-1]


def strict_verify(*paths: Path) -> str:
    result = analyze("verify", "--man=no", *map(str, paths))
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else " (rc)")


def installed_copy(names: list[str], where: Path) -> list[Path]:
    """The units as they would be verified after the README's install.

    verify checks that each command is executable, and the virtualenv the
    units run from (VENV) is not installed here: the copies name an
    executable file at the same path under *where* instead.  Nothing else
    in them changes."""
    venv = where / VENV.lstrip("/")
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    program = venv / "bin" / "forkserver"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    copies = []
    for name in names:
        copy = where / name
        copy.write_text((UNITS / name).read_text().replace(VENV + "/", str(venv) + "/"))
        copies.append(copy)
    return copies


@pytest.mark.parametrize("pair", [SOCKETS[:1] + SERVICES[:1], SOCKETS[1:] + SERVICES[1:]])
def test_units_verify_without_a_single_warning(pair: list[str], tmp_path: Path) -> None:
    assert strict_verify(*installed_copy(pair, tmp_path)) == ""


def test_the_strict_check_catches_an_unknown_key(tmp_path: Path) -> None:
    """Plain verify would pass this file; ours must not."""
    installed_copy(["forkserver.socket", "forkserver.service"], tmp_path)
    broken = tmp_path / "forkserver.socket"
    broken.write_text(broken.read_text().replace("Accept=no", "Accept=no\nNonBlocking=yes"))
    assert "Unknown key 'NonBlocking' in section [Socket]" in strict_verify(
        broken, tmp_path / "forkserver.service"
    )


@pytest.mark.parametrize("service", SERVICES)
def test_security_exposure_is_at_most_two(service: str, tmp_path: Path) -> None:
    # An instance name makes the template a loadable unit.
    unit = tmp_path / service.replace("@.", "@demo.")
    shutil.copy(UNITS / service, unit)
    result = analyze("security", "--offline=yes", "--no-pager", str(unit))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout
    threshold = int(MAX_EXPOSURE * 10)
    gate = analyze("security", "--offline=yes", f"--threshold={threshold}", str(unit))
    assert gate.returncode == 0, gate.stdout + gate.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_service_keeps_the_protocol_promises(service: str) -> None:
    assert value(service, "Type") == "notify"
    assert value(service, "NotifyAccess") == "main"
    assert value(service, "KillMode") == "mixed"
    # ctl reload waits for the outcome, so `systemctl reload` fails when it did.
    assert value(service, "ExecReload") == f"{VENV}/bin/forkserver ctl --timeout 60 reload"
    assert value(service, "ExecStart").startswith(f"{VENV}/bin/forkserver run ")
    # The control socket is $RUNTIME_DIRECTORY/control.sock; a root shell's
    # `forkserver ctl` looks in /run/forkserver[-NAME] (control.socket_path).
    runtime = value(service, "RuntimeDirectory")
    assert runtime == ("forkserver-%i" if "@" in service else "forkserver")
    assert value(service, "Restart") == "on-failure"
    # 78: invalid configuration; 3: no worker could boot. Neither cures itself.
    assert value(service, "RestartPreventExitStatus") == "3 78"
    assert int(value(service, "WatchdogSec")) > 0
    assert int(value(service, "FileDescriptorStoreMax")) > 0
    assert value(service, "NonBlocking") == "yes"
    assert "--bind systemd" in value(service, "ExecStart")
    graceful = next(f.default for f in dataclasses.fields(Settings) if f.name == "graceful_timeout")
    assert isinstance(graceful, float)
    assert int(value(service, "TimeoutStopSec")) > graceful


@pytest.mark.parametrize("service", SERVICES)
def test_service_is_hardened(service: str) -> None:
    for key in (
        "NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
        "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "DynamicUser",
    ):  # fmt: skip
        assert value(service, key) == "yes", key
    assert value(service, "ProtectSystem") == "strict"
    assert value(service, "CapabilityBoundingSet") == ""
    assert value(service, "RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"
    filters = [v for _, k, v in settings(service) if k == "SystemCallFilter"]
    assert filters[0] == "@system-service"


@pytest.mark.parametrize("socket_unit", SOCKETS)
def test_socket_passes_one_named_listening_socket(socket_unit: str) -> None:
    assert value(socket_unit, "Accept") == "no"
    assert value(socket_unit, "FileDescriptorName") == "web"
    assert value(socket_unit, "ListenStream")
    backlog = next(f.default for f in dataclasses.fields(Settings) if f.name == "backlog")
    assert value(socket_unit, "Backlog") == str(backlog)


def test_template_differs_from_the_plain_service_only_by_instance() -> None:
    """The hardening and the protocol settings must not drift apart."""

    def service_section(unit: str) -> list[tuple[str, str]]:
        return [(k, v) for s, k, v in settings(unit) if s == "Service"]

    plain = service_section("forkserver.service")
    template = service_section("forkserver@.service")
    differ = [(a, b) for a, b in zip(plain, template, strict=True) if a != b]
    assert differ == [
        (
            ("ExecStart", value("forkserver.service", "ExecStart")),
            ("ExecStart", value("forkserver@.service", "ExecStart")),
        ),
        (("RuntimeDirectory", "forkserver"), ("RuntimeDirectory", "forkserver-%i")),
    ]
    assert value("forkserver.service", "ExecReload") == value("forkserver@.service", "ExecReload")
    assert "--config /etc/forkserver/%i.toml" in value("forkserver@.service", "ExecStart")
    assert value("forkserver@.service", "Requires") == "forkserver@%i.socket"


@pytest.mark.parametrize("unit", SERVICES + SOCKETS)
def test_documentation_points_at_the_projects_docs(unit: str) -> None:
    """Documentation= names files of the source tree the README installs."""
    links = value(unit, "Documentation").split()
    files = [link.removeprefix("file:") for link in links if link.startswith("file:")]
    assert files, links
    for path in files:
        assert path.startswith(SOURCE + "/"), path
        assert (ROOT / path.removeprefix(SOURCE + "/")).is_file(), path


def test_readme_names_every_unit_and_the_operations() -> None:
    text = (UNITS / "README.md").read_text()
    for name in [*SOCKETS, *SERVICES]:
        assert f"`{name}`" in text or name in text
    for command in (
        "systemctl enable --now forkserver.socket",
        "systemctl reload",
        "systemctl status",
        "journalctl -u forkserver",
        "forkserver ctl status",
        "forkserver ctl --name api status",
        f"python3 -m venv {VENV}",
        f"{VENV}/bin/pip install {SOURCE}",
        "Type=notify-reload",
    ):
        assert command in text


def test_readme_install_copies_only_files_the_project_ships() -> None:
    """Every `install`/`cp` source in the README's steps is a file of this tree."""
    text = (UNITS / "README.md").read_text()
    install = text.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    sources = []
    for line in re.findall(r"^(?:install -m \d+|cp) (.+) \S+$", install, re.MULTILINE):
        sources += line.split()
    assert sources, "no copy step found"
    for source in sources:
        assert (ROOT / source).is_file(), source
    assert "/home" not in install.replace("`/home`", "") and "/root/" not in install
