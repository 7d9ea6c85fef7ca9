"""The master's figures as metrics, in Prometheus's text exposition format 0.0.4.

``families(snapshot, processes, build)`` turns one ``status.Snapshot``
(every counter and gauge the master keeps) and the process figures
sampled at scrape time into metric families; ``render(families)`` is
their text.  docs/metrics.md lists every metric with one line each.

``Exposition`` is what the master wires: ``text()`` for the HTTP
listener (``metrics_bind``, ``GET /metrics``) and ``forkserver ctl
metrics``, ``families()`` for the statsd push.  It renders at most once
per ``MIN_INTERVAL`` (a client that asks faster gets the same text), so
however often a scraper calls, the master's loop spends a bounded share
on it.  ``ProcessSampler`` reads each worker's memory and CPU with
psutil within a time budget per scrape (``SAMPLE_BUDGET``), keeping the
older figure of a worker it had no time for: nothing is sampled on the
per-connection path.

Counters are monotonic for the master's life: a reload, a scale-down or
a worker's death never lowers one (what a dead worker reported stays
counted).  Labels that come from outside are bounded: a handler
exception's type is one of the first ``pool.MAX_ERROR_TYPES`` seen, else
``other``.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Final, Literal

import psutil

from forkserver.status import Snapshot

#: The Content-Type of the text format.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: A text younger than this is served again rather than rendered anew.
MIN_INTERVAL: Final = 0.1
#: Seconds of psutil sampling per scrape at most; a figure younger than
#: ``SAMPLE_MAX_AGE`` is not read again.
SAMPLE_BUDGET: Final = 0.05
SAMPLE_MAX_AGE: Final = 1.0
#: Every state ``forkserver_master_state`` can name.
MASTER_STATES: Final = ("starting", "running", "reloading", "degraded", "draining", "stopping")
#: Every worker state ``forkserver_workers`` can name.
WORKER_STATES: Final = ("starting", "ready", "stopping")
#: The causes always shown (at 0 until one happens), so a rate() has a series.
DEATH_CAUSES: Final = ("crash", "signal", "timeout", "protocol_error", "leaving")
RETIREMENT_CAUSES: Final = ("reload", "scale_down", "max_requests", "max_memory", "ctl_kill",
                            "stop")  # fmt: skip

Kind = Literal["counter", "gauge", "histogram"]
Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Sample:
    name: str  # the full name: the family's, or with _bucket, _sum, _count
    labels: Labels
    value: float


@dataclass(slots=True)
class Family:
    name: str
    kind: Kind
    help: str
    samples: list[Sample] = field(default_factory=list)

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        self.samples.append(Sample(self.name + suffix, tuple(labels.items()), value))


@dataclass(frozen=True, slots=True)
class ProcessFigures:
    """What psutil says of one process; None where it could not be read."""

    rss: int | None = None
    uss: int | None = None
    cpu_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Build:
    version: str
    python: str
    implementation: str

    @classmethod
    def current(cls) -> Build:
        try:
            version = metadata.version("forkserver")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return cls(version=version, python=platform.python_version(),
                   implementation=platform.python_implementation())  # fmt: skip


# --- the families ---------------------------------------------------------------


class _Families(list[Family]):
    def new(self, name: str, kind: Kind, help: str) -> Family:
        item = Family(name, kind, help)
        self.append(item)
        return item


def families(
    snapshot: Snapshot, processes: Mapping[int, ProcessFigures], build: Build,
    *, master: MasterFigures | None = None,
) -> list[Family]:
    """Every metric of *snapshot*, in the order of docs/metrics.md; *processes*
    are the workers' figures by pid, *master* the master process's own."""
    out = _Families()
    out.new("forkserver_build_info", "gauge", "Always 1: the version of forkserver and Python"
            ).add(1, version=build.version, python=build.python,
                  implementation=build.implementation)  # fmt: skip
    _process(out, master if master is not None else MasterFigures.sample(snapshot))
    _supervision(out, snapshot)
    _connections(out, snapshot)
    _per_worker(out, snapshot, processes)
    return list(out)


def _process(out: _Families, master: MasterFigures) -> None:
    out.new("process_start_time_seconds", "gauge",
            "When the master process started, in seconds since the epoch").add(master.start_time)
    out.new("process_cpu_seconds_total", "counter",
            "CPU time the master process has used, user and system").add(master.cpu_seconds)
    if master.rss is not None:
        out.new("process_resident_memory_bytes", "gauge",
                "The master process's resident memory").add(master.rss)
    if master.open_fds is not None:
        out.new("process_open_fds", "gauge",
                "Descriptors the master process holds open").add(master.open_fds)
    out.new("process_max_fds", "gauge",
            "The master process's soft limit on open descriptors").add(master.max_fds)


def _supervision(out: _Families, snapshot: Snapshot) -> None:
    state = out.new("forkserver_master_state", "gauge",
                    "1 for the state the master is in, 0 for the others")
    for name in MASTER_STATES:
        state.add(1 if snapshot.state == name else 0, state=name)
    out.new("forkserver_generation", "gauge",
            "The generation that serves (each reload begins a new one)").add(snapshot.generation)
    out.new("forkserver_workers_target", "gauge",
            "Worker processes the master keeps").add(snapshot.target)
    workers = out.new("forkserver_workers", "gauge", "Worker processes, by state and generation")
    by_state = dict.fromkeys(((name, snapshot.generation) for name in WORKER_STATES), 0)
    for worker in snapshot.workers:
        key = (worker.state, worker.generation)
        by_state[key] = by_state.get(key, 0) + 1
    for (name, generation), count in sorted(by_state.items(), key=lambda kv: kv[0][::-1]):
        workers.add(count, state=name, generation=str(generation))
    out.new("forkserver_workers_busy", "gauge",
            "Workers holding at least one connection").add(snapshot.busy)
    out.new("forkserver_worker_capacity", "gauge",
            "Connections the ready workers can hold at once").add(snapshot.capacity)
    out.new("forkserver_connections_in_flight", "gauge",
            "Connections the workers hold now").add(snapshot.in_flight)
    out.new("forkserver_workers_spawned_total", "counter",
            "Worker processes forked").add(snapshot.spawned)
    deaths = out.new("forkserver_worker_deaths_total", "counter",
                     "Workers that exited without being asked to, by cause")
    for cause, count in _with_zeros(snapshot.deaths_by_cause, DEATH_CAUSES):
        deaths.add(count, cause=cause)
    retired = out.new("forkserver_worker_retirements_total", "counter",
                      "Workers retired on purpose that exited, by cause")
    for cause, count in _with_zeros(snapshot.retired_by_cause, RETIREMENT_CAUSES):
        retired.add(count, cause=cause)
    out.new("forkserver_slots_failing", "gauge",
            "Worker slots whose worker keeps crashing (in back-off)").add(len(snapshot.failing))
    errors = out.new("forkserver_handler_errors_total", "counter",
                     "Exceptions raised by the handler, by type (the first types seen, "
                     "then other)")
    for name, count in snapshot.handler_errors_by_type.items():
        errors.add(count, type=name)
    reloads = out.new("forkserver_reloads_total", "counter", "Reloads, by result")
    reloads.add(snapshot.reloads_completed, result="completed")
    reloads.add(snapshot.reloads_failed, result="failed")
    out.new("forkserver_last_reload_success_timestamp_seconds", "gauge",
            "When the latest reload that completed did so (0: none yet)"
            ).add(snapshot.last_reload or 0)  # fmt: skip
    out.new("forkserver_last_reload_successful", "gauge",
            "0 if the latest reload failed, else 1").add(0 if snapshot.last_reload_error else 1)


_FLOW: Final = (
    ("forkserver_connections_accepted_total", "counter", "Connections the master accepted"),
    ("forkserver_connections_dispatched_total", "counter",
     "Connections handed to a worker (again after a take-back)"),
    ("forkserver_connections_served_total", "counter",
     "Connections whose handler ran to its end, as the workers report them"),
    ("forkserver_connections_taken_back_total", "counter",
     "Connections taken back from a worker that died, left or held them queued"),
    ("forkserver_connections_dropped_total", "counter",
     "Accepted connections closed before any worker served them (a fast stop)"),
    ("forkserver_connections_queued", "gauge", "Accepted connections waiting for a worker"),
)


def _connections(out: _Families, snapshot: Snapshot) -> None:
    flow = [out.new(name, kind, help) for name, kind, help in _FLOW]  # type: ignore[arg-type]
    refused = out.new("forkserver_connections_refused_total", "counter",
                      "Connections a worker closed before the handler ran, by reason")
    handshakes = out.new("forkserver_tls_handshakes_total", "counter",
                         "TLS handshakes in the workers: done, or failed by reason")
    durations = out.new("forkserver_connection_duration_seconds", "histogram",
                        "How long connections took in a worker, from receipt to close")
    backlog = out.new("forkserver_listen_backlog", "gauge",
                      "Connections waiting in the kernel's accept queue, not yet accepted "
                      "(TCP listeners)")
    backlog_limit = out.new("forkserver_listen_backlog_limit", "gauge",
                            "The most the kernel's accept queue holds: the listen backlog "
                            "(TCP listeners)")
    for item in snapshot.listeners:
        name = item.name
        values = (item.accepted, item.dispatched, item.durations.count, item.taken_back,
                  item.dropped, item.queued)
        for metric, value in zip(flow, values, strict=True):
            metric.add(value, listener=name)
        if item.backlog is not None and item.backlog_limit is not None:
            backlog.add(item.backlog, listener=name)
            backlog_limit.add(item.backlog_limit, listener=name)
        for reason, count in item.refused.items():
            refused.add(count, listener=name, reason=reason)
        for result, count in item.handshakes.items():
            handshakes.add(count, listener=name, result=result)
        for bound, count in item.durations.cumulative():
            durations.add(count, "_bucket", listener=name, le=render_number(bound))
        durations.add(item.durations.sum_seconds, "_sum", listener=name)
        durations.add(item.durations.count, "_count", listener=name)
    out.new("forkserver_queue_limit", "gauge",
            "max_pending_connections: accepting pauses at this many queued"
            ).add(snapshot.max_pending)  # fmt: skip
    out.new("forkserver_accepting", "gauge",
            "1 while the master accepts, 0 while paused or stopping").add(int(snapshot.accepting))
    out.new("forkserver_accept_pauses_total", "counter",
            "Times accepting paused because the queue was full").add(snapshot.accept_pauses)


def _per_worker(out: _Families, snapshot: Snapshot,
                processes: Mapping[int, ProcessFigures]) -> None:  # fmt: skip
    rss = out.new("forkserver_worker_resident_memory_bytes", "gauge", "Each worker's RSS")
    uss = out.new("forkserver_worker_unique_memory_bytes", "gauge",
                  "Each worker's USS: the memory it alone holds")
    cpu = out.new("forkserver_worker_cpu_seconds_total", "counter",
                  "CPU time each worker has used, user and system")
    served = out.new("forkserver_worker_connections_served_total", "counter",
                     "Connections each worker has served")
    started = out.new("forkserver_worker_start_time_seconds", "gauge",
                      "When each worker was forked, in seconds since the epoch")
    for worker in snapshot.workers:
        labels = {"slot": str(worker.slot), "pid": str(worker.pid),
                  "generation": str(worker.generation)}
        figures = processes.get(worker.pid, ProcessFigures())
        if figures.rss is not None:
            rss.add(figures.rss, **labels)
        if figures.uss is not None:
            uss.add(figures.uss, **labels)
        if figures.cpu_seconds is not None:
            cpu.add(figures.cpu_seconds, **labels)
        served.add(worker.served, **labels)
        started.add(worker.started, **labels)


def _with_zeros(counts: Mapping[str, int], always: Sequence[str]) -> list[tuple[str, int]]:
    return sorted({**dict.fromkeys(always, 0), **counts}.items())


@dataclass(frozen=True, slots=True)
class MasterFigures:
    start_time: float
    cpu_seconds: float
    rss: int | None
    open_fds: int | None
    max_fds: int

    @classmethod
    def sample(cls, snapshot: Snapshot) -> MasterFigures:
        times = os.times()
        try:
            me = psutil.Process()
            start, rss = me.create_time(), int(me.memory_info().rss)
        except (psutil.Error, OSError):
            start, rss = snapshot.started, None
        try:
            open_fds: int | None = len(os.listdir("/proc/self/fd"))
        except OSError:
            open_fds = None
        return cls(start_time=start, cpu_seconds=times.user + times.system, rss=rss,
                   open_fds=open_fds,
                   max_fds=resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # fmt: skip


# --- the text ----------------------------------------------------------------------


def render(items: Iterable[Family]) -> str:
    """The text exposition format 0.0.4: HELP, TYPE, then the samples of each family."""
    lines: list[str] = []
    for item in items:
        lines.append(f"# HELP {item.name} {_escape_help(item.help)}")
        lines.append(f"# TYPE {item.name} {item.kind}")
        for sample in item.samples:
            if sample.labels:
                labels = ",".join(f'{key}="{_escape_label(value)}"'
                                  for key, value in sample.labels)  # fmt: skip
                lines.append(f"{sample.name}{{{labels}}} {render_number(sample.value)}")
            else:
                lines.append(f"{sample.name} {render_number(sample.value)}")
    return "\n".join(lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_number(value: float) -> str:
    """A value as the format writes it: integers without a point, +Inf, NaN."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


