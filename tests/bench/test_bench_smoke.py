"""A few seconds of the benchmark: it runs, produces figures, and sees no errors.

Correctness only: no test here asserts a speed. The full run is
``tests/bench/run`` (see tests/bench/README.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.bench import bench, launch, procstat, wrk

pytestmark = pytest.mark.bench

SMOKE_SERVERS = ["shared-blocking", "fs-sync", "fs-asyncio"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[bench.Results, Path]:
    """One short run of the bench, shared by the tests that read it."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk is missing (.ci/run installs it)")
    out = tmp_path_factory.mktemp("bench")
    res = bench.run([
        "--servers", ",".join(SMOKE_SERVERS), "--fair-servers", "fs-sync",
        "--rounds", "1", "--seconds", "1", "--warmup", "0", "--pin", "off",
        "--phases", "main,fairness", "--no-chart", "--out", str(out),
    ])
    return res, out


def test_a_short_run_measures_every_server_with_zero_errors(
    smoke: tuple[bench.Results, Path],
) -> None:
    res, out = smoke
    assert res.skipped == {}, "every smoke server must run here"
    assert res.failures == []
    ran = {(s.server, s.mode) for s in res.samples}
    assert ran == {(name, mode) for name in SMOKE_SERVERS for mode in bench.MODES}
    for s in res.samples:
        assert s.requests > 0, s
        assert (s.errors, s.non_2xx) == (0, 0), s
        assert s.cpu_s > 0, s  # the server's processes were found and did work
        assert s.start_to_ready_s is not None and s.start_to_ready_s > 0
    for fair in res.fairness:
        assert len(fair["counts"]) == 2, fair  # both workers served, each counted
        assert min(fair["counts"]) > 0
        assert (fair["errors"], fair["non_2xx"]) == (0, 0)
    assert [f["server"] for f in res.fairness] == ["fs-sync"]

    saved = json.loads((out / "results.json").read_text())
    assert len(saved["samples"]) == len(res.samples)
    table = (out / "table.md").read_text()
    for name in SMOKE_SERVERS:
        assert f"| {name} | close |" in table


def test_no_client_waits_unanswered_through_a_run(smoke: tuple[bench.Results, Path]) -> None:
    res, _ = smoke
    stalled = {(s.server, s.mode): s.stalled_clients for s in res.samples
               if (s.server, s.mode) != ("fs-sync", "keepalive")}
    assert stalled == dict.fromkeys(stalled, 0)


def test_sync_workers_leave_no_keepalive_client_unanswered(
    smoke: tuple[bench.Results, Path],
) -> None:
    res, _ = smoke
    (sample,) = [s for s in res.samples if (s.server, s.mode) == ("fs-sync", "keepalive")]
    assert sample.stalled_clients == 0


def test_wrk_output_is_parsed_strictly() -> None:
    output = (
        "Running 1s test @ http://127.0.0.1:1/\n"
        "  Latency Distribution\n     50%  812.00us\n     75%    1.00ms\n"
        "     90%    2.00ms\n     99%    1.02s\n"
        "  12345 requests in 1.00s, 1.2MB read\n"
        "  Socket errors: connect 1, read 2, write 3, timeout 4\n"
        "  Non-2xx or 3xx responses: 5\n"
        "Requests/sec:  12345.00\n"
        "worker-count 101 7000\nworker-count 102 5345\n"
    )
    result = wrk.parse(output)
    assert (result.requests, result.rps, result.seconds) == (12345, 12345.0, 1.0)
    assert (result.p50_ms, result.p99_ms) == (0.812, 1020.0)
    assert result.errors == 10
    assert result.non_2xx == 5
    assert result.worker_counts == {"101": 7000, "102": 5345}
    with pytest.raises(wrk.WrkError, match="lacks"):
        wrk.parse(output.replace("Requests/sec", "Reqs"))


def test_a_stopped_server_leaves_no_process_behind() -> None:
    builder, _ = launch.SERVERS["shared-blocking"]
    with launch.Server("smoke-stop", builder, workers=2) as server:
        server.wait_ready()
        members = procstat.group_members(server.pid)
        assert len(members) == 3  # the master and its two workers
    assert procstat.group_members(server.pid) == []
    assert server.proc.returncode == 0
