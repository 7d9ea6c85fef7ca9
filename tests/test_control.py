"""The control socket, for real: a ControlServer on a real EventLoop in a
forked child, real Unix sockets, `forkserver ctl` as the client, and a
client running as nobody."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from forkserver import cli, control, log
from forkserver.config import Settings
from forkserver.control import CommandError, ControlServer
from forkserver.eventloop import EventLoop
from forkserver.privileges import drop_privileges
from tests.support import wait_pid

NOBODY = pwd.getpwnam("nobody").pw_uid
# The test server drops a client without a complete request after this
# long: far beyond what a test's own request takes on a loaded machine,
# and short enough to wait out once.
CLIENT_TIMEOUT = 2.0


@dataclass
class Daemon:
    pid: int
    path: str
    log_path: Path
    exit_code: int | None = None

    def wait(self) -> int:
        self.exit_code = wait_pid(self.pid, timeout=10)
        return self.exit_code

    def events(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]


def _serve(path: str, log_path: Path, ready_w: int, client_timeout: float) -> None:
    """The child: a control server whose commands act on a small state."""
    loop = EventLoop()
    log.configure(Settings(log_format="json", log_file=str(log_path), log_level="debug"))
    started = time.time()
    state = {"workers": 2}

    def status() -> dict[str, Any]:
        return {
            "master": {"pid": os.getpid(), "name": "test", "started": started,
                       "generation": 1, "state": "running",
                       "workers_target": state["workers"], "pending": 0, "accepting": True,
                       "listeners": [{"name": "web", "address": "127.0.0.1:8000", "fd": 3,
                                      "inode": 42}],
                       "totals": {"served": 7, "in_flight": 0, "spawned": 1, "restarts": 0,
                                  "errors": 0},
                       "last_reload_error": None},
            "workers": [{"slot": 0, "pid": os.getppid(), "generation": 1, "state": "ready",
                         "started": started, "served": 7, "in_flight": 0, "restarts": 0,
                         "last_exit": None, "last_error": None}],
        }

    def scale(workers: int | None = None, by: int = 0) -> dict[str, int]:
        state["workers"] = workers if workers is not None else state["workers"] + by
        return {"workers": state["workers"]}

    def reload() -> None:
        raise CommandError("the new configuration is invalid; keeping the running one")

    def reopen_logs() -> None:
        raise RuntimeError("an unexpected bug")

    def stop(graceful: bool) -> None:
        loop.call_soon(loop.stop)

    server = ControlServer(loop, path, {"status": status, "scale": scale, "reload": reload,
                                        "stop": stop, "reopen-logs": reopen_logs},
                           client_timeout=client_timeout)
    server.start()
    os.write(ready_w, b"r")
    os.close(ready_w)
    loop.run()
    server.close()
    loop.close()


def _fork(target: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            target()
        except BaseException:
            import traceback  # noqa: PLC0415

            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    return pid


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory nobody can traverse (tmp_path's parents are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="fsctl-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.fixture
def daemon(socket_dir: Path) -> Iterator[Daemon]:
    path = str(socket_dir / "control.sock")
    log_path = socket_dir / "log.json"
    ready_r, ready_w = os.pipe()
    pid = _fork(lambda: _serve(path, log_path, ready_w, client_timeout=CLIENT_TIMEOUT))
    os.close(ready_w)
    d = Daemon(pid, path, log_path)
    try:
        with os.fdopen(ready_r, "rb") as ready:
            assert ready.read(1) == b"r", "the control server did not start"
        yield d
    finally:
        if d.exit_code is None:
            os.kill(pid, signal.SIGKILL)
            d.wait()


def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["ctl", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def raw(path: str, payload: bytes, timeout: float = 5.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


# ------------------------------------------------------------------ the socket

def test_socket_is_mode_0600_and_owned_by_us(daemon: Daemon) -> None:
    st = os.lstat(daemon.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()


def test_stop_closes_and_removes_the_socket(daemon: Daemon,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(capsys, "--socket", daemon.path, "stop", "--fast")[0] == 0
    assert daemon.wait() == 0
    assert not os.path.exists(daemon.path)
    code, _, err = ctl(capsys, "--socket", daemon.path, "status")
    assert code == cli.ExitCode.UNAVAILABLE
    assert f"no daemon at control socket {daemon.path}" in err


def test_start_replaces_a_stale_socket_but_not_a_live_one_or_a_file(
        daemon: Daemon, tmp_path: Path) -> None:
    loop = EventLoop()
    try:
        with pytest.raises(control.ControlError, match="another daemon is serving it"):
            ControlServer(loop, daemon.path, {}).start()
        stale = str(tmp_path / "stale.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(stale)                       # bound, never listening: left by a crash
        server = ControlServer(loop, stale, {})
        server.start()
        assert stat.S_IMODE(os.lstat(stale).st_mode) == 0o600
        server.close()
        assert not os.path.exists(stale)
        plain = tmp_path / "plain"
        plain.write_text("keep me")
        with pytest.raises(control.ControlError, match="exists and is not a socket"):
            ControlServer(loop, str(plain), {}).start()
        assert plain.read_text() == "keep me"
    finally:
        loop.close()


# ------------------------------------------------------------------ ctl commands

def test_status_table_and_json(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ctl(capsys, "--socket", daemon.path, "status")
    assert code == 0
    assert f"master pid {daemon.pid}  name test  state running  generation 1" in out
    assert "listener web: 127.0.0.1:8000 (fd 3, inode 42)" in out
    header, row = out.splitlines()[-2:]
    assert header.split()[:4] == ["SLOT", "PID", "GEN", "STATE"]
    assert row.split()[:6] == ["0", str(os.getpid()), "1", "ready", row.split()[4], "7"]

    code, out, _ = ctl(capsys, "--socket", daemon.path, "status", "--json")
    assert code == 0
    status = json.loads(out)
    assert status["schema"] == 1
    master, (worker,) = status["master"], status["workers"]
    assert master["pid"] == daemon.pid
    assert 0 <= master["uptime"] < 60
    assert worker["pid"] == os.getpid()
    me = psutil.Process()
    assert worker["rss"] > 0
    assert 0 < worker["uss"] <= worker["rss"] <= me.memory_info().rss * 2
    assert worker["cpu_percent"] >= 0
    assert psutil.Process(master["pid"]).is_running()
    assert out == json.dumps(status, indent=2, sort_keys=True) + "\n"   # stable


def test_scale(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ctl(capsys, "--socket", daemon.path, "scale", "5")
    assert (code, out) == (0, "workers: 5\n")
    status = control.request(daemon.path, "status")
    assert status["master"]["workers_target"] == 5
    for bad in ("0", "x", "5000", "+x", "1.5", "--1", "+", "٣"):
        code, _, err = ctl(capsys, "--socket", daemon.path, "scale", bad)
        assert code == cli.ExitCode.USAGE, bad
        assert "N|+N|-N" in err


def test_failing_commands_exit_1_and_the_loop_survives(
        daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = ctl(capsys, "--socket", daemon.path, "reload")
    assert code == cli.ExitCode.FAILURE
    assert "reload: the new configuration is invalid; keeping the running one" in err
    code, _, err = ctl(capsys, "--socket", daemon.path, "reopen-logs")
    assert code == cli.ExitCode.FAILURE
    assert "internal error: RuntimeError: an unexpected bug" in err
    assert control.request(daemon.path, "status")["master"]["pid"] == daemon.pid
    assert any("an unexpected bug" in e.get("exc", "") for e in daemon.events())


def test_every_request_is_audited(daemon: Daemon) -> None:
    control.request(daemon.path, "scale", {"workers": 3})
    (event,) = [e for e in daemon.events() if e["event"] == "control_request"]
    assert (event["command"], event["uid"], event["peer_pid"]) == ("scale", 0, os.getpid())


def test_no_reply_in_time_exits_75(tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "mute.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(path)
        mute.listen(1)                  # connects succeed; nobody ever answers
        code, _, err = ctl(capsys, "--socket", path, "--timeout", "0.2", "status")
    assert code == cli.ExitCode.TEMPFAIL
    assert "no reply" in err


def test_socket_path_from_config(daemon: Daemon, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "f.toml"
    conf.write_text(f'control_socket = "{daemon.path}"\n')
    assert ctl(capsys, "-c", str(conf), "status", "--json")[0] == 0
    # Without it, the default path (here the test session's $RUNTIME_DIRECTORY):
    code, _, err = ctl(capsys, "status")
    assert code == cli.ExitCode.UNAVAILABLE
    assert f"no daemon at control socket {os.environ['RUNTIME_DIRECTORY']}/control.sock" in err
    assert "(default path: $RUNTIME_DIRECTORY (systemd);" in err
    assert ("its own control_socket or name is reached with --socket PATH, -c FILE or "
            "--name NAME") in err


def test_a_broken_config_file_still_tells_where_the_socket_is(
        daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "f.toml"
    conf.write_text(f'control_socket = "{daemon.path}"\nworkers = "many"\n')
    code, out, err = ctl(capsys, "-c", str(conf), "status", "--json")
    assert code == 0, err
    assert json.loads(out)["master"]["pid"] == daemon.pid
    assert f"warning: {conf}:2, key 'workers'" in err          # what is wrong, still said
    conf.write_text(f'control_socket = "{daemon.path}"\nworkers = [\n')
    code, _, err = ctl(capsys, "-c", str(conf), "status")
    assert code == cli.ExitCode.CONFIG
    assert "cannot tell where the control socket is" in err
    assert "give --socket PATH" in err
    conf.write_text("control_socket = 5\n")
    code, _, err = ctl(capsys, "-c", str(conf), "status")
    assert code == cli.ExitCode.CONFIG
    assert "control_socket: expected a string" in err


def test_default_socket_path() -> None:
    s = Settings(pid_file="/run/app.pid")
    run = {"RUNTIME_DIRECTORY": "/run/x:/run/y"}
    assert control.default_socket_path(s, run) == "/run/x/control.sock"
    assert control.default_socket_path(Settings(control_socket="/a.sock"), run) == "/a.sock"
    where = control.socket_path(None, "", {}, uid=0)
    assert (where.path, where.configured) == ("/run/forkserver/control.sock", False)
    assert control.socket_path(None, "api", {"XDG_RUNTIME_DIR": "/run/user/0"},
                               uid=0).path == "/run/forkserver-api/control.sock"
    assert control.socket_path(None, "", {"XDG_RUNTIME_DIR": "/run/user/1000"},
                               uid=1000).path == "/run/user/1000/forkserver/control.sock"
    assert control.socket_path(None, "a/b", {"XDG_RUNTIME_DIR": "/x"},
                               uid=1000).path == "/x/forkserver-a_b/control.sock"
    for environ in ({}, {"XDG_RUNTIME_DIR": "relative"}):
        fallback = control.socket_path(None, "", environ, uid=1000)
        assert fallback.path == "/tmp/forkserver-1000/control.sock"
        assert fallback.private_parent
    assert control.socket_path("/a.sock", "api", run, uid=0).configured


# ------------------------------------------------------------------ bad clients

@pytest.mark.parametrize(("payload", "error"), [
    (b"hello\n", "malformed request: not JSON"),
    (b"[1, 2]\n", "malformed request: expected"),
    (b'{"command": 3}\n', "malformed request: expected"),
    (b'{"command": "status", "args": [], "x": 1}\n', "'args' must be an object"),
    (b'{"command": "status", "args": {"a": 1}}\n', "takes no arguments"),
    (b'{"command": "scale", "args": {"workers": true}}\n', 'expected {"workers": N}'),
    (b'{"command": "scale", "args": {"workers": 99999}}\n', "between 1 and 4096"),
    (b'{"command": "stop", "args": {"mode": "now"}}\n', '"graceful"'),
    (b'{"command": "rm -rf"}\n', "unknown command 'rm -rf' (known: reload, reopen-logs,"),
    (b"[" * 100_000, "request larger than 65536 bytes"),
    (b"[" * 60_000 + b"]" * 5000 + b"\n", "malformed request: not JSON"),   # deep, not big
    (b'{"command": "status"}', None),         # no newline, then EOF: still served
])
def test_malformed_requests_get_error_replies(daemon: Daemon, payload: bytes,
                                              error: str | None) -> None:
    if error is None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(daemon.path)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            assert json.loads(s.makefile("rb").readline())["ok"] is True
    else:
        with contextlib.suppress(ConnectionResetError):
            reply = raw(daemon.path, payload)
            assert reply["ok"] is False
            assert error in reply["error"]
    assert control.request(daemon.path, "status")["master"]["pid"] == daemon.pid


def test_silent_and_slow_clients_do_not_block_others(daemon: Daemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        silent.settimeout(CLIENT_TIMEOUT + 20)
        slow.settimeout(20)
        connected = time.monotonic()
        silent.connect(daemon.path)
        slow.connect(daemon.path)
        slow.sendall(b'{"command": "sta')
        # Both are connected and unanswered; others are still served.
        assert control.request(daemon.path, "status")["master"]["pid"] == daemon.pid
        slow.sendall(b'tus"}\n')
        assert json.loads(slow.makefile("rb").readline())["ok"] is True
        assert silent.recv(1) == b""          # dropped, not left open
        assert time.monotonic() - connected >= CLIENT_TIMEOUT  # and not before its time
    assert any("sent no complete request" in e["message"] for e in daemon.events())


# ------------------------------------------------------------------ other users

def _as_nobody(action: Callable[[], int]) -> int:
    """Run *action* in a forked child that has dropped to nobody; its
    return value is the child's exit code."""
    def child() -> None:
        drop_privileges("nobody", None)
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            os._exit(action())
    return wait_pid(_fork(child), timeout=20)


