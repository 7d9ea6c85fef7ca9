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
a killed host out) are printed; ``tests/bench/run --phases fleet`` runs
the same scenarios (``tests.fleet``) as a benchmark.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator

import pytest

from tests import fleet as fleet_mod
from tests.fleet import CLIENT_ADDRESS, Fleet, Outcome

WHY_NOT = fleet_mod.available()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no fleet here: {WHY_NOT}")

#: HAProxy's maxconn per server (config/fleet/haproxy.cfg): at most this many
#: connections are in flight on one host, so at most this many die with it.
MAXCONN = 8


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with fleet_mod.fleet(3) as made:
        yield made


def check(outcome: Outcome) -> None:
    """Print the figures; every handler saw the client's own address, not the balancer's."""
    print(f"\nfleet {outcome.name}: {outcome.summary()}")
    seen = Counter(r["client"] for r in outcome.records if r["outcome"] == "ok")
    assert set(seen) == {CLIENT_ADDRESS}, seen


def test_the_shipped_haproxy_config_sets_the_bound_tested_here() -> None:
    text = fleet_mod.HAPROXY_CFG.read_text()
    assert f" maxconn {MAXCONN} " in text
    for needed in ("send-proxy-v2", "agent-check", "option redispatch", "retries 3"):
        assert needed in text


def test_hup_one_host_then_every_host_in_turn_loses_nothing(fleet: Fleet) -> None:
    outcome = fleet_mod.reload_scenario(fleet)
    check(outcome)
    assert outcome.kinds() == Counter({"ok": len(outcome.records)}), outcome.kinds()
    assert {r["host"] for r in outcome.records} == {h.name for h in fleet.hosts}


def test_a_graceful_stop_with_drain_delay_loses_nothing(fleet: Fleet) -> None:
    host = fleet.hosts[2]
    outcome = fleet_mod.drain_scenario(fleet, host)
    check(outcome)
    assert outcome.figures["exit_code"] == 0
    assert outcome.kinds() == Counter({"ok": len(outcome.records)}), outcome.kinds()
    gone_at = outcome.figures["gone_at"]
    assert not [r for r in outcome.records if r["host"] == host.name and r["start"] > gone_at]
    fleet_mod.restart(fleet, host)


def test_sigkill_of_one_master_loses_only_what_was_in_flight_there(fleet: Fleet) -> None:
    host = fleet.hosts[1]
    outcome = fleet_mod.kill_scenario(fleet, host)
    check(outcome)
    assert outcome.figures["exit_code"] == -signal.SIGKILL
    failed = [r for r in outcome.records if r["outcome"] != "ok"]
    # The only failures are connections under way on that host while it died (from
    # the kill until its exit had closed its socket): each started before it was dead
    # and ended after the kill.  Of those, the ones open when the kill came are at most
    # MAXCONN (HAProxy's limit for the host); more may follow in the moment between the
    # kill and the exit, as each failure frees a slot: bounded by time, not by count.
    killed_at, dead_at = outcome.figures["killed_at"], outcome.figures["dead_at"]
    open_at_kill = [r for r in failed if r["start"] <= killed_at]
    assert len(open_at_kill) <= MAXCONN, Counter(r["outcome"] for r in failed)
    down_at = outcome.figures["down_at"]
    for record in failed:
        assert record["start"] <= dead_at and record["end"] >= killed_at, record
    # The survivors served everything after: no failure once HAProxy had it down.
    assert all(r["outcome"] == "ok" for r in outcome.records if r["start"] > down_at)
    fleet_mod.restart(fleet, host)
