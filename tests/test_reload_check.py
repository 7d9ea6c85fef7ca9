"""The reload check runs off the master's loop: real daemons, real HUPs.

Each test makes the reload's check slow, stuck, hostile or impossible,
and shows that the master keeps serving and answering ``forkserver ctl
status`` meanwhile, that the reload fails with ``reload_failed`` and the
reason, and that the next good reload works.

How "the master does not block" is checked: not by a latency bound,
which a loaded 2-core machine can break for reasons that have nothing
to do with the master.  What cannot happen if the master blocks on the
check is that it answers ``status`` several times *while the check's
process is still running*: ``answers_while_checking`` asks N times and
checks after each answer that the check's process is still there.  The
check waits for the test (a gate file) or runs to its deadline, so a
master blocked on it would answer only once it had ended, and the
check after that answer fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from forkserver import control
from tests.loadgen import BackgroundLoad
from tests.support import Daemon, exchange, poll_until, start_daemon

ECHO = "forkserver.examples.echo:handle"
ANSWERS = 5
#: The one latency bound, for a check that ends too soon to be outlived
#: (a hostile config refused before it is parsed): generous, as a master
#: stalled in tomllib would take seconds.
ANSWER_BOUND = 1.0


@pytest.fixture
def code_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for handler modules and gates, on the daemon's path."""
    path = tmp_path / "code"
    path.mkdir()
    yield path


