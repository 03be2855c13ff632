"""Schedules (SPEC §12): the job that never ran (`missed`) and the job that stays broken
(`stale`, `reminder`).

Each watched job has one row in the `schedules` table. Ingest moves it along as the job's
events arrive, inside the transaction that records them (`on_events`). The poll finds the rows
whose `next_check` has passed with one indexed range query, settles each with an update
conditional on its `version` (one replica wins, a restart finds the row as it was left), and
claims the alerts in that same transaction, like the long-run poll.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import peewee as pw

from nomaflowd import db, events, incidents, metrics
from nomaflowd.alerts import Alert, alert_key
from nomaflowd.catalogue import AlertsBlock, Catalogue
from nomaflowd.deliveries import BATCH, Deliveries
from nomaflowd.dispatch import Attempt
from nomaflowd.errors import Rejected
from nomaflowd.policy import Policy, Routed
from nomaflowd.routing import Plan, Target
from nomaflowd.timetable import Schedule

logger = logging.getLogger(__name__)

# After a long stop, a short interval could have been missed thousands of times: the count
# stops here ("at least") instead of stepping through every one.
MAX_TIMES = 10_000
DEADLINES = ("missed_deadline", "stale_deadline", "remind_deadline")
FIELDS = ("schedule", "expected_at", "missed_deadline", "disabled", "toggled_at", "last_run_id",
          "last_run_state", "last_run_at", "last_success_at", "stale_deadline", "failing_since",
          "reminders_sent", "remind_deadline", "next_check")


def iso(dt: datetime | None) -> str:
    return dt.isoformat(sep=" ", timespec="seconds") + "Z" if dt else ""


def minutes(value: float) -> timedelta:
    return timedelta(minutes=value)


def later(at: datetime, delta: timedelta) -> datetime | None:
    """`at + delta`, or None (never) past year 9999: an event may say it finished in 9999."""
    try:
        return at + delta
    except OverflowError:
        return None


def watched(cat: Catalogue, job_id: str) -> bool:
    """Does the job have a schedule, a staleness limit or reminders (its catalogue block)?"""
    block = cat.effective(job_id).alerts
    return (job_id in cat.jobs_schedules or block.on_stale_hours is not None
            or block.remind_every_minutes is not None)


def catalogue_jobs(cat: Catalogue) -> set[str]:
    return set(cat.jobs_alerts) | set(cat.jobs_tags) | set(cat.jobs_schedules)


def refresh_next_check(row: db.ScheduleRow) -> None:
    due = [d for d in (getattr(row, name) for name in DEADLINES) if d is not None]
    row.next_check = min(due) if due else None


def arm(row: db.ScheduleRow, block: AlertsBlock, schedule: Schedule | None,
        now: datetime) -> None:
    """Deadlines that follow from the current settings (a new row, a changed catalogue, a job
    enabled again). Reminders are armed by failures only."""
    spec = schedule.spec if schedule else None
    if spec != row.schedule or row.expected_at is None:
        row.schedule = spec
        row.expected_at = schedule.next_after(now) if schedule else None
    m = block.on_missed_minutes
    row.missed_deadline = (later(row.expected_at, minutes(m))
                           if m and row.expected_at and not row.disabled else None)
    h = block.on_stale_hours
    since = max(row.last_success_at or row.monitored_since, row.toggled_at or row.monitored_since)
    stale = later(since, timedelta(hours=h)) if h and not row.disabled else None
    # Armed only while it has not come due: a stale alert already sent waits for a success.
    row.stale_deadline = stale if stale and (row.stale_deadline or stale > now) else None
    every = block.remind_every_minutes
    if row.disabled or not every or row.reminders_sent >= block.max_reminders:
        row.remind_deadline = None
    elif row.failing_since is not None:
        # An episode open when reminders were turned on or made more frequent: the next
        # one is due by the interval now in force (it used to wait for the next episode).
        due = later(row.failing_since, minutes(every * (row.reminders_sent + 1)))
        if due is not None and (row.remind_deadline is None or due < row.remind_deadline):
            row.remind_deadline = due
    refresh_next_check(row)


def new_row(job_id: str, now: datetime) -> db.ScheduleRow:
    return db.ScheduleRow(job_id=job_id, monitored_since=now, disabled=False, reminders_sent=0,
                          version=0)


def save(row: db.ScheduleRow) -> bool:
    """Write the row's fields if nobody changed it since it was read; True if we did."""
    s = db.ScheduleRow
    won = s.update({getattr(s, f): getattr(row, f) for f in FIELDS} | {s.version: row.version + 1}
                   ).where((s.id == row.id) & (s.version == row.version)).execute()
    if won:
        row.version += 1
    return bool(won)


