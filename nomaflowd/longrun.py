"""The long-run warning: runs still RUNNING past their deadline, warned once across replicas."""

from __future__ import annotations

from datetime import datetime

from nomaflowd import db
from nomaflowd.deliveries import BATCH, Deliveries
from nomaflowd.dispatch import Attempt
from nomaflowd.policy import Policy


def poll(policy: Policy, deliveries: Deliveries, now: datetime) -> int:
    """Claim and submit a warning for each overdue run; one indexed query per poll.

    The mark and the claim commit together, conditionally on the run being unmarked: one
    replica wins each run, and a crash after the commit leaves a claim that is resumed.
    """
    r = db.RunRow
    due = list(r.select().where((r.long_run_deadline <= now) & (r.state == "RUNNING")
                                & r.long_run_alerted_at.is_null()).limit(BATCH))
    attempts: list[Attempt] = []
    for run in due:
        with db.proxy.atomic():
            won = r.update(long_run_alerted_at=now, long_run_deadline=None).where(
                (r.id == run.id) & r.long_run_alerted_at.is_null()
                & (r.state == "RUNNING")).execute()
            if won:
                attempts += deliveries.claim([policy.for_long_run(run, now)], now)
    deliveries.submit(attempts)
    return len(attempts)
