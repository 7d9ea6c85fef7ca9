"""The benchmark's secondary figures: memory, idle connections, respawn.

Each phase measures the shared-accept baseline (and gunicorn or nginx
where they apply) beside forkserver, so a figure always has something
to be read against.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import selectors
import signal
import socket
import time
from datetime import datetime
from typing import Any

from tests.bench import launch, procstat, wrk
from tests.bench.launch import Server, ServerFailed

MB = 1024 * 1024


def worker_pids(server: Server) -> list[int]:
    return [p for p in procstat.tree(server.pid) if p != server.pid]


Variant = tuple[str, str, launch.Builder, dict[str, str]]  # server, variant, builder, env


def _memory_variants(state_mb: int, servers: list[str]) -> list[Variant]:
    """Each memory configuration, the shared-accept baseline's and forkserver's."""
    sa = launch.shared_accept
    mb = str(state_mb)
    rows: list[Variant] = [
        ("shared-blocking", "no state (fresh worker)", sa("blocking"), {}),
        ("shared-blocking", f"{mb} MB built after fork", sa("blocking", "--preload-mb", mb), {}),
        ("shared-blocking", f"{mb} MB preloaded", sa("blocking", "--preload-mb", mb,
                                                     "--preload"), {}),
        ("shared-blocking", f"{mb} MB preloaded + gc.freeze()",
         sa("blocking", "--preload-mb", mb, "--preload", "--freeze"), {}),
        ("shared-blocking", f"{mb} MB preloaded as one bytes buffer",
         sa("blocking", "--preload-mb", mb, "--preload", "--blob"), {}),
    ]
    if "fs-sync" in servers:
        fs, handler = launch.forkserver, "tests.bench.handlers:handle"
        state = {"BENCH_STATE_MB": mb}
        rows += [
            ("fs-sync", "no state, preloaded (fresh worker)", fs("sync", handler, "--preload"), {}),
            ("fs-sync", "no state, handler imported after fork", fs("sync", handler), {}),
            ("fs-sync", f"{mb} MB built after fork", fs("sync", handler, "--no-preload"), state),
            ("fs-sync", f"{mb} MB preloaded", fs("sync", handler, "--preload"), state),
            ("fs-sync", f"{mb} MB preloaded + gc.freeze()", fs("sync", handler, "--preload"),
             {**state, "BENCH_GC_FREEZE": "1"}),
            ("fs-sync", f"{mb} MB preloaded as one bytes buffer",
             fs("sync", handler, "--preload"), {**state, "BENCH_STATE_KIND": "blob"}),
        ]
    return rows


def memory_phase(rows: list[dict[str, Any]], servers: list[str], args: argparse.Namespace) -> None:
    """Worker USS before and after traffic that reads all of the preloaded state."""
    fresh: dict[str, float] = {}
    for name, variant, builder, env in _memory_variants(args.state_mb, servers):
        try:
            with Server(f"{name}-mem", builder, workers=args.workers, env=env) as server:
                server.wait_ready(timeout=120)
                before = [procstat.uss_bytes(p) / MB for p in worker_pids(server)]
                # Enough requests for each worker to read every entry at least once.
                result = wrk.run(server.url, connections=args.connections,
                                 seconds=max(args.seconds, 2.0), close=True)
                after = [procstat.uss_bytes(p) / MB for p in worker_pids(server)]
        except (ServerFailed, wrk.WrkError, FileNotFoundError) as exc:
            rows.append({"server": name, "variant": variant, "error": str(exc)[:200]})
            continue
        mean_after = sum(after) / len(after)
        fresh.setdefault(name, mean_after)  # each server's first variant is its fresh worker
        rows.append({
            "server": name, "variant": variant,
            "worker USS at start MB": round(sum(before) / len(before), 1),
            "worker USS after load MB": round(mean_after, 1),
            "above fresh worker MB": round(mean_after - fresh[name], 1),
            "requests": result.requests, "errors": result.errors + result.non_2xx,
        })
        print(f"  memory {name:16} {variant:32} {rows[-1]}", flush=True)


def echo_probe(port: int, timeout: float) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(b"ready?\n")
        return conn.recv(64) == b"ready?\n"


def raise_nofile(need: int) -> None:
    """Raise our descriptor limit (the servers inherit it) to at least *need*."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return
        except (ValueError, PermissionError) as exc:
            raise ServerFailed(f"RLIMIT_NOFILE hard limit {hard} is below the {need} "
                               "descriptors the idle test needs") from exc
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def hold_idle(port: int, count: int, timeout: float = 60.0) -> tuple[int, list[socket.socket]]:
    """Open count connections, send a line on each, read every echo; return how many echoed."""
    conns: list[socket.socket] = []
    try:
        for _ in range(count):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        sel = selectors.DefaultSelector()
        expected = {}
        for i, c in enumerate(conns):
            msg = b"ping %d\n" % i
            c.sendall(msg)
            c.setblocking(False)
            expected[c.fileno()] = msg
            sel.register(c, selectors.EVENT_READ, b"")
        echoed = 0
        deadline = time.monotonic() + timeout
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                data = key.data + sock.recv(64)
                if data == expected[sock.fileno()]:
                    echoed += 1
                    sel.unregister(sock)
                elif len(data) >= len(expected[sock.fileno()]) or not data:
                    sel.unregister(sock)  # wrong or no echo: counted as missing
                else:
                    sel.modify(sock, selectors.EVENT_READ, data)
        sel.close()
        return echoed, conns
    except BaseException:
        for c in conns:
            c.close()
        raise


