"""A fleet loses nothing when one host is reloaded or drained, and little when one dies.

Real HAProxy (``config/fleet/haproxy.cfg``, as shipped) in front of three
real ``forkserver run -c config/fleet/host.toml``, each host in its own
network namespace, the load client in another (``tests.fleet``).  Every
request is a new connection through HAProxy with a PROXY v2 header;
every handler must see the client's address (198.18.0.2), never the
balancer's.  The waits are on events: the daemons' READY=1 and log
lines, HAProxy's view of each server on its stats socket, the load
client's progress lines; every one has a timeout.

The figures (requests, failures by kind, the time HAProxy took to take
a killed host out) are printed; ``tests/bench --phases fleet`` runs the
same scenarios as a benchmark.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests import fleet as fleet_mod
from tests.fleet import CLIENT_ADDRESS, Fleet

WHY_NOT = fleet_mod.available()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no fleet here: {WHY_NOT}")

#: Requests in each scenario's load, at most (each scenario stops it early once it has
#: seen what it needs); per-server HAProxy maxconn bounds what a dead host can lose.
TOTAL = 20000
MAXCONN = 8


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with fleet_mod.fleet(3) as made:
        yield made


def outcomes(result: dict[str, Any]) -> Counter[str]:
    return Counter(record["outcome"] for record in result["records"])


def check_clients(result: dict[str, Any]) -> None:
    """Every handler saw the client's own address: the header was read, the balancer hidden."""
    seen = Counter(record["client"] for record in result["records"] if record["outcome"] == "ok")
    assert set(seen) == {CLIENT_ADDRESS}, seen


def report(name: str, result: dict[str, Any], **more: object) -> None:
    kinds = outcomes(result)
    hosts = Counter(r.get("host") for r in result["records"] if r["outcome"] == "ok")
    extra = "".join(f", {key} {value}" for key, value in more.items())
    print(f"\nfleet {name}: {len(result['records'])} requests in {result['elapsed']:.1f} s, "
          f"{dict(kinds)}, by host {dict(sorted(hosts.items()))}{extra}")  # fmt: skip


def restart(fleet: Fleet, name: str) -> None:
    host = next(h for h in fleet.hosts if h.name == name)
    fleet.start_host(host)
    fleet.wait_servers({name: "UP"})


def test_hup_one_host_then_every_host_in_turn_loses_nothing(fleet: Fleet) -> None:
    load = fleet.load(TOTAL)
    load.wait_answered(200)
    for host in (fleet.hosts[0], *fleet.hosts):  # one host, then all of them in turn
        before = len(host.records("reload_completed"))
        host.signal(signal.SIGHUP)
        host.wait_log("reload_completed", generation=before + 1)
        load.wait_answered(load.answered + 300)  # traffic flows between the reloads
    result = load.stop()
    report("HUP", result, reloads=len(fleet.hosts) + 1)
    assert outcomes(result) == Counter({"ok": len(result["records"])}), outcomes(result)
    check_clients(result)
    assert {r["host"] for r in result["records"]} == {h.name for h in fleet.hosts}


def test_a_graceful_stop_with_drain_delay_loses_nothing(fleet: Fleet) -> None:
    host = fleet.hosts[2]
    load = fleet.load(TOTAL)
    load.wait_answered(200)
    host.signal(signal.SIGTERM)
    host.wait_log("master_draining")
    to_drain = fleet.wait_servers({host.name: "DRAIN"})  # HAProxy heard "drain"
    assert host.wait_exit() == 0
    gone_at = time.monotonic()
    load.wait_answered(load.answered + 200)  # the others carry everything now
    result = load.stop()
    report("graceful stop", result, drain_seen_after=f"{to_drain:.2f} s")
    assert outcomes(result) == Counter({"ok": len(result["records"])}), outcomes(result)
    check_clients(result)
    late = [r for r in result["records"] if r["host"] == host.name and r["start"] > gone_at]
    assert not late, "served by a host that had exited"
    restart(fleet, host.name)


def test_sigkill_of_one_master_loses_only_what_was_in_flight_there(fleet: Fleet) -> None:
    host = fleet.hosts[1]
    load = fleet.load(TOTAL)
    load.wait_answered(200)
    in_flight_before = int(fleet.servers()[host.name]["scur"])
    killed_at = time.monotonic()
    host.signal(signal.SIGKILL)
    to_down = fleet.wait_servers({host.name: "DOWN"})
    down_at = time.monotonic()
    assert host.wait_exit() == -signal.SIGKILL
    fleet.reap(host)  # its workers died with it (parent-death signal)
    load.wait_answered(load.answered + 300)
    result = load.stop()
    failed = [r for r in result["records"] if r["outcome"] != "ok"]
    report("SIGKILL", result, in_flight_on_it_just_before=in_flight_before,
           marked_down_after=f"{to_down:.2f} s")  # fmt: skip
    # The only failures are connections under way at the moment of the kill: each
    # started before it and ended after it, and HAProxy never had more than MAXCONN
    # of them on that host.
    assert len(failed) <= MAXCONN, Counter(r["outcome"] for r in failed)
    for record in failed:
        assert record["start"] <= killed_at <= record["end"], record
    # The survivors served everything after: no failure once HAProxy had it down.
    assert all(r["outcome"] == "ok" for r in result["records"] if r["start"] > down_at)
    check_clients(result)
    restart(fleet, host.name)
