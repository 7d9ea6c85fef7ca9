"""What the master's lines say: each start-up line its own news, audit lines without
stray spaces, an unnamed listener named once in ``ctl status``."""

from __future__ import annotations

from pathlib import Path

from forkserver import control
from tests.support import start_daemon


def test_start_up_lines_each_say_what_they_mean_and_audit_lines_are_tidy(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "ctl.sock")
    with start_daemon("tests.handlers.basic:pid", "--control-socket", path,
                      workers=2) as daemon:  # fmt: skip
        host, port = daemon.address
        started = daemon.wait_log("master_started")["message"]
        ready = daemon.wait_log("master_ready")["message"]
        assert started == f"master started: listening on {host}:{port}, starting 2 sync workers"
        assert ready == "2 of 2 workers ready: serving"
        assert sum("listening on" in r["message"] for r in daemon.logs.records) == 1
        control.request(path, "status")
        control.request(path, "scale", {"workers": 3})
        daemon.wait_log("control_request", command="scale")  # the reply can beat the log line
        audit = [r["message"] for r in daemon.records("control_request")]
        assert audit[0].startswith("control: status from uid ")
        assert audit[1].startswith("control: scale workers=3 from uid ")
        assert daemon.stop() == 0


def test_an_unnamed_listener_shows_its_address_once_and_a_named_one_its_name() -> None:
    status = {
        "master": {"pid": 1, "listeners": [
            {"name": "127.0.0.1:7102", "address": "127.0.0.1:7102", "fd": 5, "inode": 9},
            {"name": "web", "address": "[::1]:80", "fd": 6, "inode": 10,
             "backlog": 3, "backlog_limit": 2048},
        ]},
        "workers": [],
    }
    lines = control.format_status(status).splitlines()
    assert "  listener 127.0.0.1:7102 (fd 5, inode 9)" in lines
    assert "  listener web: [::1]:80 (fd 6, inode 10, backlog 3 of 2048)" in lines