def test_nobody_is_refused_by_the_file_mode(daemon: Daemon) -> None:
    assert _as_nobody(lambda: cli.main(["ctl", "--socket", daemon.path, "status"])) == \
        cli.ExitCode.NOPERM

    def connect() -> int:
        try:
            control.request(daemon.path, "status")
        except control.ControlRefused as exc:
            return 10 if "permission denied on control socket" in str(exc) else 1
        return 2
    assert _as_nobody(connect) == 10


def test_nobody_is_refused_by_peer_credentials(daemon: Daemon) -> None:
    os.chmod(daemon.path, 0o666)      # take the file mode out of the way

    def connect() -> int:
        try:
            control.request(daemon.path, "stop")
        except control.ControlRefused as exc:
            return 10 if f"permission denied: uid {NOBODY} may not" in str(exc) else 1
        return 2
    assert _as_nobody(connect) == 10
    assert _as_nobody(lambda: cli.main(["ctl", "--socket", daemon.path, "scale", "3"])) == \
        cli.ExitCode.NOPERM
    denied = [e for e in daemon.events() if e["event"] == "control_denied"]
    assert len(denied) == 2
    assert {e["uid"] for e in denied} == {NOBODY}
    assert denied[0]["level"] == "warning"
    status = control.request(daemon.path, "status")       # not stopped, not scaled
    assert status["master"]["workers_target"] == 2


