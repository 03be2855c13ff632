"""Incidents: failure episodes and their recovery, the PagerDuty/Opsgenie key, learned thresholds.

A job's failure episode is the run of FAILED final runs since its last SUCCEEDED one
(CANCELLED runs neither open nor close one: a cancel says nothing about the job's health).
Everything here is read from the `runs`, `notifications` and `deliveries` tables inside the
transaction that commits the events (see Ingest.commit_events), so a replica that ingests a
SUCCEEDED event sees the FAILED runs before it, including those of the same batch.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Protocol

from nomaflowd import db
from nomaflowd.alerts import Alert, alert_key, from_event, span
from nomaflowd.catalogue import Catalogue, Effective
from nomaflowd.config import Config, TransportConfig
from nomaflowd.events import Event
from nomaflowd.routing import Plan, Target

PRESETS = ("pagerduty", "opsgenie")
# What an incident transport takes: failed and long_run open (or update) the job's incident,
# recovered closes it. Anything else (success, cancel, toggles, notices) never pages.
INCIDENT_KINDS = frozenset({"failed", "long_run", "recovered"})
TRIGGERS = ("failed", "long_run")
TRIGGER_LIST = ", ".join(f"'{kind}'" for kind in TRIGGERS)  # for plain SQL
DEDUP_MAX = 255          # PagerDuty's dedup_key limit (Opsgenie's alias allows 512)
EPISODE_RUNS = 1000      # recipients are looked up among the newest runs of an episode
CHUNK = 500

# on_long_run_minutes = "auto": warn past the 95th percentile (nearest rank) of the last 30
# successful durations times 1.5, once there are 5 of them. The floor keeps a job that
# usually takes seconds from warning on every slow start.
HISTORY = 30
MIN_SAMPLES = 5
PERCENTILE = 0.95
HEADROOM = 1.5
FLOOR_MINUTES = 1.0


def dedup_key(job_id: str) -> str:
    """`nomaflow/<job_id>`: PagerDuty's dedup_key and Opsgenie's alias for the job's incident."""
    key = f"nomaflow/{job_id}"
    if len(key) <= DEDUP_MAX:
        return key
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{key[:DEDUP_MAX - 17]}~{digest}"


def preset(transport: TransportConfig | None) -> str | None:
    """"pagerduty" / "opsgenie" for an incident transport, else None."""
    if transport is None or transport.type != "webhook":
        return None
    value = transport.settings.get("preset")
    return value if value in PRESETS else None


def fit(plan: Plan, kind: str, transports: Mapping[str, TransportConfig]) -> Plan:
    """Incident transports take failed, long_run and recovered only; others skip them."""
    if kind in INCIDENT_KINDS:
        return plan
    keep = []
    for t in plan.targets:
        name = preset(transports.get(t.transport))
        if name:
            plan.skipped.append(replace(t, error=f"a {name} transport takes failed, long-run"
                                                 " and recovered alerts only"))
        else:
            keep.append(t)
    plan.targets = keep
    return plan


def headline(alert: Alert, limit: int) -> str:
    """The summary without its icon, on one line, clipped to `limit` characters."""
    _, pieces = alert.summary_parts()
    return clip(" ".join(" \u00b7 ".join(pieces).split()), limit)


def clip(text: str, limit: int, *, tail: bool = False) -> str:
    """At most `limit` characters; `tail` keeps the end (where a traceback says what broke)."""
    if len(text) <= limit:
        return text
    return "\u2026" + text[-(limit - 1):] if tail else text[:limit - 1] + "\u2026"


# --- learned long-run thresholds -----------------------------------------------------

@dataclass(frozen=True)
class Learned:
    samples: int
    usual: float | None = None       # median duration, minutes
    p95: float | None = None
    threshold: float | None = None   # minutes after started_at; None: too little history

    def describe(self) -> str:
        if self.threshold is None or self.usual is None or self.p95 is None:
            return (f'no long-run warning yet: "auto" learns from {MIN_SAMPLES} successful runs'
                    f" with start and finish times and this job has {self.samples}")
        return (f"long-run warning after {self.threshold:.1f} min if still RUNNING (auto: 95th"
                f" percentile {self.p95:.1f} min of the last {self.samples} successful runs"
                f" \u00d7 {HEADROOM:g}; usually {span(self.usual)})")


