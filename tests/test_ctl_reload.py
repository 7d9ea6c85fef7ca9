"""``forkserver ctl reload`` answers with the reload's outcome: once the new
generation serves, or with exit 1 and why it failed (real daemon, real ctl)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, TIMEOUT, Daemon, start_daemon

GATED = "tests.handlers.gated_import:handle"


def ctl(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forkserver", "ctl", "--socket", str(path), *args],
        check=False, capture_output=True, text=True, timeout=TIMEOUT * 3, cwd=ROOT,
    )  # fmt: skip


def ctl_in_background(path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "forkserver", "ctl", "--socket", str(path), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


def status(path: Path) -> dict[str, Any]:
    done = ctl(path, "status", "--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@contextmanager
def daemon_with_config(tmp_path: Path, text: str = "workers = 2\n",
                       env: dict[str, str] | None = None) -> Iterator[tuple[Daemon, Path, Path]]:
    conf, sock = tmp_path / "f.toml", tmp_path / "ctl.sock"
    conf.write_text(text)
    with start_daemon(GATED, "-c", str(conf), "--control-socket", str(sock), bind=True,
                      workers=2, env=env) as daemon:  # fmt: skip
        yield daemon, conf, sock


@contextmanager
def closed_gate(path: Path) -> Iterator[socket.socket]:
    """New workers wait at import until the gate is opened (closed here)."""
    gate = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    gate.bind(str(path))
    gate.listen(64)
    try:
        yield gate
    finally:
        gate.close()
        path.unlink(missing_ok=True)


def test_ctl_reload_returns_once_the_new_generation_serves(tmp_path: Path) -> None:
    gate_path = tmp_path / "gate"
    with daemon_with_config(tmp_path, env={"TEST_GATE": str(gate_path)}) as (daemon, _, sock):
        old = {p.pid for p in daemon.workers()}
        with closed_gate(gate_path) as gate:
            reload = ctl_in_background(sock, "reload")
            daemon.wait_log("reload_started", generation=1)
            # The new workers are held at import: no answer while they are.
            with pytest.raises(subprocess.TimeoutExpired):
                reload.wait(timeout=3)  # sleep-ok: a bounded wait for an answer that must not come
            assert status(sock)["master"]["generation"] == 0
            gate.close()                           # let them start
            out, err = reload.communicate(timeout=TIMEOUT)
        assert reload.returncode == 0, err
        assert out == "generation: 1\n"
        now = status(sock)                         # true the moment ctl returned
        assert now["master"]["generation"] == 1
        assert now["master"]["last_reload_error"] is None
        serving = {w["pid"] for w in now["workers"] if w["generation"] == 1}
        assert len(serving) == 2 and not serving & old
        with daemon.connect() as conn:
            assert int(conn.makefile().readline()) in serving


def test_ctl_reload_of_a_broken_file_exits_1_and_names_the_key(tmp_path: Path) -> None:
    with daemon_with_config(tmp_path) as (daemon, conf, sock):
        workers = {p.pid for p in daemon.workers()}
        conf.write_text('workers = "many"\n')
        done = ctl(sock, "reload")
        assert done.returncode == 1, done.stderr
        assert "forkserver ctl: reload: reload failed:" in done.stderr
        assert f"{conf}:1, key 'workers'" in done.stderr
        assert {p.pid for p in daemon.workers()} == workers      # untouched, serving
        assert status(sock)["master"]["last_reload_error"]
        with daemon.connect() as conn:
            assert int(conn.makefile().readline()) in workers


def test_ctl_reload_exits_1_when_a_new_worker_cannot_start(tmp_path: Path) -> None:
    marker = tmp_path / "fail"
    env = {"TEST_FAIL_MARKER": str(marker)}
    with daemon_with_config(tmp_path, env=env) as (daemon, _, sock):
        workers = {p.pid for p in daemon.workers()}
        marker.touch()                 # the master's check passes, the workers fail
        done = ctl(sock, "reload")
        assert done.returncode == 1, done.stderr
        assert "of the new generation" in done.stderr
        assert "before it was ready" in done.stderr
        assert status(sock)["master"]["generation"] == 0
        with daemon.connect() as conn:
            assert int(conn.makefile().readline()) in workers


def test_a_reload_asked_for_during_another_is_answered_by_the_next(tmp_path: Path) -> None:
    gate_path = tmp_path / "gate"
    with daemon_with_config(tmp_path, env={"TEST_GATE": str(gate_path)}) as (daemon, conf, sock):
        with closed_gate(gate_path) as gate:
            first = ctl_in_background(sock, "reload")
            daemon.wait_log("reload_started", generation=1)
            conf.write_text('name = "second"\n')   # only the next reload sees this
            second = ctl_in_background(sock, "reload")
            daemon.wait_log("reload_queued")
            gate.close()
            first_out, first_err = first.communicate(timeout=TIMEOUT)
            second_out, second_err = second.communicate(timeout=TIMEOUT)
        assert (first.returncode, first_out) == (0, "generation: 1\n"), first_err
        assert (second.returncode, second_out) == (0, "generation: 2\n"), second_err
        now = status(sock)
        assert now["master"]["generation"] == 2
        assert now["master"]["name"] == "second"
        assert daemon.stop() == 0
