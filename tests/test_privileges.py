"""Privilege drop, observed from outside in /proc/<pid>/status."""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from forkserver.privileges import PrivilegeError, drop_privileges, resolve
from tests.support import wait_pid

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")


@contextmanager
def forked(action: Callable[[], None]) -> Iterator[tuple[int, bytes]]:
    """Fork a child that runs *action*, reports ``ok`` or the error on a
    pipe, then waits until we close the other pipe.  Yields (pid, report)
    while the child is still alive, so its /proc entry can be read."""
    report_r, report_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(report_r)
            os.close(hold_w)
            try:
                action()
                os.write(report_w, b"ok")
            except PrivilegeError as exc:
                os.write(report_w, f"PrivilegeError: {exc}".encode())
            os.close(report_w)
            os.read(hold_r, 1)          # until the parent has looked
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(hold_r)
    try:
        with os.fdopen(report_r, "rb") as report:
            yield pid, report.read(4096)
    finally:
        os.close(hold_w)
        assert wait_pid(pid, timeout=10) == 0


def proc_status(pid: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Uid", "Gid", "Groups"):
                out[name] = [int(x) for x in rest.split()]
    return out


def test_drop_to_nobody_changes_every_uid_gid_and_the_groups() -> None:
    nobody = pwd.getpwnam("nobody")
    with forked(lambda: drop_privileges("nobody", None)) as (pid, report):
        assert report == b"ok"
        status = proc_status(pid)
    assert status["Uid"] == [nobody.pw_uid] * 4          # real, effective, saved, fs
    assert status["Gid"] == [nobody.pw_gid] * 4
    assert sorted(status["Groups"]) == sorted(set(os.getgrouplist("nobody", nobody.pw_gid)))


def test_explicit_group_and_numeric_ids() -> None:
    daemon_gid = grp.getgrnam("daemon").gr_gid
    uid = pwd.getpwnam("nobody").pw_uid
    with forked(lambda: drop_privileges(str(uid), "daemon")) as (pid, report):
        assert report == b"ok"
        status = proc_status(pid)
    assert status["Uid"] == [uid] * 4
    assert status["Gid"] == [daemon_gid] * 4
    assert 0 not in status["Groups"]                      # root's groups are gone


def test_group_only_keeps_the_user() -> None:
    gid = grp.getgrnam("nogroup").gr_gid
    with forked(lambda: drop_privileges(None, "nogroup")) as (pid, report):
        assert report == b"ok"
        status = proc_status(pid)
    assert status["Uid"] == [0] * 4
    assert status["Gid"] == [gid] * 4
    assert status["Groups"] == []


def test_a_dropped_process_cannot_switch_back() -> None:
    def twice() -> None:
        drop_privileges("nobody", None)
        drop_privileges("root", None)

    with forked(twice) as (pid, report):
        assert report.startswith(b"PrivilegeError: cannot switch to user 'root'")
        assert proc_status(pid)["Uid"] == [pwd.getpwnam("nobody").pw_uid] * 4


def test_nothing_to_do() -> None:
    assert resolve(None, None) is None
    with forked(lambda: drop_privileges(None, None)) as (pid, report):
        assert report == b"ok"
        assert proc_status(pid)["Uid"] == [0] * 4


@pytest.mark.parametrize(("user", "group", "message"), [
    ("no-such-user-x", None, "user 'no-such-user-x' does not exist"),
    ("nobody", "no-such-group-x", "group 'no-such-group-x' does not exist"),
    ("4294967299", None, "user '4294967299' does not exist"),
    (None, "99999999", "group '99999999' does not exist"),
])
def test_unknown_names_fail_before_anything_changes(
        user: str | None, group: str | None, message: str) -> None:
    with pytest.raises(PrivilegeError, match=f"^{message}$"):
        resolve(user, group)
    with pytest.raises(PrivilegeError, match=f"^{message}$"):
        drop_privileges(user, group)
    assert os.getresuid() == (0, 0, 0)
