"""Drive wrk and read back what it measured.

wrk is the client: with ``Connection: close`` every request is a new
connection, without it connections are kept alive. Its text output is
parsed strictly: a line we expect and do not find is an error, so a
change in wrk's format cannot turn into a silent zero.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# Counts the X-Worker header of each response, per wrk thread, and prints
# the totals at the end: connections per worker when every request closes.
FAIRNESS_LUA = """\
counts = {}
local threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  local w = headers["X-Worker"]
  if w == nil then w = "none" end
  counts[w] = (counts[w] or 0) + 1
end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do
      io.write(string.format("worker-count %s %d\\n", k, v))
    end
  end
end
"""

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


class WrkError(RuntimeError):
    """wrk failed or printed something this parser does not understand."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    socket_errors: dict[str, int]
    non_2xx: int
    worker_counts: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values())


def _latency_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise WrkError(f"wrk latency {text!r} has an unknown unit")
    return float(match.group(1)) * UNITS[match.group(2)]


def _need(pattern: str, output: str) -> re.Match[str]:
    match = re.search(pattern, output, re.MULTILINE)
    if not match:
        raise WrkError(f"wrk output lacks /{pattern}/:\n{output}")
    return match


def parse(output: str) -> WrkResult:
    done = _need(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", output)
    seconds = _latency_ms(done.group(2) + done.group(3)) / 1e3
    rps = float(_need(r"^Requests/sec:\s+([\d.]+)", output).group(1))
    p50 = _latency_ms(_need(r"^\s+50%\s+(\S+)", output).group(1))
    p99 = _latency_ms(_need(r"^\s+99%\s+(\S+)", output).group(1))
    socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    errs = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if errs:
        socket_errors = dict(zip(socket_errors, map(int, errs.groups()), strict=True))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^worker-count (\S+) (\d+)$",
                                                               output, re.MULTILINE)}
    return WrkResult(
        requests=int(done.group(1)),
        seconds=seconds,
        rps=rps,
        p50_ms=p50,
        p99_ms=p99,
        socket_errors=socket_errors,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        worker_counts=counts,
    )


def run(
    url: str,
    *,
    connections: int,
    seconds: float,
    close: bool,
    cpu: int | None = None,
    lua: Path | None = None,
    threads: int = 1,
) -> WrkResult:
    """One bounded wrk run; raises WrkError if wrk fails or overruns."""
    cmd = ["wrk", f"-t{threads}", f"-c{max(connections, threads)}", f"-d{seconds:g}s",
           "--timeout", "5s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    if lua is not None:
        cmd += ["-s", str(lua)]
    cmd.append(url)
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk overran its {seconds}s run by 30s: {' '.join(cmd)}") from exc
    if done.returncode != 0:
        raise WrkError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    return parse(done.stdout)
