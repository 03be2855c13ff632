"""Scenario c, paced latency: FAILED events at R/s for S s, each write + fsync + rename ->
rename-to-POST latency (CLOCK_MONOTONIC in both processes).
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.scenarios.base import (
    BenchDaemon,
    BenchTree,
    Ctx,
    Incomplete,
    Metric,
    Scenario,
    failure_events,
    finish_tree,
    latencies,
    paced,
    percentile,
    slowest,
    write_one,
)

METRICS = [
    Metric("p50_ms", "rename -> POST latency p50", "ms", ("le", 2.0)),
    Metric("p99_ms", "rename -> POST latency p99", "ms", ("le", 10.0)),
    Metric("max_ms", "rename -> POST latency max", "ms", kind="info"),
    Metric("achieved_rate", "writer rate achieved", "/s", kind="info"),
    Metric("lost", "deliveries missing", "", ("eq", 0), "loss"),
]


def run(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    rate, seconds = ctx.sizes["c_rate"], ctx.sizes["c_seconds"]
    n = int(rate * seconds)
    path = f"/c{rep}/nomaflowd"
    tree = BenchTree(ctx.base, f"c{rep}")
    tree.configure(ctx.receiver.url(path))
    items = failure_events(f"c{rep}", n)
    daemon = BenchDaemon(tree, "c").start(wait=False)
    try:
        daemon.wait_ready()
        spool, tmpdir = str(tree.spool), str(tree.spool / "tmp")
        # A paced writer behaves like nomaflowd.client.drop(): write, fsync, rename.
        times = paced(rate, n, lambda i: write_one(spool, tmpdir, items[i], True))
        got = ctx.receiver.wait_items(path, n, 30.0)
        code = daemon.stop()
        log_errors = daemon.log_problems()
        sent = {items[i][2]: t for i, t in times.items()}
        lat, missing, dups = latencies(sent, ctx.receiver.records(path))
        if not lat:
            raise Incomplete(f"no delivery arrived ({got}/{n})")
        span = max(times.values()) - min(times.values())
        return {"events": n, "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90),
                "p99_ms": percentile(lat, 99), "max_ms": max(lat), "mean_ms": statistics.fmean(lat),
                "achieved_rate": (n - 1) / span if span > 0 else None, "lost": missing,
                "duplicates": dups, "exit_code": code, "log_errors": log_errors,
                "writer": "write + fsync + rename",
                "slowest": slowest(sent, ctx.receiver.records(path), min(times.values()))}
    finally:
        daemon.close()
        finish_tree(ctx, tree)


SCENARIO = Scenario("paced latency", METRICS, run)
