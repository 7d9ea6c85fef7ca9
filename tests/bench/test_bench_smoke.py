"""A few seconds of the benchmark: it runs, produces figures, and sees no errors.

Correctness only: no test here asserts a speed. The full run is
``tests/bench/run`` (see tests/bench/README.md).
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from tests.bench import bench, bytecodes, launch, procstat, report, wrk
from tests.bench.servers import shared_accept
from tests.support import poll_until

pytestmark = pytest.mark.bench

SMOKE_SERVERS = ["shared-blocking", "shared-blocking-hello", "fdpass-rr", "fdpass-least",
                 "fs-sync", "fs-sync-inline", "fs-asyncio", "fs-asyncio-protocol",
                 "fs-asyncio-protocol-uvloop"]
FAIR_SERVERS = ["fdpass-rr", "fdpass-least", "fs-sync", "fs-asyncio-protocol",
                "fs-asyncio-protocol-uvloop"]
EXTRA_CLIENTS = 20  # the main phase's second client count, small to stay short


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[bench.Results, Path]:
    """One short run of the bench, shared by the tests that read it."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk is missing (.ci/run installs it)")
    out = tmp_path_factory.mktemp("bench")
    res = bench.run([
        "--servers", ",".join(SMOKE_SERVERS), "--fair-servers", ",".join(FAIR_SERVERS),
        "--rounds", "1", "--seconds", "1", "--warmup", "0", "--pin", "off",
        "--extra-connections", str(EXTRA_CLIENTS),
        "--phases", "main,fairness", "--no-chart", "--out", str(out),
    ])
    return res, out


def test_a_short_run_measures_every_server_with_zero_errors(
    smoke: tuple[bench.Results, Path],
) -> None:
    res, out = smoke
    assert res.skipped == {}, "every smoke server must run here"
    assert res.failures == []
    ran = {(s.server, s.mode, s.connections) for s in res.samples}
    assert ran == {(name, mode, 50) for name in SMOKE_SERVERS for mode in bench.MODES} | {
        (name, "close", EXTRA_CLIENTS) for name in SMOKE_SERVERS}
    for s in res.samples:
        assert s.requests > 0, s
        assert (s.errors, s.non_2xx) == (0, 0), s
        assert s.cpu_s > 0, s  # the server's processes were found and did work
        assert s.start_to_ready_s is not None and s.start_to_ready_s > 0
    for fair in res.fairness:
        assert len(fair["counts"]) == 2, fair  # both workers served, each counted
        assert min(fair["counts"]) > 0
        assert (fair["errors"], fair["non_2xx"]) == (0, 0)
    assert [f["server"] for f in res.fairness] == FAIR_SERVERS

    saved = json.loads((out / "results.json").read_text())
    assert len(saved["samples"]) == len(res.samples)
    table = (out / "table.md").read_text()
    for name in SMOKE_SERVERS:
        assert f"| {name} | close |" in table
    # Both baselines were in the run, so the sync CPU targets have figures.
    assert "| CPU per new connection | fs-sync | shared-blocking-hello (same handler) " \
        "| unpinned | " in table
    sync_rows = [line for line in table.splitlines()
                 if line.startswith("| CPU per new connection | fs-sync | ")]
    assert len(sync_rows) == 4 and all("not measured" in r for r in sync_rows
                                       if "| pinned |" in r), sync_rows
    assert not any("not measured" in r for r in sync_rows if "| unpinned |" in r), sync_rows
    # forkserver against the bare mechanism, at both client counts.
    floor_rows = [line for line in table.splitlines() if line.startswith(
        "| CPU per new connection | fs-sync-inline | fdpass-least ")]
    assert len(floor_rows) == 4, floor_rows  # pinned and unpinned, at 50 and 20 clients
    assert [("not measured" in r) for r in floor_rows if "| unpinned |" in r] == [False, False]