# --- sampling and serving ------------------------------------------------------------


class ProcessSampler:
    """Each worker's RSS, USS and CPU, read at scrape time within a time budget."""

    def __init__(self, *, budget: float = SAMPLE_BUDGET, max_age: float = SAMPLE_MAX_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.budget = budget
        self.max_age = max_age
        self.clock = clock
        self._procs: dict[int, psutil.Process] = {}
        self._figures: dict[int, tuple[float, ProcessFigures]] = {}  # pid -> (when, figures)

    def sample(self, pids: Iterable[int]) -> dict[int, ProcessFigures]:
        """The figures of *pids*: the oldest first, until the budget is spent."""
        wanted = set(pids)
        for pid in set(self._figures) - wanted:  # gone: forget it
            del self._figures[pid]
            self._procs.pop(pid, None)
        now = self.clock()
        deadline = now + self.budget
        due = sorted((self._figures.get(pid, (-math.inf, None))[0], pid) for pid in wanted)
        for when, pid in due:
            if now - when < self.max_age or self.clock() >= deadline:
                break
            self._figures[pid] = (self.clock(), self._read(pid))
        return {pid: figures for pid, (_, figures) in self._figures.items()}

    def _read(self, pid: int) -> ProcessFigures:
        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            with proc.oneshot():
                memory = proc.memory_full_info()
                cpu = proc.cpu_times()
            return ProcessFigures(rss=int(memory.rss), uss=int(memory.uss),
                                  cpu_seconds=cpu.user + cpu.system)  # fmt: skip
        except (psutil.Error, OSError):
            self._procs.pop(pid, None)
            return ProcessFigures()


class Exposition:
    """The metrics of the master's snapshot, rendered at most every ``MIN_INTERVAL``."""

    def __init__(self, snapshot: Callable[[], Snapshot], *,
                 sampler: ProcessSampler | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._snapshot = snapshot
        self.sampler = sampler if sampler is not None else ProcessSampler(clock=clock)
        self._clock = clock
        self._build = Build.current()
        self._text = ""
        self._rendered_at = -math.inf

    def families(self, *, processes: bool = True) -> list[Family]:
        """Every family; without *processes*, no worker is sampled (statsd leaves them out)."""
        snapshot = self._snapshot()
        figures = self.sampler.sample(w.pid for w in snapshot.workers) if processes else {}
        return families(snapshot, figures, self._build)

    def text(self) -> str:
        now = self._clock()
        if now - self._rendered_at >= MIN_INTERVAL:
            self._text = render(self.families())
            self._rendered_at = now
        return self._text


__all__ = ["CONTENT_TYPE", "Build", "Exposition", "Family", "ProcessFigures", "ProcessSampler",
           "Sample", "families", "render", "render_number"]
