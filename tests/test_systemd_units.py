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

UNITS = Path(__file__).resolve().parent.parent / "systemd"
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


@pytest.mark.parametrize("pair", [SOCKETS[:1] + SERVICES[:1], SOCKETS[1:] + SERVICES[1:]])
def test_units_verify_without_a_single_warning(pair: list[str]) -> None:
    assert strict_verify(*(UNITS / name for name in pair)) == ""


def test_the_strict_check_catches_an_unknown_key(tmp_path: Path) -> None:
    """Plain verify would pass this file; ours must not."""
    for name in ("forkserver.socket", "forkserver.service"):
        shutil.copy(UNITS / name, tmp_path / name)
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
    assert value(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert value(service, "Restart") == "on-failure"
    assert value(service, "RestartPreventExitStatus") == "78"
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
    assert "--config /etc/forkserver/%i.toml" in value("forkserver@.service", "ExecStart")
    assert value("forkserver@.service", "Requires") == "forkserver@%i.socket"


def test_readme_names_every_unit_and_the_operations() -> None:
    text = (UNITS / "README.md").read_text()
    for name in [*SOCKETS, *SERVICES]:
        assert f"`{name}`" in text or name in text
    for command in (
        "systemctl enable --now forkserver.socket",
        "systemctl reload",
        "systemctl status",
        "journalctl -u forkserver",
    ):
        assert command in text
