"""The bench's scenarios, one module each, by the letter run.py's --only takes."""

from __future__ import annotations

from bench.scenarios import (
    alertmanager,
    audit,
    backlog,
    footprint,
    latency,
    live_burst,
    long_runs,
    replicas,
    schedules,
    storm,
    throughput,
)
from bench.scenarios.base import Scenario

SCENARIOS: dict[str, Scenario] = {
    "a": backlog.SCENARIO,
    "b": live_burst.SCENARIO,
    "c": latency.SCENARIO,
    "d": throughput.SCENARIO,
    "e": alertmanager.SCENARIO,
    "f": long_runs.SCENARIO,
    "g": audit.SCENARIO,
    "h": footprint.SCENARIO,
    "i": schedules.SCENARIO,
    "j": replicas.SCENARIO,
    "k": storm.SCENARIO,
}
