"""The USR2 hand-over on its own: a real fork and exec, real inherited sockets."""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkserver import upgrade
from forkserver.upgrade import HandedListener, Handover, UpgradeError
from tests.support import ROOT, wait_pid

# The "new master": claims the hand-over, describes what it got, says ready.
NEW_MASTER = r"""
import json, os, socket, sys
from forkserver.upgrade import Handover
out = sys.argv[1]
open_fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}"))
try:
    handover = Handover.from_environ()
except Exception as exc:
    with open(out, "w") as f:
        json.dump({"error": str(exc)}, f)
    sys.exit(2)
seen = []
for item in handover.listeners:
    sock = socket.socket(fileno=os.dup(item.fd))
    seen.append({"fd": item.fd, "name": item.name, "inherited": item.inherited,
                 "path": item.path, "inode": os.fstat(item.fd).st_ino,
                 "listening": sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
                 "cloexec": not os.get_inheritable(item.fd)})
    sock.close()
left = sorted(k for k in os.environ if k.startswith(("LISTEN_", "FORKSERVER__UPGRADE")))
with open(out, "w") as f:
    json.dump({"pid": os.getpid(), "old_pid": handover.old_pid, "listeners": seen,
               "open_fds": open_fds, "cwd": os.getcwd(),
               "left": left, "extra": os.environ.get("EXTRA"),
               "ready_cloexec": not os.get_inheritable(handover.ready_fd)}, f)
handover.report_ready()
"""


@pytest.fixture
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fs-up-") as path:
        yield Path(path)


def inheritable_fds() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.get_inheritable(int(name)):
                found.add(int(name))
        except OSError:
            continue  # the listdir's own descriptor, closed by now
    return found


def _wait_ready(up: upgrade.Upgrade, timeout: float = 20.0) -> bool | None:
    ready, _, _ = select.select([up.ready_fd], [], [], timeout)
    assert ready, "the new master said nothing"
    return upgrade.read_ready(up)


def test_the_new_master_gets_the_listeners_from_fd_3_and_reports_ready(scratch: Path) -> None:
    out = scratch / "out.json"
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(scratch / "s.sock"))
    unix.listen()
    handed = [
        HandedListener(fd=tcp.fileno(), name="127.0.0.1:1234", inherited=False, path=None),
        HandedListener(fd=unix.fileno(), name="web", inherited=True, path=str(scratch / "s.sock")),
    ]
    env = {"PYTHONPATH": str(ROOT), "EXTRA": "passed on"}
    ambient = inheritable_fds() - {0, 1, 2}
    with tcp, unix:
        up = upgrade.start_new_master([sys.executable, "-c", NEW_MASTER, str(out)], handed, env)
        try:
            assert _wait_ready(up) is True
        finally:
            os.close(up.ready_fd)
        assert wait_pid(up.pid) == 0
        report = json.loads(out.read_text())
        assert report["old_pid"] == os.getpid()
        assert report["extra"] == "passed on"
        assert report["left"] == []  # claimed and removed: no worker inherits them
        assert report["ready_cloexec"] is True
        # Nothing of ours leaked into the new master: the streams, the sockets, the
        # pipe, and whatever this test process was itself given to pass on.
        assert set(report["open_fds"]) == {0, 1, 2, 3, 4, 5} | ambient
        assert report["cwd"] == upgrade.START_DIRECTORY
        got = report["listeners"]
        assert [item["fd"] for item in got] == [3, 4]
        assert [item["inode"] for item in got] == [os.fstat(tcp.fileno()).st_ino,
                                                   os.fstat(unix.fileno()).st_ino]  # fmt: skip
        assert all(item["listening"] and item["cloexec"] for item in got)
        assert [(i["name"], i["inherited"], i["path"]) for i in got] == [
            ("127.0.0.1:1234", False, None),
            ("web", True, str(scratch / "s.sock")),
        ]
        # Still ours too: the hand-over never closes the old master's copies.
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_a_new_master_that_fails_is_seen_as_end_of_file_with_its_exit_code(scratch: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as tcp:
        handed = [HandedListener(fd=tcp.fileno(), name="x", inherited=False, path=None)]
        up = upgrade.start_new_master([sys.executable, "-c", "raise SystemExit(78)"], handed, {})
        try:
            assert _wait_ready(up) is False
        finally:
            os.close(up.ready_fd)
        assert wait_pid(up.pid) == 78


def test_a_command_that_cannot_be_executed_exits_127(scratch: Path) -> None:
    up = upgrade.start_new_master([str(scratch / "missing")], [], {})
    try:
        assert _wait_ready(up) is False
    finally:
        os.close(up.ready_fd)
    assert wait_pid(up.pid) == 127


def test_without_the_variable_there_is_no_handover() -> None:
    assert Handover.from_environ({"PATH": "/bin"}) is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("not json", "not JSON"),
        ("[]", "expected the keys"),
        ('{"ready_fd": 4, "old_pid": 1}', "expected the keys"),
        ('{"ready_fd": "4", "old_pid": 1, "listeners": []}', "ready_fd must be a positive"),
        ('{"ready_fd": 4, "old_pid": true, "listeners": []}', "old_pid must be a positive"),
        ('{"ready_fd": 4, "old_pid": 1, "listeners": [{"name": 1}]}', "listeners must be"),
        ('{"ready_fd": 4, "old_pid": 1, "listeners": {}}', "listeners must be"),
        ("x" * (upgrade.MAX_ENV + 1), "more than"),
    ],
)
def test_a_malformed_handover_is_refused_naming_the_problem(value: str, problem: str) -> None:
    environ = {upgrade.ENV: value}
    with pytest.raises(UpgradeError, match=problem):
        Handover.from_environ(environ)
    assert upgrade.ENV not in environ


def test_a_handover_that_does_not_match_listen_fds_is_refused() -> None:
    environ = {
        upgrade.ENV: json.dumps({"ready_fd": 3, "old_pid": 1,
                                 "listeners": [{"name": "a", "inherited": False, "path": None}]}),
        "LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0",
    }  # fmt: skip
    with pytest.raises(UpgradeError, match="1 listeners described, 0 passed"):
        Handover.from_environ(environ)
    assert not any(key.startswith("LISTEN_") for key in environ)


def test_reporting_ready_to_an_old_master_that_is_gone_is_harmless() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    handover = Handover(old_pid=1, ready_fd=write_end, listeners=[])
    handover.report_ready()
    handover.report_ready()  # once only
    assert handover.ready_fd == -1
