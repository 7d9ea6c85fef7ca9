"""USR2: replace the master itself, handing the listening sockets over.

The old master forks and, in the child, execs the very command it was
started with (``sys.orig_argv``).  The listening sockets go over as
inherited descriptors, exactly as systemd socket activation passes them:
descriptors 3, 4, ... with ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and
``LISTEN_PID`` (set in the child after fork, so it is the new master's
own pid).  One more inherited descriptor, the write end of a pipe, is
how the new master says it is ready; ``FORKSERVER__UPGRADE`` (JSON) names
it, with the old master's pid and what each listener was::

    {"ready_fd": 5, "old_pid": 1234,
     "listeners": [{"name": "127.0.0.1:8000", "inherited": false, "path": null}]}

``inherited`` is true for a socket the old master itself was given
(systemd, ``fd://``): the new master leaves it open on stop, as the old
one would have.  ``path`` is a Unix socket file the old master created;
the new master removes it when it stops, the old one no longer does.

The new master adopts the handed sockets in place of its configured
binds, starts its workers and, once every one is ready, writes
``ready`` to the pipe.  The old master then stops gracefully and exits.
If the new master exits first, or closes the pipe without a word, or is
not ready in time, the old master logs why and keeps serving.  The new
master waits for the old one to exit (a pidfd) before it takes the pid
file and the control socket, which the old one holds until then.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from forkserver.errors import ForkserverError
from forkserver.forking import fork_child
from forkserver.systemd import SD_LISTEN_FDS_START, InheritedSocket, listen_fds, valid_fd_name

ENV: Final = "FORKSERVER__UPGRADE"  # the reserved prefix: no setting may take it
#: The most bytes of ``FORKSERVER__UPGRADE`` the new master will read.
MAX_ENV: Final = 65536
#: Seconds the old master gives the new one to report ready.
READY_TIMEOUT: Final = 60.0
READY_WORD: Final = b"ready\n"
_EXEC_FAILED: Final = 127


#: Where the master was started: ``chdir`` may move it later, but the command it
#: re-executes may name files relative to here.  (Read when the master imports
#: this module, which the command line does before it applies ``chdir``.)
START_DIRECTORY: Final = os.getcwd()


class UpgradeError(ForkserverError):
    """The hand-over from an old master is malformed or unusable."""


@dataclass(frozen=True, slots=True)
class HandedListener:
    fd: int
    name: str
    inherited: bool  # the old master was given it (systemd, fd://): leave it open on stop
    path: str | None  # a Unix socket file to remove when the owner stops


@dataclass(slots=True)
class Upgrade:
    """The old master's view of a new master that is starting."""

    pid: int
    ready_fd: int  # read end: "ready", or end of file if the new master gave up


def new_master_argv() -> list[str]:
    """The command this master was started with, to run it again."""
    return [sys.executable, *sys.orig_argv[1:]]


