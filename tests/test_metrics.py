"""The metrics, without a daemon: families from a snapshot, the text, the tallies.

The text is read back with ``prometheus_client``'s own parser, so what
Prometheus would read is what is checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forkserver import channel, metrics, statsd
from forkserver.lifecycle import Phase
from forkserver.metrics import Build, Exposition, MasterFigures, ProcessFigures, ProcessSampler
from forkserver.status import Snapshot, Tallies, take
from forkserver.tallies import OTHER, BoundedTally, DurationTotals, Histogram
from forkserver.worker_table import SlotHistory, WorkerTable, exit_label
from forkserver.workers.timing import ConnectionTimes, LockedConnectionTimes

BUILD = Build(version="1.2.3", python="3.11.0", implementation="CPython")
MASTER = MasterFigures(start_time=1000.5, cpu_seconds=2.25, rss=1 << 20, open_fds=12,
                       max_fds=1024)  # fmt: skip
BUCKETS = len(channel.DURATION_BOUNDS) + 1


class FakeListener:
    def __init__(self, name: str, queue: tuple[int, int] | None = None) -> None:
        self.name = name
        self.queue = queue

    def describe(self) -> str:
        return "127.0.0.1:8000"

    def socket_descriptor(self) -> int:
        return -1

    def listen_queue(self) -> tuple[int, int] | None:
        return self.queue


def histogram(*seconds: float) -> Histogram:
    times = ConnectionTimes()
    for value in seconds:
        times.observe(0, value)
    [report] = times.reports()
    [(_, sum_us, buckets)] = report.entries
    return Histogram(buckets=buckets, sum_us=sum_us)


def snapshot(**changes: Any) -> Snapshot:
    table = WorkerTable()
    table.add(0, 200, 1, now=5.0)
    table.mark_ready(200, now=6.0)
    table.assign(table.get(200))  # type: ignore[arg-type]
    table.complete(200, 1, now=7.0)
    table.add(1, 201, 1, now=8.0, generation=1)
    tallies = Tallies(
        accepted={0: 10, 1: 3}, taken_back={0: 2}, dropped={0: 1},
        durations={0: histogram(0.0005, 0.001, 0.3, 1000.0)}, accept_pauses=4,
        exits={(False, "signal"): 2, (False, "crash"): 1, (True, "reload"): 3},
        handler_errors={"ValueError": 5, "other": 1}, reloads_completed=2, reloads_failed=1,
        last_reload=1500.0,
    )  # fmt: skip
    facts: dict[str, Any] = {
        "records": table, "history": {0: SlotHistory(served=4)}, "failing": {},
        "respawn_in": {}, "phase": Phase.SERVING, "reloading": False, "generation": 1,
        "last_reload_error": None, "target": 2, "spawned": 5, "pending": 2, "paused": False,
        "listeners": [FakeListener("web", (5, 128)), FakeListener('od"d\\one\nline')],
        "name": "api",
        "started": 1000.0, "monotonic": 20.0, "wall": 2000.0, "tallies": tallies,
        "queue": [(7, 0), (8, 1)], "max_pending": 30,
    }  # fmt: skip
    facts.update(changes)
    return take(**facts)


def parsed(text: str) -> dict[str, Any]:
    """name -> family, as prometheus_client reads the text."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The one sample called *name* (a family's, or its _bucket/_sum/_count) with *labels*."""
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


def test_every_family_parses_with_its_type_and_help() -> None:
    text = metrics.render(metrics.families(snapshot(), {}, BUILD, master=MASTER))
    families = parsed(text)
    assert text.endswith("\n")
    kinds = {family.name: family.type for family in families.values()}
    assert kinds["forkserver_connections_accepted"] == "counter"  # the parser drops _total
    assert kinds["forkserver_connections_queued"] == "gauge"
    assert kinds["forkserver_connection_duration_seconds"] == "histogram"
    assert all(family.documentation for family in families.values())
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names)), "a family is written twice"
    for name in names:
        assert name.startswith(("forkserver_", "process_")), name
        if name.endswith("_total"):
            assert kinds[name.removesuffix("_total")] == "counter", name


