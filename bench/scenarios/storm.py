"""Scenario k, storm: N FAILED events across 200 jobs, renamed into a running daemon's spool
at once, to a Slack transport (its default pacing) whose channel is the receiver's /limited/
path: 1 message/s with bursts of 25, 429 beyond that. What the channel received must name
every job, with 0 answers 429 and an audit row per alert; the messages are counted.

Alertmanager (when installed) gets the same alerts (batches of 64, grouped by job) and sends
to the same kind of channel: it retries a refused group with backoff until the notification
times out, and the groups still refused then are lost.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from typing import Any

from bench.scenarios.alertmanager import Alertmanager, alertmanager_binary, am_alert
from bench.scenarios.base import (
    BenchDaemon,
    BenchTree,
    Counter,
    Ctx,
    Incomplete,
    Metric,
    Scenario,
    failure_events,
    finish_tree,
    log,
    rename_all,
    stage,
    wait_count,
)

JOBS = 200
JOB = re.compile(r"job-\d{3}")

METRICS = [
    Metric("messages", "nomaflowd: messages the channel accepted", "", kind="info"),
    Metric("refused", "nomaflowd: answers 429", "", ("eq", 0), "loss"),
    Metric("jobs_missing", "nomaflowd: jobs never named in the channel (of 200)", "", ("eq", 0),
           "loss"),
    Metric("rows_missing", "nomaflowd: alerts without a SENT audit row", "", ("eq", 0), "loss"),
    Metric("drained_s", "nomaflowd: first rename -> every alert recorded", "s", kind="info"),
    Metric("am_messages", "Alertmanager: messages the channel accepted", "", kind="info"),
    Metric("am_refused", "Alertmanager: answers 429", "", kind="info"),
    Metric("am_jobs_missing", "Alertmanager: jobs never named in the channel (of 200)", "",
           kind="info"),
    Metric("am_alerts_delivered", "Alertmanager: alerts in the accepted messages", "",
           kind="info"),
]


def run(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    n = ctx.sizes["k_count"]
    path = f"/limited/k{rep}/nomaflowd"
    tree = BenchTree(ctx.base, f"k{rep}")
    tree.configure("", transport=tree.slack("storm", ctx.receiver.url(path)))
    items = failure_events(f"k{rep}", n)
    daemon = BenchDaemon(tree, "k").start(wait=False)
    sent = Counter(tree.db_path, "notifications", "WHERE outcome = 'SENT'")
    try:
        daemon.wait_ready()
        staged = stage(tree, items)
        times = rename_all(staged)
        rows, drained = wait_count(sent, n, max(120.0, n / 20), daemon, every=0.2)
        if drained is None:
            raise Incomplete(f"{rows}/{n} alerts recorded SENT after the time bound:\n"
                             f"{daemon.tail()}")
        code = daemon.stop()
        log_errors = daemon.log_problems()
        bodies = ctx.receiver.bodies(path)
        named = {m for _t, body in bodies for m in JOB.findall(body)}
        result: dict[str, Any] = {
            "events": n, "messages": len(bodies), "refused": ctx.receiver.refused(path),
            "jobs_named": len(named), "jobs_missing": JOBS - len(named),
            "rows_missing": n - rows, "drained_s": drained - times[0],
            "exit_code": code, "log_errors": log_errors}
    finally:
        sent.close()
        daemon.close()
        finish_tree(ctx, tree)
    result.update(alertmanager(ctx, rep, n))
    return result


def alertmanager(ctx: Ctx, rep: int, n: int) -> dict[str, Any]:
    """The same storm through Alertmanager, grouped by job (200 groups), to the same channel."""
    assert ctx.receiver is not None
    binary = alertmanager_binary()
    if binary is None:
        if rep == 0:
            log("    Alertmanager column skipped: apt-get install prometheus-alertmanager")
        return {}
    path = f"/limited/k{rep}/alertmanager"
    am = Alertmanager(binary, ctx.base, ctx.receiver.url(path), f"k{rep}",
                      group_by="['job_id']", group_wait="1s", group_interval="5s")
    try:
        alerts = [am_alert(f"k{rep}am", i) for i in range(n)]
        for i in range(0, n, ctx.sizes["am_batch"]):
            am.post(alerts[i:i + ctx.sizes["am_batch"]])
        # Wait until the channel has been quiet for group_interval and then some: every group
        # flushed, its retries given up.
        last, quiet_since = -1, time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen = ctx.receiver.requests(path) + ctx.receiver.refused(path)
            if seen != last:
                last, quiet_since = seen, time.monotonic()
            elif time.monotonic() - quiet_since > 8:
                break
            time.sleep(0.2)
    finally:
        am.stop()
        if not ctx.keep:
            shutil.rmtree(am.root, ignore_errors=True)
    bodies = ctx.receiver.bodies(path)
    named: set[str] = set()
    carried = 0
    for _t, body in bodies:
        for alert in json.loads(body).get("alerts", []):
            carried += 1
            named.add(alert.get("labels", {}).get("job_id", ""))
    return {"am_messages": len(bodies), "am_refused": ctx.receiver.refused(path),
            "am_jobs_missing": JOBS - len(named - {""}), "am_alerts_delivered": carried,
            "am_config": "group_by ['job_id'], group_wait 1s, group_interval 5s"}


SCENARIO = Scenario("storm to a rate-limited Slack channel", METRICS, run)
