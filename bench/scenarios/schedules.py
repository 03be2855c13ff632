"""Scenario i, due-schedule poll: 10,000 scheduled jobs in jobs.toml (cron in several time
zones and @every intervals, with missed/stale/reminder settings); the daemon in-process times
the schedules poll next to the long-run poll.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.scenarios.base import BenchTree, Ctx, Metric, Scenario, explain, finish_tree

METRICS = [
    Metric("poll_ms", "schedules poll, none due", "ms", ("le", 20.0)),
    Metric("long_run_poll_ms", "long-run poll beside it, none due", "ms", ("le", 20.0)),
    Metric("sync_s", "first poll: 10,000 rows created (monitoring starts)", "s", kind="info"),
    Metric("due_poll_ms", "poll with 10 jobs missed (claims + submit)", "ms", kind="info"),
]
ZONES = ("UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo")


def catalogue(n: int) -> str:
    lines = ["[defaults.alerts]\non_failure = true\n"]
    for i in range(n):
        schedule = (f'"{i % 60} {i % 24} * * *"' if i % 2 else f'"@every {5 + i % 55}m"')
        lines.append(f'[jobs.job-{i:05d}]\nschedule = {schedule}\ntimezone = "{ZONES[i % 4]}"\n'
                     f"[jobs.job-{i:05d}.alerts]\non_missed_minutes = 15\non_stale_hours = 26\n"
                     "remind_every_minutes = 60\n")
    return "".join(lines)


def run(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    from datetime import timedelta

    from nomaflowd import config as nconfig
    from nomaflowd import db
    from nomaflowd.daemon import Daemon
    from nomaflowd.dispatch import utcnow

    n = ctx.sizes["i_jobs"]
    tree = BenchTree(ctx.base, f"i{rep}")
    tree.configure(ctx.receiver.url(f"/i{rep}/nomaflowd"))
    tree.write_jobs(catalogue(n))
    database = db.open_database(tree.database_url)
    database.returning_clause = True
    t = time.monotonic()
    daemon = Daemon(nconfig.load(tree.config_path))
    load_s = time.monotonic() - t
    daemon.database = database
    try:
        t = time.monotonic()
        daemon.poll_schedules(utcnow())  # the first poll creates every row
        sync_s = time.monotonic() - t
        rows = db.ScheduleRow.select().count()
        s = db.ScheduleRow
        sql, params = s.select().where(s.next_check <= utcnow()).order_by(s.next_check) \
            .limit(1000).sql()
        plan = explain(database.connection(), sql, params)
        polls, long_runs = [], []
        daemon.poll_schedules(utcnow())  # warm-up
        for _ in range(ctx.sizes["i_polls"]):
            t = time.perf_counter()
            due = daemon.poll_schedules(utcnow())
            polls.append((time.perf_counter() - t) * 1000)
            assert due == 0
            t = time.perf_counter()
            daemon.poll_long_runs(utcnow())
            long_runs.append((time.perf_counter() - t) * 1000)
        # 10 jobs pass their scheduled time with no run: the poll claims and submits `missed`
        past = utcnow() - timedelta(hours=1)
        with database.atomic():
            ids = [r.id for r in s.select(s.id).where(s.schedule.is_null(False)).limit(10)]
            s.update(expected_at=past - timedelta(minutes=16), missed_deadline=past,
                     next_check=past).where(s.id.in_(ids)).execute()
        t = time.perf_counter()
        due = daemon.poll_schedules(utcnow())
        due_ms = (time.perf_counter() - t) * 1000
        deadline = time.monotonic() + 15
        while daemon.dispatcher.busy() and time.monotonic() < deadline:
            daemon.deliveries.finish(daemon.dispatcher.take(timeout=0.5))
        return {"jobs": n, "rows": rows, "load_s": load_s, "sync_s": sync_s,
                "poll_ms": statistics.median(polls), "poll_max_ms": max(polls),
                "long_run_poll_ms": statistics.median(long_runs), "due_poll_ms": due_ms,
                "due": due, "query": sql, "plan": plan}
    finally:
        daemon.dispatcher.close()
        database.close()
        finish_tree(ctx, tree)


SCENARIO = Scenario("due-schedule poll", METRICS, run)
