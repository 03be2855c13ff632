"""The daemon: spool -> database -> dispatcher, long-run poll and retention on APScheduler."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

import peewee as pw
from apscheduler.schedulers.background import BackgroundScheduler

from nomaflowd import (
    alerts,
    catalogue,
    config,
    db,
    events,
    incidents,
    metrics,
    state,
    systemd,
    transports,
)
from nomaflowd.alerts import Alert
from nomaflowd.catalogue import Catalogue, Effective, WatchedCatalogue
from nomaflowd.config import Config
from nomaflowd.db import utcnow
from nomaflowd.dispatch import Attempt, Dispatcher, Result
from nomaflowd.errors import NomaflowError, Rejected
from nomaflowd.routing import Plan, Router
from nomaflowd.spool import Spool, watch

logger = logging.getLogger(__name__)

BATCH = 1000
MAX_TRIES = 3
# Fault injection for the test suite: exit abruptly while handling a file whose name
# contains this string, as a crash in a parser or driver would.
CRASH_ON = os.environ.get("NOMAFLOWD_FAULT_CRASH_ON", "")
DB_ERRORS = (pw.PeeweeException, OSError)
RESENT = "sent again after a restart (the earlier attempt got no verdict)"


@dataclass
class Routed:
    """An alert with its recipients worked out (what `explain` shows and ingest stores)."""

    alert: Alert
    effective: Effective
    plan: Plan


class Policy:
    """Config + catalogue -> which alerts an event makes due and to whom. Pure apart from stat()."""

    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.router = Router(cfg.transports, cfg.routing)
        self.catalogue = WatchedCatalogue(cfg.jobs_file)

    def current(self) -> Catalogue:
        return self.catalogue.refresh()

    def route(self, alert: Alert, eff: Effective, notice_to: list[str] | None = None) -> Routed:
        if notice_to:
            plan = self.router.plan(notice_to, (), use_rules=False)
        else:
            plan = self.router.plan(eff.alerts.recipients, eff.tags)
        return Routed(alert, eff, incidents.fit(plan, alert.kind, self.config.transports))

    def for_event(self, event: events.Event, eff: Effective) -> list[Routed]:
        """The alerts this event makes due under its effective block, routed."""
        url = self.config.run_url(event.run_id)
        return [self.route(alerts.from_event(kind, event, url), eff, event.get("recipients"))
                for kind in state.alerts_due(event, eff.alerts)]

    def for_long_run(self, run: db.RunRow, now: datetime) -> Routed:
        overrides = json.loads(run.overrides) if run.overrides else {}
        block = (catalogue.parse_alerts(overrides["alerts"], "alerts")
                 if "alerts" in overrides else None)
        tags = tuple(overrides["tags"]) if "tags" in overrides else None
        eff = self.current().effective(run.job_id, block, tags)
        started = run.started_at
        minutes = (now - started).total_seconds() / 60 if started else None
        alert = Alert(kind="long_run", key=f"{run.job_id}/{run.run_id}/long_run",
                      job_id=run.job_id, run_id=run.run_id, event_id=None, state="RUNNING",
                      url=self.config.run_url(run.run_id),
                      started_at=started.strftime("%Y-%m-%dT%H:%M:%SZ") if started else None,
                      minutes=minutes, usual_minutes=run.usual_minutes)
        return Routed(alert, eff, self.router.plan(eff.alerts.recipients, eff.tags))


def claim(routed: list[Routed], replica: str, now: datetime | str) -> list[Attempt]:
    """Insert one claimed delivery per target; only the rows this call inserted are ours to send.

    Runs inside the caller's transaction, so an alert is claimed in the same commit as
    the event (or long-run mark) that made it due.
    """
    rows, alerts_by_key = [], {}
    errors: dict[tuple[str, str, str], str] = {}
    for r in routed:
        alerts_by_key[r.alert.key] = r.alert
        alert = dict(vars(r.alert))  # flat fields (dataclasses.asdict deep-copies: 10x slower)
        for t in r.plan.targets:
            errors[(r.alert.key, t.transport, t.recipient)] = t.error
            rows.append((r.alert.key, t.transport, t.recipient, r.alert.event_id,
                         json.dumps({"alert": alert, "error": t.error}, separators=(",", ":")),
                         "claimed", replica, now, 1))
    inserted = db.insert_new(
        "deliveries", ("alert_key", "transport", "recipient", "event_id", "context", "state",
                       "claimed_by", "claimed_at", "attempts"), rows,
        conflict=("alert_key", "transport", "recipient"),
        returning=("id", "alert_key", "transport", "recipient"))
    return [Attempt(alerts_by_key[key], transport, recipient, delivery_id=ident,
                    error=errors[(key, transport, recipient)])
            for ident, key, transport, recipient in inserted]


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.spool = Spool(cfg.spool_dir, cfg.replica_id)
        self.suspects: set[str] = set()
        self.wakeup = threading.Event()
        self.stopping = threading.Event()
        self.hinted = True
        self.reload_requested = False
        self.pending: deque[str] = deque()
        self.last_scan = 0.0
        self.unrecorded: list[Result] = []
        self.db_down_logged = 0.0
        self.spool_down_logged = 0.0
        self.spool_lost = False
        self.ready = False
        self.last_ping = 0.0
        self.watchdog_every = systemd.watchdog_interval()
        # A peer silent for this long is taken for dead and its unfinished sends are redone.
        self.lease_seconds = max(3 * cfg.poll_seconds, 2 * cfg.send_timeout_seconds + 5)
        self.policy = Policy(cfg)
        self.dispatcher = Dispatcher(transports.build(cfg.transports, cfg.send_timeout_seconds),
                                     cfg.replica_id, wake=self.wakeup.set)
        self.observer: Any = None
        self.scheduler: BackgroundScheduler | None = None
        self.web: Any = None  # nomaflowd.web.WebServer when daemon.web_listen is set
        self.metrics_server: metrics.MetricsServer | None = None
        self.pace_wait: float | None = None
        self.last_progress = time.monotonic()
        self.last_event_at: float | None = None

    # --- start and stop ------------------------------------------------------------

    def initialize(self) -> None:
        self.spool.prepare()
        self.database = db.open_database(self.config.database)
        if self.config.web_listen:  # bound before anything starts: a busy port fails fast
            from nomaflowd.web import WebServer
            self.web = WebServer(self.config.web_listen, lambda: self.config, self.spool)
        self.observer = watch(self.config.spool_dir, self.hint)  # watch first...
        self.hinted = True                                      # ...then scan the backlog
        self.count_tries(utcnow())
        db.heartbeat(self.config.replica_id)
        self.resume_claimed()
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={
            "max_instances": 1, "coalesce": True, "misfire_grace_time": None})
        self.scheduler.add_job(self.poll_long_runs_job, "interval",
                               seconds=self.config.poll_seconds,
                               next_run_time=datetime.now().astimezone(),
                               id="long_run")
        self.scheduler.add_job(self.prune_job, "interval", days=1,
                               next_run_time=datetime.now().astimezone() + timedelta(minutes=1),
                               id="prune")
        self.scheduler.start()
        if self.config.metrics_listen:
            self.metrics_server = metrics.MetricsServer(
                self.config.metrics_listen, self.gauges,
                lambda: time.monotonic() - self.last_progress
                < max(10.0, 3 * self.config.rescan_seconds))

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()
        self.wakeup.set()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True
        self.wakeup.set()

    def rewatch(self) -> None:
        """After the spool was gone: its subdirectories and a watch on the new directory."""
        self.spool.close()
        self.spool.prepare()
        old, self.observer = self.observer, watch(self.config.spool_dir, self.hint)
        if old is not None:
            old.stop()
            old.join()
        self.hinted = True
        logger.info("spool %s is back; watching it again", self.config.spool_dir)

    def hint(self) -> None:
        self.hinted = True
        self.wakeup.set()

    def run(self) -> int:
        self.initialize()
        logger.info("nomaflowd started: spool %s, replica %s, %d transport(s)",
                    self.config.spool_dir, self.config.replica_id, len(self.config.transports))
        while not self.stopping.is_set():
            try:
                more = self.step()
            except Exception:  # the loop must outlive a bug in one iteration
                logger.exception("main loop iteration failed; going on")
                self.stopping.wait(1.0)
                more = False
            if self.reload_requested:
                self.reload()
            self.maybe_ping()
            if not more:
                self.wakeup.wait(self.idle_timeout())
                self.wakeup.clear()
        self.shutdown()
        return 0

    def gauges(self) -> dict[str, float]:
        """Live values for /metrics (called on the metrics thread)."""
        values = {"spool_backlog": float(len(self.pending)),
                  "alerts_waiting": float(self.dispatcher.waiting)}
        if self.last_event_at is not None:
            values["newest_event_age_seconds"] = time.monotonic() - self.last_event_at
        try:
            values["running_runs"] = float(
                db.RunRow.select().where(db.RunRow.state == "RUNNING").count())
        except DB_ERRORS:
            pass  # the gauge is left out while the database is away
        finally:
            db.proxy.close()
        return values

    def idle_timeout(self) -> float:
        """How long the loop may block: until the next rescan, ping or paced send is due."""
        if self.pending:
            return 0.0
        timeout = self.config.rescan_seconds - (time.monotonic() - self.last_scan)
        if self.watchdog_every:
            timeout = min(timeout, self.watchdog_every)
        if self.pace_wait is not None:
            timeout = min(timeout, self.pace_wait)
        return max(0.01, timeout)

    def shutdown(self) -> None:
        systemd.notify("STOPPING=1")
        logger.info("stopping: waiting for %d send(s) in flight", self.dispatcher.inflight)
        if self.observer is not None:
            self.observer.stop()
            self.observer.join()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.web is not None:
            self.web.close()
        self.dispatcher.wait_idle(self.config.send_timeout_seconds + 5)
        self.record(self.dispatcher.drain())
        self.dispatcher.close(wait=True)
        self.spool.close()
        self.database.close()
        logger.info("stopped")

    def reload(self) -> None:
        self.reload_requested = False
        systemd.reloading()
        try:
            cfg = config.load(self.config.path)
        except NomaflowError as exc:
            logger.error("reload refused, keeping the running config: %s", exc)
            systemd.notify("READY=1")
            return
        for key in ("spool_dir", "database", "web_listen", "metrics_listen"):
            if getattr(cfg, key) != getattr(self.config, key):
                logger.warning("daemon.%s changed; it takes effect at the next restart", key)
                cfg = replace(cfg, **{key: getattr(self.config, key)})
        self.config = cfg
        self.policy = Policy(cfg)
        self.dispatcher.configure(transports.build(cfg.transports, cfg.send_timeout_seconds))
        logger.info("reloaded %s: %d transport(s)", cfg.path, len(cfg.transports))
        systemd.notify("READY=1")

    def maybe_ping(self) -> None:
        if not self.ready:
            if not self.pending and not self.hinted:
                self.ready = True
                systemd.notify("READY=1", "STATUS=watching the spool")
                logger.info("backlog ingested; watching %s", self.config.spool_dir)
            return
        if self.watchdog_every and time.monotonic() - self.last_ping >= self.watchdog_every:
            self.last_ping = time.monotonic()
            systemd.notify("WATCHDOG=1")

    # --- one iteration -----------------------------------------------------------------

    def step(self, now: datetime | None = None) -> bool:
        """Record finished sends, then ingest at most one batch. Returns "more work right away?"."""
        self.last_progress = time.monotonic()
        try:
            self.record(self.dispatcher.drain())
            self.pace_wait = self.dispatcher.pace()
            if not self.pending:
                due = time.monotonic() - self.last_scan >= self.config.rescan_seconds
                if not (self.hinted or due):
                    return False
                self.hinted = False
                self.last_scan = time.monotonic()
                try:
                    names = self.spool.scan()
                except OSError as exc:  # not the database's fault: say what it is
                    if time.monotonic() - self.spool_down_logged >= 60:
                        self.spool_down_logged = time.monotonic()
                        logger.error("spool %s cannot be read: %s", self.config.spool_dir,
                                     exc.strerror or exc)
                    self.spool_lost = True
                    return False
                if self.spool_lost:  # it is back (perhaps a new directory): watch it anew
                    self.spool_lost = False
                    self.rewatch()
                if self.suspects:  # files in hand at a crash go first, one at a time
                    names.sort(key=lambda n: n not in self.suspects)
                self.pending.extend(names)
                if not self.pending:
                    return False
            if self.pending[0] in self.suspects:
                batch = [self.pending.popleft()]
            else:
                size = min(BATCH, len(self.pending))
                batch = [self.pending.popleft() for _ in range(size)]
            try:
                self.ingest(batch, now or utcnow())
            except DB_ERRORS:
                self.pending.extendleft(reversed(batch))
                raise
            return bool(self.pending)
        except DB_ERRORS as exc:
            self.database_down(exc)
            return False

    def database_down(self, exc: BaseException) -> None:
        """Files stay in the spool; say so once a minute, wait a moment, try again."""
        if time.monotonic() - self.db_down_logged >= 60:
            self.db_down_logged = time.monotonic()
            logger.error("database unavailable, files wait in the spool: %s", exc)
        self.pending.clear()
        self.stopping.wait(1.0)
        with contextlib.suppress(*DB_ERRORS):  # it was broken anyway; the next query reconnects
            self.database.close()

    def record(self, results: list[Result]) -> None:
        self.unrecorded.extend(results)
        if self.unrecorded:
            self.dispatcher.record(self.unrecorded)
            self.unrecorded = []

    def ingest(self, names: list[str], now: datetime) -> None:
        """Read a batch of files, commit their events and claims in one transaction, then send."""
        accepted: list[tuple[str, events.Event]] = []
        self.spool.mark_handling(names)
        for name in names:
            if CRASH_ON and CRASH_ON in name:
                os._exit(70)
            try:
                raw = self.spool.read(name)
                if raw is not None:
                    accepted.append((name, events.parse(raw, name, now)))
            except Rejected as exc:
                self.spool.reject(name, str(exc), now)
            except Exception as exc:  # a parser bug must quarantine the file, not stop the loop
                logger.exception("spool file %r could not be handled", name)
                self.spool.reject(name, f"internal error: {type(exc).__name__}", now)
        attempts: list[Attempt] = []
        if accepted:
            with db.proxy.atomic():
                attempts = self.commit_events([e for _, e in accepted], now)
            self.spool.remove([name for name, _ in accepted])
        self.spool.clear_handling()
        if self.suspects.intersection(names):
            self.suspects.difference_update(names)
            db.SpoolTryRow.delete().where(db.SpoolTryRow.name.in_(names)).execute()
        for attempt in attempts:
            self.dispatcher.submit(attempt)

    def count_tries(self, now: datetime) -> None:
        """Count a try for each file in hand when the last run died; quarantine at MAX_TRIES.

        Without this, a file that crashes the daemon would crash it again at every
        restart, and every alert behind it would wait forever. The note of names in hand
        is emptied before the counts are written: a crash in between undercounts (the
        crasher is counted again next time it is in hand), and never counts one stop twice.
        """
        names = [n for n in self.spool.handled_when_stopped()
                 if os.path.lexists(self.spool.path / n)]
        self.spool.mark_handling([])
        t = db.SpoolTryRow
        tries: dict[str, int] = {}
        with db.proxy.atomic():
            for name in names:
                row, _ = t.get_or_create(name=name, defaults={"updated_at": now})
                tries[name] = row.tries + 1
                t.update(tries=tries[name], updated_at=now).where(t.id == row.id).execute()
            # Files counted before but not finished since: still suspects, handled alone.
            for row in t.select(t.name, t.tries).where(t.name.not_in(names)):
                if os.path.lexists(self.spool.path / row.name):
                    tries[row.name] = row.tries
        for name, count in tries.items():
            if count >= MAX_TRIES:
                self.spool.reject(name, f"the daemon stopped {count} times while handling this"
                                  " file; quarantined to break the crash loop", now)
                t.delete().where(t.name == name).execute()
            else:
                if name in names:
                    logger.warning("spool file %r was in hand when the daemon stopped"
                                   " (try %d of %d)", name, count, MAX_TRIES)
                self.suspects.add(name)

    def commit_events(self, batch: list[events.Event], now: datetime) -> list[Attempt]:
        stamp = db.stamp(now)  # the batch's one timestamp, converted once
        fresh_ids = {row[0] for row in db.insert_new(
            "events", ("event_id", "received_at", "job_id", "run_id", "state", "payload"),
            [(e.event_id, stamp, e.job_id, e.run_id, e.state, e.payload) for e in batch],
            conflict=("event_id",), returning=("event_id",))}
        cat = self.policy.current()
        routed: list[Routed] = []
        inserts, finishes, recorded = [], [], []
        for e in batch:
            if e.event_id not in fresh_ids:
                continue  # a duplicate: recorded once already, alerts once already
            fresh_ids.discard(e.event_id)
            metrics.count_event(e.state)
            self.last_event_at = time.monotonic()
            eff = cat.effective(e.job_id, e.alerts, e.tags)
            if e.run_id and e.state in events.RUN_STATES:
                recorded.append(e)
                started = e.started_at or (e.at if e.state == "RUNNING" else None)
                deadline = None
                minutes = eff.alerts.on_long_run_minutes
                if e.state == "RUNNING" and isinstance(minutes, float) and started:
                    try:
                        deadline = started + timedelta(minutes=minutes)
                    except OverflowError:
                        deadline = None  # past year 9999: a warning that can never be due
                overrides = {}
                if e.alerts is not None:
                    overrides["alerts"] = e.fields["alerts"]
                if e.tags is not None:
                    overrides["tags"] = list(e.tags)
                final = state.is_final(e.state)
                inserts.append((e.job_id, e.run_id, e.state, started,
                                (e.finished_at or e.at) if final else None, stamp, deadline,
                                json.dumps(overrides) if overrides else None))
                if final:
                    finishes.append((e.state, e.finished_at or e.at, stamp, started,
                                     e.job_id, e.run_id))
            routed.extend(self.policy.for_event(e, eff))
        param = db.proxy.param
        if inserts:
            db.proxy.cursor().executemany(state.INSERT_RUN.format(p=param), inserts)
        if finishes:
            db.proxy.cursor().executemany(state.FINISH_RUN.format(p=param), finishes)
        # Learned deadlines and recoveries read the runs rows just written (same transaction).
        routed.extend(Routed(*due) for due in incidents.after_runs_recorded(
            self.config, recorded, cat, routed, now))
        return claim(routed, self.config.replica_id, stamp)

    # --- scheduled work --------------------------------------------------------------

    def resume_claimed(self) -> None:
        """Claims this replica made but never finished (a crash mid-send) are sent again."""
        d = db.DeliveryRow
        rows = list(d.select().where((d.state == "claimed")
                                     & (d.claimed_by == self.config.replica_id)))
        resent = self.reclaim(rows, self.config.replica_id, RESENT)
        if resent:
            logger.warning("%d notification(s) interrupted by the last stop are being sent again",
                           resent)

    def take_over(self) -> int:
        """Claims of replicas whose heartbeat is older than the lease: a peer died mid-send."""
        now = db.heartbeat(self.config.replica_id)
        cutoff = now - timedelta(seconds=self.lease_seconds)
        dead = [r.replica_id for r in db.ReplicaRow.select().where(
            (db.ReplicaRow.seen_at < cutoff)
            & (db.ReplicaRow.replica_id != self.config.replica_id))]
        if not dead:
            return 0
        d = db.DeliveryRow
        taken = 0
        for replica in dead:
            rows = list(d.select().where((d.state == "claimed") & (d.claimed_by == replica))
                        .limit(BATCH))
            taken += self.reclaim(rows, replica,
                                  f"taken over from replica {replica}, silent past its lease")
        if taken:
            logger.warning("took over %d notification(s) from silent replica(s) %s", taken,
                           ", ".join(dead))
        return taken

    def reclaim(self, rows: list[db.DeliveryRow], owner: str, note: str) -> int:
        """Move claims from `owner` to this replica (conditionally: one winner) and send them."""
        d = db.DeliveryRow
        count = 0
        for row in rows:
            won = d.update(claimed_by=self.config.replica_id, attempts=d.attempts + 1).where(
                (d.id == row.id) & (d.state == "claimed") & (d.claimed_by == owner)).execute()
            if not won:
                continue
            context = json.loads(row.context)
            self.dispatcher.submit(Attempt(Alert(**context["alert"]), row.transport,
                                           row.recipient, delivery_id=row.id,
                                           error=context["error"], note=note))
            count += 1
        return count

    def poll_long_runs(self, now: datetime) -> int:
        """Warn once per run still RUNNING past its deadline; one indexed query per poll."""
        due = list(db.RunRow.select().where(
            (db.RunRow.long_run_deadline <= now) & (db.RunRow.state == "RUNNING")
            & db.RunRow.long_run_alerted_at.is_null()).limit(BATCH))
        attempts: list[Attempt] = []
        for run in due:
            with db.proxy.atomic():
                won = db.RunRow.update(long_run_alerted_at=now, long_run_deadline=None).where(
                    (db.RunRow.id == run.id) & db.RunRow.long_run_alerted_at.is_null()
                    & (db.RunRow.state == "RUNNING")).execute()
                if won:
                    attempts += claim([self.policy.for_long_run(run, now)],
                                      self.config.replica_id, now)
        for attempt in attempts:
            self.dispatcher.submit(attempt)
        return len(attempts)

    def poll_long_runs_job(self) -> None:
        """Every poll_seconds: heartbeat, take over a dead peer's claims, long-run warnings."""
        try:
            self.take_over()
            self.poll_long_runs(utcnow())
        except DB_ERRORS as exc:
            logger.error("long-run poll skipped, database unavailable: %s", exc)
        except Exception:
            logger.exception("long-run poll failed")
        finally:
            self.database.close()

    def prune_job(self) -> None:
        try:
            removed = db.prune(utcnow(), self.config.retention_days)
            logger.info("retention: removed %s", ", ".join(f"{n} {t}" for t, n in removed.items()))
        except DB_ERRORS as exc:
            logger.error("retention skipped, database unavailable: %s", exc)
        finally:
            self.database.close()