def start_new_master(
    argv: Sequence[str], listeners: Sequence[HandedListener], env: Mapping[str, str]
) -> Upgrade:
    """Fork and exec *argv* with *listeners* handed over; raises OSError."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    try:
        # The group's signals stay blocked across the exec, until the new
        # master's loop handles them: the default action would kill it.
        pid = fork_child()
    except OSError:
        os.close(ready_r)
        os.close(ready_w)
        raise
    if pid == 0:
        _exec_child(argv, listeners, env, ready_w)
    os.close(ready_w)
    os.set_blocking(ready_r, False)
    return Upgrade(pid=pid, ready_fd=ready_r)


def _exec_child(
    argv: Sequence[str], listeners: Sequence[HandedListener], env: Mapping[str, str], ready_w: int
) -> NoReturn:
    """In the forked child: lay the descriptors out from 3, then exec."""
    try:
        sources = [item.fd for item in listeners] + [ready_w]
        # First above every target, so no dup2 overwrites a source still needed.
        top = SD_LISTEN_FDS_START + len(sources)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in sources]
        for offset, fd in enumerate(high):
            os.dup2(fd, SD_LISTEN_FDS_START + offset, inheritable=True)
        ready_fd = SD_LISTEN_FDS_START + len(listeners)
        os.chdir(START_DIRECTORY)
        os.execve(argv[0], list(argv), _child_environ(listeners, env, ready_fd))  # noqa: S606 (no shell: argv as given)
    except BaseException as exc:  # nothing may unwind into the master's frames
        with contextlib.suppress(OSError):
            os.write(2, f"forkserver: cannot re-execute the master: {exc}\n".encode())
    os._exit(_EXEC_FAILED)


def _child_environ(
    listeners: Sequence[HandedListener], env: Mapping[str, str], ready_fd: int
) -> dict[str, str]:
    handover = {
        "ready_fd": ready_fd,
        "old_pid": os.getppid(),
        "listeners": [
            {"name": item.name, "inherited": item.inherited, "path": item.path}
            for item in listeners
        ],
    }
    names = [
        item.name if valid_fd_name(item.name) else f"listener{index}"
        for index, item in enumerate(listeners)
    ]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    environ.update(env)
    environ.update(
        LISTEN_FDS=str(len(listeners)),
        LISTEN_FDNAMES=":".join(names),
        LISTEN_PID=str(os.getpid()),
        **{ENV: json.dumps(handover)},
    )
    return environ


def read_ready(upgrade: Upgrade) -> bool | None:
    """True once the new master said ready, False at end of file, None: not yet."""
    try:
        data = os.read(upgrade.ready_fd, 64)
    except BlockingIOError:
        return None
    except OSError:
        return False
    if not data:
        return False
    return data.startswith(READY_WORD.strip())


# --- the new master's side ---------------------------------------------


@dataclass(slots=True)
class Handover:
    """What a new master was given by the old one."""

    old_pid: int
    ready_fd: int
    listeners: list[HandedListener]

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] = os.environ) -> Handover | None:
        """Claim the hand-over (None if this master was not started by USR2).

        Removes ``FORKSERVER__UPGRADE`` and the ``LISTEN_*`` variables, so
        no worker inherits them, and makes every handed descriptor
        close-on-exec.  Raises ``UpgradeError`` naming what is wrong.
        """
        text = environ.pop(ENV, None)
        if text is None:
            return None
        try:
            inherited = listen_fds(environ)
        except ForkserverError as exc:
            raise UpgradeError(f"{ENV}: {exc}") from None
        spec = _parse(text)
        return cls._build(spec, inherited)

    @classmethod
    def _build(cls, spec: dict[str, Any], inherited: list[InheritedSocket]) -> Handover:
        described = spec["listeners"]
        if len(described) != len(inherited):
            raise UpgradeError(
                f"{ENV}: {len(described)} listeners described, {len(inherited)} passed (LISTEN_FDS)"
            )
        ready_fd = spec["ready_fd"]
        if ready_fd != SD_LISTEN_FDS_START + len(inherited):
            raise UpgradeError(f"{ENV}: ready_fd {ready_fd} is not just after the listeners")
        try:
            os.set_inheritable(ready_fd, False)
        except OSError as exc:
            raise UpgradeError(f"{ENV}: ready_fd {ready_fd}: {exc.strerror}") from None
        handed = [
            HandedListener(fd=sock.fd, name=item["name"], inherited=item["inherited"],
                           path=item["path"])
            for sock, item in zip(inherited, described, strict=True)
        ]  # fmt: skip
        return cls(old_pid=spec["old_pid"], ready_fd=ready_fd, listeners=handed)

    def report_ready(self) -> None:
        """Tell the old master to stop (once; an old master already gone is fine)."""
        if self.ready_fd < 0:
            return
        fd, self.ready_fd = self.ready_fd, -1
        try:
            os.write(fd, READY_WORD)
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
        finally:
            os.close(fd)

    def close(self) -> None:
        """Give up without a word: the old master sees end of file."""
        if self.ready_fd >= 0:
            os.close(self.ready_fd)
            self.ready_fd = -1


def _parse(text: str) -> dict[str, Any]:
    if len(text) > MAX_ENV:
        raise UpgradeError(f"{ENV} is {len(text)} bytes, more than {MAX_ENV}")
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError):
        raise UpgradeError(f"{ENV} is not JSON") from None
    if not isinstance(spec, dict) or set(spec) != {"ready_fd", "old_pid", "listeners"}:
        raise UpgradeError(f"{ENV}: expected the keys ready_fd, old_pid and listeners")
    for key in ("ready_fd", "old_pid"):
        value = spec[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
            raise UpgradeError(f"{ENV}: {key} must be a positive integer, not {value!r}")
    items = spec["listeners"]
    if not isinstance(items, list) or not all(_valid_listener(item) for item in items):
        raise UpgradeError(
            f"{ENV}: listeners must be a list of "
            '{"name": str, "inherited": bool, "path": str or null}'
        )
    return spec


def _valid_listener(item: object) -> bool:
    return (
        isinstance(item, dict)
        and set(item) == {"name", "inherited", "path"}
        and isinstance(item["name"], str)
        and len(item["name"]) <= 4096
        and isinstance(item["inherited"], bool)
        and (item["path"] is None or (isinstance(item["path"], str) and len(item["path"]) <= 4096))
    )