# Sync workers running hello_http take keep-alive clients in turns of
# MAX_KEEPALIVE_REQUESTS: with 50 clients on 2 workers a client waits its
# turn for about 600 requests, longer than the stall check's third of a
# second on a slow or loaded machine.  That every client gets its turn
# is tested without a clock in tests/test_daemon_serving.py.
TAKING_TURNS = {("fs-sync", "keepalive"), ("shared-blocking-hello", "keepalive")}


def test_no_client_waits_unanswered_through_a_run(smoke: tuple[bench.Results, Path]) -> None:
    res, _ = smoke
    stalled = {(s.server, s.mode, s.connections): s.stalled_clients for s in res.samples
               if (s.server, s.mode) not in TAKING_TURNS}
    assert stalled == dict.fromkeys(stalled, 0)


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


def test_each_round_starts_one_server_further_along() -> None:
    servers = ["a", "b", "c"]
    orders = [bench.rotated(servers, r) for r in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert bench.rotated([], 2) == []


def test_a_stopped_server_leaves_no_process_behind() -> None:
    builder, _ = launch.SERVERS["shared-blocking"]
    with launch.Server("smoke-stop", builder, workers=2) as server:
        server.wait_ready()  # one worker answered: the master may still be forking the other
        poll_until(lambda: len(procstat.group_members(server.pid)) == 3,
                   "the master and its two workers")  # fmt: skip
    assert procstat.group_members(server.pid) == []
    assert server.proc.returncode == 0


def test_a_server_at_a_revision_runs_from_that_commit() -> None:
    commit = launch.add_revision("HEAD")
    snapshot = launch.REVISIONS["HEAD"]
    assert (snapshot / "forkserver" / "master.py").is_file()
    assert bench.parse_args(["--servers", "fs-sync@HEAD,fs-sync"]).servers == [
        "fs-sync@HEAD", "fs-sync"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--servers", "no-such-server@HEAD"])
    assert len(commit) == 40 and launch.source_of("fs-sync") is launch.SOURCE
    builder, _ = launch.builder_of("fs-sync@HEAD")
    with launch.Server("fs-sync@HEAD", builder, workers=1) as server:
        server.wait_ready()
        # ``-m forkserver`` finds the package in its working directory first.
        assert Path(f"/proc/{server.pid}/cwd").resolve() == snapshot.resolve()
    assert server.proc.returncode == 0


def _summary(figures: dict[tuple[str, str, bool], tuple[float, float]], clients: int = 50,
             ) -> dict[report.GROUP, dict[str, float]]:
    return {(*key, clients): {"cpu_us": cpu, "rps": rps} for key, (cpu, rps) in figures.items()}


def test_round_ratios_pair_each_round_with_the_baseline_run_beside_it() -> None:
    def sample(server: str, round_no: int, rps: float, cpu_s: float) -> dict[str, object]:
        return {"server": server, "mode": "close", "pinned": True, "connections": 50,
                "round": round_no, "rps": rps, "requests": 1000, "cpu_s": cpu_s}

    samples = [sample("fdpass-least", 1, 100.0, 1.0), sample("fs-sync-inline", 1, 90.0, 1.2),
               sample("fdpass-least", 2, 50.0, 2.0), sample("fs-sync-inline", 2, 50.0, 2.0),
               sample("fs-sync-inline", 3, 70.0, 1.0),  # no baseline in round 3: left out
               sample("fdpass-least-again", 1, 95.0, 1.0)]
    ratios = report.round_ratios(samples, "fs-sync-inline", "fdpass-least", mode="close",
                                 pinned=True, clients=50)
    assert ratios["rps"] == pytest.approx([0.9, 1.0])
    assert ratios["cpu_us"] == pytest.approx([1.2, 1.0])
    lines = report.round_ratio_lines({"config": {"connections": 50}, "samples": samples})
    assert "| fs-sync-inline | pinned | 50 | 2 | 1.10 (1.00-1.20) | 0.95 (0.90-1.00) |" in lines
    # The floor against itself comes first: the resolution the rows below it are read at.
    control = lines.index("| fdpass-least-again | pinned | 50 | 1 | 1.00 (1.00-1.00) "
                          "| 0.95 (0.95-0.95) |")
    assert control < lines.index(
        "| fs-sync-inline | pinned | 50 | 2 | 1.10 (1.00-1.20) | 0.95 (0.90-1.00) |")
    assert report.round_ratio_lines({"config": {"connections": 50}, "samples": []}) == []


def test_targets_divide_by_each_baseline_and_say_what_was_not_measured() -> None:
    summary = _summary({
        ("fs-sync", "close", True): (130.0, 5000.0),
        ("shared-blocking", "close", True): (50.0, 10000.0),
        ("shared-blocking-hello", "close", True): (100.0, 5000.0),
        ("fs-asyncio-protocol", "keepalive", False): (20.0, 19000.0),
        ("shared-epoll", "keepalive", False): (12.0, 20000.0),
        ("fs-sync-inline", "close", True): (60.0, 9000.0),
        ("fs-thread-inline", "close", True): (70.0, 8000.0),
        ("fdpass-least", "close", True): (50.0, 10000.0),
        ("fdpass-least-again", "close", True): (52.0, 9400.0),
    }) | _summary({
        ("fs-sync-inline", "close", False): (57.0, 9600.0),
        ("fdpass-least", "close", False): (50.0, 10000.0),
    }, clients=1000)
    lines = report.target_lines(summary, {
        "config": {"connections": 50, "extra_connections": [1000]},
        "fairness": [{"server": "fs-sync", "max_deviation": 0.2},
                     {"server": "nginx", "max_deviation": 0.5}]})
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:5]): line for line in lines[2:]}
    assert len(rows) == len(lines) - 2 == len(report.targets([50, 1000])) + 1  # + fairness

    def cells(*key: str, clients: int = 50) -> list[str]:
        return [c.strip() for c in rows[(*key, str(clients))].strip("|").split("|")[5:]]

    cpu = "CPU per new connection"
    assert cells(cpu, "fs-sync", "shared-blocking (inline responder)", "pinned") == [
        "2.60", "≤ 1.3", "NOT met"]
    assert cells(cpu, "fs-sync", "shared-blocking-hello (same handler)", "pinned") == [
        "1.30", "≤ 1.3", "met"]
    assert cells("new connection req/s", "fs-sync", "shared-blocking-hello (same handler)",
                 "pinned") == ["1.00", "≥ 0.95", "met"]
    assert cells(cpu, "fs-sync", "shared-blocking (inline responder)", "unpinned") == [
        "-", "≤ 1.3", "not measured (no close unpinned c=50 run of fs-sync or shared-blocking)"]
    assert cells("new connection req/s", "fs-sync-shared", "gunicorn-sync", "pinned") == [
        "-", "≥ 3.5",
        "not measured (no close pinned c=50 run of fs-sync-shared or gunicorn-sync)"]
    assert cells("keep-alive req/s", "fs-asyncio-protocol", "shared-epoll", "unpinned") == [
        "0.95", "≥ 0.95", "met"]
    assert cells("fairness: worst worker off the mean", "fs-sync", "(the mean)", "unpinned") == [
        "0.20", "≤ 0.10", "NOT met"]
    # Against the bare mechanism: judged for sync workers, reported for the others.
    floor = "fdpass-least (bare fd passing, least loaded)"
    assert cells(cpu, "fs-sync-inline", floor, "pinned") == ["1.20", "≤ 1.15", "NOT met"]
    assert cells("new connection req/s", "fs-sync-inline", floor, "pinned") == [
        "0.90", "≥ 0.95", "NOT met"]
    assert cells(cpu, "fs-sync-inline", floor, "unpinned", clients=1000) == [
        "1.14", "≤ 1.15", "met"]
    assert cells("new connection req/s", "fs-sync-inline", floor, "unpinned", clients=1000) == [
        "0.96", "≥ 0.95", "met"]
    assert cells(cpu, "fs-thread-inline", floor, "pinned") == ["1.40", "-", "reported"]
    # The floor against itself: the run's noise, shown and never judged.
    assert cells("new connection req/s", "fdpass-least-again", floor, "pinned") == [
        "0.94", "-", "reported"]
    assert cells(cpu, "fdpass-least-again", floor, "pinned") == ["1.04", "-", "reported"]
    assert cells(cpu, "fs-asyncio-inline", floor, "pinned", clients=1000)[2].startswith(
        "not measured (no close pinned c=1000 run of fs-asyncio-inline or fdpass-least)")


