"""The benchmark: forkserver beside the alternatives, in one run.

Usage (from the repository root; ``tests/bench/run`` installs what is
missing first and then runs this)::

    python -m tests.bench.bench [--rounds 3] [--seconds 5] [--servers a,b] ...

Servers are interleaved over rounds, each round starting one further
along (A B C D, B C D A, ...), so that a drift in the machine spreads
over all of them and none always runs in the same place (first after
the previous round's 1,000 clients, say). Each start of a server
runs a warm-up, then wrk with ``Connection: close`` (a new connection
per request) and with keep-alive, while the server's CPU is read from
/proc. Secondary phases measure fairness, scaling, memory, idle
connections and respawn time. Results go to ``results.json``,
``table.md`` and ``chart.png`` in the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.bench import extras, launch, levers, procstat, profile, report, tls_phase, wrk
from tests.bench.launch import Server, ServerFailed

CLIENT_CPU, SERVER_CPU = 0, 1
MODES = ("close", "keepalive")


@dataclass
class Sample:
    """One wrk run against one server start."""

    server: str
    mode: str  # close | keepalive
    pinned: bool
    round: int
    connections: int
    workers: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    socket_errors: dict[str, int]
    non_2xx: int
    cpu_s: float  # server CPU seconds over the run, whole process tree
    master_cpu_s: float  # the root process alone
    worker_cpu_s: list[float]
    start_to_ready_s: float | None
    stalled_clients: int = 0  # connections with a request unanswered all through the run

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_s / self.requests if self.requests else float("nan")


@dataclass
class Results:
    config: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    fairness: list[dict[str, Any]] = field(default_factory=list)
    scaling: list[Sample] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    idle: list[dict[str, Any]] = field(default_factory=list)
    respawn: list[dict[str, Any]] = field(default_factory=list)
    profile: list[dict[str, Any]] = field(default_factory=list)
    levers: dict[str, float] = field(default_factory=dict)
    fleet: list[dict[str, Any]] = field(default_factory=list)
    tls: list[dict[str, Any]] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)


def measure(server: Server, *, mode: str, seconds: float, connections: int,
            pinned: bool, round_no: int) -> Sample:
    """One wrk run, with the server tree's CPU read before and after."""
    before = procstat.cpu_snapshot(server.pid)
    # wrk times only answered requests: a client that is never answered is
    # invisible in its latency, so look for such clients from the side.
    watch = StallWatch(server.port, seconds)
    result = wrk.run(server.url, connections=connections, seconds=seconds,
                     close=mode == "close", cpu=CLIENT_CPU if pinned else None)
    after = procstat.cpu_snapshot(server.pid)
    stalled = watch.result()
    delta = procstat.cpu_delta(before, after)
    return Sample(
        server=server.name, mode=mode, pinned=pinned, round=round_no,
        connections=connections, workers=server.workers, requests=result.requests,
        rps=result.rps, p50_ms=result.p50_ms, p99_ms=result.p99_ms, errors=result.errors,
        socket_errors=result.socket_errors, non_2xx=result.non_2xx, cpu_s=delta.total,
        master_cpu_s=delta.root, worker_cpu_s=sorted(delta.per_child.values(), reverse=True),
        start_to_ready_s=server.start_to_ready, stalled_clients=stalled,
    )