def learn_from(minutes: Iterable[float]) -> Learned:
    """The auto threshold for these durations (pure)."""
    samples = sorted(m for m in minutes if m >= 0)  # a negative one is a runner's clock skew
    n = len(samples)
    if n < MIN_SAMPLES:
        return Learned(n)
    p95 = samples[math.ceil(PERCENTILE * n) - 1]
    return Learned(n, statistics.median(samples), p95, max(FLOOR_MINUTES, p95 * HEADROOM))


def learn(job_id: str) -> Learned:
    """The job's last HISTORY successful durations (index runs(job_id, state, finished_at))."""
    r = db.RunRow
    rows = (r.select(r.started_at, r.finished_at)
            .where((r.job_id == job_id) & (r.state == "SUCCEEDED")
                   & r.finished_at.is_null(False) & r.started_at.is_null(False))
            .order_by(r.finished_at.desc()).limit(HISTORY))
    return learn_from((x.finished_at - x.started_at).total_seconds() / 60 for x in rows)


def set_learned_deadline(event: Event, learned: Learned) -> None:
    """Store the deadline (and what is usual) on the RUNNING run, so the poll stays one query."""
    if learned.threshold is None:
        return
    started = event.started_at or event.at
    try:
        deadline = started + timedelta(minutes=learned.threshold)
    except OverflowError:
        return  # past year 9999: a warning that can never be due
    r = db.RunRow
    r.update(long_run_deadline=deadline, usual_minutes=learned.usual).where(
        (r.job_id == event.job_id) & (r.run_id == event.run_id) & (r.state == "RUNNING")
        & r.long_run_alerted_at.is_null()).execute()


# --- failure episodes and recovery -----------------------------------------------------

@dataclass
class Episode:
    """The runs of a job that finished after its last success (up to a point in time)."""

    job_id: str
    last_success: datetime | None
    failures: int = 0
    first_failure: datetime | None = None
    run_ids: list[str] = field(default_factory=list)   # newest first, at most EPISODE_RUNS


def episode(job_id: str, upto: datetime, exclude_run: str | None = None) -> Episode:
    """The failure episode as of `upto` (runs finished at or before it, `exclude_run` aside)."""
    # Plain SQL: this runs for every success that may end an episode, inside the ingest
    # transaction, where peewee's query building cost ten times the query.
    p = db.proxy.param
    mine, params = f"job_id = {p} AND finished_at <= {p}", [job_id, upto]
    if exclude_run is not None:
        mine += f" AND run_id != {p}"
        params.append(exclude_run)
    last = db.proxy.execute_sql(
        f"SELECT MAX(finished_at) FROM runs WHERE {mine} AND state = 'SUCCEEDED'",
        params).fetchone()[0]
    since, since_params = mine, list(params)
    if last is not None:
        since += f" AND finished_at > {p}"
        since_params.append(last)
    rows = db.proxy.execute_sql(
        f"SELECT run_id, state, finished_at FROM runs WHERE {since}"
        f" AND state IN ('FAILED', 'CANCELLED') ORDER BY finished_at DESC LIMIT {EPISODE_RUNS}",
        since_params).fetchall()
    failed = [x for x in rows if x[1] == "FAILED"]
    ep = Episode(job_id, db.as_datetime(last), len(failed),
                 db.as_datetime(failed[-1][2]) if failed else None, [x[0] for x in rows])
    if len(rows) == EPISODE_RUNS:  # a long episode: count it in the database
        count, first = db.proxy.execute_sql(
            f"SELECT COUNT(*), MIN(finished_at) FROM runs WHERE {since} AND state = 'FAILED'",
            since_params).fetchone()
        ep.failures, ep.first_failure = count, db.as_datetime(first)
    return ep


def newer_finish(job_id: str, after: datetime, exclude_run: str) -> bool:
    """Did another run of the job succeed or fail after `after`? (a late event, then)"""
    r = db.RunRow
    return bool(r.select(r.id).where(
        (r.job_id == job_id) & r.state.in_(("SUCCEEDED", "FAILED")) & (r.finished_at > after)
        & (r.run_id != exclude_run)).exists())


