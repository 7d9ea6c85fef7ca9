"""Dropping root: who a worker runs as.

The master keeps the uid it was started with.  It needs root (when it
has it) to bind privileged ports again on reload and to re-exec on
upgrade, and it never runs handler code.  Each worker calls
:func:`drop_privileges` right after fork, before it imports or runs the
handler; ``PR_SET_PDEATHSIG`` must be set *after* it, because any change
of credentials clears the parent-death signal.

Order matters: supplementary groups first (``initgroups`` needs root),
then the gid, then the uid, each with the ``setres*`` call so the real,
effective and saved ids all change and none can be taken back.
:func:`resolve` checks the names without changing anything, so the master
can refuse an unknown user before it forks a single worker.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from forkserver.errors import ForkserverError

__all__ = ["Credentials", "PrivilegeError", "drop_privileges", "resolve"]


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


def drop_privileges(user: str | None, group: str | None) -> None:
    """Become *user* (with its supplementary groups) and *group*; nothing
    if both are None.  Raises :class:`PrivilegeError` naming what failed."""
    creds = resolve(user, group)
    if creds is None:
        return
    wanted = f"user {user!r}" if user else f"group {group!r}"
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