def test_open_control_uses_the_default_path(tmp_path: Path) -> None:
    loop = EventLoop()
    try:
        server = control.open_control(loop, Settings(), {"status": dict},
                                      environ={"RUNTIME_DIRECTORY": str(tmp_path)})
        assert server is not None
        assert server.path == str(tmp_path / "control.sock")
        assert stat.S_IMODE(os.lstat(server.path).st_mode) == 0o600
        server.close()
        assert not os.path.exists(server.path)
    finally:
        loop.close()


def test_a_taken_default_path_is_a_warning_a_configured_one_an_error(
        daemon: Daemon, restore_root_logger: None, tmp_path: Path) -> None:
    """Two daemons with no configuration: the second runs without a socket."""
    log_file = tmp_path / "log.json"
    log.configure(Settings(log_format="json", log_file=str(log_file)))
    loop = EventLoop()
    try:
        taken = {"RUNTIME_DIRECTORY": os.path.dirname(daemon.path)}
        assert control.open_control(loop, Settings(), {}, environ=taken) is None
        (warning,) = [json.loads(line) for line in log_file.read_text().splitlines()]
        assert warning["event"] == "control_unavailable"
        assert warning["level"] == "warning"
        assert f"control socket {daemon.path}: another daemon is serving it" in \
            warning["message"]
        assert "set control_socket, or give this daemon a name" in warning["message"]
        with pytest.raises(control.ControlError, match="another daemon is serving it"):
            control.open_control(loop, Settings(control_socket=daemon.path), {}, environ={})
    finally:
        loop.close()
    assert control.request(daemon.path, "status")["master"]["pid"] == daemon.pid


