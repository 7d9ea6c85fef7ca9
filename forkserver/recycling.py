"""When a healthy worker should be retired and replaced: pure policy.

Two limits, both off by default:

``max_requests`` (+ ``max_requests_jitter``)
    A worker that has served its limit of connections is retired
    gracefully and replaced.  Each worker draws its own limit once, at
    spawn, uniformly from ``max_requests .. max_requests + jitter``, so
    workers started together do not all restart together.
``max_memory`` (with ``memory_metric``)
    The master samples each worker's memory every ``MEMORY_INTERVAL``
    seconds.  ``rss`` is the resident set (cheap: one read of
    ``/proc/PID/statm``); ``uss`` is the memory unique to the process,
    which is what it would give back if it exited (dearer: psutil reads
    ``/proc/PID/smaps``).  Copy-on-write pages shared with the master count
    in RSS but not in USS, so USS is the fairer figure with ``preload``.

Only ``sample_memory`` touches the system; the rest is arithmetic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final, Literal

import psutil

#: Seconds between two memory samples of every worker.
MEMORY_INTERVAL: Final = 2.0

MemoryMetric = Literal["rss", "uss"]


def request_limit(max_requests: int, jitter: int, rng: random.Random) -> int | None:
    """This worker's own connection limit, or None when the limit is off."""
    if max_requests <= 0:
        return None
    return max_requests + (rng.randint(0, jitter) if jitter > 0 else 0)


def served_enough(served: int, limit: int | None) -> bool:
    return limit is not None and served >= limit


@dataclass(frozen=True, slots=True)
class MemoryExcess:
    """A worker's memory figure over the limit: what the log reports."""

    metric: MemoryMetric
    used: int
    limit: int

    @property
    def excess(self) -> int:
        return self.used - self.limit

    def describe(self) -> str:
        return (
            f"{self.metric.upper()} {format_bytes(self.used)} is over max_memory "
            f"{format_bytes(self.limit)} by {format_bytes(self.excess)}"
        )


def check_memory(used: int | None, limit: int, metric: MemoryMetric) -> MemoryExcess | None:
    """The excess when *used* is over a non-zero *limit*; else None."""
    if limit <= 0 or used is None or used <= limit:
        return None
    return MemoryExcess(metric=metric, used=used, limit=limit)


def sample_memory(pid: int, metric: MemoryMetric) -> int | None:
    """The process's RSS or USS in bytes; None if it is gone or cannot be read."""
    try:
        process = psutil.Process(pid)
        if metric == "uss":
            return int(process.memory_full_info().uss)
        return int(process.memory_info().rss)
    except (psutil.Error, OSError):
        return None


def format_bytes(count: int) -> str:
    """``512 B``, ``3.0 KiB``, ``12.5 MiB``: for people reading the log."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