def load(job_ids: Iterable[str], now: datetime, *, lock: bool = False) -> dict[str, Any]:
    """The rows of these jobs, created (monitoring starts now) where missing."""
    s = db.ScheduleRow
    jobs = sorted(set(job_ids))
    found: dict[str, Any] = {}
    for i in range(0, len(jobs), 500):
        query = s.select().where(s.job_id.in_(jobs[i:i + 500]))
        if lock and isinstance(db.proxy.obj, pw.PostgresqlDatabase):
            query = query.for_update()
        found.update((r.job_id, r) for r in query)
    missing = [j for j in jobs if j not in found]
    if missing:
        stamp = db.stamp(now)
        db.insert_new("schedules", ("job_id", "monitored_since", "disabled", "reminders_sent",
                                    "version"),
                      [(j, stamp, False, 0, 0) for j in missing], conflict=("job_id",),
                      returning=("id",))
        for i in range(0, len(missing), 500):
            query = s.select().where(s.job_id.in_(missing[i:i + 500]))
            if lock and isinstance(db.proxy.obj, pw.PostgresqlDatabase):
                query = query.for_update()
            found.update((r.job_id, r) for r in query)
    return found


# --- ingest: events move the rows along ---------------------------------------------------

def on_events(batch: Iterable[events.Event], cat: Catalogue, now: datetime) -> None:
    """Inside commit_events' transaction: the fresh events of watched jobs update their rows."""
    mine = [e for e in batch if e.state != "NOTICE" and watched(cat, e.job_id)]
    if not mine:
        return
    rows = load((e.job_id for e in mine), now, lock=True)
    changed: dict[str, Any] = {}
    for e in mine:
        row = rows[e.job_id]
        block = cat.effective(e.job_id).alerts
        schedule = cat.jobs_schedules.get(e.job_id)
        if row.version == 0 and e.job_id not in changed:  # created just now: monitoring starts
            arm(row, block, schedule, now)
        apply(row, e, block, schedule, now)
        changed[e.job_id] = row
    for row in changed.values():
        refresh_next_check(row)
        save(row)


def apply(row: db.ScheduleRow, e: events.Event, block: AlertsBlock, schedule: Schedule | None,
          now: datetime) -> None:
    """One event's effect on its job's row (SPEC §12)."""
    if e.state in events.TOGGLE_STATES:
        if row.toggled_at is not None and e.at < row.toggled_at:
            return  # an older toggle arriving late: the latest one holds
        was = row.disabled
        row.toggled_at, row.disabled = e.at, e.state == "DISABLED"
        if row.disabled:
            row.remind_deadline = None  # reminders stop at DISABLED
        elif was and schedule:
            row.expected_at = schedule.next_after(now)  # nothing is owed for the pause
        arm(row, block, schedule, now)
        return
    run_state = "RUNNING" if e.retrying else e.state
    row.last_run_id, row.last_run_state, row.last_run_at = e.run_id, run_state, now
    m = block.on_missed_minutes
    if schedule and m and row.expected_at is not None:
        times = [now, e.at] + ([e.started_at] if e.started_at else [])
        window = minutes(m)
        for _ in range(1000):  # the scheduled times this run counts for
            if not any(abs(x - row.expected_at) <= window for x in times):
                break
            row.expected_at = schedule.next_after(row.expected_at)
        if not row.disabled:
            row.missed_deadline = later(row.expected_at, window)
    # Events may arrive in any order: one that ended before what the row already knows (a
    # success before the last one, or before the episode's first failure; a failure before
    # the last success) neither moves the last success back nor ends or opens an episode.
    ended = e.finished_at or e.at
    if run_state == "SUCCEEDED":
        if row.last_success_at is None or ended >= row.last_success_at:
            row.last_success_at = ended
            row.stale_deadline = (
                later(ended, timedelta(hours=block.on_stale_hours))
                if block.on_stale_hours and not row.disabled else None)
        if row.failing_since is None or ended >= row.failing_since:
            row.failing_since, row.reminders_sent, row.remind_deadline = None, 0, None
    elif (run_state == "FAILED" and row.failing_since is None
          and (row.last_success_at is None or ended >= row.last_success_at)):
        row.failing_since = ended
        row.reminders_sent = 0
        every = block.remind_every_minutes
        row.remind_deadline = (later(row.failing_since, minutes(every))
                               if every and not row.disabled else None)