def idle_phase(rows: list[dict[str, Any]], servers: list[str], args: argparse.Namespace) -> None:
    """N idle connections held by 2 event-loop workers, each echoed back."""
    count = args.idle_connections
    raise_nofile(count + 1000)  # a limit is per process: we hold every client end
    candidates = [("shared-epoll", launch.shared_accept("echo"))]
    if "fs-asyncio" in servers:
        candidates.append(("fs-asyncio", launch.forkserver(
            "asyncio", "tests.bench.handlers:async_echo", "--concurrency", str(count))))
    for name, builder in candidates:
        conns: list[socket.socket] = []
        try:
            with Server(f"{name}-idle", builder, workers=2) as server:
                server.wait_ready(probe=echo_probe)
                pids = procstat.tree(server.pid)
                base = sum(procstat.uss_bytes(p) for p in pids)
                started = time.monotonic()
                echoed, conns = hold_idle(server.port, count)
                took = time.monotonic() - started
                pids = procstat.tree(server.pid)
                held = sum(procstat.uss_bytes(p) for p in pids)
                for c in conns:
                    c.close()
                conns = []
        except (ServerFailed, OSError) as exc:
            for c in conns:
                c.close()
            rows.append({"server": name, "connections": count, "error": str(exc)[:200]})
            continue
        rows.append({
            "server": name, "connections": count, "echoed": echoed,
            "open + echo all s": round(took, 2),
            "server USS MB": round(held / MB, 1),
            "KB per connection": round((held - base) / count / 1024, 2),
        })
        print(f"  idle {rows[-1]}", flush=True)


_LIFECYCLE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*"
                        r"worker \d+ \(pid (\d+)\) (spawned|ready)$", re.MULTILINE)


def fork_to_ready_ms(log: str) -> list[float]:
    """From forkserver's own log: each worker's fork to its READY, in ms."""
    spawned: dict[str, datetime] = {}
    out = []
    for stamp, pid, what in _LIFECYCLE.findall(log):
        when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
        if what == "spawned":
            spawned[pid] = when
        elif pid in spawned:
            out.append((when - spawned.pop(pid)).total_seconds() * 1e3)
    return out


#: Every victim has lived this long when it is killed: forkserver takes a
#: death within a second of starting for a crash and backs off before the
#: replacement, which is not what this phase measures.
VICTIM_AGE = 1.5


def process_age(pid: int) -> float:
    """Seconds since *pid* started, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22
    with open("/proc/uptime") as uptime:
        now = float(uptime.read().split()[0])
    return now - start_ticks / os.sysconf("SC_CLK_TCK")


def respawn_phase(rows: list[dict[str, Any]], servers: list[str], args: argparse.Namespace) -> None:
    """With one worker: SIGKILL it and time until a request is answered again."""
    for name in [s for s in ("gunicorn-sync", "nginx", "fs-sync") if s in servers]:
        builder, _ = launch.SERVERS[name]
        times = []
        try:
            with Server(f"{name}-respawn", builder, workers=1) as server:
                server.wait_ready()
                for _ in range(3):
                    (victim,) = worker_pids(server)
                    wait = VICTIM_AGE - process_age(victim)
                    if wait > 0:
                        time.sleep(wait)  # sleep-ok: a bounded age, not a synchronisation
                    started = time.monotonic()
                    os.kill(victim, signal.SIGKILL)
                    server.wait_ready()  # the queued probe is answered by the new worker
                    times.append(time.monotonic() - started)
                    if victim in worker_pids(server):
                        raise ServerFailed(f"{name}: worker {victim} survived SIGKILL")
        except (ServerFailed, ValueError) as exc:
            rows.append({"server": name, "error": str(exc)[:200]})
            continue
        forks = fork_to_ready_ms(server.log_tail(limit=None)) if name == "fs-sync" else []
        rows.append({"server": name, "kill → serving ms (3 kills)":
                     ", ".join(f"{1e3 * t:.0f}" for t in times),
                     "fork → ready ms (first worker, then each replacement)":
                     ", ".join(f"{ms:.0f}" for ms in forks) or "not logged"})
        print(f"  respawn {rows[-1]}", flush=True)