def test_the_figures_are_the_snapshots() -> None:
    families = parsed(metrics.render(metrics.families(snapshot(), {}, BUILD, master=MASTER)))
    assert value(families, "forkserver_build_info", version="1.2.3", python="3.11.0") == 1
    assert value(families, "process_start_time_seconds") == 1000.5
    assert value(families, "process_cpu_seconds_total") == 2.25
    assert value(families, "forkserver_master_state", state="running") == 1
    assert value(families, "forkserver_master_state", state="stopping") == 0
    assert value(families, "forkserver_workers", state="ready", generation="0") == 1
    assert value(families, "forkserver_workers", state="starting", generation="1") == 1
    assert value(families, "forkserver_connections_accepted_total", listener="web") == 10
    # accepted 10 + taken back 2 - queued 1 - dropped 1
    assert value(families, "forkserver_connections_dispatched_total", listener="web") == 10
    assert value(families, "forkserver_connections_taken_back_total", listener="web") == 2
    assert value(families, "forkserver_connections_dropped_total", listener="web") == 1
    assert value(families, "forkserver_connections_queued", listener="web") == 1
    assert value(families, "forkserver_connections_served_total", listener="web") == 4
    assert value(families, "forkserver_listen_backlog", listener="web") == 5
    assert value(families, "forkserver_listen_backlog_limit", listener="web") == 128
    # Where the kernel does not say (a Unix socket), no sample rather than a made-up 0.
    with pytest.raises(AssertionError, match="no sample"):
        value(families, "forkserver_listen_backlog", listener='od"d\\one\nline')
    assert value(families, "forkserver_accept_pauses_total") == 4
    assert value(families, "forkserver_queue_limit") == 30
    assert value(families, "forkserver_worker_deaths_total", cause="signal") == 2
    assert value(families, "forkserver_worker_deaths_total", cause="crash") == 1
    assert value(families, "forkserver_worker_deaths_total", cause="timeout") == 0
    assert value(families, "forkserver_worker_retirements_total", cause="reload") == 3
    assert value(families, "forkserver_worker_retirements_total", cause="max_requests") == 0
    assert value(families, "forkserver_handler_errors_total", type="ValueError") == 5
    assert value(families, "forkserver_handler_errors_total", type="other") == 1
    assert value(families, "forkserver_reloads_total", result="completed") == 2
    assert value(families, "forkserver_reloads_total", result="failed") == 1
    assert value(families, "forkserver_last_reload_success_timestamp_seconds") == 1500
    assert value(families, "forkserver_worker_connections_served_total", slot="0",
                 pid="200", generation="0") == 1  # fmt: skip


def test_a_label_value_is_escaped_and_read_back_as_it_was() -> None:
    families = parsed(metrics.render(metrics.families(snapshot(), {}, BUILD, master=MASTER)))
    assert value(families, "forkserver_connections_accepted_total",
                 listener='od"d\\one\nline') == 3  # fmt: skip


def test_the_histogram_is_cumulative_with_its_sum_and_count() -> None:
    families = parsed(metrics.render(metrics.families(snapshot(), {}, BUILD, master=MASTER)))
    bucket = "forkserver_connection_duration_seconds_bucket"
    assert value(families, bucket, listener="web", le="0.001") == 2  # at or below the bound
    assert value(families, bucket, listener="web", le="0.25") == 2
    assert value(families, bucket, listener="web", le="0.5") == 3
    assert value(families, bucket, listener="web", le="300") == 3
    assert value(families, bucket, listener="web", le="+Inf") == 4
    assert value(families, "forkserver_connection_duration_seconds_count", listener="web") == 4
    total = value(families, "forkserver_connection_duration_seconds_sum", listener="web")
    assert total == pytest.approx(1000.3015, abs=1e-5)
    assert value(families, bucket, listener='od"d\\one\nline', le="+Inf") == 0


