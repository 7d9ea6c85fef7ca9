"""Who the processes run as, and the pid file that marks the master.

The master keeps the uid it was started with.  It needs root (when it
has it) to bind privileged ports again on reload and to re-exec on
upgrade, and it never runs handler code.  Every process that runs
handler code (each worker, and the handler probe) calls
:func:`drop_privileges` right after fork, before it imports or runs the
handler; ``PR_SET_PDEATHSIG`` must be set *after* it, because any change
of credentials clears the parent-death signal.

:func:`drop_privileges` is the whole lock-down, in this order:

1. When the process leaves root for another user, every capability is
   dropped from its bounding set (``PR_CAPBSET_DROP`` for each one up to
   ``/proc/sys/kernel/cap_last_cap``): nothing it executes later, a
   setuid-root program or one with file capabilities included, can gain
   a capability back.  This needs ``CAP_SETPCAP``, which the uid switch
   takes away, so it comes first.  A process that stays root (no
   ``user``, or ``user = "root"``) keeps its bounding set and its
   capabilities: it runs as root because the configuration says so, and
   root without capabilities still owns every root-owned file, so
   stripping them would only break the handler, not confine it.
2. Supplementary groups (``initgroups`` needs root), then the gid, then
   the uid, each with the ``setres*`` call so the real, effective and
   saved ids all change and none can be taken back.
3. ``PR_SET_NO_NEW_PRIVS``, always: from then on ``execve`` never grants
   privileges (setuid and setgid bits and file capabilities are
   ignored), for this process and everything it starts.  It is harmless
   for a process that needs none, and it cannot be undone.

:func:`resolve` checks the names without changing anything, so the master
can refuse an unknown user before it forks a single worker
(:func:`check_can_switch` also refuses one this process cannot become).

:class:`PidFile` is the master's pid file: created atomically (a
complete file appears under its name, or none does), refused while
another live master holds it, replaced when its holder is gone, and
removed on exit only if it still names us.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import grp
import os
import pwd
import tempfile
from dataclasses import dataclass
from typing import Final

from forkserver.errors import ForkserverError

__all__ = ["Credentials", "PidFile", "PidFileError", "PrivilegeError", "check_can_switch",
           "drop_privileges", "resolve"]

MAX_PID_FILE: Final = 64       # "4194304\n" is 8 bytes; anything long is not ours
_CAP_SETGID: Final = 6
_CAP_SETUID: Final = 7
_PR_CAPBSET_READ: Final = 23   # <linux/prctl.h>
_PR_CAPBSET_DROP: Final = 24
_PR_SET_NO_NEW_PRIVS: Final = 38


class PrivilegeError(ForkserverError):
    """The user or group is unknown, or the switch to it failed."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a worker becomes: uid, gid and supplementary groups.
    ``uid`` None keeps the current user (only a group was asked for)."""

    uid: int | None
    gid: int
    groups: tuple[int, ...]
    user: str


def _lookup_user(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError, ValueError):
        raise PrivilegeError(f"user {user!r} does not exist") from None


def _lookup_group(group: str) -> int:
    try:
        return grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
    except (KeyError, OverflowError, ValueError):
        raise PrivilegeError(f"group {group!r} does not exist") from None


def resolve(user: str | None, group: str | None) -> Credentials | None:
    """The credentials *user*/*group* name (a name or a number), or None
    if neither is given.  Without *group* the user's primary group is used;
    the supplementary groups are the user's, as login would set them."""
    if not user and not group:
        return None
    pw = _lookup_user(user) if user else None
    gid = _lookup_group(group) if group else (pw.pw_gid if pw else os.getgid())
    if pw is None:
        return Credentials(uid=None, gid=gid, groups=(), user="")
    try:
        groups = tuple(os.getgrouplist(pw.pw_name, gid))
    except OSError as exc:
        raise PrivilegeError(f"cannot list the groups of user {pw.pw_name!r}: "
                             f"{exc.strerror}") from None
    return Credentials(uid=pw.pw_uid, gid=gid, groups=groups, user=pw.pw_name)


def check_can_switch(user: str | None, group: str | None) -> Credentials | None:
    """The credentials of *user*/*group*, if this process can switch to them.

    Raises :class:`PrivilegeError` naming the user or group otherwise, so
    that a master started without root refuses to start (or to reload)
    instead of forking workers that all fail in :func:`drop_privileges`.
    Without ``CAP_SETUID`` only a uid the process already holds (real,
    effective or saved) is reachable, likewise for the gid without
    ``CAP_SETGID``: switching to one's own user is fine without root.
    """
    creds = resolve(user, group)
    if creds is None:
        return None
    effective = _effective_capabilities()
    uids, gids = os.getresuid(), os.getresgid()
    if creds.uid is not None and creds.uid not in uids and not effective >> _CAP_SETUID & 1:
        raise PrivilegeError(
            f"cannot switch to user {creds.user!r} (uid {creds.uid}): this process runs as "
            f"uid {os.geteuid()} without the right to change it (CAP_SETUID); start it as "
            "root, or leave `user` unset to run the workers as this user"
        )
    if creds.gid not in gids and not effective >> _CAP_SETGID & 1:
        what = f"group {group!r}" if group else f"the primary group of user {creds.user!r}"
        raise PrivilegeError(
            f"cannot switch to {what} (gid {creds.gid}): this process runs as gid "
            f"{os.getegid()} without the right to change it (CAP_SETGID); start it as "
            "root, or leave `group` unset"
        )
    return creds


def _effective_capabilities() -> int:
    """The ``CapEff`` mask of this process (0 if it cannot be read)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f.read(1 << 16).splitlines():
                if line.startswith(b"CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0 if os.geteuid() != 0 else ~0


def drop_privileges(user: str | None, group: str | None) -> None:
    """Lock this process down before it runs handler code (see the module
    docstring): become *user* (with its supplementary groups) and *group*,
    dropping the capability bounding set when that leaves root, then set
    ``PR_SET_NO_NEW_PRIVS`` (with both None that is all it does).  Raises
    :class:`PrivilegeError` naming what failed."""
    creds = resolve(user, group)
    if creds is not None:
        if creds.uid not in (None, 0) and os.geteuid() == 0:
            _drop_bounding_set()
        _switch(creds, f"user {user!r}" if user else f"group {group!r}")
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def _drop_bounding_set() -> None:
    """Remove every capability from the bounding set (needs CAP_SETPCAP)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            last = int(f.read(16))
    except (OSError, ValueError) as exc:
        raise PrivilegeError(f"cannot read /proc/sys/kernel/cap_last_cap: {exc}") from None
    for cap in range(last + 1):
        # Only those still in the set: with none left, CAP_SETPCAP is not needed.
        if _prctl(_PR_CAPBSET_READ, cap, f"PR_CAPBSET_READ of capability {cap}"):
            _prctl(_PR_CAPBSET_DROP, cap, f"PR_CAPBSET_DROP of capability {cap}")


def _prctl(option: int, arg: int, what: str) -> int:
    """``prctl(option, arg, 0, 0, 0)``; its result, or PrivilegeError naming *what*."""
    result: int = _libc().prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0),
                                ctypes.c_ulong(0), ctypes.c_ulong(0))  # fmt: skip
    if result < 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"prctl({what}) failed: {os.strerror(err)} "
                             f"(running as uid {os.geteuid()})")  # fmt: skip
    return result


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _switch(creds: Credentials, wanted: str) -> None:
    """Supplementary groups, gid, uid: all three of each id, for good."""
    try:
        if os.geteuid() == 0:
            os.setgroups(list(creds.groups))
        os.setresgid(creds.gid, creds.gid, creds.gid)
        if creds.uid is not None:
            os.setresuid(creds.uid, creds.uid, creds.uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to {wanted}: {exc.strerror} "
                             f"(running as uid {os.geteuid()})") from None
    _verify(creds, wanted)


def _verify(creds: Credentials, wanted: str) -> None:
    """Check the switch took, and that root cannot be taken back."""
    if creds.uid is not None and set(os.getresuid()) != {creds.uid}:
        raise PrivilegeError(f"switch to {wanted} did not take: uids {os.getresuid()}")
    if set(os.getresgid()) != {creds.gid}:
        raise PrivilegeError(f"switch to {wanted} did not take: gids {os.getresgid()}")
    if creds.uid not in (None, 0):
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise PrivilegeError(f"switched to {wanted}, yet could become root again")


class PidFileError(ForkserverError):
    """The pid file is held by a live master, or cannot be written."""


class PidFile:
    """The master's pid file at *path* (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._pid: int | None = None

    def acquire(self, pid: int | None = None) -> None:
        """Write *pid* (default: ours).  Raises :class:`PidFileError` if a
        live forkserver holds the file or it holds something else."""
        pid = os.getpid() if pid is None else pid
        tmp = self._write_temp(pid)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)     # atomic, and fails if the name exists
                except FileExistsError:
                    self._clear_stale(pid)
                    continue
                except OSError as exc:
                    raise PidFileError(f"pid file {self.path}: {exc.strerror}") from None
                self._pid = pid
                return
            raise PidFileError(f"pid file {self.path}: another process keeps recreating it")
        finally:
            os.unlink(tmp)

    def release(self) -> None:
        """Remove the file if it still names the pid we wrote."""
        if self._pid is not None and _read_pid(self.path) == self._pid:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._pid = None

    def _write_temp(self, pid: int) -> str:
        try:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".forkserver-")
        except OSError as exc:
            raise PidFileError(f"pid file {self.path}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{pid}\n")
            f.flush()
            os.fchmod(fd, 0o644)
        return tmp

    def _clear_stale(self, pid: int) -> None:
        holder = _read_pid(self.path)
        if holder is None:
            if not os.path.exists(self.path):
                return
            raise PidFileError(f"pid file {self.path} exists and does not hold a pid; "
                               "refusing to overwrite it")
        if holder != pid and _is_live_forkserver(holder):
            raise PidFileError(f"pid file {self.path}: forkserver pid {holder} is "
                               "running; stop it first")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)                # its master is gone


def _read_pid(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_PID_FILE + 1)
    except OSError:
        return None
    if len(text) > MAX_PID_FILE or not text.strip().isdigit():
        return None
    return int(text)


def _is_live_forkserver(pid: int) -> bool:
    """Is *pid* alive and a forkserver?  After a reboot the number may
    belong to some other program, which must not keep us from starting."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read(65536)
    except FileNotFoundError:
        return False
    except OSError:
        return True                 # exists, but we may not look: assume it is
    return b"forkserver" in cmdline
