"""Scenario d, throughput: N FAILED events (staged, then a rename burst) to an unlimited
webhook -> deliveries/s; Apprise (bench/apprise_peer.py) sends the same count in the same run.
"""

from __future__ import annotations

import json
import subprocess
import sys
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
    failure_events,
    finish_tree,
    latencies,
    log,
    rename_all,
    stage,
    wait_count,
)

METRICS = [
    Metric("rate", "deliveries/s (first rename -> last POST)", "/s", ("ge", 3_000)),
    Metric("send_rate", "deliveries/s (first POST -> last POST)", "/s", kind="info"),
    Metric("apprise_rate", "Apprise json:// sends/s (same run)", "/s", kind="info"),
    Metric("ratio", "nomaflowd / Apprise", "x", ("ge", 3.0)),
    Metric("recorded_s", "first rename -> all rows in `notifications`", "s", kind="info"),
    Metric("lost", "deliveries missing", "", ("eq", 0), "loss"),
    Metric("not_sent", "outcome other than SENT", "", ("eq", 0), "loss"),
]


def run_apprise(ctx: Ctx, path: str, count: int, prefix: str) -> dict[str, Any]:
    assert ctx.receiver is not None
    url = f"json://127.0.0.1:{ctx.receiver.port}{path}"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "apprise_peer.py"), url, str(count),
         str(ctx.sizes["apprise_limit"]), prefix],
        capture_output=True, text=True, timeout=ctx.sizes["apprise_limit"] + 60)
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"apprise peer failed: {proc.stderr.strip()[-500:]}"}
    if "error" in out:
        return out
    out["received"] = ctx.receiver.wait_items(path, out["sent"], 10.0)
    out["rate"] = out["sent"] / out["elapsed"] if out["elapsed"] > 0 else None
    return out


def run(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    n = ctx.sizes["d_count"]
    path = f"/d{rep}/nomaflowd"
    tree = BenchTree(ctx.base, f"d{rep}")
    tree.configure(ctx.receiver.url(path))
    items = failure_events(f"d{rep}", n)
    daemon = BenchDaemon(tree, "d").start(wait=False)
    notifications = Counter(tree.db_path, "notifications")
    try:
        daemon.wait_ready()
        staged = stage(tree, items)  # written beforehand; the burst is the renames
        rcv0, dmn0 = ctx.receiver.cpu_seconds(), daemon.cpu_ticks()
        times = rename_all(staged)
        got = ctx.receiver.wait_items(path, n, max(60.0, n / 50))
        rcv1, dmn1 = ctx.receiver.cpu_seconds(), daemon.cpu_ticks()
        rows, recorded = wait_count(notifications, n, 30.0, daemon)
        not_sent = Counter(tree.db_path, "notifications", "WHERE outcome != 'SENT'")()
        code = daemon.stop()
        log_errors = daemon.log_problems()
        sent = {item[2]: t for item, t in zip(items, times, strict=True)}
        records = ctx.receiver.records(path)
        lat, missing, dups = latencies(sent, records)
        arrivals = sorted(m for m, _w, _i in records)
        if not arrivals:
            raise Incomplete(f"no delivery arrived ({got}/{n})")
        result: dict[str, Any] = {
            "events": n, "received": got, "lost": missing, "duplicates": dups,
            "rate": len(lat) / (arrivals[-1] - times[0]),
            "send_rate": (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
            if len(arrivals) > 1 else None,
            "first_post_after_s": arrivals[0] - times[0],
            "writer_s": times[-1] - times[0],
            "recorded_s": (recorded - times[0]) if recorded else None,
            "notification_rows": rows, "not_sent": not_sent, "exit_code": code,
            "log_errors": log_errors,
            # CPU share over the delivery window (100 = one core): is either side saturated?
            "daemon_cpu_pct": (dmn1 - dmn0) / CLK_TCK / (arrivals[-1] - times[0]) * 100,
            "receiver_cpu_pct": (rcv1 - rcv0) / (arrivals[-1] - times[0]) * 100,
        }
    finally:
        notifications.close()
        daemon.close()
        finish_tree(ctx, tree)
    peer = run_apprise(ctx, f"/d{rep}/apprise", n, f"d{rep}ap")
    result["apprise"] = peer
    if "error" in peer:
        log(f"    apprise column skipped: {peer['error']}")
        result["apprise_rate"] = result["ratio"] = None
    else:
        result["apprise_rate"] = peer["rate"]
        result["ratio"] = result["rate"] / peer["rate"] if peer["rate"] else None
    return result


SCENARIO = Scenario("throughput vs Apprise", METRICS, run)
