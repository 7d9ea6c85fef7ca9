"""Logging set-up: standard :mod:`logging`, three line formats, one handler.

* ``text`` on a terminal or file: ``2026-11-25 08:30:00,123 [pid] INFO name: message``.
* ``text`` under systemd (``$JOURNAL_STREAM`` names the device and inode
  of our stderr): ``<6>[pid] name: message``.  journald reads the ``<N>``
  syslog priority and stamps the time itself, so we add none.
* ``json``: one object per line with ``time``, ``level``, ``logger``,
  ``process`` (the pid that logged), ``message``, ``event`` (null when
  the call named none) and every ``extra=`` field of the call
  (see "Logging events" in docs/internals.md); tracebacks go in ``exc``.

:func:`configure` installs one handler on the root logger (replacing the
one it installed before, so a reload can call it again); handler code
that logs goes to the same place.  With ``log_file`` the handler appends
to that file, and :func:`reopen` (USR1, after log rotation) reopens it.

Workers inherit the handler across fork, and with it the old file.  They
may not be allowed to open the log file (they may run as another user),
so they do not reopen it themselves: the master hands each one its new
file (:func:`log_file_copy`, sent with REOPEN on the worker's channel)
and the worker switches to it (:func:`use_log_file`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Any, Final

from forkserver.config import ConfigError, Settings

__all__ = ["JournalFormatter", "JsonFormatter", "configure", "log_file_copy", "reopen",
           "under_journal", "use_log_file"]

# syslog(3) priorities, which journald reads from a "<N>" line prefix.
_PRIORITY: Final = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                    logging.ERROR: 3, logging.CRITICAL: 2}
# Attributes every LogRecord has; anything else came from extra=.
_STANDARD: Final = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_TEXT_FORMAT: Final = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
_MARK: Final = "_forkserver_handler"   # tags the handler configure() installed


def under_journal(stream: IO[str], environ: Mapping[str, str] = os.environ) -> bool:
    """True when *stream* is the journal stream systemd gave us (its
    ``dev:inode`` is ``$JOURNAL_STREAM``), not merely inherited from it."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError):
        return False


def _priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return _PRIORITY[logging.DEBUG]


class JournalFormatter(logging.Formatter):
    """``<N>[pid] name: message``; continuation lines carry the prefix too,
    so a traceback stays at its record's priority."""

    def __init__(self) -> None:
        super().__init__("[%(process)d] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra=`` fields are copied as they are
    (anything not JSON-serialisable as its ``str``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": record.process,      # "pid" is left to extra= (a worker's pid)
            "message": record.getMessage(),
            "event": getattr(record, "event", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _ReopenableFileHandler(logging.FileHandler):
    """Appends to a file; :meth:`reopen` switches to whatever is at the
    path now (the old file was renamed by logrotate)."""

    def reopen(self) -> None:
        self.replace(self._open())

    def replace(self, stream: IO[str]) -> None:
        """Write to *stream* from now on; the old one is closed."""
        self.acquire()
        try:
            old = self.stream
            self.stream = stream  # type: ignore[assignment]
            if old is not None:
                old.close()
        finally:
            self.release()


def _formatter(settings: Settings, stream: IO[str] | None,
               environ: Mapping[str, str]) -> logging.Formatter:
    if settings.log_format == "json":
        return JsonFormatter()
    if stream is not None and under_journal(stream, environ):
        return JournalFormatter()
    return logging.Formatter(_TEXT_FORMAT)


def configure(settings: Settings, *, stream: IO[str] | None = None,
              environ: Mapping[str, str] = os.environ) -> logging.Handler:
    """Install (or replace) our handler on the root logger per *settings*:
    ``log_file`` (else *stream*, default stderr), ``log_format``,
    ``log_level``.  Returns the handler.  A log file that cannot be opened
    raises ``ConfigError`` and leaves the current handler in place."""
    root = logging.getLogger()
    handler: logging.Handler
    if settings.log_file:
        try:
            handler = _ReopenableFileHandler(settings.log_file, mode="a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot open {settings.log_file}: {exc.strerror}",
                              key="log_file") from None
        handler.setFormatter(_formatter(settings, None, environ))
    else:
        out = stream if stream is not None else sys.stderr
        handler = logging.StreamHandler(out)
        handler.setFormatter(_formatter(settings, out, environ))
    setattr(handler, _MARK, True)
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    return handler


def reopen() -> None:
    """Reopen the log file, if logging goes to one (USR1).  If the new file
    cannot be opened, logging goes on into the old one and the error is
    raised as ``ConfigError``."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _ReopenableFileHandler):
            try:
                handler.reopen()
            except OSError as exc:
                raise ConfigError(f"cannot reopen {handler.baseFilename}: {exc.strerror}",
                                  key="log_file") from None


def log_file_copy() -> int | None:
    """A new descriptor of the log file being written now (the caller owns
    it), or None when logging goes to no file.  Raises ``OSError``."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _ReopenableFileHandler) and handler.stream is not None:
            return os.dup(handler.stream.fileno())
    return None


def use_log_file(fd: int) -> bool:
    """Log to the open file *fd* (which this takes) instead of the file
    opened before; False (and *fd* closed) when logging goes to no file."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _ReopenableFileHandler):
            handler.replace(open(fd, "a", encoding="utf-8"))  # noqa: SIM115 (the handler owns it)
            return True
    os.close(fd)
    return False
