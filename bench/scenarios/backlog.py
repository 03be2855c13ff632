"""Scenario a, backlog: N event files in the spool before start -> time until all are in
`events`; the daemon's VmHWM here is scenario h's RSS peak. Then the floor: the same files
read, parsed and unlinked by one process with no database (bench/floor.py), timed the same
way (from spawn), and nomaflowd's rate as a fraction of it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from typing import Any

from bench.scenarios.base import (
    BENCH,
    CLK_TCK,
    BenchDaemon,
    BenchTree,
    Counter,
    Ctx,
    Incomplete,
    Metric,
    Scenario,
    finish_tree,
    lifecycle_events,
    wait_count,
    write_all,
)

METRICS = [
    Metric("events_per_s", "backlog ingested, events/s (from spawn)", "/s", ("ge", 10_000)),
    Metric("seconds", "time until all are in `events`", "s"),
    Metric("floor_per_s", "floor: read + parse + unlink, no database, files/s (from spawn)",
           "/s", kind="info"),
    Metric("of_floor", "nomaflowd's backlog rate / the floor", "x", ("ge", 0.5)),
    Metric("steady_events_per_s", "events/s after the first commit", "/s", kind="info"),
    Metric("ready_s", "READY=1 after spawn", "s", kind="info"),
    Metric("lost", "files lost", "", ("eq", 0), "loss"),
    Metric("rejected", "files rejected", "", ("eq", 0), "loss"),
]


def floor(ctx: Ctx, rep: int, items: list[Any]) -> dict[str, Any]:
    """The same files in a spool of their own, handled by bench/floor.py."""
    tree = BenchTree(ctx.base, f"a{rep}floor")
    try:
        write_all(tree, items)
        t = time.monotonic()
        proc = subprocess.run([sys.executable, str(BENCH / "floor.py"), str(tree.spool)],
                              capture_output=True, text=True, timeout=600)
        seconds = time.monotonic() - t
        if proc.returncode != 0:
            raise RuntimeError(f"bench/floor.py exited {proc.returncode}: {proc.stderr[-400:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        return {"floor_per_s": out["files"] / seconds, "floor_loop_per_s":
                out["files"] / out["loop_s"], "floor_s": seconds}
    finally:
        finish_tree(ctx, tree)


def run(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    n = ctx.sizes["a_files"]
    tree = BenchTree(ctx.base, f"a{rep}")
    tree.configure(ctx.receiver.url(f"/a{rep}/nomaflowd"))
    items = lifecycle_events(f"a{rep}", n)
    t = time.monotonic()
    write_all(tree, items)
    fixture_writer_per_s = n / (time.monotonic() - t)  # the same writer with no daemon running
    daemon = BenchDaemon(tree, "a").start(wait=False)
    counter = Counter(tree.db_path)
    first: list[float] = []
    rss_max = [0]

    def sample(count: int) -> None:
        if count and not first:
            first.append(time.monotonic())
            first.append(count)
        with contextlib.suppress(OSError):
            rss_max[0] = max(rss_max[0], daemon.status_kb("VmRSS"))

    try:
        count, done = wait_count(counter, n, max(60.0, n / 200), daemon, on_poll=sample)
        if done is None:
            raise Incomplete(f"{count}/{n} events after the time bound:\n{daemon.tail()}")
        cpu_s = daemon.cpu_ticks() / CLK_TCK
        ready_s = daemon.wait_ready(30)
        hwm = daemon.status_kb("VmHWM")
        code = daemon.stop()
        log_errors = daemon.log_problems()
        counter.close()
        final = Counter(tree.db_path)()
        lost = n - final - tree.rejected_count() - tree.spool_left()
        seconds = done - daemon.started
        steady = ((n - first[1]) / (done - first[0])) if first and done > first[0] else None
        low = floor(ctx, rep, items)
        return {**low, "of_floor": n / seconds / low["floor_per_s"],
                "files": n, "seconds": seconds, "events_per_s": n / seconds,
                "steady_events_per_s": steady, "ready_s": ready_s, "lost": lost,
                "rejected": tree.rejected_count(), "left_in_spool": tree.spool_left(),
                "peak_rss_mb": hwm / 1024, "rss_sampled_max_mb": rss_max[0] / 1024,
                "daemon_cpu_pct": cpu_s / seconds * 100,
                "fixture_writer_per_s": fixture_writer_per_s,
                "exit_code": code, "log_errors": log_errors,
                "mix": "RUNNING+final per run, 1 run in 20 FAILED (webhook sent)"}
    finally:
        counter.close()
        daemon.close()
        finish_tree(ctx, tree)


SCENARIO = Scenario("backlog", METRICS, run)