def test_per_worker_figures_are_shown_for_the_workers_sampled() -> None:
    figures = {200: ProcessFigures(rss=5000, uss=4000, cpu_seconds=1.5)}
    families = parsed(metrics.render(metrics.families(snapshot(), figures, BUILD,
                                                      master=MASTER)))  # fmt: skip
    labels = {"slot": "0", "pid": "200", "generation": "0"}
    assert value(families, "forkserver_worker_resident_memory_bytes", **labels) == 5000
    assert value(families, "forkserver_worker_unique_memory_bytes", **labels) == 4000
    assert value(families, "forkserver_worker_cpu_seconds_total", **labels) == 1.5
    with pytest.raises(AssertionError):  # pid 201 has no figures: no sample, not a zero
        value(families, "forkserver_worker_resident_memory_bytes", pid="201")


def test_numbers_are_written_as_the_format_wants() -> None:
    assert metrics.render_number(3) == "3"
    assert metrics.render_number(3.0) == "3"
    assert metrics.render_number(0.25) == "0.25"
    assert metrics.render_number(float("inf")) == "+Inf"
    assert metrics.render_number(float("-inf")) == "-Inf"
    assert metrics.render_number(float("nan")) == "NaN"


def test_exit_labels_tell_a_signal_from_a_crash() -> None:
    assert exit_label("died", -9) == "signal"
    assert exit_label("died", 1) == "crash"
    assert exit_label("died", 0) == "crash"  # it was not asked to go
    assert exit_label("ctl kill", 0) == "ctl_kill"
    assert exit_label("scale-down", 0) == "scale_down"
    assert exit_label("protocol_error", -9) == "protocol_error"


def test_a_bounded_tally_counts_the_first_labels_then_other() -> None:
    tally = BoundedTally(2)
    for label in ("a", "b", "c", "a", "d", "b"):
        tally.count(label)
    assert tally.counts() == {"a": 2, "b": 2, OTHER: 2}


def test_duration_totals_only_grow_and_outlive_their_worker() -> None:
    totals = DurationTotals()
    one = Histogram(buckets=(1,) + (0,) * (BUCKETS - 1), sum_us=10)
    two = Histogram(buckets=(2,) + (0,) * (BUCKETS - 1), sum_us=30)
    totals.update(100, [(0, two)])
    totals.update(100, [(0, one)])  # an older report, late: ignored
    totals.update(101, [(0, one), (1, one)])
    assert totals.by_listener()[0].count == 3
    totals.worker_gone(100)
    assert totals.by_listener()[0].count == 3
    assert totals.by_listener()[0].sum_us == 40
    totals.worker_gone(101)
    assert {index: h.count for index, h in totals.by_listener().items()} == {0: 3, 1: 1}


def test_connection_times_report_only_when_something_moved() -> None:
    times = ConnectionTimes()
    assert times.reports() == []
    times.observe(3, 0.002)
    times.observe(3, 0.002)
    [report] = times.reports()
    assert report.entries[0][0] == 3 and sum(report.entries[0][2]) == 2
    assert report.entries[0][1] == 4000
    assert times.reports() == []
    for listener in range(channel.MAX_DURATION_ENTRIES + 1):
        times.observe(listener, 0.1)
    reports = times.reports()
    assert [len(r.entries) for r in reports] == [channel.MAX_DURATION_ENTRIES, 1]
    for report in reports:
        assert channel.decode_worker_message(channel.encode(report)) == report


def test_a_thread_workers_histogram_loses_no_observation_from_many_threads() -> None:
    times = LockedConnectionTimes()
    per_thread, threads = 20_000, 8
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython will: races would show
    try:
        workers = [threading.Thread(target=lambda: [times.observe(0, 0.0001)
                                                    for _ in range(per_thread)])
                   for _ in range(threads)]  # fmt: skip
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(timeout=60)
            assert not thread.is_alive()
    finally:
        sys.setswitchinterval(previous)
    [report] = times.reports()
    [(_, sum_us, buckets)] = report.entries
    assert sum(buckets) == per_thread * threads
    assert sum_us == 100 * per_thread * threads