# --- the poll: deadlines that passed -------------------------------------------------------

def activity(job_id: str, since: datetime) -> list[datetime]:
    """When the job's runs since `since` were seen: started, finished, last received."""
    r = db.RunRow
    out: list[datetime] = []
    for run in r.select(r.started_at, r.finished_at, r.updated_at).where(
            (r.job_id == job_id) & (r.updated_at >= since)):
        out.extend(t for t in (run.started_at, run.finished_at, run.updated_at) if t)
    return out


def job_alert(kind: str, row: db.ScheduleRow, key: str, url: str, **values: Any) -> Alert:
    details = {k: str(v) for k, v in values.pop("details", {}).items() if v}
    return Alert(kind=kind, key=alert_key(row.job_id, kind, key), job_id=row.job_id,
                 run_id=values.pop("run_id", None), event_id=None, state=kind.upper(), url=url,
                 details=details, **values)


def forget(cat: Catalogue, cutoff: datetime) -> int:
    """The daily retention's: rows of jobs jobs.toml does not name, silent since before
    `cutoff`. With [defaults.alerts] watching every job, each job id ever seen kept its row
    for good, and every reload re-armed them all (4 s at 100,000 rows). A job that comes
    back is watched again from then."""
    s = db.ScheduleRow
    named = catalogue_jobs(cat)
    gone = [row.id for row in s.select(s.id, s.job_id).where(
        pw.fn.COALESCE(s.last_run_at, s.monitored_since) < cutoff) if row.job_id not in named]
    for i in range(0, len(gone), BATCH):
        s.delete().where(s.id.in_(gone[i:i + BATCH])).execute()
    return len(gone)