def test_the_socket_directory_is_created_0700(tmp_path: Path) -> None:
    path = tmp_path / "new" / "c.sock"
    loop = EventLoop()
    try:
        server = control.open_control(loop, Settings(control_socket=str(path)),
                                      {"status": dict}, environ={})
        assert server is not None
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        server.close()
        with pytest.raises(control.ControlError, match=r"cannot create .*No such file"):
            control.open_control(loop, Settings(control_socket=str(tmp_path / "a" / "b" / "c")),
                                 {}, environ={})
    finally:
        loop.close()


def test_a_default_path_the_daemon_may_not_reach_is_a_warning(socket_dir: Path) -> None:
    """A master that is not root, given a runtime directory only root may
    search: it runs without a control socket instead of failing."""
    closed = socket_dir / "root-only"
    closed.mkdir(mode=0o700)

    def child() -> int:
        loop = EventLoop()
        try:
            server = control.open_control(loop, Settings(), {},
                                          environ={"RUNTIME_DIRECTORY": str(closed)})
        except control.ControlError:
            return 2
        return 0 if server is None else 1

    try:
        assert _as_nobody(child) == 0
        assert _as_nobody(lambda: _configured_in(closed)) == 0    # configured: an error
    finally:
        closed.rmdir()


def _configured_in(directory: Path) -> int:
    try:
        control.open_control(EventLoop(), Settings(control_socket=str(directory / "c.sock")),
                             {}, environ={})
    except control.ControlError as exc:
        return 0 if "Permission denied" in str(exc) else 1
    return 2


