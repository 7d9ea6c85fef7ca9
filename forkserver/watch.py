"""``reload = true``: the handler's source files, watched from the master's loop.

A development aid, as gunicorn's ``--reload``: when a watched file
changes, the master reloads as on HUP (a new generation imports the new
code; the old one finishes what it holds, so no connection fails).

The master never imports the handler, so it cannot ask ``sys.modules``
which files the handler loaded.  It finds them without importing
anything: the handler's top-level module is looked up on ``sys.path``
(``importlib.machinery.PathFinder``, which only stats and lists
directories), and for a package every ``*.py`` below it is watched, up
to ``MAX_FILES``; ``reload_extra_files`` adds more (modules imported
from outside the handler's package, a config file, templates).  The
list is taken at start and again after each change, so a new module is
watched once a changed file starts importing it.

Polling, not inotify: every ``POLL_INTERVAL`` seconds a timer stats the
next ``FILES_PER_TICK`` files (round robin), so a tick's work is bounded
whatever the tree's size, and nothing a file does can block the loop
(``os.stat`` of a regular file, never an open).  A file counts as
changed when its mtime, size or inode differ (an editor that replaces
the file counts), or it appeared or vanished.
"""

from __future__ import annotations

import importlib.machinery
import logging
import os
import sys
from collections.abc import Callable, Iterable
from typing import Final

from forkserver.config import Settings
from forkserver.eventloop import EventLoop, TimerHandle

__all__ = ["SourceWatcher", "handler_sources", "watched_files"]

log = logging.getLogger("forkserver.master")

POLL_INTERVAL: Final = 1.0
FILES_PER_TICK: Final = 256
MAX_FILES: Final = 4096

Stamp = tuple[int, int, int] | None


def handler_sources(spec: str, path: Iterable[str] | None = None) -> list[str]:
    """The source files of the module or package *spec* names, found without importing."""
    top = spec.partition(":")[0].split(".")[0]
    if not top.isidentifier():
        return []
    cwd = os.getcwd()
    where = [entry or cwd for entry in (["", *sys.path] if path is None else path)]
    try:
        found = importlib.machinery.PathFinder.find_spec(top, where)
    except (ImportError, OSError, ValueError):
        return []
    if found is None:
        return []
    if found.submodule_search_locations:
        return _tree(found.submodule_search_locations)
    if found.has_location and found.origin and found.origin.endswith(".py"):
        return [found.origin]
    return []


def _tree(roots: Iterable[str]) -> list[str]:
    files: list[str] = []
    for root in roots:
        for directory, subdirs, names in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d != "__pycache__")
            files.extend(os.path.join(directory, name) for name in sorted(names)
                         if name.endswith(".py"))  # fmt: skip
            if len(files) >= MAX_FILES:
                return files[:MAX_FILES]
    return files


def watched_files(settings: Settings) -> list[str]:
    """The handler's sources and ``reload_extra_files`` (relative to the master's directory)."""
    files = handler_sources(settings.handler)
    files += [os.path.abspath(path) for path in settings.reload_extra_files]
    return list(dict.fromkeys(files))[:MAX_FILES + len(settings.reload_extra_files)]


def _stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class SourceWatcher:
    """Polls the files *files()* names; *changed(path)* once per tick that saw a change."""

    def __init__(self, loop: EventLoop, files: Callable[[], list[str]],
                 changed: Callable[[str], None], *, interval: float = POLL_INTERVAL,
                 per_tick: int = FILES_PER_TICK) -> None:
        self.loop = loop
        self.files = files
        self.changed = changed
        self.interval = interval
        self.per_tick = per_tick
        self.stamps: dict[str, Stamp] = {}
        self._order: list[str] = []
        self._next = 0
        self._timer: TimerHandle | None = None

    def start(self) -> None:
        """Take the list and every file's stamp, then poll."""
        self._relist()
        log.info("reload: watching %d files for changes", len(self._order),
                 extra={"event": "reload_watching", "files": len(self._order)})  # fmt: skip
        self._timer = self.loop.call_later(self.interval, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _relist(self) -> None:
        """The list again, each file stamped now: at start, and once per change
        (a reload is starting anyway, so one pass over every file is due)."""
        order = self.files()
        self.stamps = {path: _stamp(path) for path in order}
        self._order, self._next = order, 0

    def _tick(self) -> None:
        self._timer = self.loop.call_later(self.interval, self._tick)  # first: never lost
        batch = self._order[self._next : self._next + self.per_tick]
        self._next = self._next + self.per_tick if self._next + self.per_tick < len(self._order) \
            else 0  # fmt: skip
        changed = None
        for path in batch:
            stamp = _stamp(path)
            if stamp != self.stamps.get(path):
                self.stamps[path] = stamp
                changed = changed or path
        if changed is None:
            return
        log.info("reload: %s changed", changed,
                 extra={"event": "reload_source_changed", "path": changed})  # fmt: skip
        self._relist()
        self.changed(changed)
