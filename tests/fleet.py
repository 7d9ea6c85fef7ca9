"""A fleet in network namespaces: a client, HAProxy, and forkserver hosts.

``Fleet`` builds, inside namespaces it creates (never in the host's own
network), this network from the benchmarking range 198.18.0.0/15::

    client 198.18.0.2 ── 198.18.0.1 [HAProxy, namespace "lb"] 198.19.0.1 ── bridge
                                                                   ├── h1 198.19.0.11
                                                                   ├── h2 198.19.0.12
                                                                   └── h3 198.19.0.13

Every link is a veth pair made inside the namespaces (``ip -n NS link add
... netns OTHER``); nothing is routed to or from the host's namespace,
and the addresses exist only in there.  HAProxy runs
``config/fleet/haproxy.cfg`` as it is, each host ``forkserver run -c
config/fleet/host.toml`` (with the test's handler), each in its own
session, with JSON logs read as they come and a notify socket (a
path-named Unix socket: those work across network namespaces).

``Fleet.close()`` kills and reaps every process it started and deletes
every namespace, whatever state things are in; ``fleet()`` is the
context manager around it.  ``available()`` says why namespaces cannot be
made here, if they cannot.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import (
    ROOT,
    LogReader,
    NotifyReader,
    _reap_orphans,
    _session_members,
    _set_subreaper,
    poll_until,
    wait_gone,
)

HAPROXY_CFG = ROOT / "config" / "fleet" / "haproxy.cfg"
HOST_TOML = ROOT / "config" / "fleet" / "host.toml"
FRONTEND = ("198.18.0.1", 8000)
CLIENT_ADDRESS = "198.18.0.2"
BALANCER_ADDRESS = "198.19.0.1"
HOST_ADDRESSES = ("198.19.0.11", "198.19.0.12", "198.19.0.13")
HANDLER = "tests.handlers.fleet:answer"
TIMEOUT = 30.0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=TIMEOUT)


def available() -> str | None:  # noqa: PLR0911 (one answer per missing piece)
    """None if namespaces, veths and bridges can be made here; else why not."""
    if shutil.which("ip") is None:
        return "the ip tool (iproute2) is not installed"
    if shutil.which("haproxy") is None:
        return "haproxy is not installed (apt-get install haproxy; .ci/run installs it)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"fsprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace: {exc.stderr.decode().strip()}"
    except OSError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _ip("-n", name, "link", "add", "br0", "type", "bridge")
        _ip("-n", name, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    except subprocess.CalledProcessError as exc:
        return f"cannot create a bridge or veth pair in a namespace: {exc.stderr.decode().strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=TIMEOUT,
                       check=False)  # fmt: skip
    return None


@dataclass
class Process:
    """A process started in a namespace, in its own session, its stderr/stdout read."""

    name: str
    proc: subprocess.Popen[bytes]
    logs: LogReader

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    scratch: Path
    process: Process | None = None
    notify: socket.socket | None = None
    notify_reader: NotifyReader | None = None
    exits: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_log(self, event: str, timeout: float = TIMEOUT, **fields: object) -> dict[str, Any]:
        assert self.process is not None

        def match(record: dict[str, Any]) -> bool:
            return record.get("event") == event and all(record.get(k) == v
                                                        for k, v in fields.items())  # fmt: skip

        return self.process.logs.wait_for(match, timeout, f"{self.name}: {event} {fields}")

    def records(self, event: str) -> list[dict[str, Any]]:
        assert self.process is not None
        with self.process.logs.cond:
            return [r for r in self.process.logs.records if r.get("event") == event]

    def wait_notify(self, text: str, since: int = 0, timeout: float = TIMEOUT) -> str:
        assert self.notify_reader is not None
        return self.notify_reader.wait_for(text, timeout, since)

    def notifications(self) -> int:
        assert self.notify_reader is not None
        with self.notify_reader.cond:
            return len(self.notify_reader.messages)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        assert self.process is not None
        code = self.process.proc.wait(timeout=timeout)
        self.exits.append(code)
        return code


class Fleet:
    def __init__(self, hosts: int = 3, *, handler: str = HANDLER, workers: int = 2) -> None:
        if not 1 <= hosts <= len(HOST_ADDRESSES):
            raise ValueError(f"1 to {len(HOST_ADDRESSES)} hosts")
        tag = f"fs{os.getpid() % 100000}"
        self.scratch = Path(tempfile.mkdtemp(prefix="fleet-"))
        self.client_ns, self.lb_ns = f"{tag}-client", f"{tag}-lb"
        self.hosts = [Host(f"h{i + 1}", f"{tag}-h{i + 1}", HOST_ADDRESSES[i],
                           self.scratch / f"h{i + 1}") for i in range(hosts)]  # fmt: skip
        self.handler = handler
        self.workers = workers
        self.namespaces: list[str] = []
        self.processes: list[Process] = []
        self.haproxy: Process | None = None
        self.loads = 0

    # -- the network ----------------------------------------------------------

    def build(self) -> None:
        for ns in (self.client_ns, self.lb_ns, *(h.namespace for h in self.hosts)):
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        lb = self.lb_ns
        _ip("-n", lb, "link", "add", "vclient", "type", "veth", "peer", "name", "eth0",
            "netns", self.client_ns)  # fmt: skip
        _ip("-n", lb, "addr", "add", f"{FRONTEND[0]}/24", "dev", "vclient")
        _ip("-n", lb, "link", "set", "vclient", "up")
        _ip("-n", self.client_ns, "addr", "add", f"{CLIENT_ADDRESS}/24", "dev", "eth0")
        _ip("-n", self.client_ns, "link", "set", "eth0", "up")
        _ip("-n", lb, "link", "add", "br0", "type", "bridge")
        _ip("-n", lb, "addr", "add", f"{BALANCER_ADDRESS}/24", "dev", "br0")
        _ip("-n", lb, "link", "set", "br0", "up")
        for host in self.hosts:
            port = f"v{host.name}"
            _ip("-n", lb, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", host.namespace)  # fmt: skip
            _ip("-n", lb, "link", "set", port, "master", "br0")
            _ip("-n", lb, "link", "set", port, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")

    # -- processes --------------------------------------------------------------

    def _start(self, name: str, namespace: str, command: Sequence[str], env: dict[str, str],
               *, stdout_logs: bool = False) -> Process:  # fmt: skip
        proc = subprocess.Popen(
            ["ip", "netns", "exec", namespace, *command], env=env, cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_logs else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if stdout_logs else subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        stream = proc.stdout if stdout_logs else proc.stderr
        logs = LogReader(stream)
        logs.start()
        process = Process(name, proc, logs)
        self.processes.append(process)
        return process

    def start_haproxy(self) -> Process:
        run = self.scratch / "haproxy"
        run.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "FORKSERVER_HAPROXY_RUN": str(run)}
        self.haproxy = self._start("haproxy", self.lb_ns,
                                   ["haproxy", "-db", "-f", str(HAPROXY_CFG)], env,
                                   stdout_logs=True)  # fmt: skip
        haproxy = self.haproxy

        def up() -> bool:
            if haproxy.proc.poll() is not None:
                raise AssertionError(f"HAProxy exited {haproxy.proc.returncode}:\n"
                                     f"{haproxy.logs.text()}")  # fmt: skip
            return (run / "admin.sock").exists()

        poll_until(up, "HAProxy's stats socket", timeout=TIMEOUT)
        return haproxy

    def start_host(self, host: Host, *args: str) -> None:
        host.scratch.mkdir(parents=True, exist_ok=True)
        if host.notify is None:
            host.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            host.notify.bind(str(host.scratch / "notify"))
            host.notify_reader = NotifyReader(host.notify)
            host.notify_reader.start()
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(host.scratch / "notify"),
            "RUNTIME_DIRECTORY": str(host.scratch),
            "FORKSERVER_NAME": host.name,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        command = [sys.executable, "-m", "forkserver", "run", "-c", str(HOST_TOML),
                   "--workers", str(self.workers), "--log-format", "json", *args,
                   self.handler]  # fmt: skip
        since = host.notifications()
        host.process = self._start(host.name, host.namespace, command, env)
        host.wait_notify("READY=1", since=since)

    def start(self) -> None:
        _set_subreaper(True)  # a killed master's workers are ours to reap
        self.build()
        for host in self.hosts:
            self.start_host(host)
        self.start_haproxy()
        self.wait_servers({host.name: "UP" for host in self.hosts})

    # -- HAProxy's view ---------------------------------------------------------

    def haproxy_command(self, command: str) -> str:
        path = self.scratch / "haproxy" / "admin.sock"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` for the backend's servers: name -> CSV fields (status, scur, ...)."""
        text = self.haproxy_command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows
                if row["pxname"] == "forkserver" and row["svname"].startswith("h")}  # fmt: skip

    def wait_servers(self, wanted: dict[str, str], timeout: float = TIMEOUT) -> float:
        """Wait until each named server's status is the wanted one (UP, DRAIN, DOWN); seconds taken.

        HAProxy has no push for this: its stats socket is polled, with a
        growing pause (at most 20 ms), until it says so or the time is up.
        """
        started = time.monotonic()
        pause = 0.002
        while True:
            seen = {name: row["status"] for name, row in self.servers().items()}
            if all(_is(seen.get(name, ""), status) for name, status in wanted.items()):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                logs = self.haproxy.logs.text()[-3000:] if self.haproxy else ""
                raise AssertionError(f"HAProxy servers {seen}, wanted {wanted}, after "
                                     f"{timeout} s:\n{logs}")  # fmt: skip
            time.sleep(pause)  # sleep-ok: polls HAProxy's stats socket, bounded, backing off
            pause = min(pause * 2, 0.02)

    # -- load -------------------------------------------------------------------

    def load(self, total: int, *, concurrency: int = 16, deadline: float = 60.0) -> Load:
        """Start the load client in the client's namespace; ``Load.stop()`` ends it early."""
        self.loads += 1
        stop_file = self.scratch / f"stop-load-{self.loads}"
        command = [sys.executable, "-m", "tests.fleet_client", f"{FRONTEND[0]}:{FRONTEND[1]}",
                   "--total", str(total), "--concurrency", str(concurrency),
                   "--deadline", str(deadline), "--progress", "25",
                   "--stop-file", str(stop_file)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                            os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen(["ip", "netns", "exec", self.client_ns, *command], env=env,
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
        load = Load(proc, deadline, stop_file)
        self.processes.append(Process("client", proc, load.errors))
        return load

    # -- the end ----------------------------------------------------------------

    def close(self) -> None:
        """Kill and reap everything, delete every namespace: whatever happened."""
        members = {process.pid: _session_members(process.pid) for process in self.processes}
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            for pid in members[process.pid]:  # a worker may have left the group
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        pids = []
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.proc.wait(timeout=TIMEOUT)
            pids.extend([process.pid, *members[process.pid]])
            _reap_orphans(process.pid)
        for process in self.processes:
            process.logs.join(timeout=TIMEOUT)
            for stream in (process.proc.stdout, process.proc.stderr):
                if stream is not None:
                    stream.close()
        for host in self.hosts:
            if host.notify_reader is not None:
                host.notify_reader.stop()
            if host.notify is not None:
                host.notify.close()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=TIMEOUT,
                           check=False)  # fmt: skip
        self.namespaces.clear()
        shutil.rmtree(self.scratch, ignore_errors=True)
        wait_gone(pids)
        _set_subreaper(False)

    def reap(self, host: Host) -> None:
        """Reap what is left of *host*'s session (its workers, once its master was killed)."""
        _reap_orphans(host.pid)


def _is(status: str, wanted: str) -> bool:
    """``DRAIN (agent)`` is DRAIN; ``UP 1/2`` (going down) is not UP."""
    return status == wanted or status.startswith(f"{wanted} (")


class Load:
    """A running ``tests.fleet_client``; ``progress`` lines as they come, then the result."""

    def __init__(self, proc: subprocess.Popen[bytes], deadline: float, stop_file: Path) -> None:
        self.proc = proc
        self.stop_file = stop_file
        self.deadline = deadline
        self.answered = self.failed = 0
        self.result: dict[str, Any] | None = None
        self.cond = threading.Condition()
        self.errors = LogReader(proc.stderr)
        self.errors.start()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode()
            with self.cond:
                if line.startswith("progress "):
                    _, answered, failed = line.split()
                    self.answered, self.failed = int(answered), int(failed)
                elif line.startswith("result "):
                    self.result = json.loads(line[len("result "):])
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_answered(self, count: int, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.answered < count and self.result is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{count} answers not reached within {timeout} s "
                                         f"({self.answered} answered, {self.failed} failed)")
                self.cond.wait(remaining)

    def stop(self) -> dict[str, Any]:
        """End the load now (each connection under way finishes); its result."""
        self.stop_file.touch()
        return self.join()

    def join(self) -> dict[str, Any]:
        code = self.proc.wait(timeout=self.deadline + TIMEOUT)
        self._reader.join(timeout=TIMEOUT)
        assert code == 0 and self.result is not None, (
            f"the load client exited {code}:\n{self.errors.text()[-3000:]}")
        return self.result


@contextlib.contextmanager
def fleet(hosts: int = 3, **options: Any) -> Iterator[Fleet]:
    """A started fleet (every host ready, HAProxy sees every one UP), closed on the way out."""
    made = Fleet(hosts, **options)
    try:
        made.start()
        yield made
    finally:
        made.close()


# -- the scenarios: shared by tests/test_fleet.py and the bench's fleet phase ------

TOTAL = 20000  # requests a scenario's load may send at most (it is stopped earlier)


@dataclass
class Outcome:
    """One scenario's load: every request's record, and the figures to print."""

    name: str
    result: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def records(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self.result["records"]
        return records

    def kinds(self) -> Counter[str]:
        return Counter(record["outcome"] for record in self.records)

    def summary(self) -> dict[str, Any]:
        hosts = Counter(r.get("host") for r in self.records if r["outcome"] == "ok")
        failures = {kind: n for kind, n in self.kinds().items() if kind != "ok"}
        return {"scenario": self.name, "requests": len(self.records),
                "failures": failures, "seconds": round(self.result["elapsed"], 2),
                "by_host": dict(sorted(hosts.items())), **self.figures}  # fmt: skip


def reload_scenario(fleet: Fleet, *, between: int = 300) -> Outcome:
    """HUP one host, then every host in turn, under load; each waits for its reload."""
    load = fleet.load(TOTAL)
    load.wait_answered(200)
    order = (fleet.hosts[0], *fleet.hosts)
    for host in order:
        before = len(host.records("reload_completed"))
        host.signal(signal.SIGHUP)
        host.wait_log("reload_completed", generation=before + 1)
        load.wait_answered(load.answered + between)  # traffic flows between the reloads
    return Outcome("HUP", load.stop(), {"reloads": len(order)})


def drain_scenario(fleet: Fleet, host: Host) -> Outcome:
    """TERM one host (drain_delay in host.toml) under load, until it has exited."""
    load = fleet.load(TOTAL)
    load.wait_answered(200)
    stopped_at = time.monotonic()
    host.signal(signal.SIGTERM)
    host.wait_log("master_draining")
    to_drain = fleet.wait_servers({host.name: "DRAIN"})  # HAProxy heard "drain"
    code = host.wait_exit()
    gone_at = time.monotonic()
    load.wait_answered(load.answered + 200)  # the others carry everything now
    return Outcome("graceful stop", load.stop(), {
        "exit_code": code, "drain_seen_after_s": round(to_drain, 3),
        "stopped_at": stopped_at, "gone_at": gone_at})  # fmt: skip


def kill_scenario(fleet: Fleet, host: Host) -> Outcome:
    """SIGKILL one host's master under load; the time HAProxy takes to mark it down."""
    load = fleet.load(TOTAL)
    load.wait_answered(200)
    in_flight = int(fleet.servers()[host.name]["scur"])
    pidfd = os.pidfd_open(host.pid)
    try:
        killed_at = time.monotonic()
        host.signal(signal.SIGKILL)
        # Dying takes a moment: until the master's exit has closed its descriptors
        # (the pidfd says so), the kernel still queues connections on its socket.
        ready, _, _ = select.select([pidfd], [], [], TIMEOUT)
        dead_at = time.monotonic()
        assert ready, f"{host.name} did not die"
    finally:
        os.close(pidfd)
    fleet.wait_servers({host.name: "DOWN"})
    down_at = time.monotonic()
    code = host.wait_exit()
    fleet.reap(host)  # its workers died with it (parent-death signal)
    load.wait_answered(load.answered + 300)
    return Outcome("SIGKILL", load.stop(), {
        "exit_code": code, "in_flight_on_it_before": in_flight,
        "marked_down_after_s": round(down_at - killed_at, 3), "killed_at": killed_at,
        "dead_at": dead_at, "down_at": down_at})  # fmt: skip


def restart(fleet: Fleet, host: Host) -> None:
    fleet.start_host(host)
    fleet.wait_servers({host.name: "UP"})