def attempts_in_flight(runs: Sequence[tuple[str, str]]) -> list[tuple[str, str, str, str]]:
    """(job_id, run_id, transport, recipient) of the claims still in flight (no verdict yet)
    of these runs' retried attempts' `failed` alerts.

    Their keys name the attempt, alert_key(job, run, "failed", "attempt-N"): the claims in
    flight that look like one (the index on state, then a pattern: a few rows) are matched
    to these runs by prefix here. A match per run in SQL (substr = prefix, OR'ed for a
    batch of 500 successes) cost the backlog a fifth of its rate.
    """
    if not runs:
        return []
    prefixes = {alert_key(job, run, "failed") + "/": (job, run) for job, run in runs}
    found: list[tuple[str, str, str, str]] = []
    for key, transport, recipient in db.proxy.execute_sql(
            "SELECT alert_key, transport, recipient FROM deliveries WHERE state = 'claimed'"
            f" AND alert_key LIKE {db.proxy.param} ORDER BY id", ("%/6:failed/%:attempt-%",)):
        run = prefixes.get(key[:key.rfind("/") + 1])
        if run is not None:
            found.append((*run, transport, recipient))
    return found


class Planned(Protocol):
    alert: Alert
    plan: Plan


def triggered(job_id: str, run_ids: list[str], in_batch: Iterable[Planned] = ()
              ) -> dict[tuple[str, str], set[str]]:
    """(transport, recipient) -> the trigger kinds it got for these runs.

    "Got" means an audit row with outcome SENT, or a claim still in flight (its verdict is
    not in yet; a retried attempt's too), or a claim being made in this very transaction
    (the same batch).
    """
    found: dict[tuple[str, str], set[str]] = {}
    p = db.proxy.param
    for i in range(0, len(run_ids), CHUNK):
        chunk = run_ids[i:i + CHUNK]
        # A join from the runs' VALUES: SQLite's planner, given `run_id IN (...)`, chose
        # the (outcome, id) index and read every SENT row of the audit table (147 ms a
        # lookup at 541,000 rows, the main loop stalled 15-19 s in a recovery storm).
        for transport, recipient, alert in db.proxy.execute_sql(
                f"WITH v(run_id) AS (VALUES {', '.join([f'({p})'] * len(chunk))})"
                " SELECT n.transport, n.recipient, n.alert FROM v JOIN notifications n"
                f" ON n.job_id = {p} AND n.run_id = v.run_id"
                f" WHERE n.alert IN ({TRIGGER_LIST}) AND n.outcome = 'SENT' ORDER BY n.id",
                [*chunk, job_id]):
            found.setdefault((transport, recipient), set()).add(alert)
    keys = {alert_key(job_id, run, kind): kind for run in run_ids for kind in TRIGGERS}
    d = db.DeliveryRow
    names = list(keys)
    for i in range(0, len(names), CHUNK):
        for row in (d.select(d.transport, d.recipient, d.alert_key)
                    .where(d.alert_key.in_(names[i:i + CHUNK]) & (d.state == "claimed"))
                    .order_by(d.id)):
            found.setdefault((row.transport, row.recipient), set()).add(keys[row.alert_key])
    for _job, _run, transport, recipient in attempts_in_flight(
            [(job_id, run) for run in run_ids]):
        found.setdefault((transport, recipient), set()).add("failed")
    for routed in in_batch:
        if routed.alert.key in keys:
            for t in routed.plan.targets:
                if not t.error:
                    found.setdefault((t.transport, t.recipient), set()).add(routed.alert.kind)
    return found


@dataclass
class Recovery:
    """What a success would close: the episode, who is told, who is not and why."""

    episode: Episode
    plan: Plan

    @property
    def open(self) -> bool:
        return self.episode.failures > 0 or bool(self.plan.targets)