def test_the_sampler_reads_real_processes_and_keeps_to_its_budget() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        figures = ProcessSampler().sample([os.getpid(), child.pid, 2**22 + 7])
        assert figures[os.getpid()].rss and figures[os.getpid()].uss
        assert figures[os.getpid()].cpu_seconds
        assert figures[child.pid].rss
        assert figures[2**22 + 7] == ProcessFigures()  # no such process: nothing known
        now = [0.0]
        broke = ProcessSampler(budget=0.0, clock=lambda: now[0])
        assert broke.sample([os.getpid()]) == {}  # no time at all: nothing read
        later = ProcessSampler(budget=1.0, max_age=5.0, clock=lambda: now[0])
        first = later.sample([os.getpid()])[os.getpid()]
        now[0] = 1.0
        assert later.sample([os.getpid()])[os.getpid()] is first  # young: not read again
        assert later.sample([]) == {}  # gone: forgotten
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=20)


def test_the_exposition_renders_at_most_once_per_interval() -> None:
    now = [100.0]
    taken: list[int] = []

    def take_one() -> Snapshot:
        taken.append(1)
        return snapshot()

    exposition = Exposition(take_one, clock=lambda: now[0])
    first = exposition.text()
    assert exposition.text() is first and len(taken) == 1
    now[0] += metrics.MIN_INTERVAL * 1.5
    exposition.text()
    assert len(taken) == 2


#: The statsd names of the series labelled by a worker's pid.
PER_WORKER = tuple(f"app.worker_{name}." for name in (
    "resident_memory_bytes", "unique_memory_bytes", "cpu_seconds_total",
    "connections_served_total", "start_time_seconds"))


def test_statsd_lines_send_counter_changes_and_gauges() -> None:
    last: dict[str, float] = {}
    families = metrics.families(snapshot(), {}, BUILD, master=MASTER)
    lines = statsd.lines(families, "app", last)
    assert "app.connections_accepted_total.web:10|c" in lines
    assert "app.connections_queued.web:1|g" in lines
    assert "app.connection_duration_seconds_count.web:4|c" in lines
    assert "app.connections_accepted_total.od_d_one_line:3|c" in lines
    # The pool's own series are pushed; those of each worker process are not.
    assert "app.worker_deaths_total.signal:2|c" in lines
    assert "app.worker_retirements_total.reload:3|c" in lines
    assert "app.worker_capacity:1|g" in lines
    assert not [line for line in lines if line.startswith(PER_WORKER) or "build_info" in line
                or "_bucket" in line]  # fmt: skip
    assert not [line for line in lines if ":0|c" in line]  # counters that did not move
    again = statsd.lines(families, "app", last)
    assert not [line for line in again if line.endswith("|c")]
    assert "app.connections_queued.web:1|g" in again


def test_statsd_datagrams_stay_within_their_bound() -> None:
    items = [f"forkserver.metric_{n}:{n}|c" for n in range(500)]
    datagrams = statsd.datagrams(items)
    assert all(len(data) <= statsd.MAX_DATAGRAM for data in datagrams)
    assert b"\n".join(datagrams).decode().split("\n") == items


def test_every_metric_is_documented_in_docs_metrics_md_once_and_none_else() -> None:
    families = metrics.families(snapshot(), {200: ProcessFigures(rss=1, uss=1, cpu_seconds=1)},
                                BUILD, master=MASTER)  # fmt: skip
    text = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    documented = [line.split("`")[1] for line in text.splitlines()
                  if line.startswith("| `")]  # fmt: skip
    assert documented == [family.name for family in families]
    for family in families:
        kinds = {line.split("|")[2].strip() for line in text.splitlines()
                 if line.startswith(f"| `{family.name}` |")}  # fmt: skip
        assert kinds == {family.kind}, family.name
