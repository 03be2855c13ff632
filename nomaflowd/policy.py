"""Policy: config + catalogue -> which alerts an event (or an overdue run) makes due, to whom."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from nomaflowd import alerts, catalogue, db, events, incidents, state
from nomaflowd.alerts import Alert, alert_key, rfc3339
from nomaflowd.catalogue import Catalogue, Effective, WatchedCatalogue
from nomaflowd.config import Config
from nomaflowd.routing import Plan, Router


@dataclass
class Routed:
    """An alert with its recipients worked out (what `explain` shows and ingest claims)."""

    alert: Alert
    effective: Effective
    plan: Plan


class Policy:
    """Pure apart from stat() on the catalogue and the reads a long-run warning needs."""

    def __init__(self, cfg: Config, running: Policy | None = None) -> None:
        """`running`: the policy a reload replaces (its catalogue is kept if jobs.toml is
        gone or empty)."""
        self.config = cfg
        self.router = Router.from_config(cfg)
        self.catalogue: WatchedCatalogue = WatchedCatalogue(  # ConfigError: a bad jobs.toml
            cfg.jobs_file, running.catalogue if running is not None else None)

    def current(self) -> Catalogue:
        return self.catalogue.refresh()

    def route(self, alert: Alert, eff: Effective, notice_to: list[str] | None = None) -> Routed:
        """Recipients an event file named (a NOTICE's, its own alerts block's) must be known
        or allowed by daemon.event_recipients: a runner cannot send anywhere it likes."""
        cat = self.catalogue.current  # refreshed once per batch by the caller, not per alert
        if notice_to:
            plan = self.router.plan(notice_to, (), use_rules=False, from_event=True,
                                    catalogue=cat)
        else:
            plan = self.router.plan(eff.alerts.recipients, eff.tags,
                                    from_event=eff.alerts_origin == "event", catalogue=cat)
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
        alert = Alert(kind="long_run", key=alert_key(run.job_id, run.run_id, "long_run"),
                      job_id=run.job_id, run_id=run.run_id, event_id=None, state="RUNNING",
                      url=self.config.run_url(run.run_id),
                      started_at=rfc3339(started),
                      minutes=minutes, usual_minutes=run.usual_minutes)
        return Routed(alert, eff, self.router.plan(
            eff.alerts.recipients, eff.tags, from_event=eff.alerts_origin == "event",
            catalogue=self.current()))