def plan_recovery(cfg: Config, ep: Episode, run_id: str | None, on_recovery: bool,
                  in_batch: Iterable[Planned] = ()) -> Recovery:
    """Who hears that the job recovered: whoever got its failure (SENT), de-duplicated.

    Incident transports (PagerDuty, Opsgenie) are told whatever on_recovery says, since they
    must close what they opened; they also close an incident a long-run warning opened
    (of an episode run, or of the succeeding run `run_id` itself).
    """
    runs = ep.run_ids + ([run_id] if run_id else [])
    plan = Plan()
    for (transport, recipient), kinds in triggered(ep.job_id, runs, in_batch).items():
        name = preset(cfg.transports.get(transport))
        what = "the failure" if "failed" in kinds else "the long-run warning"
        target = Target(transport, recipient, recipient, f"got {what}")
        if transport not in cfg.transports:
            plan.skipped.append(replace(target, error=f"got {what}; no longer configured"))
        elif name:
            plan.targets.append(replace(target, origin=f"got {what}; {name} closes it"))
        elif "failed" not in kinds:
            continue  # a long-run warning alone is not a failure to recover from
        elif on_recovery:
            plan.targets.append(replace(target, origin="got the failure; on_recovery"))
        else:
            plan.skipped.append(replace(target, error="got the failure, but on_recovery is off"))
    return Recovery(ep, plan)


def recovered_alert(cfg: Config, event: Event, ep: Episode, now: datetime) -> Alert:
    alert = from_event("recovered", event, cfg.run_url(event.run_id))
    since = (now - ep.first_failure).total_seconds() / 60 if ep.first_failure else None
    return replace(alert, failures=ep.failures, minutes=since)


def recovery_for(cfg: Config, event: Event, eff: Effective, now: datetime,
                 in_batch: Iterable[Planned] = ()) -> tuple[Alert, Recovery] | None:
    """The `recovered` alert a SUCCEEDED event makes due, if any (its run row is written)."""
    p = db.proxy.param
    run = db.proxy.execute_sql(
        f"SELECT state, finished_at, long_run_alerted_at FROM runs WHERE job_id = {p}"
        f" AND run_id = {p}", (event.job_id, event.run_id)).fetchone()
    if run is None or run[0] != "SUCCEEDED" or run[1] is None:
        return None  # the run had already ended otherwise: the first final state wins
    finished = db.as_datetime(run[1])
    assert finished is not None
    ep = episode(event.job_id, finished, event.run_id)
    attempt_failed = not ep.run_ids and bool(
        triggered(event.job_id, [str(event.run_id)], in_batch))  # a retried attempt alerted
    if not ep.run_ids and run[2] is None and not attempt_failed:
        return None  # success after success, the common case: nothing to close
    if newer_finish(event.job_id, finished, str(event.run_id)):
        return None  # a late event: a newer run already closed or continued the episode
    rec = plan_recovery(cfg, ep, event.run_id, eff.alerts.on_recovery, in_batch)
    if not rec.plan.targets:
        return None
    alert = recovered_alert(cfg, event, rec.episode, now)
    if attempt_failed:
        alert = replace(alert, details={**alert.details, "after": "a failed attempt"})
    return alert, rec