@pytest.mark.parametrize(("spec", "complaint"), [
    ("forkserver.examples.hello_http", "expected MODULE:FUNC"),
    (":handle", "expected MODULE:FUNC"),
    ("no_such_module_here:handle", "cannot import no_such_module_here"),
    ("forkserver.examples.hello_http:nothing", "has no attribute 'nothing'"),
    ("forkserver.examples.hello_http:BODY", "BODY is not callable"),
])
def test_a_bad_handler_is_refused_before_any_fork(
    spec: str, complaint: str, capsys: pytest.CaptureFixture[str],
) -> None:
    # --fd 0 is never reached: the handler is checked first.
    assert shared_accept.main(["--fd", "0", "--handler", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"shared_accept: --handler {spec!r}: ") and complaint in err, err


def test_a_handler_runs_only_in_blocking_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        shared_accept.main(["--fd", "0", "--mode", "epoll", "--handler",
                            launch.HELLO])
    assert exit_info.value.code == 2
    assert "--handler runs only in blocking mode, not --mode epoll" in capsys.readouterr().err


def test_the_stall_check_tells_a_waiting_connection_from_a_new_one_on_its_port() -> None:
    """A request left unread counts; a new connection from the same address does not."""
    if shutil.which("ss") is None:
        pytest.skip("ss is missing (.ci/run installs iproute2)")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def client(local_port: int) -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", local_port))
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            return sock

        waiting = client(0)
        address = waiting.getsockname()[1]
        served = listener.accept()[0]  # accepted, and never read: it waits
        # The server closes first, so the client's port is free again at once.
        with waiting, served:
            first = bench.waiting_connections(port)
            assert bench.waiting_connections(port) == first  # still waiting: the same key
            assert len(first) == 1
        # The same client address again: a different connection, which must not match.
        again = client(address)
        with again, listener.accept()[0]:
            second = bench.waiting_connections(port)
        assert len(second) == 1
        assert second.keys() != first.keys()
        assert [key.split()[0] for key in second] == [key.split()[0] for key in first]


def test_the_bytecode_count_follows_real_connections_and_does_not_move() -> None:
    # In a process of its own, as the tool always counts: the worker it
    # builds takes over SIGTERM and the signal wakeup descriptor.
    first = bytecodes.run_for(None)
    total, _, rest = first.removeprefix("sync worker: ").partition(" bytecodes and ")
    assert float(total) > 0, first
    worker, _, master = rest.partition("\nmaster: ")
    # Every connection passes through the worker's own path, and the master's.
    for name in ("core.py:receive_one", "core.py:serve_blocking", "timing.py:observe"):
        assert name in worker, name
    assert float(master.split()[0]) > 0, master
    for name in ("tcpserver.py:_accept_batch", "dispatch.py:dispatch", "worker_table.py:pick",
                 "dispatch.py:drain_pending", "fdpass.py:send_each"):  # fmt: skip
        assert name in master, name
    # The point of counting: the same code gives the same figure, whatever the load.
    assert bytecodes.run_for(None) == first
