"""Scenario h, footprint: RSS idle and CPU while idle over a window; the RSS peak is
scenario a's run with the same number.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any

from bench.scenarios.base import (
    CLK_TCK,
    BenchDaemon,
    BenchTree,
    Ctx,
    Metric,
    Scenario,
    finish_tree,
    log,
)

METRICS = [
    Metric("idle_rss_mb", "RSS idle", "MB", ("le", 40.0)),
    Metric("ready_s", "start-up: spawn -> READY=1, empty spool", "s", kind="info"),
    Metric("version_ms", "start-up: `nomaflowd --version`, spawn -> exit", "ms", kind="info"),
    Metric("peak_rss_mb", "RSS peak (VmHWM during scenario a)", "MB", ("le", 128.0)),
    Metric("idle_cpu_pct", "CPU while idle", "%", ("le", 1.0)),
]


def run(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    window = ctx.sizes["h_seconds"]
    tree = BenchTree(ctx.base, f"h{rep}")
    tree.configure(ctx.receiver.url(f"/h{rep}/nomaflowd"))
    daemon = BenchDaemon(tree, "h").start(wait=False)
    try:
        ready_s = daemon.wait_ready()
        time.sleep(1.0)  # let the scheduler's first poll and the first rescan pass
        rss0 = daemon.status_kb("VmRSS")
        c0, t0 = daemon.cpu_ticks(), time.monotonic()
        time.sleep(window)
        c1, t1 = daemon.cpu_ticks(), time.monotonic()
        rss1 = daemon.status_kb("VmRSS")
        threads = daemon.status_kb("Threads")
        code = daemon.stop()
        log_errors = daemon.log_problems()
        result: dict[str, Any] = {
            "idle_rss_mb": max(rss0, rss1) / 1024, "idle_cpu_pct": (c1 - c0) / CLK_TCK
            / (t1 - t0) * 100, "idle_window_s": t1 - t0, "ready_s": ready_s,
            "threads": threads, "exit_code": code, "log_errors": log_errors}
    finally:
        daemon.close()
        finish_tree(ctx, tree)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nomaflowd", "--version"], capture_output=True,
                       check=True)
        times.append((time.perf_counter() - t) * 1000)
    result["version_ms"] = statistics.median(times)
    a_runs = (ctx.results or {}).get("a", {}).get("runs", [])
    peak = a_runs[rep].get("peak_rss_mb") if rep < len(a_runs) else None
    result["peak_rss_mb"] = peak  # VmHWM of scenario a's run with the same number
    if peak is None and rep == 0:
        log("    RSS peak comes from scenario a: add a to --only for it")
    return result


SCENARIO = Scenario("footprint", METRICS, run)
