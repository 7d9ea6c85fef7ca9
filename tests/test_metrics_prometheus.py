"""A real Prometheus scrapes a daemon, and its query API says what happened.

Prometheus (Debian's ``prometheus`` package; ``.ci/run`` installs it)
runs on loopback with its storage and a generated configuration in the
test's temporary directory: one job, a 1 s ``scrape_interval``, the
daemon's ``metrics_bind`` as its one target.  Prometheus cannot listen
on port 0, so the test takes a free port (bind port 0, close) and starts
it again on another if that one was taken meanwhile; it knows the
Prometheus that answers is its own by the storage path the API reports.
The test then asks ``/api/v1/query`` until the values appear: ``up`` is
1, the connections served are the N the test made, a worker killed from
outside is one death by ``signal``.  Missing the binary is a failure,
not a skip: the suite is meant to run against the real thing.

Prometheus is killed and reaped whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.metrics_support import address, listener
from tests.support import TIMEOUT, poll_until, recv_all, start_daemon

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
METERED = "tests.handlers.metered:handle"
#: Prometheus's own start (its storage, its rules) on a loaded machine, and
#: a value's way through a worker's stats, a scrape and the query engine.
START_TIMEOUT = 60.0
QUERY_TIMEOUT = 60.0
PORT_ATTEMPTS = 5

CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: forkserver
    static_configs:
      - targets: ["{target}"]
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get_json(url: str) -> dict[str, object] | None:
    """The JSON answer at *url*, or None while nothing (or not yet JSON) answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            data: dict[str, object] = json.load(answer)
            return data
    except (OSError, ValueError):
        return None


class Prometheus:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expression: str) -> list[tuple[dict[str, str], str]]:
        """The instant vector of *expression*: (labels, value) of each series."""
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        answer = get_json(url)
        assert answer is None or answer["status"] == "success", answer
        data = answer["data"] if answer else {"result": []}
        return [(item["metric"], item["value"][1])  # type: ignore[index]
                for item in data["result"]]  # type: ignore[index]  # fmt: skip

    def wait(self, expression: str, expected: float) -> None:
        """Query until *expression* is one series of value *expected* (bounded)."""
        seen: list[object] = []

        def reached() -> bool:
            assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
            result = self.query(expression)
            seen.append(result)
            return len(result) == 1 and float(result[0][1]) == expected

        try:
            poll_until(reached, f"{expression} == {expected} in Prometheus", QUERY_TIMEOUT)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answer: {seen[-1:]}") from None


def _ours(prometheus: Prometheus, storage: Path) -> bool | None:
    """True once our Prometheus answers; False if it exited (or another answers)."""
    if prometheus.proc.poll() is not None:
        return False
    flags = get_json(f"{prometheus.base}/api/v1/status/flags")
    if flags is None:
        return None
    return flags.get("data", {}).get("storage.tsdb.path") == str(storage)  # type: ignore[union-attr]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=TIMEOUT)


def _start(config: Path, storage: Path, log: Path) -> Prometheus:
    """Prometheus on a free port; ``proc.poll()`` is set if the port was taken meanwhile."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([
            PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={storage}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        ], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    prometheus = Prometheus(proc, port, log)
    answers: list[bool | None] = []

    def settled() -> bool:
        answers.append(_ours(prometheus, storage))
        return answers[-1] is not None

    try:
        poll_until(settled, "prometheus answers or exits", START_TIMEOUT)
    except BaseException:
        _stop(proc)
        raise
    if not answers[-1]:
        _stop(proc)
        if "address already in use" not in log.read_text():
            pytest.fail(f"prometheus did not start: {log.read_text()[-2000:]}")
    return prometheus


@contextlib.contextmanager
def run_prometheus(tmp_path: Path, target: str) -> Iterator[Prometheus]:
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.fail(f"{PROMETHEUS} is missing: apt-get install prometheus (.ci/run installs it)")
    config = tmp_path / "prometheus.yml"
    config.write_text(CONFIG.format(target=target))
    for _ in range(PORT_ATTEMPTS):
        prometheus = _start(config, tmp_path / "data", tmp_path / "prometheus.log")
        if prometheus.proc.returncode is None:  # it runs, on its port
            try:
                yield prometheus
            finally:
                _stop(prometheus.proc)
            return
    pytest.fail(f"no free port for prometheus in {PORT_ATTEMPTS} attempts")


def test_a_real_prometheus_scrapes_the_daemon_and_sees_what_happened(tmp_path: Path) -> None:
    with start_daemon(METERED, "--metrics-bind", "127.0.0.1:0", workers=2) as daemon:
        host, port = address(daemon)
        target = f"{host}:{port}"
        count = 12
        for _ in range(count):
            with daemon.connect() as sock:
                sock.sendall(b"pid\n")
                assert recv_all(sock).strip().isdigit()
        on = listener(daemon)["listener"]
        with run_prometheus(tmp_path, target) as prometheus:
            prometheus.wait(f'up{{job="forkserver",instance="{target}"}}', 1)
            served = f'forkserver_connections_served_total{{listener="{on}"}}'
            prometheus.wait(served, count)
            prometheus.wait(f'forkserver_connections_accepted_total{{listener="{on}"}}', count)
            prometheus.wait(f'forkserver_connection_duration_seconds_count{{listener="{on}"}}',
                            count)  # fmt: skip
            prometheus.wait(f'forkserver_connection_duration_seconds_bucket'
                            f'{{listener="{on}",le="+Inf"}}', count)  # fmt: skip
            prometheus.wait("sum(forkserver_worker_connections_served_total)", count)
            prometheus.wait('sum(forkserver_workers{state="ready"})', 2)
            prometheus.wait("count(forkserver_worker_resident_memory_bytes > 0)", 2)
            victim = daemon.workers()[0].pid
            os.kill(victim, signal.SIGKILL)
            daemon.wait_log("worker_exited", pid=victim)
            prometheus.wait('forkserver_worker_deaths_total{cause="signal"}', 1)
            prometheus.wait('forkserver_worker_deaths_total{cause="crash"}', 0)
            [(labels, _)] = prometheus.query("forkserver_build_info")
            assert labels["python"] and labels["version"]
        assert daemon.stop() == 0
