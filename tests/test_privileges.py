"""Privilege drop, observed from outside in /proc/<pid>/status."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from forkserver.privileges import PidFile, PidFileError, PrivilegeError, drop_privileges, resolve
from tests.support import Daemon, exchange, start_daemon, wait_pid
from tests.test_cli import running_daemon

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
CREDENTIALS = "tests.handlers.credentials:handle"


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
    with open(f"/proc/{pid}/status") as f:
        return parse_status(f.read())


def parse_status(text: str) -> dict[str, list[int]]:
    """Ids, groups, NoNewPrivs and the capability sets (as ints) of a /proc status."""
    out: dict[str, list[int]] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("Uid", "Gid", "Groups", "NoNewPrivs"):
            out[name] = [int(x) for x in rest.split()]
        elif name in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
            out[name] = [int(rest, 16)]
    return out


@needs_root
def test_drop_to_nobody_changes_every_uid_gid_and_the_groups() -> None:
    nobody = pwd.getpwnam("nobody")
    with forked(lambda: drop_privileges("nobody", None)) as (pid, report):
        assert report == b"ok"
        status = proc_status(pid)
    assert status["Uid"] == [nobody.pw_uid] * 4          # real, effective, saved, fs
    assert status["Gid"] == [nobody.pw_gid] * 4
    assert sorted(status["Groups"]) == sorted(set(os.getgrouplist("nobody", nobody.pw_gid)))


@needs_root
def test_explicit_group_and_numeric_ids() -> None:
    daemon_gid = grp.getgrnam("daemon").gr_gid
    uid = pwd.getpwnam("nobody").pw_uid
    with forked(lambda: drop_privileges(str(uid), "daemon")) as (pid, report):
        assert report == b"ok"
        status = proc_status(pid)
    assert status["Uid"] == [uid] * 4
    assert status["Gid"] == [daemon_gid] * 4
    assert 0 not in status["Groups"]                      # root's groups are gone


@needs_root
def test_group_only_keeps_the_user() -> None:
    gid = grp.getgrnam("nogroup").gr_gid
    with forked(lambda: drop_privileges(None, "nogroup")) as (pid, report):
        assert report == b"ok"
        status = proc_status(pid)
    assert status["Uid"] == [0] * 4
    assert status["Gid"] == [gid] * 4
    assert status["Groups"] == []


@needs_root
def test_a_dropped_process_cannot_switch_back() -> None:
    def twice() -> None:
        drop_privileges("nobody", None)
        drop_privileges("root", None)

    with forked(twice) as (pid, report):
        assert report.startswith(b"PrivilegeError: cannot switch to user 'root'")
        assert proc_status(pid)["Uid"] == [pwd.getpwnam("nobody").pw_uid] * 4


@needs_root
def test_staying_root_keeps_the_capabilities_and_only_sets_no_new_privs() -> None:
    assert resolve(None, None) is None
    before = proc_status(os.getpid())
    with forked(lambda: drop_privileges(None, None)) as (pid, report):
        assert report == b"ok"
        status = proc_status(pid)
    assert status["Uid"] == [0] * 4
    assert status["NoNewPrivs"] == [1]
    for caps in ("CapBnd", "CapEff", "CapPrm"):
        assert status[caps] == before[caps]


@needs_root
def test_leaving_root_empties_every_capability_set_and_sets_no_new_privs() -> None:
    assert proc_status(os.getpid())["CapBnd"] != [0]
    with forked(lambda: drop_privileges("nobody", None)) as (pid, report):
        assert report == b"ok"
        status = proc_status(pid)
    assert status["NoNewPrivs"] == [1]
    for caps in ("CapBnd", "CapEff", "CapPrm", "CapAmb"):
        assert status[caps] == [0], caps


@needs_root
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


@needs_root
def test_daemon_workers_run_as_the_configured_user(tmp_path: Path) -> None:
    """The master keeps root; each worker has dropped to nobody (with its
    groups) before it served anything, as /proc shows."""
    sock_path = tmp_path / "echo.sock"
    conf = ('handler = "forkserver.examples.echo:handle"\nworkers = 2\nuser = "nobody"\n'
            f'[[listeners]]\nbind = "unix:{sock_path}"\n')
    nobody = pwd.getpwnam("nobody")
    with running_daemon(tmp_path, conf) as proc:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(sock_path))
            client.sendall(b"hi")
            assert client.recv(64) == b"hi"
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        assert proc_status(proc.pid)["Uid"] == [0] * 4
        for worker in workers:
            status = proc_status(worker.pid)
            assert status["Uid"] == [nobody.pw_uid] * 4
            assert status["Gid"] == [nobody.pw_gid] * 4
            assert sorted(status["Groups"]) == sorted(set(os.getgrouplist("nobody",
                                                                          nobody.pw_gid)))


@contextmanager
def setuid_root_cat() -> Iterator[str]:
    """A setuid-root copy of ``cat`` that any user may run."""
    directory = tempfile.mkdtemp(prefix="fs-suid-")
    try:
        os.chmod(directory, 0o755)
        path = os.path.join(directory, "cat")
        shutil.copy(shutil.which("cat") or "/bin/cat", path)
        os.chmod(path, 0o4755)
        yield path
    finally:
        shutil.rmtree(directory)


def ask_credentials(daemon: Daemon, *programs: str) -> tuple[int, dict[str, Any]]:
    """(the worker's pid, its reply): /proc/self/status of it and of each program."""
    with daemon.connect(timeout=20) as sock:
        reply = json.loads(exchange(sock, "\n".join(programs).encode()))
    worker = parse_status(reply["worker"])
    pid = next(int(line.split()[1]) for line in reply["worker"].splitlines()
               if line.startswith("Pid:"))  # fmt: skip
    return pid, {"worker": worker, "programs": [parse_status(p) for p in reply["programs"]]}


@needs_root
def test_a_worker_run_as_nobody_and_what_it_executes_cannot_regain_privileges() -> None:
    """No capability anywhere, NoNewPrivs set, and a setuid-root program runs as nobody."""
    nobody = pwd.getpwnam("nobody").pw_uid
    with setuid_root_cat() as suid_cat, \
            start_daemon(CREDENTIALS, "--user", "nobody", workers=1) as daemon:
        pid, seen = ask_credentials(daemon, shutil.which("cat") or "/bin/cat", suid_cat)
        assert seen["worker"] == {**proc_status(pid), **seen["worker"]}  # the live worker
        for status in (seen["worker"], *seen["programs"]):
            assert status["Uid"] == [nobody] * 4  # the setuid bit took nothing
            assert status["NoNewPrivs"] == [1]
            for caps in ("CapBnd", "CapEff", "CapPrm", "CapAmb"):
                assert status[caps] == [0], caps


@needs_root
def test_a_worker_that_stays_root_keeps_its_capabilities_with_no_new_privs() -> None:
    master = proc_status(os.getpid())  # the daemon's master has what this process has
    with start_daemon(CREDENTIALS, workers=1) as daemon:
        _, seen = ask_credentials(daemon, shutil.which("cat") or "/bin/cat")
        assert proc_status(daemon.pid)["NoNewPrivs"] == [0]  # the master itself is untouched
        for status in (seen["worker"], *seen["programs"]):
            assert status["Uid"] == [0] * 4
            assert status["NoNewPrivs"] == [1]
            for caps in ("CapBnd", "CapEff", "CapPrm"):
                assert status[caps] == master[caps], caps


# ------------------------------------------------------------------ pid file

def test_pid_file_is_written_whole_and_removed_on_release(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    pid_file = PidFile(str(path))
    pid_file.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.pid"]   # no temp left
    pid_file.release()
    assert not path.exists()


def test_pid_file_held_by_a_live_forkserver_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys; print('up', flush=True); sys.stdin.read()",
                               "forkserver"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"up\n"      # exec'd: its cmdline is final
        path.write_text(f"{holder.pid}\n")
        with pytest.raises(PidFileError, match=f"forkserver pid {holder.pid} is running"):
            PidFile(str(path)).acquire()
        assert path.read_text() == f"{holder.pid}\n"
    finally:
        holder.communicate(b"", timeout=10)
    PidFile(str(path)).acquire()                  # its holder has exited: stale
    assert path.read_text() == f"{os.getpid()}\n"


def test_pid_file_naming_another_program_or_a_dead_pid_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    path.write_text("1\n")                        # init, not a forkserver
    PidFile(str(path)).acquire(pid=12345)
    assert path.read_text() == "12345\n"


def test_pid_file_that_is_not_a_pid_file_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("important\n")
    with pytest.raises(PidFileError, match="does not hold a pid; refusing"):
        PidFile(str(path)).acquire()
    assert path.read_text() == "important\n"
    with pytest.raises(PidFileError, match="No such file or directory"):
        PidFile(str(tmp_path / "missing" / "x.pid")).acquire()


def test_release_leaves_a_file_that_names_someone_else(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    pid_file = PidFile(str(path))
    pid_file.acquire()
    path.write_text("99999\n")                    # a newer master took over
    pid_file.release()
    assert path.read_text() == "99999\n"
