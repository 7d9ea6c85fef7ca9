"""The bench's ``fleet`` phase: the fleet test's scenarios, as figures.

Three forkserver hosts behind real HAProxy, each in its own network
namespace (``tests.fleet``: root and iproute2 needed, else the phase is
skipped with the reason).  For each scenario (HUP every host in turn, a
graceful stop with ``drain_delay``, SIGKILL of one master) one row:
requests, failures by kind, seconds, and for the kill the in-flight
connections on that host just before it and how long HAProxy took to
mark it down.
"""

from __future__ import annotations

import sys
from typing import Any

from tests import fleet


def fleet_phase(rows: list[dict[str, Any]]) -> None:
    why_not = fleet.available()
    if why_not is not None:
        print(f"  skipping the fleet phase: {why_not}", file=sys.stderr)
        rows.append({"scenario": "skipped", "why": why_not})
        return
    with fleet.fleet(3) as made:
        outcomes = [fleet.reload_scenario(made)]
        outcomes.append(fleet.drain_scenario(made, made.hosts[2]))
        fleet.restart(made, made.hosts[2])
        outcomes.append(fleet.kill_scenario(made, made.hosts[1]))
    for outcome in outcomes:
        summary = outcome.summary()
        row = {
            "scenario": summary["scenario"],
            "requests": summary["requests"],
            "failed": sum(summary["failures"].values()),
            "failures by kind": ", ".join(f"{kind} {n}" for kind, n in
                                          sorted(summary["failures"].items())) or "-",
            "seconds": summary["seconds"],
            "in flight on it before": summary.get("in_flight_on_it_before", ""),
            "marked down after (s)": summary.get("marked_down_after_s", ""),
            "drain seen after (s)": summary.get("drain_seen_after_s", ""),
        }  # fmt: skip
        rows.append(row)
        print(f"  {row}", flush=True)
