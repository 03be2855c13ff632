"""Scenario b, live burst: N files staged in spool/tmp/, then renamed into a running daemon's
spool as fast as one process can -> files lost, first rename -> all in `events`.
"""

from __future__ import annotations

import time
from typing import Any

from bench.scenarios.base import (
    BenchDaemon,
    BenchTree,
    Counter,
    Ctx,
    Incomplete,
    Metric,
    Scenario,
    finish_tree,
    lifecycle_events,
    rename_all,
    stage,
    wait_count,
)

METRICS = [
    Metric("lost", "files lost", "", ("eq", 0), "loss"),
    Metric("ingest_s", "first rename -> all in `events`", "s"),
    Metric("events_per_s", "live ingest, events/s", "/s", kind="info"),
    Metric("writer_per_s", "writer renames/s (files staged in spool/tmp first)", "/s",
           kind="info"),
    Metric("lag_s", "last rename -> all in `events`", "s", kind="info"),
]


def run(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    n = ctx.sizes["b_files"]
    tree = BenchTree(ctx.base, f"b{rep}")
    tree.configure(ctx.receiver.url(f"/b{rep}/nomaflowd"))
    items = lifecycle_events(f"b{rep}", n)
    daemon = BenchDaemon(tree, "b").start(wait=False)
    counter = Counter(tree.db_path)
    try:
        daemon.wait_ready()
        staged = stage(tree, items)  # written beforehand; the burst is the renames
        t0 = time.monotonic()
        times = rename_all(staged)
        count, done = wait_count(counter, n, max(60.0, n / 100), daemon)
        if done is None:
            raise Incomplete(f"{count}/{n} events after the time bound:\n{daemon.tail()}")
        code = daemon.stop()
        log_errors = daemon.log_problems()
        counter.close()
        final = Counter(tree.db_path)()
        lost = n - final - tree.rejected_count() - tree.spool_left()
        return {"files": n, "lost": lost, "ingest_s": done - times[0],
                "events_per_s": n / (done - times[0]),
                "writer_per_s": n / (times[-1] - t0), "writer_s": times[-1] - t0,
                "lag_s": done - times[-1],  # last rename -> all in `events`
                "rejected": tree.rejected_count(), "exit_code": code, "log_errors": log_errors}
    finally:
        counter.close()
        daemon.close()
        finish_tree(ctx, tree)


SCENARIO = Scenario("live burst", METRICS, run)
