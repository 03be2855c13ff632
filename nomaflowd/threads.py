"""Chat threads, one per failure episode (Slack app mode).

The design, in short: transports never touch the database. On the main thread, just before
an alert goes to a threading transport, attach() reads the episode and its thread (if one
was started) from the database into the alert. The transport replies in that thread, or,
for an episode's first `failed` alert, starts one and hands its ts back in a Sent; record()
writes it with the audit row (remember()). So a restart, a reload or another replica finds
the thread in the `chat_threads` table. Within one process the transport also keeps the
threads it started, for a failure that follows its thread's first message too closely for
the database to know it yet (a threading transport sends one message at a time, in order).

An episode is named by the job's last success before it, which every alert of the episode
shares and the next success changes: a new failure after a recovery starts a new thread,
even when nobody was told about the recovery.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from nomaflowd import db
from nomaflowd.alerts import Alert

logger = logging.getLogger(__name__)

# What belongs in an episode's thread: the failure that starts it, later failures, the
# long-run warnings of its runs, and the recovery that ends it.
THREADED = frozenset({"failed", "long_run", "reminder", "recovered"})
STARTS = "failed"
ENDS = "recovered"
TEXT_MAX = 4000


def episode_of(job_id: str, run_id: str) -> str:
    """The episode an alert of this run belongs to: the finished_at of the job's last
    success (another run) finished no later than this run, or now when it is running."""
    p = db.proxy.param
    row = db.proxy.execute_sql(
        f"SELECT MAX(s.finished_at) FROM runs s WHERE s.job_id = {p} AND s.state = 'SUCCEEDED'"
        f" AND s.run_id != {p} AND s.finished_at <= COALESCE((SELECT r.finished_at FROM runs r"
        f" WHERE r.job_id = {p} AND r.run_id = {p}), {p})",
        (job_id, run_id, job_id, run_id, db.stamp(db.utcnow()))).fetchone()
    last = db.as_datetime(row[0]) if row else None
    return last.isoformat(timespec="microseconds") if last is not None else ""


def attach(alert: Alert, transport: str, recipient: str) -> Alert:
    """The alert with its episode and, when one was started, its thread (main thread only).

    Without the database (an outage) the alert goes out without: the transport's own
    memory of the threads it started still applies.
    """
    if alert.kind not in THREADED or not alert.run_id or not alert.job_id:
        return alert
    try:
        episode = episode_of(alert.job_id, alert.run_id)
        t = db.ThreadRow
        row = (t.select(t.ts, t.channel, t.text)
               .where((t.transport == transport) & (t.recipient == recipient)
                      & (t.job_id == alert.job_id) & (t.episode == episode)).first())
    except db.OUTAGES as exc:
        logger.warning("thread of %s for %s not looked up (database unavailable: %s)",
                       alert.job_id, transport, type(exc).__name__)
        return alert
    thread = {"episode": episode}
    if row is not None:
        thread.update(ts=row.ts, channel=row.channel, text=row.text)
    return replace(alert, thread=thread)


def remember(results: Iterable[Any]) -> None:
    """Inside record()'s transaction: the threads that these sends started."""
    rows = []
    for r in results:
        thread: Mapping[str, str] | None = r.thread
        if not thread:
            continue
        rows.append((r.attempt.transport, r.attempt.recipient, r.attempt.alert.job_id,
                     thread["episode"], thread["ts"], thread["channel"],
                     thread["text"][:TEXT_MAX], r.created_at))
    if rows:
        # Two replicas starting the same episode's thread at once: the first one recorded
        # wins, the other's message stays a thread of its own.
        db.insert_new("chat_threads", ("transport", "recipient", "job_id", "episode", "ts",
                                       "channel", "text", "created_at"), rows,
                      conflict=("transport", "recipient", "job_id", "episode"),
                      returning=("id",))
