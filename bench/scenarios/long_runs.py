"""Scenario f, long-run poll: 100,000 RUNNING runs in the database; the daemon in-process
times `poll_long_runs()` and the scheduler's poll job.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from bench.scenarios.base import (
    BenchTree,
    Ctx,
    Metric,
    Scenario,
    explain,
    finish_tree,
)

METRICS = [
    Metric("poll_ms", "poll_long_runs(), none due", "ms", ("le", 20.0)),
    Metric("poll_job_ms", "poll job incl. reconnect, none due", "ms", ("le", 20.0)),
    Metric("due_poll_ms", "poll with 10 runs due (claims + submit)", "ms", kind="info"),
]


def run(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    from nomaflowd import config as nconfig
    from nomaflowd import db
    from nomaflowd.daemon import Daemon
    from nomaflowd.deliveries import BATCH
    from nomaflowd.dispatch import utcnow

    n = ctx.sizes["f_runs"]
    tree = BenchTree(ctx.base, f"f{rep}")
    tree.configure(ctx.receiver.url(f"/f{rep}/nomaflowd"))
    database = db.open_database(tree.database_url)
    database.returning_clause = True
    daemon = Daemon(nconfig.load(tree.config_path))
    daemon.database = database
    try:
        now = utcnow()
        conn = database.connection()

        def rows() -> Iterable[tuple[Any, ...]]:
            for i in range(n):
                # inserted as they started (updated_at follows the row order, as in production)
                started = now - timedelta(seconds=21_600 * (n - i) / n)
                # half the runs have a long-run threshold, all in the future: none due now
                deadline = now + timedelta(seconds=60 + (i * 104_729) % 86_400) if i % 2 else None
                yield (f"job-{i % 500:03d}", f"f{rep}-{i}", "RUNNING", started, None, started,
                       None, deadline, None)

        t = time.monotonic()
        with database.atomic():
            conn.executemany(
                "INSERT INTO runs (job_id, run_id, state, started_at, finished_at, updated_at,"
                " long_run_alerted_at, long_run_deadline, overrides)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())
        build_s = time.monotonic() - t
        r = db.RunRow
        query = r.select().where((r.long_run_deadline <= now) & (r.state == "RUNNING")
                                 & r.long_run_alerted_at.is_null()).limit(BATCH)
        sql, params = query.sql()
        plan = explain(conn, sql, params)
        polls, jobs = [], []
        daemon.poll_long_runs(utcnow())  # warm-up
        for _ in range(ctx.sizes["f_polls"]):
            t = time.perf_counter()
            due = daemon.poll_long_runs(utcnow())
            polls.append((time.perf_counter() - t) * 1000)
            assert due == 0
        for _ in range(ctx.sizes["f_polls"]):
            t = time.perf_counter()
            daemon.poll(utcnow())  # what the scheduler asks for: heartbeat, sweeps, long runs
            jobs.append((time.perf_counter() - t) * 1000)
        # 10 runs reach their threshold: the poll claims and submits their warnings
        conn = database.connection()
        with database.atomic():
            conn.execute("UPDATE runs SET long_run_deadline = ? WHERE id IN"
                         " (SELECT id FROM runs WHERE long_run_deadline IS NOT NULL LIMIT 10)",
                         (now - timedelta(minutes=1),))
        t = time.perf_counter()
        due = daemon.poll_long_runs(utcnow())
        due_ms = (time.perf_counter() - t) * 1000
        deadline = time.monotonic() + 15
        while daemon.dispatcher.busy() and time.monotonic() < deadline:
            daemon.deliveries.finish(daemon.dispatcher.take(timeout=0.5))
        return {"runs": n, "build_s": build_s, "poll_ms": statistics.median(polls),
                "poll_max_ms": max(polls), "poll_job_ms": statistics.median(jobs),
                "poll_job_max_ms": max(jobs), "due_poll_ms": due_ms, "due": due,
                "query": sql, "plan": plan}
    finally:
        daemon.dispatcher.close()
        database.close()
        finish_tree(ctx, tree)


SCENARIO = Scenario("long-run poll", METRICS, run)
