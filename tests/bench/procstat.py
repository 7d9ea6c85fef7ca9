"""What a server's processes cost, read from /proc.

CPU is ``utime + stime`` from ``/proc/PID/stat`` (all threads, living and
dead), summed over the server's process tree, plus the ``cutime + cstime``
of the tree's root so that a child reaped during a run still counts.
Memory is USS (``Private_Clean + Private_Dirty`` from ``smaps_rollup``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str  # R, S, D, Z, ...
    ppid: int
    pgrp: int
    cpu: float  # seconds of utime + stime
    children_cpu: float  # seconds of cutime + cstime (reaped children)


def read_stat(pid: int) -> ProcStat | None:
    """One process's stat line, or None if it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may itself hold spaces or ")".
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, pgrp 5, utime 14 ... cstime 17.
    return ProcStat(
        pid=pid,
        state=fields[0],
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        cpu=(int(fields[11]) + int(fields[12])) / CLK_TCK,
        children_cpu=(int(fields[13]) + int(fields[14])) / CLK_TCK,
    )


def all_stats() -> dict[int, ProcStat]:
    stats = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                stats[stat.pid] = stat
    return stats


def tree(root: int, stats: dict[int, ProcStat] | None = None) -> list[int]:
    """The root and all its descendants, root first."""
    stats = all_stats() if stats is None else stats
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def group_members(pgrp: int) -> list[int]:
    """Live pids in a process group (a finished server must leave none).

    Zombies are skipped: they run nothing, and once their parent is gone
    reaping them is init's job.
    """
    return [s.pid for s in all_stats().values() if s.pgrp == pgrp and s.state != "Z"]


@dataclass
class CpuSnapshot:
    root: int
    per_pid: dict[int, float] = field(default_factory=dict)
    reaped: float = 0.0  # the root's cutime + cstime


def cpu_snapshot(root: int) -> CpuSnapshot:
    stats = all_stats()
    snap = CpuSnapshot(root=root)
    for pid in tree(root, stats):
        snap.per_pid[pid] = stats[pid].cpu
    if root in stats:
        snap.reaped = stats[root].children_cpu
    return snap


@dataclass(frozen=True)
class CpuDelta:
    total: float  # seconds, whole tree
    root: float  # seconds, the root process alone (the master)
    per_child: dict[int, float]  # seconds per non-root process (workers)


def cpu_delta(before: CpuSnapshot, after: CpuSnapshot) -> CpuDelta:
    per_child = {
        pid: cpu - before.per_pid.get(pid, 0.0)
        for pid, cpu in after.per_pid.items()
        if pid != after.root
    }
    root = after.per_pid.get(after.root, 0.0) - before.per_pid.get(before.root, 0.0)
    total = root + sum(per_child.values()) + (after.reaped - before.reaped)
    return CpuDelta(total=total, root=root, per_child=per_child)


def uss_bytes(pid: int) -> int:
    """Unique set size: memory that would be freed if this process exited."""
    total = 0
    for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Private_Clean", "Private_Dirty"):
            total += int(rest.split()[0]) * 1024
    return total


def rss_bytes(pid: int) -> int:
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
