"""Turn the benchmark's samples into a table, the target checks and a chart.

Everything here works on the plain data written to ``results.json``, so
a saved run can be re-rendered: ``python -m tests.bench.report DIR``.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench import profile

GROUP = tuple[str, str, bool, int]  # server, mode, pinned, concurrent clients
SHARED = {"close": "shared-blocking", "keepalive": "shared-epoll"}
GUNICORN = "gunicorn-sync"
#: The bare fd-passing baselines: the floor of the master-dispatch mechanism.
FD_PASSING = "fdpass-least"  # least loaded, one ack per connection: what master dispatch does
FD_PASSING_RR = "fdpass-rr"
#: The floor run again beside itself: its ratio to FD_PASSING is what the
#: run's noise alone makes of two identical servers, the resolution of every
#: ratio to the floor in that run.
CONTROL = "fdpass-least-again"


def summarise(samples: Iterable[dict[str, Any]]) -> dict[GROUP, dict[str, Any]]:
    groups: dict[GROUP, list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault((s["server"], s["mode"], s["pinned"], s["connections"]),
                          []).append(s)
    out = {}
    for key, runs in groups.items():
        rps = [r["rps"] for r in runs]
        cpu = [1e6 * r["cpu_s"] / r["requests"] for r in runs if r["requests"]]
        master = [1e6 * r["master_cpu_s"] / r["requests"] for r in runs if r["requests"]]
        ready = [r["start_to_ready_s"] for r in runs if r["start_to_ready_s"] is not None]
        out[key] = {
            "n": len(runs),
            "rps": statistics.median(rps), "rps_min": min(rps), "rps_max": max(rps),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "stalled": max(r.get("stalled_clients", 0) for r in runs),
            "non_2xx": sum(r["non_2xx"] for r in runs),
            "cpu_us": statistics.median(cpu) if cpu else float("nan"),
            "cpu_us_min": min(cpu) if cpu else float("nan"),
            "cpu_us_max": max(cpu) if cpu else float("nan"),
            "master_us": statistics.median(master) if master else float("nan"),
            "ready_s": statistics.median(ready) if ready else float("nan"),
        }
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None or math.isnan(x) else f"{x:{spec}}{suffix}"


def main_table(summary: dict[GROUP, dict[str, Any]]) -> list[str]:
    lines = [
        "| server | mode | pinned | clients | req/s median (min-max) | p50 / p99 ms "
        "| errors / non-2xx | stalled clients "
        "| server CPU µs per req (min-max) | master µs | req/s x shared | req/s x gunicorn "
        "| CPU x shared | req/s x fd passing | CPU x fd passing | start→ready s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (server, mode, pinned, clients), s in sorted(
            summary.items(), key=lambda kv: (kv[0][1], kv[0][3], not kv[0][2], kv[0][0])):
        shared = summary.get((SHARED[mode], mode, pinned, clients))
        guni = summary.get((GUNICORN, mode, pinned, clients))
        floor = summary.get((FD_PASSING, mode, pinned, clients))
        lines.append(
            f"| {server} | {mode} | {'yes' if pinned else 'no'} | {clients} "
            f"| {s['rps']:,.0f} ({s['rps_min']:,.0f}-{s['rps_max']:,.0f}) "
            f"| {s['p50_ms']:.2f} / {s['p99_ms']:.2f} | {s['errors']} / {s['non_2xx']} "
            f"| {s['stalled']} "
            f"| {s['cpu_us']:.1f} ({s['cpu_us_min']:.1f}-{s['cpu_us_max']:.1f}) "
            f"| {fmt(s['master_us'], '.1f')} "
            f"| {fmt(ratio(s['rps'], shared['rps'] if shared else None))} "
            f"| {fmt(ratio(s['rps'], guni['rps'] if guni else None))} "
            f"| {fmt(ratio(s['cpu_us'], shared['cpu_us'] if shared else None))} "
            f"| {fmt(ratio(s['rps'], floor['rps'] if floor else None))} "
            f"| {fmt(ratio(s['cpu_us'], floor['cpu_us'] if floor else None))} "
            f"| {fmt(s['ready_s'], '.3f')} |"
        )
    return lines


SAME_HANDLER = "shared-blocking-hello"  # shared accept running forkserver's hello_http handle
SYNC_TARGETS = ("fs-sync", "fs-sync-shared")
KEEPALIVE_TARGETS = ("fs-asyncio", "fs-asyncio-shared", "fs-asyncio-protocol",
                     "fs-asyncio-uvloop", "fs-asyncio-protocol-uvloop")
#: forkserver running the baselines' inline responder as a handler, by worker class.
INLINE = ("fs-sync-inline", "fs-thread-inline", "fs-asyncio-inline")
BASELINE_NOTE = {
    SHARED["close"]: "shared-blocking (inline responder)",
    SAME_HANDLER: "shared-blocking-hello (same handler)",
    FD_PASSING: "fdpass-least (bare fd passing, least loaded)",
    FD_PASSING_RR: "fdpass-rr (bare fd passing, round robin)",
}


@dataclass(frozen=True)
class Target:
    """One ratio the requirement sets: server ÷ baseline on a figure, against a goal."""

    label: str
    server: str
    baseline: str
    mode: str
    pinned: bool
    key: str  # "cpu_us" or "rps"
    goal: float | None  # None: the ratio is reported, not judged
    at_most: bool  # CPU must stay under its goal, req/s must reach it
    clients: int = 50


def targets(clients: Sequence[int] = (50,)) -> list[Target]:
    """Every target row, in the order the table shows them.

    *clients* are the client counts of the main phase, the first the
    main one: the rows against shared accept are at that count, those
    against the bare fd-passing floor at each.
    """
    main = clients[0] if clients else 50
    rows: list[Target] = []
    for count in clients:
        for pinned in (True, False):
            for server in (CONTROL, *INLINE):
                sync = server == "fs-sync-inline"
                rows += [
                    Target("CPU per new connection", server, FD_PASSING, "close", pinned,
                           "cpu_us", 1.15 if sync else None, at_most=True, clients=count),
                    Target("new connection req/s", server, FD_PASSING, "close", pinned, "rps",
                           0.95 if sync else None, at_most=False, clients=count),
                ]
    for server in SYNC_TARGETS:
        for baseline in (SHARED["close"], SAME_HANDLER):
            rows += [Target("CPU per new connection", server, baseline, "close", pinned,
                            "cpu_us", 1.3, at_most=True, clients=main)
                     for pinned in (True, False)]
    for server in SYNC_TARGETS:
        rows += [Target("new connection req/s", server, baseline, "close", True, "rps", 0.95,
                        at_most=False, clients=main)
                 for baseline in (SHARED["close"], SAME_HANDLER)]
    rows += [Target("new connection req/s", server, GUNICORN, "close", True, "rps", 3.5,
                    at_most=False, clients=main) for server in SYNC_TARGETS]
    for server in KEEPALIVE_TARGETS:
        rows += [Target("keep-alive req/s", server, SHARED["keepalive"], "keepalive", pinned,
                        "rps", 0.95, at_most=False, clients=main) for pinned in (True, False)]
    return rows


def target_lines(summary: dict[GROUP, dict[str, Any]], data: dict[str, Any]) -> list[str]:
    config = data.get("config", {})
    clients = [config.get("connections", 50), *config.get("extra_connections", [])]
    lines = ["| target | server | ÷ baseline | pinning | clients | measured | goal | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for t in targets(clients):
        group = (t.mode, t.pinned, t.clients)
        missing = [name for name in (t.server, t.baseline) if (name, *group) not in summary]
        value = None if missing else ratio(summary[(t.server, *group)][t.key],
                                           summary[(t.baseline, *group)][t.key])
        if missing:
            runs = f"{t.mode} {'pinned' if t.pinned else 'unpinned'} c={t.clients}"
            result = f"not measured (no {runs} run of {' or '.join(missing)})"
        elif value is None:
            result = "not measured (no figure)"
        elif t.goal is None:
            result = "reported"
        else:
            result = "met" if (value <= t.goal if t.at_most else value >= t.goal) else "NOT met"
        goal = "-" if t.goal is None else f"{'≤' if t.at_most else '≥'} {t.goal:g}"
        lines.append(f"| {t.label} | {t.server} | {BASELINE_NOTE.get(t.baseline, t.baseline)} "
                     f"| {'pinned' if t.pinned else 'unpinned'} | {t.clients} | {fmt(value)} "
                     f"| {goal} | {result} |")
    for f in data.get("fairness", []):
        if f["server"].startswith("fs-"):
            dev = f["max_deviation"]
            ok = not math.isnan(dev) and dev <= 0.10
            lines.append(f"| fairness: worst worker off the mean | {f['server']} | (the mean) "
                         f"| unpinned | {clients[0]} | {fmt(dev)} | ≤ 0.10 "
                         f"| {'met' if ok else 'NOT met'} |")
    return lines


def round_ratios(samples: Iterable[dict[str, Any]], server: str, baseline: str, *, mode: str,
                 pinned: bool, clients: int) -> dict[str, list[float]]:
    """Each round's ratio to *baseline*, run beside it in that round: key -> ratios.

    A drift of the machine between rounds moves both figures of one
    round alike, so their ratio shows how far apart the two are the way
    a ratio of medians over the whole run cannot.
    """
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for s in samples:
        if (s["mode"], s["pinned"], s["connections"]) == (mode, pinned, clients) \
                and s["server"] in (server, baseline) and s["requests"]:
            by_round.setdefault(s["round"], {})[s["server"]] = s
    ratios: dict[str, list[float]] = {"cpu_us": [], "rps": []}
    for pair in by_round.values():
        if server in pair and baseline in pair:
            a, b = pair[server], pair[baseline]
            ratios["cpu_us"].append((a["cpu_s"] / a["requests"]) / (b["cpu_s"] / b["requests"]))
            ratios["rps"].append(a["rps"] / b["rps"])
    return ratios


def round_ratio_lines(data: dict[str, Any]) -> list[str]:
    """Against the floor, round by round: the median and the spread of the paired ratios."""
    config = data.get("config", {})
    clients = [config.get("connections", 50), *config.get("extra_connections", [])]
    samples = data.get("samples", [])
    rows = []
    for count in clients:
        for pinned in (True, False):
            for server in (CONTROL, *INLINE):
                r = round_ratios(samples, server, FD_PASSING, mode="close", pinned=pinned,
                                 clients=count)
                if not r["rps"]:
                    continue
                rows.append(
                    f"| {server} | {'pinned' if pinned else 'unpinned'} | {count} "
                    f"| {len(r['rps'])} | {statistics.median(r['cpu_us']):.2f} "
                    f"({min(r['cpu_us']):.2f}-{max(r['cpu_us']):.2f}) "
                    f"| {statistics.median(r['rps']):.2f} "
                    f"({min(r['rps']):.2f}-{max(r['rps']):.2f}) |")
    if not rows:
        return []
    return ["", f"### Round by round against {FD_PASSING}", "",
            "Each round's ratio to the floor run in the same round, then their median "
            "(range): how far the spread of single rounds reaches.  The targets above "
            f"divide the medians of the whole run.  *{CONTROL}* is the floor itself, run "
            "again: how far apart this run measures two identical servers.", "",
            "| server | pinning | clients | rounds | CPU per connection | req/s |",
            "|---|---|---|---|---|---|", *rows]


def fairness_lines(data: dict[str, Any]) -> list[str]:
    if not data.get("fairness"):
        return []
    lines = ["", "### Connections per worker (fairness, `Connection: close`)", "",
             "| server | workers | connections per worker | worst off the mean | errors |",
             "|---|---|---|---|---|"]
    for f in data["fairness"]:
        lines.append(f"| {f['server']} | {f['workers']} | {', '.join(map(str, f['counts']))} "
                     f"| {f['max_deviation']:.1%} | {f['errors']} / {f['non_2xx']} |")
    return lines


def scaling_lines(data: dict[str, Any]) -> list[str]:
    if not data.get("scaling"):
        return []
    lines = ["", "### Scaling (`Connection: close`, unpinned)", "",
             "| server | clients | workers | req/s | server CPU µs per conn | master µs "
             "| p99 ms | errors / non-2xx |", "|---|---|---|---|---|---|---|---|"]
    for s in data["scaling"]:
        per = 1e6 / s["requests"] if s["requests"] else float("nan")
        lines.append(f"| {s['server']} | {s['connections']} | {s['workers']} | {s['rps']:,.0f} "
                     f"| {s['cpu_s'] * per:.1f} | {s['master_cpu_s'] * per:.1f} "
                     f"| {s['p99_ms']:.2f} | {s['errors']} / {s['non_2xx']} |")
    return lines


def dict_table(title: str, rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    keys = list(dict.fromkeys(k for row in rows for k in row))  # a failed row has fewer
    lines = ["", f"### {title}", "", "| " + " | ".join(keys) + " |",
             "|" + "---|" * len(keys)]
    for row in rows:
        values = [row.get(k, "") for k in keys]
        cells = [f"{v:,.3f}" if isinstance(v, float) else str(v).replace("\n", " ")
                 for v in values]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _load(triple: list[float] | None) -> str:
    return "?" if not triple else "/".join(f"{x:.1f}" for x in triple)


TARGETS_NOTE = (
    "Each ratio is the server's figure ÷ the baseline's, same mode, pinning and clients. "
    "*fdpass-least* is the bare mechanism of master dispatch (an epoll master passes each "
    "descriptor over SOCK_SEQPACKET to the worker with the fewest outstanding, workers ack "
    "each one) running the inline responder, and *fs-\\*-inline* run that responder as a "
    "handler: a ratio between them is what forkserver adds to the mechanism's own floor. "
    f"*{CONTROL}* is that floor again, reported and never judged: its ratio to the floor "
    "is the noise of this run, against which a target's margin should be read. "
    "*shared-blocking* answers inline, the cheapest Python can; "
    "*shared-blocking-hello* runs forkserver's own `hello_http:handle`, as fs-sync does, so "
    "a ratio to it is the cost of dispatch alone, while one to shared-blocking also includes "
    "what that handler does beyond the inline responder (its socket timeout, HTTP parsing)."
)


def render(data: dict[str, Any]) -> str:
    summary = summarise(data["samples"])
    m = data.get("machine", {})
    cfg = data["config"]
    lines = [
        f"## forkserver benchmark, {m.get('date_utc', '')}", "",
        f"forkserver from the {m.get('forkserver', 'working tree')}.", "",
        f"{m.get('cpus')} CPUs ({m.get('cpu_model')}), kernel {m.get('kernel')}, "
        f"{m.get('python')}, {m.get('wrk')}, {m.get('nginx')}; load average "
        f"{_load(m.get('loadavg_at_start'))} at the start, {_load(m.get('loadavg_at_end'))} "
        "at the end. "
        f"wrk -t1 -c{cfg['connections']}, {cfg['seconds']} s per run, {cfg['rounds']} "
        f"interleaved rounds, {cfg['workers']} workers. Pinned: wrk on CPU 0, the server on "
        "CPU 1. CPU is the server's whole process tree from /proc; in `close` mode a request "
        "is a connection. Ratios: to shared-accept blocking (`close`) or epoll "
        "(`keepalive`), and to gunicorn sync, in the same mode and pinning. *Stalled clients*: "
        "connections whose request sat unread at both 1/3 and 2/3 of a run (most in any "
        "round); wrk's latency only counts answered requests, so it cannot show them.", "",
    ]
    lines += main_table(summary)
    lines += ["", "### Targets", "", TARGETS_NOTE, "", *target_lines(summary, data)]
    lines += fairness_lines(data)
    lines += round_ratio_lines(data)
    lines += scaling_lines(data)
    lines += dict_table("Worker memory (USS) with and without preload", data.get("memory", []))
    lines += dict_table("Idle connections", data.get("idle", []))
    lines += dict_table("Respawn: worker killed → replacement serving", data.get("respawn", []))
    lines += dict_table("Fleet: 3 hosts behind HAProxy (HUP, graceful stop, SIGKILL)",
                        data.get("fleet", []))
    lines += dict_table("TLS beside nginx: full and resumed handshakes, keep-alive",
                        data.get("tls", []))
    lines += profile.render(data.get("profile", []))
    lines += dict_table("Prices of steps on the per-connection path, in isolation (µs)",
                        [{"step": k, "µs": round(v, 2)} for k, v in data.get("levers", {}).items()])
    if data.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in data["skipped"].items())]
    if data.get("failures"):
        lines += ["", "Failures:"] + [f"- {f}" for f in data["failures"]]
    return "\n".join(lines) + "\n"


def chart(data: dict[str, Any], path: Path) -> Path | None:
    """A PNG of req/s and CPU per request; None where matplotlib is not installed."""
    # matplotlib lives only in the bench's own venv, not the project's.
    try:
        import matplotlib  # type: ignore[import-not-found]  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found]  # noqa: PLC0415
    except ImportError:
        return None
    summary = summarise(data["samples"])
    servers = sorted({k[0] for k in summary})
    clients = data["config"]["connections"]
    panels = [("close", "rps", "req/s, new connection per request"),
              ("keepalive", "rps", "req/s, keep-alive"),
              ("close", "cpu_us", "server CPU µs per connection")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    width = 0.4
    for ax, (mode, key, title) in zip(axes, panels, strict=True):
        for offset, pinned in ((-width / 2, True), (width / 2, False)):
            vals, lo, hi = [], [], []
            for name in servers:
                s = summary.get((name, mode, pinned, clients))
                v = s[key] if s else 0.0
                vals.append(v)
                lo.append(v - s[key + "_min"] if s else 0.0)
                hi.append(s[key + "_max"] - v if s else 0.0)
            xs = [i + offset for i in range(len(servers))]
            ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3,
                   label="pinned apart" if pinned else "unpinned")
        ax.set_xticks(range(len(servers)))
        ax.set_xticklabels(servers, rotation=35, ha="right")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("forkserver beside shared accept, gunicorn and nginx "
                 f"(median, min-max over {data['config']['rounds']} rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1])
    loaded = json.loads((out / "results.json").read_text())
    (out / "table.md").write_text(render(loaded))
    print(render(loaded))
    chart(loaded, out / "chart.png")
