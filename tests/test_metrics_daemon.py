"""The metrics of a real daemon against what really happened to it.

Each test makes something happen (N connections, a worker killed from
outside, a crash, a reload, handler errors, a full queue, a fast stop)
and checks every figure it touches on ``GET /metrics``, read with
``prometheus_client``'s parser.  The daemon answers on
``--metrics-bind 127.0.0.1:0``; the test learns the port from the
``metrics_listening`` log line.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from forkserver.workers.sync import PREFETCH as SYNC_PREFETCH
from tests.metrics_support import Scraper, address, ctl_metrics, http, listener, parse
from tests.support import TIMEOUT, poll_until, read_line, recv_all, start_daemon, wait_gone
from tests.test_tcpserver import accept_queue

METERED = "tests.handlers.metered:handle"
METRICS = ("--metrics-bind", "127.0.0.1:0")


def ask(daemon: object, line: bytes) -> bytes:
    with daemon.connect() as sock:  # type: ignore[attr-defined]
        sock.sendall(line)
        return recv_all(sock)


def test_n_connections_are_n_accepted_dispatched_served_and_timed() -> None:
    with start_daemon(METERED, *METRICS, workers=2) as daemon:
        scraper = Scraper(address(daemon))
        on = listener(daemon)
        count = 25
        pids = {int(ask(daemon, b"pid\n")) for _ in range(count)}
        assert pids <= {worker.pid for worker in daemon.workers()}
        scraper.wait("forkserver_connections_served_total", count, **on)
        scraper.wait("forkserver_connection_duration_seconds_count", count, **on)
        samples = scraper.samples()

        def one(name: str, **labels: str) -> float:
            [value] = [s.value for s in samples if s.name == name
                       and all(s.labels.get(k) == v for k, v in labels.items())]
            return float(value)

        assert one("forkserver_connections_accepted_total", **on) == count
        assert one("forkserver_connections_dispatched_total", **on) == count
        assert one("forkserver_connections_taken_back_total", **on) == 0
        assert one("forkserver_connections_dropped_total", **on) == 0
        assert one("forkserver_connections_queued", **on) == 0
        assert one("forkserver_connection_duration_seconds_bucket", le="+Inf",
                   **on) == count  # fmt: skip
        assert 0 < one("forkserver_connection_duration_seconds_sum", **on) < count * 5
        served = [s for s in samples if s.name == "forkserver_worker_connections_served_total"]
        assert sum(s.value for s in served) == count
        for worker in daemon.workers():  # psutil figures of every worker, at scrape time
            labels = {"pid": str(worker.pid)}
            assert one("forkserver_worker_resident_memory_bytes", **labels) > 0
            assert one("forkserver_worker_unique_memory_bytes", **labels) > 0
            assert one("forkserver_worker_cpu_seconds_total", **labels) >= 0
        assert one("forkserver_workers", state="ready", generation="0") == 2
        assert one("forkserver_workers_target") == 2
        assert one("forkserver_master_state", state="running") == 1
        assert one("process_start_time_seconds") == pytest.approx(
            psutil.Process(daemon.pid).create_time(), abs=1)
        assert one("forkserver_build_info", python=platform.python_version()) == 1
        assert sum(s.value for s in samples if s.name == "forkserver_worker_deaths_total") == 0


def test_a_worker_killed_from_outside_or_crashing_is_a_death_not_a_replacement() -> None:
    with start_daemon(METERED, *METRICS, workers=2) as daemon:
        scraper = Scraper(address(daemon))
        victim = daemon.workers()[0].pid
        os.kill(victim, signal.SIGKILL)
        daemon.wait_log("worker_exited", pid=victim)
        scraper.wait("forkserver_worker_deaths_total", 1, cause="signal")
        assert ask(daemon, b"exit\n") == b""  # the worker exits under the connection
        daemon.wait_log("worker_exited", cause="died", exit_code=1)
        scraper.wait("forkserver_worker_deaths_total", 1, cause="crash")
        samples = scraper.samples()
        retired = [s.value for s in samples if s.name == "forkserver_worker_retirements_total"]
        assert len(retired) == 6 and sum(retired) == 0
        scraper.wait("forkserver_workers", 2, state="ready", generation="0")
        assert scraper.value("forkserver_workers_spawned_total") == 4


def test_a_reload_is_counted_as_replacements_and_keeps_every_counter() -> None:
    with start_daemon(METERED, *METRICS, workers=2) as daemon:
        scraper = Scraper(address(daemon))
        on = listener(daemon)
        for _ in range(5):
            ask(daemon, b"pid\n")
        scraper.wait("forkserver_connections_served_total", 5, **on)
        old = {worker.pid for worker in daemon.workers()}
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed")
        wait_gone(sorted(old))
        scraper.wait("forkserver_worker_retirements_total", 2, cause="reload")
        scraper.wait("forkserver_reloads_total", 1, result="completed")
        assert scraper.value("forkserver_reloads_total", result="failed") == 0
        assert scraper.value("forkserver_last_reload_successful") == 1
        assert (scraper.value("forkserver_last_reload_success_timestamp_seconds") or 0) > 0
        assert scraper.value("forkserver_generation") == 1
        assert scraper.value("forkserver_workers", state="ready", generation="1") == 2
        deaths = [s.value for s in scraper.samples() if s.name == "forkserver_worker_deaths_total"]
        assert sum(deaths) == 0
        # What the old generation counted stays counted: nothing went down.
        assert scraper.value("forkserver_connections_served_total", **on) == 5
        assert scraper.value("forkserver_connection_duration_seconds_count", **on) == 5
        assert scraper.value("forkserver_connections_accepted_total", **on) == 5


def test_max_requests_and_a_scale_down_are_retirements_not_deaths() -> None:
    with start_daemon(METERED, *METRICS, "--max-requests", "2", workers=1) as daemon:
        scraper = Scraper(address(daemon))
        first = daemon.workers()[0].pid
        for _ in range(2):
            ask(daemon, b"pid\n")
        daemon.wait_log("worker_exited", pid=first)
        scraper.wait("forkserver_worker_retirements_total", 1, cause="max_requests")
        daemon.proc.send_signal(signal.SIGTTIN)
        scraper.wait("forkserver_workers", 2, state="ready", generation="0")
        daemon.proc.send_signal(signal.SIGTTOU)
        daemon.wait_log("workers_scaled", target=1)
        scraper.wait("forkserver_worker_retirements_total", 1, cause="scale_down")
        assert scraper.value("forkserver_workers_target") == 1
        deaths = [s.value for s in scraper.samples() if s.name == "forkserver_worker_deaths_total"]
        assert sum(deaths) == 0


def test_a_stuck_worker_killed_past_its_timeout_is_a_timeout_death() -> None:
    args = (*METRICS, "--timeout", "0.5")
    with start_daemon("tests.handlers.stubborn:ignore_abrt_and_hang", *args,
                      workers=1) as daemon:  # fmt: skip
        scraper = Scraper(address(daemon))
        with daemon.connect() as sock:
            stuck = int(read_line(sock).split()[0])
            daemon.wait_log("worker_exited", pid=stuck)
        scraper.wait("forkserver_worker_deaths_total", 1, cause="timeout")
        deaths = {s.labels["cause"]: s.value for s in scraper.samples()
                  if s.name == "forkserver_worker_deaths_total"}  # fmt: skip
        assert sum(deaths.values()) == 1
        retired = [s.value for s in scraper.samples()
                   if s.name == "forkserver_worker_retirements_total"]  # fmt: skip
        assert sum(retired) == 0


def test_a_failed_reload_is_counted_and_marks_the_last_reload_unsuccessful(
        tmp_path: Path) -> None:  # fmt: skip
    config = tmp_path / "forkserver.toml"
    config.write_text("max_requests = 0\n")
    with start_daemon(METERED, "-c", str(config), *METRICS, workers=1) as daemon:
        scraper = Scraper(address(daemon))
        config.write_text("max_requests = -5\n")
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_failed")
        scraper.wait("forkserver_reloads_total", 1, result="failed")
        assert scraper.value("forkserver_reloads_total", result="completed") == 0
        assert scraper.value("forkserver_last_reload_successful") == 0
        assert scraper.value("forkserver_last_reload_success_timestamp_seconds") == 0
        config.write_text("max_requests = 0\n")
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("reload_completed")
        scraper.wait("forkserver_reloads_total", 1, result="completed")
        assert scraper.value("forkserver_last_reload_successful") == 1
        assert scraper.value("forkserver_reloads_total", result="failed") == 1


def test_handler_errors_are_counted_by_type() -> None:
    with start_daemon(METERED, *METRICS, workers=2) as daemon:
        scraper = Scraper(address(daemon))
        on = listener(daemon)
        for line in (b"value\n", b"value\n", b"key\n", b"mine\n"):
            ask(daemon, line)
        scraper.wait("forkserver_handler_errors_total", 2, type="ValueError")
        scraper.wait("forkserver_handler_errors_total", 1, type="KeyError")
        scraper.wait("forkserver_handler_errors_total", 1, type="tests.handlers.metered.OwnError")
        types = {s.labels["type"] for s in scraper.samples()
                 if s.name == "forkserver_handler_errors_total"}  # fmt: skip
        assert types == {"ValueError", "KeyError", "tests.handlers.metered.OwnError"}
        # A handler that raised still ran to its end: its connection was served.
        scraper.wait("forkserver_connections_served_total", 4, **on)


def test_a_full_queue_pauses_accepting_and_a_fast_stop_drops_what_waits() -> None:
    args = (*METRICS, "--worker-class", "sync", "--max-pending-connections", "2")
    room = 1 + SYNC_PREFETCH  # one served, PREFETCH queued on the worker's channel
    with start_daemon("tests.handlers.basic:gate", *args, workers=1) as daemon:
        scraper = Scraper(address(daemon))
        on = listener(daemon)
        held = daemon.connect_together(room + 4)  # room, 2 queued, 2 in the backlog
        try:
            scraper.wait("forkserver_connections_queued", 2, **on)
            scraper.wait("forkserver_accepting", 0)
            # The two the paused master left in the kernel, as the kernel itself counts them.
            scraper.wait("forkserver_listen_backlog", 2, **on)
            assert accept_queue(daemon.listener)[0] == 2
            assert (scraper.value("forkserver_listen_backlog_limit", **on)
                    == accept_queue(daemon.listener)[1])  # fmt: skip
            assert (scraper.value("forkserver_accept_pauses_total") or 0) >= 1
            assert scraper.value("forkserver_queue_limit") == 2
            assert scraper.value("forkserver_connections_accepted_total", **on) == room + 2
            assert scraper.value("forkserver_connections_dispatched_total", **on) == room
            assert scraper.value("forkserver_connections_in_flight") == room
            daemon.proc.send_signal(signal.SIGINT)  # the worker still holds its connection
            daemon.wait_log("master_stopping", fast=True)
            # The prefetched ones and the two queued are dropped: taken back first.
            scraper.wait("forkserver_connections_dropped_total", SYNC_PREFETCH + 2, **on)
            assert (scraper.value("forkserver_connections_taken_back_total", **on)
                    == SYNC_PREFETCH)  # fmt: skip
            assert scraper.value("forkserver_connections_queued", **on) == 0
            assert scraper.value("forkserver_master_state", state="stopping") == 1
        finally:
            for sock in held:
                sock.close()


def test_a_killed_worker_s_queued_descriptor_is_taken_back_and_served() -> None:
    args = (*METRICS, "--worker-class", "sync")
    with start_daemon("tests.handlers.basic:gate", *args, workers=1) as daemon:
        scraper = Scraper(address(daemon))
        on = listener(daemon)
        first, second = daemon.connect(), daemon.connect()
        try:
            scraper.wait("forkserver_connections_in_flight", 2)  # one served, one prefetched
            victim = daemon.workers()[0].pid
            os.kill(victim, signal.SIGKILL)
            daemon.wait_log("worker_exited", pid=victim)
            scraper.wait("forkserver_connections_taken_back_total", 1, **on)
            second.sendall(b"hello")  # served by the successor
            assert recv_all(second).endswith(b" hello")
            assert recv_all(first) == b""  # the one the victim held is gone with it
            scraper.wait("forkserver_connections_dispatched_total", 3, **on)
            assert scraper.value("forkserver_connections_accepted_total", **on) == 2
            assert scraper.value("forkserver_worker_deaths_total", cause="signal") == 1
        finally:
            first.close()
            second.close()


def test_ctl_metrics_is_the_same_text_and_writes_a_textfile(tmp_path: Path) -> None:
    with start_daemon(METERED, *METRICS, workers=1) as daemon:
        scraper = Scraper(address(daemon))
        on = listener(daemon)
        ask(daemon, b"pid\n")
        scraper.wait("forkserver_connections_served_total", 1, **on)
        over_http = {s.name for s in scraper.samples()}
        printed = parse(ctl_metrics(daemon))
        assert {s.name for s in printed} == over_http
        [served] = [s for s in printed if s.name == "forkserver_connections_served_total"]
        assert served.value == 1
        target = tmp_path / "forkserver.prom"
        assert ctl_metrics(daemon, "--output", str(target)) == ""
        written = parse(target.read_text())
        names = {s.name for s in written}
        assert names == {name for name in over_http if not name.startswith("process_")}
        assert os.listdir(tmp_path) == ["forkserver.prom"]  # no temporary left behind
        nowhere = tmp_path / "missing" / "forkserver.prom"
        with pytest.raises(subprocess.CalledProcessError) as failed:
            ctl_metrics(daemon, "--output", str(nowhere))
        assert failed.value.returncode == 73  # EX_CANTCREAT
        assert f"cannot write {nowhere}" in failed.value.stderr
        assert os.listdir(tmp_path) == ["forkserver.prom"]


def test_ctl_metrics_works_without_any_listener_for_it() -> None:
    with start_daemon(METERED, workers=1) as daemon:
        ask(daemon, b"pid\n")

        def served() -> bool:
            values = [s.value for s in parse(ctl_metrics(daemon))
                      if s.name == "forkserver_connections_served_total"]  # fmt: skip
            return values == [1]

        poll_until(served, "ctl metrics counts the connection")
        assert not daemon.records("metrics_listening")


def test_the_metrics_listener_answers_get_metrics_and_nothing_else() -> None:
    with start_daemon(METERED, *METRICS, workers=1) as daemon:
        where = address(daemon)
        assert http(where, b"GET /healthz HTTP/1.1\r\n\r\n")[0] == 404
        assert http(where, b"GET /other HTTP/1.1\r\n\r\n")[0] == 404
        assert http(where, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")[0] == 405
        assert http(where, b"agent\n")[0] == 400  # no agent-check on this listener
        status, headers, body = http(where, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert (status, body) == (200, b"") and int(headers["Content-Length"]) > 1000
        status, _, body = http(where, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
        assert status == 200 and b"forkserver_build_info" in body
        huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n"
        assert http(where, huge)[0] == 400  # past the request bound


def test_silent_and_slow_clients_never_block_the_master() -> None:
    with start_daemon(METERED, *METRICS, workers=1) as daemon:
        where = address(daemon)
        scraper = Scraper(where)
        silent = [socket.create_connection(where, timeout=TIMEOUT) for _ in range(20)]
        halfway = [socket.create_connection(where, timeout=TIMEOUT) for _ in range(20)]
        try:
            for sock in halfway:
                sock.sendall(b"GET /metr")
            assert b"forkserver_build_info" in scraper.text().encode()
            assert ask(daemon, b"pid\n").strip().isdigit()  # the daemon serves on
            for sock in silent + halfway:  # each dropped at its deadline, unanswered
                assert recv_all(sock) == b""
        finally:
            for sock in silent + halfway:
                sock.close()
        assert daemon.stop() == 0


def test_one_bind_for_health_and_metrics_is_one_listener_for_both() -> None:
    both = ("--health-bind", "127.0.0.1:0", "--metrics-bind", "127.0.0.1:0")
    with start_daemon(METERED, *both, workers=1) as daemon:
        where = address(daemon, "health_listening")
        assert http(where, b"GET /healthz HTTP/1.1\r\n\r\n")[0] == 200
        assert http(where, b"GET /readyz HTTP/1.1\r\n\r\n")[0] == 200
        Scraper(where).wait("forkserver_workers_target", 1)
        assert not daemon.records("metrics_listening")
        record = daemon.wait_log("health_listening")
        assert "/metrics" in record["message"]