class Schedules:
    """The due-schedule poll; keeps which catalogue it last synchronised with."""

    def __init__(self) -> None:
        self.synced: Catalogue | None = None

    def poll(self, policy: Policy, deliveries: Deliveries, now: datetime) -> int:
        """Claim and submit what came due; one indexed query when nothing did."""
        cat = policy.current()
        if cat is not self.synced:
            self.sync(cat, now)
            self.synced = cat
        s = db.ScheduleRow
        due = list(s.select().where(s.next_check <= now).order_by(s.next_check).limit(BATCH))
        attempts: list[Attempt] = []
        for row in due:
            with db.proxy.atomic():
                routed = self.settle(row, policy, cat, now)
                if save(row):
                    attempts += deliveries.claim(routed, now)
                    for r in routed:
                        metrics.count_schedule_alert(r.alert.kind)
        deliveries.submit(attempts)
        return len(attempts)

    def sync(self, cat: Catalogue, now: datetime) -> int:
        """Rows for the catalogue's watched jobs, their deadlines re-armed for the settings
        now in force (a new or changed schedule starts monitoring from now)."""
        want = {j for j in catalogue_jobs(cat) if watched(cat, j)}
        s = db.ScheduleRow
        rows = {r.job_id: r for r in s.select()}
        created = []
        for job_id in sorted(want - set(rows)):  # armed before the insert: one statement
            row = new_row(job_id, now)
            arm(row, cat.effective(job_id).alerts, cat.jobs_schedules.get(job_id), now)
            values = (job_id, now, 0, *(getattr(row, f) for f in FIELDS))
            created.append(tuple(db.stamp(v) if isinstance(v, datetime) else v for v in values))
        with db.proxy.atomic():
            db.insert_new("schedules", ("job_id", "monitored_since", "version", *FIELDS),
                          created, conflict=("job_id",), returning=("id",))
        changed = len(created)
        for job_id, row in rows.items():
            before = {f: getattr(row, f) for f in FIELDS}
            if job_id in want or watched(cat, job_id):
                arm(row, cat.effective(job_id).alerts, cat.jobs_schedules.get(job_id), now)
            else:
                row.missed_deadline = row.stale_deadline = row.remind_deadline = None
                refresh_next_check(row)
            if {f: getattr(row, f) for f in FIELDS} != before and save(row):
                changed += 1
        return changed

    def settle(self, row: db.ScheduleRow, policy: Policy, cat: Catalogue,
               now: datetime) -> list[Routed]:
        """The row's deadlines that passed: its alerts, routed; the row moved on."""
        eff = cat.effective(row.job_id)
        block, schedule = eff.alerts, cat.jobs_schedules.get(row.job_id)
        url = policy.config.base_url
        alerts: list[Alert] = []
        routed: list[Routed] = []
        if row.missed_deadline is not None and row.missed_deadline <= now:
            alerts += self.missed(row, block, schedule, url, now)
        if row.stale_deadline is not None and row.stale_deadline <= now:
            row.stale_deadline = None
            h = block.on_stale_hours
            since = row.last_success_at or row.monitored_since
            if h and not row.disabled:
                due = later(since, timedelta(hours=h))
                if due is None or due > now:
                    row.stale_deadline = due  # the limit was raised (None: past year 9999)
                else:
                    alerts.append(job_alert(
                        "stale", row, since.isoformat(), url,
                        minutes=(now - since).total_seconds() / 60,
                        details={"last_success": iso(row.last_success_at)}))
        if row.remind_deadline is not None and row.remind_deadline <= now:
            found = self.reminder(row, block, policy, now)
            if found:
                routed.append(Routed(found[0], eff, found[1]))
        refresh_next_check(row)
        return routed + [policy.route(a, eff) for a in alerts]

    def missed(self, row: db.ScheduleRow, block: AlertsBlock, schedule: Schedule | None,
               url: str, now: datetime) -> list[Alert]:
        m = block.on_missed_minutes
        if schedule is None or not m or row.disabled or row.expected_at is None:
            row.missed_deadline = None
            return []
        window = minutes(m)
        times: list[datetime] = []
        t = row.expected_at

        def overdue(t: datetime) -> bool:  # a parked cron (`0 0 31 2 *`) is never due
            due = later(t, window)
            return due is not None and due <= now

        while overdue(t) and len(times) < MAX_TIMES:
            times.append(t)
            t = schedule.next_after(t)
        if overdue(t):
            t = schedule.next_after(now - window)
        row.expected_at, row.missed_deadline = t, later(t, window)
        if not times:
            return []
        seen = activity(row.job_id, times[0] - window)
        if row.last_run_at:
            seen.append(row.last_run_at)
        missed = [x for x in times if not any(abs(y - x) <= window for y in seen)]
        if not missed:
            return []
        return [job_alert("missed", row, missed[0].isoformat(), url, minutes=m,
                          failures=len(missed),
                          details={"expected": iso(missed[0]), "last_expected": iso(missed[-1]),
                                   "last_run": row.last_run_id})]

    def reminder(self, row: db.ScheduleRow, block: AlertsBlock, policy: Policy,
                 now: datetime) -> tuple[Alert, Plan] | None:
        row.remind_deadline = None
        every = block.remind_every_minutes
        if (not every or row.disabled or row.failing_since is None
                or row.reminders_sent >= block.max_reminders):
            return None
        ep = incidents.episode(row.job_id, now)
        if not ep.failures:
            return None  # closed meanwhile (a success recorded out of order)
        row.reminders_sent += 1
        if row.reminders_sent < block.max_reminders:
            row.remind_deadline = now + minutes(every)
        plan = Plan()
        cfg = policy.config
        for (transport, recipient), kinds in incidents.triggered(row.job_id, ep.run_ids).items():
            if "failed" in kinds and transport in cfg.transports:
                plan.targets.append(Target(transport, recipient, recipient, "got the failure"))
        plan = incidents.fit(plan, "reminder", cfg.transports)
        if not plan.targets:
            logger.info("reminder %d for %s: nobody got its failure, so nobody is reminded",
                        row.reminders_sent, row.job_id)
            return None
        first = ep.first_failure or row.failing_since
        alert = job_alert("reminder", row, f"{row.failing_since.isoformat()}/"
                          f"{row.reminders_sent}", url=cfg.run_url(ep.run_ids[0]),
                          run_id=ep.run_ids[0], failures=ep.failures,
                          minutes=(now - first).total_seconds() / 60,
                          details={"reminder": f"{row.reminders_sent} of {block.max_reminders}"})
        return replace(alert, details={**alert.details, **self.last_error(row.job_id, ep)}), plan

    @staticmethod
    def last_error(job_id: str, ep: incidents.Episode) -> dict[str, str]:
        """The newest failed run's error, for the reminder's line."""
        e = db.EventRow
        row = (e.select(e.payload).where((e.job_id == job_id) & (e.run_id == ep.run_ids[0])
                                         & (e.state == "FAILED"))
               .order_by(e.id.desc()).first())
        if row is None:
            return {}
        try:
            error = events.decode(row.payload.encode())[0].get("error")
        except Rejected:
            return {}
        return {"error": error} if isinstance(error, str) and error else {}


