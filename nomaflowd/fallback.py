"""Fallback when a channel breaks (SPEC §12): a transport's run of failed deliveries, kept in
the database, and the one `transport_failing` / `transport_restored` alert it makes due.

Fed by Deliveries.finish with the results it has just recorded; what it returns is claimed in
the same transaction as the streak's change, so each alert is raised once across replicas and
restarts. The row is locked while it changes (PostgreSQL), so two replicas count one streak.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import datetime

import peewee as pw

from nomaflowd import db
from nomaflowd.alerts import Alert
from nomaflowd.dispatch import SENT, Result
from nomaflowd.policy import Policy, Routed
from nomaflowd.routing import Plan

logger = logging.getLogger(__name__)

UNDELIVERED_KEPT = 50  # alerts named in the streak's row; the count goes on past it
NAMED = 10             # named in the alert's line, then "and N more"
KINDS = frozenset({"transport_failing", "transport_restored"})


def counts(r: Result) -> bool:
    """Every outcome of a transport moves its streak. A 429 is no outcome: the alert waits
    for a digest (the rate limit, not a broken channel), and the digest's own outcome is
    the one that counts, once per alert in it. A digest the channel refuses is as silent
    as single alerts refused, and in a storm every alert may be in one. What was never
    sent says nothing of the channel: a recipient refused by routing (a runner naming one
    it may not: three in a row paged the fallback about a healthy transport), or a
    transport no longer configured."""
    return bool(r.attempt.transport) and not r.attempt.error and bool(r.transport_type)


def observe(results: list[Result], policy: Policy, now: datetime) -> list[Routed]:
    """Inside the caller's transaction: move each transport's streak along; the alerts due."""
    by_transport: dict[str, list[Result]] = {}
    for r in results:
        if counts(r):
            by_transport.setdefault(r.attempt.transport, []).append(r)
    due: list[Routed] = []
    for name, mine in sorted(by_transport.items()):  # one lock order on every replica
        row = streak(name, now)
        for r in mine:
            due += step(row, r, policy, now)
        row.updated_at = now
        row.save()
    return due


def streak(name: str, now: datetime) -> db.StreakRow:
    s = db.StreakRow
    s.insert(transport=name, updated_at=now).on_conflict_ignore().execute()
    query = s.select().where(s.transport == name)
    if isinstance(db.proxy.obj, pw.PostgresqlDatabase):
        query = query.for_update()
    return query.get()  # type: ignore[no-any-return]


def step(row: db.StreakRow, r: Result, policy: Policy, now: datetime) -> list[Routed]:
    """One result's effect on its transport's streak."""
    cfg = policy.config
    if r.outcome == SENT:
        due = []
        if row.alerted_at is not None:
            if cfg.fallback_recipients:  # else nobody was told it failed: nor that it is back
                due = route(policy, alert(row, "transport_restored", cfg.base_url))
            logger.info("transport %s delivers again after %d failed attempt(s)",
                        row.transport, row.failures)
        row.failures, row.undelivered, row.started_at, row.alerted_at = 0, "[]", None, None
        row.last_error = ""
        return due
    row.failures += 1
    row.last_error = f"{r.outcome}: {r.detail}"[:1000]
    row.started_at = row.started_at or r.created_at
    a = r.attempt.alert
    if a.kind not in KINDS:
        undelivered = json.loads(row.undelivered)
        if len(undelivered) < UNDELIVERED_KEPT:
            undelivered.append([a.job_id, a.run_id, a.kind])
            row.undelivered = json.dumps(undelivered)
    if row.failures < cfg.fallback_after_failures or row.alerted_at is not None:
        return []
    row.alerted_at = now
    logger.warning("transport %s failed %d times in a row (last: %s)", row.transport,
                   row.failures, row.last_error)
    if not cfg.fallback_recipients:
        logger.warning("no daemon.fallback_recipients: nobody is told that %s is failing",
                       row.transport)
        return []
    return route(policy, alert(row, "transport_failing", cfg.base_url))


def alert(row: db.StreakRow, kind: str, url: str) -> Alert:
    items = json.loads(row.undelivered)
    named = [f"{job or '-'}/{run or '-'} {kind_}" for job, run, kind_ in items[:NAMED]]
    more = row.failures - len(named) if kind == "transport_failing" else 0
    listed = ", ".join(named) + (f" and {more} more" if more > 0 else "")
    started = row.started_at.isoformat() if row.started_at else ""
    details = {"transport": row.transport, "error": row.last_error, "undelivered": listed}
    return Alert(kind=kind, key=f"transport/{row.transport}/{kind}/{started}", job_id="",
                 run_id=None, event_id=None, state=kind.upper(), url=url,
                 details={k: v for k, v in details.items() if v}, failures=row.failures)


def route(policy: Policy, a: Alert) -> list[Routed]:
    """To daemon.fallback_recipients, through any transport but the failing one."""
    cfg = policy.config
    plan = policy.router.plan(cfg.fallback_recipients, (), use_rules=False)
    broken = a.get("transport")
    keep = [t for t in plan.targets if t.transport != broken]
    if not keep:
        logger.error("%s: no fallback recipient is on a transport other than %s; nobody else"
                     " can be told", a.kind, broken)
        return []
    skipped = [replace(t, error="the failing transport itself")
               for t in plan.targets if t.transport == broken]
    return [Routed(a, policy.current().effective(""),
                   Plan(targets=keep, duplicates=plan.duplicates, skipped=skipped))]
