"""Scenario g, audit: 5,000,000 notifications over six months (built once per invocation):
SQL and `nomaflowd audit` for one job.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.scenarios.base import (
    BenchTree,
    Ctx,
    Metric,
    Scenario,
    explain,
    log,
)

METRICS = [
    Metric("sql_ms", "SQL: job X, last 180 days", "ms", ("le", 50.0)),
    Metric("cli_ms", "`nomaflowd audit --job X --since 180d --format json`", "ms",
           ("le", 300.0)),
    Metric("rows", "rows returned for job X", "", kind="info"),
]


JOB_X = "job-0421"


G_INSERT = """
WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i + 1 < :n)
INSERT INTO notifications (created_at, event_id, job_id, run_id, alert, level, transport,
                           transport_type, recipient, outcome, detail, duration_ms, replica)
SELECT strftime('%Y-%m-%d %H:%M:%S', :start + i * :step, 'unixepoch')
         || printf('.%06d', (i * 7919) % 1000000),
       job || '/r' || i || '/' || CASE WHEN k < 6 THEN 'FAILED' WHEN k < 8 THEN 'RUNNING'
                                        ELSE 'SUCCEEDED' END,
       job, 'r' || i,
       CASE WHEN k < 6 THEN 'failed' WHEN k < 8 THEN 'long_run' ELSE 'succeeded' END,
       CASE WHEN k < 6 THEN 'high' WHEN k < 8 THEN 'medium' ELSE 'low' END,
       CASE t WHEN 0 THEN 'slack' WHEN 1 THEN 'email' ELSE 'opsgenie-data' END,
       CASE t WHEN 0 THEN 'slack' WHEN 1 THEN 'email' ELSE 'webhook' END,
       CASE t WHEN 0 THEN '#data-oncall' WHEN 1 THEN 'data-team@corp.local'
              ELSE 'opsgenie-data' END,
       CASE WHEN o < 97 THEN 'SENT' WHEN o < 99 THEN 'FAILED_TRANSPORT' ELSE 'FAILED_DELIVERY' END,
       CASE WHEN o < 97 THEN 'HTTP 200' WHEN o < 99 THEN 'timed out after 10s'
            ELSE 'HTTP 429: rate limited' END,
       20 + (i * 31) % 400, 'bench'
FROM (SELECT i, printf('job-%04d', (i * 2654435761) % :jobs) AS job, (i * 7) % 10 AS k,
             i % 3 AS t, (i * 13) % 100 AS o FROM c)
"""


def build_audit_db(ctx: Ctx, tree: BenchTree) -> dict[str, Any]:
    """5M notification rows over 183 days, indexes dropped during the load and rebuilt after."""
    from nomaflowd import db

    database = db.open_database(tree.database_url)
    database.close()
    n = ctx.sizes["g_rows"]
    t = time.monotonic()
    conn = sqlite3.connect(tree.db_path)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    conn.execute("PRAGMA temp_store = MEMORY")
    indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"
                           " AND tbl_name = 'notifications' AND sql IS NOT NULL").fetchall()
    for name, _ in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    end = datetime.now(UTC).replace(tzinfo=None)
    start = end - timedelta(days=183)
    with conn:
        conn.execute(G_INSERT, {"n": n, "start": start.replace(tzinfo=UTC).timestamp(),
                                "step": 183 * 86_400 / n, "jobs": ctx.sizes["g_jobs"]})
    insert_s = time.monotonic() - t
    with conn:
        for _, sql in indexes:
            conn.execute(sql)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"rows_total": n, "jobs": ctx.sizes["g_jobs"], "insert_s": insert_s,
            "build_s": time.monotonic() - t, "db_mb": tree.db_path.stat().st_size / 2**20}


def run(ctx: Ctx, rep: int) -> dict[str, Any]:
    """The 5M-row database is built once (first run) and shared by the runs of this scenario."""
    from nomaflowd import db
    from nomaflowd.dispatch import utcnow

    shared = ctx.results.setdefault("_g", {}) if ctx.results is not None else {}
    if "tree" not in shared:
        tree = BenchTree(ctx.base, "g")
        tree.configure("http://127.0.0.1:9/unused")
        log(f"    building {ctx.sizes['g_rows']:,} notification rows ...")
        shared["tree"] = tree
        shared["build"] = build_audit_db(ctx, tree)
        log("    built in {build_s:.1f}s ({db_mb:.0f} MB)".format(**shared["build"]))
    tree = shared["tree"]
    since = utcnow() - timedelta(days=180)
    sql = ("SELECT created_at, job_id, run_id, alert, level, transport, recipient, outcome"
           " FROM notifications WHERE job_id = ? AND created_at >= ? ORDER BY created_at")
    params = (JOB_X, str(since))
    times, rows = [], 0
    for _ in range(5):
        t = time.perf_counter()
        conn = sqlite3.connect(tree.db_path)  # what an operator's sqlite3 session does
        rows = len(conn.execute(sql, params).fetchall())
        conn.close()
        times.append((time.perf_counter() - t) * 1000)
    conn = sqlite3.connect(tree.db_path)
    plan_sql = explain(conn, sql, params)
    # the CLI's own query, as peewee builds it in nomaflowd/audit.py
    database = db.open_database(tree.database_url)
    n = db.NotificationRow
    cli_sql, cli_params = (n.select().order_by(n.created_at, n.id).where(n.job_id == JOB_X)
                           .where(n.created_at >= since)).sql()
    plan_cli = explain(conn, cli_sql, cli_params)
    database.close()
    conn.close()
    cmd = [sys.executable, "-m", "nomaflowd", "audit", "--config", str(tree.config_path),
           "--job", JOB_X, "--since", "180d", "--format", "json"]
    cli_times, cli_rows = [], None
    for _ in range(3):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, cwd=tree.root, timeout=300)
        cli_times.append((time.perf_counter() - t) * 1000)
        if proc.returncode != 0:
            raise RuntimeError(f"nomaflowd audit exited {proc.returncode}: {proc.stderr[-400:]!r}")
        cli_rows = len(json.loads(proc.stdout))
    return {**shared["build"], "sql_ms": statistics.median(times), "sql_runs_ms": times,
            "rows": rows, "cli_ms": statistics.median(cli_times), "cli_runs_ms": cli_times,
            "cli_rows": cli_rows, "sql": sql, "plan_sql": plan_sql, "cli_sql": cli_sql,
            "plan_cli": plan_cli, "fixture": "built once, shared by the runs"}


SCENARIO = Scenario("audit query", METRICS, run)