def waiting_connections(port: int) -> dict[str, int]:
    """Server-side connections holding unread request bytes: connection -> bytes received.

    A connection is its peer address and its socket cookie (``sk:`` in
    ``ss -e``): with a new connection per request a client's port comes
    round again within seconds, and the same address with the same
    request size would otherwise pass for one connection that waited.
    """
    out = subprocess.run(["ss", "-Htnie", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=False, timeout=10).stdout
    waiting: dict[str, int] = {}
    peer = ""
    for line in out.splitlines():
        fields = line.split()
        if not line[:1].isspace() and len(fields) >= 4:  # Recv-Q, Send-Q, local, peer, ...
            cookie = next((f for f in fields[4:] if f.startswith("sk:")), "")
            peer = f"{fields[3]} {cookie}" if fields[0] != "0" else ""
        elif peer:  # the info line of a socket with unread bytes
            match = re.search(r"bytes_received:(\d+)", line)
            waiting[peer] = int(match.group(1)) if match else 0
            peer = ""
    return waiting


class StallWatch:
    """Clients whose request waits unread at both 1/3 and 2/3 of a run.

    A busy keep-alive client often has its next request queued too, so a
    client only counts when it has received nothing new in between.
    """

    def __init__(self, port: int, seconds: float) -> None:
        self.samples: list[dict[str, int]] = []
        self.timers = [threading.Timer(seconds * f, self._sample, args=(port,))
                       for f in (1 / 3, 2 / 3)]
        for t in self.timers:
            t.start()

    def _sample(self, port: int) -> None:
        try:
            self.samples.append(waiting_connections(port))
        except (OSError, subprocess.SubprocessError):
            self.samples.append({})

    def result(self) -> int:
        for t in self.timers:
            t.cancel()
            t.join(timeout=15)
        if len(self.samples) < 2:
            return 0
        first, second = self.samples
        return sum(1 for peer, got in first.items() if second.get(peer) == got)


# What a server that runs forkserver's code needs to import, and why it is
# skipped when that fails (a snapshot of an older commit may lack a handler).
IMPORTS = {
    "forkserver": ("import forkserver.master, forkserver.examples.hello_http",
                   "forkserver.master or forkserver.examples.hello_http does not import"),
    "forkserver-protocol": ("import forkserver.master\n"
                            "from forkserver.examples.hello_http import HelloProtocol",
                            "forkserver.examples.hello_http has no HelloProtocol (protocol "
                            "handlers are not in the forkserver measured)"),
    "forkserver-uvloop": ("import forkserver.master, uvloop\n"
                          "from forkserver.examples.hello_http import HelloProtocol\n"
                          "from forkserver.config import Settings\n"
                          "assert 'event_loop' in Settings.__dataclass_fields__",
                          "uvloop is not installed in the project's interpreter (pip install "
                          "-e '.[uvloop]'), or the forkserver measured has no event_loop"),
}


def importable(statement: str, source: Path | None = None) -> bool:
    """Whether the project's interpreter, in the tree measured, can run *statement*."""
    return subprocess.run(
        [launch.project_python(), "-c", statement], capture_output=True, check=False,
        cwd=launch.ROOT if source is None else source).returncode == 0


def available(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Which servers can run here, and why the others cannot."""
    ok, skipped = [], {}
    imports: dict[tuple[str, Path | None], bool] = {}
    for name in names:
        _, needs = launch.builder_of(name)
        source = launch.source_of(name)
        if needs in IMPORTS and (needs, source) not in imports:
            imports[needs, source] = importable(IMPORTS[needs][0], source)
        if needs == "gunicorn" and not (launch.BENCH_VENV / "bin" / "gunicorn").exists():
            skipped[name] = f"gunicorn is not in {launch.BENCH_VENV} (run installs it)"
        elif needs == "nginx" and shutil.which("nginx") is None:
            skipped[name] = "nginx is not installed"
        elif needs in IMPORTS and not imports[needs, source]:
            skipped[name] = IMPORTS[needs][1]
        else:
            ok.append(name)
    return ok, skipped


def rotated(servers: list[str], by: int) -> list[str]:
    """*servers*, starting *by* places further along (wrapping round)."""
    if not servers:
        return []
    by %= len(servers)
    return servers[by:] + servers[:by]


def main_phase(res: Results, servers: list[str], args: argparse.Namespace) -> None:
    pins = {"both": (True, False), "on": (True,), "off": (False,)}[args.pin]
    for round_no in range(1, args.rounds + 1):
        for pinned in pins:
            for name in rotated(servers, round_no - 1):
                builder, _ = launch.builder_of(name)
                try:
                    with Server(name, builder, workers=args.workers,
                                cpu=SERVER_CPU if pinned else None) as server:
                        server.wait_ready()
                        if args.warmup:
                            wrk.run(server.url, connections=args.connections,
                                    seconds=args.warmup, close=True)
                        # Keep-alive at the main client count only; new connections at
                        # every count (a sync worker's keep-alive clients wait in line).
                        runs = [(mode, args.connections) for mode in args.modes]
                        if "close" in args.modes:
                            runs += [("close", c) for c in args.extra_connections]
                        for mode, connections in runs:
                            sample = measure(server, mode=mode, seconds=args.seconds,
                                             connections=connections, pinned=pinned,
                                             round_no=round_no)
                            res.samples.append(sample)
                            progress(sample)
                except (ServerFailed, wrk.WrkError) as exc:
                    res.failures.append(f"round {round_no} {name} pinned={pinned}: {exc}")
                    print(f"  FAILED {name}: {exc}", file=sys.stderr)


def progress(s: Sample) -> None:
    pin = "pinned" if s.pinned else "unpinned"
    print(f"  r{s.round} {s.server:21} {s.mode:9} {pin:8} c={s.connections:<5} "
          f"w={s.workers} {s.rps:9.0f} req/s  {s.cpu_us_per_request:6.1f} us/req  "
          f"p99 {s.p99_ms:6.2f} ms  err {s.errors} non2xx {s.non_2xx} "
          f"stalled {s.stalled_clients}", flush=True)


def fairness_phase(res: Results, servers: list[str], args: argparse.Namespace) -> None:
    """Connections per worker under steady load, counted by the client."""
    lua = launch.WORK / "fairness.lua"
    lua.write_text(wrk.FAIRNESS_LUA)
    for name in servers:
        if name not in launch.FAIRNESS_SERVERS:
            # Counting needs the X-Worker header, which only the fairness twins add.
            why = "no twin in launch.FAIRNESS_SERVERS that adds X-Worker"
            res.skipped[f"fairness {name}"] = why
            print(f"  skipping fairness {name}: {why}", file=sys.stderr)
            continue
        builder, _ = launch.FAIRNESS_SERVERS[name]
        try:
            with Server(f"{name}-fair", builder, workers=args.workers) as server:
                server.wait_ready()
                result = wrk.run(server.url, connections=args.connections,
                                 seconds=args.seconds, close=True, lua=lua)
        except (ServerFailed, wrk.WrkError) as exc:
            res.failures.append(f"fairness {name}: {exc}")
            continue
        counts = sorted(result.worker_counts.values(), reverse=True)
        mean = sum(counts) / len(counts) if counts else 0.0
        spread = max(abs(c - mean) / mean for c in counts) if mean else float("nan")
        entry = {"server": name, "workers": args.workers, "counts": counts,
                 "max_deviation": spread, "errors": result.errors, "non_2xx": result.non_2xx}
        res.fairness.append(entry)
        print(f"  fairness {name:21} {counts} max deviation {spread:.1%}", flush=True)


def scaling_phase(res: Results, servers: list[str], args: argparse.Namespace) -> None:
    """CPU per connection from 50 to 1,000 clients and from 1 to 8 workers."""
    points = [(c, args.workers) for c in args.scale_clients]
    points += [(args.connections, w) for w in args.scale_workers if w != args.workers]
    for connections, workers in points:
        for name in servers:
            builder, _ = launch.SERVERS[name]
            try:
                with Server(name, builder, workers=workers) as server:
                    server.wait_ready()
                    sample = measure(server, mode="close", seconds=args.seconds,
                                     connections=connections, pinned=False, round_no=0)
            except (ServerFailed, wrk.WrkError) as exc:
                res.failures.append(f"scaling {name} c={connections} w={workers}: {exc}")
                continue
            res.scaling.append(sample)
            progress(sample)


def machine_info() -> dict[str, Any]:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False,
                                  timeout=10).stdout.strip()
        except OSError:
            return ""
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "")
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": os.uname().release,
            "python": out([launch.project_python(), "--version"]),
            "wrk": " ".join(out(["wrk", "-v"]).split()[:2]) if shutil.which("wrk") else "",
            "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True,
                                    check=False).stderr.strip() if shutil.which("nginx") else "",
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # Other work on the machine shows up in every figure: say how much there was.
            "loadavg_at_start": os.getloadavg()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="forkserver beside the alternatives")
    p.add_argument("--servers", default=",".join(launch.SERVERS),
                   help="comma-separated, from: " + ", ".join(launch.SERVERS) + "; NAME@REV "
                        "runs NAME from commit REV beside the others (main phase only), "
                        "to compare revisions in one interleaved run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="length of one wrk run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=50,
                   help="concurrent clients (wrk -c) of every phase")
    p.add_argument("--extra-connections", default="1000", metavar="N,...",
                   help="the main phase's `close` runs are repeated at these client counts "
                        "(empty: none)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--modes", default="close,keepalive")
    p.add_argument("--pin", choices=("both", "on", "off"), default="both")
    p.add_argument("--phases", default="main,fairness,scaling,memory,idle,respawn,profile,levers")
    p.add_argument("--profile-unpinned", dest="profile_pinned", action="store_false",
                   help="profile without pinning wrk and the server to separate CPUs")
    p.add_argument("--fair-servers", default=None, help="default: the --servers")
    p.add_argument("--scale-servers", default="shared-blocking,fs-sync")
    p.add_argument("--scale-clients", default="50,200,1000")
    p.add_argument("--scale-workers", default="1,2,4,8")
    p.add_argument("--idle-connections", type=int, default=10_000)
    p.add_argument("--state-mb", type=int, default=100)
    p.add_argument("--forkserver-from", default="tree", metavar="tree|REV",
                   help="measure the working tree (default) or a commit, e.g. HEAD, so that "
                        "edits made during a run cannot change what is measured")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-chart", action="store_true")
    args = p.parse_args(argv)
    args.servers = [s for s in args.servers.split(",") if s]
    unknown = [s for s in args.servers if launch.split(s)[0] not in launch.SERVERS]
    if unknown:
        p.error(f"--servers: unknown server(s) {', '.join(unknown)}")
    args.modes = [m for m in args.modes.split(",") if m]
    args.extra_connections = [int(c) for c in args.extra_connections.split(",")
                              if c and int(c) != args.connections]
    if any(m not in MODES for m in args.modes):
        p.error(f"--modes: each must be one of {', '.join(MODES)}")
    args.phases = set(args.phases.split(","))
    args.fair_servers = (args.servers if args.fair_servers is None
                         else [s for s in args.fair_servers.split(",") if s])
    args.scale_servers = [s for s in args.scale_servers.split(",") if s]
    args.scale_clients = [int(c) for c in args.scale_clients.split(",") if c]
    args.scale_workers = [int(w) for w in args.scale_workers.split(",") if w]
    if args.out is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        args.out = launch.HERE / "results" / stamp
    return args


def fleet_rows(rows: list[dict[str, Any]]) -> None:
    # Imported when it runs: it needs the project's test dependencies (psutil).
    from tests.bench import fleet_phase  # noqa: PLC0415

    fleet_phase.fleet_phase(rows)


def run(argv: list[str] | None = None) -> Results:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run tests/bench/run, which installs it")
    source = "working tree"
    if args.forkserver_from != "tree":
        source = "commit " + launch.snapshot_forkserver(args.forkserver_from)
    revisions = {rev: launch.add_revision(rev) for name in args.servers
                 if (rev := launch.split(name)[1]) is not None}
    servers, skipped = available(args.servers)
    # NAME@REV servers take part in the main phase only: the others compare servers.
    plain = [name for name in servers if launch.split(name)[1] is None]
    config = {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
              for k, v in vars(args).items()}
    res = Results(config=config, skipped=skipped,
                  machine={**machine_info(), "forkserver": source, "revisions": revisions})
    for name, why in skipped.items():
        print(f"  skipping {name}: {why}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    phases: dict[str, Callable[[], None]] = {
        "main": lambda: main_phase(res, servers, args),
        "fairness": lambda: fairness_phase(res, [s for s in args.fair_servers if s in plain],
                                           args),
        "scaling": lambda: scaling_phase(res, [s for s in args.scale_servers if s in plain],
                                         args),
        "memory": lambda: extras.memory_phase(res.memory, plain, args),
        "idle": lambda: extras.idle_phase(res.idle, plain, args),
        "respawn": lambda: extras.respawn_phase(res.respawn, plain, args),
        "profile": lambda: profile.profile_phase(res.profile, plain, args),
        "levers": lambda: res.levers.update(levers.measure()),
        "fleet": lambda: fleet_rows(res.fleet),
        "tls": lambda: tls_phase.tls_phase(res.tls, args),  # only with --phases ...,tls
    }
    for phase, body in phases.items():
        if phase in args.phases:
            print(f"== {phase}", flush=True)
            body()
    write(res, args)
    return res


def write(res: Results, args: argparse.Namespace) -> None:
    res.machine["loadavg_at_end"] = os.getloadavg()
    data = asdict(res)
    (args.out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    table = report.render(data)
    (args.out / "table.md").write_text(table)
    print(table)
    if not args.no_chart:
        chart = report.chart(data, args.out / "chart.png")
        if chart:
            print(f"chart: {chart}")
    print(f"results: {args.out}")


if __name__ == "__main__":
    run()
