"""Scenario j, replicas on PostgreSQL: 1 and 3 daemons sharing one database (a fresh schema
per layout and run, like the tests' pg_schema fixture), each with its own spool (the events
split across them) or all on one shared spool.

Per layout: a backlog (lifecycle files waiting before start: events/s until all are in
`events`), then a burst of FAILED events renamed into the running replicas' spools
(deliveries/s first rename -> last POST, rename -> POST p99), and the duplicates: a run
alerted twice at the receiver or two audit rows for one (run, alert). The server is
$NOMAFLOWD_BENCH_PG_DSN, else $NOMAFLOWD_TEST_PG_DSN, else postgresql://postgres@127.0.0.1/test.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from bench.scenarios.base import (
    BenchDaemon,
    BenchTree,
    Ctx,
    Incomplete,
    Item,
    Metric,
    Scenario,
    Skip,
    cpu_by_process,
    failure_events,
    finish_tree,
    latencies,
    lifecycle_events,
    machine_cpu,
    percentile,
    rename_all,
    stage,
    wait_count,
    write_all,
)

DSN = (os.environ.get("NOMAFLOWD_BENCH_PG_DSN") or os.environ.get("NOMAFLOWD_TEST_PG_DSN")
       or "postgresql://postgres@127.0.0.1:5432/test")
CPUS = os.cpu_count() or 1
LAYOUTS = (("r1", 1, False, "1 replica"), ("r3", 3, False, "3 replicas, own spools"),
           ("r3s", 3, True, "3 replicas, one shared spool"))


def _metrics() -> list[Metric]:
    out = []
    for key, _n, _shared, label in LAYOUTS:
        out += [
            Metric(f"{key}_events_per_s", f"{label}: backlog events/s", "/s", kind="info"),
            Metric(f"{key}_rate", f"{label}: burst deliveries/s", "/s", kind="info"),
            Metric(f"{key}_p99_ms", f"{label}: burst rename -> POST p99", "ms", kind="info"),
            Metric(f"{key}_busy_pct", f"{label}: burst, machine CPU busy", "%", kind="info"),
            Metric(f"{key}_cpu_ms", f"{label}: burst, machine CPU per delivery", "ms",
                   kind="info"),
            Metric(f"{key}_main_ms", f"{label}: of which daemons' main threads", "ms",
                   kind="info"),
            Metric(f"{key}_senders_ms", f"{label}: of which daemons' other threads", "ms",
                   kind="info"),
            Metric(f"{key}_postgres_ms", f"{label}: of which PostgreSQL", "ms", kind="info"),
            Metric(f"{key}_duplicates", f"{label}: duplicates", "", ("eq", 0), "loss"),
            Metric(f"{key}_lost", f"{label}: events or deliveries missing", "", ("eq", 0),
                   "loss"),
        ]
    out.append(Metric("r3_over_r1", "3 replicas / 1 replica, burst deliveries/s", "x",
                      ("ge", 2.0)))
    out.append(Metric("r3_over_r1_backlog", "3 replicas / 1 replica, backlog events/s", "x",
                      kind="info"))
    out.append(Metric("r3_ceiling", "3 replicas / 1 replica, what the machine's cores allow",
                      "x", kind="info"))
    return out


class Schema:
    """A fresh schema on the server, dropped afterwards; counts rows in it."""

    def __init__(self) -> None:
        try:
            import psycopg2
        except ImportError:
            raise Skip("psycopg2 not installed: .venv/bin/pip install -e '.[postgres]'") from None
        try:
            self.conn = psycopg2.connect(DSN, connect_timeout=3)
        except psycopg2.Error as exc:
            raise Skip(f"no PostgreSQL at {DSN}: {str(exc).strip()[:120]}") from None
        self.conn.autocommit = True
        self.name = f"bench_{uuid.uuid4().hex[:12]}"
        with self.conn.cursor() as cur:
            cur.execute(f'CREATE SCHEMA "{self.name}"')
        self.url = f"{DSN}?options=-csearch_path%3D{self.name}"

    def count(self, sql: str) -> int:
        with self.conn.cursor() as cur:
            try:
                cur.execute(f'SET search_path TO "{self.name}"; {sql}')
            except Exception as exc:  # the tables are not there before the first replica made them
                if "does not exist" in str(exc):
                    return 0
                raise
            return int(cur.fetchone()[0])

    def counter(self, sql: str) -> Any:
        return lambda: self.count(sql)

    def drop(self) -> None:
        with self.conn.cursor() as cur:
            cur.execute(f'DROP SCHEMA "{self.name}" CASCADE')
        self.conn.close()


def interleave(parts: list[list[Any]]) -> list[Any]:
    out: list[Any] = []
    for i in range(max(len(p) for p in parts)):
        out += [p[i] for p in parts if i < len(p)]
    return out


def run_layout(ctx: Ctx, rep: int, key: str, replicas: int, shared: bool) -> dict[str, Any]:
    assert ctx.receiver is not None
    n, m = ctx.sizes["j_files"], ctx.sizes["j_burst"]
    path = f"/j{rep}/{key}"
    schema = Schema()
    trees = [BenchTree(ctx.base, f"j{rep}{key}{i}") for i in range(replicas)]
    daemons: list[BenchDaemon] = []
    try:
        for i, tree in enumerate(trees):
            tree.database = schema.url
            tree.configure(ctx.receiver.url(path), replica=f"bench-{i}", poll_seconds=5,
                           spool=trees[0].spool if shared else None)
        spools = trees[:1] if shared else trees
        backlog = lifecycle_events(f"j{rep}{key}", n)
        for i, tree in enumerate(spools):
            write_all(tree, backlog[i::len(spools)])
        backlog_alerts = sum(1 for name, body, _ in backlog if b'"FAILED"' in body)
        daemons = [BenchDaemon(tree, f"j{i}").start(wait=False) for i, tree in enumerate(trees)]
        started = min(d.started for d in daemons)
        count, done = wait_count(schema.counter("SELECT count(*) FROM events"), n,
                                 max(60.0, n / 100), daemons[0])
        if done is None:
            raise Incomplete(f"{key}: {count}/{n} events after the time bound:\n"
                             f"{daemons[0].tail()}")
        for d in daemons:
            d.wait_ready(60)
        ctx.receiver.wait_items(path, backlog_alerts, 30.0)
        burst: list[Item] = failure_events(f"j{rep}{key}b", m)
        parts = []
        for i, tree in enumerate(spools):
            mine = burst[i::len(spools)]
            parts.append([(pair, item[2]) for pair, item in zip(stage(tree, mine), mine,
                                                                  strict=True)])
        pairs = interleave(parts)  # one writer renames into every spool in turn
        staged = [pair for pair, _run in pairs]
        groups = {"daemons": {d.pid for d in daemons}, "receiver": {ctx.receiver.proc.pid},
                  "writer": {os.getpid()}}
        cpu0, by0 = machine_cpu(), cpu_by_process(groups, main_threads="daemons")
        times = rename_all(staged)
        got = ctx.receiver.wait_items(path, backlog_alerts + m, max(60.0, m / 20), every=0.01)
        cpu1, by1 = machine_cpu(), cpu_by_process(groups, main_threads="daemons")
        rows, _ = wait_count(schema.counter("SELECT count(*) FROM notifications"),
                             backlog_alerts + m, 30.0, daemons[0])
        codes = [d.stop() for d in daemons]
        log_errors = sum(d.log_problems() for d in daemons)
        records = ctx.receiver.records(path)
        sent = {run: t for (_pair, run), t in zip(pairs, times, strict=True)}
        lat, missing, dups = latencies(sent, records)
        twice = schema.count("SELECT count(*) - count(DISTINCT (run_id, alert, transport,"
                             " recipient)) FROM notifications")
        not_sent = schema.count("SELECT count(*) FROM notifications WHERE outcome != 'SENT'")
        arrivals = sorted(mono for mono, _w, ident in records if ident in sent)
        if not arrivals:
            raise Incomplete(f"{key}: no burst delivery arrived ({got})")
        events_missing = n + m - schema.count("SELECT count(*) FROM events")
        per_delivery = {name: (by1[name] - by0[name]) / m * 1000 for name in by1}
        return {f"{key}_events_per_s": n / (done - started),
                f"{key}_rate": len(lat) / (arrivals[-1] - times[0]),
                f"{key}_p50_ms": percentile(lat, 50), f"{key}_p99_ms": percentile(lat, 99),
                # Is the machine the limit? Its cores busy from the burst's first rename to
                # its last POST (+ <= 10 ms), and that CPU time per delivery.
                f"{key}_busy_pct": (cpu1[0] - cpu0[0]) / (CPUS * (cpu1[1] - cpu0[1])) * 100,
                f"{key}_cpu_ms": (cpu1[0] - cpu0[0]) / m * 1000,
                # ... and whose it was, in ms per delivery: the daemons' main threads (ingest,
                # audit) and their other threads (senders), PostgreSQL, receiver, writer
                f"{key}_cpu_ms_by": per_delivery,
                f"{key}_main_ms": per_delivery["daemons main thread"],
                f"{key}_senders_ms": per_delivery["daemons"] - per_delivery["daemons main thread"],
                f"{key}_postgres_ms": per_delivery["postgres"],
                f"{key}_duplicates": dups + twice, f"{key}_lost": missing + events_missing,
                f"{key}_not_sent": not_sent, f"{key}_notification_rows": rows,
                f"{key}_exit_codes": codes, f"{key}_log_errors": log_errors,
                f"{key}_attempts_by_replica": by_replica(schema)}
    finally:
        for d in daemons:
            d.close()
        schema.drop()
        for tree in trees:
            finish_tree(ctx, tree)


def by_replica(schema: Schema) -> dict[str, int]:
    with schema.conn.cursor() as cur:
        cur.execute(f'SET search_path TO "{schema.name}";'
                    " SELECT replica, count(*) FROM notifications GROUP BY replica")
        return {r: int(c) for r, c in cur.fetchall()}


def run(ctx: Ctx, rep: int) -> dict[str, Any]:
    out: dict[str, Any] = {"db": DSN.rsplit("@", 1)[-1]}
    for key, replicas, shared, _label in LAYOUTS:
        out.update(run_layout(ctx, rep, key, replicas, shared))
    out["r3_over_r1"] = out["r3_rate"] / out["r1_rate"]
    out["r3_over_r1_backlog"] = out["r3_events_per_s"] / out["r1_events_per_s"]
    # Three replicas spending what one spends per delivery can go as much faster as the
    # cores one replica leaves idle: all of them busy, over the share one replica keeps busy
    # (every process counted: PostgreSQL, receiver, writer). At most 3x.
    out["r3_ceiling"] = min(3.0, 100.0 / max(out["r1_busy_pct"], 1.0))
    return out


SCENARIO = Scenario("replicas on PostgreSQL", _metrics(), run)