def test_a_socket_directory_in_tmp_must_be_private(tmp_path: Path) -> None:
    """The fallback /tmp/forkserver-UID: another user could have made it first."""
    planted = tmp_path / "planted"
    planted.mkdir()
    planted.chmod(0o777)
    with pytest.raises(control.ControlError, match="not a private directory"):
        control.check_private_dir(str(planted))
    planted.chmod(0o700)
    control.check_private_dir(str(planted))
    os.chown(planted, NOBODY, -1)
    with pytest.raises(control.ControlError, match=rf"owner uid {NOBODY}"):
        control.check_private_dir(str(planted))
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(control.ControlError, match="not a directory"):
        control.check_private_dir(str(link))


def _socket_inodes() -> set[str]:
    links = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            links.add(os.readlink(f"/proc/self/fd/{fd}"))
    return {link for link in links if link.startswith("socket:")}


def test_a_forked_child_lets_go_of_the_control_sockets(socket_dir: Path) -> None:
    """After discard_after_fork() in a child, the master's socket file and
    its clients are untouched, and the child holds none of their sockets."""
    loop = EventLoop()
    server = ControlServer(loop, str(socket_dir / "c.sock"), {"status": dict})
    server.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            before = _socket_inodes()
            client.connect(server.path)
            loop.run_once(timeout=5)              # accepts it
            ours = _socket_inodes() - before      # the server's end of the connection
            ours.add(f"socket:[{os.fstat(server.fileno()).st_ino}]")   # and its listener
            assert len(ours) == 2

            def child() -> None:
                server.discard_after_fork()
                os._exit(1 if ours & _socket_inodes() else 0)

            assert wait_pid(_fork(child), timeout=10) == 0
            assert os.path.exists(server.path)
            client.sendall(b'{"command": "status"}\n')
            client.setblocking(False)
            deadline = time.monotonic() + 5
            data = b""
            while not data.endswith(b"\n") and time.monotonic() < deadline:
                loop.run_once(timeout=0.1)        # the parent still serves it
                with contextlib.suppress(BlockingIOError):
                    data += client.recv(4096)
            reply = json.loads(data)
            assert reply == {"ok": True, "result": {"schema": 1, "master": {}, "workers": []}}
    finally:
        server.close()
        loop.close()


# ------------------------------------------------------------------ deferred replies

def _serve_deferred(path: str, log_path: Path, ready_w: int) -> None:
    """The child: ``reload`` answers later; ``scale 1`` settles the waiting
    reloads with success, ``scale 2`` with a failure (as a reload's outcome
    would), ``stop`` closes the server with reloads still waiting."""
    loop = EventLoop()
    log.configure(Settings(log_format="json", log_file=str(log_path), log_level="debug"))
    replies = control.AttemptReplies()

    def scale(workers: int) -> dict[str, int]:
        if workers == 1:
            replies.succeeded({"generation": 7})
        else:
            replies.failed("reload failed: workers: expected an integer")
        return {"workers": workers}

    server = ControlServer(loop, path, {
        "reload": lambda: replies.expect(during_attempt=False),
        "scale": scale,
        "status": lambda: {"master": {"pid": os.getpid()}, "workers": []},
        "stop": lambda graceful: loop.call_soon(loop.stop),
    })
    server.start()
    os.write(ready_w, b"r")
    os.close(ready_w)
    loop.run()
    server.close()
    loop.close()