def open_candidates(successes: list[Event], now: datetime) -> set[str]:
    """Jobs among these successes' that may have an episode to close: two queries a batch.

    A job qualifies when one of its runs FAILED, or had a long-run warning, after its last
    success from before this batch (this batch's rows carry updated_at = now). Only those
    get the exact, costlier look of recovery_for; success after success stops here.
    """
    jobs = sorted({e.job_id for e in successes})
    found: set[str] = set()
    p = db.proxy.param
    for i in range(0, len(jobs), CHUNK):
        chunk = jobs[i:i + CHUNK]
        for pages in ("f.state = 'FAILED'", "f.long_run_alerted_at IS NOT NULL"):
            sql = (f"SELECT DISTINCT f.job_id FROM runs f WHERE f.job_id IN"
                   f" ({', '.join([p] * len(chunk))}) AND {pages} AND NOT EXISTS"
                   " (SELECT 1 FROM runs s WHERE s.job_id = f.job_id AND s.state = 'SUCCEEDED'"
                   f" AND s.updated_at < {p} AND s.finished_at > f.finished_at)")
            found.update(row[0] for row in db.proxy.execute_sql(sql, [*chunk, now]))
    # A succeeding run that alerted `failed` itself: a retried attempt (on_retry), its row
    # in `notifications` by (job_id, run_id), one index look-up per success; or its claim
    # still in flight, its verdict not in yet.
    pairs = sorted({(e.job_id, str(e.run_id)) for e in successes})
    found.update(job for job, _run, _t, _r in attempts_in_flight(pairs))
    for i in range(0, len(pairs), CHUNK):
        chunk_pairs = pairs[i:i + CHUNK]
        values = ", ".join([f"({p}, {p})"] * len(chunk_pairs))
        sql = (f"WITH v(job_id, run_id) AS (VALUES {values})"
               " SELECT DISTINCT n.job_id FROM v JOIN notifications n ON n.job_id = v.job_id"
               " AND n.run_id = v.run_id WHERE n.alert = 'failed'")  # a join: as in triggered
        found.update(row[0] for row in db.proxy.execute_sql(
            sql, [x for pair in chunk_pairs for x in pair]))
    return found


def after_runs_recorded(cfg: Config, batch: Iterable[Event], cat: Catalogue,
                        in_batch: Sequence[Planned], now: datetime
                        ) -> list[tuple[Alert, Effective, Plan]]:
    """Inside commit_events' transaction, once the batch's runs rows are written.

    RUNNING with on_long_run_minutes = "auto": store the learned deadline on the run.
    SUCCEEDED: the `recovered` alert, routed to those who got the failure.
    """
    due: list[tuple[Alert, Effective, Plan]] = []
    learned: dict[str, Learned] = {}
    batch = list(batch)
    maybe_open = open_candidates([e for e in batch if e.state == "SUCCEEDED" and e.run_id], now)
    maybe_open.update(e.job_id for e in batch if e.retrying)  # its alert is in this batch
    for e in batch:
        if e.state not in ("RUNNING", "SUCCEEDED") or not e.run_id:
            continue
        eff = cat.effective(e.job_id, e.alerts, e.tags)
        if e.state == "RUNNING":
            if eff.alerts.on_long_run_minutes == "auto":
                if e.job_id not in learned:
                    learned[e.job_id] = learn(e.job_id)
                set_learned_deadline(e, learned[e.job_id])
            continue
        if e.job_id not in maybe_open:
            continue  # success after success, the common case: nothing to close
        found = recovery_for(cfg, e, eff, now, in_batch)
        if found:
            alert, rec = found
            due.append((alert, eff, rec.plan))
    return due


def describe(cfg: Config, job_id: str, eff: Effective, now: datetime, *,
             would_send: bool = True) -> list[str]:
    """`explain`'s lines on the job's incident state and learned threshold."""
    out = []
    ep = episode(job_id, now)
    rec = plan_recovery(cfg, ep, None, eff.alerts.on_recovery)
    key = dedup_key(job_id)
    if ep.failures and ep.first_failure is not None:
        runs = "run" if ep.failures == 1 else "runs"
        minutes = (now - ep.first_failure).total_seconds() / 60
        out.append(f"incident: open, {ep.failures} failed {runs} since the last success"
                   f" (first failure {span(minutes)} ago); dedup key {key}")
    elif rec.open:
        out.append(f"incident: open, a long-run warning paged; dedup key {key}")
    else:
        last = (f"last success {ep.last_success:%Y-%m-%d %H:%M:%S}Z" if ep.last_success
                else "no finished run recorded")
        out.append(f"incident: none open ({last}); dedup key {key}")
    if rec.open and would_send:
        if rec.plan.targets:
            out.append("  a SUCCEEDED run would send `recovered` to:")
        else:
            out.append("  a SUCCEEDED run would send `recovered` to nobody")
        for t in rec.plan.targets:
            out.append(f"    -> {t.transport}: {t.recipient} ({t.origin})")
        for t in rec.plan.skipped:
            out.append(f"    not told {t.transport}: {t.recipient} ({t.error})")
    if eff.alerts.on_long_run_minutes == "auto":
        out.append(learn(job_id).describe())
    return out
