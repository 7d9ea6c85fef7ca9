"""Log formats: plain text with timestamps, journald priorities, JSON
lines with events; a log file reopened after rotation."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import IO

import pytest

from forkserver import log
from forkserver.config import ConfigError, Settings

LOG = logging.getLogger("forkserver.test")


pytestmark = pytest.mark.usefixtures("restore_root_logger")


def settings(**changes: object) -> Settings:
    return dataclasses.replace(Settings(), **changes)  # type: ignore[arg-type]


def journal_env(stream: IO[str]) -> dict[str, str]:
    st = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_text_lines_have_timestamps_pid_level_and_logger(tmp_path: Path) -> None:
    with open(tmp_path / "out", "w+") as stream:
        handler = log.configure(settings(), stream=stream, environ={})
        LOG.info("hello %s", "there")
        handler.flush()
        stream.seek(0)
        line = stream.read()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
                        rf"\[{os.getpid()}\] INFO forkserver\.test: hello there\n", line)


def test_journald_lines_carry_priorities_and_no_timestamp(tmp_path: Path) -> None:
    with open(tmp_path / "out", "w+") as stream:
        environ = journal_env(stream)
        handler = log.configure(settings(log_level="debug"), stream=stream, environ=environ)
        assert log.under_journal(stream, environ)
        LOG.debug("d")
        LOG.info("i")
        LOG.warning("w")
        LOG.error("e")
        LOG.critical("c")
        try:
            raise ValueError("boom")
        except ValueError:
            LOG.exception("failed")
        handler.flush()
        stream.seek(0)
        lines = stream.read().splitlines()
    pid = os.getpid()
    assert lines[:5] == [f"<7>[{pid}] forkserver.test: d", f"<6>[{pid}] forkserver.test: i",
                         f"<4>[{pid}] forkserver.test: w", f"<3>[{pid}] forkserver.test: e",
                         f"<2>[{pid}] forkserver.test: c"]
    assert lines[5] == f"<3>[{pid}] forkserver.test: failed"
    assert len(lines) > 7                              # the traceback ...
    assert all(line.startswith("<3>") for line in lines[6:])   # ... stays at error
    assert lines[-1] == "<3>ValueError: boom"


def test_journal_stream_of_another_file_is_not_ours(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w+") as ours, open(tmp_path / "b", "w") as other:
        environ = journal_env(other)
        assert not log.under_journal(ours, environ)
        assert not log.under_journal(ours, {"JOURNAL_STREAM": "garbage"})
        handler = log.configure(settings(), stream=ours, environ=environ)
        LOG.warning("x")
        handler.flush()
        ours.seek(0)
        assert re.match(r"\d{4}-", ours.read())


def test_json_lines_carry_event_and_extra_fields(tmp_path: Path) -> None:
    with open(tmp_path / "out", "w+") as stream:
        handler = log.configure(settings(log_format="json"), stream=stream,
                                environ=journal_env(stream))   # JSON even under journald
        LOG.info("worker %d (pid %d) exited: %s", 1, 123, "exit code 3",
                 extra={"event": "worker_exited", "slot": 1, "pid": 123, "code": 3,
                        "odd": {1, 2}.__class__})
        LOG.info("no event")
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            LOG.exception("oops", extra={"event": "handler_error"})
        handler.flush()
        stream.seek(0)
        records = [json.loads(line) for line in stream.read().splitlines()]
    first = records[0]
    assert first["event"] == "worker_exited"
    assert first["message"] == "worker 1 (pid 123) exited: exit code 3"
    assert (first["slot"], first["pid"], first["code"]) == (1, 123, 3)
    assert first["odd"] == "<class 'set'>"
    assert (first["level"], first["logger"], first["process"]) == ("info", "forkserver.test",
                                                                    os.getpid())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert records[1]["event"] is None
    assert records[2]["event"] == "handler_error"
    assert "ZeroDivisionError" in records[2]["exc"]
    assert len(records) == 3


def test_level_filters() -> None:
    log.configure(settings(log_level="warning"), environ={})
    assert not LOG.isEnabledFor(logging.INFO)
    assert LOG.isEnabledFor(logging.WARNING)


def test_configure_again_replaces_its_handler(tmp_path: Path) -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        first = log.configure(settings(), stream=a, environ={})
        second = log.configure(settings(), stream=b, environ={})
        assert first not in root.handlers
        assert second in root.handlers
        assert len(root.handlers) == before + 1


def test_log_file_is_reopened_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "forkserver.log"
    log.configure(settings(log_file=str(path)), environ={})
    LOG.warning("before rotation")
    path.rename(tmp_path / "forkserver.log.1")
    LOG.warning("still into the renamed file")
    log.reopen()
    LOG.warning("after reopen")
    for handler in logging.getLogger().handlers:
        handler.flush()
    old = (tmp_path / "forkserver.log.1").read_text()
    assert "before rotation" in old
    assert "still into the renamed file" in old
    new = path.read_text()
    assert "after reopen" in new
    assert "rotation" not in new


def test_reopen_without_a_log_file_does_nothing(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as stream:
        handler = log.configure(settings(), stream=stream, environ={})
        log.reopen()
        assert handler in logging.getLogger().handlers


def test_unopenable_log_file_is_a_config_error(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as stream:
        handler = log.configure(settings(), stream=stream, environ={})
        missing = tmp_path / "no" / "such" / "dir.log"
        with pytest.raises(ConfigError, match=r"^key 'log_file': cannot open .*dir\.log: No such"):
            log.configure(settings(log_file=str(missing)), environ={})
        assert handler in logging.getLogger().handlers


def test_failed_reopen_keeps_logging_to_the_old_file(tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log.configure(settings(log_file=str(logdir / "x.log")), environ={})
    (logdir / "x.log").rename(tmp_path / "x.log.1")
    logdir.rmdir()
    with pytest.raises(ConfigError, match="cannot reopen"):
        log.reopen()
    LOG.warning("still logged")
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert "still logged" in (tmp_path / "x.log.1").read_text()