def status(cat: Catalogue, now: datetime, limit: int = 200,
           job_id: str | None = None) -> list[dict[str, Any]]:
    """Each scheduled job (or `job_id`'s): next expected time, last run, late or not (explain,
    the web page). Late: its expected time plus on_missed_minutes has passed with no run."""
    s = db.ScheduleRow
    jobs = ([job_id] if job_id in cat.jobs_schedules else []) if job_id is not None \
        else sorted(cat.jobs_schedules)[:limit]
    rows = {r.job_id: r for r in s.select().where(s.job_id.in_(jobs))} if jobs else {}
    out = []
    for job in jobs:
        schedule = cat.jobs_schedules[job]
        row = rows.get(job)
        m = cat.effective(job).alerts.on_missed_minutes
        expected = row.expected_at if row and row.schedule == schedule.spec else None
        due = later(expected, minutes(m or 0)) if expected else None
        late = bool(due and not (row and row.disabled) and now > due)
        out.append({"job_id": job, "schedule": schedule.spec,
                    "next": expected or schedule.next_after(now),
                    "last_run_id": row.last_run_id if row else None,
                    "last_run_state": row.last_run_state if row else None,
                    "last_run_at": row.last_run_at if row else None,
                    "disabled": bool(row and row.disabled), "late": late})
    return out


def describe(cat: Catalogue, job_id: str, now: datetime) -> list[str]:
    """`explain`'s lines on the job's schedule, staleness and reminders."""
    out = []
    for st in status(cat, now, job_id=job_id):
        last = (f"{st['last_run_id']} ({st['last_run_state']}, received"
                f" {iso(st['last_run_at'])})" if st["last_run_id"] else "none recorded")
        late = "paused (DISABLED)" if st["disabled"] else ("LATE" if st["late"] else "no")
        out.append(f"schedule: {st['schedule']}; next expected {iso(st['next'])}; last run"
                   f" {last}; late: {late}")
    block = cat.effective(job_id).alerts
    if job_id in cat.jobs_schedules and block.on_missed_minutes is None:
        out.append("  no `missed` alert: set on_missed_minutes in the job's alerts block")
    if block.on_stale_hours is not None:
        out.append(f"stale alert after {block.on_stale_hours:g} h without a success")
    if block.remind_every_minutes is not None:
        out.append(f"reminders every {block.remind_every_minutes:g} min while failing, at most"
                   f" {block.max_reminders} per failure episode, to whoever got the failure")
    return out
