"""Where a process's CPU goes per connection: perf stat, perf trace, py-spy.

Attached to one process (forkserver's master, or a worker) while wrk
drives ``Connection: close`` traffic, three views are taken in three
separate runs, so one tool's overhead does not distort another's:

* ``perf stat``: task-clock and context switches, per connection;
* ``perf trace -s``: system calls per accepted connection, with errors
  (a failed ``accept4`` is an ``EAGAIN``);
* ``py-spy record``: the Python functions the samples land in.

``perf trace`` and ``py-spy`` slow the process they watch, so only
their *counts and shares* are read, never their timings.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from tests.bench import launch, procstat, wrk
from tests.bench.launch import Server, ServerFailed

TOOL_SLACK = 1.0  # seconds a tool watches beyond wrk's run: its start-up and wrk's


def _attach(tool: list[str], server: Server, seconds: float,
            pinned: bool) -> tuple[str, wrk.WrkResult]:
    proc = subprocess.Popen(tool, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        result = wrk.run(server.url, connections=50, seconds=seconds, close=True,
                         cpu=0 if pinned else None)
        out, _ = proc.communicate(timeout=seconds + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    return out, result


def perf_stat(pid: int, server: Server, seconds: float, pinned: bool) -> dict[str, Any]:
    tool = ["perf", "stat", "-x,", "-e", "task-clock,context-switches,page-faults",
            "-p", str(pid), "--", "sleep", f"{seconds + TOOL_SLACK:g}"]
    out, result = _attach(tool, server, seconds, pinned)
    values: dict[str, float] = {}
    for line in out.splitlines():
        parts = line.split(",")
        if len(parts) > 3 and parts[0].replace(".", "", 1).isdigit():
            values[parts[2]] = float(parts[0])
    conns = result.requests
    clock_ms = values.get("task-clock", float("nan"))
    return {
        "connections": conns,
        "task-clock us per server connection": round(1e3 * clock_ms / conns, 2),
        "context switches/conn": round(values.get("context-switches", float("nan")) / conns, 3),
    }


def perf_trace(pid: int, server: Server, seconds: float, pinned: bool) -> list[dict[str, Any]]:
    tool = ["perf", "trace", "-s", "-p", str(pid), "--", "sleep", f"{seconds + TOOL_SLACK:g}"]
    out, _ = _attach(tool, server, seconds, pinned)
    rows: list[dict[str, Any]] = []
    for m in re.finditer(r"^\s+(\w+)\s+(\d+)\s+(\d+)\s+[\d.]+", out, re.MULTILINE):
        rows.append({"syscall": m.group(1), "calls": int(m.group(2)), "errors": int(m.group(3))})
    accepted = sum(r["calls"] - r["errors"] for r in rows if r["syscall"] in ("accept4", "accept"))
    accepted = accepted or sum(r["calls"] for r in rows if r["syscall"] in ("recvmsg",))
    for r in rows:
        r["per conn"] = round(r["calls"] / accepted, 3) if accepted else None
        r["errors per conn"] = round(r["errors"] / accepted, 3) if accepted else None
    return sorted(rows, key=lambda r: -r["calls"])


def py_spy(pid: int, server: Server, seconds: float, pinned: bool,
           out_dir: Path) -> dict[str, list[tuple[str, float]]]:
    exe = launch.BENCH_VENV / "bin" / "py-spy"
    raw = out_dir / f"py-spy-{pid}.txt"
    tool = [str(exe), "record", "--nonblocking", "-r", "250", "-d", f"{int(seconds + 1)}",
            "-f", "raw", "-o", str(raw), "-p", str(pid)]
    _attach(tool, server, seconds, pinned)
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        total += n
        own[_short(frames[-1])] += n
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += n
    if not total:
        return {"self": [], "inclusive": []}
    return {"self": [(f, round(n / total, 3)) for f, n in own.most_common(15)],
            "inclusive": [(f, round(n / total, 3)) for f, n in inclusive.most_common(25)]}


def _short(frame: str) -> str:
    # "handle (forkserver/workers/sync.py:42)" -> "handle (workers/sync.py)"
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    path = m.group(2)
    return f"{m.group(1)} ({'/'.join(path.split('/')[-2:])})"


def targets(servers: list[str]) -> list[tuple[str, str]]:
    """(server, role): forkserver's masters and a sync worker, and a baseline worker.

    The asyncio master shows the same path with several descriptors per
    message, where workers have room for more than one connection.
    ``fs-sync-inline`` and ``fdpass-least``, when run, are profiled too.
    """
    out = [("shared-blocking", "worker")]
    if "fs-asyncio" in servers:
        out = [("fs-asyncio", "master"), *out]
    if "fs-sync" in servers:
        out = [("fs-sync", "master"), ("fs-sync", "worker"), *out]
    # The bare fd-passing floor and forkserver running its very responder:
    # process by process, what forkserver adds to the mechanism.
    for name in ("fs-sync-inline", "fdpass-least"):
        if name in servers:
            out += [(name, "master"), (name, "worker")]
    return out


def profile_phase(rows: list[dict[str, Any]], servers: list[str],
                  args: argparse.Namespace) -> None:
    have_perf = shutil.which("perf") is not None
    have_spy = (launch.BENCH_VENV / "bin" / "py-spy").exists()
    for name, role in targets(servers):
        builder, _ = launch.SERVERS[name]
        entry: dict[str, Any] = {"server": name, "role": role}
        try:
            with Server(f"{name}-profile", builder, workers=args.workers,
                        cpu=1 if args.profile_pinned else None) as server:
                server.wait_ready()
                kids = [p for p in procstat.tree(server.pid) if p != server.pid]
                pid = server.pid if role == "master" else kids[0]
                entry["pid"] = pid
                if have_perf:
                    entry["perf stat"] = perf_stat(pid, server, args.seconds,
                                                   args.profile_pinned)
                    entry["syscalls"] = perf_trace(pid, server, args.seconds,
                                                   args.profile_pinned)
                if have_spy:
                    entry["py-spy"] = py_spy(pid, server, args.seconds, args.profile_pinned,
                                             server.scratch)
        except (ServerFailed, wrk.WrkError, OSError, IndexError) as exc:
            entry["error"] = str(exc)[:300]
        rows.append(entry)
        print(f"  profile {name} {role}: {entry.get('perf stat', entry.get('error'))}",
              flush=True)


def render(rows: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for e in rows:
        lines += ["", f"### Profile: {e['server']} {e['role']} (pid {e.get('pid', '?')}, "
                  "`Connection: close`)", ""]
        if "error" in e:
            lines.append(f"error: {e['error']}")
            continue
        if "perf stat" in e:
            lines.append("perf stat: " + ", ".join(f"{k} {v}" for k, v in e["perf stat"].items()))
            lines += ["", "| syscall | calls | errors | per connection | errors per connection |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['syscall']} | {r['calls']} | {r['errors']} | {r['per conn']} "
                      f"| {r['errors per conn']} |" for r in e["syscalls"]]
        if "py-spy" in e:
            lines += ["", "py-spy, share of samples (self): " + "; ".join(
                f"{f} {share:.0%}" for f, share in e["py-spy"]["self"][:12])]
            lines += ["", "py-spy, share of samples (inclusive): " + "; ".join(
                f"{f} {share:.0%}" for f, share in e["py-spy"]["inclusive"][:20])]
    return lines
