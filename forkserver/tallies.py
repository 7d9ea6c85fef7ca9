"""Counts the master keeps for its whole life, for the metrics: pure bookkeeping.

* ``BoundedTally``: counts by a label that comes from outside (a handler
  exception's type), with at most ``limit`` distinct labels; every label
  after those is counted as ``OTHER``, so no worker can grow the
  master's memory or a scrape without bound.
* ``DurationTotals``: the workers' connection-duration histograms.  A
  worker reports running totals (channel ``DURATIONS``: what it counted
  since it started), so a late or lost report loses nothing; once the
  worker is gone its last totals are kept, so every figure only grows.

Nothing here touches the system.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from forkserver.channel import DURATION_BOUNDS

#: The label every value past a ``BoundedTally``'s limit is counted under.
OTHER: Final = "other"


class BoundedTally:
    """Counts by label: the first *limit* distinct labels, then ``OTHER``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def count(self, label: str, by: int = 1) -> None:
        if label not in self._counts and len(self._counts) >= self.limit:
            label = OTHER
        self._counts[label] = self._counts.get(label, 0) + by

    def counts(self) -> dict[str, int]:
        """label -> count, sorted by label."""
        return dict(sorted(self._counts.items()))


@dataclass(frozen=True, slots=True)
class Histogram:
    """Connection durations: one count per bucket of ``DURATION_BOUNDS``, then +Inf."""

    buckets: tuple[int, ...]  # not cumulative: each bucket's own observations
    sum_us: int  # total duration, microseconds

    @property
    def count(self) -> int:
        return sum(self.buckets)

    @property
    def sum_seconds(self) -> float:
        return self.sum_us / 1e6

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with (inf, count)."""
        out, running = [], 0
        for bound, count in zip((*DURATION_BOUNDS, float("inf")), self.buckets, strict=True):
            running += count
            out.append((bound, running))
        return out


EMPTY: Final = Histogram(buckets=(0,) * (len(DURATION_BOUNDS) + 1), sum_us=0)


class DurationTotals:
    """Every worker's duration histogram, by listener, summed over the master's life."""

    def __init__(self) -> None:
        self._live: dict[int, dict[int, Histogram]] = {}  # by worker pid, then listener
        self._gone: dict[int, Histogram] = {}

    def update(self, pid: int, entries: Iterable[tuple[int, Histogram]]) -> None:
        """A worker's running totals by listener; a total that went down is ignored."""
        mine = self._live.setdefault(pid, {})
        for listener, histogram in entries:
            known = mine.get(listener)
            if known is None or histogram.count >= known.count:
                mine[listener] = histogram

    def worker_gone(self, pid: int) -> None:
        for listener, histogram in self._live.pop(pid, {}).items():
            self._gone[listener] = _add(self._gone.get(listener, EMPTY), histogram)

    def by_listener(self) -> dict[int, Histogram]:
        """listener index -> the histogram of every worker, alive or gone."""
        out: dict[int, Histogram] = dict(self._gone)
        for histograms in self._live.values():
            for listener, histogram in histograms.items():
                out[listener] = _add(out.get(listener, EMPTY), histogram)
        return dict(sorted(out.items()))


def _add(a: Histogram, b: Histogram) -> Histogram:
    return Histogram(buckets=tuple(x + y for x, y in zip(a.buckets, b.buckets, strict=True)),
                     sum_us=a.sum_us + b.sum_us)  # fmt: skip


def counts_by(items: Iterable[tuple[int, int]], into: dict[int, int]) -> None:
    """Add one to *into* for the listener of each (descriptor, listener) in *items*."""
    for _, listener in items:
        into[listener] = into.get(listener, 0) + 1


def merged(*tallies: Mapping[int, int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for tally in tallies:
        for key, value in tally.items():
            out[key] = out.get(key, 0) + value
    return out


__all__ = ["EMPTY", "OTHER", "BoundedTally", "DurationTotals", "Histogram", "counts_by"]