def _env(code_dir: Path) -> dict[str, str]:
    return {"PYTHONPATH": f"{code_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _config(path: Path, handler: str, extra: str = "") -> None:
    path.write_text(f'handler = "{handler}"\nreload_timeout = 60\n{extra}')


FAST = """
def handle(conn, peer):
    conn.sendall(b"fast " + conn.recv(100))
"""


def write_module(code_dir: Path, text: str, name: str = "swapped") -> str:
    """(Re)write module *name*; its handler spec.  The command line names the
    handler (``start_daemon``), so a reload changes the module, not the name."""
    path = code_dir / f"{name}.py"
    stamp = path.stat().st_mtime + 2 if path.exists() else time.time()  # never the old one's
    path.write_text(text)
    os.utime(path, (stamp, stamp))
    return f"{name}:handle"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def answers_while_checking(sock_path: Path, check_pid: int) -> None:
    """Ask ``status`` ANSWERS times while the check runs.

    Fails if the check's process is gone after an answer: then the
    answers prove nothing (a master blocked on the check would answer
    only once the check had ended).
    """
    for _ in range(ANSWERS):
        status = control.request(str(sock_path), "status", timeout=10)
        assert status["master"]["state"] == "reloading"
        assert _alive(check_pid), "the check ended before the master had answered: no proof"


def _checking(daemon: Daemon, index: int) -> int:
    """Send HUP; the pid of the reload check it starts (the *index*-th one)."""
    daemon.proc.send_signal(signal.SIGHUP)
    return int(nth_record(daemon, "reload_checking", index)["pid"])


def nth_record(daemon: Daemon, event: str, index: int) -> dict[str, object]:
    """The *index*-th (from 0) record of *event*, waiting for it if needed."""
    seen: list[dict[str, object]] = []

    def match(record: dict[str, object]) -> bool:
        if record.get("event") == event:
            seen.append(record)
        return len(seen) > index

    return daemon.logs.wait_for(match, 20, f"{event!r} number {index + 1}")


SLOW_IMPORT = """
import os, time
GATE = {gate!r}
while not os.path.exists(GATE):  # the test opens the gate once it has measured
    time.sleep(0.02)  # sleep-ok: a poll of the gate, the event this import waits for

def handle(conn, peer):
    conn.sendall(b"slow " + conn.recv(100))
"""


def test_a_slow_handler_import_does_not_stall_the_master(tmp_path: Path, code_dir: Path) -> None:
    gate = tmp_path / "gate"
    handler = write_module(code_dir, FAST)
    config, sock_path = tmp_path / "f.toml", tmp_path / "ctl.sock"
    _config(config, handler)
    env = {**_env(code_dir), "WATCHDOG_USEC": "400000"}
    with start_daemon(handler, "-c", str(config), "--control-socket", str(sock_path),
                      workers=2, env=env) as daemon:  # fmt: skip
        answers = (b"fast x", b"slow x")
        with BackgroundLoad(*daemon.address, total=None, concurrency=2, payload=b"x",
                            expect=lambda a: a in answers) as load:  # until stopped
            load.wait_answered(20)
            write_module(code_dir, SLOW_IMPORT.format(gate=str(gate)))
            check = _checking(daemon, 0)
            answers_while_checking(sock_path, check)
            before = len(daemon.notifications)
            daemon.wait_notify("WATCHDOG=1", since=before, timeout=10)
            assert _alive(check), "the watchdog ping came after the check: no proof"
            for _ in range(3):  # HUPs during the check merge into one more reload
                daemon.proc.send_signal(signal.SIGHUP)
                daemon.wait_log("reload_queued")
            gate.touch()
            daemon.wait_log("reload_completed", generation=1)
            daemon.wait_log("reload_completed", generation=2)
            load.wait_answered(load.answered + 20)  # the last generation serves it
            result = load.stop()  # fails if the load ended before the reloads did
        assert result.failures == [], result.failure_summary()
        status = control.request(str(sock_path), "status")
        assert (status["master"]["generation"], status["master"]["state"]) == (2, "running")
        assert len(daemon.records("reload_checking")) == 2
        with daemon.connect() as sock:
            assert exchange(sock, b"hi") == b"slow hi"
        assert daemon.stop() == 0


STUCK_IMPORT = """
import threading
threading.Event().wait()  # an import that never returns

def handle(conn, peer):
    pass
"""


def test_an_import_that_never_returns_fails_the_reload_at_its_deadline(
    tmp_path: Path, code_dir: Path
) -> None:
    handler = write_module(code_dir, FAST)
    config, sock_path = tmp_path / "f.toml", tmp_path / "ctl.sock"
    config.write_text(f'handler = "{handler}"\nreload_timeout = 3\n')
    with start_daemon(handler, "-c", str(config), "--control-socket", str(sock_path),
                      workers=2, env=_env(code_dir)) as daemon:  # fmt: skip
        before = sorted(p.pid for p in daemon.workers())
        write_module(code_dir, STUCK_IMPORT)
        check = _checking(daemon, 0)
        answers_while_checking(sock_path, check)
        failed = daemon.wait_log("reload_failed")
        assert failed["reason"] == ("the reload check did not finish within 3 s "
                                    "(reload_timeout); it was killed")  # fmt: skip
        assert not os.path.exists(f"/proc/{check}"), "the check was not killed and reaped"
        assert sorted(p.pid for p in daemon.workers()) == before
        status = control.request(str(sock_path), "status")
        assert status["master"]["last_reload_error"] == failed["reason"]
        with daemon.connect() as sock:
            assert exchange(sock, b"still") == b"fast still"
        write_module(code_dir, FAST)  # the next good reload works
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed", generation=1)
        assert daemon.stop() == 0


def _hostile(depth: int) -> str:
    return ".".join(["a"] * depth) + " = 1\n"


def test_a_hostile_config_fails_the_reload_without_stalling_the_master(tmp_path: Path) -> None:
    config, sock_path = tmp_path / "f.toml", tmp_path / "ctl.sock"
    _config(config, ECHO)
    with start_daemon(ECHO, "-c", str(config), "--control-socket", str(sock_path),
                      workers=2) as daemon:  # fmt: skip
        with BackgroundLoad(*daemon.address, total=None, concurrency=2) as load:  # until stopped
            load.wait_answered(20)
            config.write_text(_hostile(15_000))  # 30 KB: seconds of tomllib's time
            assert len(config.read_bytes()) < 32 * 1024
            daemon.proc.send_signal(signal.SIGHUP)
            while not daemon.records("reload_failed"):
                started = time.monotonic()
                control.request(str(sock_path), "status", timeout=10)
                took = time.monotonic() - started
                assert took < ANSWER_BOUND, f"status took {took:.2f} s during the reload"
            load.wait_answered(load.answered + 20)  # still served after the failed reload
            result = load.stop()  # fails if the load ended before the reload failed
        assert result.failures == [], result.failure_summary()
        failed = daemon.wait_log("reload_failed")
        assert failed["reason"] == (f"{config}:1: a dotted key of more than 32 parts (the "
                                    "limit); the file is refused before it is parsed")  # fmt: skip
        _config(config, ECHO)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed", generation=1)
        assert daemon.stop() == 0


def test_a_deep_dotted_key_under_a_memory_limit_fails_the_reload(tmp_path: Path) -> None:
    """tomllib's memory grows with the square of the depth: under a 1 GiB
    address-space limit a 20,000-part key raised MemoryError in the master."""
    config = tmp_path / "f.toml"
    _config(config, ECHO)
    with start_daemon(ECHO, "-c", str(config), workers=1) as daemon:
        limit = 1 << 30
        psutil.Process(daemon.pid).rlimit(psutil.RLIMIT_AS, (limit, limit))
        config.write_text(_hostile(20_000))
        daemon.proc.send_signal(signal.SIGHUP)
        failed = daemon.wait_log("reload_failed")
        assert "a dotted key of more than 32 parts" in failed["reason"]
        assert daemon.proc.poll() is None
        _config(config, ECHO)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed", generation=1)
        assert daemon.stop() == 0


def test_a_fifo_at_the_config_path_fails_the_reload_at_once(tmp_path: Path) -> None:
    config, sock_path = tmp_path / "f.toml", tmp_path / "ctl.sock"
    _config(config, ECHO)
    with start_daemon(ECHO, "-c", str(config), "--control-socket", str(sock_path),
                      workers=1) as daemon:  # fmt: skip
        config.unlink()
        os.mkfifo(config)  # opening it for reading would wait for a writer forever
        daemon.proc.send_signal(signal.SIGHUP)
        failed = daemon.wait_log("reload_failed")
        assert failed["reason"] == f"{config}: is a FIFO (named pipe), expected a regular TOML file"
        assert control.request(str(sock_path), "status", timeout=5)["master"]["pid"] == daemon.pid
        config.unlink()
        _config(config, ECHO)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed", generation=1)
        assert daemon.stop() == 0


def _lowest_free_fd(pid: int) -> int:
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    return next(fd for fd in range(len(used) + 1) if fd not in used)


def test_a_reload_out_of_descriptors_fails_and_the_master_lives(tmp_path: Path) -> None:
    config = tmp_path / "f.toml"
    _config(config, ECHO)
    with start_daemon(ECHO, "-c", str(config), workers=1) as daemon:
        master = psutil.Process(daemon.pid)
        saved = master.rlimit(psutil.RLIMIT_NOFILE)
        low = _lowest_free_fd(daemon.pid)  # no new descriptor at all from here on
        master.rlimit(psutil.RLIMIT_NOFILE, (low, saved[1]))
        daemon.proc.send_signal(signal.SIGHUP)
        failed = daemon.wait_log("reload_failed")
        assert failed["reason"] == "cannot start the reload check: Too many open files"
        master.rlimit(psutil.RLIMIT_NOFILE, saved)
        assert daemon.proc.poll() is None
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed", generation=1)
        assert daemon.stop() == 0


def test_a_check_killed_by_a_signal_fails_the_reload(tmp_path: Path, code_dir: Path) -> None:
    gate = tmp_path / "gate"
    handler = write_module(code_dir, FAST)
    with start_daemon(handler, workers=1, env=_env(code_dir)) as daemon:
        write_module(code_dir, SLOW_IMPORT.format(gate=str(gate)))
        check = _checking(daemon, 0)
        os.kill(check, signal.SIGKILL)
        failed = daemon.wait_log("reload_failed")
        assert failed["reason"].startswith("the reload check was killed by SIGKILL ")
        gate.touch()
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed", generation=1)
        assert daemon.stop() == 0


RECORDER = """
import json, os
OUT = {out!r}

def _descriptors():
    found = {{}}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{{name}}")
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return found

_fds = _descriptors()
_umask = os.umask(0)
os.umask(_umask)
with open(OUT, "a") as f:
    f.write(json.dumps({{"pid": os.getpid(), "uid": os.getresuid(), "gid": os.getresgid(),
                        "groups": sorted(os.getgroups()), "fds": _fds, "umask": _umask,
                        "cwd": os.getcwd()}}) + "\\n")

def handle(conn, peer):
    conn.sendall(b"recorded")
"""


def _records(out: Path) -> list[dict[str, object]]:
    import json  # noqa: PLC0415

    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that user nobody can read (tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="fs-shared-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to nobody needs root")
def test_the_check_imports_the_handler_as_the_user_with_only_its_report_pipe(
    shared_dir: Path,
) -> None:
    import pwd  # noqa: PLC0415

    shared = shared_dir
    out = shared / "imports.jsonl"
    out.touch()
    out.chmod(0o666)  # nobody appends its records
    (shared / "recorder.py").write_text(textwrap.dedent(RECORDER.format(out=str(out))))
    config = shared / "f.toml"
    config.write_text('handler = "recorder:handle"\nuser = "nobody"\n')
    config.chmod(0o600)  # only root reads it: the settings are read before the drop
    nobody = pwd.getpwnam("nobody")
    expected_groups = sorted(set(os.getgrouplist("nobody", nobody.pw_gid)))
    with start_daemon("recorder:handle", "-c", str(config), workers=1,
                      env=_env(shared)) as daemon:  # fmt: skip
        daemon.wait_log("master_ready")  # READY=1 may come before the log lines are read
        workers = {int(r["pid"]) for r in daemon.records("worker_spawned")}
        poll_until(lambda: len(_records(out)) >= 2, "the probe and the worker imported")
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed", generation=1)
        workers |= {int(r["pid"]) for r in daemon.records("worker_spawned")}
        poll_until(lambda: len(_records(out)) >= 4, "the reload's probe and worker imported")
        records = _records(out)
        probes = [r for r in records if r["pid"] not in workers]
        assert len(probes) == 2, records  # at start, and at the reload
        worker = next(r for r in records if r["pid"] in workers)
        for record in probes:
            assert record["uid"] == [nobody.pw_uid] * 3
            assert record["gid"] == [nobody.pw_gid] * 3
            assert record["groups"] == expected_groups
            fds = {int(fd): target for fd, target in record["fds"].items()}  # type: ignore[attr-defined]
            extra = {fd: target for fd, target in fds.items() if fd > 2}
            assert len(extra) == 1 and next(iter(extra.values())).startswith("pipe:"), fds
            assert (record["umask"], record["cwd"]) == (worker["umask"], worker["cwd"])
        assert daemon.stop() == 0