@pytest.fixture
def deferring(socket_dir: Path) -> Iterator[Daemon]:
    path = str(socket_dir / "control.sock")
    log_path = socket_dir / "log.json"
    ready_r, ready_w = os.pipe()
    pid = _fork(lambda: _serve_deferred(path, log_path, ready_w))
    os.close(ready_w)
    d = Daemon(pid, path, log_path)
    try:
        with os.fdopen(ready_r, "rb") as ready:
            assert ready.read(1) == b"r", "the control server did not start"
        yield d
    finally:
        if d.exit_code is None:
            os.kill(pid, signal.SIGKILL)
            d.wait()


def _waiting(path: str) -> socket.socket:
    """A client whose reload request has been read and is now waiting."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    sock.sendall(b'{"command": "reload"}\n')
    return sock


def _reply(sock: socket.socket) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(sock.makefile("rb").readline())
    return reply


def _wait_for_request(daemon: Daemon, count: int) -> None:
    deadline = time.monotonic() + 10
    while sum(e["event"] == "control_request" and e["command"] == "reload"
              for e in daemon.events()) < count:
        assert time.monotonic() < deadline, "the reload requests were not read"
        control.request(daemon.path, "status", timeout=5)   # a round trip, not a sleep


def test_a_deferred_reply_waits_for_the_outcome_without_blocking_others(
        deferring: Daemon) -> None:
    with _waiting(deferring.path) as first, _waiting(deferring.path) as second:
        _wait_for_request(deferring, 2)
        # Both wait; the loop serves everyone else meanwhile.
        assert control.request(deferring.path, "status", timeout=5)["master"]["pid"] == \
            deferring.pid
        first.setblocking(False)
        with pytest.raises(BlockingIOError):
            first.recv(1)                      # no answer before the outcome
        first.setblocking(True)
        control.request(deferring.path, "scale", {"workers": 1})      # the outcome: success
        assert _reply(first) == {"ok": True, "result": {"generation": 7}}
        assert _reply(second) == {"ok": True, "result": {"generation": 7}}


def test_a_failed_outcome_makes_ctl_exit_1_with_the_reason(
        deferring: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    def settle_with_failure() -> None:
        _wait_for_request(deferring, 1)
        control.request(deferring.path, "scale", {"workers": 2})
        os._exit(0)

    helper = _fork(settle_with_failure)
    try:
        code, _, err = ctl(capsys, "--socket", deferring.path, "--timeout", "20", "reload")
    finally:
        assert wait_pid(helper, timeout=20) == 0
    assert code == cli.ExitCode.FAILURE
    assert "reload: reload failed: workers: expected an integer" in err


def test_a_client_that_gives_up_leaves_the_server_serving(
        deferring: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = ctl(capsys, "--socket", deferring.path, "--timeout", "0.5", "reload")
    assert code == cli.ExitCode.TEMPFAIL
    assert "no reply" in err and "the reload may still complete" in err
    control.request(deferring.path, "scale", {"workers": 1})   # settles a gone client
    assert control.request(deferring.path, "status")["master"]["pid"] == deferring.pid


def test_closing_answers_the_clients_still_waiting(deferring: Daemon) -> None:
    with _waiting(deferring.path) as waiting:
        _wait_for_request(deferring, 1)
        control.request(deferring.path, "stop")
        assert _reply(waiting) == {"ok": False,
                                   "error": "the master stopped before the outcome was known"}
    assert deferring.wait() == 0


def test_attempt_replies_go_to_the_attempt_that_saw_the_request() -> None:
    replies = control.AttemptReplies()
    first = replies.expect(during_attempt=False)       # starts attempt 1
    during = replies.expect(during_attempt=True)       # asked while 1 runs: merged into 2
    also = replies.expect(during_attempt=True)
    replies.failed("reload failed: 1")
    assert first.reply == {"ok": False, "error": "reload failed: 1"}
    assert not during.done and not also.done
    replies.succeeded({"generation": 2})
    assert during.reply == also.reply == {"ok": True, "result": {"generation": 2}}
    during.fail("too late")                            # the first outcome stands
    assert during.reply == {"ok": True, "result": {"generation": 2}}
    replies.succeeded(None)                            # nobody waits: nothing happens
